"""The quickstart's table: accuracy with its interval and paired differences, for rows built by hand."""

import pytest

from hub.intervals import interval, paired_difference
from hub.schema import Quality, RankResult
from kdlora_serve.quickstart import _accuracy_evidence, _plot, _table, _table_json, _unseen_wording_line


def _quality(scores, rank=None):
    fields = {"kl_to_teacher": 0.5, "task_metrics": {"accuracy": sum(scores) / len(scores)}}
    fields["task_outcomes"] = {"accuracy": scores}
    return RankResult(rank=rank, **fields) if rank else Quality(**fields)


def test_rows_show_intervals_and_paired_differences(tmp_path):
    alone = _quality([0.0, 0.0, 1.0, 0.0, 0.0, 1.0])
    rank_1 = _quality([1.0, 0.0, 1.0, 0.0, 1.0, 1.0], rank=1)
    rank_8 = _quality([1.0, 1.0, 1.0, 0.0, 1.0, 1.0], rank=8)
    unseen = [1.0, 0.0, 1.0, 0.0, 1.0, 1.0]  # the same articles, asked in a wording training never used
    rank_8.task_metrics["accuracy_unseen_wording"] = 4 / 6
    rank_8.task_outcomes["accuracy_unseen_wording"] = unseen
    teacher = Quality(task_metrics={"accuracy": 0.9})  # an adapter from before per-article scores: the mean alone
    rows = [
        {"rank": 0, "quality": alone, "tok_s": 20.0},
        {"rank": 1, "quality": rank_1, "tok_s": 19.0, "mb": 0.5},
        {"rank": 8, "quality": rank_8, "tok_s": 18.0, "mb": 4.0},
        {"rank": None, "quality": teacher},
    ]
    for row in rows:
        row["evidence"] = _accuracy_evidence(row["quality"], rank_1=rank_1, alone=alone)
    scores = {name: q.task_outcomes["accuracy"] for name, q in (("alone", alone), ("1", rank_1), ("8", rank_8))}
    up = paired_difference(scores["8"], scores["1"])  # by hand: one article gained, none lost: +1/6
    assert abs(up.mean - 1 / 6) < 1e-12
    assert _table(tmp_path / "a", rows).splitlines()[3:] == [
        f"| 0 (student alone) | {interval(scores['alone'])} | {paired_difference(scores['alone'], scores['1']).signed()} | – | – | 0.500 | 20.0 | 0.00 |",
        f"| 1 | {interval(scores['1'])} | – | {paired_difference(scores['1'], scores['alone']).signed()} | – | 0.500 | 19.0 | 0.50 |",
        f"| 8 | 0.833 [{interval(scores['8']).low:.3f}, 1.000] | {up.signed()} | {paired_difference(scores['8'], scores['alone']).signed()} | {interval(unseen)} | 0.500 | 18.0 | 4.00 |",
        "| task teacher (135M) | 0.900 | – | – | – | 0 | – | – |",
    ]
    numbers = _table_json(rows, "gain", [], {"prune": 1.5})
    assert numbers["ranks"][2]["vs_rank_1"] == {"mean": up.mean, "low": up.low, "high": up.high}
    assert numbers["ranks"][2]["articles"] == 6 and numbers["task_teacher"]["interval"] is None
    assert numbers["task_teacher_accuracy"] == 0.9 and numbers["rank_gain"] == "gain"
    assert numbers["stage_seconds"] == {"prune": 1.5}
    assert _unseen_wording_line(rows) == (
        "unseen wording (never trained on): rank 8 0.667, the task teacher was not asked it"
    )
    rows[3]["evidence"]["unseen_wording"] = interval([1.0, 1.0, 1.0, 0.0, 1.0, 1.0])
    assert _unseen_wording_line(rows) == (
        "unseen wording (never trained on): rank 8 0.667, the task teacher 0.833: 80.0% of the teacher's accuracy"
    )
    _plot(rows, tmp_path / "quickstart.png")  # error bars where intervals exist
    assert (tmp_path / "quickstart.png").stat().st_size > 0


@pytest.mark.parametrize(
    "native, cuda, expected", [(True, False, "bf16"), (False, False, "fp32"), (False, True, "auto")]
)
def test_training_dtype_follows_the_device(monkeypatch, native, cuda, expected):
    """Both CPU kinds, forced: bf16 autocast only where the CPU computes bf16 natively; a GPU keeps distill's auto."""
    import torch

    from kdlora_serve import engine
    from kdlora_serve.quickstart import training_dtype

    monkeypatch.setattr(engine, "native_bf16", lambda: native)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert training_dtype() == expected
