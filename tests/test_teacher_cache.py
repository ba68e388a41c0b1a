"""`kdlora teacher cache` and `kdlora distill --teacher-cache`: top-k targets with a tail bucket, equal to online KD
when k covers the vocabulary; RS-KD's sampled targets, unbiased; resumable, and refused when made for another run."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from hub.errors import KdloraError
from training import teacher_cache as cache_mod
from training.distill import DistillConfig, run_distill
from training.losses import ChunkedKDLoss, TeacherLogits, forward_kl
from training.teacher_cache import TeacherCache, TopKTargets, build_cache, sampled

VOCAB = 49152  # the real tokenizer's, which tiny_pair shares
TEXT = (
    "The teacher's targets are computed once and reused by every run. A nested adapter serves every rank. "
    "Distillation compares next-token distributions position by position, so both models share one vocabulary. "
) * 3


def test_top_k_targets_covering_the_vocabulary_equal_the_online_teacher():
    g = torch.Generator().manual_seed(0)
    head, teacher_head = torch.nn.Linear(8, 11, bias=False), torch.nn.Linear(8, 11, bias=False).requires_grad_(False)
    hidden, teacher_hidden, labels = (
        torch.randn(6, 8, generator=g),
        torch.randn(6, 8, generator=g),
        torch.randint(0, 11, (6,), generator=g),
    )
    online_hidden, cached_hidden = hidden.clone().requires_grad_(), hidden.clone().requires_grad_()
    loss = ChunkedKDLoss(1.0, 2.0, chunk_tokens=4)
    online, _ = loss(online_hidden, head, labels, TeacherLogits(teacher_hidden, teacher_head))
    online.backward()
    top = torch.log_softmax(teacher_head(teacher_hidden) / 2.0, dim=-1).topk(11)  # every id, in the cache's order
    cached, _ = loss(cached_hidden, head, labels, TopKTargets(top.values, top.indices.int(), vocab_size=11))
    cached.backward()
    assert cached.item() == pytest.approx(online.item(), rel=1e-6)
    torch.testing.assert_close(cached_hidden.grad, online_hidden.grad, rtol=1e-6, atol=1e-7)


def test_top_k_with_the_tail_bucket_is_the_kl_of_the_merged_distributions():
    """k = 2 of 4 ids: the KL over (p_a, p_b, rest) vs (q_a, q_b, rest), by hand; never above the full KL."""
    teacher_logp = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    student_logits = torch.log(torch.tensor([[0.25, 0.25, 0.25, 0.25]]))
    top = teacher_logp.topk(2)
    targets = TopKTargets(top.values, top.indices.int(), vocab_size=4)
    merged_teacher, buckets = targets.log_probs(0, 1, 1.0)
    merged_student = buckets(torch.log_softmax(student_logits, -1))
    p, q = [0.5, 0.3, 0.2], [0.25, 0.25, 0.5]
    torch.testing.assert_close(merged_teacher.exp(), torch.tensor([p]))
    torch.testing.assert_close(merged_student.exp(), torch.tensor([q]))
    by_hand = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
    full = sum(pi * math.log(pi / 0.25) for pi in (0.5, 0.3, 0.15, 0.05))
    kl = ChunkedKDLoss(1.0, 1.0)._chunk_sums(student_logits, torch.nn.Identity(), torch.tensor([0]), targets, 0, 1)[0]
    assert kl.item() == pytest.approx(by_hand, rel=1e-5) and by_hand < full


def test_rs_kd_targets_are_unbiased_where_top_k_is_not():
    """RS-KD's sampled targets give, averaged over draws, the gradient of the KL to the whole teacher (s - p at T = 1);
    the top-k targets with their tail bucket give another gradient, whatever the number of draws."""
    g = torch.Generator().manual_seed(0)
    teacher_logp = torch.log_softmax(torch.randn(1, 12, generator=g) * 2, dim=-1)
    student_logits = torch.randn(1, 12, generator=g)
    draws = 20_000  # tokens, each with its own 4 draws: the mean's noise (one sd) is under 0.002

    def gradient(logp, ids, sampled):
        logits = student_logits.expand(len(ids), -1).clone().requires_grad_()
        teacher, buckets = TopKTargets(logp, ids.int(), vocab_size=12, sampled=sampled).log_probs(0, len(ids), 1.0)
        forward_kl(logits, teacher, 1.0, buckets).mean().backward()
        return logits.grad.sum(0)  # mean over tokens of each token's gradient

    exact = torch.softmax(student_logits, -1)[0] - teacher_logp.exp()[0]
    target = sampled(teacher_logp.expand(draws, -1), 4, torch.Generator().manual_seed(1)).topk(4)
    torch.testing.assert_close(gradient(target.values, target.indices, True), exact, rtol=0, atol=0.01)
    top = teacher_logp.topk(4)
    assert (gradient(top.values, top.indices, False) - exact).abs().max() > 0.02  # 0.028 here


def test_distilling_from_an_rs_kd_cache(tiny_pair, text_data, tmp_path):
    cache = build_cache(
        str(text_data), tmp_path / "cache", teacher=str(tiny_pair[0]), seq_len=16, top_k=8, sampling="rs-kd"
    )
    settings = json.loads((cache / "cache.json").read_text())
    assert (settings["sampling"], settings["seed"], settings["top_k"]) == ("rs-kd", 0, 8)
    shard = load_file(cache / "rows-00000.safetensors")
    torch.testing.assert_close(
        shard["logp"].exp().sum(-1), torch.ones(len(shard["logp"]))
    )  # each token's shares of 8 draws
    assert ((shard["logp"].exp() * 8).round() - shard["logp"].exp() * 8).abs().max() < 1e-5
    report = run_distill(config(tiny_pair, tmp_path / "out", text_data, teacher_cache=cache))
    assert all(math.isfinite(step["kl"]) and step["kl"] >= 0 for step in report["history"])


@pytest.fixture(scope="module")
def text_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cache_data") / "notes.txt"
    path.write_text(TEXT)
    return path


def config(tiny_pair, out: Path, data: Path, **overrides) -> DistillConfig:
    teacher, student = tiny_pair
    settings = dict(
        student=str(student),
        teacher=str(teacher),
        out=out,
        data=str(data),
        steps=3,
        batch_size=2,
        seq_len=16,
        max_rank=4,
        eval_ranks=(1, 4),
        eval_samples=2,
        quantize="none",
        lr=1e-2,
        loss_chunk_tokens=8,
    )
    return DistillConfig(**{**settings, **overrides})


def test_distilling_from_a_full_vocabulary_cache_equals_online_distillation(tiny_pair, text_data, tmp_path):
    cache = build_cache(
        str(text_data),
        tmp_path / "cache",
        teacher=str(tiny_pair[0]),
        seq_len=16,
        top_k=VOCAB,
        temperature=2.0,
        batch_size=3,
        rows_per_shard=4,
    )
    settings = json.loads((cache / "cache.json").read_text())
    assert (
        settings["top_k"] == VOCAB
        and settings["teacher"] == str(tiny_pair[0])
        and sorted(p.name for p in cache.iterdir())[:2] == ["cache.json", "rows-00000.safetensors"]
    )
    online = run_distill(config(tiny_pair, tmp_path / "online", text_data))
    cached = run_distill(config(tiny_pair, tmp_path / "cached", text_data, teacher_cache=cache))
    for a, b in zip(online["history"], cached["history"]):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5) and b["kl"] == pytest.approx(a["kl"], rel=1e-5)
    cached_weights = load_file(tmp_path / "cached" / "adapter_model.safetensors")
    for name, tensor in load_file(tmp_path / "online" / "adapter_model.safetensors").items():
        torch.testing.assert_close(cached_weights[name], tensor, rtol=1e-4, atol=2e-5)  # Adam after 3 steps of 1e-2
    assert cached["after"]["4"]["kl_to_teacher"] == pytest.approx(
        online["after"]["4"]["kl_to_teacher"], rel=1e-4
    )  # evaluated by the teacher


@pytest.mark.parametrize("sampling", ["top-k", "rs-kd"])
def test_an_interrupted_cache_resumes_to_the_same_files_and_refuses_other_settings(
    tiny_pair, text_data, tmp_path, monkeypatch, sampling
):
    """Also for RS-KD's random draws: seeded per shard, a resumed cache holds the same bytes."""
    whole = build_cache(
        str(text_data),
        tmp_path / "whole",
        teacher=str(tiny_pair[0]),
        seq_len=16,
        top_k=5,
        batch_size=2,
        rows_per_shard=2,
        sampling=sampling,
    )
    calls, real = [], cache_mod._targets

    def crash_in_the_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(cache_mod, "_targets", crash_in_the_second_shard)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        build_cache(
            str(text_data),
            out,
            teacher=str(tiny_pair[0]),
            seq_len=16,
            top_k=5,
            batch_size=2,
            rows_per_shard=2,
            sampling=sampling,
        )
    assert not out.exists() and (tmp_path / "resumed.partial" / "rows-00000.safetensors").exists()
    with pytest.raises(
        KdloraError, match=r"resumed.partial holds a cache made with other settings \(top_k\); rerun with the original"
    ):
        build_cache(
            str(text_data),
            out,
            teacher=str(tiny_pair[0]),
            seq_len=16,
            top_k=6,
            batch_size=2,
            rows_per_shard=2,
            sampling=sampling,
        )
    monkeypatch.setattr(cache_mod, "_targets", real)
    build_cache(
        str(text_data),
        out,
        teacher=str(tiny_pair[0]),
        seq_len=16,
        top_k=5,
        batch_size=2,
        rows_per_shard=2,
        sampling=sampling,
    )
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in whole.iterdir())
    for shard in whole.glob("rows-*.safetensors"):
        for name, tensor in load_file(shard).items():
            assert torch.equal(load_file(out / shard.name)[name], tensor)


def test_a_cache_made_for_another_run_is_refused(tiny_pair, text_data, tmp_path):
    cache = build_cache(str(text_data), tmp_path / "cache", teacher=str(tiny_pair[0]), seq_len=16, top_k=5)
    with pytest.raises(
        KdloraError,
        match=r"was made for other training rows \(data .*notes.txt, --seq-len 16\); give distill the same --data",
    ):
        run_distill(config(tiny_pair, tmp_path / "a", text_data, seq_len=12, teacher_cache=cache))
    with pytest.raises(
        KdloraError, match=r"holds log-probs at temperature 2.0, the run asks --kd-temperature 1.0; use 2.0 or rebuild"
    ):
        run_distill(config(tiny_pair, tmp_path / "b", text_data, kd_temperature=1.0, teacher_cache=cache))
    with pytest.raises(KdloraError, match=r"is not a teacher cache \(no cache.json\)"):
        run_distill(config(tiny_pair, tmp_path / "c", text_data, teacher_cache=tmp_path))
    with pytest.raises(KdloraError, match=r"already exists; a cache is written once"):
        build_cache(str(text_data), cache, teacher=str(tiny_pair[0]), seq_len=16)


def test_data_trained_in_several_wordings_is_refused_before_any_work(tiny_pair, tmp_path):
    rows = [{"prompt": f"q{i}?", "completion": " a", "rewordings": [f"Q{i}!"]} for i in range(20)]
    (tmp_path / "r.jsonl").write_text("\n".join(map(json.dumps, rows)))
    with pytest.raises(
        KdloraError,
        match=r"^--teacher-cache holds the teacher's targets for each row in one wording, and data .*r.jsonl trains "
        r"each row in 2 wordings; drop --teacher-cache \(the teacher then runs online\)$",
    ):
        build_cache(str(tmp_path / "r.jsonl"), tmp_path / "cache", teacher=str(tiny_pair[0]), seq_len=16)
    assert not (tmp_path / "cache").exists()


def test_reading_targets_of_rows_across_shards(tiny_pair, text_data, tmp_path):
    """targets(rows) == the teacher's own top-k at those rows' learned tokens, in the order given."""
    from training.data import load_token_data
    from training.teacher import load_causal_lm

    path = build_cache(
        str(text_data), tmp_path / "cache", teacher=str(tiny_pair[0]), seq_len=16, top_k=3, rows_per_shard=2
    )
    model, tokenizer, _ = load_causal_lm(str(tiny_pair[0]))
    data = load_token_data(str(text_data), tokenizer, 16)
    rows = [3, 0, 2]
    targets = TeacherCache(path, data, 2.0, VOCAB).targets(rows)
    with torch.no_grad():
        logp = torch.log_softmax(model(data.train[rows]).logits[:, :-1].float() / 2.0, dim=-1)[
            data.train_mask[rows][:, 1:]
        ]
    top = logp.topk(3)
    torch.testing.assert_close(targets.logp, top.values, rtol=1e-5, atol=1e-5)
    assert torch.equal(targets.ids, top.indices)
