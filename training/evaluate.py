"""Held-out evaluation: perplexity, and a model's agreement with a teacher (KL, top-1)."""

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, desc: str = "perplexity") -> float:
    """exp(mean next-token cross-entropy) over every predicted token of `blocks` [n, seq_len]."""
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, leave=False):
        batch = blocks[start:start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        total_loss += loss.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_loss / total_tokens)


@torch.no_grad()
def quality_against_teacher(model, teacher, blocks: torch.Tensor, settings, configure, batch_size: int = 8) -> dict:
    """Held-out quality of `model` under each setting: {setting: {kl_to_teacher, teacher_top1_agreement,
    perplexity}}. `configure(setting)` switches the model (e.g. to a nested rank) before its forward;
    the teacher runs once per batch for all settings."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    sums = {s: {"kl": 0.0, "agree": 0.0, "nll": 0.0} for s in settings}
    tokens = 0
    for start in tqdm(range(0, len(blocks), batch_size), desc=f"evaluating {len(settings)} setting(s)", leave=False):
        batch = blocks[start:start + batch_size].to(device)
        teacher_logp = F.log_softmax(teacher(batch.to(next(teacher.parameters()).device)).logits[:, :-1].float().to(device), dim=-1)
        labels = batch[:, 1:]
        tokens += labels.numel()
        for setting in settings:
            configure(setting)
            logp = F.log_softmax(model(batch).logits[:, :-1].float(), dim=-1)
            sums[setting]["kl"] += (teacher_logp.exp() * (teacher_logp - logp)).sum().item()
            sums[setting]["agree"] += (teacher_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            sums[setting]["nll"] -= logp.gather(-1, labels.unsqueeze(-1)).sum().item()
    return {s: {"kl_to_teacher": v["kl"] / tokens, "teacher_top1_agreement": v["agree"] / tokens,
                "perplexity": math.exp(v["nll"] / tokens)} for s, v in sums.items()}


def token_f1(predicted: list[int], reference: list[int]) -> float:
    """SQuAD's token F1: harmonic mean of precision and recall of the tokens two answers share (as multisets)."""
    from collections import Counter

    if not predicted or not reference:
        return float(predicted == reference)
    shared = sum((Counter(predicted) & Counter(reference)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(reference)
    return 2 * precision * recall / (precision + recall)


@torch.no_grad()
def greedy(model, prompts: torch.Tensor, new_tokens: int) -> list[list[int]]:
    """Greedy continuations of equal-length `prompts` [n, prompt_len], `new_tokens` each (no padding needed)."""
    device = next(model.parameters()).device
    out = model.generate(prompts.to(device), attention_mask=torch.ones_like(prompts, device=device), max_new_tokens=new_tokens,
                         min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[:, prompts.shape[1]:].tolist()


def greedy_agreement(model, teacher, prompts: torch.Tensor, settings, configure, new_tokens: int = 16) -> dict:
    """How far each setting's greedy continuations match the teacher's: {setting: {greedy_exact_match,
    greedy_token_f1}}, means over prompts. What a user of the generated text sees, next to per-token KL."""
    reference = greedy(teacher, prompts, new_tokens)
    results = {}
    for setting in settings:
        configure(setting)
        answers = greedy(model, prompts, new_tokens)
        results[setting] = {"greedy_exact_match": sum(a == r for a, r in zip(answers, reference)) / len(reference),
                            "greedy_token_f1": sum(token_f1(a, r) for a, r in zip(answers, reference)) / len(reference)}
    return results
