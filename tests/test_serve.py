"""The serving contract against the real vLLM CPU server (started once by `kdlora serve`) with the
real `openai` client: exact ranks, budgets, errors that leave the server up, exact base traffic under
mixed batches, hot-swap from the (fake, local) Hub, discovery, metrics, streaming."""

import concurrent.futures
import json
import time
import urllib.request

import pytest
import torch
from conftest import write_nested_adapter

pytestmark = pytest.mark.integration
ALIAS = "teacher-adapter"
PROMPT = "The three most useful Python built-in functions are"


@pytest.fixture(scope="module")
def client(vllm_server):
    from openai import OpenAI

    return OpenAI(base_url=vllm_server + "/v1", api_key="unused", max_retries=0)


def complete(client, model, prompt=PROMPT, tokens=8, **kwargs):
    return client.completions.with_raw_response.create(
        model=model, prompt=prompt, max_tokens=tokens, temperature=0.0, **kwargs
    )


def text(client, model, prompt=PROMPT):
    return complete(client, model, prompt).parse().choices[0].text


def peft_greedy(teacher_dir, adapter, rank, tmp_path, messages=None, tokens=8) -> str:
    """Greedy tokens of PEFT on the adapter truncated to `rank` for PROMPT (or for `messages` through the tokenizer's
    chat template, as vLLM's chat route renders them): what the server must answer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hub.adapter import truncate_adapter

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    base = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, truncate_adapter(adapter, rank, tmp_path / f"r{rank}")).eval()
    if messages is None:
        ids = tokenizer(PROMPT, return_tensors="pt")
    else:
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=tokens, do_sample=False)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=messages is not None)


@pytest.mark.parametrize("rank", [1, 4, 16])
def test_rank_k_greedy_equals_peft_on_the_truncated_adapter(client, teacher_dir, teacher_adapter, tmp_path, rank):
    raw = complete(client, f"{ALIAS}@r{rank}")
    served = raw.parse()
    assert served.model == f"{ALIAS}@r{rank}" and raw.headers["x-kdlora-rank"] == str(rank)
    assert served.choices[0].text == peft_greedy(teacher_dir, teacher_adapter, rank, tmp_path)


def test_rslora_ranks_equal_peft_alone_and_batched(client, session_hub, teacher_dir, tmp_path):
    """kdlora distill's default scale, alpha / sqrt(r): each cut and a batch mixing cuts of it, as PEFT computes them."""
    from transformers import AutoModelForCausalLM

    _, hub = session_hub
    base = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    adapter = write_nested_adapter(
        tmp_path / "rs", base, rank=8, seed=11, base_model_id=str(teacher_dir), init_scale=0.3, use_rslora=True
    )
    _push_raw(hub, "kd/rs", adapter)
    expected = {rank: peft_greedy(teacher_dir, adapter, rank, tmp_path) for rank in (2, 8)}
    assert expected[2] != expected[8]  # the check can tell the ranks apart
    assert {rank: text(client, f"kd/rs@r{rank}") for rank in (2, 8)} == expected
    with concurrent.futures.ThreadPoolExecutor(max_workers=8) as pool:
        together = list(pool.map(lambda rank: text(client, f"kd/rs@r{rank}"), [2, 8] * 4))
    assert together == [expected[2], expected[8]] * 4


def test_ranks_really_differ(client):
    outputs = {text(client, f"{ALIAS}@r{k}") for k in (1, 4, 16)} | {text(client, "teacher")}
    assert len(outputs) >= 3  # the exactness tests above compare texts that do depend on the rank


def test_no_budget_serves_the_default_rank(client):
    raw = complete(client, ALIAS)
    assert raw.parse().model == f"{ALIAS}@r4" and raw.headers["x-kdlora-budget-met"] == "true"


def test_budget_from_extra_body_and_headers(client):
    # metadata: agreement 0.5 + k/20 at ranks 1, 2, 4, 16; bytes 100 k
    raw = complete(client, ALIAS, extra_body={"kdlora": {"max_rank": 8, "min_quality": 0.58}})
    assert raw.headers["x-kdlora-rank"] == "4" and raw.parse().model == f"{ALIAS}@r4"
    raw = complete(client, ALIAS, extra_headers={"x-kdlora-max-rank": "2"})
    assert raw.headers["x-kdlora-rank"] == "2"
    raw = complete(client, ALIAS, extra_body={"kdlora": {"min_quality": 0.99, "max_rank": 2}})
    assert (raw.headers["x-kdlora-rank"], raw.headers["x-kdlora-budget-met"]) == ("1", "false")
    assert raw.headers["x-kdlora-budget-miss"] == "min_quality 0.99"
    # greedy_token_f1 k/10: 0.1, 0.2, 0.4, 1.0 (agreement 0.55 .. 1.0 would meet both floors below at rank 4)
    raw = complete(
        client,
        ALIAS,
        extra_headers={
            "x-kdlora-min-quality": "0.3",
            "x-kdlora-quality-metric": "greedy_token_f1",
            "x-kdlora-max-rank": "8",
        },
    )
    assert raw.headers["x-kdlora-rank"] == "4" and raw.headers["x-kdlora-budget-met"] == "true"
    raw = complete(
        client, ALIAS, extra_body={"kdlora": {"min_quality": 0.5, "quality_metric": "greedy_token_f1", "max_rank": 8}}
    )
    assert (raw.headers["x-kdlora-rank"], raw.headers["x-kdlora-budget-miss"]) == (
        "1",
        "min_quality 0.5 (greedy_token_f1)",
    )


def test_chat_at_a_rank_below_max_streamed_and_whole_equals_peft_with_the_chat_template(
    client, teacher_dir, teacher_adapter, tmp_path
):
    messages = [{"role": "user", "content": "Name three Python built-in functions."}]

    def chat(model, **kwargs):
        return client.chat.completions.with_raw_response.create(
            model=model, messages=messages, max_tokens=12, temperature=0.0, **kwargs
        )

    expected = peft_greedy(teacher_dir, teacher_adapter, 2, tmp_path, messages, tokens=12)
    assert expected != chat(f"{ALIAS}@r16").parse().choices[0].message.content  # the check can tell rank 2 from 16
    raw = chat(f"{ALIAS}@r2")
    whole = raw.parse()
    assert raw.headers["x-kdlora-rank"] == "2" and whole.model == f"{ALIAS}@r2"
    chunks = list(chat(f"{ALIAS}@r2", stream=True).parse())
    assert all(chunk.model == f"{ALIAS}@r2" for chunk in chunks)
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == whole.choices[0].message.content == expected


@pytest.mark.parametrize(
    "model, extra, status, message",
    [
        (f"{ALIAS}@r0", {}, 400, "rank 0 is out of range: this adapter has ranks 1..16"),
        (f"{ALIAS}@r17", {}, 400, "rank 17 is out of range: this adapter has ranks 1..16"),
        (f"{ALIAS}@rfour", {}, 400, "the rank after '@r' must be a whole number"),
        (ALIAS, {"kdlora": {"max_rank": -2}}, 400, "budget field 'max_rank'"),
        (ALIAS, {"kdlora": {"latency_ms_per_token": "fast"}}, 400, "budget field 'latency_ms_per_token'"),
        (
            ALIAS,
            {"kdlora": {"min_quality": 0.5, "quality_metric": "bleu"}},
            400,
            f"quality_metric 'bleu': adapter '{ALIAS}' records greedy_token_f1, teacher_top1_agreement",
        ),
        ("other/adapter@r2", {}, 403, "adapter 'other/adapter' is not on this server's allow-list (kd/*)"),
        ("kd/../etc@r2", {}, 400, "paths are not adapter names"),
        ("/etc/passwd@r2", {}, 400, "paths are not adapter names"),
        ("kd/missing@r2", {}, 404, "repo kd/missing not found"),
    ],
)
def test_bad_requests_get_clear_errors_and_the_server_keeps_serving(client, model, extra, status, message):
    import openai

    with pytest.raises(openai.APIStatusError) as caught:
        complete(client, model, extra_body=extra)
    assert caught.value.status_code == status
    assert message in caught.value.message
    assert (
        "Paris"
        in client.chat.completions.create(
            model="teacher",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12,
            temperature=0.0,
        )
        .choices[0]
        .message.content
    )


def _push_raw(hub, repo, directory, **overrides):
    files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
    for name, content in overrides.items():
        files[name] = content
    hub.create_repo(repo)
    hub.commit(repo, files)


def test_corrupt_and_foreign_adapters_on_the_hub_are_refused(client, session_hub, teacher_adapter):
    import openai

    _, hub = session_hub
    meta = json.loads((teacher_adapter / "kdlora.json").read_text())
    _push_raw(hub, "kd/corrupt", teacher_adapter, **{"kdlora.json": json.dumps({**meta, "max_rank": 32}).encode()})
    _push_raw(
        hub,
        "kd/foreign",
        teacher_adapter,
        **{"kdlora.json": json.dumps({**meta, "base_model": {"id": "someone/other-model"}}).encode()},
    )
    with pytest.raises(openai.BadRequestError, match="says max_rank 32 but the tensors have rank 16"):
        complete(client, "kd/corrupt@r2")
    with pytest.raises(openai.BadRequestError, match="was trained on base model 'someone/other-model'"):
        complete(client, "kd/foreign@r2")


def test_hot_swap_from_the_hub_after_start(client, session_hub, teacher_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    _, hub = session_hub
    base = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    adapter = write_nested_adapter(
        tmp_path / "hot", base, rank=8, seed=7, base_model_id=str(teacher_dir), init_scale=0.5
    )
    _push_raw(hub, "kd/hot", adapter)
    expected = peft_greedy(teacher_dir, adapter, 2, tmp_path)
    assert expected != text(client, "teacher")  # the adapter changes the answer: an ignored adapter would show
    started = time.perf_counter()
    cold = complete(client, "kd/hot@r2")
    cold_s = time.perf_counter() - started
    started = time.perf_counter()
    warm = complete(client, "kd/hot@r2")
    warm_s = time.perf_counter() - started
    assert cold.parse().choices[0].text == warm.parse().choices[0].text == expected
    print(f"\ncold first request (pull + load) {cold_s:.2f} s, warm {warm_s:.2f} s: +{cold_s - warm_s:.2f} s")


def test_32_concurrent_mixed_requests_equal_each_alone(client, session_hub, teacher_dir, vllm_root, tmp_path):
    # four adapters fill all --max-loras 4 slots, so a base token that wrongly reads slot -1 (the last slot, vLLM's CPU
    # bug) would get a real adapter's LoRA and change its text; four ranks of one adapter share its slot
    from transformers import AutoModelForCausalLM

    _, hub = session_hub
    base = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    for seed in (1, 2, 3):
        _push_raw(
            hub,
            f"kd/mix-{seed}",
            write_nested_adapter(tmp_path / str(seed), base, rank=4, seed=seed, base_model_id=str(teacher_dir)),
        )
    models = [
        "teacher",
        f"{ALIAS}@r1",
        f"{ALIAS}@r2",
        f"{ALIAS}@r4",
        f"{ALIAS}@r16",
        "kd/mix-1@r4",
        "kd/mix-2@r2",
        "kd/mix-3@r1",
    ]
    prompts = [PROMPT, "def fibonacci(n):", "A list in Python is", "The capital of Italy is"]
    cases = [(models[i % 8], prompts[(i // 8) % 4]) for i in range(32)]
    alone = {case: text(client, *case) for case in set(cases)}
    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        together = list(pool.map(lambda case: text(client, *case), cases))
    assert together == [alone[case] for case in cases]


def test_a_rank_switch_of_a_resident_adapter_loads_nothing(client, session_hub, teacher_dir, vllm_root, tmp_path):
    """Every rank of an adapter is one vLLM LoRA: vLLM loads it once (kdlora logs each of vLLM's loads from disk), and
    each rank still equals PEFT on the adapter truncated to it, alone and batched with the others."""
    from transformers import AutoModelForCausalLM

    _, hub = session_hub
    base = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    adapter = write_nested_adapter(
        tmp_path / "switch", base, rank=8, seed=5, base_model_id=str(teacher_dir), init_scale=0.6
    )
    _push_raw(hub, "kd/switch", adapter)
    expected = {rank: peft_greedy(teacher_dir, adapter, rank, tmp_path) for rank in (1, 3, 8)}
    assert len(set(expected.values())) == 3  # the check can tell the ranks apart
    assert {rank: text(client, f"kd/switch@r{rank}") for rank in (8, 3, 1)} == expected
    with concurrent.futures.ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(lambda rank: text(client, f"kd/switch@r{rank}"), [1, 3, 8] * 2))
    assert together == [expected[1], expected[3], expected[8]] * 2
    loads = [
        line for line in (vllm_root / "server.log").read_text().splitlines() if "vLLM loads LoRA kd/switch@" in line
    ]
    assert len(loads) == 1 and loads[0].rstrip().endswith("/full"), loads  # the full adapter, once, for three ranks


def test_discovery_and_metrics(client, vllm_server):
    for _ in range(2):  # a rank's first request (cold: it loaded the rank) is not a cost measurement
        text(client, f"{ALIAS}@r2")
    with urllib.request.urlopen(vllm_server + "/v1/kdlora/adapters") as response:
        body = json.loads(response.read())
    assert body["lora_path"] == {"backend": "cpu", "kernels": "kdlora-grouped"}  # which LoRA compute serves
    entry = next(row for row in body["data"] if row["id"] == ALIAS)
    assert entry["max_rank"] == 16 and entry["default_rank"] == 4 and 2 in entry["warm_ranks"]
    assert [r["rank"] for r in entry["ranks"]] == [1, 2, 4, 16]
    assert entry["ranks"][1]["measured_ms_per_token"] > 0 and entry["ranks"][1]["task_metrics"] == {
        "greedy_token_f1": 0.2
    }
    with urllib.request.urlopen(vllm_server + "/metrics") as response:
        metrics = response.read().decode()
    assert f'kdlora_requests_total{{adapter="{ALIAS}",rank="2"}}' in metrics
