"""Paired bootstrap of a difference to a reference, and the claim verdict it decides.

Scores are (seeds, examples) arrays, paired: row s of both arms is the same training seed, column
i the same test example. One bootstrap replicate resamples seeds and examples (with replacement,
independently), so the interval carries both the training noise and the test-sample noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

__all__ = ["MEASURES", "Interval", "paired_bootstrap", "verdict", "decisive_size"]


def _points(arm: np.ndarray, ref: np.ndarray) -> float:
    """Accuracy points lost (per-example correctness 0/1)."""
    return 100.0 * float(ref.mean() - arm.mean())


def _relative(arm: np.ndarray, ref: np.ndarray) -> float:
    """Percent of the reference's mean lost (nDCG and other higher-is-better means); NaN when the
    reference's mean is 0 (a resample of a tiny test set can hit only zeros)."""
    ref_mean = ref.mean()
    return 100.0 * float(1.0 - arm.mean() / ref_mean) if ref_mean else math.nan


def _perplexity(arm: np.ndarray, ref: np.ndarray) -> float:
    """Percent perplexity increase, from per-segment mean NLLs (equal-length segments)."""
    return 100.0 * float(math.expm1(arm.mean() - ref.mean()))


#: A loss of ``arm`` against ``ref`` (positive = worse), and its unit.
MEASURES: dict[str, tuple[Callable[[np.ndarray, np.ndarray], float], str]] = {
    "points": (_points, "points"), "relative": (_relative, "% relative"), "perplexity": (_perplexity, "% perplexity")}


@dataclass(frozen=True)
class Interval:
    estimate: float
    low: float
    high: float
    seeds: int
    examples: int


def paired_bootstrap(arm: np.ndarray, ref: np.ndarray, measure: str, reps: int = 2000, seed: int = 0,
                     level: float = 0.95) -> Interval:
    """Point estimate and percentile interval of ``MEASURES[measure]`` over (seed, example) resamples."""
    arm, ref = np.asarray(arm, dtype=np.float64), np.asarray(ref, dtype=np.float64)
    if arm.shape != ref.shape or arm.ndim != 2:
        raise ValueError(f"paired scores must be two (seeds, examples) arrays of one shape, got {arm.shape} "
                         f"and {ref.shape}")
    fn = MEASURES[measure][0]
    rng = np.random.default_rng(seed)
    seeds, examples = arm.shape
    stats = np.empty(reps)
    for r in range(reps):
        rows = rng.integers(0, seeds, seeds)[:, None]
        cols = rng.integers(0, examples, examples)[None, :]
        stats[r] = fn(arm[rows, cols], ref[rows, cols])
    tail = 100 * (1 - level) / 2
    stats = stats[np.isfinite(stats)]
    low, high = np.percentile(stats, [tail, 100 - tail]) if len(stats) else (math.nan, math.nan)
    return Interval(fn(arm, ref), float(low), float(high), seeds, examples)


def verdict(interval: Interval, tolerance: float) -> str:
    """holds when the whole interval of the loss is below ``tolerance`` (the claim allows at most
    that loss), fails when the whole interval is above it, inconclusive otherwise."""
    if interval.high < tolerance:
        return "holds"
    if interval.low > tolerance:
        return "fails"
    return "inconclusive"


def decisive_size(interval: Interval, tolerance: float) -> int | None:
    """Test examples that would shrink the interval (half-width ~ 1/sqrt(n)) to exclude the
    tolerance, if the estimate stayed where it is; None when the estimate sits on the tolerance."""
    gap = abs(interval.estimate - tolerance)
    half = (interval.high - interval.low) / 2
    if gap == 0 or not math.isfinite(gap / half if half else gap):
        return None
    return max(interval.examples, math.ceil(interval.examples * (half / gap) ** 2))
