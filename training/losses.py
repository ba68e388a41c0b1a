"""Distillation losses, each a small module (torchtune's kd_losses style). Shapes: logits [batch, tokens,
vocab], labels [batch, tokens]; position t predicts token t+1, so callers pass shifted views."""

import torch
import torch.nn.functional as F
from torch import nn


class ForwardKLLoss(nn.Module):
    """KL(teacher || student) per token at temperature T, times T^2 (Hinton et al.: keeps gradient scale
    independent of T), averaged over tokens. Zero exactly when the two distributions agree."""

    def __init__(self, temperature: float = 1.0):
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.temperature = temperature

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        t = self.temperature
        student_logp = F.log_softmax(student_logits.float() / t, dim=-1)
        teacher_logp = F.log_softmax(teacher_logits.float() / t, dim=-1)
        per_token = (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1)
        return per_token.mean() * t * t


class NextTokenLoss(nn.Module):
    """Plain next-token cross-entropy on the data's own tokens."""

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), labels.reshape(-1))


class KDLoss(nn.Module):
    """KD-LoRA's objective: alpha * KL(teacher || student; T) + (1 - alpha) * next-token CE."""

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0):
        super().__init__()
        if not 0 <= alpha <= 1:
            raise ValueError(f"kd alpha must be in [0, 1], got {alpha}")
        self.alpha = alpha
        self.kl = ForwardKLLoss(temperature)
        self.ce = NextTokenLoss()

    def forward(self, student_logits, teacher_logits, labels) -> tuple[torch.Tensor, dict[str, float]]:
        """`teacher_logits` may be None when alpha is 0 (plain fine-tuning on the labels)."""
        ce = self.ce(student_logits, labels)
        if self.alpha == 0:
            return ce, {"ce": ce.item()}
        kl = self.kl(student_logits, teacher_logits)
        loss = self.alpha * kl + (1 - self.alpha) * ce
        return loss, {"kl": kl.item(), "ce": ce.item()}
