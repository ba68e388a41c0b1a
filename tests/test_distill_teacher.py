"""A short distillation from the real embedded teacher into the pruned student lowers held-out KL at
every evaluated rank, and the adapter's metadata holds the numbers."""

import json

import pytest
from conftest import kdlora_cli

from hub.schema import load_metadata

pytestmark = pytest.mark.integration


def test_short_qdylora_run_lowers_kl_at_every_rank(pruned_student, tmp_path):
    out = tmp_path / "adapter"
    result = kdlora_cli(
        "distill",
        "--student",
        str(pruned_student),
        "--out",
        str(out),
        "--steps",
        "12",
        "--batch-size",
        "4",
        "--seq-len",
        "64",
        "--max-rank",
        "8",
        "--lr",
        "1e-3",
        "--eval-samples",
        "8",
        timeout=1200,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    meta = load_metadata(out)
    assert meta.recipe.quantization == "nf4" and meta.teacher.id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert [r.rank for r in meta.ranks] == [1, 2, 4, 8]
    before = meta.base_quality.kl_to_teacher
    for result in meta.ranks:
        assert result.kl_to_teacher < before, f"rank {result.rank}: KL {result.kl_to_teacher} not below {before}"
    report = json.loads((out / "distill_report.json").read_text())
    assert report["before"]["kl_to_teacher"] == pytest.approx(before)
