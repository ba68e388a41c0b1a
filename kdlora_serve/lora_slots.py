"""Which adapter each vLLM LoRA slot holds, for the rank-aware backends (lora_cpu, lora_triton).

vLLM pads every slot to `--max-lora-rank` and forgets the adapter's rank once its weights are in the slot.
`activate_adapter` (patched into vLLM's LoRAModelManager by `install`) records, at each real activation, every
slot's true rank and which slots hold cuts of one nested adapter (kdlora serves rank k of an adapter as its own
LoRA, the truncation), and hands both to each punica wrapper's `kdlora_slots_changed(slot, rank, nested)`, which
the backend installed on its wrapper class. Backend-independent: the comparisons run wherever the weights are.
"""

import logging
import os

import torch

log = logging.getLogger("vllm.kdlora")  # under vLLM's logger: its handlers and VLLM_LOGGING_LEVEL apply
_STOCK: dict = {}
SWITCHED_OFF = "KDLORA_RANK_AWARE=0"  # keeps vLLM's stock LoRA compute, for A/B runs


def switched_off() -> str | None:
    return SWITCHED_OFF if os.environ.get("KDLORA_RANK_AWARE", "1") == "0" else None


def nested_slots(modules, ranks: dict[int, int]) -> dict[int, tuple[int, float]]:
    """{slot: (root slot, scale relative to the root)} for the active slots: a slot is in a root's family
    when, in every LoRA layer, its A is the root's A cut to its rank and its B the root's B cut and scaled by
    one common factor (what vLLM loads for two truncations of one kdlora adapter; unrelated adapters differ)."""
    layers = [(m.lora_a_stacked, m.lora_b_stacked) for m in modules if hasattr(m, "lora_a_stacked")]
    nested, roots = {}, []
    for slot in sorted(ranks, key=lambda s: -ranks[s]):
        root, factor = next(((r, f) for r in roots if (f := _cut_factor(layers, slot, r, ranks[slot])) is not None), (slot, 1.0))
        if root == slot:
            roots.append(slot)
        nested[slot] = (root, factor)
    return nested


def _cut_factor(layers, small: int, big: int, rank: int) -> float | None:
    """f when slot `small` holds slot `big`'s adapter cut to `rank` (A equal, B = f * B_big[..., :rank]), else None."""
    factor = None
    for lora_a, lora_b in layers:
        lora_a, lora_b = (lora_a, lora_b) if isinstance(lora_a, tuple) else ((lora_a,), (lora_b,))
        for a, b in zip(lora_a, lora_b):
            if not isinstance(a, torch.Tensor) or a.dim() != 4 or b.dim() != 4:  # a layout not checked here (embeddings, MoE):
                if isinstance(a, torch.Tensor) and not (a[small].any() or a[big].any() or b[small].any() or b[big].any()):
                    continue  # ... that neither adapter uses
                return None
            if not torch.equal(a[small, 0, :rank], a[big, 0, :rank]):
                return None
            b_small, b_big = b[small, 0, :, :rank].float(), b[big, 0, :, :rank].float()
            if factor is None and b_big.any():
                factor = float((b_small * b_big).sum() / (b_big * b_big).sum())
            tolerance = 4 * torch.finfo(b.dtype).eps
            if not torch.allclose(b_small, (factor or 0.0) * b_big, rtol=tolerance, atol=tolerance * float(b_small.abs().max())):
                return None
    return 1.0 if factor is None else factor


def activate_adapter(self, lora_id: int) -> bool:
    """vLLM's activation, then remember the adapter's true rank for the slot it went into and which slots
    hold cuts of one adapter."""
    activated = _STOCK["activate_adapter"](self, lora_id)
    if activated:  # vLLM calls this every step for every active adapter; only a real activation changes a slot
        slot = self.lora_index_to_id.index(lora_id)
        # read through `.cache`, never `[]`: the LRU manager's `__getitem__` marks an adapter as recently used, which
        # reorders eviction so a step that brings in two adapters evicts the one it just placed (engine crash)
        registered = self._registered_adapters.cache
        ranks = {s: registered[i].rank for s, i in enumerate(self.lora_index_to_id) if i is not None}
        rank = ranks[slot]
        try:
            nested = nested_slots(self.modules.values(), ranks)
        except Exception:  # an optimisation only: never let it fail a request
            log.warning("kdlora: could not compare LoRA slots; computing each slot separately", exc_info=True)
            nested = {s: (s, 1.0) for s in ranks}
        if nested[slot][0] != slot:
            log.info("kdlora: LoRA slot %d (rank %d) is a cut of slot %d: batched with it, computed once", slot, rank, nested[slot][0])
        for wrapper in self.punica_wrapper_mapping.values():
            wrapper.kdlora_slots_changed(slot, rank, nested)
    return activated


def unsupported_reason(vllm_version: str, tested: tuple[str, ...], path: str) -> str | None:
    """Why a backend keeps vLLM's stock LoRA compute (switched off, or a vLLM version it was not tested with)."""
    if switched_off():
        return SWITCHED_OFF
    if vllm_version not in tested:
        return f"vLLM {vllm_version} is untested with kdlora's {path} (tested: {', '.join(tested)})"
    return None


def patch(wrapper_class, methods: dict, stock: dict) -> None:
    """Give vLLM's punica wrapper class kdlora's methods (idempotent: vLLM's originals are kept in `stock` the first
    time) and record adapter activations for them."""
    from vllm.lora.model_manager import LoRAModelManager

    for name, method in methods.items():
        stock.setdefault(name, getattr(wrapper_class, name, None))
        setattr(wrapper_class, name, method)
    _STOCK.setdefault("activate_adapter", LoRAModelManager.activate_adapter)
    LoRAModelManager.activate_adapter = activate_adapter
