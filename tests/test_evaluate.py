"""Task metrics against hand computations: token F1 and exact match of greedy answers."""

import pytest
import torch

from training.evaluate import greedy, greedy_agreement, token_f1


@pytest.mark.parametrize("predicted, reference, expected", [
    ([1, 2, 3, 4], [2, 4, 5], 4 / 7),  # shared {2, 4}: precision 2/4, recall 2/3
    ([7, 7, 8], [7, 9], 0.4),  # shared tokens count once each: precision 1/3, recall 1/2
    ([7, 7, 8], [7, 7, 9], 2 / 3),
    ([1, 2], [3, 4], 0.0),
    ([5, 6], [6, 5], 1.0),  # a bag of tokens: order does not count (exact match does)
    ([], [], 1.0),
    ([], [1], 0.0),
])
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
    assert greedy(model, prompts, 5) == ids[:, 8:].tolist()


def test_greedy_agreement_by_hand():
    prompts = torch.tensor([[10, 11], [12, 13]])
    teacher = _Answers({"teacher": [[1, 2, 3, 4], [5, 6, 7, 8]]})
    answers = {"exact": [[1, 2, 3, 4], [5, 6, 7, 8]], "half": [[1, 2, 3, 4], [5, 9, 9, 8]], "reordered": [[4, 3, 2, 1], [8, 7, 6, 5]]}
    student = _Answers(answers)
    results = greedy_agreement(student, teacher, prompts, list(answers), student.configured.append, new_tokens=4)
    assert student.configured[1:] == list(answers)  # after the constructor's default
    assert results == {"exact": {"greedy_exact_match": 1.0, "greedy_token_f1": 1.0},
                       "half": {"greedy_exact_match": 0.5, "greedy_token_f1": 0.75},  # (1 + F1 of 2 shared of 4) / 2
                       "reordered": {"greedy_exact_match": 0.0, "greedy_token_f1": 1.0}}


class _Answers(torch.nn.Module):
    """A model whose greedy answers are given, per setting (what `configure` last named)."""

    def __init__(self, answers):
        super().__init__()
        self.answers, self.configured = answers, [next(iter(answers))]
        self.anchor = torch.nn.Parameter(torch.zeros(1))  # greedy() asks a model for its device

    def generate(self, prompts, attention_mask, max_new_tokens, **kwargs):
        answers = torch.tensor(self.answers[self.configured[-1]])
        assert answers.shape[1] == max_new_tokens and torch.equal(attention_mask, torch.ones_like(prompts))
        return torch.cat([prompts, answers], dim=1)
