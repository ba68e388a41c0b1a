"""`kdlora serve --adapter ORG/NAME --endpoint URL` as a platform engineer runs it: a student and its adapter pushed
with `kdlora hub push` to a Hub (tests/hf_server.py), the student then changed on the Hub; the server pulls the
student at the revision the adapter pins, and a rank answers with PEFT's greedy tokens on that student."""

import os

import pytest
import torch
from conftest import kdlora_cli, tiny_checkpoint, write_nested_adapter
from hf_server import serve_fake_hub

pytestmark = pytest.mark.integration
TOKEN = "hf_kdlora_test_token"
PROMPT = "The three most useful Python built-in functions are"
TOKENS = 8
# head size 32: the smallest vLLM's CPU attention takes
STUDENT = dict(hidden_size=64, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1)


def greedy(model, prompt_ids: list[int], tokens: int = TOKENS) -> tuple[list[int], list[float]]:
    """`tokens` argmax steps, end-of-text ignored (the server is asked the same with ignore_eos): (ids, log-probs)."""
    ids, logprobs = torch.tensor([prompt_ids]), []
    with torch.no_grad():
        for _ in range(tokens):
            step = model(ids).logits[0, -1].log_softmax(-1)
            ids = torch.cat([ids, step.argmax().view(1, 1)], dim=1)
            logprobs.append(step.max().item())
    return ids[0, len(prompt_ids) :].tolist(), logprobs


def test_serve_from_the_hub_pulls_the_pinned_student_and_answers_like_peft(real_tokenizer_dir, tmp_path):
    from openai import OpenAI
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hub.adapter import truncate_adapter
    from kdlora_serve.serve import start_background

    student = tiny_checkpoint(tmp_path / "student", real_tokenizer_dir, seed=3, **STUDENT)
    base = AutoModelForCausalLM.from_pretrained(student, dtype=torch.float32).eval()
    adapter = write_nested_adapter(tmp_path / "adapter", base, rank=8, seed=4, base_model_id="kd/student")
    prompt_ids = AutoTokenizer.from_pretrained(student)(PROMPT)["input_ids"]
    base_ids, _ = greedy(base, prompt_ids)
    peft = PeftModel.from_pretrained(base, truncate_adapter(adapter, 2, tmp_path / "r2")).eval()
    expected, expected_logprobs = greedy(peft, prompt_ids)
    assert expected != base_ids  # the adapter changes the answer

    with serve_fake_hub(token=TOKEN) as (url, hub):
        env = {
            **os.environ,
            "HF_ENDPOINT": url,
            "HF_TOKEN": TOKEN,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HOME": str(tmp_path / "hf-push"),
        }
        pushed = kdlora_cli(
            *("hub", "push", str(adapter), "--repo", "kd/adapter"),
            *("--student", str(student), "--student-repo", "kd/student"),
            env=env,
        )
        assert pushed.returncode == 0, pushed.stderr
        pinned = hub.commits("kd/student")[-1]
        other = tiny_checkpoint(tmp_path / "other", real_tokenizer_dir, seed=5, **STUDENT)
        hub.commit("kd/student", {"model.safetensors": (other / "model.safetensors").read_bytes()})  # main moves on

        env |= {"HF_HOME": str(tmp_path / "hf"), "KDLORA_CACHE": str(tmp_path / "cache"), "VLLM_NO_USAGE_STATS": "1"}
        env.pop("HF_TOKEN")  # public repos: the server needs no token
        log = tmp_path / "server.log"
        args = ["--adapter", "kd/adapter", "--endpoint", url, "--", "--dtype", "float32", "--max-model-len", "256"]
        try:
            proc, server = start_background(args, log, env=env)
        except RuntimeError as err:
            pytest.fail(str(err))
        try:
            client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0)
            served = client.completions.with_raw_response.create(
                model="kd/adapter@r2",
                prompt=prompt_ids,
                max_tokens=TOKENS,
                temperature=0.0,
                logprobs=1,
                extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True},
            )
        finally:
            proc.terminate()
            proc.wait(timeout=60)
        fetched = [path for method, path in hub.requests_log if method == "GET"]

    command = next(line for line in log.read_text().splitlines() if line.startswith("kdlora serve: "))
    assert "--model kd/student" in command and f"--revision {pinned}" in command
    student_files = [path.split("/") for path in fetched if path.startswith("/kd/student/resolve/")]
    assert ["model.safetensors"] in [parts[5:] for parts in student_files]
    assert {parts[4] for parts in student_files} == {pinned}  # every file at the pinned commit, none at main
    assert served.headers["x-kdlora-rank"] == "2" and served.parse().model == "kd/adapter@r2"
    logprobs = served.parse().choices[0].logprobs
    assert [int(token.removeprefix("token_id:")) for token in logprobs.tokens] == expected
    assert logprobs.token_logprobs == pytest.approx(expected_logprobs, abs=1e-4)
