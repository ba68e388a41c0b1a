"""Bootstrap intervals and paired differences (hub/intervals.py) against hand computations."""

import math

import pytest

from hub.errors import KdloraError
from hub.intervals import Estimate, interval, paired_difference


def _binomial_quantile(n: int, p: float, q: float) -> int:
    """The smallest j with P(Binomial(n, p) <= j) >= q, summed by hand."""
    total = 0.0
    for j in range(n + 1):
        total += math.comb(n, j) * p**j * (1 - p) ** (n - j)
        if total >= q:
            return j
    return n


def test_two_examples_by_enumeration():
    # resampling [0, 1]: mean 0 with probability 1/4, 0.5 with 1/2, 1 with 1/4: the 2.5% and 97.5% points are 0 and 1
    assert interval([0, 1]) == Estimate(0.5, 0.0, 1.0)
    assert interval([1, 1, 1]) == Estimate(1.0, 1.0, 1.0)  # nothing varies, nothing to resample


@pytest.mark.parametrize("n, correct", [(222, 166), (100, 72), (222, 47)])
def test_accuracy_interval_is_the_binomial_one(n, correct):
    """Resampling n scores of which `correct` are 1 counts the ones as Binomial(n, correct / n): the interval's ends
    are that distribution's 2.5% and 97.5% points, divided by n, to within one example."""
    scores = [1.0] * correct + [0.0] * (n - correct)
    estimate = interval(scores)
    assert estimate.mean == correct / n
    assert abs(estimate.low - _binomial_quantile(n, correct / n, 0.025) / n) <= 1 / n + 1e-12
    assert abs(estimate.high - _binomial_quantile(n, correct / n, 0.975) / n) <= 1 / n + 1e-12


def test_paired_difference_by_hand():
    """222 articles: both right on 150, both wrong on 44, only `scores` right on 20, only `reference` right on 8.
    The difference is (20 - 8) / 222; its per-article values are +1, -1 or 0, and their bootstrap interval is close
    to the normal one, mean +- 1.96 sd / sqrt(n), sd the per-article differences' (plug-in) standard deviation."""
    scores = [1.0] * 150 + [0.0] * 44 + [1.0] * 20 + [0.0] * 8
    reference = [1.0] * 150 + [0.0] * 44 + [0.0] * 20 + [1.0] * 8
    n, mean = 222, 12 / 222
    sd = math.sqrt(28 / n - mean**2)
    estimate = paired_difference(scores, reference)
    assert estimate.mean == pytest.approx(mean, abs=1e-12)
    assert estimate.low == pytest.approx(mean - 1.96 * sd / math.sqrt(n), abs=1 / n)
    assert estimate.high == pytest.approx(mean + 1.96 * sd / math.sqrt(n), abs=1 / n)
    assert estimate.excludes_zero() and estimate.signed() == f"+0.054 [{estimate.low:+.3f}, {estimate.high:+.3f}]"
    # the two accuracies' own intervals overlap, yet the paired difference is beyond noise: the shared articles cancel
    alone, other = interval(scores), interval(reference)
    assert alone.low < other.high
    assert estimate.high - estimate.low < min(alone.high - alone.low, other.high - other.low)


def test_identical_sides_differ_by_exactly_nothing():
    scores = [1.0, 0.0, 1.0, 1.0, 0.0]
    assert paired_difference(scores, scores) == Estimate(0.0, 0.0, 0.0)
    assert not paired_difference(scores, scores).excludes_zero()


def test_the_same_scores_give_the_same_interval():
    scores = [float(i % 3 == 0) for i in range(50)]
    assert interval(scores) == interval(list(scores))
    assert interval(scores, seed=1) != interval(scores)  # the seed is what fixes it


def test_bad_input_is_named():
    with pytest.raises(
        KdloraError, match=r"^a paired difference needs scores of the same examples on both sides, got 3 and 2$"
    ):
        paired_difference([1, 0, 1], [1, 0])
    with pytest.raises(KdloraError, match=r"^an interval needs a list of per-example scores, got shape \(0,\)$"):
        interval([])
