"""Nested-rank (DyLoRA / QDyLoRA) forward on top of PEFT's LoRA layers.

PEFT injects an ordinary rank-R LoRA (also onto bitsandbytes 4-bit layers); `NestedRank.set(b)` then
makes every LoRA layer compute `B[:, :b] @ A[:b] x * alpha / b` (alpha / sqrt(b) for an rsLoRA config)
with the first b rows of A and columns of B (its `lora_A` and `lora_B` forwards slice them) and PEFT's per-layer
scaling. So rank b costs rank b's products, not rank R's: until 2026-12-04 the components >= b were computed and
masked to zero, the same numbers (bit for bit) for more work (benchmarks/nested_rank_bench.py). The unused
components get exactly zero gradient, so a step at rank b trains only what rank b uses, and the adapter saved at
rank R truncates (hub.adapter) to exactly what training computed at rank b. `set(0)` switches the adapter off.

`set((b1, b2, ...))`, for training only, computes the mean of those ranks' LoRA outputs in one pass
(MatryoshkaLoRA, arXiv 2605.07850): component i weighted by p_i = the mean over the ranks of their
scale where they use i (b > i) and 0 where they do not, a fixed diagonal between A and B. Every
component gets gradient at every step, in proportion to how many of the ranks use it. A served rank
has its own scale only: the diagonal exists in training, so the exported format does not change.

`set_copies((b1, b2, ...), rows)`, for training only, computes several ranks in one forward: the batch is repeated
once per rank (`rows` rows each, in that order) and each copy's components are weighted, row by row, by its own
rank's mask and scale. Copy k's outputs and gradients are rank b_k's, as from `set(b_k)` (fp32: equal to rounding),
for one forward of 3x the rows instead of three, and 3x the activations. It computes every copy's components up to
the largest rank, for fewer, larger products: the quickstart's sandwich step 1.31x faster in bf16 on 2 CPU cores
with AMX, 1.10x without, no faster in fp32 (benchmarks/sandwich_batch_bench.py; each copy at its own width was slower
in bf16, 1.08x).
"""

from functools import partial

import torch

from training import distill_config


class NestedRank:
    def __init__(self, peft_model, adapter: str = "default"):
        from peft.tuners.lora import LoraLayer

        self.adapter = adapter
        self.layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer) and adapter in m.lora_A]
        if not self.layers:
            raise ValueError(f"no LoRA layers with adapter '{adapter}' in the model")
        self.max_rank = max(layer.r[adapter] for layer in self.layers)
        self.rslora = bool(peft_model.peft_config[adapter].use_rslora)  # PEFT's and vLLM's scale: alpha / sqrt(r)
        self.rank = self.max_rank
        # per-component weights, by layer width: [R] for a Matryoshka mixture, [rows, 1, R] per row for set_copies
        self._weights: dict[int, torch.Tensor] = {}
        for layer in self.layers:
            # PEFT casts a LoRA layer's input to the LoRA weights' dtype unless autocast is on, and it asks CUDA's
            # autocast only: under CPU bf16 autocast each input went bf16 -> fp32 -> bf16 (equal values, two copies
            # of an activation per layer). `_down` casts where autocast does not.
            layer.cast_input_dtype_enabled = False
            down, up = layer.lora_A[adapter], layer.lora_B[adapter]
            down.forward, up.forward = partial(self._down, down), partial(self._up, up)

    def _down(self, lora_a: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """`lora_A` at the current rank: the first `rank` rows of A (times a mixture's or the copies' weights)."""
        weight = lora_a.weight[: self.rank]
        if not torch.is_autocast_enabled(x.device.type):
            x = x.to(weight.dtype)
        out = torch.nn.functional.linear(x, weight)
        if self._weights:
            # the weights stay fp32, so a bf16 product is rounded once, as PEFT's `* scaling` (a Python float) is
            weights = self._weights[lora_a.out_features][..., : out.shape[-1]].to(out.device)
            out = (out * weights).to(out.dtype)
        return out

    @staticmethod
    def _up(lora_b: torch.nn.Linear, h: torch.Tensor) -> torch.Tensor:
        """`lora_B` on `_down`'s output: the first as many columns of B."""
        return torch.nn.functional.linear(h, lora_b.weight[:, : h.shape[-1]], lora_b.bias)

    def set(self, rank: int | tuple[int, ...]) -> None:
        """Make the whole model compute at nested rank `rank` (0 <= rank <= max_rank), or the mean of a tuple of ranks."""
        ranks = rank if isinstance(rank, tuple) else (rank,)
        self._check(ranks, rank)
        self.rank, self._weights = max(ranks), {}
        for layer in self.layers:
            alpha, width = layer.lora_alpha[self.adapter], layer.r[self.adapter]
            if isinstance(rank, tuple):
                if width not in self._weights:  # per width, not per layer: alpha stays in PEFT's scaling
                    cuts = torch.tensor([min(r, width) for r in ranks], dtype=torch.float32)
                    self._weights[width] = ((torch.arange(width)[:, None] < cuts) * self._scale(1.0, cuts)).mean(dim=1)
                layer.scaling[self.adapter] = alpha  # times the weights: each rank's own alpha / b (or / sqrt(b))
            else:
                layer.scaling[self.adapter] = self._scale(alpha, max(min(rank, width), 1))  # DyLoRA: alpha / b

    def set_copies(self, ranks: tuple[int, ...], rows: int) -> None:
        """Make copy k of a batch repeated len(ranks) times (`rows` rows each) compute at rank ranks[k], in one
        forward (training only: the components a copy does not use are computed, then weighted 0). One rank: set."""
        if len(ranks) == 1:
            return self.set(ranks[0])
        self._check(ranks, ranks)
        self.rank, self._weights = max(ranks), {}
        for layer in self.layers:
            width = layer.r[self.adapter]
            if width not in self._weights:  # per width, not per layer: alpha stays in PEFT's scaling
                cuts = torch.tensor([min(r, width) for r in ranks]).repeat_interleave(rows)[:, None]
                self._weights[width] = ((torch.arange(width) < cuts) * self._scale(1.0, cuts.float()))[:, None, :]
            layer.scaling[self.adapter] = layer.lora_alpha[self.adapter]  # times the weights: alpha / b (or sqrt(b))

    def _check(self, ranks: tuple[int, ...], asked) -> None:
        if not ranks or not all(0 <= r <= self.max_rank for r in ranks) or (len(ranks) > 1 and 0 in ranks):
            raise ValueError(f"rank {asked} is outside 0..{self.max_rank}")

    def loss_weights(self, ranks: list, weighting: str = "scale") -> list[float]:
        """The weights (summing to 1) of a step's per-rank losses. `equal`: their mean. `scale`: each in proportion to
        the inverse of its rank's scale (sqrt(b) under rsLoRA, b under alpha/b). A component that ranks 1 and R
        share gets from rank b's loss a gradient times b's scale, so under the mean rank 1's loss (scale alpha,
        R's alpha / sqrt(R)) sets the shared components for every rank; weighted by 1 / scale each rank pulls them
        as hard as the others (BBC task, R = 64, sandwich: every rank's accuracy rose, benchmarks/RESULTS.md)."""
        if weighting == "equal" or len(ranks) == 1:
            return [1 / len(ranks)] * len(ranks)
        inverse = [1 / self._scale(1.0, rank) for rank in ranks]
        return [w / sum(inverse) for w in inverse]

    def _scale(self, alpha, rank):
        return alpha / (rank**0.5 if self.rslora else rank)

    def remove(self) -> None:
        """Give the model back its plain PEFT LoRA layers, at rank R."""
        self.set(self.max_rank)
        for layer in self.layers:
            layer.cast_input_dtype_enabled = True
            del layer.lora_A[self.adapter].forward, layer.lora_B[self.adapter].forward


RANK_SCHEDULES = distill_config.RANK_SCHEDULES  # defined once, with the option that names them (no torch there)


def step_ranks(step: int, seed: int, max_rank: int, schedule: str = "uniform") -> list[int | tuple[int, ...]]:
    """The ranks trained at `step`, one forward/backward pass each, largest first; a pure function of (seed, step).

    uniform / pow2: one sampled rank (DyLoRA). sandwich (the slimmable networks' rule, Yu & Huang 2019): the
    largest and the smallest rank at every step plus one sampled between them, so the top of the ladder gets
    an update every step instead of 1/R of them (costs up to 3 passes per step). The one between is
    log-uniform (each octave 2-3, 4-7, ..., R/2..R-1 as likely): sampled uniformly, ranks 2-7 got 10% of the
    steps at R = 64 and came out below rank 1 (benchmarks/RESULTS.md, "... on a task the adapter carries").
    matryoshka: one pass of the mixture of the served ranks 1, 2, 4, ..., R (`NestedRank.set` of a tuple)."""
    if schedule == "sandwich":
        between = [_log_uniform(step, seed, 2, max_rank - 1)] if max_rank > 2 else []
        return sorted({max_rank, 1, *between}, reverse=True)
    if schedule == "matryoshka":
        return [served_ranks(max_rank)]
    return [sample_rank(step, seed, max_rank, schedule)]


def served_ranks(max_rank: int) -> tuple[int, ...]:
    """1, 2, 4, ... and R itself: the ranks usually served."""
    return tuple(sorted({2**i for i in range(max_rank.bit_length()) if 2**i <= max_rank} | {max_rank}))


def _step_generator(step: int, seed: int) -> torch.Generator:
    """The random stream of one training step: a pure function of (seed, step)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def _log_uniform(step: int, seed: int, low: int, high: int) -> int:
    """An integer in [low, high], log-uniformly: a pure function of (seed, step)."""
    u = float(torch.rand(1, generator=_step_generator(step, seed)))
    return min(high, int(low * ((high + 1) / low) ** u))


def sample_rank(step: int, seed: int, max_rank: int, distribution: str = "uniform") -> int:
    """The rank trained at `step`: a pure function of (seed, step), so resumed and multi-process runs agree."""
    generator = _step_generator(step, seed)
    if distribution == "uniform":
        return int(torch.randint(1, max_rank + 1, (1,), generator=generator))
    if distribution == "pow2":
        choices = served_ranks(max_rank)
        return choices[int(torch.randint(len(choices), (1,), generator=generator))]
    raise ValueError(f"unknown rank distribution '{distribution}'; use uniform or pow2")
