"""Each distillation loss against a hand computation."""

import math

import pytest
import torch

from training.losses import ChunkedKDLoss, ForwardKLLoss, KDLoss, NextTokenLoss, TeacherLogits


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


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("chunk_tokens", [1, 5, 13, 64])
def test_chunked_kd_loss_equals_the_dense_loss_and_its_gradients(alpha, chunk_tokens):
    """ChunkedKDLoss from hidden states == KDLoss on the full logits, loss and gradients (student hidden states and
    LM head), to 1e-6 in fp32."""
    g = torch.Generator().manual_seed(0)
    head, teacher_head = torch.nn.Linear(16, 50, bias=False), torch.nn.Linear(24, 50, bias=False)
    with torch.no_grad():
        for layer in (head, teacher_head):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g))
    hidden, teacher_hidden = torch.randn(13, 16, generator=g), torch.randn(13, 24, generator=g)
    labels = torch.randint(0, 50, (13,), generator=g)

    teacher_head.requires_grad_(False)  # a frozen teacher, as in training
    dense_hidden = hidden.clone().requires_grad_()
    dense, dense_parts = KDLoss(alpha, 2.0)(head(dense_hidden), teacher_head(teacher_hidden) if alpha else None, labels)
    dense.backward()
    dense_grads = (dense_hidden.grad, head.weight.grad.clone())
    head.weight.grad = None

    chunked_hidden = hidden.clone().requires_grad_()
    teacher = TeacherLogits(teacher_hidden, teacher_head) if alpha else None
    chunked, chunked_parts = ChunkedKDLoss(alpha, 2.0, chunk_tokens)(chunked_hidden, head, labels, teacher)
    chunked.backward()
    assert chunked.item() == pytest.approx(dense.item(), rel=1e-6, abs=1e-6)
    assert chunked_parts == {k: pytest.approx(v, rel=1e-6) for k, v in dense_parts.items()}
    for ours, reference in zip((chunked_hidden.grad, head.weight.grad), dense_grads):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-6)
