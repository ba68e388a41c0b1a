"""vLLM general plugin (`vllm.general_plugins: kdlora`), loaded in every vLLM process; idempotent.

- API server: registers the kdlora LoRA resolver (`<adapter>@r<k>` -> a rank-k LoRA).
- Workers on CPU: installs the grouped LoRA path that keeps base-model tokens exact (lora_cpu).
"""

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.lora.resolver import LoRAResolverRegistry

    from kdlora_serve import lora_cpu
    from kdlora_serve.resolver import KdloraResolver

    if "kdlora" not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver("kdlora", KdloraResolver())
    lora_cpu.install()
