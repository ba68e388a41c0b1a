"""vLLM LoRA resolver: turns `<adapter>@r<k>` into a registered rank-k LoRA (its own name, id, path).

vLLM calls it (API-server process, with VLLM_ALLOW_RUNTIME_LORA_UPDATING=1) for a request whose model
is neither the base nor a known LoRA; by then the middleware has already validated the name and
rewritten budgets to an explicit rank, so anything else is not ours (None).
"""

import asyncio
import logging

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from hub.errors import KdloraError
from kdlora_serve.policy import split_model_name
from kdlora_serve.store import get_store

log = logging.getLogger("vllm.kdlora")  # under vLLM's logger: its handlers and VLLM_LOGGING_LEVEL apply


class KdloraResolver(LoRAResolver):
    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        store = get_store()
        try:
            adapter, rank = split_model_name(lora_name)
        except KdloraError:
            return None
        if rank is None or not store.is_adapter_name(adapter):
            return None
        try:
            path = await asyncio.to_thread(store.rank_dir, adapter, rank, base_model_name)
        except KdloraError as err:
            log.warning("kdlora: cannot resolve %s: %s", lora_name, err)
            return None
        # lora_int_id is replaced by vLLM's own counter; name and path identify this rank
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))
