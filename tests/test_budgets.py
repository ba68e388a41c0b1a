"""Budgets against the batch in flight, through the middleware in front of a fake engine that holds requests open
until the test lets them finish: on_miss reject / wait / serve, bad values, and the step model fed the way
vLLM's stats path feeds it (kdlora_serve/api/steps.py)."""

import asyncio
import json
from collections import Counter
from types import SimpleNamespace

import pytest
from conftest import tiny_llama, write_nested_adapter

from kdlora_serve import elastic
from kdlora_serve.api import metrics
from kdlora_serve.api import middleware as middleware_module
from kdlora_serve.api import store as store_module
from kdlora_serve.api.middleware import KdloraMiddleware
from kdlora_serve.api.steps import StepModel, lora_work, observe_iteration
from kdlora_serve.api.store import AdapterStore

ALIAS = "tiny"  # ranks 1, 2, 4, 8 evaluated (write_nested_adapter), R = 8
pytestmark = pytest.mark.timeout(60)  # a request the policy wrongly admits waits on HeldVllm forever: fail, not hang


class HeldVllm:
    """A fake vLLM app: records each request it receives, answers only when the test releases it (`reply`: the
    messages of its answer to a request's body; default an empty JSON object)."""

    def __init__(self, reply=None):
        models = SimpleNamespace(
            base_model_paths=[SimpleNamespace(name="base")], model_config=SimpleNamespace(model="tiny-llama")
        )
        self.state = SimpleNamespace(args=SimpleNamespace(api_key=None), openai_serving_models=models)
        self.seen: list[dict] = []
        self.release = asyncio.Event()
        self.reply = reply or (lambda body: [json_start(), {"type": "http.response.body", "body": b"{}"}])

    async def __call__(self, scope, receive, send):
        body = json.loads((await receive())["body"])
        self.seen.append(body)
        await self.release.wait()
        for message in self.reply(body):
            await send(message)


def json_start(content_type: bytes = b"application/json") -> dict:
    return {"type": "http.response.start", "status": 200, "headers": [(b"content-type", content_type)]}


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
    """A fitted engine: 20 ms a step + 5 per request + 1 per LoRA (token x rank) unit (grouped path: each adapter's
    requests at its largest rank)."""
    model = StepModel(path="grouped", max_lora_rank=8)
    for requests in (1, 2, 3, 4):
        for rank in (1, 2, 4, 8):
            model.observe(Counter({f"{ALIAS}@r{rank}": requests}), 20 + 5 * requests + requests * rank)
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
    the step >= 34 ms at any rank (two requests in a rank-2 group), so it is held at the door (the engine does not see it) until the tight one ends,
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


def test_wait_with_nothing_in_flight_is_answered_at_once(served, steps):
    """No rank meets the budget even alone (one request at rank 1: 26 ms) and nothing is in flight to finish: waiting
    cannot help, so the 429 comes at once, not after max_wait_ms."""

    async def scenario():
        vllm = HeldVllm()
        started = asyncio.get_running_loop().time()
        answer = await post(KdloraMiddleware(vllm), request(latency_ms_per_token=21, on_miss="wait", max_wait_ms=5000))
        return answer, asyncio.get_running_loop().time() - started, len(vllm.seen)

    (status, _, body), seconds, engine_requests = asyncio.run(scenario())
    assert (status, engine_requests) == (429, 0) and seconds < 1.0
    assert body["error"]["message"].startswith(f"no rank of '{ALIAS}' meets this budget after waiting 0.0 s")


@pytest.fixture
def prefill_steps(steps) -> StepModel:
    """`steps`, refitted with prompts prefilled beside the decodes: 0.5 ms a prompt token, to every request in the step."""
    for requests, rank, prompt in [(1, 1, 40), (2, 4, 100), (3, 8, 10), (1, 2, 200)]:
        steps.observe(
            Counter({f"{ALIAS}@r{rank}": requests}), 20 + 5 * requests + requests * rank + 0.5 * prompt, prompt
        )
    assert steps.prefill_ms_per_token() == pytest.approx(0.5)
    return steps


def test_an_arrivals_prompt_is_priced_into_the_bounds_in_flight(served, prefill_steps, real_tokenizer_dir):
    """A request bounded to 40 ms a token over its 4 tokens runs at rank 1 (max_rank 1: 26 ms). An arrival beside it
    decodes at 30 + 2 x its rank, but its prompt first stalls the running decode once, by 0.5 ms a prompt token: a
    stall of S ms takes S / 4 off the running request's bound. A 2-token prompt gets rank 4 (38 ms), one of 40 tokens
    rank 2 (34 <= 40 - 5), one of 100 tokens nothing (40 - 12.5 < 32): it waits until the running request ends."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir)
    words = "a" + " a" * 39
    assert len(tokenizer.encode(words)) == 40

    async def scenario(prompt, **kdlora):
        vllm = HeldVllm()
        vllm.state.engine_client = SimpleNamespace(get_tokenizer=lambda: tokenizer)
        middleware = KdloraMiddleware(vllm)
        running = asyncio.create_task(post(middleware, request(latency_ms_per_token=40, max_rank=1)))
        await until_engine_has(vllm, 1)
        arrival = asyncio.create_task(
            post(middleware, request(latency_ms_per_token=100, **kdlora) | {"prompt": prompt})
        )
        await asyncio.sleep(0.3)
        seen_while_running = [body["model"] for body in vllm.seen]
        vllm.release.set()
        await running
        return (await arrival)[1]["x-kdlora-rank"], seen_while_running

    assert asyncio.run(scenario([1, 2])) == ("4", [f"{ALIAS}@r1", f"{ALIAS}@r4"])
    assert asyncio.run(scenario(words)) == ("2", [f"{ALIAS}@r1", f"{ALIAS}@r2"])
    assert asyncio.run(scenario(list(range(100)), on_miss="wait")) == ("8", [f"{ALIAS}@r1"])  # then alone


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
        ({"elastic": "yes"}, "budget field 'elastic' (extra_body kdlora): Input should be a valid boolean"),
        ({"elastic": 1}, "budget field 'elastic' (extra_body kdlora): Input should be a valid boolean"),
        (
            {"elastic": True, "rank": 4},
            f"'elastic' lets kdlora lower the rank while the request runs; '{ALIAS}@r4' asks for exactly one rank: "
            "drop one, or bound it with max_rank instead",
        ),
        ({"elastic": True, "n": 2}, "'elastic' serves one choice per request: send n=1 (or drop 'elastic')"),
        ({"elastic": True, "vllm_xargs": [1]}, "'vllm_xargs' must be an object"),
    ],
)
def test_bad_on_miss_and_elastic_values_get_400(served, steps, kdlora, message):
    async def scenario():
        vllm = HeldVllm()
        body = request(**{k: v for k, v in kdlora.items() if k not in ("n", "vllm_xargs")})
        body |= {k: v for k, v in kdlora.items() if k in ("n", "vllm_xargs")}
        return await post(KdloraMiddleware(vllm), body), vllm.seen

    (status, _, body), seen = asyncio.run(scenario())
    assert (status, body["error"]["message"], seen) == (400, message, [])


def elastic_row(body: dict) -> dict:
    """What the worker reads of an elastic request's row (kdlora_serve.elastic), by the handle vLLM carries for it."""
    handle = body["vllm_xargs"][elastic.XARG]
    row = elastic.table().rows[int(handle.split(":")[0])]
    return {"cap": int(row["cap"]), "decoding at": elastic.table().rank_for(handle, 8, decoding=True)}


def test_a_tight_arrival_lowers_an_elastic_request_in_flight_and_is_admitted_within_its_budget(served, steps):
    """An elastic loose request runs at rank 8 (33 ms alone); a tight arrival (32.5 ms) fits only beside it at rank 1
    (20 + 2 x 5 + 2 x 1), so it is admitted at rank 1 and the elastic one is lowered 8 -> 4 -> 2 -> 1 for the engine's next
    steps. The same pair without `elastic` (today's policy): the arrival is a miss, served flagged."""

    async def scenario(is_elastic: bool):
        vllm = HeldVllm()
        middleware = KdloraMiddleware(vllm)
        loose = asyncio.create_task(post(middleware, request(latency_ms_per_token=100, elastic=is_elastic)))
        await until_engine_has(vllm, 1)
        tight = asyncio.create_task(post(middleware, request(latency_ms_per_token=32.5)))
        await until_engine_has(vllm, 2)
        row = elastic_row(vllm.seen[0]) if is_elastic else None
        vllm.release.set()
        return vllm.seen, row, await loose, await tight

    lowerings = metrics.ELASTIC_LOWERINGS.labels(adapter=ALIAS)
    before = lowerings._value.get()
    seen, row, loose, tight = asyncio.run(scenario(True))
    assert loose[1]["x-kdlora-rank"] == "8" and row == {"cap": 1, "decoding at": 1}
    assert lowerings._value.get() - before == 3
    assert (tight[1]["x-kdlora-rank"], tight[1]["x-kdlora-budget-met"]) == ("1", "true")
    assert seen[0]["cache_salt"].startswith("kdlora-elastic-") and "vllm_xargs" not in seen[1]  # only elastic ones

    seen, _, loose, tight = asyncio.run(scenario(False))
    assert loose[1]["x-kdlora-rank"] == "8" and "vllm_xargs" not in seen[0]
    assert (tight[1]["x-kdlora-rank"], tight[1]["x-kdlora-budget-met"]) == ("1", "false")


@pytest.mark.parametrize(
    "tight, arrival, cap",
    [
        (38.5, ("4", "true"), 4),  # beside the elastic one at rank 4 (its floor): 20 + 2 x 5 + 2 x 4
        (34.5, ("1", "false"), 8),  # would need it below its floor: a miss, and nobody is lowered for nothing
    ],
)
def test_an_elastic_request_is_never_lowered_below_its_quality_floor(served, steps, tight, arrival, cap):
    """greedy_token_f1 of the tiny adapter is rank/10: a floor of 0.35 allows ranks 4 and 8 only."""

    async def scenario():
        vllm = HeldVllm()
        middleware = KdloraMiddleware(vllm)
        floor = {"min_quality": 0.35, "quality_metric": "greedy_token_f1"}
        loose = asyncio.create_task(post(middleware, request(latency_ms_per_token=100, elastic=True, **floor)))
        await until_engine_has(vllm, 1)
        arriving = asyncio.create_task(post(middleware, request(latency_ms_per_token=tight)))
        await until_engine_has(vllm, 2)
        row = elastic_row(vllm.seen[0])
        vllm.release.set()
        return row, await loose, await arriving

    row, loose, arriving = asyncio.run(scenario())
    assert loose[1]["x-kdlora-rank"] == "8" and row["cap"] == cap
    assert (arriving[1]["x-kdlora-rank"], arriving[1]["x-kdlora-budget-met"]) == arrival


def test_a_clients_own_elastic_handle_never_reaches_the_engine(served, steps):
    async def scenario():
        vllm = HeldVllm()
        vllm.release.set()
        body = request(latency_ms_per_token=100) | {"vllm_xargs": {elastic.XARG: "0:1", "mine": 1}}
        await post(KdloraMiddleware(vllm), body)
        return vllm.seen[0]

    assert asyncio.run(scenario())["vllm_xargs"] == {"mine": 1}


def worker_counts(body: dict, *segments: tuple[int, int]) -> None:
    """What the engine's worker does for an elastic request: count each generated token at the rank computing it."""
    handle = body["vllm_xargs"][elastic.XARG]
    for rank, tokens in segments:
        for _ in range(tokens):
            elastic.table().count(handle, rank, 1)


def test_an_elastic_response_says_which_rank_served_which_tokens_whole_and_streamed(served, steps):
    served_json = {"elastic": True, "rank": 8, "lowest_rank": 2, "tokens_per_rank": [
        {"rank": 8, "tokens": 3}, {"rank": 2, "tokens": 2}]}  # fmt: skip

    def whole(body):
        worker_counts(body, (8, 3), (2, 2))
        answer = {"id": "cmpl-1", "choices": [{"text": "abcde"}], "usage": {"completion_tokens": 5}}
        return [json_start(), {"type": "http.response.body", "body": json.dumps(answer).encode()}]

    def streamed(body):
        worker_counts(body, (8, 3), (2, 2))
        events = b"".join(
            b'data: {"id": "cmpl-2", "object": "text_completion", "created": 7, "model": "tiny@r8", '
            + b'"choices": [{"text": "%d"}]}\n\n' % i
            for i in range(5)
        )
        return [
            json_start(b"text/event-stream; charset=utf-8"),
            {"type": "http.response.body", "body": events, "more_body": True},
            {"type": "http.response.body", "body": b"data: [DONE]\n\n"},
        ]

    async def scenario(reply, **extra):
        vllm = HeldVllm(reply)
        vllm.release.set()
        return await post(KdloraMiddleware(vllm), request(latency_ms_per_token=100, elastic=True) | extra)

    status, headers, body = asyncio.run(scenario(whole))
    assert (status, body["choices"], body["kdlora"]) == (200, [{"text": "abcde"}], served_json)
    assert (headers["x-kdlora-lowest-rank"], headers["x-kdlora-tokens-per-rank"]) == ("2", "8:3,2:2")

    async def raw_stream():
        sent = []
        scope = {"type": "http", "method": "POST", "path": "/v1/completions", "root_path": "", "headers": []}
        vllm = HeldVllm(streamed)
        vllm.release.set()
        body = json.dumps(request(latency_ms_per_token=100, elastic=True) | {"stream": True}).encode()

        async def receive():
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message):
            sent.append(message)

        await KdloraMiddleware(vllm)(scope | {"app": vllm}, receive, send)
        return b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")

    events = [e.removeprefix("data: ") for e in asyncio.run(raw_stream()).decode().split("\n\n") if e]
    assert events[-1] == "[DONE]" and len(events) == 7
    assert json.loads(events[-2]) == {
        "id": "cmpl-2",
        "object": "text_completion",
        "created": 7,
        "model": "tiny@r8",
        "choices": [],
        "kdlora": served_json,
    }


def test_lora_work_follows_the_servers_lora_path():
    batch = Counter({None: 2, "a@r8": 1, "a@r2": 3, "b@r4": 1, "c": 1})  # "c": a LoRA not named by rank: all of it
    assert lora_work(batch, "grouped", 64) == 4 * 8 + 4 + 64  # each adapter's requests at its largest rank
    assert lora_work(batch, "per-token", 64) == 8 + 3 * 2 + 4 + 64  # every request at its own rank
    assert lora_work(batch, "stock", 64) == 6 * 64  # vLLM pads every LoRA request to --max-lora-rank


def test_vllm_stats_feed_the_model_one_step_per_iteration():
    """What step_logger.StepLogger.record receives each iteration: running requests per LoRA name (the rest are base requests)
    and the inter-token latencies of the requests that got a token; iterations with none, or with a prompt finished
    (prefill), are not decode steps to learn."""
    model = StepModel(path="grouped", max_lora_rank=8)
    for requests in (1, 2, 3, 4):
        for rank in (1, 8):
            stats = SimpleNamespace(running_lora_adapters={f"a@r{rank}": requests}, num_running_reqs=requests + 1)
            iteration = SimpleNamespace(
                inter_token_latencies_iter=[0.001 * (10 + 3 * (requests + 1) + requests * rank)] * 3,
                num_prompt_tokens=0,
            )
            for _ in range(2):
                observe_iteration(model, stats, iteration)
    observe_iteration(model, stats, SimpleNamespace(inter_token_latencies_iter=[], num_prompt_tokens=0))
    observe_iteration(model, stats, SimpleNamespace(inter_token_latencies_iter=[5.0], num_prompt_tokens=9))  # prefill
    gone = SimpleNamespace(running_lora_adapters={}, num_running_reqs=0)  # the batch's last step, reported empty
    observe_iteration(model, gone, SimpleNamespace(inter_token_latencies_iter=[5.0], num_prompt_tokens=0))
    assert model.describe()["steps"] == 16
    assert model.predict(Counter({None: 1, "a@r4": 2})) == pytest.approx(10 + 3 * 3 + 2 * 4, abs=1e-2)


def test_vllms_iteration_details_are_the_batch_the_engine_ran():
    """With vLLM's iteration details (`kdlora serve` turns them on), a step's batch is what the engine computed:
    requests that finished in it still count, the last step of a batch is learned, and a step that prefilled prompts
    beside the decodes is learned with its prompt tokens (the decode requests waited for them). Dummy steps are not
    steps. Steps made from ms = 10 + 3 x requests + 0.5 x lora_work + 0.2 x prefill tokens give back that fit."""
    model = StepModel(path="grouped", max_lora_rank=8)

    def step(decoding: int, prefilling: int, prompt_tokens: int, still_running: dict, dummy: bool = False) -> None:
        details = SimpleNamespace(
            is_dummy=dummy,
            num_ctx_requests=prefilling,
            num_ctx_tokens=prompt_tokens,
            num_generation_requests=decoding,
            num_generation_tokens=decoding,
        )
        running = Counter(still_running)
        running[None] = decoding + prefilling - sum(still_running.values())  # finished LoRA requests: as base
        ms = 10 + 3 * (decoding + prefilling) + 0.5 * lora_work(running, "grouped", 8) + 0.2 * prompt_tokens
        stats = SimpleNamespace(
            running_lora_adapters=still_running, num_running_reqs=sum(still_running.values()), iteration_details=details
        )
        iteration = SimpleNamespace(inter_token_latencies_iter=[ms / 1000] * decoding, num_prompt_tokens=prompt_tokens)
        observe_iteration(model, stats, iteration)

    for decoding in (1, 2, 4):
        for rank in (1, 8):
            step(decoding, 0, 0, {f"a@r{rank}": decoding})  # decode only
            step(decoding, 1, 40 * rank, {f"a@r{rank}": decoding + 1})  # a prompt prefilled beside them
            step(decoding, 0, 0, {f"a@r{rank}": decoding - 1})  # one of them finished in this step
    step(2, 0, 0, {})  # the batch's last step: every request finished in it
    step(0, 1, 30, {"a@r8": 1})  # a prompt alone: no request waited for it, nothing to learn
    step(3, 0, 0, {"a@r8": 3}, dummy=True)
    described = model.describe()
    assert described["steps"] == 19
    assert described["ms_per_step"] == pytest.approx(
        {"base": 10, "requests": 3, "lora_work": 0.5, "prefill_tokens": 0.2}, abs=1e-3
    )
    assert model.predict(Counter({None: 1, "a@r4": 2})) == pytest.approx(10 + 3 * 3 + 0.5 * 2 * 4, abs=1e-2)
