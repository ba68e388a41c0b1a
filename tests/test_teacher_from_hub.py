"""`--teacher ORG/NAME[@REVISION]` through a Hub (tests/hf_server.py): prune, distill and the teacher cache download the
teacher at one commit and pin that commit in what they write, so a teacher whose `main` moves on is still named."""

import json

import pytest
import torch
from conftest import tiny_checkpoint
from hf_server import point_client_at, serve_fake_hub
from safetensors.torch import load_file

from hub.errors import KdloraError
from hub.remote import PRUNING_REPORT
from hub.schema import ModelRef, load_metadata
from kdlora_serve.serve import free_port
from training.distill import DistillConfig, run_distill
from training.prune import run_prune
from training.teacher_cache import build_cache

TEACHER = dict(hidden_size=64, intermediate_size=128)
TEXT = "A teacher on the Hub is downloaded at one commit, and that commit is what the student's lineage names. " * 4


@pytest.fixture
def hub(monkeypatch, tmp_path, real_tokenizer_dir):
    """A fake Hub holding kd/teacher (with a pickle beside the safetensors, which must never be fetched)."""
    with serve_fake_hub() as (url, hub):
        point_client_at(monkeypatch, url, tmp_path / "hf_home")
        hub.create_repo("kd/teacher")
        push_teacher(hub, tiny_checkpoint(tmp_path / "teacher", real_tokenizer_dir, seed=0, **TEACHER))
        hub.url = url
        yield hub


@pytest.fixture
def text(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text(TEXT)
    return str(path)


def push_teacher(hub, checkpoint) -> str:
    files = {p.name: p.read_bytes() for p in checkpoint.iterdir()}
    return hub.commit("kd/teacher", files | {"pytorch_model.bin": b"not to be unpickled"})


def prune(out, teacher, text):
    run_prune(
        out, teacher, calib_data=text, calib_samples=8, seq_len=16, batch_size=4, intermediate_size=96,
        num_attention_heads=2,
    )  # fmt: skip
    return json.loads((out / PRUNING_REPORT).read_text()), load_file(out / "model.safetensors")


def test_prune_pins_the_commit_it_pruned_and_a_pinned_revision_loads_the_old_weights(
    hub, text, tmp_path, real_tokenizer_dir
):
    old = hub.commits("kd/teacher")[-1]
    report, student = prune(tmp_path / "a", "kd/teacher", text)
    assert (report["teacher"], report["teacher_revision"]) == ("kd/teacher", old)
    assert "pytorch_model.bin" not in hub.fetched_files("kd/teacher")
    assert (tmp_path / "a" / "README.md").read_text().startswith("---\nbase_model: kd/teacher\n")

    new = push_teacher(hub, tiny_checkpoint(tmp_path / "other", real_tokenizer_dir, seed=5, **TEACHER))  # main moves
    pinned, pinned_student = prune(tmp_path / "b", f"kd/teacher@{old}", text)
    assert (pinned["teacher"], pinned["teacher_revision"]) == ("kd/teacher", old)
    assert pinned_student.keys() == student.keys()
    assert all(torch.equal(pinned_student[name], student[name]) for name in student)  # the old teacher, pruned again

    moved, moved_student = prune(tmp_path / "c", "kd/teacher@main", text)
    assert moved["teacher_revision"] == new
    assert not torch.equal(moved_student["model.embed_tokens.weight"], student["model.embed_tokens.weight"])


def test_a_missing_repo_or_revision_is_one_line_that_names_it(hub, text, tmp_path):
    with pytest.raises(KdloraError) as missing:
        prune(tmp_path / "a", "kd/missing", text)
    assert str(missing.value) == f"repo kd/missing not found on {hub.url} (if it is private, set HF_TOKEN)"
    with pytest.raises(KdloraError) as no_revision:
        prune(tmp_path / "b", f"kd/teacher@{'0' * 40}", text)
    assert str(no_revision.value) == f"repo kd/teacher has no revision '{'0' * 40}' on {hub.url}"
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_an_unreachable_hub_with_nothing_cached_says_so(monkeypatch, text, tmp_path):
    url = f"http://127.0.0.1:{free_port()}"
    point_client_at(monkeypatch, url, tmp_path / "hf_home")
    with pytest.raises(
        KdloraError, match=rf"^cannot reach the Hub at {url} \(.*\) and kd/teacher is not in the local "
    ):
        prune(tmp_path / "out", "kd/teacher", text)


@pytest.fixture
def student(tmp_path, real_tokenizer_dir):
    return str(tiny_checkpoint(tmp_path / "student", real_tokenizer_dir, seed=1))


def distill_config(out, text, student, **overrides) -> DistillConfig:
    settings = dict(
        student=student,
        teacher="kd/teacher",
        out=out,
        data=text,
        steps=2,
        batch_size=2,
        seq_len=16,
        max_rank=4,
        eval_ranks=(1, 4),
        eval_samples=2,
        quantize="none",
        lr=1e-2,
    )
    return DistillConfig(**{**settings, **overrides})


def test_distill_pins_the_teacher_commit_in_kdlora_json(hub, text, student, tmp_path):
    sha = hub.commits("kd/teacher")[-1]
    report = run_distill(distill_config(tmp_path / "adapter", text, student))
    assert load_metadata(tmp_path / "adapter").teacher == ModelRef(id="kd/teacher", revision=sha)
    assert (report["teacher"], report["teacher_revision"]) == ("kd/teacher", sha)


def test_a_teacher_cache_is_used_at_its_commit_and_refused_once_main_moved(
    hub, text, student, tmp_path, real_tokenizer_dir, monkeypatch
):
    from training import teacher as teacher_mod

    old = hub.commits("kd/teacher")[-1]
    cache = build_cache(text, tmp_path / "cache", teacher="kd/teacher", seq_len=16, top_k=8)
    other = tiny_checkpoint(tmp_path / "other", real_tokenizer_dir, seed=5, **TEACHER)
    loads, load = [], teacher_mod.load_causal_lm

    def load_then_move_main(spec, **kwargs):
        loads.append(spec)
        loaded = load(spec, **kwargs)
        if len(loads) == 1:
            push_teacher(hub, other)  # while the run trains from the cache
        return loaded

    monkeypatch.setattr(teacher_mod, "load_causal_lm", load_then_move_main)
    run_distill(distill_config(tmp_path / "adapter", text, student, teacher_cache=cache))
    assert loads == ["kd/teacher", f"kd/teacher@{old}"]  # evaluated with the teacher it trained from
    assert load_metadata(tmp_path / "adapter").teacher == ModelRef(id="kd/teacher", revision=old)

    new = hub.commits("kd/teacher")[-1]
    with pytest.raises(KdloraError) as refused:
        run_distill(distill_config(tmp_path / "later", text, student, teacher_cache=cache))
    assert str(refused.value) == (
        f"--teacher-cache {cache} was made from teacher kd/teacher@{old}, this run's teacher is kd/teacher@{new}; "
        "give the same --teacher (it evaluates), or rebuild the cache"
    )
