"""Data SPECs: every form gives documents, bad ones a clear error, and the held-out split is stable."""

import json

import pytest

from hub.errors import KdloraError
from training.data import load_documents, load_token_data


class CharTokenizer:
    """A real-enough tokenizer for data tests: one id per character, EOS 0, a chat template of its own."""

    eos_token_id = 0
    chat_template = "yes"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + ord(c) % 100 for c in text] for text in texts]}

    def apply_chat_template(self, messages, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages)


def test_builtin_pydoc_is_always_there():
    docs = load_documents("builtin:pydoc")
    assert len(docs) > 50 and any("for" in d for d in docs)


def test_jsonl_records_and_folders(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text")
    (folder / "b.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"text": "one"}, {"messages": [{"role": "user", "content": "hi"}]}, {"prompt": "Q: ", "completion": "A"}]) + "\n\n")
    assert load_documents(str(folder), CharTokenizer()) == ["plain text", "one", "<user>hi", "Q: A"]


def test_heldout_split_is_stable_and_disjoint(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij" * 100)
    first = load_token_data(str(tmp_path / "t.txt"), CharTokenizer(), seq_len=10)
    second = load_token_data(str(tmp_path / "t.txt"), CharTokenizer(), seq_len=10)
    assert first.fingerprint == second.fingerprint and (first.heldout == second.heldout).all()
    assert len(first.train) + len(first.heldout) == 100 and len(first.heldout) == 10


@pytest.mark.parametrize("content, message", [
    ("", "has 0 tokens: too little for one training and one held-out block of --seq-len 16"),
    ("short", "has 6 tokens: too little"),
])
def test_too_little_data(tmp_path, content, message):
    (tmp_path / "t.txt").write_text(content)
    with pytest.raises(KdloraError, match=message):
        load_token_data(str(tmp_path / "t.txt"), CharTokenizer(), seq_len=16)


def test_bad_specs(tmp_path):
    with pytest.raises(KdloraError, match="unknown data SPEC 'builtin:wiki'; the built-in corpus is builtin:pydoc"):
        load_documents("builtin:wiki")
    with pytest.raises(KdloraError, match="is not a file, a folder, hf:NAME"):
        load_documents(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(KdloraError, match=r"bad.jsonl:2 is not valid JSON"):
        load_documents(str(tmp_path / "bad.jsonl"))
    (tmp_path / "odd.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(KdloraError, match=r'odd.jsonl:1: expected an object with "text", "messages", or "prompt" \+ "completion"'):
        load_documents(str(tmp_path / "odd.jsonl"))
