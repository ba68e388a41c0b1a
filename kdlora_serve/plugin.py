"""vLLM general plugin (`vllm.general_plugins: kdlora`), loaded in every vLLM process; idempotent.

- registers the kdlora LoRA resolver (`<adapter>@r<k>` -> a rank-k LoRA; vLLM's resolver seam, API server);
- applies kdlora's replacements of vLLM methods (kdlora_serve.vllm_patches: one table, one version gate), which in
  the workers include kdlora's rank-aware punica wrapper (CPU: grouped path that also keeps base tokens exact;
  CUDA: Triton kernels);
- names the table through which the API server lowers elastic requests' ranks in the engine (kdlora_serve.elastic),
  and the folder where each engine worker reports which LoRA kernels serve (kdlora_serve.lora_report), before the
  engine's processes are started, so they inherit both;
- makes vLLM's child processes (engine core, workers) end when their parent does, so a killed API server leaves no
  engine behind holding memory and ports;
- keeps vLLM from logging a line per engine step: `kdlora serve` turns on vLLM's iteration details for its step
  model (kdlora_serve.api.steps), and vLLM's logging stat logger would print each one.
"""

import logging
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

    from kdlora_serve import elastic, lora_report, vllm_patches
    from kdlora_serve.api.resolver import KdloraResolver

    _end_with_parent()
    logging.getLogger("vllm.v1.metrics.loggers").addFilter(_not_an_iteration_line)
    elastic.set_path()
    lora_report.set_path()
    if "kdlora" not in LoRAResolverRegistry.get_supported_resolvers():
        LoRAResolverRegistry.register_resolver("kdlora", KdloraResolver())
    vllm_patches.install()


def _not_an_iteration_line(record: logging.LogRecord) -> bool:
    return "Iteration(%d)" not in str(record.msg)  # vLLM 0.32's LoggingStatLogger._log_iteration_details


def _end_with_parent() -> None:
    """In a process vLLM started (multiprocessing knows its parent): ask Linux for SIGTERM when the parent dies."""
    parent = multiprocessing.parent_process()
    if parent is None or not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent.pid:  # the parent died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
