"""Data SPECs: every form gives documents, bad ones a clear error, and the held-out split is stable."""

import json

import pytest

from hub.errors import KdloraError
from training.data import Example, TextExample, load_records, load_token_data


class CharTokenizer:
    """A real-enough tokenizer for data tests: one id per character, EOS 0, a chat template of its own."""

    eos_token_id = 0
    chat_template = "yes"

    def __call__(self, texts, add_special_tokens=False):
        return {"input_ids": [[1 + ord(c) % 100 for c in text] for text in texts]}

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        return "".join(f"<{m['role']}>{m['content']}" for m in messages) + (
            "<assistant>" if add_generation_prompt else ""
        )


def test_builtin_pydoc_is_always_there():
    docs = load_records("builtin:pydoc")
    assert len(docs) > 50 and any("for" in d for d in docs)


def test_jsonl_records_and_folders(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.txt").write_text("plain text")
    (folder / "b.jsonl").write_text(
        "\n".join(
            json.dumps(r)
            for r in [
                {"text": "one"},
                {"messages": [{"role": "user", "content": "hi"}]},
                {"prompt": "Q: ", "completion": "A"},
            ]
        )
        + "\n\n"
    )
    (folder / "c.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo "}]}) + "\n"
    )
    assert load_records(str(folder), CharTokenizer()) == [
        "plain text",
        "one",
        "<user>hi",
        TextExample("Q: ", "A"),
        TextExample("<user>hi<assistant>", "yo"),
    ]


def test_heldout_split_is_stable_and_disjoint(tmp_path):
    (tmp_path / "t.txt").write_text("abcdefghij" * 100)
    first = load_token_data(str(tmp_path / "t.txt"), CharTokenizer(), seq_len=10)
    second = load_token_data(str(tmp_path / "t.txt"), CharTokenizer(), seq_len=10)
    assert first.fingerprint == second.fingerprint and (first.heldout == second.heldout).all()
    assert len(first.train) + len(first.heldout) == 100 and len(first.heldout) == 10


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "has 0 tokens: too little for one training and one held-out block of --seq-len 16"),
        ("short", "has 6 tokens: too little"),
    ],
)
def test_too_little_data(tmp_path, content, message):
    (tmp_path / "t.txt").write_text(content)
    with pytest.raises(KdloraError, match=message):
        load_token_data(str(tmp_path / "t.txt"), CharTokenizer(), seq_len=16)


def test_bad_specs(tmp_path):
    with pytest.raises(
        KdloraError, match="unknown data SPEC 'builtin:wiki'; the built-in data are builtin:pydoc and builtin:bbc-news"
    ):
        load_records("builtin:wiki")
    with pytest.raises(KdloraError, match="is not a file, a folder, hf:NAME"):
        load_records(str(tmp_path / "missing.txt"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{oops\n')
    with pytest.raises(KdloraError, match=r"bad.jsonl:2 is not valid JSON"):
        load_records(str(tmp_path / "bad.jsonl"))
    (tmp_path / "odd.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(
        KdloraError, match=r'odd.jsonl:1: expected an object with "text", "messages", or "prompt" \+ "completion"'
    ):
        load_records(str(tmp_path / "odd.jsonl"))


def test_examples_are_rows_that_learn_only_the_answer(tmp_path):
    records = [
        {"prompt": "ab", "completion": "c"},
        {"prompt": "0123456789", "completion": "xy"},
        {"prompt": "q", "completion": "zz"},
    ]
    (tmp_path / "e.jsonl").write_text("\n".join(map(json.dumps, records)))
    data = load_token_data(str(tmp_path / "e.jsonl"), CharTokenizer(), seq_len=6)
    rows = {
        tuple(r.tolist()): m.tolist()
        for r, m in zip([*data.train, *data.heldout], [*data.train_mask, *data.heldout_mask])
    }
    ids = lambda text: [1 + ord(c) % 100 for c in text]  # noqa: E731  (CharTokenizer)
    assert (
        rows
        == {  # prompt + answer + EOS (0), right-padded with EOS; a long prompt loses its start, never the answer
            (*ids("ab"), *ids("c"), 0, 0, 0): [False, False, True, True, False, False],
            (*ids("789"), *ids("xy"), 0): [False, False, False, True, True, True],
            (*ids("q"), *ids("zz"), 0, 0, 0): [False, True, True, True, False, False],
        }
    )
    assert len(data.heldout) == 1 and len(data.heldout_examples) == 1 and data.heldout_examples[0].choices is None


def test_labelled_examples_keep_their_options(tmp_path):
    records = [
        {"prompt": f"p{i}", "completion": " no" if i % 2 else " yes", "choices": [" yes", " no"]} for i in range(10)
    ]
    (tmp_path / "l.jsonl").write_text("\n".join(map(json.dumps, records)))
    data = load_token_data(str(tmp_path / "l.jsonl"), CharTokenizer(), seq_len=8)
    ids = lambda text: [1 + ord(c) % 100 for c in text]  # noqa: E731
    for row, example in zip(data.heldout, data.heldout_examples):
        number = int(chr(example.prompt[1] - 1))  # the digit of "p<digit>"
        assert example == Example(
            ids(f"p{number}"), ids(" no" if number % 2 else " yes") + [0], [ids(" yes"), ids(" no")], number % 2
        )
        assert row[: len(example.prompt) + len(example.answer)].tolist() == example.prompt + example.answer


def test_bad_examples(tmp_path):
    (tmp_path / "mixed.jsonl").write_text('{"text": "a document"}\n{"prompt": "q", "completion": "a"}\n')
    with pytest.raises(
        KdloraError, match=r"mixes documents \(1\) and prompt/answer examples \(1\): .* train on one kind at a time"
    ):
        load_token_data(str(tmp_path / "mixed.jsonl"), CharTokenizer(), seq_len=8)
    (tmp_path / "choices.jsonl").write_text('{"prompt": "q", "completion": "a", "choices": ["b", "c"]}\n')
    with pytest.raises(
        KdloraError, match=r'choices.jsonl:1: "choices" must be a list of strings that contains the completion'
    ):
        load_records(str(tmp_path / "choices.jsonl"))
    (tmp_path / "one.jsonl").write_text('{"prompt": "q", "completion": "a"}\n')
    with pytest.raises(KdloraError, match="has 1 example\\(s\\): too few for one training and one held-out example"):
        load_token_data(str(tmp_path / "one.jsonl"), CharTokenizer(), seq_len=8)


def test_builtin_bbc_news():
    records = load_records("builtin:bbc-news")
    assert len(records) == 2225 and {r.completion for r in records} == {
        " business",
        " entertainment",
        " politics",
        " sports",
        " tech",
    }
    assert records[0].prompt.startswith(
        "Which topic is this news article about: business, entertainment, politics, sports or tech?"
    )
    assert (
        records[0].prompt.endswith("\n\nTopic:")
        and records[0].choices[records[0].choices.index(records[0].completion)] == records[0].completion
    )
    # the same question in four more wordings to train on, and one more that training never sees
    assert len(records[0].rewordings) == 4 and records[0].unseen_wording not in (
        records[0].prompt,
        *records[0].rewordings,
    )
    title = records[0].prompt.split("\n\n")[1].split("\n")[0]
    assert all(title in wording for wording in (*records[0].rewordings, records[0].unseen_wording))


def test_rewordings_train_each_row_in_a_drawn_wording(tmp_path):
    records = [
        {
            "prompt": f"q{i}?",
            "completion": " yes",
            "choices": [" yes", " no"],
            "rewordings": [f"Q{i}!", f"question {i}:"],
            "unseen_wording": f"new {i}",
        }
        for i in range(10)
    ]
    (tmp_path / "r.jsonl").write_text("\n".join(map(json.dumps, records)))
    data = load_token_data(str(tmp_path / "r.jsonl"), CharTokenizer(), seq_len=16)
    ids = lambda text: [1 + ord(c) % 100 for c in text]  # noqa: E731
    row = lambda prompt: ids(prompt) + ids(" yes") + [0] * (16 - len(prompt) - 4)  # noqa: E731  (EOS, then padding)
    i = next(i for i in range(10) if data.train[0].tolist() == row(f"q{i}?"))  # the record training row 0 holds
    assert data.train_wordings[:, 0].tolist() == [row(f"q{i}?"), row(f"Q{i}!"), row(f"question {i}:")]
    for held, example in zip(data.heldout, data.unseen_examples):
        i = next(i for i in range(10) if held.tolist() == row(f"q{i}?"))
        assert example.prompt == ids(f"new {i}")  # the same held-out example, asked in the unseen wording
    rows, masks = data.train_rows([3, 1], step=7, seed=0)
    assert rows.tolist() == data.train_rows([3, 1], step=7, seed=0)[0].tolist()  # a pure function of (seed, step)
    assert all(row.tolist() in data.train_wordings[:, i].tolist() for row, i in zip(rows, [3, 1]))
    assert masks.sum(1).tolist() == [5, 5]  # " yes" (4 characters) + EOS, in any wording
    unscored = [{k: v for k, v in r.items() if k != "choices"} for r in records]
    (tmp_path / "r.jsonl").write_text("\n".join(map(json.dumps, unscored)))
    with pytest.raises(KdloraError, match=r'an unseen wording is scored by accuracy, so its examples need "choices"$'):
        load_token_data(str(tmp_path / "r.jsonl"), CharTokenizer(), seq_len=16)
    records[1]["rewordings"] = ["only one"]
    (tmp_path / "r.jsonl").write_text("\n".join(map(json.dumps, records)))
    with pytest.raises(KdloraError, match=r"every example needs the same number of rewordings, got \[1, 2\]$"):
        load_token_data(str(tmp_path / "r.jsonl"), CharTokenizer(), seq_len=16)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "q", "completion": "a", "rewordings": "q2"}\n')
    with pytest.raises(
        KdloraError, match=r'bad.jsonl:1: "rewordings" must be a list of strings and "unseen_wording" a string$'
    ):
        load_records(str(tmp_path / "bad.jsonl"))
