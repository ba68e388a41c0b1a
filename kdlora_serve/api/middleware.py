"""ASGI middleware (`vllm serve --middleware kdlora_serve.api.middleware.KdloraMiddleware`): per-request rank.

It is the outermost layer of vLLM's app, so it also guards the whole server:
- with an API key set (`--api-key`, in any spelling vLLM accepts, or VLLM_API_KEY), EVERY route but the
  probes in PUBLIC_PATHS needs it, checked first and in constant time (vLLM itself guards /v1 only,
  leaving e.g. /invocations open);
- vLLM's runtime adapter routes (/v1/load_lora_adapter, /v1/unload_lora_adapter, /adapters) are refused:
  kdlora turns them on only because vLLM consults LoRA resolvers only then, and they would let a
  client swap the weights behind a served name past kdlora's allow-list and checks.

For generation requests whose `model` is a kdlora adapter it reads the budget (`extra_body={"kdlora":
{...}}` or `x-kdlora-*` headers), picks the rank against the batch in flight (policy, with the step-time model of
kdlora_serve.api.steps; every generation request in flight is tracked here, base ones too), holds or refuses the
request when no rank meets its budget and it asks for that (`on_miss`), lowers elastic requests in flight when an
arrival would break a bound (`_rebalance`, through kdlora_serve.elastic), makes sure the files vLLM loads for it
are intact (store), rewrites `model` to `<adapter>@r<k>` before vLLM sees it (vLLM then echoes that name and
the resolver registers the rank), adds `x-kdlora-rank` / `x-kdlora-budget-met` to the response, and measures
ms per generated token per rank for listings. Bad requests get OpenAI-shaped JSON errors; nothing here can take
the server down. Also serves discovery: GET /v1/kdlora/adapters, GET /v1/kdlora/steps (the step-time fit and
the batch in flight), and lists every adapter's evaluated ranks in GET /v1/models before they are first requested.
"""

import asyncio
import hashlib
import hmac
import json
import logging
import math
import os
import time
from collections import Counter
from dataclasses import dataclass, field

from hub.errors import KdloraError
from kdlora_serve import elastic, lora_report
from kdlora_serve.api import metrics
from kdlora_serve.api.policy import Load, choose_rank, lower_ranks, parse_budget
from kdlora_serve.api.steps import STEPS
from kdlora_serve.api.store import get_store
from kdlora_serve.errors import RequestError
from kdlora_serve.rank import model_name, split_model_name

log = logging.getLogger("vllm.kdlora")  # under vLLM's logger: its handlers and VLLM_LOGGING_LEVEL apply
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions", "/invocations")
LISTING_PATH = "/v1/kdlora/adapters"
STEPS_PATH = "/v1/kdlora/steps"
DEFAULT_MAX_WAIT_MS = 10_000
WAIT_POLL_S = 0.02  # on_miss wait: how often a held request asks again (a finished request frees the batch)
MODELS_PATH = "/v1/models"
PUBLIC_PATHS = ("/health", "/ping", "/version", "/metrics")  # liveness probes and scrapers: no key, no model run
ADAPTER_ADMIN_PATHS = ("/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/adapters")
HEADER_PREFIX = "x-kdlora-"


@dataclass
class Admitted:
    """A generation request in flight: its adapter and rank (None: base model or not kdlora's), the latency bound it
    was admitted within (None: none, or its budget was already missed), what says when it will be done, and for an
    elastic request the ranks it may still be lowered to (highest first) and its row in kdlora_serve.elastic."""

    adapter: str | None = None
    rank: int | None = None
    bound: float | None = None
    max_tokens: int | None = None
    lower_to: tuple[int, ...] = ()
    handle: str | None = None
    started: float = field(default_factory=time.monotonic)

    def name(self, squeezed: bool = False) -> str | None:
        """Its LoRA name as the step model counts it; squeezed: at the lowest rank it may be lowered to."""
        if self.adapter is None:
            return None
        return model_name(self.adapter, self.lower_to[-1] if squeezed and self.lower_to else self.rank)

    @property
    def feels_stall(self) -> bool:
        """Whether a prompt prefilled beside it lowers its bound: it has one, and max_tokens to spread the stall over."""
        return self.bound is not None and bool(self.max_tokens)

    def bound_less_stall(self, stall_ms: float) -> float:
        """Its bound once a prompt prefilled beside it stalls its decode by `stall_ms`: spread over its max_tokens (its
        bound is a mean over them); without max_tokens nothing says over how many, and the bound stays."""
        return self.bound - stall_ms / self.max_tokens if self.feels_stall else self.bound

    def lower(self) -> None:
        """Down to the next rank it may be lowered to, from the engine's next step on."""
        self.rank, self.lower_to = self.lower_to[0], self.lower_to[1:]
        elastic.table().lower(self.handle, self.rank)
        metrics.ELASTIC_LOWERINGS.labels(adapter=self.adapter).inc()


class KdloraMiddleware:
    def __init__(self, app):
        self.app = app
        self.running: dict[object, Admitted] = {}  # every generation request in flight; one event loop, no lock

    def load(self, squeezed: bool = False, prompt_tokens: int = 0) -> Load:
        """The batch as the policy sees it: requests in flight by LoRA name, and the bounds they were admitted within.
        squeezed: with every elastic request at the lowest rank it may be lowered to. prompt_tokens: an arrival's,
        whose prefill stalls every decode in flight once; a request that gave max_tokens has that stall spread over
        its tokens taken off its bound (its bound is a mean over them)."""
        admitted = list(self.running.values())
        stall_ms = prompt_tokens * STEPS.prefill_ms_per_token() if prompt_tokens else 0.0
        bounds = tuple(a.bound_less_stall(stall_ms) for a in admitted if a.bound is not None)
        return Load(Counter(a.name(squeezed) for a in admitted), bounds, STEPS)

    async def __call__(self, scope, receive, send):
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if scope["type"] == "websocket":
            if not _authorized(scope):
                return await send({"type": "websocket.close", "code": 1008})  # policy violation: refused before accept
            return await self.app(scope, receive, send)
        if path in ADAPTER_ADMIN_PATHS or path.startswith("/adapters/"):
            return await _send_json(
                send,
                403,
                _error(
                    "loading and unloading adapters at run time is disabled on a kdlora server: name an adapter in `model` "
                    "(e.g. org/adapter@r8) and kdlora pulls, checks and loads it",
                    403,
                ),
            )
        if scope["method"] != "OPTIONS" and path not in PUBLIC_PATHS and not _authorized(scope):
            return await _send_json(
                send, 401, _error("invalid or missing API key (send it as 'Authorization: Bearer KEY')", 401)
            )
        if scope["method"] == "GET" and path == LISTING_PATH:
            listing = {"object": "list", "data": get_store().listing(), "lora_path": lora_report.describe()}
            return await _send_json(send, 200, listing)
        if scope["method"] == "GET" and path == STEPS_PATH:
            load = self.load()
            in_flight = {"requests": sum(load.running.values()), "bounds_ms_per_token": sorted(load.bounds)}
            return await _send_json(send, 200, STEPS.describe() | {"in_flight": in_flight})
        if scope["method"] == "GET" and path == MODELS_PATH:
            return await self.app(scope, receive, _ModelsWithRanks(send, scope))
        if scope["method"] != "POST" or path not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        ticket = object()
        try:
            return await self._generate(scope, receive, send, ticket)
        finally:
            admitted = self.running.pop(ticket, None)
            if admitted is not None and admitted.handle is not None:
                elastic.table().release(admitted.handle)

    async def _generate(self, scope, receive, send, ticket):
        body = await _read_body(receive)
        try:
            routed = await self._route(scope, body, ticket)
        except RequestError as err:
            error = _error(str(err), err.status, err.param) | ({"kdlora": err.details} if err.details else {})
            return await _send_json(send, err.status, error, err.headers)
        except Exception as err:  # a bug here must cost one request, never the server
            log.exception("kdlora: routing failed")
            return await _send_json(
                send, 500, _error(f"kdlora could not route this request: {type(err).__name__}: {err}", 500)
            )
        if routed is None:
            self.running[ticket] = Admitted()
            self._rebalance()  # a base request costs the batch too
            return await self.app(scope, _replay(body, receive), send)
        new_body, adapter, choice = routed
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = dict(scope, headers=headers + [(b"content-length", str(len(new_body)).encode())])
        measured = _Measured(send, adapter, choice, self.running[ticket].handle)
        return await self.app(scope, _replay(new_body, receive), measured)

    async def _route(self, scope, body: bytes, ticket):
        """None: not ours, pass through unchanged. Else (rewritten body, adapter, Choice), the request admitted into
        `running` under `ticket` with its rank."""
        try:
            payload = json.loads(body)
        except ValueError:
            return None  # vLLM answers malformed JSON itself
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str):
            return None
        from_body, from_headers = payload.pop("kdlora", None), _budget_headers(scope["headers"])
        if model in _served_names(scope):
            if from_body is not None or from_headers:
                raise RequestError(
                    f"'{model}' is the base model: kdlora budgets (extra_body 'kdlora', x-kdlora-* headers) "
                    "apply to adapters only; drop them, or name an adapter",
                    param="model",
                )
            return None
        store = get_store()
        adapter, rank = split_model_name(model)
        if rank is None and not store.is_adapter_name(adapter):
            return None  # an unknown model: vLLM's own 404
        if from_body is not None and not isinstance(from_body, dict):
            raise RequestError("'kdlora' must be an object, e.g. {\"max_rank\": 8}", param="kdlora")
        budget = parse_budget(from_body or {}, from_headers)
        if budget.elastic and payload.get("n", 1) != 1:
            raise RequestError("'elastic' serves one choice per request: send n=1 (or drop 'elastic')", param="n")
        served = _served_model(scope)
        try:
            loaded = await asyncio.to_thread(store.load, adapter, served)
            stalled = any(a.feels_stall for a in self.running.values())  # else no bound needs the prompt's length
            prompt_tokens = await asyncio.to_thread(_prompt_tokens, scope, payload) if stalled else 0
            choice = await self._admit(
                ticket, loaded.metadata, budget, adapter, rank, _max_tokens(payload), prompt_tokens
            )
            await asyncio.to_thread(store.lora_dir, adapter, choice.rank, served)  # intact before vLLM may load it
        except RequestError:
            raise
        except KdloraError as err:
            raise RequestError(str(err), 400, "model") from err
        if not choice.met:
            metrics.BUDGET_MISSES.labels(adapter=adapter).inc()
        payload["model"] = model_name(adapter, choice.rank)
        if isinstance(payload.get("vllm_xargs"), dict):
            payload["vllm_xargs"].pop(elastic.XARG, None)  # the server's to set: a client's could lower another's rank
        handle = self.running[ticket].handle
        if handle is not None:
            _tell_engine(payload, handle)
        return json.dumps(payload).encode(), adapter, choice

    async def _admit(
        self, ticket, meta, budget, adapter: str, rank: int | None, max_tokens: int | None, prompt_tokens: int = 0
    ):
        """Choose the rank against the batch in flight (its bounds less the stall this request's prompt will cause)
        and admit the request into it (no await between the two, so concurrent arrivals see each other). A budget no
        rank meets now: `on_miss` serve (the cheapest rank, flagged), reject (429 before any engine work) or wait
        (ask again as requests finish, up to max_wait_ms, then 429)."""
        held_since = time.monotonic()
        deadline = held_since + (budget.max_wait_ms or DEFAULT_MAX_WAIT_MS) / 1000
        while True:
            choice = choose_rank(meta, budget, adapter, self.load(prompt_tokens=prompt_tokens), rank)
            if not choice.met and any(a.lower_to for a in self.running.values()):
                squeezed = choose_rank(
                    meta, budget, adapter, self.load(squeezed=True, prompt_tokens=prompt_tokens), rank
                )
                choice = squeezed if squeezed.met else choice  # admitted by lowering elastic requests (`_rebalance`)
            if choice.met or budget.on_miss in (None, "serve"):
                break
            if budget.on_miss == "reject" or not self.running or time.monotonic() >= deadline:  # empty: no wait helps
                raise self._refusal(adapter, choice, budget, waited_s=time.monotonic() - held_since)
            await asyncio.sleep(WAIT_POLL_S)
        if budget.on_miss == "wait":
            metrics.WAIT_SECONDS.labels(adapter=adapter).observe(time.monotonic() - held_since)
        bound = budget.latency_ms_per_token if choice.met else None  # a bound already broken cannot be kept
        admitted = Admitted(adapter, choice.rank, bound, max_tokens)
        if budget.elastic:
            admitted.handle = elastic.table().claim(choice.rank)
            if admitted.handle is None:
                log.warning("kdlora: %d elastic requests in flight; this one keeps rank %d", elastic.ROWS, choice.rank)
            else:
                admitted.lower_to = lower_ranks(meta, budget, adapter, choice.rank)
        self.running[ticket] = admitted
        self._rebalance()
        return choice

    def _rebalance(self) -> None:
        """While the predicted step breaks an in-flight request's bound, lower the elastic request whose next rank
        cuts the step most (on the CPU's grouped path only an adapter's largest rank costs); stop when none does."""
        while True:
            load = self.load()
            step_ms = STEPS.predict(load.running)
            if step_ms is None or not load.bounds or step_ms <= min(load.bounds):
                return
            best, best_ms = None, step_ms
            for admitted in self.running.values():
                if admitted.lower_to:
                    trial = (
                        load.running
                        - Counter({admitted.name(): 1})
                        + Counter({model_name(admitted.adapter, admitted.lower_to[0]): 1})
                    )
                    trial_ms = STEPS.predict(trial)
                    if trial_ms < best_ms:
                        best, best_ms = admitted, trial_ms
            if best is None:
                return
            best.lower()

    def _refusal(self, adapter: str, choice, budget, waited_s: float) -> RequestError:
        """The 429 for a budget no rank meets (counted as a rejection), with when to retry and kdlora's estimate."""
        retry_s = self._retry_after_s()
        metrics.REJECTIONS.labels(adapter=adapter).inc()
        waited = f"after waiting {waited_s:.1f} s " if budget.on_miss == "wait" else ""
        return RequestError(
            f"no rank of '{adapter}' meets this budget {waited}with {len(self.running) + 1} requests in flight "
            f"({choice.reason}); retry after {retry_s} s",
            429,
            "kdlora",
            headers={"retry-after": str(retry_s), "x-kdlora-budget-miss": choice.reason},
            details={
                "estimated_ms_per_token": choice.estimate_ms,
                "retry_after_s": retry_s,
                "cheapest_rank": choice.rank,
            },
        )

    def _retry_after_s(self) -> int:
        """Whole seconds until the first in-flight request that says how long it is (max_tokens) should be done, at the
        current batch's predicted step time; 1 when nothing says."""
        step_ms = STEPS.predict(self.load().running)
        ends = [
            a.started + a.max_tokens * step_ms / 1000 - time.monotonic()
            for a in self.running.values()
            if a.max_tokens and step_ms is not None
        ]
        return max(1, math.ceil(min(ends))) if ends else 1


def _budget_headers(headers) -> dict[str, str]:
    """{field: text} of the x-kdlora-* headers; latin-1, as HTTP headers are (any byte decodes)."""
    found = {}
    for key, value in headers:
        name = key.decode("latin-1").lower()
        if name.startswith(HEADER_PREFIX):
            found.setdefault(name.removeprefix(HEADER_PREFIX).replace("-", "_"), value.decode("latin-1"))
    return found


def _prompt_tokens(scope, payload: dict) -> int:
    """How many tokens the request's prompt is, by vLLM's own tokenizer (0 outside a vLLM app, or for a prompt of
    a kind not counted here: no stall priced)."""
    engine = getattr(_app_state(scope), "engine_client", None)
    if engine is None:
        return 0
    prompt, messages = payload.get("prompt"), payload.get("messages")
    try:
        if isinstance(prompt, str):
            return len(engine.get_tokenizer().encode(prompt))
        if isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            return len(prompt)
        if isinstance(messages, list):
            chat = engine.get_tokenizer().apply_chat_template
            return len(chat(messages, tokenize=True, add_generation_prompt=True, return_dict=False))
    except Exception:  # e.g. a template this tokenizer cannot apply: vLLM answers for the request itself
        log.warning("kdlora: could not count the prompt's tokens; its prefill is not priced", exc_info=True)
    return 0


def _tell_engine(payload: dict, handle: str) -> None:
    """An elastic request's row (kdlora_serve.elastic) in vLLM's per-request extra args, where the worker reads it; and
    a cache salt of its own, so no later request reuses KV blocks computed at a rank its LoRA name does not say."""
    xargs = payload.get("vllm_xargs") or {}
    if not isinstance(xargs, dict):
        raise RequestError("'vllm_xargs' must be an object", param="vllm_xargs")
    payload["vllm_xargs"] = xargs | {elastic.XARG: handle}
    salt = payload.get("cache_salt")
    payload["cache_salt"] = f"{salt[:64]}-" if isinstance(salt, str) and salt else ""
    payload["cache_salt"] += f"kdlora-elastic-{handle.replace(':', '-')}"


def _max_tokens(payload: dict) -> int | None:
    value = payload.get("max_completion_tokens", payload.get("max_tokens"))
    return value if isinstance(value, int) and value > 0 else None


class _Measured:
    """Wraps `send`: adds the rank headers, then records the request's decode ms per generated token for the policy:
    streamed, from the first token's event to the last one's (prefill and queueing before it excluded); otherwise
    the whole request over its usage's completion tokens (prefill included: no first-token time to split at).
    For an elastic request it also reports what was served (`_served`): in the JSON body's `kdlora` field and
    x-kdlora-lowest-rank / x-kdlora-tokens-per-rank headers, or streamed, in one last event before `data: [DONE]`."""

    def __init__(self, send, adapter: str, choice, handle: str | None = None):
        self.send, self.adapter, self.choice, self.handle = send, adapter, choice, handle
        self.started = time.perf_counter()
        self.status = 200
        self.held_start = None  # an elastic request's whole response: its start waits for the body's report
        self.chunks: list[bytes] = []
        self.stream_tokens = 0
        self.first_token = self.last_token = None
        self.last_event = b""

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            extra = [
                (b"x-kdlora-rank", str(self.choice.rank).encode()),
                (b"x-kdlora-budget-met", b"true" if self.choice.met else b"false"),
            ]
            if not self.choice.met:
                extra.append((b"x-kdlora-budget-miss", self.choice.reason.encode()))
            message = dict(message, headers=list(message.get("headers", [])) + extra)
            if self.handle is not None and not _is_event_stream(message):
                self.held_start = message
                return
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            streamed = body.startswith(b"data:") or b"\ndata:" in body
            if streamed:  # about one token per event
                events = body.count(b"data: {")
                if events:
                    self.last_token = time.perf_counter()
                    self.first_token = self.first_token or self.last_token
                    self.stream_tokens += events
                    self.last_event = body[body.rindex(b"data: {") :]
                if self.handle is not None and b"data: [DONE]" in body:
                    message = dict(
                        message, body=body.replace(b"data: [DONE]", self._report_event() + b"data: [DONE]", 1)
                    )
            elif len(self.chunks) < 1024 or self.held_start is not None:
                self.chunks.append(body)
            if not message.get("more_body", False):
                self._record()
                if self.held_start is not None:
                    return await self._send_whole()
            elif self.held_start is not None:
                return
        await self.send(message)

    def _served(self) -> dict:
        """What an elastic request was served: the rank it started at, the lowest it reached, and in order each rank
        with the tokens it generated (ranks only go down: the first `tokens` at the first rank, and so on)."""
        segments = elastic.table().served(self.handle)
        return {
            "elastic": True,
            "rank": self.choice.rank,
            "lowest_rank": min((r for r, _ in segments), default=self.choice.rank),
            "tokens_per_rank": [{"rank": r, "tokens": t} for r, t in segments],
        }

    def _report_event(self) -> bytes:
        try:
            last = json.loads(self.last_event.removeprefix(b"data: ").split(b"\n", 1)[0])
        except ValueError:
            last = {}
        event = {key: last[key] for key in ("id", "object", "created", "model") if key in last}
        return b"data: " + json.dumps(event | {"choices": [], "kdlora": self._served()}).encode() + b"\n\n"

    async def _send_whole(self) -> None:
        body, start = b"".join(self.chunks), self.held_start
        headers = [(k, v) for k, v in start["headers"] if k.lower() != b"content-length"]
        if self.status == 200:
            try:
                served = self._served()
                body = json.dumps(json.loads(body) | {"kdlora": served}).encode()
                spans = ",".join(f"{row['rank']}:{row['tokens']}" for row in served["tokens_per_rank"])
                headers += [
                    (b"x-kdlora-lowest-rank", str(served["lowest_rank"]).encode()),
                    (b"x-kdlora-tokens-per-rank", spans.encode()),
                ]
            except (ValueError, TypeError):
                log.warning("kdlora: could not add what was served to an elastic response", exc_info=True)
        await self.send(dict(start, headers=headers + [(b"content-length", str(len(body)).encode())]))
        await self.send({"type": "http.response.body", "body": body})

    def _record(self) -> None:
        if self.status != 200:
            return
        tokens = self.stream_tokens
        if tokens:
            seconds, per = (
                (self.last_token - self.first_token, tokens - 1) if tokens > 1 else (self.last_token - self.started, 1)
            )
        else:
            try:
                tokens = json.loads(b"".join(self.chunks))["usage"]["completion_tokens"]
            except (ValueError, KeyError, TypeError):
                return
            seconds, per = time.perf_counter() - self.started, tokens
        store, rank = get_store(), self.choice.rank
        segments = elastic.table().served(self.handle) if self.handle is not None else [(rank, tokens)]
        if per > 0 and len(segments) == 1:  # one rank's cost, not a mix
            store.costs.record(self.adapter, rank, 1000 * seconds / per)
        metrics.REQUESTS.labels(adapter=self.adapter, rank=str(rank)).inc()
        for served_rank, served_tokens in segments:
            metrics.TOKENS.labels(adapter=self.adapter, rank=str(served_rank)).inc(served_tokens)


def _is_event_stream(start) -> bool:
    return any(k.lower() == b"content-type" and v.startswith(b"text/event-stream") for k, v in start["headers"])


class _ModelsWithRanks:
    """Wraps `send` for GET /v1/models: appends each configured or loaded adapter and its evaluated ranks
    (`<adapter>@r<k>`) that vLLM does not list yet, so routers can discover them before first use."""

    def __init__(self, send, scope):
        self.send, self.scope = send, scope
        self.start, self.chunks = None, []

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.start = message
            return
        self.chunks.append(message.get("body", b""))
        if message.get("more_body", False):
            return
        body = b"".join(self.chunks)
        if self.start["status"] == 200:
            try:
                body = json.dumps(await asyncio.to_thread(_with_ranks, json.loads(body), self.scope)).encode()
            except Exception:  # a listing problem must not hide vLLM's own answer
                log.warning("kdlora: could not add adapter ranks to /v1/models", exc_info=True)
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        await self.send(dict(self.start, headers=headers + [(b"content-length", str(len(body)).encode())]))
        await self.send({"type": "http.response.body", "body": body})


def _with_ranks(listing: dict, scope) -> dict:
    store = get_store()
    listed = {card["id"] for card in listing["data"]}
    parent = next(iter(_served_names(scope)), None)
    for row in store.listing():
        meta = store.describe(row["id"])
        if meta is None:
            continue
        ranks = sorted({r.rank for r in meta.ranks} | {meta.max_rank})
        for name in [row["id"], *(model_name(row["id"], k) for k in ranks)]:
            if name not in listed:
                listing["data"].append(
                    {
                        "id": name,
                        "object": "model",
                        "created": int(time.time()),
                        "owned_by": "kdlora",
                        "root": row["source"],
                        "parent": parent,
                        "permission": [],
                    }
                )
    return listing


def _serving_models(scope):
    """vLLM's OpenAIServingModels from the app state (None outside a vLLM app)."""
    return getattr(_app_state(scope), "openai_serving_models", None)


def _app_state(scope):
    return getattr(scope.get("app"), "state", None)


def _served_names(scope) -> set[str]:
    return {path.name for path in getattr(_serving_models(scope), "base_model_paths", [])}


def _served_model(scope) -> str | None:
    return getattr(getattr(_serving_models(scope), "model_config", None), "model", None)


def _api_keys(scope) -> list[str]:
    """The keys vLLM itself enforces: `--api-key` (any spelling, from its parsed args), else VLLM_API_KEY."""
    args = getattr(_app_state(scope), "args", None)
    return [key for key in (getattr(args, "api_key", None) or [os.environ.get("VLLM_API_KEY")]) if key]


def _authorized(scope) -> bool:
    """vLLM's own rule (scheme case-insensitive, Bearer token), compared in constant time, on every route."""
    keys = _api_keys(scope)
    if not keys:
        return True
    header = next((value for name, value in scope["headers"] if name.lower() == b"authorization"), b"")
    scheme, _, token = header.partition(b" ")
    presented = hashlib.sha256(token).digest()
    matches = [hmac.compare_digest(presented, hashlib.sha256(key.encode()).digest()) for key in keys]  # no early exit
    return scheme.lower() == b"bearer" and any(matches)


def _error(message: str, status: int, param: str | None = None) -> dict:
    kinds = {
        400: "BadRequestError",
        401: "AuthenticationError",
        403: "PermissionDeniedError",
        404: "NotFoundError",
        429: "RateLimitError",
    }
    return {
        "error": {"message": message, "type": kinds.get(status, "InternalServerError"), "param": param, "code": status}
    }


async def _send_json(send, status: int, payload: dict, headers: dict[str, str] | None = None) -> None:
    body = json.dumps(payload).encode()
    extra = [(name.encode(), value.encode("latin-1", "replace")) for name, value in (headers or {}).items()]
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive) -> bytes:
    chunks = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive):
    """A `receive` that hands over `body` once, then the client's own messages (e.g. disconnect)."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
