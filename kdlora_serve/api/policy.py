"""Budget -> rank: the largest evaluated rank that meets every constraint of a request (with only a quality
floor: the smallest rank that meets it).

Inputs: the adapter's metadata (per-rank quality and bytes, hub.schema) and the load (`Load`): the requests in
flight by LoRA name, the latency bounds they were admitted under, and this server's step-time model
(kdlora_serve.api.steps), which predicts a decode step's ms for the batch with this request added at each rank. A
latency budget is the batch's: when kdlora picks the rank, the predicted step must stay within the request's own
bound AND within every in-flight request's, so a loose request arriving beside a tight one gets a lower rank than
it would alone. No budget: the adapter's default rank. Nothing fits: `on_miss` says what happens (the cheapest rank,
flagged; a 429; or a wait at the door: kdlora_serve.api.middleware).
"""

import threading
from collections import Counter
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hub.errors import KdloraError
from hub.schema import RankMetadata
from kdlora_serve.api.steps import StepModel
from kdlora_serve.errors import RequestError
from kdlora_serve.rank import is_rank_digits, model_name

DEFAULT_QUALITY_METRIC = "teacher_top1_agreement"
HOW_FIELDS = ("on_miss", "max_wait_ms", "elastic")


class Budget(BaseModel):
    """What a request may spend; from `extra_body={"kdlora": {...}}` or `x-kdlora-*` headers.
    Strict types: `true` is no rank and "8" no number in JSON (headers are converted by `parse_budget`)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    rank: int | None = Field(None, ge=1, description="exactly this rank")
    max_rank: int | None = Field(None, ge=1)
    latency_ms_per_token: float | None = Field(None, gt=0, description="measured decode latency bound")
    memory_mb: float | None = Field(None, gt=0, description="adapter weights bound, MiB")
    min_quality: float | None = Field(None, ge=0, le=1, description="minimum held-out quality, by `quality_metric`")
    quality_metric: str | None = Field(
        None,
        max_length=64,
        description=f"what min_quality bounds (default {DEFAULT_QUALITY_METRIC}; or a task metric the adapter records)",
    )

    on_miss: Literal["serve", "reject", "wait"] | None = Field(
        None,
        description="when no rank meets the budget now: serve the cheapest rank, flagged (default); reject: 429 at "
        "once with Retry-After; wait: hold the request until the batch can take it (at most max_wait_ms), then 429",
    )
    max_wait_ms: float | None = Field(
        None, gt=0, le=600_000, description="on_miss wait: the longest hold (default 10 s)"
    )
    elastic: bool | None = Field(
        None,
        description="the server may lower this request's rank while it decodes, to keep in-flight latency budgets "
        "(never below a rank its other bounds refuse); the response says which rank served which tokens",
    )

    def constrained(self) -> bool:
        """Whether it bounds anything the rank decides (on_miss, max_wait_ms and elastic say what to do, not what to
        bound)."""
        return any(v is not None for k, v in self.model_dump().items() if k not in HOW_FIELDS)

    def bounds_cost(self) -> bool:
        return any(v is not None for v in (self.max_rank, self.latency_ms_per_token, self.memory_mb))


def parse_budget(from_body: dict, from_headers: dict[str, str]) -> Budget:
    """The budget of a request: the body's `kdlora` object, plus `x-kdlora-*` headers (the body wins)."""
    raw = {name: _header_value(name, value) for name, value in from_headers.items()} | from_body
    try:
        return Budget.model_validate(raw)
    except ValidationError as err:
        first = err.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        source = (
            f"x-kdlora-{field.replace('_', '-')} header"
            if field in from_headers and field not in from_body
            else "extra_body kdlora"
        )
        raise RequestError(f"budget field '{field}' ({source}): {first['msg']}", param=f"kdlora.{field}") from err


def _header_value(name: str, text: str):
    """A header's text as the number its field takes; left as text (and refused by validation) if it is none."""
    field = Budget.model_fields.get(name)
    if field is None:
        return text
    if field.annotation == int | None:
        return int(text) if is_rank_digits(text) else text
    if field.annotation == str | None:
        return text
    if field.annotation == bool | None:
        return {"true": True, "false": False}.get(text.lower(), text)
    try:
        return float(text) if text.isascii() else text
    except ValueError:
        return text


@dataclass
class Choice:
    rank: int
    met: bool
    reason: str  # why the rank was chosen, or which constraint failed
    estimate_ms: float | None = None  # predicted ms per step with this request in the batch at `rank`


@dataclass
class Load:
    """What is in flight when a request arrives: running requests per LoRA name (None: the base model), the latency
    bounds (ms per token) they were admitted within, and the step-time model that prices a batch."""

    running: Counter = field(default_factory=Counter)
    bounds: tuple[float, ...] = ()
    steps: StepModel | None = None

    def estimate(self, adapter: str, rank: int) -> float | None:
        """Predicted ms per step once this request runs at `rank` beside what is in flight (None: no fit yet)."""
        if self.steps is None:
            return None
        return self.steps.predict(self.running + Counter({model_name(adapter, rank): 1}))

    @property
    def requests(self) -> int:
        return sum(self.running.values()) + 1  # this one included


class CostTracker:
    """Mean decode ms per generated token per adapter and rank, as the middleware measured finished requests (what
    /v1/kdlora/adapters lists). The first request of each (adapter, rank) is left out: it paid the rank's load."""

    def __init__(self):
        self._sums: dict[tuple[str, int], tuple[float, int]] = {}
        self._seen: set[tuple[str, int]] = set()
        self._lock = threading.Lock()

    def record(self, adapter: str, rank: int, ms_per_token: float) -> None:
        with self._lock:
            if (adapter, rank) not in self._seen:
                self._seen.add((adapter, rank))
                return
            total, count = self._sums.get((adapter, rank), (0.0, 0))
            self._sums[(adapter, rank)] = (total + ms_per_token, count + 1)

    def measured(self, adapter: str) -> dict[int, float]:
        with self._lock:
            return {rank: total / count for (name, rank), (total, count) in self._sums.items() if name == adapter}


def choose_rank(
    meta: RankMetadata,
    budget: Budget,
    adapter: str,
    load: Load | None = None,
    requested: int | None = None,
) -> Choice:
    """The rank for a request. Where kdlora picks it (a budget, no explicit rank), it also keeps every in-flight
    request's latency bound; an explicit rank is served as asked, checked against the request's own budget only."""
    load = load or Load()
    if budget.quality_metric is not None:
        recorded = sorted({name for result in meta.ranks for name in result.quality_metrics()})
        if budget.quality_metric not in recorded:
            raise RequestError(
                f"quality_metric '{budget.quality_metric}': adapter '{adapter}' records "
                f"{', '.join(recorded) or 'no quality metric'}",
                param="kdlora.quality_metric",
            )
    if requested is not None or budget.rank is not None:
        rank = requested if requested is not None else budget.rank
        if budget.elastic:
            raise RequestError(
                f"'elastic' lets kdlora lower the rank while the request runs; '{model_name(adapter, rank)}' asks for "
                "exactly one rank: drop one, or bound it with max_rank instead",
                param="kdlora.elastic",
            )
        if requested is not None and budget.rank is not None and budget.rank != requested:
            raise RequestError(
                f"model names rank {requested} but the budget asks for rank {budget.rank}; give one", param="model"
            )
        try:
            meta.check_rank(rank)
        except KdloraError as err:
            raise RequestError(f"'{model_name(adapter, rank)}': {err}", param="model") from err
        failed = _failed(meta, budget, adapter, load, rank, keep_batch=False)
        return Choice(rank, not failed, failed or "rank requested", load.estimate(adapter, rank))
    if not budget.constrained():
        return Choice(meta.default_rank, True, "default rank", load.estimate(adapter, meta.default_rank))
    candidates = sorted({r.rank for r in meta.ranks} | {meta.max_rank})
    fitting = [k for k in candidates if not _failed(meta, budget, adapter, load, k, keep_batch=True)]
    if fitting and budget.bounds_cost():
        best = max(fitting)
        return Choice(best, True, "largest rank within budget", load.estimate(adapter, best))
    if fitting:  # a quality floor and nothing else: more rank would cost more and buy nothing asked for
        return Choice(min(fitting), True, "smallest rank meeting min_quality", load.estimate(adapter, min(fitting)))
    cheapest = candidates[0]
    reason = _failed(meta, budget, adapter, load, cheapest, keep_batch=True)
    return Choice(cheapest, False, reason, load.estimate(adapter, cheapest))


def lower_ranks(meta: RankMetadata, budget: Budget, adapter: str, chosen: int) -> tuple[int, ...]:
    """The evaluated ranks below `chosen` an elastic request may be lowered to, highest first: those its budget's
    other bounds (min_quality, memory_mb, max_rank) allow; latency is the batch's to decide."""
    unbounded = budget.model_copy(update={"latency_ms_per_token": None})
    candidates = sorted({r.rank for r in meta.ranks} | {meta.max_rank}, reverse=True)
    return tuple(k for k in candidates if k < chosen and not _failed(meta, unbounded, adapter, Load(), k, False))


def _failed(meta: RankMetadata, budget: Budget, adapter: str, load: Load, rank: int, keep_batch: bool) -> str:
    """'' when `rank` meets the budget (and, with keep_batch, every in-flight bound), else the first constraint broken."""
    result = meta.result(rank)
    if budget.max_rank is not None and rank > budget.max_rank:
        return f"max_rank {budget.max_rank}"
    if budget.memory_mb is not None:
        if result is None or result.adapter_bytes is None or result.adapter_bytes / 2**20 > budget.memory_mb:
            return f"memory_mb {budget.memory_mb}"
    if budget.min_quality is not None:
        value = (
            None if result is None else result.quality_metrics().get(budget.quality_metric or DEFAULT_QUALITY_METRIC)
        )
        if value is None or value < budget.min_quality:
            return f"min_quality {budget.min_quality}" + (
                f" ({budget.quality_metric})" if budget.quality_metric else ""
            )
    own, others = budget.latency_ms_per_token, (min(load.bounds) if keep_batch and load.bounds else None)
    if own is None and others is None:
        return ""
    estimate = load.estimate(adapter, rank)
    if estimate is None:
        return ""  # nothing measured yet: nothing to hold the rank to
    at = f"(estimated {estimate:.1f} ms per token with {load.requests} in flight)"
    if own is not None and estimate > own:
        return f"latency_ms_per_token {own} {at}"
    if others is not None and estimate > others:
        return f"an in-flight request's latency_ms_per_token {others} {at}"
    return ""
