"""Budgets against the batch in flight, through the middleware in front of a fake engine that holds requests open
until the test lets them finish: on_miss reject / wait / serve, bad values, and the step model fed the way
vLLM's stats path feeds it (kdlora_serve/api/steps.py)."""

import asyncio
import json
from collections import Counter
from types import SimpleNamespace

import pytest
from conftest import tiny_llama, write_nested_adapter

from kdlora_serve.api import middleware as middleware_module
from kdlora_serve.api import store as store_module
from kdlora_serve.api.middleware import KdloraMiddleware
from kdlora_serve.api.steps import StepModel, lora_work, observe_iteration
from kdlora_serve.api.store import AdapterStore

ALIAS = "tiny"  # ranks 1, 2, 4, 8 evaluated (write_nested_adapter), R = 8
pytestmark = pytest.mark.timeout(60)  # a request the policy wrongly admits waits on HeldVllm forever: fail, not hang


class HeldVllm:
    """A fake vLLM app: records each request it receives, answers only when the test releases it."""

    def __init__(self):
        models = SimpleNamespace(
            base_model_paths=[SimpleNamespace(name="base")], model_config=SimpleNamespace(model="tiny-llama")
        )
        self.state = SimpleNamespace(args=SimpleNamespace(api_key=None), openai_serving_models=models)
        self.seen: list[dict] = []
        self.release = asyncio.Event()

    async def __call__(self, scope, receive, send):
        self.seen.append(json.loads((await receive())["body"]))
        await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"{}"})


async def post(middleware, body: dict) -> tuple[int, dict, dict]:
    """(status, headers, JSON body or {}) of one completion request through the middleware."""
    scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "", "headers": []}
    scope["app"] = middleware.app
    sent = []

    async def receive():
        return {"type": "http.request", "body": json.dumps(body).encode(), "more_body": False}

    async def send(message):
        sent.append(message)

    await middleware(scope, receive, send)
    start = next(m for m in sent if m["type"] == "http.response.start")
    headers = {k.decode(): v.decode() for k, v in start["headers"]}
    payload = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], headers, json.loads(payload) if payload else {}


async def until_engine_has(vllm: HeldVllm, count: int) -> None:
    while len(vllm.seen) < count:
        await asyncio.sleep(0.01)


def request(**kdlora) -> dict:
    return {"model": ALIAS, "prompt": "hi", "max_tokens": 4, "kdlora": kdlora}


@pytest.fixture
def steps(monkeypatch) -> StepModel:
    """A fitted engine: 20 ms a step + 5 per request + 1 per LoRA rank unit (grouped path: each adapter's largest)."""
    model = StepModel(path="grouped", max_lora_rank=8)
    for requests in (1, 2, 3, 4):
        for rank in (1, 2, 4, 8):
            model.observe(Counter({f"{ALIAS}@r{rank}": requests}), 20 + 5 * requests + rank)
    assert model.describe()["steps"] >= model.MIN_STEPS
    monkeypatch.setattr(middleware_module, "STEPS", model)
    return model


@pytest.fixture
def served(tmp_path, monkeypatch):
    adapter = write_nested_adapter(tmp_path / "adapter", tiny_llama(), rank=8)
    store = AdapterStore({ALIAS: str(adapter)}, [], ["tiny-llama"], tmp_path / "served")
    monkeypatch.setattr(store_module, "_STORE", store)
    return store


def test_reject_answers_429_at_once_and_the_engine_never_sees_it(served, steps):
    async def scenario():
        vllm = HeldVllm()
        middleware = KdloraMiddleware(vllm)
        status, headers, body = await post(middleware, request(latency_ms_per_token=10, on_miss="reject"))
        return vllm, status, headers, body

    vllm, status, headers, body = asyncio.run(scenario())
    assert (status, vllm.seen) == (429, [])
    assert headers["retry-after"] == "1" and headers["x-kdlora-budget-miss"].startswith("latency_ms_per_token 10.0")
    assert body["error"]["type"] == "RateLimitError" and body["error"]["param"] == "kdlora"
    assert body["error"]["message"] == (
        f"no rank of '{ALIAS}' meets this budget with 1 requests in flight (latency_ms_per_token 10.0 "
        "(estimated 26.0 ms per token with 1 in flight)); retry after 1 s"
    )
    assert body["kdlora"] == {
        "estimated_ms_per_token": pytest.approx(26.0, abs=1e-2),
        "retry_after_s": 1,
        "cheapest_rank": 1,
    }


def test_wait_holds_a_request_while_admitting_it_would_break_an_in_flight_budget(served, steps):
    """A tight request (27.5 ms: one request at rank <= 2) runs; a loose-budget request with on_miss wait would make
    the step >= 31 ms at any rank, so it is held at the door (the engine does not see it) until the tight one ends,
    then admitted alone at the largest rank its own budget allows."""

    async def scenario():
        vllm = HeldVllm()
        middleware = KdloraMiddleware(vllm)
        tight = asyncio.create_task(post(middleware, request(latency_ms_per_token=27.5)))
        await until_engine_has(vllm, 1)
        held = asyncio.create_task(post(middleware, request(latency_ms_per_token=100, on_miss="wait")))
        await asyncio.sleep(0.3)
        seen_while_held = [body["model"] for body in vllm.seen]
        vllm.release.set()
        return seen_while_held, await tight, await held, [body["model"] for body in vllm.seen]

    seen_while_held, tight, held, seen = asyncio.run(scenario())
    assert seen_while_held == [f"{ALIAS}@r2"]  # the tight request alone: rank 2 is 27 ms, rank 4 29
    assert (tight[0], tight[1]["x-kdlora-rank"], tight[1]["x-kdlora-budget-met"]) == (200, "2", "true")
    assert (held[0], held[1]["x-kdlora-rank"], held[1]["x-kdlora-budget-met"]) == (200, "8", "true")
    assert seen == [f"{ALIAS}@r2", f"{ALIAS}@r8"]


def test_a_wait_that_outlasts_max_wait_ms_is_answered_429(served, steps):
    async def scenario():
        vllm = HeldVllm()
        middleware = KdloraMiddleware(vllm)
        tight = asyncio.create_task(post(middleware, request(latency_ms_per_token=27.5)))
        await until_engine_has(vllm, 1)
        waited = await post(middleware, request(latency_ms_per_token=100, on_miss="wait", max_wait_ms=200))
        vllm.release.set()
        await tight
        return waited, len(vllm.seen)

    (status, headers, body), engine_requests = asyncio.run(scenario())
    assert (status, engine_requests) == (429, 1)
    assert body["error"]["message"].startswith(f"no rank of '{ALIAS}' meets this budget after waiting 0.")
    assert "an in-flight request's latency_ms_per_token 27.5" in body["error"]["message"]
    # Retry-After: the tight request's 4 tokens at the current batch's 27 ms a step are about done: 1 s at least
    assert headers["retry-after"] == "1"


def test_serve_is_the_default_a_miss_is_served_at_the_cheapest_rank_and_flagged(served, steps):
    async def scenario():
        vllm = HeldVllm()
        vllm.release.set()
        return await post(KdloraMiddleware(vllm), request(latency_ms_per_token=10))

    status, headers, _ = asyncio.run(scenario())
    assert (status, headers["x-kdlora-rank"], headers["x-kdlora-budget-met"]) == (200, "1", "false")


@pytest.mark.parametrize(
    "kdlora, message",
    [
        (
            {"on_miss": "later"},
            "budget field 'on_miss' (extra_body kdlora): Input should be 'serve', 'reject' or 'wait'",
        ),
        ({"on_miss": True}, "budget field 'on_miss' (extra_body kdlora): Input should be 'serve', 'reject' or 'wait'"),
        ({"max_wait_ms": 0}, "budget field 'max_wait_ms' (extra_body kdlora): Input should be greater than 0"),
        ({"elastic": True}, "budget field 'elastic' (extra_body kdlora): Extra inputs are not permitted"),
    ],
)
def test_bad_on_miss_values_get_400(served, steps, kdlora, message):
    async def scenario():
        vllm = HeldVllm()
        return await post(KdloraMiddleware(vllm), request(**kdlora)), vllm.seen

    (status, _, body), seen = asyncio.run(scenario())
    assert (status, body["error"]["message"], seen) == (400, message, [])


def test_lora_work_follows_the_servers_lora_path():
    batch = Counter({None: 2, "a@r8": 1, "a@r2": 3, "b@r4": 1, "c": 1})  # "c": a LoRA not named by rank: all of it
    assert lora_work(batch, "grouped", 64) == 8 + 4 + 64  # each adapter's group at its largest rank
    assert lora_work(batch, "per-token", 64) == 8 + 3 * 2 + 4 + 64  # every request at its own rank
    assert lora_work(batch, "stock", 64) == 6 * 64  # vLLM pads every LoRA request to --max-lora-rank


def test_vllm_stats_feed_the_model_one_step_per_iteration():
    """What StepLogger.record receives each iteration: running requests per LoRA name (the rest are base requests)
    and the inter-token latencies of the requests that got a token; iterations with none, or with a prompt finished
    (prefill), are not decode steps to learn."""
    model = StepModel(path="grouped", max_lora_rank=8)
    for requests in (1, 2, 3, 4):
        for rank in (1, 8):
            stats = SimpleNamespace(running_lora_adapters={f"a@r{rank}": requests}, num_running_reqs=requests + 1)
            iteration = SimpleNamespace(
                inter_token_latencies_iter=[0.001 * (10 + 3 * (requests + 1) + rank)] * 3, num_prompt_tokens=0
            )
            for _ in range(2):
                observe_iteration(model, stats, iteration)
    observe_iteration(model, stats, SimpleNamespace(inter_token_latencies_iter=[], num_prompt_tokens=0))
    observe_iteration(model, stats, SimpleNamespace(inter_token_latencies_iter=[5.0], num_prompt_tokens=9))  # prefill
    gone = SimpleNamespace(running_lora_adapters={}, num_running_reqs=0)  # the batch's last step, reported empty
    observe_iteration(model, gone, SimpleNamespace(inter_token_latencies_iter=[5.0], num_prompt_tokens=0))
    assert model.describe()["steps"] == 16
    assert model.predict(Counter({None: 1, "a@r4": 2})) == pytest.approx(10 + 3 * 3 + 4, abs=1e-2)
