"""Budget -> rank policy, on metadata with known numbers (agreement 0.5 + k/20, bytes 100 k)."""

from collections import Counter

import pytest

from hub.schema import ModelRef, RankMetadata, RankResult
from kdlora_serve.api.policy import Budget, CostTracker, Load, choose_rank, parse_budget
from kdlora_serve.api.steps import StepModel
from kdlora_serve.errors import RequestError

META = RankMetadata(
    max_rank=16,
    default_rank=4,
    base_model=ModelRef(id="base"),
    ranks=[
        RankResult(rank=k, teacher_top1_agreement=min(1, 0.5 + k / 20), adapter_bytes=100 * k) for k in (1, 2, 4, 16)
    ],
)


def choose(load=None, requested=None, **budget):
    return choose_rank(META, Budget(**budget), "a", load, requested)


def test_no_budget_gives_the_default_rank():
    assert (choose().rank, choose().met) == (4, True)


def test_largest_rank_meeting_every_constraint():
    assert choose(max_rank=8).rank == 4
    assert choose(max_rank=8, min_quality=0.58).rank == 4
    assert choose(memory_mb=250 / 2**20).rank == 2


def test_a_quality_floor_alone_gets_the_smallest_rank_that_meets_it():
    choice = choose(min_quality=0.6)  # agreement 0.55, 0.6, 0.7, 1.0 at ranks 1, 2, 4, 16
    assert (choice.rank, choice.met, choice.reason) == (2, True, "smallest rank meeting min_quality")
    assert choose(min_quality=0.65).rank == 4 and choose(min_quality=0.9).rank == 16
    assert choose(min_quality=0.6, max_rank=16).rank == 16  # a cost bound too: the best quality it allows


def step_ms(requests: int, lora_work: float) -> float:
    """A hand-made engine: 20 ms a decode step, 2 per request, 0.5 per LoRA (token x rank) unit."""
    return 20 + 2 * requests + 0.5 * lora_work


def fitted_steps() -> StepModel:
    """A step-time model fitted on a trace of that engine: batches mixing base requests and ranks of adapter a."""
    steps = StepModel(path="grouped", max_lora_rank=16)
    for base in (0, 1, 3):
        for ranks in [(), (1,), (16,), (2, 16), (4, 4, 1)]:
            running = Counter({None: base}) + Counter(f"a@r{k}" for k in ranks)
            work = len(ranks) * max(ranks, default=0)  # the grouped path computes a's tokens at its largest rank
            for _ in range(2):
                steps.observe(running, step_ms(base + len(ranks), work))
    return steps


def test_the_step_model_recovers_the_engine_and_prices_batches_it_never_saw():
    steps = fitted_steps()
    assert steps.describe()["ms_per_step"] == pytest.approx(
        {"base": 20, "requests": 2, "lora_work": 0.5, "prefill_tokens": 0}, abs=1e-2
    )  # no prefill in these steps: its term stays 0
    unseen = Counter({None: 2, "a@r8": 1, "a@r2": 2, "b@r4": 1})  # adapter b adds its own group
    assert steps.predict(unseen) == pytest.approx(step_ms(6, 3 * 8 + 4), abs=1e-2)
    assert StepModel().predict(unseen) is None  # nothing observed: no estimate


def test_a_latency_budget_is_the_batchs():
    """Alone, a 40 ms/token request gets rank 16 (20 + 2 + 8 = 30 ms); beside a tight in-flight request (bound 26.5
    ms, running at rank 1) the same loose budget gets rank 2 (26 ms): rank 4 would make the shared step 28 ms."""
    steps = fitted_steps()
    alone = choose(Load(steps=steps), latency_ms_per_token=40)
    beside_tight = choose(Load(Counter({"a@r1": 1}), bounds=(26.5,), steps=steps), latency_ms_per_token=40)
    assert (alone.rank, alone.met, alone.estimate_ms) == (16, True, pytest.approx(30.0, abs=1e-2))
    assert (beside_tight.rank, beside_tight.met) == (2, True)
    assert beside_tight.estimate_ms == pytest.approx(step_ms(2, 2 * 2), abs=1e-2) and step_ms(2, 2 * 2) <= 26.5
    loose_beside_loose = choose(Load(Counter({"a@r1": 1}), bounds=(41.0,), steps=steps), latency_ms_per_token=41)
    assert loose_beside_loose.rank == 16  # 20 + 4 + 0.5 x 2 x 16 = 40 ms keeps both (41)


def test_when_no_rank_keeps_the_batch_the_cheapest_is_served_and_the_reason_names_whose_bound():
    steps = fitted_steps()
    crowded = Load(Counter({None: 3, "a@r1": 1}), bounds=(29.0,), steps=steps)  # rank 1 beside them: 31 ms
    choice = choose(crowded, latency_ms_per_token=100)
    assert (choice.rank, choice.met) == (1, False)
    assert (
        choice.reason
        == "an in-flight request's latency_ms_per_token 29.0 (estimated 31.0 ms per token with 5 in flight)"
    )
    own = choose(Load(steps=steps), latency_ms_per_token=21)
    assert own.reason == "latency_ms_per_token 21.0 (estimated 22.5 ms per token with 1 in flight)"


def test_explicit_ranks_and_unbudgeted_requests_are_served_as_asked():
    """kdlora keeps in-flight bounds only where it picks the rank: `@r16` is exactly rank 16, no budget the default."""
    crowded = Load(Counter({"a@r1": 1}), bounds=(21.0,), steps=fitted_steps())
    assert (choose(crowded, requested=16).rank, choose(crowded, requested=16).met) == (16, True)
    assert (choose(crowded).rank, choose(crowded).met) == (4, True)


def test_measured_cost_per_rank_leaves_out_each_ranks_cold_first_request():
    costs = CostTracker()
    for ms in (5000.0, 30.0, 32.0):
        costs.record("a", 8, ms)
    costs.record("b", 8, 7.0)
    assert costs.measured("a") == {8: 31.0} and costs.measured("b") == {}


def test_min_quality_can_name_a_task_metric():
    meta = META.model_copy(
        update={"ranks": [r.model_copy(update={"task_metrics": {"greedy_token_f1": r.rank / 20}}) for r in META.ranks]}
    )
    pick = lambda **budget: choose_rank(meta, Budget(**budget), "a")  # noqa: E731
    assert pick(min_quality=0.15, quality_metric="greedy_token_f1").rank == 4  # F1 1/20, 2/20, 4/20, 16/20
    assert pick(min_quality=0.15, quality_metric="greedy_token_f1", max_rank=16).rank == 16
    assert pick(min_quality=0.15).rank == 1  # top-1 agreement, as before: 0.55, 0.6, 0.7, 1.0
    assert pick(min_quality=0.75).rank == 16
    missed = pick(min_quality=0.9, quality_metric="greedy_token_f1", max_rank=4)
    assert (missed.rank, missed.met, missed.reason) == (1, False, "min_quality 0.9 (greedy_token_f1)")
    with pytest.raises(
        RequestError,
        match=r"^quality_metric 'bbc_accuracy': adapter 'a' records greedy_token_f1, teacher_top1_agreement$",
    ):
        pick(min_quality=0.5, quality_metric="bbc_accuracy")
    assert parse_budget({}, {"quality_metric": "greedy_token_f1", "min_quality": "0.5"}) == Budget(
        quality_metric="greedy_token_f1", min_quality=0.5
    )


def test_nothing_fits_gives_the_cheapest_rank_and_says_so():
    choice = choose(min_quality=0.99, max_rank=2)
    assert (choice.rank, choice.met, choice.reason) == (1, False, "min_quality 0.99")


def test_explicit_rank_is_exact_and_checked():
    assert choose(requested=3).rank == 3
    assert choose(requested=16, max_rank=8).met is False
    with pytest.raises(RequestError, match=r"'a@r17': rank 17 is out of range: this adapter has ranks 1..16"):
        choose(requested=17)
    with pytest.raises(RequestError, match="model names rank 2 but the budget asks for rank 3"):
        choose(requested=2, rank=3)


def test_budgets():
    with pytest.raises(
        RequestError, match=r"budget field 'memory_mb' \(extra_body kdlora\): Input should be greater than 0"
    ):
        parse_budget({"memory_mb": -1}, {})
    with pytest.raises(
        RequestError, match=r"budget field 'speed' \(extra_body kdlora\): Extra inputs are not permitted"
    ):
        parse_budget({"speed": 1}, {})
    assert parse_budget({}, {"max_rank": "8"}).max_rank == 8  # header values arrive as strings
    assert parse_budget({}, {"latency_ms_per_token": "12.5"}).latency_ms_per_token == 12.5
    assert parse_budget({"max_rank": 4}, {"max_rank": "8"}).max_rank == 4  # the body wins
    assert parse_budget({"latency_ms_per_token": 20}, {}).latency_ms_per_token == 20.0  # JSON ints are numbers
    assert (
        parse_budget({}, {"elastic": "true"}).elastic is True
        and parse_budget({}, {"elastic": "False"}).elastic is False
    )
    with pytest.raises(
        RequestError, match=r"^budget field 'elastic' \(x-kdlora-elastic header\): Input should be a valid boolean$"
    ):
        parse_budget({}, {"elastic": "1"})


@pytest.mark.parametrize(
    "body, headers, message",
    [
        ({"rank": True}, {}, "budget field 'rank' (extra_body kdlora): Input should be a valid integer"),
        ({"max_rank": "8"}, {}, "budget field 'max_rank' (extra_body kdlora): Input should be a valid integer"),
        ({"min_quality": False}, {}, "budget field 'min_quality' (extra_body kdlora): Input should be a valid number"),
        ({}, {"rank": "\u00ff"}, "budget field 'rank' (x-kdlora-rank header): Input should be a valid integer"),
        ({}, {"rank": "\u0668"}, "budget field 'rank' (x-kdlora-rank header): Input should be a valid integer"),
        (
            {},
            {"min_quality": "high"},
            "budget field 'min_quality' (x-kdlora-min-quality header): Input should be a valid number",
        ),
    ],
)
def test_budgets_take_strict_types(body, headers, message):
    with pytest.raises(RequestError) as caught:
        parse_budget(body, headers)
    assert str(caught.value).startswith(message)
