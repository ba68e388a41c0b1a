"""One vLLM LoRA slot per adapter, every rank of it served from that slot: the rank travels with the request.

kdlora registers all ranks of an adapter (`org/adapter@r8`, `@r2`, ...) under ONE vLLM LoRA id with the
full-rank weights (kdlora_serve.api.resolver), so vLLM's scheduler, CPU cache and slots count adapters, not ranks,
and a rank never requested before needs no load. What vLLM does not carry is the rank; this module adds it:

- `set_active_loras` (patched into vLLM's LoRA model-runner mixin, in the workers) writes into vLLM's per-token
  LoRA mapping, for each request whose LoRA name ends in `@r<k>`, its id plus `want * RANK_STRIDE`, where
  `want` encodes k and the adapter's scaling rule (`want_of`). A changed rank is a changed mapping, so vLLM
  refreshes its metadata exactly when the ranks in the batch change.
- the rank-aware backends (lora_cpu, lora_triton) take the ids back out in their `update_metadata` (`split`)
  before vLLM converts ids to slots, and compute each token with its slot's `A[:k]`, `B[:, :k]`, scaled by
  its rank's alpha/k (or alpha/sqrt(k)) instead of the alpha/R vLLM multiplied into the slot's B at load.
- `load_adapter` (over vLLM's WorkerLoRAManager._load_adapter) logs each load from disk, which vLLM does not;
  `create_manager` (over LoRAModelManager.__init__) lets a backend prepare for the LoRA layers' shapes at start.
- `activate_adapter` (patched into vLLM's LoRAModelManager) tells each punica wrapper the true rank R of the
  adapter vLLM activated into a slot (`kdlora_slots_changed(slot, rank)`): vLLM pads slots to --max-lora-rank
  and forgets it.

Only where a rank-aware backend computes the LoRAs (`rank_aware`); with vLLM's stock LoRA ops each rank stays its
own LoRA (a truncated copy, its own slot), which stock ops compute exactly.
"""

import dataclasses
import functools
import json
import logging
import os
from pathlib import Path

import torch

from hub.errors import KdloraError
from kdlora_serve.api.policy import split_model_name

log = logging.getLogger("vllm.kdlora")  # under vLLM's logger: its handlers and VLLM_LOGGING_LEVEL apply
_STOCK: dict = {}
SWITCHED_OFF = "KDLORA_RANK_AWARE=0"  # keeps vLLM's stock LoRA compute, for A/B runs
RANK_STRIDE = 1 << 32  # vLLM's LoRA ids are a counter far below this; mapping value = id + want * RANK_STRIDE
_installed: list[str] = []  # the rank-aware backends installed in this process


def rank_aware(lora_config) -> bool:
    """Whether a server with this LoRA config can serve every rank of an adapter from one slot: a rank-aware backend
    is installed and takes the LoRA calls (on CUDA it leaves fully sharded LoRAs to vLLM's stock kernels)."""
    return bool(_installed) and not (_installed == ["cuda"] and lora_config.fully_sharded_loras)


def switched_off() -> str | None:
    return SWITCHED_OFF if os.environ.get("KDLORA_RANK_AWARE", "1") == "0" else None


@functools.lru_cache(maxsize=1024)
def _uses_rslora(adapter_dir: str) -> bool:
    try:
        return bool(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("use_rslora", False))
    except (OSError, ValueError):
        return False  # vLLM loads the adapter from the same file and reports what is wrong with it


def want_of(lora_request) -> int:
    """What a request asks of its slot: 0 = the slot's full rank, else 2 * rank + (1 with rsLoRA's alpha/sqrt(r))."""
    if lora_request is None:
        return 0
    try:
        rank = split_model_name(lora_request.lora_name)[1]
    except KdloraError:  # not a kdlora name
        return 0
    return 0 if rank is None else 2 * rank + _uses_rslora(lora_request.lora_path)


def scale_ratio(want: torch.Tensor, slot_rank: int | torch.Tensor) -> torch.Tensor:
    """A rank's LoRA scale over its slot's: alpha/k over alpha/R (square roots with rsLoRA); 1 where want is 0.
    slot_rank: one R, or one per want."""
    rank = (want // 2).clamp(min=1).double()
    ratio = torch.where(want % 2 == 1, (slot_rank / rank).sqrt(), slot_rank / rank)
    return torch.where(want == 0, 1.0, ratio).float()


def split(mapping):
    """(vLLM's mapping with plain LoRA ids, per-token wants, per-sample wants): undoes `set_active_loras`."""
    tokens = torch.tensor(mapping.index_mapping, dtype=torch.int64)
    samples = torch.tensor(mapping.prompt_mapping, dtype=torch.int64)
    plain = dataclasses.replace(
        mapping,
        index_mapping=tuple((tokens % RANK_STRIDE).tolist()),
        prompt_mapping=tuple((samples % RANK_STRIDE).tolist()),
    )
    return plain, tokens // RANK_STRIDE, samples // RANK_STRIDE


def set_active_loras(self, input_batch, num_scheduled_tokens, num_sampled_tokens=None, *args, **kwargs):
    """vLLM's, with each request's rank folded into its tokens' LoRA ids (see the module docstring)."""
    import numpy as np

    if num_sampled_tokens is None:
        num_sampled_tokens = np.ones_like(num_scheduled_tokens, dtype=np.int32)
    prompt_mapping, token_mapping, lora_requests = input_batch.make_lora_inputs(
        num_scheduled_tokens, num_sampled_tokens
    )
    wants = np.array([want_of(self.requests[req_id].lora_request) for req_id in input_batch.req_ids], dtype=np.int64)
    if wants.any():
        ids = input_batch.request_lora_mapping[: input_batch.num_reqs] + wants * RANK_STRIDE
        prompt_mapping, token_mapping = tuple(ids.repeat(num_sampled_tokens)), tuple(ids.repeat(num_scheduled_tokens))
    return self._set_active_loras(prompt_mapping, token_mapping, lora_requests, *args, **kwargs)


def activate_adapter(self, lora_id: int) -> bool:
    """vLLM's activation, then tell the wrappers the true rank of the adapter now in the slot."""
    activated = _STOCK["activate_adapter"](self, lora_id)
    if activated:  # vLLM calls this every step for every active adapter; only a real activation changes a slot
        slot = self.lora_index_to_id.index(lora_id)
        # read through `.cache`, never `[]`: the LRU manager's `__getitem__` marks an adapter as recently used, which
        # reorders eviction so a step that brings in two adapters evicts the one it just placed (engine crash)
        rank = self._registered_adapters.cache[lora_id].rank
        for wrapper in self.punica_wrapper_mapping.values():
            wrapper.kdlora_slots_changed(slot, rank)
    return activated


def create_manager(self, *args, **kwargs) -> None:
    """vLLM builds its LoRA layers (worker start): let each backend prepare for their shapes (`kdlora_prepare`)."""
    _STOCK["__init__"](self, *args, **kwargs)
    for wrapper in self.punica_wrapper_mapping.values():
        if hasattr(wrapper, "kdlora_prepare"):
            wrapper.kdlora_prepare(self.modules.values())


def load_adapter(self, lora_request):
    """vLLM's load of an adapter's weights from disk into the worker, logged (vLLM does not say when it loads)."""
    log.info(
        "kdlora: vLLM loads LoRA %s (id %d) from %s",
        lora_request.lora_name,
        lora_request.lora_int_id,
        lora_request.lora_path,
    )
    return _STOCK["_load_adapter"](self, lora_request)


def unsupported_reason(vllm_version: str, tested: tuple[str, ...], path: str) -> str | None:
    """Why a backend keeps vLLM's stock LoRA compute (switched off, or a vLLM version it was not tested with)."""
    if switched_off():
        return SWITCHED_OFF
    if vllm_version not in tested:
        return f"vLLM {vllm_version} is untested with kdlora's {path} (tested: {', '.join(tested)})"
    return None


def patch(backend: str, wrapper_class, methods: dict, stock: dict) -> None:
    """Give vLLM's punica wrapper class a backend's methods (idempotent: vLLM's originals are kept in `stock` the first
    time), record adapter activations for them and carry ranks in the LoRA mapping."""
    from vllm.lora.model_manager import LoRAModelManager
    from vllm.lora.worker_manager import WorkerLoRAManager
    from vllm.v1.worker.lora_model_runner_mixin import LoRAModelRunnerMixin

    for name, method in methods.items():
        stock.setdefault(name, getattr(wrapper_class, name, None))
        setattr(wrapper_class, name, method)
    _STOCK.setdefault("__init__", LoRAModelManager.__init__)
    LoRAModelManager.__init__ = create_manager
    _STOCK.setdefault("activate_adapter", LoRAModelManager.activate_adapter)
    LoRAModelManager.activate_adapter = activate_adapter
    _STOCK.setdefault("set_active_loras", LoRAModelRunnerMixin.set_active_loras)
    LoRAModelRunnerMixin.set_active_loras = set_active_loras
    _STOCK.setdefault("_load_adapter", WorkerLoRAManager._load_adapter)
    WorkerLoRAManager._load_adapter = load_adapter
    if backend not in _installed:
        _installed.append(backend)
