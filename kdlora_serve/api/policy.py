"""Budget -> rank: the largest evaluated rank that meets every constraint of a request (with only a quality
floor: the smallest rank that meets it).

Inputs: the adapter's metadata (per-rank quality and bytes, hub.schema) and this server's own measured
decode cost per rank and load (`CostTracker`, fed by the middleware from finished requests, asked at the
number of requests in flight now: measured, not assumed). No budget: the adapter's default rank. Nothing fits: the cheapest rank, flagged as a miss.
"""

import threading
from collections import deque
from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hub.errors import KdloraError
from hub.schema import RankMetadata
from kdlora_serve.errors import RequestError
from kdlora_serve.rank import is_rank_digits, model_name

DEFAULT_QUALITY_METRIC = "teacher_top1_agreement"


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

    def constrained(self) -> bool:
        return any(v is not None for v in self.model_dump().values())

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
    try:
        return float(text) if text.isascii() else text
    except ValueError:
        return text


@dataclass
class Choice:
    rank: int
    met: bool
    reason: str  # why the rank was chosen, or which constraint failed


class CostTracker:
    """Decode ms per generated token on this server, per adapter, as a function of the rank r and of the requests in
    flight n (the load): ms = a + b r + (c + d r) n, least squares over the last WINDOW requests of that adapter (a
    small ridge term keeps what the requests cannot tell apart, e.g. the slope in r while one rank was served, at 0).
    The first request of each (adapter, rank) is left out: it paid that rank's load (cold), not decode. An estimate
    never falls below that of a measured lower rank at the same load (cost grows with rank); nothing measured: None."""

    WINDOW = 512
    RIDGE = 1e-3

    def __init__(self):
        self._requests: dict[str, deque] = {}  # adapter -> (rank, in flight, ms per token)
        self._seen: set[tuple[str, int]] = set()
        self._fits: dict[str, tuple] = {}  # adapter -> (coefficients, measured ranks), refitted after each request
        self._lock = threading.Lock()

    def record(self, adapter: str, rank: int, ms_per_token: float, in_flight: int = 1) -> None:
        with self._lock:
            if (adapter, rank) not in self._seen:
                self._seen.add((adapter, rank))
                return
            requests = self._requests.setdefault(adapter, deque(maxlen=self.WINDOW))
            requests.append((rank, in_flight, ms_per_token))
            self._fits[adapter] = (self._fit(requests), sorted({r for r, _, _ in requests}))

    @classmethod
    def _fit(cls, requests) -> np.ndarray:
        data = np.array(requests, dtype=np.float64)
        features, ms = cls._features(data[:, 0], data[:, 1]), data[:, 2]
        ridge = cls.RIDGE * np.diag([0.0, 1.0, 1.0, 1.0])  # not on the intercept
        return np.linalg.solve(features.T @ features + ridge, features.T @ ms)

    @staticmethod
    def _features(rank, in_flight) -> np.ndarray:
        rank, in_flight = np.broadcast_arrays(
            np.asarray(rank, dtype=np.float64), np.asarray(in_flight, dtype=np.float64)
        )
        return np.stack([np.ones_like(rank), rank, in_flight, rank * in_flight], axis=-1)

    def measured(self, adapter: str) -> dict[int, float]:
        """Mean warm ms per token per rank, whatever the load (what /v1/models lists)."""
        with self._lock:
            by_rank: dict[int, list[float]] = {}
            for rank, _, ms in self._requests.get(adapter, ()):
                by_rank.setdefault(rank, []).append(ms)
        return {rank: sum(values) / len(values) for rank, values in by_rank.items()}

    def estimate(self, adapter: str, rank: int, in_flight: int = 1) -> float | None:
        with self._lock:
            fit = self._fits.get(adapter)
        if fit is None:
            return None
        coefficients, measured = fit
        ranks = [r for r in measured if r <= rank] + [rank]
        if len(ranks) == 1 and rank < measured[0]:
            return None  # below every measured rank: nothing to say
        return float((self._features(ranks, in_flight) @ coefficients).max())


def choose_rank(
    meta: RankMetadata,
    budget: Budget,
    adapter: str,
    costs: CostTracker,
    requested: int | None = None,
    in_flight: int = 1,
) -> Choice:
    """`in_flight`: the generation requests this server is serving now, this one included (the load the cost is at)."""
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
        if requested is not None and budget.rank is not None and budget.rank != requested:
            raise RequestError(
                f"model names rank {requested} but the budget asks for rank {budget.rank}; give one", param="model"
            )
        try:
            meta.check_rank(rank)
        except KdloraError as err:
            raise RequestError(f"'{model_name(adapter, rank)}': {err}", param="model") from err
        failed = _failed(meta, budget, adapter, costs, rank, in_flight)
        return Choice(rank, not failed, failed or "rank requested")
    if not budget.constrained():
        return Choice(meta.default_rank, True, "default rank")
    candidates = sorted({r.rank for r in meta.ranks} | {meta.max_rank})
    fitting = [k for k in candidates if not _failed(meta, budget, adapter, costs, k, in_flight)]
    if fitting and budget.bounds_cost():
        return Choice(max(fitting), True, "largest rank within budget")
    if fitting:  # a quality floor and nothing else: more rank would cost more and buy nothing asked for
        return Choice(min(fitting), True, "smallest rank meeting min_quality")
    cheapest = candidates[0]
    return Choice(cheapest, False, _failed(meta, budget, adapter, costs, cheapest, in_flight))


def _failed(meta: RankMetadata, budget: Budget, adapter: str, costs: CostTracker, rank: int, in_flight: int) -> str:
    """'' when `rank` meets the budget, else the first constraint it breaks."""
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
    if budget.latency_ms_per_token is not None:
        estimate = costs.estimate(adapter, rank, in_flight)
        if estimate is not None and estimate > budget.latency_ms_per_token:
            return f"latency_ms_per_token {budget.latency_ms_per_token} (estimated {estimate:.1f} at {in_flight} in flight)"
    return ""
