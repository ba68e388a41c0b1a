"""NF4 on every CPU: a base kdlora trains never takes bitsandbytes' packed AVX512-BF16 path (no backward;
widths a pruned student need not have), and its optional-kernels note never reaches users. The packed-path
decision is forced on here (bitsandbytes makes it per layer from the CPU at construction), so these tests
fail on any CPU when a trained layer reaches the packed conversion, which is plain torch code."""

import logging

import pytest
import torch
from conftest import tiny_checkpoint

from training.nf4 import KERNELS_NOTE, keep_trainable, quiet_kernels_note


@pytest.fixture
def packed_path_forced(monkeypatch):
    """Every Linear4bit built from now on chooses the packed path, as on a CPU with AVX512-BF16."""
    import bitsandbytes.nn.modules

    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: True)


def test_a_trained_base_keeps_its_input_gradients_after_an_eval(packed_path_forced, capsys):
    """distill evaluates the student alone, then trains: on the packed path the second half has no backward."""
    import bitsandbytes as bnb

    def input_grad(layer, x):
        x = x.clone().requires_grad_(True)
        layer(x).square().sum().backward()
        return x.grad

    torch.manual_seed(0)
    weight, x = torch.randn(64, 128), torch.randn(3, 128)
    layers = []
    for _ in range(2):
        layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", module=layer)._quantize("cpu")
        layers.append(layer)
    fresh, evaluated = layers
    assert keep_trainable(torch.nn.Sequential(evaluated)) == 1
    assert capsys.readouterr().err == (
        "NF4: 1 4-bit layers use bitsandbytes' generic CPU path: its packed AVX512-BF16 path has no "
        "backward, so gradients would stop at the frozen base\n"
    )
    evaluated.eval()
    with torch.no_grad():
        evaluated(x)
    evaluated.train()
    reference = input_grad(fresh.requires_grad_(False), x)  # generic path, never evaluated
    assert torch.equal(input_grad(evaluated, x), reference)


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])  # bf16: the LoRA under autocast, as the quickstart on AVX512-BF16
def test_nf4_distillation_is_the_same_on_every_cpu(packed_path_forced, tiny_pair, tmp_path, monkeypatch, dtype):
    """The tiny student's widths all fit the packed format; forcing it on must not change one trained weight, in fp32
    and in bf16 (where the base computes in bf16 and the LoRA under bf16 autocast)."""
    import bitsandbytes.nn.modules
    from safetensors.torch import load_file

    from training.distill import DistillConfig, run_distill

    teacher, student = tiny_pair
    settings = dict(
        student=str(student),
        teacher=str(teacher),
        max_rank=4,
        quantize="nf4",
        steps=3,
        batch_size=2,
        seq_len=32,
        eval_samples=2,
        data="builtin:pydoc",
        dtype=dtype,
    )
    run_distill(DistillConfig(out=tmp_path / "packed-cpu", **settings))
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False)
    run_distill(DistillConfig(out=tmp_path / "other-cpu", **settings))
    packed, other = (load_file(tmp_path / name / "adapter_model.safetensors") for name in ("packed-cpu", "other-cpu"))
    assert packed.keys() == other.keys() and all(torch.equal(packed[k], other[k]) for k in packed)


def test_odd_width_student_distills_in_nf4_with_the_packed_path_forced(
    packed_path_forced, tiny_pair, real_tokenizer_dir, tmp_path
):
    from hub.schema import load_metadata
    from training.distill import DistillConfig, run_distill

    teacher, _ = tiny_pair
    # hidden 40: no layer's widths fit the packed format (like SmolLM2 pruned to hidden 360)
    student = tiny_checkpoint(tmp_path / "student", real_tokenizer_dir, seed=2, hidden_size=40, intermediate_size=64)
    run_distill(
        DistillConfig(
            student=str(student),
            teacher=str(teacher),
            out=tmp_path / "adapter",
            max_rank=4,
            quantize="nf4",
            steps=2,
            batch_size=2,
            seq_len=32,
            eval_samples=2,
            data="builtin:pydoc",
        )
    )
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
    assert torch.equal(eval_logits(), as_built)  # a base kdlora loads never packs: the same generic path either way


def test_the_optional_kernels_note_is_dropped_and_nothing_else(caplog):
    quiet_kernels_note()
    quiet_kernels_note()  # idempotent
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with caplog.at_level(logging.WARNING, logger="bitsandbytes.backends.cpu.ops"):
        logger.warning(
            KERNELS_NOTE + ": %s. Please make sure you already `pip install kernels`", "No module named 'kernels'"
        )
        logger.warning("a real bitsandbytes problem")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]
