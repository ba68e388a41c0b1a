"""Every change kdlora makes to vLLM's code, in one table, behind one version gate.

vLLM 0.32 has seams for some of what kdlora needs (general plugins, LoRA resolvers, ASGI middleware: used as
they are, see plugin.py) but none for the rank of a LoRA. For that, kdlora replaces the methods in `PATCHES`:
each row names the vLLM method, kdlora's replacement and why. Where vLLM offers a choice point, kdlora uses it: the
platform's punica-wrapper choice hands vLLM kdlora's subclass of its own wrapper (worker.lora_cpu /
worker.lora_triton), whose state lives in the wrapper's `__init__`, instead of methods assigned onto vLLM's class.

`install()` (from the plugin, in every vLLM process, idempotent) applies the rows for this process's platform, once;
vLLM's originals are kept in one store (`original`). `kdlora doctor` lists the table. The rank-aware rows apply only
where a rank-aware LoRA path exists for the platform and is not switched off (`KDLORA_RANK_AWARE=0`); with vLLM's
stock LoRA ops each rank of an adapter stays its own LoRA (a truncated copy), which those ops compute exactly.
"""

import importlib
import inspect
import logging
import os
from dataclasses import dataclass

log = logging.getLogger("vllm.kdlora")  # under vLLM's logger: its handlers and VLLM_LOGGING_LEVEL apply
TESTED_VLLM_VERSIONS = ("0.32.0",)
SWITCHED_OFF = "KDLORA_RANK_AWARE=0"  # keeps vLLM's stock LoRA compute, for A/B runs


@dataclass(frozen=True)
class Patch:
    target: str  # vLLM's method, module.Class.method
    replacement: str  # kdlora's function, module.function (a classmethod where vLLM's is one)
    why: str


RANK_AWARE = "rank-aware"  # rows applied only where a rank-aware LoRA path serves (see `lora_backend`)
PATCHES: dict[str, list[Patch]] = {
    "api": [  # the API-server process
        Patch("vllm.entrypoints.openai.models.serving.OpenAIServingModels.resolve_lora",
              "kdlora_serve.api.resolver.resolve_lora",
              "with a rank-aware path every rank of an adapter is ONE vLLM LoRA: a new rank registers a name, loads nothing"),
        Patch("vllm.entrypoints.openai.models.serving.OpenAIServingModels.init_static_loras",
              "kdlora_serve.api.resolver.init_static_loras",
              "adapters given at start are pulled, checked, loaded and run for one token before requests arrive"),
    ],
    RANK_AWARE: [  # the engine's workers
        Patch("vllm.v1.worker.lora_model_runner_mixin.LoRAModelRunnerMixin.set_active_loras",
              "kdlora_serve.worker.lora_slots.set_active_loras",
              "folds each request's rank (from its LoRA name) into vLLM's per-token LoRA mapping (kdlora_serve.rank)"),
        Patch("vllm.lora.model_manager.LoRAModelManager.activate_adapter",
              "kdlora_serve.worker.lora_slots.activate_adapter",
              "tells the wrapper the true rank R of the adapter placed in a slot (vLLM pads slots to --max-lora-rank)"),
        Patch("vllm.lora.model_manager.LoRAModelManager.__init__",
              "kdlora_serve.worker.lora_slots.create_manager",
              "lets the wrapper prepare for the LoRA layers' shapes at start (CPU: plans measured), not on a request"),
        Patch("vllm.lora.worker_manager.WorkerLoRAManager._load_adapter",
              "kdlora_serve.worker.lora_slots.load_adapter",
              "logs each load of an adapter from disk, which vLLM does not say"),
    ],
    "cpu": [
        Patch("vllm.platforms.cpu.CpuPlatform.get_punica_wrapper",
              "kdlora_serve.worker.lora_cpu.punica_wrapper",
              "vLLM builds RankAwarePunicaCPU: grouped by slot, each token at its rank, base tokens exact"),
    ],
    "cuda": [
        Patch("vllm.platforms.cuda.CudaPlatformBase.get_punica_wrapper",
              "kdlora_serve.worker.lora_triton.punica_wrapper",
              "vLLM builds RankAwarePunicaGPU: Triton kernels that read each token's rank"),
    ],
}  # fmt: skip
_ORIGINALS: dict[str, object] = {}  # target -> vLLM's own attribute, as found before kdlora replaced it
_backend: list[str] = []  # the rank-aware LoRA path installed in this process ("cpu" or "cuda"), if any


def _resolve(qualname: str) -> tuple[object, str]:
    """(the class or module that holds it, the attribute name) for module.Class.attr or module.function."""
    parts = qualname.split(".")
    for cut in range(len(parts) - 1, 0, -1):
        try:
            holder = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for part in parts[cut:-1]:
            holder = getattr(holder, part)
        return holder, parts[-1]
    raise ImportError(qualname)


def original(target: str):
    """vLLM's own method for a patched target (the replacement calls it)."""
    return _ORIGINALS[target]


def apply(patch: Patch) -> None:
    owner, name = _resolve(patch.target)
    holder, function = _resolve(patch.replacement)
    replacement = getattr(holder, function)
    found = inspect.getattr_static(owner, name)
    _ORIGINALS.setdefault(patch.target, found)
    setattr(owner, name, classmethod(replacement) if isinstance(found, classmethod) else replacement)


def uninstall() -> None:
    """Put vLLM's originals back (tests)."""
    for target, found in _ORIGINALS.items():
        owner, name = _resolve(target)
        setattr(owner, name, found)
    _ORIGINALS.clear()
    _backend.clear()


def unsupported_reason(backend: str) -> str | None:
    """Why a server on this backend ("cpu" / "cuda") keeps vLLM's stock LoRA compute; None when kdlora's path serves."""
    import vllm

    if os.environ.get("KDLORA_RANK_AWARE", "1") == "0":
        return SWITCHED_OFF
    if vllm.__version__ not in TESTED_VLLM_VERSIONS:
        path = "CPU path" if backend == "cpu" else "kernels"
        return f"vLLM {vllm.__version__} is untested with kdlora's {path} (tested: {', '.join(TESTED_VLLM_VERSIONS)})"
    if backend == "cuda":
        from vllm import triton_utils  # placeholders where Triton is unusable (vLLM's CPU build)

        if not triton_utils.HAS_TRITON:
            return "vLLM finds Triton unusable"
    return None


def platform() -> str | None:
    """This process's vLLM platform as kdlora's LoRA paths name it ("cpu" or "cuda"); None for any other."""
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else "cuda" if current_platform.is_cuda() else None


def lora_backend() -> str | None:
    """The platform's rank-aware LoRA path ("cpu" or "cuda"), None where vLLM's stock ops serve (and why, logged)."""
    backend = platform()
    reason = backend and unsupported_reason(backend)
    if reason and reason != SWITCHED_OFF:
        cost = "LoRA cost will not follow the rank" + (
            " and base requests batched with adapter requests may differ from the same requests alone"
            if backend == "cpu"
            else ""
        )
        log.warning("kdlora: vLLM's stock %s LoRA ops (%s); %s", backend.upper(), reason, cost)
    return None if reason else backend


def install() -> str | None:
    """Apply the rows for this process (idempotent); the rank-aware backend installed, or None."""
    import vllm

    if vllm.__version__ not in TESTED_VLLM_VERSIONS:
        lora_backend()  # says why, once per process
        return None
    for patch in PATCHES["api"]:
        apply(patch)
    chosen = backend() or lora_backend()
    if chosen and not _backend:
        for patch in PATCHES[RANK_AWARE] + PATCHES[chosen]:
            apply(patch)
        _backend.append(chosen)
    return chosen


LORA_PATHS = {"cpu": "grouped", "cuda": "per-token"}  # how each backend's LoRA cost grows (kdlora_serve.api.steps)


def backend() -> str | None:
    """The rank-aware LoRA path installed in this process ("cpu" or "cuda"), None where vLLM's stock ops serve."""
    return _backend[0] if _backend else None


def rank_aware(lora_config) -> bool:
    """Whether a server with this LoRA config serves every rank of an adapter from one slot: a rank-aware path is
    installed and takes the LoRA calls (on CUDA it leaves fully sharded LoRAs to vLLM's stock kernels)."""
    return bool(_backend) and not (_backend == ["cuda"] and lora_config.fully_sharded_loras)


def describe() -> list[str]:
    """One line per row of the table, for `kdlora doctor`."""
    return [
        f"{where:<10} {patch.target.rsplit('.', 2)[-2]}.{patch.target.rsplit('.', 1)[-1]}: {patch.why}"
        for where, patches in PATCHES.items()
        for patch in patches
    ]
