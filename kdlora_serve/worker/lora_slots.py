"""One vLLM LoRA slot per adapter, every rank of it served from that slot: the rank travels with the request.

kdlora registers all ranks of an adapter (`org/adapter@r8`, `@r2`, ...) under ONE vLLM LoRA id with the
full-rank weights (kdlora_serve.api.resolver), so vLLM's scheduler, CPU cache and slots count adapters, not ranks,
and a rank never requested before needs no load. What vLLM does not carry is the rank; this module adds it, in
the worker processes, through the replacements listed in kdlora_serve.vllm_patches:

- `set_active_loras` (vLLM's LoRA model-runner mixin) folds each request's want (its rank and scaling rule, read
  from its LoRA name: kdlora_serve.rank; for an elastic request, lowered as kdlora_serve.elastic says) into vLLM's
  per-token LoRA mapping. A changed rank is a changed mapping,
  so vLLM refreshes its metadata exactly when the ranks in the batch change.
- `RankAwarePunica`, the base of kdlora's punica wrappers (lora_cpu, lora_triton), takes the wants back out in
  `update_metadata` before vLLM converts ids to slots; the wrapper computes each token with its slot's `A[:k]`,
  `B[:, :k]`, scaled by its rank's alpha/k (or alpha/sqrt(k)) instead of the alpha/R vLLM multiplied into B.
- `activate_adapter` (vLLM's LoRAModelManager) tells each wrapper the true rank R of the adapter vLLM placed in a
  slot (`slots_changed`): vLLM pads slots to --max-lora-rank and forgets it. `create_manager` lets the wrapper
  prepare for the LoRA layers' shapes at start; `load_adapter` logs each load from disk, which vLLM does not.
"""

import dataclasses
import functools
import json
import logging
from pathlib import Path

import torch

from kdlora_serve import elastic, rank, vllm_patches

log = logging.getLogger("vllm.kdlora")  # under vLLM's logger: its handlers and VLLM_LOGGING_LEVEL apply
MANAGER = "vllm.lora.model_manager.LoRAModelManager"


@functools.lru_cache(maxsize=1024)
def _uses_rslora(adapter_dir: str) -> bool:
    try:
        return bool(json.loads((Path(adapter_dir) / "adapter_config.json").read_text()).get("use_rslora", False))
    except (OSError, ValueError):
        return False  # vLLM loads the adapter from the same file and reports what is wrong with it


def want_of(lora_request) -> int:
    """What a request asks of its slot (kdlora_serve.rank.want): its LoRA name's rank, its adapter's scaling rule."""
    if lora_request is None:
        return 0
    requested = rank.kdlora_name(lora_request.lora_name)[1]
    return rank.want(requested, requested is not None and _uses_rslora(lora_request.lora_path))


def split(mapping):
    """(vLLM's mapping with plain LoRA ids, per-token wants, per-sample wants): undoes `set_active_loras`."""
    token_ids, token_wants = rank.unpack(torch.tensor(mapping.index_mapping, dtype=torch.int64))
    sample_ids, sample_wants = rank.unpack(torch.tensor(mapping.prompt_mapping, dtype=torch.int64))
    plain = dataclasses.replace(
        mapping, index_mapping=tuple(token_ids.tolist()), prompt_mapping=tuple(sample_ids.tolist())
    )
    return plain, token_wants, sample_wants


class RankAwarePunica:
    """What kdlora's punica wrappers add to vLLM's (mixed in before PunicaWrapperCPU / PunicaWrapperGPU): each slot's
    true rank, the wants split out of vLLM's mapping each time it changes, and a start-up hook for layer shapes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.slot_ranks: dict[int, int] = {}  # slot -> the rank R of the adapter vLLM placed there

    def update_metadata(self, mapping, *args, **kwargs):
        mapping, token_wants, sample_wants = split(mapping)
        super().update_metadata(mapping, *args, **kwargs)
        self.group(token_wants, sample_wants)

    def group(self, token_wants: torch.Tensor, sample_wants: torch.Tensor) -> None:
        """This step's tokens by slot and rank, from vLLM's fresh metadata and each token's and sample's want."""
        raise NotImplementedError

    def slots_changed(self, slot: int, slot_rank: int) -> None:
        """vLLM wrote an adapter of rank `slot_rank` into `slot`."""
        self.slot_ranks[slot] = slot_rank

    def prepare(self, modules) -> None:
        """vLLM built its LoRA layers (worker start): anything to do per layer shape before requests arrive."""


def set_active_loras(self, input_batch, num_scheduled_tokens, num_sampled_tokens=None, *args, **kwargs):
    """vLLM's, with each request's want folded into its tokens' LoRA ids (see the module docstring)."""
    import numpy as np

    if num_sampled_tokens is None:
        num_sampled_tokens = np.ones_like(num_scheduled_tokens, dtype=np.int32)
    prompt_mapping, token_mapping, lora_requests = input_batch.make_lora_inputs(
        num_scheduled_tokens, num_sampled_tokens
    )
    wants = np.array(
        [_want(self, input_batch, i, num_scheduled_tokens[i]) for i in range(input_batch.num_reqs)], dtype=np.int64
    )
    if wants.any():
        ids = rank.pack(input_batch.request_lora_mapping[: input_batch.num_reqs], wants)
        prompt_mapping, token_mapping = tuple(ids.repeat(num_sampled_tokens)), tuple(ids.repeat(num_scheduled_tokens))
    return self._set_active_loras(prompt_mapping, token_mapping, lora_requests, *args, **kwargs)


def _want(runner, input_batch, index: int, scheduled: int) -> int:
    """Request `index`'s want this step: its LoRA name's, or for an elastic request the rank the API server has
    lowered it to (kdlora_serve.elastic), each token it generates counted at the rank that computes it."""
    state = runner.requests[input_batch.req_ids[index]]
    want = want_of(state.lora_request)
    extra = getattr(state.sampling_params, "extra_args", None) or {}
    handle = extra.get(elastic.XARG)
    if not want or not elastic.is_handle(handle):
        return want
    computed, prompt = input_batch.num_computed_tokens_cpu[index], input_batch.num_prompt_tokens[index]
    table = elastic.table()
    served = table.rank_for(handle, want // 2, decoding=computed >= prompt)
    if computed + scheduled >= prompt:  # this step samples a token the request keeps (not a prompt chunk's)
        table.count(handle, served, 1)
    return rank.want(served, want % 2 == 1)


def _rank_aware_wrappers(manager) -> list[RankAwarePunica]:
    return [w for w in manager.punica_wrapper_mapping.values() if isinstance(w, RankAwarePunica)]


def activate_adapter(self, lora_id: int) -> bool:
    """vLLM's activation, then tell the wrappers the true rank of the adapter now in the slot."""
    activated = vllm_patches.original(f"{MANAGER}.activate_adapter")(self, lora_id)
    if activated:  # vLLM calls this every step for every active adapter; only a real activation changes a slot
        slot = self.lora_index_to_id.index(lora_id)
        # read through `.cache`, never `[]`: the LRU manager's `__getitem__` marks an adapter as recently used, which
        # reorders eviction so a step that brings in two adapters evicts the one it just placed (engine crash)
        slot_rank = self._registered_adapters.cache[lora_id].rank
        for wrapper in _rank_aware_wrappers(self):
            wrapper.slots_changed(slot, slot_rank)
    return activated


def create_manager(self, *args, **kwargs) -> None:
    """vLLM builds its LoRA layers (worker start): let each wrapper prepare for their shapes."""
    vllm_patches.original(f"{MANAGER}.__init__")(self, *args, **kwargs)
    for wrapper in _rank_aware_wrappers(self):
        wrapper.prepare(self.modules.values())


def load_adapter(self, lora_request):
    """vLLM's load of an adapter's weights from disk into the worker, logged (vLLM does not say when it loads)."""
    log.info(
        "kdlora: vLLM loads LoRA %s (id %d) from %s",
        lora_request.lora_name,
        lora_request.lora_int_id,
        lora_request.lora_path,
    )
    return vllm_patches.original("vllm.lora.worker_manager.WorkerLoRAManager._load_adapter")(self, lora_request)
