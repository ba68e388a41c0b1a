"""Distillation losses, each a small module (torchtune's kd_losses style). Shapes: logits [batch, tokens,
vocab], labels [batch, tokens]; position t predicts token t+1, so callers pass shifted views.

KDLoss is the definition; training uses ChunkedKDLoss, the same numbers from hidden states without ever
holding the whole batch's [tokens, vocab] logits."""

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from hub.errors import KdloraError


def forward_kl(
    student_logits: torch.Tensor, teacher_logp: torch.Tensor, temperature: float, buckets=None
) -> torch.Tensor:
    """Per-token KL(teacher || student) at temperature T (without the T^2). `buckets`: maps the student's log-probs
    over the vocabulary onto the teacher's entries when the teacher has fewer (a top-k cache); None: one to one."""
    student_logp = F.log_softmax(student_logits.float() / temperature, dim=-1)
    if buckets is not None:
        student_logp = buckets(student_logp)
    return (teacher_logp.exp() * (teacher_logp - student_logp)).sum(dim=-1)


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
        return forward_kl(student_logits, F.log_softmax(teacher_logits.float() / t, dim=-1), t).mean() * t * t


class NextTokenLoss(nn.Module):
    """Plain next-token cross-entropy on the data's own tokens."""

    def forward(self, student_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student_logits.float().reshape(-1, student_logits.shape[-1]), labels.reshape(-1))


class KDLoss(nn.Module):
    """KD-LoRA's objective: alpha * KL(teacher || student; T) + (1 - alpha) * next-token CE."""

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0):
        super().__init__()
        check_alpha(alpha)
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


def check_alpha(alpha: float) -> None:
    if not 0 <= alpha <= 1:
        raise ValueError(f"kd alpha must be in [0, 1], got {alpha}")


class TeacherLogits:
    """The online teacher as a chunked target: its final hidden states at the learned tokens and its LM head; a
    chunk's logits are made when the loss asks (again in backward), never the whole batch's at once."""

    def __init__(self, hidden: torch.Tensor, head: nn.Module):
        self.hidden, self.head = hidden, head

    def log_probs(self, start: int, end: int, temperature: float) -> tuple[torch.Tensor, None]:
        with torch.no_grad():
            return F.log_softmax(self.head(self.hidden[start:end]).float() / temperature, dim=-1), None


class ChunkedKDLoss(nn.Module):
    """KDLoss computed from the student's final hidden states `chunk_tokens` tokens at a time: each chunk's LM head,
    KL and CE are recomputed in backward (activation checkpointing), so only one chunk's [tokens, vocab] logits and
    their softmax copies exist at any time, for student and teacher alike (torchtune and Liger chunk the same way).
    Equal to KDLoss on the full logits (sums over chunks / tokens; tests check 1e-6 in fp32). `teacher`: anything
    with `log_probs(start, end, T) -> (log-probs, buckets or None)` (see forward_kl): TeacherLogits, or a cache's
    top-k targets (training/teacher_cache.py)."""

    def __init__(self, alpha: float = 0.5, temperature: float = 2.0, chunk_tokens: int = 256):
        super().__init__()
        check_alpha(alpha)
        self.alpha, self.temperature, self.chunk_tokens = alpha, temperature, chunk_tokens

    def forward(
        self, hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, teacher=None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """hidden [tokens, d] at the learned positions, labels [tokens]; `teacher` None when alpha is 0."""
        kl_sum = ce_sum = hidden.new_zeros((), dtype=torch.float32)
        for start in range(0, hidden.shape[0], self.chunk_tokens):
            end = min(start + self.chunk_tokens, hidden.shape[0])
            kl, ce = checkpoint(
                self._chunk_sums, hidden[start:end], head, labels[start:end], teacher, start, end, use_reentrant=False
            )
            kl_sum, ce_sum = kl_sum + kl, ce_sum + ce
        ce = ce_sum / hidden.shape[0]
        if self.alpha == 0:
            return ce, {"ce": ce.item()}
        kl = kl_sum / hidden.shape[0] * self.temperature**2
        return self.alpha * kl + (1 - self.alpha) * ce, {"kl": kl.item(), "ce": ce.item()}

    def _chunk_sums(self, hidden, head, labels, teacher, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        logits = head(hidden)
        ce = F.cross_entropy(logits.float(), labels, reduction="sum")
        if teacher is None:
            return ce.new_zeros(()), ce
        teacher_logp, buckets = teacher.log_probs(start, end, self.temperature)
        return forward_kl(logits, teacher_logp, self.temperature, buckets).sum(), ce


class SoftCappedHead(nn.Module):
    """An LM head whose logits are soft-capped to (-cap, cap), as Gemma 2's forward does after its head."""

    def __init__(self, head: nn.Module, cap: float):
        super().__init__()
        self.head, self.cap = head, cap

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.cap * torch.tanh(self.head(hidden) / self.cap)


@contextmanager
def final_hidden_states(model):
    """Within: the model's forward returns its final hidden states where it returns logits (its LM head is an
    Identity meanwhile, its logit soft-capping off), so that the loss applies the head chunk by chunk
    (ChunkedKDLoss). Yields the head, soft-capped where the model's config says so (Gemma 2)."""
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    model.set_output_embeddings(torch.nn.Identity())
    if cap:
        model.config.final_logit_softcapping = None
    try:
        yield SoftCappedHead(head, cap) if cap else head
    finally:
        model.set_output_embeddings(head)
        if cap:
            model.config.final_logit_softcapping = cap


def check_head_split(model, input_ids: torch.Tensor) -> None:
    """The chunked loss needs logits == LM head(final hidden states) (soft-capped where the config says so); a model
    that post-processes its logits otherwise would be trained on the wrong numbers, so it is refused here, by name."""
    with torch.no_grad():
        logits = model(input_ids).logits
        with final_hidden_states(model) as head:
            split = head(model(input_ids).logits)
    if not torch.allclose(split.float(), logits.float(), rtol=1e-4, atol=1e-4):
        raise KdloraError(
            f"{type(model).__name__}'s logits are not its LM head applied to its final hidden states (the "
            "model post-processes them); kdlora's chunked distillation loss does not support it"
        )
