"""Each distillation loss against a hand computation."""

import math

import pytest
import torch

from training.losses import ForwardKLLoss, KDLoss, NextTokenLoss


def test_kl_is_zero_for_identical_distributions_and_positive_otherwise():
    logits = torch.randn(2, 5, 11)
    assert ForwardKLLoss(2.0)(logits, logits).item() == pytest.approx(0.0, abs=1e-6)
    assert ForwardKLLoss(2.0)(logits, logits + torch.randn(2, 5, 11)).item() > 0


def test_kl_matches_hand_computation_with_temperature():
    student, teacher = torch.tensor([[[0.0, 1.0]]]), torch.tensor([[[1.0, 0.0]]])
    t = 2.0
    p = torch.softmax(teacher[0, 0] / t, -1)
    q = torch.softmax(student[0, 0] / t, -1)
    expected = (p * (p / q).log()).sum().item() * t * t
    assert ForwardKLLoss(t)(student, teacher).item() == pytest.approx(expected, rel=1e-6)


def test_kl_direction_is_teacher_to_student():
    student, teacher = torch.tensor([[[0.0, 3.0, 0.0]]]), torch.tensor([[[2.0, 0.0, 0.0]]])
    forward = ForwardKLLoss(1.0)(student, teacher).item()
    reverse = ForwardKLLoss(1.0)(teacher, student).item()
    assert forward != pytest.approx(reverse)


def test_next_token_loss_is_log_vocab_for_uniform_logits():
    assert NextTokenLoss()(torch.zeros(1, 4, 8), torch.tensor([[1, 2, 3, 4]])).item() == pytest.approx(math.log(8))


def test_kd_loss_mixes_by_alpha():
    student, teacher, labels = torch.randn(1, 3, 7), torch.randn(1, 3, 7), torch.tensor([[0, 1, 2]])
    kl = ForwardKLLoss(2.0)(student, teacher).item()
    ce = NextTokenLoss()(student, labels).item()
    loss, parts = KDLoss(alpha=0.25, temperature=2.0)(student, teacher, labels)
    assert loss.item() == pytest.approx(0.25 * kl + 0.75 * ce, rel=1e-6)
    assert parts == {"kl": pytest.approx(kl), "ce": pytest.approx(ce)}
    with pytest.raises(ValueError, match=r"kd alpha must be in \[0, 1\], got 1.5"):
        KDLoss(alpha=1.5)
