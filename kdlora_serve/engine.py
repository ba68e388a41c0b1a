"""Engine settings that follow the device: vLLM's GPU defaults stand; the CPU build needs two changes.

On CPU, vLLM reserves its KV cache as a fraction of one NUMA node's RAM (`gpu_memory_utilization`
still names it) and the 0.92 default fails on small machines, so we size the cache explicitly from
free memory through VLLM_CPU_KVCACHE_SPACE; CUDA graphs do not exist there, so eager mode.
"""

import sys
from dataclasses import dataclass, field

import psutil

KV_CACHE_FRACTION_OF_FREE = 0.15
KV_CACHE_GIB_BOUNDS = (1, 8)


@dataclass
class EngineDefaults:
    env: dict[str, str] = field(default_factory=dict)  # set before vLLM starts its engine process
    llm_kwargs: dict = field(default_factory=dict)  # for vllm.LLM(...); serve_args() is the CLI spelling

    def serve_args(self) -> list[str]:
        args = []
        for key, value in self.llm_kwargs.items():
            flag = "--" + key.replace("_", "-")
            args += [flag] if value is True else [flag, str(value)]
        return args


def engine_defaults() -> EngineDefaults:
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return EngineDefaults()
    free_gib = psutil.virtual_memory().available / 2**30
    low, high = KV_CACHE_GIB_BOUNDS
    kv_gib = int(min(high, max(low, free_gib * KV_CACHE_FRACTION_OF_FREE)))
    return EngineDefaults(env={"VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}, llm_kwargs={"enforce_eager": True})


def server_command(model: str, *flags: str) -> list[str]:
    """The `vllm serve MODEL FLAGS...` command line, spelled so it also works with vllm-cpu.

    vllm-cpu's `vllm` script dies at start-up on `importlib.metadata.version("vllm")` (its
    distribution is named vllm-cpu); the API server module takes the same flags on every build.
    """
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *flags]
