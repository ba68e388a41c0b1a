"""The middleware in front of a fake vLLM app (plain ASGI, no engine): auth on every route, vLLM's runtime
adapter routes refused, bad input answered 4xx with the problem named, /v1/models listing every rank.
The store behind it is real (a local adapter directory as alias)."""

import asyncio
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import tiny_llama, write_nested_adapter

from kdlora_serve.api import store as store_module
from kdlora_serve.api.middleware import KdloraMiddleware
from kdlora_serve.api.store import AdapterStore

ALIAS = "tiny"


class FakeVllm:
    """What the middleware sees of vLLM: app.state (parsed args, served models) and an app that answers 200."""

    def __init__(self, api_key=None):
        models = SimpleNamespace(
            base_model_paths=[SimpleNamespace(name="base")], model_config=SimpleNamespace(model="tiny-llama")
        )
        self.state = SimpleNamespace(args=SimpleNamespace(api_key=api_key), openai_serving_models=models)
        self.seen = []

    async def __call__(self, scope, receive, send):
        body = (await receive()).get("body", b"")
        self.seen.append((scope["method"], scope["path"], body))
        answer = (
            {"object": "list", "data": [{"id": "base", "object": "model"}]}
            if scope["path"] == "/v1/models"
            else {"ok": True}
        )
        payload = json.dumps(answer).encode()
        await send(
            {"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(payload)).encode())]}
        )
        await send({"type": "http.response.body", "body": payload})


def call(vllm, method, path, body=None, headers=()):
    """One request through KdloraMiddleware(vllm): (status, parsed JSON body)."""
    middleware = KdloraMiddleware(vllm)
    raw = json.dumps(body).encode() if isinstance(body, dict) else (body or b"")
    scope = {
        "type": "http",
        "method": method,
        "path": path,
        "root_path": "",
        "app": vllm,  # Starlette sets scope["app"]
        "headers": [(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers],
    }
    sent = []

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message):
        sent.append(message)

    asyncio.run(middleware(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    return status, json.loads(b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body"))


@pytest.fixture
def adapter(tmp_path_factory):
    return write_nested_adapter(tmp_path_factory.mktemp("mw") / "adapter", tiny_llama(), rank=8)


@pytest.fixture
def store(adapter, tmp_path, monkeypatch):
    served = AdapterStore({ALIAS: str(adapter)}, ["kd/*"], ["tiny-llama"], tmp_path / "served")
    monkeypatch.setattr(store_module, "_STORE", served)
    monkeypatch.delenv("VLLM_API_KEY", raising=False)
    return served


def completion(model, **extra):
    return {"model": model, "prompt": "hi", "max_tokens": 2, **extra}


def test_a_key_in_vllms_parsed_args_guards_every_route_before_anything_else(store):
    vllm = FakeVllm(api_key=["SECRET"])  # `--api-key=SECRET`: vLLM parsed it, VLLM_API_KEY is unset
    for method, path, body in [
        ("GET", "/v1/kdlora/adapters", None),
        ("POST", "/invocations", completion("base")),
        ("POST", "/v1/completions", completion("kd/some-adapter@r2")),
        ("GET", "/v1/models", None),
        ("POST", "/v1/completions", completion(ALIAS + "@r²")),
    ]:
        status, answer = call(vllm, method, path, body)
        assert (status, answer["error"]["message"]) == (
            401,
            "invalid or missing API key (send it as 'Authorization: Bearer KEY')",
        )
    assert vllm.seen == [] and not store.root.exists()  # nothing reached vLLM, nothing was pulled
    for wrong in ["Bearer secret", "Bearer SECRET2", "Basic SECRET", "SECRET", "Bearer  SECRET"]:
        assert call(vllm, "GET", "/v1/kdlora/adapters", headers=[("Authorization", wrong)])[0] == 401
    for right in ["Bearer SECRET", "bearer SECRET", "BEARER SECRET"]:  # the scheme is case-insensitive, as in vLLM
        assert call(vllm, "GET", "/v1/kdlora/adapters", headers=[("Authorization", right)])[0] == 200
    assert call(vllm, "GET", "/health")[0] == 200 and call(vllm, "GET", "/metrics")[0] == 200  # probes stay open


def test_the_environment_key_counts_when_vllm_has_none_on_its_command_line(store, monkeypatch):
    monkeypatch.setenv("VLLM_API_KEY", "ENVKEY")
    assert call(FakeVllm(), "POST", "/invocations", completion("base"))[0] == 401
    assert (
        call(FakeVllm(), "POST", "/invocations", completion("base"), headers=[("authorization", "Bearer ENVKEY")])[0]
        == 200
    )


@pytest.mark.parametrize(
    "method, path",
    [
        ("POST", "/adapters"),
        ("DELETE", "/adapters/tiny@r8"),
        ("GET", "/adapters"),
        ("POST", "/v1/load_lora_adapter"),
        ("POST", "/v1/unload_lora_adapter"),
    ],
)
def test_runtime_adapter_routes_are_refused_even_without_a_key(store, method, path):
    vllm = FakeVllm()
    status, answer = call(vllm, method, path, {"name": "tiny@r8", "src": "/tmp/other"})
    assert status == 403 and answer["error"]["message"].startswith(
        "loading and unloading adapters at run time is disabled on a kdlora server"
    )
    assert vllm.seen == []


@pytest.mark.parametrize(
    "body, headers, message",
    [
        (completion("x" * 20_000 + "@r8"), [], "is 20003 characters long; at most 512"),
        (completion("x" * 300 + "/y"), [], None),  # not ours: passed on to vLLM, which answers (here: 200)
        (completion(ALIAS + "@r²"), [], "the rank after '@r' must be a whole number in ASCII digits"),
        (completion(ALIAS + "@r٨"), [], "the rank after '@r' must be a whole number in ASCII digits"),
        (completion(ALIAS + "@r" + "9" * 5000), [], "at most 512"),
        (
            completion(ALIAS, kdlora={"rank": True}),
            [],
            "budget field 'rank' (extra_body kdlora): Input should be a valid integer",
        ),
        (completion(ALIAS, kdlora=[8]), [], "'kdlora' must be an object"),
        (
            completion(ALIAS),
            [("x-kdlora-rank", "\xff")],
            "budget field 'rank' (x-kdlora-rank header): Input should be a valid integer",
        ),
        (completion("base"), [("x-kdlora-rank", "8")], "'base' is the base model: kdlora budgets"),
        (completion("base", kdlora={"max_rank": 2}), [], "'base' is the base model: kdlora budgets"),
        (completion(ALIAS + "@r9"), [], "rank 9 is out of range: this adapter has ranks 1..8"),
    ],
)
def test_bad_input_is_a_4xx_naming_the_problem(store, body, headers, message):
    status, answer = call(FakeVllm(), "POST", "/v1/completions", body, headers)
    if message is None:
        assert status == 200
    else:
        assert status == 400 and message in answer["error"]["message"], answer


def test_an_adapter_request_reaches_vllm_as_its_rank(store):
    vllm = FakeVllm()
    assert call(vllm, "POST", "/v1/completions", completion(ALIAS, kdlora={"max_rank": 2}))[0] == 200
    assert json.loads(vllm.seen[-1][2])["model"] == f"{ALIAS}@r2" and "kdlora" not in json.loads(vllm.seen[-1][2])
    written = [p.relative_to(store.root) for p in store.root.glob("*/r*/adapter_model.safetensors")]
    assert written == [Path(f"{ALIAS}-{os.getpid()}/r2/adapter_model.safetensors")]  # before vLLM was asked to load it


def test_models_lists_every_evaluated_rank_before_first_use(store):
    status, answer = call(FakeVllm(), "GET", "/v1/models")
    ids = [card["id"] for card in answer["data"]]
    assert status == 200 and ids == ["base", ALIAS, f"{ALIAS}@r1", f"{ALIAS}@r2", f"{ALIAS}@r4", f"{ALIAS}@r8"]
    assert answer["data"][1]["parent"] == "base" and not store.root.exists()  # metadata only: nothing pulled


def test_a_damaged_rank_copy_is_remade_from_the_pulled_adapter(store):
    first = store.lora_dir(ALIAS, 4)
    weights = first / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(original[: len(original) // 2])  # truncated on disk behind the server's back
    (first / "adapter_config.json").write_text("garbage")
    assert store.lora_dir(ALIAS, 4) == first
    assert weights.read_bytes() == original and json.loads((first / "adapter_config.json").read_text())["r"] == 4


def test_a_damaged_pulled_copy_is_pulled_again(store):
    rank_dir = store.lora_dir(ALIAS, 2)
    full = rank_dir.parent / "full" / "adapter_model.safetensors"
    original = full.read_bytes()
    full.write_bytes(b"\0" * len(original))  # same size, other content: the hash catches it
    (rank_dir / "adapter_model.safetensors").unlink()
    store.lora_dir(ALIAS, 2)
    assert full.read_bytes() == original


def test_with_one_lora_per_adapter_every_rank_is_the_checked_full_adapter_and_nothing_is_truncated(store):
    store.one_lora_per_adapter = True  # what the resolver sets at start with a rank-aware LoRA backend
    full = store.lora_dir(ALIAS, 2)
    assert full.name == "full" and store.lora_dir(ALIAS, 8) == full and store.lora_dir(ALIAS, 3) == full
    assert [p.name for p in full.parent.iterdir()] == ["full"]  # no truncated copies
    assert store.load(ALIAS).warm == set(range(1, 9))  # any rank now needs no load
    weights = full / "adapter_model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(b"\0" * len(original))
    assert store.lora_dir(ALIAS, 5) == full and weights.read_bytes() == original  # damaged: pulled again


def test_a_foreign_adapter_leaves_nothing_behind_and_says_the_same_twice(store, adapter, tmp_path):
    from kdlora_serve.api import metrics
    from kdlora_serve.api.policy import RequestError

    foreign = write_nested_adapter(tmp_path / "foreign", tiny_llama(), rank=4, base_model_id="someone/else")
    store.aliases["foreign"] = str(foreign)
    pulls = metrics.PULLS.labels(adapter="foreign")._value.get()
    for _ in range(2):
        with pytest.raises(RequestError, match="adapter 'foreign' was trained on base model 'someone/else'"):
            store.load("foreign", "tiny-llama")
    assert not any(store.root.glob("foreign-*")) and metrics.PULLS.labels(adapter="foreign")._value.get() == pulls


def test_copies_are_removed_when_the_server_stops(store):
    store.lora_dir(ALIAS, 1)
    assert any(store.root.iterdir())
    store.remove_copies()  # registered with atexit
    assert not any(store.root.iterdir())


def test_missing_repos_are_404_by_type_not_by_text(store, monkeypatch):
    from hub.errors import NotFoundError
    from kdlora_serve.api.policy import RequestError

    def missing(*args, **kwargs):
        raise NotFoundError("nothing here")  # no "not found" in the text

    monkeypatch.setattr(store_module, "pull_adapter", missing)
    with pytest.raises(RequestError) as caught:
        store.load("kd/absent")
    assert caught.value.status == 404
