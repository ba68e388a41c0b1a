"""Decode step time as a function of what is in the batch, fitted online on the server itself.

One engine step decodes one token for every running request, so a latency budget (ms per generated token) is a
property of the batch: a rank-64 request beside a rank-1 one makes both decode at the batch's cost. This model
predicts a step's ms from the batch's composition:

    ms = a + b * requests + c * lora_work + d * prefill_tokens

where lora_work is the LoRA compute the server's path does for that batch, in (token x rank) units: kdlora's CPU
path computes every token of an adapter's group at the largest rank present in it (sum over adapters of requests x
largest rank: budget_bench found a rank-64 request beside others costs ~0.05 ms per request per rank unit on 2 cores,
while alone any rank costs the same); kdlora's CUDA kernels read each token's own rank (sum of ranks); vLLM's stock
ops pad every LoRA request to --max-lora-rank. prefill_tokens: the prompt tokens the engine computed in the same
step (vLLM schedules new prompts beside running decodes, which wait for them); a budget's own steady decode is
priced with none.

Its data come through vLLM's own stats path: `step_logger.StepLogger`, a stat-logger plugin (entry point
`vllm.stat_logger_plugins`), receives every engine iteration's scheduler stats and iteration stats (inter-token
latencies, timed in the engine core: what each decoding request waited for this step's token). `kdlora serve`
turns on vLLM's per-iteration details (`--enable-logging-iteration-details`), the engine's own record of the step:
how many requests it computed a token for (those that finished in it included) and how many prompt tokens it
prefilled beside them. Without them (another launcher, an older vLLM) the batch is what the scheduler still runs
after the step, and steps that finished a prompt are left out (their prefill is unknown). LoRA names come from the
running requests per LoRA name (kdlora names carry the rank, kdlora_serve.rank). It runs in the API-server process,
where the middleware asks the same `STEPS` model. Refitted by least squares over the last WINDOW steps.
"""

import threading
from collections import Counter, deque

import numpy as np

from kdlora_serve import rank as rank_protocol
from kdlora_serve.api import metrics

TERMS = ("base", "requests", "lora_work", "prefill_tokens")
RECENT = 32  # the last steps /v1/kdlora/steps shows, to check the fit against


def lora_work(running: Counter, path: str, max_lora_rank: int) -> float:
    """The batch's LoRA work in (token x rank) units. running: LoRA name (None: base model) -> requests."""
    largest: dict[str, int] = {}
    requests: Counter = Counter()
    total = 0
    for name, count in running.items():
        if name is None or count <= 0:
            continue
        adapter, rank = rank_protocol.kdlora_name(name)
        adapter, rank = (adapter or name), (rank or max_lora_rank)
        if path == "stock":
            total += count * max_lora_rank
        elif path == "per-token":
            total += count * rank
        largest[adapter] = max(largest.get(adapter, 0), rank)
        requests[adapter] += count
    return float(sum(requests[a] * k for a, k in largest.items()) if path == "grouped" else total)


class StepModel:
    """ms per engine step = features(batch) @ coefficients, the slopes kept >= 0 (a bigger batch never costs less)."""

    WINDOW = 2048
    MIN_STEPS = 16  # fewer observed steps: no estimate (the policy then checks nothing it cannot predict)
    RIDGE = 1e-6  # per step: keeps what the trace cannot tell apart (e.g. one rank only) at 0, biases nothing else

    def __init__(self, path: str = "grouped", max_lora_rank: int = 64):
        self.path, self.max_lora_rank = path, max_lora_rank
        self._steps: deque = deque(maxlen=self.WINDOW)  # (features, ms)
        self._coefficients: np.ndarray | None = None
        self._dirty = False
        self._lock = threading.Lock()

    def configure(self, path: str, max_lora_rank: int) -> None:
        """The server's LoRA path and --max-lora-rank (known once the engine is up); drops what was observed."""
        with self._lock:
            self.path, self.max_lora_rank = path, max_lora_rank
            self._steps.clear()
            self._coefficients, self._dirty = None, False

    def features(self, running: Counter, prefill_tokens: int = 0) -> np.ndarray:
        requests = sum(count for count in running.values() if count > 0)
        return np.array([1.0, requests, lora_work(running, self.path, self.max_lora_rank), prefill_tokens])

    def observe(self, running: Counter, step_ms: float, prefill_tokens: int = 0) -> None:
        with self._lock:
            self._steps.append((self.features(running, prefill_tokens), step_ms))
            self._dirty = True

    def coefficients(self) -> np.ndarray | None:
        with self._lock:
            if self._dirty and len(self._steps) >= self.MIN_STEPS:
                self._coefficients = self._fit(self._steps)
                for term, value in zip(TERMS, self._coefficients):
                    metrics.STEP_MODEL.labels(term=term).set(value)
                self._dirty = False
            return self._coefficients

    @classmethod
    def _fit(cls, steps) -> np.ndarray:
        features = np.stack([f for f, _ in steps])
        ms = np.array([m for _, m in steps])
        ridge = cls.RIDGE * np.diag([0.0, *[1.0] * (len(TERMS) - 1)]) * len(steps)  # not on the intercept
        coefficients = np.linalg.solve(features.T @ features + ridge, features.T @ ms)
        coefficients[1:] = np.maximum(coefficients[1:], 0.0)  # noise must not make a bigger batch look cheaper
        return coefficients

    def prefill_ms_per_token(self) -> float:
        """What one prompt token prefilled in a step adds to it, i.e. to every request decoding in it (0: no fit)."""
        coefficients = self.coefficients()
        return 0.0 if coefficients is None else float(coefficients[TERMS.index("prefill_tokens")])

    def predict(self, running: Counter) -> float | None:
        """ms of a decode step of this batch (no prompt prefilled beside it)."""
        coefficients = self.coefficients()
        if coefficients is None:
            return None
        return float(self.features(running) @ coefficients)

    def describe(self) -> dict:
        """For /v1/kdlora/steps: the path, the terms, the fit and the steps it was fitted on."""
        coefficients = self.coefficients()
        with self._lock:
            observed = len(self._steps)
        fit = None if coefficients is None else dict(zip(TERMS, map(float, coefficients)))
        with self._lock:
            recent = [(f.tolist(), ms) for f, ms in list(self._steps)[-RECENT:]]
        return {
            "path": self.path,
            "max_lora_rank": self.max_lora_rank,
            "steps": observed,
            "ms_per_step": fit,
            "recent": [dict(zip(TERMS[1:], f[1:])) | {"ms": ms} for f, ms in recent],
        }


STEPS = StepModel()  # the API-server process's model: fed by StepLogger, asked by the middleware


def observe_iteration(model: StepModel, scheduler_stats, iteration_stats) -> None:
    """One engine iteration from vLLM's stats: the batch it ran and the median inter-token latency of the requests
    that got a (non-first) token, i.e. what this step cost each of them (see the module docstring)."""
    if scheduler_stats is None or iteration_stats is None or not iteration_stats.inter_token_latencies_iter:
        return
    details = getattr(scheduler_stats, "iteration_details", None)  # vLLM >= 0.32, when turned on
    if details is not None:
        if details.is_dummy:
            return
        requests, prefill_tokens = details.num_ctx_requests + details.num_generation_requests, details.num_ctx_tokens
    elif iteration_stats.num_prompt_tokens:
        return  # a prompt finished in this step, of a size the stats do not say (chunked prefill, cached prefixes)
    else:
        requests, prefill_tokens = scheduler_stats.num_running_reqs, 0
    running = Counter(scheduler_stats.running_lora_adapters)  # after the step: finished LoRA requests count as base
    running[None] = max(0, requests - sum(running.values()))
    if not any(count > 0 for count in running.values()):
        return  # without details, the last step of a batch: its requests already counted as finished
    step_ms = 1000 * float(np.median(iteration_stats.inter_token_latencies_iter))
    model.observe(running, step_ms, prefill_tokens)
