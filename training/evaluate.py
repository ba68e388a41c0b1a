"""Held-out evaluation: perplexity, a model's agreement with a teacher (KL, top-1, greedy answers), and
accuracy on labelled examples."""

import math

import torch
from tqdm.auto import tqdm

from training.losses import final_hidden_states

# The task metric of labelled examples asked in a wording training never used (training.data.TextExample.unseen_wording)
UNSEEN_WORDING_ACCURACY = "accuracy_unseen_wording"


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
    model, teacher, rows: torch.Tensor, masks: torch.Tensor, settings, configure, batch_size: int = 8, examples=None
) -> dict:
    """Held-out quality of `model` under each setting: {setting: {kl_to_teacher, teacher_top1_agreement,
    perplexity}}, over the tokens `masks` marks (TokenData's rows and masks). `configure(setting)` switches
    the model (e.g. to a nested rank) before its forward; the teacher runs once per batch for all settings.

    With `examples` (one per row, each option one token: `single_token_choices`), each setting's accuracy too, from
    the same forward: the position that predicts the answer's first token ranks the options, as `predicted_choices`
    does from the prompt alone (a row is prompt + answer; causal attention: the answer changes nothing before it)."""
    import torch.nn.functional as F

    from training.data import trimmed

    if examples and len(examples) != len(rows):
        raise ValueError(f"one example per row: {len(examples)} examples for {len(rows)} rows")
    device, teacher_device = next(model.parameters()).device, next(teacher.parameters()).device
    sums = {s: {"kl": 0.0, "agree": 0.0, "nll": 0.0} for s in settings}
    correct = {s: [0.0] * len(examples or []) for s in settings}  # in the examples' order, whatever the batches'
    tokens = 0
    widths = [int(m.nonzero().max()) + 1 if m.any() else len(m) for m in masks]  # a row's columns after trimming
    batches = batches_by_length(widths, batch_size)
    for indices in tqdm(batches, desc=f"evaluating {len(settings)} setting(s)", leave=False):
        batch, mask = trimmed(rows[indices], masks[indices])
        batch, learned = batch.to(device), mask[:, 1:].to(device)
        at_learned = F.pad(learned, (0, 1))  # the positions that predict a learned token
        teacher_logits = logits_at(teacher, batch.to(teacher_device), at_learned.to(teacher_device)).to(device)
        teacher_logp = F.log_softmax(teacher_logits.float(), dim=-1)
        labels = batch[:, 1:][learned]
        tokens += labels.numel()
        chunk = [examples[i] for i in indices] if examples else []
        prompt_ends = (torch.arange(len(chunk)), torch.tensor([len(e.prompt) - 1 for e in chunk], dtype=torch.long))
        for setting in settings:
            configure(setting)
            with final_hidden_states(model) as head:
                hidden = model(batch).logits
            logp = F.log_softmax(head(hidden[at_learned]).float(), dim=-1)
            at_prompt_end = F.log_softmax(head(hidden[prompt_ends]).float(), dim=-1) if chunk else None
            sums[setting]["kl"] += (teacher_logp.exp() * (teacher_logp - logp)).sum().item()
            sums[setting]["agree"] += (teacher_logp.argmax(-1) == logp.argmax(-1)).sum().item()
            sums[setting]["nll"] -= logp.gather(-1, labels.unsqueeze(-1)).sum().item()
            if chunk:
                predicted = [_first_best(_option_scores(at_prompt_end[i], e)) for i, e in enumerate(chunk)]
                for index, outcome in zip(indices, _correct(predicted, chunk)):
                    correct[setting][index] = outcome
    return {
        s: {
            "kl_to_teacher": v["kl"] / tokens,
            "teacher_top1_agreement": v["agree"] / tokens,
            "perplexity": math.exp(v["nll"] / tokens),
            **(_task({"accuracy": correct[s]}) if examples else {}),
        }
        for s, v in sums.items()
    }


def batches_by_length(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices of `lengths` in batches of `batch_size`, longest first: rows of like length share a batch, so a batch
    pads little. The held-out task prompts run 64-113 tokens: in their own order batches of 8 computed 15% more
    columns than the prompts hold, sorted 3% (benchmarks/RESULTS.md, "Evaluation batches"). Ties keep their order:
    the batches are the same on every run."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[start : start + batch_size] for start in range(0, len(order), batch_size)]


def logits_at(model, ids: torch.Tensor, positions) -> torch.Tensor:
    """`model(ids).logits[positions]` ([batch, tokens] bool mask or (rows, columns) index), computed by applying the
    LM head to those positions' final hidden states only: the head is a [tokens, vocab] product (49k columns for
    SmolLM2), and evaluation reads it at the answer tokens alone."""
    with final_hidden_states(model) as head:
        hidden = model(ids).logits
    return head(hidden[positions])


def _task(outcomes: dict[str, list[float]]) -> dict:
    """Task metrics as kdlora.json's Quality holds them: each metric's mean, and its per-example scores."""
    return {
        "task_metrics": {name: sum(scores) / len(scores) for name, scores in outcomes.items()},
        "task_outcomes": outcomes,
    }


def _correct(predicted: list[int], examples) -> list[float]:
    return [float(p == e.label) for p, e in zip(predicted, examples)]


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
    """How far each setting's greedy answers match the teacher's: {setting: {task_metrics: {greedy_exact_match,
    greedy_token_f1} (means over prompts), task_outcomes: the same per prompt}}. What a user of the generated text
    sees, next to per-token KL."""
    reference = greedy(teacher, prompts, new_tokens, eos_token_id)
    results = {}
    for setting in settings:
        configure(setting)
        answers = greedy(model, prompts, new_tokens, eos_token_id)
        results[setting] = _task(
            {
                "greedy_exact_match": [float(a == r) for a, r in zip(answers, reference)],
                "greedy_token_f1": [token_f1(a, r) for a, r in zip(answers, reference)],
            }
        )
    return results


@torch.no_grad()
def predicted_choices(model, examples, batch_size: int = 8) -> list[int]:
    """For each labelled example (training.data.Example), the index of the option the model finds most
    likely after the prompt: the sum of its tokens' log-probabilities (lm-evaluation-harness's `acc`)."""
    import torch.nn.functional as F

    device = next(model.parameters()).device
    # one sequence per (example, option); options of one token all share the prompt's last position
    single = single_token_choices(examples)
    sequences = [
        (i, j, e.prompt + ([] if single else option))
        for i, e in enumerate(examples)
        for j, option in enumerate([None] if single else e.choices)
    ]
    scores = [[0.0] * len(e.choices) for e in examples]
    for indices in batches_by_length([len(s) for _, _, s in sequences], batch_size):
        chunk = [sequences[i] for i in indices]
        width = max(len(s) for _, _, s in chunk)
        ids = torch.tensor(
            [s + [0] * (width - len(s)) for _, _, s in chunk], device=device
        )  # right padding: causal, changes nothing before it
        # the positions that predict each option token: from the prompt's last one (one position: one-token options)
        wanted = [
            (row, len(examples[i].prompt) - 1 + k)
            for row, (i, j, _) in enumerate(chunk)
            for k in range(1 if single else len(examples[i].choices[j]))
        ]
        rows, columns = (torch.tensor(c, device=device) for c in zip(*wanted))
        logp = iter(F.log_softmax(logits_at(model, ids, (rows, columns)).float(), dim=-1))
        for i, j, _ in chunk:
            if single:
                scores[i] = _option_scores(next(logp), examples[i])
            else:
                scores[i][j] = sum(next(logp)[token].item() for token in examples[i].choices[j])
    return [_first_best(s) for s in scores]


def single_token_choices(examples) -> bool:
    """Whether every option of every example is one token (then one position's log-probabilities rank them)."""
    return all(len(option) == 1 for e in examples for option in e.choices)


def _option_scores(logp: torch.Tensor, example) -> list[float]:
    """Each one-token option's log-probability, from `logp` [vocab] at the position after the example's prompt."""
    return logp[[option[0] for option in example.choices]].tolist()


def _first_best(scores: list[float]) -> int:
    return max(range(len(scores)), key=scores.__getitem__)  # a tie goes to the first option


def choice_accuracy(model, examples, settings, configure, batch_size: int = 8) -> dict:
    """{setting: {task_metrics: {accuracy: share of `examples` whose label the model ranks first}, task_outcomes:
    {accuracy: 1 or 0 per example}}}."""
    results = {}
    for setting in tqdm(settings, desc="accuracy", leave=False):
        configure(setting)
        results[setting] = _task({"accuracy": _correct(predicted_choices(model, examples, batch_size), examples)})
    return results
