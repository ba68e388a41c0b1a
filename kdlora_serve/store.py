"""The adapters one server knows: aliases given at start, Hub repos on an allow-list, pulled once
(safetensors only, validated by hub/), truncated once per rank into a cache directory.

One store lives in the API-server process; the middleware (rank choice) and the LoRA resolver
(registration with vLLM) share it through `get_store()`.
"""

import fnmatch
import json
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hub.adapter import read_adapter, truncate_adapter
from hub.atomic import remove_if_dead
from hub.cache import cache_dir
from hub.errors import KdloraError
from hub.remote import parse_repo, pull_adapter
from hub.schema import RankMetadata
from kdlora_serve import metrics
from kdlora_serve.policy import CostTracker, RequestError

# Environment the server reads (`kdlora serve` sets them; with plain `vllm serve`, set them yourself).
ENV_ADAPTERS = "KDLORA_ADAPTERS"  # JSON {"alias": "ORG/NAME[@REV]" | "/path/to/adapter"}
ENV_ALLOW = "KDLORA_ALLOW"  # comma-separated repo-id patterns that may be pulled on demand, e.g. "myorg/*"
ENV_BASE_ID = "KDLORA_BASE_ID"  # the base model id adapters were trained on, when --model is a local copy of it


@dataclass
class Loaded:
    spec: str  # where it came from: repo id (with revision) or local path
    directory: Path  # the validated full-rank adapter
    metadata: RankMetadata
    warm: set[int] = field(default_factory=set)  # ranks registered with vLLM


def remove_dead_servers(root: Path) -> None:
    """Delete the adapter copies of servers that are gone (folders `<name>-<pid>`, see `_pull`)."""
    for folder in root.glob("*-*"):
        remove_if_dead(folder, folder.name.rsplit("-", 1)[1])


class AdapterStore:
    def __init__(self, aliases: dict[str, str], allow: list[str], base_ids: list[str], root: Path, endpoint: str | None = None):
        self.aliases, self.allow, self.base_ids, self.root, self.endpoint = aliases, allow, base_ids, root, endpoint
        self.costs = CostTracker()
        self._loaded: dict[str, Loaded] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    @classmethod
    def from_env(cls) -> "AdapterStore":
        try:
            aliases = json.loads(os.environ.get(ENV_ADAPTERS) or "{}")
        except json.JSONDecodeError as err:
            raise KdloraError(f"{ENV_ADAPTERS} is not JSON ({err.msg}); expected {{\"alias\": \"ORG/NAME or /path\"}}") from err
        allow = [p.strip() for p in os.environ.get(ENV_ALLOW, "").split(",") if p.strip()]
        base_ids = [b for b in [os.environ.get(ENV_BASE_ID)] if b]
        root = cache_dir("served")
        remove_dead_servers(root)
        return cls(aliases, allow, base_ids, root, os.environ.get("HF_ENDPOINT"))

    def is_adapter_name(self, name: str) -> bool:
        """Whether a request's `model` is meant for kdlora (an alias, or a repo id that may be pulled)."""
        return name in self.aliases or self._allowed(name)

    def _allowed(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pattern) for pattern in self.allow)

    def spec_for(self, name: str) -> str:
        if name in self.aliases:
            return self.aliases[name]
        if name.startswith(("/", ".", "~", "file:")) or ".." in name:
            raise RequestError(f"adapter '{name}': paths are not adapter names; use a configured alias or ORG/NAME", param="model")
        try:
            parse_repo(name, allow_local=False)
        except KdloraError as err:
            raise RequestError(str(err), param="model") from err
        if not self._allowed(name):
            raise RequestError(f"adapter '{name}' is not on this server's allow-list ({', '.join(self.allow) or 'empty'})", 403, "model")
        return name

    def load(self, name: str, served_model: str | None = None) -> Loaded:
        """The validated adapter for `name`, pulled and checked against the served base on first use."""
        with self._guard:
            if name in self._loaded:
                return self._loaded[name]
            lock = self._locks.setdefault(name, threading.Lock())
        with lock:  # one pull per adapter, however many requests wait for it
            if name not in self._loaded:
                self._loaded[name] = self._pull(name, served_model)
        return self._loaded[name]

    def _pull(self, name: str, served_model: str | None) -> Loaded:
        spec = self.spec_for(name)
        started = time.perf_counter()
        directory = self.root / f"{_safe(name)}-{os.getpid()}" / "full"  # per server process: no two writers
        try:
            pull_adapter(spec, directory, endpoint=self.endpoint)
            adapter = read_adapter(directory)
        except RequestError:
            raise
        except KdloraError as err:
            status = 404 if "not found" in str(err) else 400
            raise RequestError(f"adapter '{name}' cannot be served: {err}", status, "model") from err
        metrics.PULLS.labels(adapter=name).inc()
        metrics.PREPARE_SECONDS.labels(step="pull").observe(time.perf_counter() - started)
        self._check_base(name, adapter.metadata, served_model)
        return Loaded(spec, directory, adapter.metadata)

    def _check_base(self, name: str, meta: RankMetadata, served_model: str | None) -> None:
        served = [m for m in [served_model, *self.base_ids] if m]
        if served and not any(_same_model(meta.base_model.id, model) for model in served):
            raise RequestError(f"adapter '{name}' was trained on base model '{meta.base_model.id}', but this server serves "
                               f"'{served[0]}'; serve it with its own base (kdlora serve --adapter {name})", 400, "model")

    def rank_dir(self, name: str, rank: int, served_model: str | None = None) -> Path:
        """The rank-`rank` truncation of `name`, written once into the cache."""
        loaded = self.load(name, served_model)
        loaded.metadata.check_rank(rank)
        out = loaded.directory.parent / f"r{rank}"
        with self._locks[name]:
            if not out.exists():
                started = time.perf_counter()
                truncate_adapter(loaded.directory, rank, out)
                metrics.TRUNCATIONS.labels(adapter=name).inc()
                metrics.PREPARE_SECONDS.labels(step="truncate").observe(time.perf_counter() - started)
        loaded.warm.add(rank)
        return out

    def listing(self) -> list[dict]:
        """Discovery: every configured or loaded adapter, its ranks, quality, bytes and warm ranks."""
        rows = []
        for name in sorted(set(self.aliases) | set(self._loaded)):
            loaded = self._loaded.get(name)
            row = {"id": name, "source": self.aliases.get(name, name), "loaded": loaded is not None}
            if loaded:
                measured = self.costs.measured(name)
                meta = loaded.metadata
                row |= {"base_model": meta.base_model.id, "max_rank": meta.max_rank, "default_rank": meta.default_rank,
                        "ranks": [{"rank": r.rank, "kl_to_teacher": r.kl_to_teacher, "teacher_top1_agreement": r.teacher_top1_agreement,
                                   "adapter_bytes": r.adapter_bytes, "warm": r.rank in loaded.warm,
                                   "measured_ms_per_token": measured.get(r.rank)} for r in meta.ranks],
                        "warm_ranks": sorted(loaded.warm)}
            rows.append(row)
        return rows


def _safe(name: str) -> str:
    return name.replace("/", "--")


def _same_model(a: str, b: str) -> bool:
    if Path(a).exists() and Path(b).exists():
        return Path(a).resolve() == Path(b).resolve()
    return a.rstrip("/") == b.rstrip("/")


_STORE: AdapterStore | None = None
_STORE_LOCK = threading.Lock()


def get_store() -> AdapterStore:
    global _STORE
    with _STORE_LOCK:
        if _STORE is None:
            _STORE = AdapterStore.from_env()
        return _STORE
