"""95% intervals for held-out means, by bootstrap over examples (percentile method, fixed seed: the same scores
always give the same interval). Each example contributes one score (accuracy: 1 or 0).

A paired difference bootstraps the per-example differences: both sides are resampled on the same examples, so the
noise they share (which articles are hard) cancels, and its interval is tighter than either mean's interval.
That is the honest way to ask whether rank 64 beats rank 1 on 222 articles."""

from dataclasses import dataclass

import numpy as np

from hub.errors import KdloraError

RESAMPLES = 10_000
LEVEL = 0.95
_CHUNK = 2_000_000  # resampled scores held at once: memory stays flat for any number of examples


@dataclass(frozen=True)
class Estimate:
    mean: float
    low: float
    high: float

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def signed(self) -> str:
        """A difference as the tables print it: `+0.070 [+0.032, +0.108]`."""
        return f"{self.mean:+.3f} [{self.low:+.3f}, {self.high:+.3f}]"

    def __str__(self) -> str:
        return f"{self.mean:.3f} [{self.low:.3f}, {self.high:.3f}]"


def interval(scores, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = 0) -> Estimate:
    """The mean of `scores` (one per example) and its bootstrap interval."""
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or len(values) == 0:
        raise KdloraError(f"an interval needs a list of per-example scores, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    step = max(1, _CHUNK // len(values))
    means = np.concatenate(
        [
            values[rng.integers(0, len(values), size=(min(step, resamples - start), len(values)))].mean(axis=1)
            for start in range(0, resamples, step)
        ]
    )
    low, high = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return Estimate(float(values.mean()), float(low), float(high))


def paired_difference(scores, reference, **options) -> Estimate:
    """mean(scores - reference) over the same examples, and its bootstrap interval (`options`: those of `interval`)."""
    if len(scores) != len(reference):
        raise KdloraError(
            f"a paired difference needs scores of the same examples on both sides, got {len(scores)} and {len(reference)}"
        )
    return interval(np.asarray(scores, dtype=np.float64) - np.asarray(reference, dtype=np.float64), **options)
