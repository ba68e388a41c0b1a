"""vLLM general plugin (`vllm.general_plugins: kdlora`), loaded in every vLLM process; idempotent.

- API server: registers the kdlora LoRA resolver (`<adapter>@r<k>` -> a rank-k LoRA) and, with a rank-aware
  backend, serves every rank of an adapter as one vLLM LoRA (resolver); loads the configured adapters at start.
- Workers: installs kdlora's rank-aware LoRA compute: on CPU the grouped path that also keeps base-model tokens
  exact (lora_cpu), on CUDA the Triton kernels (lora_triton).
- vLLM's child processes (engine core, workers) end when their parent does, so a killed API server
  leaves no engine behind holding memory and ports.
"""

import multiprocessing
import os
import signal
import sys

_registered = False
PR_SET_PDEATHSIG = 1  # linux/prctl.h


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    from vllm.lora.resolver import LoRAResolverRegistry

    from kdlora_serve.api import resolver
    from kdlora_serve.worker import lora_cpu, lora_triton

    _end_with_parent()
    if "kdlora" not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver("kdlora", resolver.KdloraResolver())
    lora_cpu.install()
    lora_triton.install()
    resolver.install()


def _end_with_parent() -> None:
    """In a process vLLM started (multiprocessing knows its parent): ask Linux for SIGTERM when the parent dies."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent.pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
