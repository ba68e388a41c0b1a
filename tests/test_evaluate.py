"""Task metrics against hand computations: token F1 and exact match of greedy answers, accuracy on labelled examples."""

import pytest
import torch

from training.data import Example
from training.evaluate import (
    batches_by_length,
    choice_accuracy,
    greedy,
    greedy_agreement,
    predicted_choices,
    quality_against_teacher,
    token_f1,
)


@pytest.mark.parametrize(
    "predicted, reference, expected",
    [
        ([1, 2, 3, 4], [2, 4, 5], 4 / 7),  # shared {2, 4}: precision 2/4, recall 2/3
        ([7, 7, 8], [7, 9], 0.4),  # shared tokens count once each: precision 1/3, recall 1/2
        ([7, 7, 8], [7, 7, 9], 2 / 3),
        ([1, 2], [3, 4], 0.0),
        ([5, 6], [6, 5], 1.0),  # a bag of tokens: order does not count (exact match does)
        ([], [], 1.0),
        ([], [1], 0.0),
    ],
)
def test_token_f1_by_hand(predicted, reference, expected):
    assert token_f1(predicted, reference) == pytest.approx(expected)


@pytest.fixture(scope="module")
def tiny_models(tiny_pair):
    from transformers import AutoModelForCausalLM

    return [AutoModelForCausalLM.from_pretrained(path).eval() for path in tiny_pair]


def test_greedy_is_the_argmax_of_each_next_token(tiny_models):
    model = tiny_models[0]
    prompts = torch.randint(0, 49152, (3, 8), generator=torch.Generator().manual_seed(0))
    ids = prompts
    with torch.no_grad():
        for _ in range(5):  # without a KV cache, one token at a time
            ids = torch.cat([ids, model(ids).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert greedy(model, prompts.tolist(), 5, eos_token_id=2) == ids[:, 8:].tolist()


def test_greedy_left_pads_prompts_of_any_length_and_stops_at_eos(tiny_models):
    model = tiny_models[0]
    prompts = [[5, 6, 7, 8, 9], [11, 12]]
    alone = [greedy(model, [p], 4, eos_token_id=2)[0] for p in prompts]
    assert greedy(model, prompts, 4, eos_token_id=2) == alone  # padding changes no answer
    eos = alone[1][0]  # call the second answer's first token EOS: that answer is empty, the other unchanged
    assert eos not in alone[0] and greedy(model, prompts, 4, eos_token_id=eos) == [alone[0], []]


def test_greedy_agreement_by_hand():
    prompts = torch.tensor([[10, 11], [12, 13]])
    teacher = _Answers({"teacher": [[1, 2, 3, 4], [5, 6, 7, 8]]})
    answers = {
        "exact": [[1, 2, 3, 4], [5, 6, 7, 8]],
        "half": [[1, 2, 3, 4], [5, 9, 9, 8]],
        "reordered": [[4, 3, 2, 1], [8, 7, 6, 5]],
    }
    student = _Answers(answers)
    results = greedy_agreement(
        student, teacher, prompts.tolist(), list(answers), student.configured.append, new_tokens=4, eos_token_id=0
    )
    assert student.configured[1:] == list(answers)  # after the constructor's default
    assert {setting: result["task_metrics"] for setting, result in results.items()} == {
        "exact": {"greedy_exact_match": 1.0, "greedy_token_f1": 1.0},
        "half": {"greedy_exact_match": 0.5, "greedy_token_f1": 0.75},  # (1 + F1 of 2 shared of 4) / 2
        "reordered": {"greedy_exact_match": 0.0, "greedy_token_f1": 1.0},
    }
    assert results["half"]["task_outcomes"] == {"greedy_exact_match": [1.0, 0.0], "greedy_token_f1": [1.0, 0.5]}


class _Answers(torch.nn.Module):
    """A model whose greedy answers are given, per setting (what `configure` last named)."""

    def __init__(self, answers):
        super().__init__()
        self.answers, self.configured = answers, [next(iter(answers))]
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # greedy() asks a model for its device

    def generate(self, prompts, attention_mask, max_new_tokens, eos_token_id, **kwargs):
        answers = torch.tensor(self.answers[self.configured[-1]])
        assert answers.shape[1] == max_new_tokens and torch.equal(attention_mask, torch.ones_like(prompts))
        return torch.cat([prompts, answers], dim=1)


class _Bigram(torch.nn.Module):
    """A model whose next-token log-probabilities depend only on the current token: given by hand. Its "hidden state"
    is the token's one-hot vector and its LM head the table, so that evaluation can apply the head where it needs."""

    def __init__(self, probabilities: dict[int, dict[int, float]], vocab: int = 8):
        super().__init__()
        table = torch.full((vocab, vocab), 1e-6)
        for token, following in probabilities.items():
            for nxt, p in following.items():
                table[token, nxt] = p
        self.vocab, self.config = vocab, type("Config", (), {})()  # no logit soft-capping
        self.head = torch.nn.Linear(vocab, vocab, bias=False)
        self.head.weight = torch.nn.Parameter(table.log().T, requires_grad=False)  # one_hot @ W.T = table.log()[ids]
        self.anchor = torch.nn.Parameter(torch.zeros(1), requires_grad=False)  # a device without the head too

    def get_output_embeddings(self):
        return self.head

    def set_output_embeddings(self, head):
        self.head = head

    def forward(self, ids):
        return type("Out", (), {"logits": self.head(torch.nn.functional.one_hot(ids, self.vocab).float())})


def test_batches_by_length_put_like_lengths_together_longest_first():
    assert batches_by_length([3, 9, 5, 9, 1], 2) == [[1, 3], [2, 0], [4]]  # a tie keeps its order
    assert batches_by_length([4, 4, 4], 8) == [[0, 1, 2]]
    assert batches_by_length([], 8) == []


def test_choice_accuracy_by_hand():
    model = _Bigram(
        {2: {3: 0.6, 4: 0.3}, 5: {3: 0.5, 4: 0.4}, 1: {8: 0.3, 4: 0.4}, 8: {7: 0.9}, 6: {8: 0.5, 4: 0.4}}, vocab=10
    )
    one_token = [Example([1, 2], [3, 0], [[3], [4]], 0), Example([5], [4, 0], [[3], [4]], 1)]
    assert predicted_choices(model, one_token) == [0, 0]  # 0.6 > 0.3; 0.5 > 0.4
    # options of several tokens: the product of their tokens' probabilities (a sum of log-probs), not normalised by length
    several = [Example([1], [8, 7, 0], [[8, 7], [4]], 0), Example([6], [8, 7, 0], [[8, 7], [4]], 0)]
    assert predicted_choices(model, several, batch_size=3) == [1, 0]  # 0.3 * 0.9 < 0.4; 0.5 * 0.9 > 0.4
    configured = []
    per_setting = {"task_metrics": {"accuracy": 0.5}, "task_outcomes": {"accuracy": [1.0, 0.0, 0.0, 1.0]}}
    assert choice_accuracy(model, one_token + several, ["r1", "r2"], configured.append) == {
        "r1": per_setting,
        "r2": per_setting,
    }
    assert configured == ["r1", "r2"]


def test_accuracy_from_the_kl_forward_equals_scoring_the_prompt_alone():
    """The held-out rows (prompt + answer, right-padded) give each example's accuracy from the forward that
    measures KL: the same choice `predicted_choices` makes from the prompt alone, and the same KL as without it."""
    model = _Bigram({2: {3: 0.6, 4: 0.3}, 5: {3: 0.5, 4: 0.4}, 7: {3: 0.2, 4: 0.7}, 6: {3: 0.1}}, vocab=10)
    teacher = _Bigram({2: {3: 0.9}, 5: {4: 0.9}, 7: {4: 0.9}, 6: {3: 0.9}}, vocab=10)
    examples = [
        Example([1, 2], [3, 0], [[3], [4]], 0),  # predicted 0: right
        Example([5], [4, 0], [[3], [4]], 1),  # predicted 0: wrong
        Example([6, 6, 7], [4, 0], [[3], [4]], 1),  # predicted 1: right
        Example([6], [3, 0], [[4], [3]], 1),  # options in the other order; predicted 1 (token 3): right
    ]
    rows = torch.zeros((4, 6), dtype=torch.long)
    masks = torch.zeros((4, 6), dtype=torch.bool)
    for i, e in enumerate(examples):
        rows[i, : len(e.prompt) + len(e.answer)] = torch.tensor(e.prompt + e.answer)
        masks[i, len(e.prompt) : len(e.prompt) + len(e.answer)] = True
    # batches of 3 by length: examples 2, 0, 1 then 3; the outcomes come back in the examples' order
    with_accuracy = quality_against_teacher(model, teacher, rows, masks, ["r"], lambda _: None, 3, examples)
    without = quality_against_teacher(model, teacher, rows, masks, ["r"], lambda _: None, 3)
    assert predicted_choices(model, examples) == [0, 0, 1, 1]
    assert with_accuracy["r"]["task_outcomes"] == {"accuracy": [1.0, 0.0, 1.0, 1.0]}
    assert with_accuracy["r"]["task_metrics"] == {"accuracy": 0.75}
    assert {k: v for k, v in with_accuracy["r"].items() if not k.startswith("task_")} == without["r"]


def test_logits_at_equals_the_full_logits_there(tiny_models):
    from training.evaluate import logits_at

    model = tiny_models[0]
    ids = torch.randint(0, 49152, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros((2, 9), dtype=torch.bool)
    mask[0, 3], mask[1, 5:8] = True, True
    with torch.no_grad():
        full = model(ids).logits
        assert torch.allclose(logits_at(model, ids, mask), full[mask], atol=1e-5)
        rows, columns = torch.tensor([1, 0]), torch.tensor([8, 2])
        assert torch.allclose(logits_at(model, ids, (rows, columns)), full[rows, columns], atol=1e-5)
    assert isinstance(model.get_output_embeddings(), torch.nn.Linear)  # the head is put back
