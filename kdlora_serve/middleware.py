"""ASGI middleware (`vllm serve --middleware kdlora_serve.middleware.KdloraMiddleware`): per-request rank.

For chat/completions requests whose `model` is a kdlora adapter it reads the budget
(`extra_body={"kdlora": {...}}` or `x-kdlora-*` headers), picks the rank (policy), rewrites `model` to
`<adapter>@r<k>` before vLLM sees it (vLLM then echoes that name and the resolver registers the rank),
adds `x-kdlora-rank` / `x-kdlora-budget-met` to the response, and measures ms per generated token per
rank for the policy. Bad requests get OpenAI-shaped JSON errors; nothing here can take the server down.
Also serves discovery: GET /v1/kdlora/adapters.
"""

import asyncio
import json
import logging
import os
import time

from hub.errors import KdloraError
from kdlora_serve import metrics
from kdlora_serve.policy import Budget, RequestError, choose_rank, parse_budget, split_model_name
from kdlora_serve.store import get_store

log = logging.getLogger("vllm.kdlora")  # under vLLM's logger: its handlers and VLLM_LOGGING_LEVEL apply
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")
LISTING_PATH = "/v1/kdlora/adapters"
HEADER_PREFIX = "x-kdlora-"


class KdloraMiddleware:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if scope["method"] == "GET" and scope["path"] == LISTING_PATH:
            if not _authorized(scope):
                return await _send_json(send, 401, _error("invalid or missing API key", 401))
            return await _send_json(send, 200, {"object": "list", "data": get_store().listing()})
        if scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        body = await _read_body(receive)
        try:
            routed = await self._route(scope, body)
        except RequestError as err:
            return await _send_json(send, err.status, _error(str(err), err.status, err.param))
        except Exception as err:  # a bug here must cost one request, never the server
            log.exception("kdlora: routing failed")
            return await _send_json(send, 500, _error(f"kdlora could not route this request: {type(err).__name__}: {err}", 500))
        if routed is None:
            return await self.app(scope, _replay(body, receive), send)
        new_body, adapter, choice = routed
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
        scope = dict(scope, headers=headers + [(b"content-length", str(len(new_body)).encode())])
        return await self.app(scope, _replay(new_body, receive), _Measured(send, adapter, choice))

    async def _route(self, scope, body: bytes):
        """None: not ours, pass through unchanged. Else (rewritten body, adapter, Choice)."""
        try:
            payload = json.loads(body)
        except ValueError:
            return None  # vLLM answers malformed JSON itself
        model = payload.get("model") if isinstance(payload, dict) else None
        if not isinstance(model, str) or model in _served_names(scope):
            return None
        store = get_store()
        adapter, rank = split_model_name(model)
        if rank is None and not store.is_adapter_name(adapter):
            return None  # an unknown model: vLLM's own 404
        if not _authorized(scope):
            raise RequestError("invalid or missing API key", 401)
        budget = _budget(payload.pop("kdlora", None), scope["headers"])
        try:
            loaded = await asyncio.to_thread(store.load, adapter, _served_model(scope))
        except RequestError:
            raise
        except KdloraError as err:
            raise RequestError(str(err), 400, "model") from err
        choice = choose_rank(loaded.metadata, budget, adapter, store.costs, rank)
        if not choice.met:
            metrics.BUDGET_MISSES.labels(adapter=adapter).inc()
        payload["model"] = f"{adapter}@r{choice.rank}"
        return json.dumps(payload).encode(), adapter, choice


def _budget(from_body, headers) -> Budget:
    if from_body is not None and not isinstance(from_body, dict):
        raise RequestError("'kdlora' must be an object, e.g. {\"max_rank\": 8}", param="kdlora")
    raw = dict(from_body or {})
    for key, value in headers:
        name = key.decode().lower()
        if name.startswith(HEADER_PREFIX):
            raw.setdefault(name.removeprefix(HEADER_PREFIX).replace("-", "_"), value.decode())
    return parse_budget(raw, "extra_body kdlora / x-kdlora-* headers")


class _Measured:
    """Wraps `send`: adds the rank headers, then records ms per generated token for the policy."""

    def __init__(self, send, adapter: str, choice):
        self.send, self.adapter, self.choice = send, adapter, choice
        self.started = time.perf_counter()
        self.status = 200
        self.chunks: list[bytes] = []
        self.stream_tokens = 0

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            self.status = message["status"]
            extra = [(b"x-kdlora-rank", str(self.choice.rank).encode()),
                     (b"x-kdlora-budget-met", b"true" if self.choice.met else b"false")]
            if not self.choice.met:
                extra.append((b"x-kdlora-budget-miss", self.choice.reason.encode()))
            message = dict(message, headers=list(message.get("headers", [])) + extra)
        elif message["type"] == "http.response.body":
            body = message.get("body", b"")
            if body.startswith(b"data:") or b"\ndata:" in body:  # streaming: about one token per event
                self.stream_tokens += body.count(b"data: {")
            elif len(self.chunks) < 1024:
                self.chunks.append(body)
            if not message.get("more_body", False):
                self._record()
        await self.send(message)

    def _record(self) -> None:
        if self.status != 200:
            return
        tokens = self.stream_tokens
        if not tokens:
            try:
                tokens = json.loads(b"".join(self.chunks))["usage"]["completion_tokens"]
            except (ValueError, KeyError, TypeError):
                return
        store, rank = get_store(), self.choice.rank
        store.costs.record(self.adapter, rank, time.perf_counter() - self.started, tokens)
        metrics.REQUESTS.labels(adapter=self.adapter, rank=str(rank)).inc()
        metrics.TOKENS.labels(adapter=self.adapter, rank=str(rank)).inc(tokens)


def _serving_models(scope):
    """vLLM's OpenAIServingModels from the app state (None outside a vLLM app)."""
    return getattr(getattr(scope.get("app"), "state", None), "openai_serving_models", None)


def _served_names(scope) -> set[str]:
    return {path.name for path in getattr(_serving_models(scope), "base_model_paths", [])}


def _served_model(scope) -> str | None:
    return getattr(getattr(_serving_models(scope), "model_config", None), "model", None)


def _authorized(scope) -> bool:
    """vLLM's --api-key check runs inside this middleware; an adapter pull must not happen before it."""
    key = os.environ.get("VLLM_API_KEY")
    if not key:
        return True
    headers = dict(scope["headers"])
    return headers.get(b"authorization", b"").decode() == f"Bearer {key}"


def _error(message: str, status: int, param: str | None = None) -> dict:
    kinds = {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError", 404: "NotFoundError"}
    return {"error": {"message": message, "type": kinds.get(status, "InternalServerError"), "param": param, "code": status}}


async def _send_json(send, status: int, payload: dict) -> None:
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
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
