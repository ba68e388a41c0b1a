"""Held-out evaluation: perplexity, a model's agreement with a teacher (KL, top-1, greedy answers), and
accuracy on labelled examples."""

import math

import torch
from tqdm.auto import tqdm


@torch.no_grad()
def perplexity(model, blocks: torch.Tensor, batch_size: int = 8, desc: str = "perplexity") -> float:
    """exp(mean next-token cross-entropy) over every predicted token of `blocks` [n, seq_len]."""
    device = next(model.parameters()).device
    total_loss, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(blocks), batch_size), desc=desc, leave=False):
        batch = blocks[start : start + batch_size].to(device)
        logits = model(batch).logits[:, :-1].float()
        loss = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
        )
        total_loss += loss.item()
        total_tokens += batch[:, 1:].numel()
    return math.exp(total_loss / total_tokens)


@torch.no_grad()
def quality_against_teacher(
    model, teacher, rows: torch.Tensor, masks: torch.Tensor, settings, configure, batch_size: int = 8
) -> dict:
    """Held-out quality of `model` under each setting: {setting: {kl_to_teacher, teacher_top1_agreement,
    perplexity}}, over the tokens `masks` marks (TokenData's rows and masks). `configure(setting)` switches
    the model (e.g. to a nested rank) before its forward; the teacher runs once per batch for all settings."""
    import torch.nn.functional as F

    from training.data import trimmed

    device = next(model.parameters()).device
    sums = {s: {"kl": 0.0, "agree": 0.0, "nll": 0.0} for s in settings}
    tokens = 0
    for start in tqdm(range(0, len(rows), batch_size), desc=f"evaluating {len(settings)} setting(s)", leave=False):
        batch, mask = trimmed(rows[start : start + batch_size], masks[start : start + batch_size])
        batch, learned = batch.to(device), mask[:, 1:].to(device)
        teacher_logits = teacher(batch.to(next(teacher.parameters()).device)).logits[:, :-1].to(device)
        teacher_logp = F.log_softmax(teacher_logits[learned].float(), dim=-1)
        labels = batch[:, 1:][learned]
        tokens += labels.numel()
        for setting in settings:
            configure(setting)
            logp = F.log_softmax(model(batch).logits[:, :-1][learned].float(), dim=-1)
            sums[setting]["kl"] += (teacher_logp.exp() * (teacher_logp - logp)).sum().item()
            sums[setting]["agree"] += (teacher_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            sums[setting]["nll"] -= logp.gather(-1, labels.unsqueeze(-1)).sum().item()
    return {
        s: {
            "kl_to_teacher": v["kl"] / tokens,
            "teacher_top1_agreement": v["agree"] / tokens,
            "perplexity": math.exp(v["nll"] / tokens),
        }
        for s, v in sums.items()
    }


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
def greedy(model, prompts: list[list[int]], new_tokens: int, eos_token_id: int) -> list[list[int]]:
    """Greedy answers to `prompts` (token id lists of any lengths, left-padded together), each up to
    `new_tokens` long and cut before its first EOS."""
    device = next(model.parameters()).device
    width = max(map(len, prompts))
    ids = torch.tensor([[eos_token_id] * (width - len(p)) + p for p in prompts], device=device)
    attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    out = model.generate(
        ids,
        attention_mask=attention,
        max_new_tokens=new_tokens,
        do_sample=False,
        eos_token_id=eos_token_id,
        pad_token_id=eos_token_id,
    )
    answers = out[:, width:].tolist()
    return [a[: a.index(eos_token_id)] if eos_token_id in a else a for a in answers]


def greedy_agreement(
    model, teacher, prompts: list[list[int]], settings, configure, new_tokens: int, eos_token_id: int
) -> dict:
    """How far each setting's greedy answers match the teacher's: {setting: {greedy_exact_match,
    greedy_token_f1}}, means over prompts. What a user of the generated text sees, next to per-token KL."""
    reference = greedy(teacher, prompts, new_tokens, eos_token_id)
    results = {}
    for setting in settings:
        configure(setting)
        answers = greedy(model, prompts, new_tokens, eos_token_id)
        results[setting] = {
            "greedy_exact_match": sum(a == r for a, r in zip(answers, reference)) / len(reference),
            "greedy_token_f1": sum(token_f1(a, r) for a, r in zip(answers, reference)) / len(reference),
        }
    return results


@torch.no_grad()
def predicted_choices(model, examples, batch_size: int = 8) -> list[int]:
    """For each labelled example (training.data.Example), the index of the option the model finds most
    likely after the prompt: the sum of its tokens' log-probabilities (lm-evaluation-harness's `acc`)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    # one sequence per (example, option); options of one token all share the prompt's last position
    single = all(len(option) == 1 for e in examples for option in e.choices)
    sequences = [
        (i, j, e.prompt + ([] if single else option))
        for i, e in enumerate(examples)
        for j, option in enumerate([None] if single else e.choices)
    ]
    scores = [[0.0] * len(e.choices) for e in examples]
    for start in range(0, len(sequences), batch_size):
        chunk = sequences[start : start + batch_size]
        width = max(len(s) for _, _, s in chunk)
        ids = torch.tensor(
            [s + [0] * (width - len(s)) for _, _, s in chunk], device=device
        )  # right padding: causal, changes nothing before it
        logp = F.log_softmax(model(ids).logits.float(), dim=-1)
        for row, (i, j, _) in enumerate(chunk):
            at = len(examples[i].prompt) - 1  # predicts the first option token
            if single:
                scores[i] = [logp[row, at, option[0]].item() for option in examples[i].choices]
            else:
                option = examples[i].choices[j]
                scores[i][j] = sum(logp[row, at + k, token].item() for k, token in enumerate(option))
    return [max(range(len(s)), key=s.__getitem__) for s in scores]


def choice_accuracy(model, examples, settings, configure, batch_size: int = 8) -> dict:
    """{setting: {"accuracy": share of `examples` whose label the model ranks first}}."""
    results = {}
    for setting in tqdm(settings, desc="accuracy", leave=False):
        configure(setting)
        predicted = predicted_choices(model, examples, batch_size)
        results[setting] = {"accuracy": sum(p == e.label for p, e in zip(predicted, examples)) / len(examples)}
    return results
