"""The embedded teacher, exported for real: it loads, it answers, it is reused, it is never half-written."""

import json
import os

import pytest
import torch
from conftest import kdlora_cli
from transformers import AutoModelForCausalLM, AutoTokenizer

from training import teacher as teacher_mod

pytestmark = pytest.mark.integration
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def test_export_is_a_normal_checkpoint(teacher_dir):
    names = {p.name for p in teacher_dir.iterdir()}
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "generation_config.json",
    } <= names
    assert not any(name.endswith((".bin", ".pt", ".gguf")) for name in names)


def test_transformers_greedy_answer_contains_paris(teacher_dir):
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32)
    assert model.num_parameters() == 134_515_008
    inputs = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


def test_vllm_server_greedy_answer_contains_paris(vllm_server):
    from openai import OpenAI

    client = OpenAI(base_url=vllm_server + "/v1", api_key="unused")
    reply = client.chat.completions.create(model="teacher", messages=QUESTION, temperature=0.0, max_tokens=16)
    assert "Paris" in reply.choices[0].message.content


def test_second_use_reuses_the_export(teacher_dir):
    before = (teacher_dir / "model.safetensors").stat().st_mtime_ns
    assert teacher_mod.embedded_teacher() == teacher_dir
    assert (teacher_dir / "model.safetensors").stat().st_mtime_ns == before


def test_export_of_another_gguf_is_not_trusted(teacher_dir, tmp_path):
    # a cached export whose marker names another source file is stale, however complete it looks
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in teacher_dir.iterdir():
        os.symlink(path, copy / path.name)
    assert teacher_mod.is_valid_export(copy, teacher_mod.embedded_gguf())
    (copy / teacher_mod.EXPORT_MARKER).unlink()
    (copy / teacher_mod.EXPORT_MARKER).write_text('{"source_sha256": "0000"}')
    assert not teacher_mod.is_valid_export(copy, teacher_mod.embedded_gguf())


def test_interrupted_export_leaves_nothing(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerBase

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(PreTrainedTokenizerBase, "save_pretrained", ctrl_c)  # after the weights are written
    with pytest.raises(KeyboardInterrupt):
        teacher_mod.export_teacher(tmp_path / "teacher")
    assert list(tmp_path.iterdir()) == []


def test_quickstart_runs_end_to_end_and_reuses_finished_stages(tmp_path, monkeypatch, capfd):
    """The README's first command, with seconds of training (--smoke): every stage, real models, real server. Run
    again, it reuses every finished stage (checked up to its server, which would serve the same as the first's)."""
    from kdlora_serve import quickstart

    out = tmp_path / "qs"
    first = kdlora_cli("quickstart", "--smoke", "--out", str(out), timeout=1500)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "importance (calibration)" in first.stderr and "distilling" in first.stderr  # what a reused stage skips
    assert (
        "| rank | accuracy | vs rank 1 (paired) | vs student alone (paired) | unseen wording | KL to teacher | tok/s "
        "| adapter MB |" in first.stdout
    )
    assert "rank 64 vs rank 1, paired over the same 8 held-out examples: accuracy " in first.stdout
    assert "unseen wording (never trained on): rank 64 " in first.stdout
    for row in ("| 0 (student alone) |", "| 1 |", "| 8 |", "| 64 |", "| task teacher (135M) | "):
        assert row in first.stdout
    assert "budget request {'min_quality': " in first.stdout and "budget request {'max_rank': 16" in first.stdout
    assert first.stdout.count("-> served at rank") == 3 and first.stdout.count("'quality_metric': 'accuracy'") == 3
    assert (out / "teacher-bbc" / "model.safetensors").is_file()
    published = out / "hub" / "kdlora" / "smollm2-half-qdylora"
    assert (published / "quality_vs_rank.png").is_file() and (out / "quickstart.png").is_file()
    numbers = json.loads((out / "quickstart.json").read_text())  # the table's numbers, tok/s included
    assert [row["rank"] for row in numbers["ranks"]] == [0, 1, 8, 64] and all(r["tok_s"] > 0 for r in numbers["ranks"])
    assert len(numbers["budgets"]) == 3 and numbers["task_teacher_accuracy"] is not None
    for row in numbers["ranks"]:  # every row's accuracy with its interval, from the same 8 held-out articles
        assert row["articles"] == 8 and row["interval"]["low"] <= row["accuracy"] == row["interval"]["mean"]
        assert 0 <= row["unseen_wording"]["mean"] <= 1  # the same 8 articles, asked in BBC_UNSEEN_WORDING
        assert (row["vs_student_alone"] is None) == (row["rank"] == 0) and (row["vs_rank_1"] is None) == (
            row["rank"] == 1
        )
    assert numbers["task_teacher"]["interval"]["mean"] == numbers["task_teacher_accuracy"]
    assert list(numbers["stage_seconds"]) == [
        "teacher export",
        "task teacher",
        "prune",
        "heal",
        "adapter",
        "publish",
        "serve and query",
    ]
    assert (published / "r8" / "adapter_model.safetensors").is_file()
    assert (out / "hub" / "kdlora" / "smollm2-half" / "pruning_report.json").is_file()

    class Serving(Exception):
        pass

    def serving(*args):
        raise Serving

    monkeypatch.setattr(quickstart, "_serve_and_query", serving)
    capfd.readouterr()
    with pytest.raises(Serving):
        quickstart.run_quickstart(out, mode="smoke")
    second = capfd.readouterr().err
    assert "[5/7]" in second and "[7/7]" in second  # every stage reached
    assert "importance (calibration)" not in second and "distilling" not in second  # stages reused
