"""Budget -> rank policy, on metadata with known numbers (agreement 0.5 + k/20, bytes 100 k)."""

import pytest

from hub.schema import ModelRef, RankMetadata, RankResult
from kdlora_serve.api.policy import Budget, CostTracker, choose_rank, parse_budget
from kdlora_serve.errors import RequestError

META = RankMetadata(
    max_rank=16,
    default_rank=4,
    base_model=ModelRef(id="base"),
    ranks=[
        RankResult(rank=k, teacher_top1_agreement=min(1, 0.5 + k / 20), adapter_bytes=100 * k) for k in (1, 2, 4, 16)
    ],
)


def choose(costs=None, requested=None, **budget):
    return choose_rank(META, Budget(**budget), "a", costs or CostTracker(), requested)


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


def test_measured_latency_decides():
    costs = CostTracker()
    for _ in range(3):  # the first request of a rank is cold (it loaded the rank) and not counted
        costs.record("a", 16, 100.0)  # ms per token at rank 16
        costs.record("a", 2, 20.0)
    assert costs.measured("a") == {16: 100.0, 2: 20.0}
    assert choose(costs, latency_ms_per_token=50).rank == 4  # rank 4 unmeasured: about 31 ms, between ranks 2 and 16
    assert choose(costs, latency_ms_per_token=200).rank == 16


def test_the_cost_model_predicts_a_hand_made_trace_by_rank_and_load():
    """Requests whose decode cost is 20 + 0.5 r + (1 + 0.1 r) n ms per token (r rank, n requests in flight), each
    rank's first request cold (5 s per token): the model predicts unseen ranks and loads from the warm ones."""

    def cost(r, n):
        return 20 + 0.5 * r + (1 + 0.1 * r) * n

    costs = CostTracker()
    for rank in (1, 8, 64):
        costs.record("a", rank, 5000.0, in_flight=1)  # cold: left out
        for n in (1, 4, 8):
            costs.record("a", rank, cost(rank, n), in_flight=n)
    for rank, n in [(16, 6), (32, 2), (64, 12), (1, 1)]:
        assert costs.estimate("a", rank, n) == pytest.approx(cost(rank, n), rel=1e-3)
    assert costs.estimate("b", 8, 1) is None  # another adapter: nothing measured
    alone = choose(costs, latency_ms_per_token=40)  # the largest evaluated rank (1, 2, 4, 16) within 40 ms
    busy = choose_rank(META, Budget(latency_ms_per_token=40), "a", costs, in_flight=10)
    assert (alone.rank, busy.rank) == (16, 4)  # rank 16: 30.6 ms alone, 54 ms with 10 in flight; rank 4: 36 ms then
    assert busy.reason == "largest rank within budget"


def test_cost_grows_with_rank_even_where_the_fit_would_not_say_so():
    costs = CostTracker()
    for ms in (5000.0, 30.0, 30.0):  # cold, then warm; one rank measured: the fit knows nothing about rank
        costs.record("a", 8, ms)
    assert costs.estimate("a", 64) == pytest.approx(30.0, rel=1e-3)  # not below rank 8's
    assert costs.estimate("a", 4) is None  # below every measured rank


def test_min_quality_can_name_a_task_metric():
    meta = META.model_copy(
        update={"ranks": [r.model_copy(update={"task_metrics": {"greedy_token_f1": r.rank / 20}}) for r in META.ranks]}
    )
    pick = lambda **budget: choose_rank(meta, Budget(**budget), "a", CostTracker())  # noqa: E731
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
