"""How kdlora names become vLLM LoRAs: `<adapter>@r<k>` -> a registered LoRA (name, id, path).

- `KdloraResolver`, a vLLM LoRA resolver: vLLM calls it (API-server process, with
  VLLM_ALLOW_RUNTIME_LORA_UPDATING=1) for a request whose model is neither the base nor a known LoRA; by then the
  middleware has validated the name and rewritten budgets to an explicit rank, so anything else is not ours (None).
- `resolve_lora`, replacing vLLM's OpenAIServingModels.resolve_lora (kdlora_serve.vllm_patches): with a rank-aware path,
  every rank of an adapter is ONE vLLM LoRA: the first rank requested loads the full-rank adapter; any other rank
  is registered under the same id and path, with nothing to load (vLLM would give each name its own id).
  With vLLM's stock LoRA ops each rank stays its own LoRA, the truncation.
- `init_static_loras`, patched the same way: the adapters given at start (`kdlora serve --adapter`) are pulled,
  checked, loaded into the engine and (as many as there are slots) run for one token before the server takes
  requests, so no first request waits for any of that.
"""

import asyncio
import logging

from vllm.lora.request import LoRARequest
from vllm.lora.resolver import LoRAResolver

from hub.errors import KdloraError
from kdlora_serve import vllm_patches
from kdlora_serve.api.store import get_store
from kdlora_serve.rank import kdlora_name, model_name

log = logging.getLogger("vllm.kdlora")  # under vLLM's logger: its handlers and VLLM_LOGGING_LEVEL apply
SERVING_MODELS = "vllm.entrypoints.openai.models.serving.OpenAIServingModels"


class KdloraResolver(LoRAResolver):
    async def resolve_lora(self, base_model_name: str, lora_name: str) -> LoRARequest | None:
        store = get_store()
        adapter, rank = kdlora_name(lora_name)
        if rank is None or not store.is_adapter_name(adapter):
            return None
        try:
            path = await asyncio.to_thread(store.lora_dir, adapter, rank, base_model_name)
        except KdloraError as err:
            log.warning("kdlora: cannot resolve %s: %s", lora_name, err)
            return None
        # lora_int_id is replaced by vLLM's own counter; name and path identify this LoRA
        return LoRARequest(lora_name=lora_name, lora_int_id=1, lora_path=str(path))


async def resolve_lora(self, lora_name: str):
    adapter, rank = kdlora_name(lora_name)
    if rank is None or not get_store().one_lora_per_adapter:
        return await vllm_patches.original(f"{SERVING_MODELS}.resolve_lora")(self, lora_name)
    async with self.lora_resolver_lock[f"kdlora:{adapter}"]:  # one load per adapter, however many ranks race to it
        if lora_name in self.lora_requests:
            return self.lora_requests[lora_name]
        loaded = next((r for name, r in list(self.lora_requests.items()) if kdlora_name(name)[0] == adapter), None)
        if loaded is None:
            return await vllm_patches.original(f"{SERVING_MODELS}.resolve_lora")(self, lora_name)
        alias = LoRARequest(
            lora_name=lora_name,
            lora_int_id=loaded.lora_int_id,
            lora_path=loaded.lora_path,
            base_model_name=loaded.base_model_name,
        )
        self.lora_requests[lora_name] = alias
        log.info(
            "kdlora: %s served from %s's LoRA (id %d): nothing to load", lora_name, loaded.lora_name, loaded.lora_int_id
        )
        return alias


async def init_static_loras(self):
    await vllm_patches.original(f"{SERVING_MODELS}.init_static_loras")(self)
    store = get_store()
    lora_config = self.engine_client.vllm_config.lora_config
    store.one_lora_per_adapter = vllm_patches.rank_aware(lora_config)
    for number, adapter in enumerate(store.aliases):
        try:
            loaded = await asyncio.to_thread(store.load, adapter, self.model_config.model)
            lora_request = await self.resolve_lora(model_name(adapter, loaded.metadata.default_rank))
            if isinstance(lora_request, LoRARequest) and number < lora_config.max_loras:
                await _generate_one_token(self.engine_client, lora_request)
        except Exception as err:  # the server still starts; the adapter's first request says what is wrong
            log.warning("kdlora: could not load %s at start: %s", adapter, err)


async def _generate_one_token(engine_client, lora_request: LoRARequest) -> None:
    """One token through the adapter: vLLM activates it into a slot and the backend prepares its weights, at start
    rather than on its first request."""
    from vllm import SamplingParams

    async for _ in engine_client.generate(
        {"prompt_token_ids": [0]},
        SamplingParams(max_tokens=1),
        f"kdlora-warm-{lora_request.lora_int_id}",
        lora_request=lora_request,
    ):
        pass
