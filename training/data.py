"""Text data for calibration, distillation and evaluation, from one SPEC string.

SPEC forms (shared by `kdlora prune` and `kdlora distill`):
- `builtin:pydoc`   Python's own documentation (`pydoc_data.topics`): always there, offline (default).
- a `.txt` / `.md` file (one document), a `.jsonl` file (one per line: `{"text": ...}`,
  `{"messages": [...]}` rendered with the tokenizer's chat template, or `{"prompt", "completion"}`),
  or a folder of such files (recursively, sorted).
- `hf:NAME[:CONFIG][:SPLIT]` a Hugging Face `datasets` dataset (needs `pip install datasets`).

Documents are tokenized, joined with EOS, and cut into blocks of `seq_len` tokens. A fixed slice of the
blocks (chosen with a seed of its own, so it never depends on the training seed) is held out: training
never sees it, and every evaluation (pruning report, per-rank quality) uses it.
"""

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from hub.errors import KdloraError

DEFAULT_DATA = "builtin:pydoc"
HELDOUT_FRACTION = 0.1
_SPLIT_SEED = 1234
_TEXT_SUFFIXES = (".txt", ".md")


@dataclass
class TokenData:
    spec: str
    train: torch.Tensor  # [n_train, seq_len] token ids
    heldout: torch.Tensor  # [n_heldout, seq_len]
    fingerprint: str  # sha256 of all blocks: two runs on "the same data" can prove it


def load_documents(spec: str, tokenizer=None) -> list[str]:
    """The documents named by SPEC, as strings (chat records rendered with `tokenizer`'s template)."""
    if spec == "builtin:pydoc":
        import pydoc_data.topics

        return [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    if spec.startswith("hf:"):
        return _hf_documents(spec)
    if spec.startswith("builtin:"):
        raise KdloraError(f"unknown data SPEC '{spec}'; the built-in corpus is builtin:pydoc")
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (*_TEXT_SUFFIXES, ".jsonl") and p.is_file())
        if not files:
            raise KdloraError(f"data folder {path} has no .txt, .md or .jsonl files")
        return [doc for file in files for doc in _file_documents(file, tokenizer)]
    if path.is_file():
        return _file_documents(path, tokenizer)
    raise KdloraError(f"data SPEC '{spec}' is not a file, a folder, hf:NAME[:CONFIG][:SPLIT] or builtin:pydoc")


def _file_documents(path: Path, tokenizer) -> list[str]:
    if path.suffix in _TEXT_SUFFIXES:
        return [path.read_text(encoding="utf-8")]
    if path.suffix != ".jsonl":
        raise KdloraError(f"data file {path} must be .txt, .md or .jsonl")
    documents = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise KdloraError(f"{path}:{number} is not valid JSON ({err.msg}); each line must be one JSON object") from err
        documents.append(_record_text(record, tokenizer, f"{path}:{number}"))
    return documents


def _record_text(record, tokenizer, where: str) -> str:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise KdloraError(f"{where} is a chat record but the tokenizer has no chat template; use {{\"text\": ...}} records")
        return tokenizer.apply_chat_template(record["messages"], tokenize=False)
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        return record["prompt"] + record["completion"]
    raise KdloraError(f"{where}: expected an object with \"text\", \"messages\", or \"prompt\" + \"completion\"")


def _hf_documents(spec: str) -> list[str]:
    name, config, split = (spec.removeprefix("hf:").split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError as err:
        raise KdloraError(f"data SPEC {spec} needs the `datasets` package: pip install datasets") from err
    try:
        dataset = datasets.load_dataset(name, config or None, split=split or "train")
    except Exception as err:  # datasets raises many types for a missing name, config or split
        raise KdloraError(f"cannot load dataset {spec} ({type(err).__name__}: {err})") from err
    column = "text" if "text" in dataset.column_names else next(
        (c for c, feature in dataset.features.items() if getattr(feature, "dtype", None) == "string"), None)
    if column is None:
        raise KdloraError(f"dataset {spec} has no text column (columns: {', '.join(dataset.column_names)})")
    return [text for text in dataset[column] if text]


def load_token_data(spec: str, tokenizer, seq_len: int) -> TokenData:
    """Tokenize SPEC into `seq_len` blocks and split off the held-out blocks."""
    if seq_len < 2:
        raise KdloraError(f"--seq-len must be at least 2, got {seq_len}")
    documents = [doc for doc in load_documents(spec, tokenizer) if doc.strip()]
    if tokenizer.eos_token_id is None:
        raise KdloraError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
    stream: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"] if documents else []:
        stream += ids + [tokenizer.eos_token_id]
    n_blocks = len(stream) // seq_len
    if n_blocks < 2:
        raise KdloraError(
            f"data SPEC '{spec}' has {len(stream)} tokens: too little for one training and one held-out block of "
            f"--seq-len {seq_len}; give more text or a smaller --seq-len"
        )
    blocks = torch.tensor(stream[: n_blocks * seq_len]).view(n_blocks, seq_len)
    order = torch.randperm(n_blocks, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    n_heldout = max(1, round(n_blocks * HELDOUT_FRACTION))
    heldout, train = blocks[order[:n_heldout]], blocks[order[n_heldout:]]
    fingerprint = hashlib.sha256(blocks.numpy().tobytes()).hexdigest()
    return TokenData(spec=spec, train=train, heldout=heldout, fingerprint=fingerprint)
