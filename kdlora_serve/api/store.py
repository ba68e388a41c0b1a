"""The adapters one server knows: aliases given at start, Hub repos on an allow-list, pulled once
(safetensors only, validated by hub/), handed to vLLM whole (one LoRA serves every rank, lora_slots) or, with
vLLM's stock LoRA ops, truncated once per rank into a cache directory.

One store lives in the API-server process; the middleware (rank choice) and the LoRA resolver
(registration with vLLM) share it through `get_store()`. Every directory handed to vLLM is checked
against the fingerprint taken when it was written (size and mtime, then sha256 if those moved): a file
damaged on disk is re-made from the pulled copy (or pulled again) instead of crashing the engine that
would load it. The server's copies are removed when it exits.
"""

import atexit
import fnmatch
import hashlib
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from hub.adapter import read_adapter, truncate_adapter
from hub.atomic import remove_if_dead
from hub.cache import cache_dir
from hub.errors import KdloraError, NotFoundError
from hub.remote import parse_repo, pull_adapter, read_remote_metadata
from hub.schema import RankMetadata
from kdlora_serve.api import metrics
from kdlora_serve.api.policy import CostTracker
from kdlora_serve.errors import RequestError

log = logging.getLogger("vllm.kdlora")  # under vLLM's logger: its handlers and VLLM_LOGGING_LEVEL apply

# Environment the server reads (`kdlora serve` sets them; with plain `vllm serve`, set them yourself).
ENV_ADAPTERS = "KDLORA_ADAPTERS"  # JSON {"alias": "ORG/NAME[@REV]" | "/path/to/adapter"}
ENV_ALLOW = "KDLORA_ALLOW"  # comma-separated repo-id patterns that may be pulled on demand, e.g. "myorg/*"
ENV_BASE_ID = "KDLORA_BASE_ID"  # the base model id adapters were trained on, when --model is a local copy of it


@dataclass
class Loaded:
    spec: str  # where it came from: repo id (with revision) or local path
    directory: Path  # the validated full-rank adapter
    metadata: RankMetadata
    warm: set[int] = field(default_factory=set)  # ranks handed to vLLM (all of them once the full adapter is)


class Fingerprint:
    """What a directory's files were when kdlora wrote them; `holds()` says whether they still are."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.files = {p.name: (_stat(p), _sha256(p)) for p in sorted(self.directory.iterdir()) if p.is_file()}

    def holds(self) -> bool:
        for name, (stat, digest) in self.files.items():
            path = self.directory / name
            try:
                now = _stat(path)
            except OSError:
                return False
            if now != stat:  # touched: only the content decides
                if now[0] != stat[0] or _sha256(path) != digest:
                    return False
                self.files[name] = (now, digest)
        return True


def _stat(path: Path) -> tuple[int, int]:
    info = path.stat()
    return info.st_size, info.st_mtime_ns


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_dead_servers(root: Path) -> None:
    """Delete the adapter copies of servers that are gone (folders `<name>-<pid>`, see `_pull`)."""
    for folder in root.glob("*-*"):
        remove_if_dead(folder, folder.name.rsplit("-", 1)[1])


class AdapterStore:
    def __init__(
        self, aliases: dict[str, str], allow: list[str], base_ids: list[str], root: Path, endpoint: str | None = None
    ):
        self.aliases, self.allow, self.base_ids, self.root, self.endpoint = aliases, allow, base_ids, root, endpoint
        # every rank from the full adapter, one vLLM LoRA (set at start where lora_slots.rank_aware), else truncations
        self.one_lora_per_adapter = False
        self.costs = CostTracker()
        self._loaded: dict[str, Loaded] = {}
        self._described: dict[str, RankMetadata] = {}  # metadata read without weights, for listings
        self._fingerprints: dict[Path, Fingerprint] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()  # guards the dicts above and every Loaded.warm
        atexit.register(self.remove_copies)

    @classmethod
    def from_env(cls) -> "AdapterStore":
        try:
            aliases = json.loads(os.environ.get(ENV_ADAPTERS) or "{}")
        except json.JSONDecodeError as err:
            raise KdloraError(
                f'{ENV_ADAPTERS} is not JSON ({err.msg}); expected {{"alias": "ORG/NAME or /path"}}'
            ) from err
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
            raise RequestError(
                f"adapter '{name}': paths are not adapter names; use a configured alias or ORG/NAME", param="model"
            )
        try:
            parse_repo(name, allow_local=False)
        except KdloraError as err:
            raise RequestError(str(err), param="model") from err
        if not self._allowed(name):
            raise RequestError(
                f"adapter '{name}' is not on this server's allow-list ({', '.join(self.allow) or 'empty'})",
                403,
                "model",
            )
        return name

    def _lock(self, name: str) -> threading.Lock:
        with self._guard:
            return self._locks.setdefault(name, threading.Lock())

    def load(self, name: str, served_model: str | None = None) -> Loaded:
        """The validated adapter for `name`, pulled and checked against the served base on first use."""
        with self._guard:
            loaded = self._loaded.get(name)
        if loaded is not None:
            return loaded
        with self._lock(name):  # one pull per adapter, however many requests wait for it
            with self._guard:
                loaded = self._loaded.get(name)
            if loaded is None:
                loaded = self._pull(name, served_model)
                with self._guard:
                    self._loaded[name] = loaded
        return loaded

    def _pull(self, name: str, served_model: str | None) -> Loaded:
        spec = self.spec_for(name)
        started = time.perf_counter()
        directory = self.root / f"{_safe(name)}-{os.getpid()}" / "full"  # per server process: no two writers
        shutil.rmtree(directory, ignore_errors=True)  # what an earlier failed pull may have left
        try:
            pull_adapter(spec, directory, endpoint=self.endpoint)
            adapter = read_adapter(directory)
            self._check_base(name, adapter.metadata, served_model)
        except BaseException as err:
            shutil.rmtree(directory.parent, ignore_errors=True)  # a refused adapter leaves nothing on disk
            if isinstance(err, KdloraError) and not isinstance(err, RequestError):
                status = 404 if isinstance(err, NotFoundError) else 400
                raise RequestError(f"adapter '{name}' cannot be served: {err}", status, "model") from err
            raise
        self._fingerprints[directory] = Fingerprint(directory)
        metrics.PULLS.labels(adapter=name).inc()
        metrics.PREPARE_SECONDS.labels(step="pull").observe(time.perf_counter() - started)
        return Loaded(spec, directory, adapter.metadata)

    def _check_base(self, name: str, meta: RankMetadata, served_model: str | None) -> None:
        served = [m for m in [served_model, *self.base_ids] if m]
        if served and not any(_same_model(meta.base_model.id, model) for model in served):
            raise RequestError(
                f"adapter '{name}' was trained on base model '{meta.base_model.id}', but this server serves "
                f"'{served[0]}'; serve it with its own base (kdlora serve --adapter {name})",
                400,
                "model",
            )

    def lora_dir(self, name: str, rank: int, served_model: str | None = None) -> Path:
        """The directory vLLM loads for rank `rank` of `name`, checked intact (re-made or pulled again when it is not):
        the full-rank adapter where every rank is served from one LoRA (`one_lora_per_adapter`), else the truncation."""
        loaded = self.load(name, served_model)
        loaded.metadata.check_rank(rank)
        with self._lock(name):
            self._keep_pulled_copy(name, loaded)
            if self.one_lora_per_adapter:
                out, warm = loaded.directory, range(1, loaded.metadata.max_rank + 1)
            else:
                out, warm = loaded.directory.parent / f"r{rank}", (rank,)
                fingerprint = self._fingerprints.get(out)
                if fingerprint is None or not fingerprint.holds():
                    if fingerprint is not None:
                        log.warning(
                            "kdlora: %s on disk changed since it was written; re-making it from the pulled adapter", out
                        )
                    self._truncate(name, loaded, rank, out)
        with self._guard:
            loaded.warm.update(warm)
        return out

    def _keep_pulled_copy(self, name: str, loaded: Loaded) -> None:
        if self._fingerprints[loaded.directory].holds():
            return
        log.warning("kdlora: the pulled copy of %s changed on disk; pulling it again", name)
        shutil.rmtree(loaded.directory, ignore_errors=True)
        try:
            pull_adapter(loaded.spec, loaded.directory, endpoint=self.endpoint)
        except KdloraError as err:
            raise RequestError(
                f"adapter '{name}': its files on this server were damaged and pulling it again failed: {err}",
                503,
                "model",
            ) from err
        self._fingerprints[loaded.directory] = Fingerprint(loaded.directory)

    def _truncate(self, name: str, loaded: Loaded, rank: int, out: Path) -> None:
        started = time.perf_counter()
        shutil.rmtree(out, ignore_errors=True)
        truncate_adapter(loaded.directory, rank, out)
        self._fingerprints[out] = Fingerprint(out)
        metrics.TRUNCATIONS.labels(adapter=name).inc()
        metrics.PREPARE_SECONDS.labels(step="truncate").observe(time.perf_counter() - started)

    def describe(self, name: str) -> RankMetadata | None:
        """An adapter's metadata for listings: from its pulled copy, else read once without weights; None if unreadable."""
        with self._guard:
            loaded, described = self._loaded.get(name), self._described.get(name)
        if loaded is not None or described is not None:
            return loaded.metadata if loaded is not None else described
        try:
            meta = read_remote_metadata(self.spec_for(name), endpoint=self.endpoint)[0]
        except KdloraError as err:
            log.warning("kdlora: cannot list %s: %s", name, err)
            return None
        with self._guard:
            self._described[name] = meta
        return meta

    def listing(self) -> list[dict]:
        """Discovery: every configured or loaded adapter, its ranks, quality, bytes and warm ranks."""
        with self._guard:  # resolver threads add adapters and warm ranks while this runs on the event loop
            snapshot = {name: (loaded, set(loaded.warm)) for name, loaded in self._loaded.items()}
        rows = []
        for name in sorted(set(self.aliases) | set(snapshot)):
            loaded, warm = snapshot.get(name, (None, set()))
            row = {"id": name, "source": self.aliases.get(name, name), "loaded": loaded is not None}
            if loaded:
                measured = self.costs.measured(name)
                meta = loaded.metadata
                row |= {
                    "base_model": meta.base_model.id,
                    "max_rank": meta.max_rank,
                    "default_rank": meta.default_rank,
                    "ranks": [
                        {
                            "rank": r.rank,
                            "kl_to_teacher": r.kl_to_teacher,
                            "teacher_top1_agreement": r.teacher_top1_agreement,
                            "task_metrics": r.task_metrics,
                            "adapter_bytes": r.adapter_bytes,
                            "warm": r.rank in warm,
                            "measured_ms_per_token": measured.get(r.rank),
                        }
                        for r in meta.ranks
                    ],
                    "warm_ranks": sorted(warm),
                }
            rows.append(row)
        return rows

    def remove_copies(self) -> None:
        """Delete this server's adapter copies (at exit; a killed server's are removed by the next one)."""
        for folder in self.root.glob(f"*-{os.getpid()}"):
            shutil.rmtree(folder, ignore_errors=True)


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
