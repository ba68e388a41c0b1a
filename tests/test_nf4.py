"""NF4 on every CPU: bitsandbytes' packed AVX512-BF16 path is taken only by layers whose widths it can
hold, and its optional-kernels note never reaches users. The packed-path decision is forced on here
(bitsandbytes makes it per layer from the CPU at construction), so these tests fail on any CPU when a
pruned student's odd widths reach the packed conversion, which is plain torch code."""

import logging

import pytest
import torch

from conftest import tiny_checkpoint
from training.nf4 import KERNELS_NOTE, fits_packed_cpu_format, keep_unpackable_layers_generic, quiet_kernels_note


@pytest.fixture
def packed_path_forced(monkeypatch):
    """Every Linear4bit built from now on chooses the packed path, as on a CPU with AVX512-BF16."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)


@pytest.mark.parametrize("out_features, in_features", [(576, 360), (64, 64), (96, 128), (40, 64), (64, 40), (360, 960), (32, 192)])
def test_the_packed_format_rule_is_bitsandbytes_own(out_features, in_features):
    from bitsandbytes.functional import _convert_weight_packed_for_cpu, quantize_4bit

    weight = torch.randn(out_features, in_features)
    packed_weight, state = quantize_4bit(weight, blocksize=64, quant_type="nf4")
    try:
        _convert_weight_packed_for_cpu(packed_weight, state)
        converts = True
    except (RuntimeError, AssertionError):
        converts = False
    assert fits_packed_cpu_format(out_features, in_features, 64) == converts


def test_only_layers_that_do_not_fit_leave_the_packed_path(packed_path_forced, capsys):
    import bitsandbytes as bnb

    model = torch.nn.Sequential(bnb.nn.Linear4bit(64, 64, quant_type="nf4"), bnb.nn.Linear4bit(360, 576, quant_type="nf4"))
    assert keep_unpackable_layers_generic(model) == 1
    assert [layer.support_avx512bf16_for_cpu for layer in model] == [True, False]
    assert capsys.readouterr().err == ("NF4: 1 of 2 4-bit layers use bitsandbytes' generic CPU path: their widths (360->576) do not fit "
                                       "its packed AVX512-BF16 format (in_features % 64, out_features % 32)\n")


def test_odd_width_student_distills_in_nf4_with_the_packed_path_forced(packed_path_forced, tiny_pair, real_tokenizer_dir, tmp_path):
    from hub.schema import load_metadata
    from training.distill import DistillConfig, run_distill

    teacher, _ = tiny_pair
    # hidden 40: no layer's widths fit the packed format (like SmolLM2 pruned to hidden 360)
    student = tiny_checkpoint(tmp_path / "student", real_tokenizer_dir, seed=2, hidden_size=40, intermediate_size=64)
    run_distill(DistillConfig(student=str(student), teacher=str(teacher), out=tmp_path / "adapter", max_rank=4, quantize="nf4",
                              steps=2, batch_size=2, seq_len=32, eval_samples=2, data="builtin:pydoc"))
    assert load_metadata(tmp_path / "adapter").ranks[-1].kl_to_teacher > 0


@pytest.mark.integration
def test_pruned_student_evaluates_in_nf4_with_the_packed_path_forced(pruned_student, tmp_path, monkeypatch):
    import bitsandbytes.nn.modules

    from training.distill import DistillConfig, build_student

    ids = torch.randint(0, 49152, (2, 16), generator=torch.Generator().manual_seed(0))
    cfg = DistillConfig(student=str(pruned_student), out=tmp_path / "unused", max_rank=4)

    def eval_logits():
        model, _, _ = build_student(cfg, "cpu")
        model.eval()
        with torch.no_grad():
            return model(ids).logits

    as_built = eval_logits()
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)
    assert torch.equal(eval_logits(), as_built)  # hidden 360 fits no packed layer: the same generic path either way


def test_the_optional_kernels_note_is_dropped_and_nothing_else(caplog):
    quiet_kernels_note()
    quiet_kernels_note()  # idempotent
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning(KERNELS_NOTE + ": %s. Please make sure you already `pip install kernels`", "No module named 'kernels'")
        logger.warning("a real bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]
