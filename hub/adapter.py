"""Reading, validating and truncating a nested-rank adapter directory.

Layout (the DESIGN's artifact): `adapter_config.json` + `adapter_model.safetensors` (a plain PEFT
LoRA at max rank) + `kdlora.json` (rank metadata, hub.schema). Truncation to rank k keeps the first
k rank components of every LoRA pair, `A[:k]` and `B[:, :k]`, and leaves `lora_alpha` alone, so
PEFT and vLLM (both scale by alpha/r, or alpha/sqrt(r) with `use_rslora`) compute exactly what training
computed at rank k.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

from hub.atomic import atomic_dir
from hub.errors import KdloraError
from hub.schema import METADATA_FILE, RankMetadata, load_metadata

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# PEFT's tensor names: rank is dim 0 of every A and dim 1 of every B (linear, conv and embedding LoRA).
_LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.[^.]*)?$")
_PEFT_PREFIX = "base_model.model."


@dataclass
class Adapter:
    path: Path
    config: dict  # adapter_config.json, as PEFT wrote it
    metadata: RankMetadata | None  # None for a plain PEFT adapter
    shapes: dict[str, tuple[int, ...]]  # tensor name -> shape, read without loading the weights

    @property
    def module_ranks(self) -> dict[str, int]:
        """LoRA module name -> its rank in this file (`r`, or its `rank_pattern` entry)."""
        return {
            _LORA_KEY.match(name)["module"]: shape[0] for name, shape in self.shapes.items() if _rank_dim(name) == 0
        }


def refuse_pickles(names) -> None:
    """Pickled weights can run code when loaded: never load them, say how to convert."""
    pickled = sorted(str(n) for n in names if str(n).endswith(PICKLE_SUFFIXES))
    if pickled:
        raise KdloraError(
            f"refusing pickled weight file(s) {', '.join(pickled)}: loading a pickle can execute code; "
            "kdlora accepts safetensors only (convert with PEFT: load the adapter, then save_pretrained(..., safe_serialization=True))"
        )


def read_adapter(path: Path, require_metadata: bool = True) -> Adapter:
    """Open an adapter directory and check that its files agree with each other; load no weights."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_dir():
        raise KdloraError(f"adapter directory {path} does not exist")
    refuse_pickles(p.name for p in path.iterdir())
    for required in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / required).is_file():
            raise KdloraError(
                f"{path} has no {required}: not a PEFT LoRA adapter directory (expected {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS})"
            )
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text())
    except json.JSONDecodeError as err:
        raise KdloraError(
            f"{path / ADAPTER_CONFIG} is not valid JSON ({err.msg} at line {err.lineno}); fix or regenerate it"
        ) from err
    if config.get("peft_type", "LORA") != "LORA":
        raise KdloraError(f"{path} is a {config['peft_type']} adapter; kdlora handles LoRA adapters only")
    metadata = load_metadata(path) if require_metadata or (path / METADATA_FILE).exists() else None
    try:
        with safe_open(path / ADAPTER_WEIGHTS, framework="pt") as weights:
            shapes = {name: tuple(weights.get_slice(name).get_shape()) for name in weights.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise KdloraError(
            f"{path / ADAPTER_WEIGHTS} is not a readable safetensors file ({err}); re-download or regenerate it"
        ) from err
    adapter = Adapter(path, config, metadata, shapes)
    _check_consistent(adapter)
    return adapter


def _configured_rank(config: dict, module: str) -> int:
    """The rank PEFT will build for `module`: the first `rank_pattern` key matching its name's end, else `r`.

    PEFT's own rule (`peft.utils.other.get_pattern_key`), restated: importing peft would load torch,
    transformers and bitsandbytes into every hub command."""
    pattern = config.get("rank_pattern") or {}
    key = next((key for key in pattern if re.match(rf"(.*\.)?({key})$", module)), None)
    return config["r"] if key is None else pattern[key]


def _check_consistent(adapter: Adapter) -> None:
    where = adapter.path
    ranks = adapter.module_ranks
    if not ranks:
        raise KdloraError(
            f"{where / ADAPTER_WEIGHTS} holds no LoRA tensors (no '*.lora_A.weight'); the file is not a LoRA adapter"
        )
    for name, shape in adapter.shapes.items():
        if _rank_dim(name) != 1:
            continue
        module = _LORA_KEY.match(name)["module"]
        if module not in ranks or shape[1] != ranks[module]:
            raise KdloraError(
                f"{where}: tensor {name} has shape {list(shape)} but its lora_A has rank {ranks.get(module)}; the adapter file is corrupt"
            )
    for module, rank in ranks.items():
        configured = _configured_rank(adapter.config, module.removeprefix(_PEFT_PREFIX))
        if rank != configured:
            raise KdloraError(
                f"{where}: module {module} has rank {rank} in {ADAPTER_WEIGHTS} but {configured} in {ADAPTER_CONFIG}; the files do not belong together"
            )
    meta = adapter.metadata
    if meta is not None and max(ranks.values()) != meta.max_rank:
        raise KdloraError(
            f"{where}: {METADATA_FILE} says max_rank {meta.max_rank} but the tensors have rank {max(ranks.values())}; the files do not belong together"
        )
    if meta is not None and adapter.config.get("use_dora"):
        raise KdloraError(f"{where}: nested-rank truncation is exact for LoRA and rsLoRA scaling only, not DoRA")


def adapter_bytes(adapter: Adapter, rank: int) -> int:
    """Bytes of the rank-`rank` adapter's tensors, in their stored dtype (what a truncated file holds)."""
    from safetensors import safe_open

    total = 0
    with safe_open(adapter.path / ADAPTER_WEIGHTS, framework="pt") as weights:
        for name in weights.keys():
            tensor_slice = weights.get_slice(name)
            shape = list(tensor_slice.get_shape())
            dim = _rank_dim(name)
            if dim is not None:
                shape[dim] = min(rank, shape[dim])
            numel = 1
            for size in shape:
                numel *= size
            total += numel * _DTYPE_BYTES[tensor_slice.get_dtype()]
    return total


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}


def _rank_dim(name: str) -> int | None:
    match = _LORA_KEY.match(name)
    if not match or name.endswith(".bias"):
        return None
    return 0 if match["kind"] in ("lora_A", "lora_embedding_A") else 1


def truncate_adapter(src: Path, rank: int, out: Path) -> Path:
    """Write the exact rank-`rank` adapter of nested adapter `src` to `out` (atomically)."""
    import torch
    from safetensors.torch import load_file, save_file

    adapter = read_adapter(src)
    rank = adapter.metadata.check_rank(rank)
    with atomic_dir(Path(out)) as tmp:
        tensors = load_file(adapter.path / ADAPTER_WEIGHTS)
        cut: dict[str, torch.Tensor] = {}
        for name, tensor in tensors.items():
            dim = _rank_dim(name)
            cut[name] = tensor if dim is None else tensor.narrow(dim, 0, min(rank, tensor.shape[dim])).contiguous()
        save_file(cut, tmp / ADAPTER_WEIGHTS, metadata={"format": "pt"})
        config = dict(adapter.config, r=min(rank, adapter.config["r"]))
        if config.get("rank_pattern"):
            config["rank_pattern"] = {key: min(rank, value) for key, value in config["rank_pattern"].items()}
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        truncated_metadata(adapter.metadata, rank).save(tmp)
    return Path(out)


def truncated_metadata(metadata: RankMetadata, rank: int) -> RankMetadata:
    return metadata.model_copy(
        update={
            "max_rank": rank,
            "default_rank": min(metadata.default_rank, rank),
            "ranks": [r for r in metadata.ranks if r.rank <= rank],
            "truncated_from": metadata.truncated_from or metadata.max_rank,
        }
    )
