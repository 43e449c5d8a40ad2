"""Exact statistics for accuracies measured on a finite set of test images (numpy only), and
the per-image outcome codes they are computed from.

An evaluation's result for one defense is `broken_by` [n], int: the position in the attack order
of the first attack that broke image i, `ROBUST` (-1) if no attack did, `CLEAN_ERROR` (-2) if the
defense misclassifies it clean (then it is not attacked). Robust accuracy = mean(broken_by == -1).

- `clopper_pearson`: the exact (Clopper-Pearson 1934) interval of a proportion k / n: the
  proportions p that a two-sided binomial test at level alpha, split alpha / 2 per tail, does
  not reject. It is conservative: its coverage is at least 1 - alpha for every p.
- `mcnemar`: two defenses scored on the same images. Only the discordant images (kept by one
  and not the other: b kept only by the first, c only by the second) carry information about
  which is better; under "equally robust" b ~ Binomial(b + c, 1/2). The exact McNemar test is
  the two-sided binomial test of that (p = min(1, 2 · P(X ≤ min(b, c)))), the same p-value as
  scipy.stats.binomtest(b, b + c, 0.5).
- `paired_difference`: the difference of the two accuracies, (b − c) / n, with an exact
  interval conditional on the number of discordant images m = b + c: the Clopper-Pearson
  interval [lo, hi] of π = b / m mapped through d = (m / n)(2π − 1). It is the interval that
  inverts the exact McNemar test, so it excludes 0 exactly when that test's p < alpha
  (with m = 0 it is the single point 0).

The binomial tails are summed in float64 from log-probabilities; the interval bounds are found
by bisection to 1e-14, so they agree with scipy's beta quantiles to better than 1e-9.
"""
from __future__ import annotations

import numpy as np

from srdjax.checks import check

ROBUST, CLEAN_ERROR = -1, -2


def survived(broken_by, through: int | None = None) -> np.ndarray:
    """Per image: classified correctly clean and after every attack up to position `through`
    (all of them when None)."""
    broken_by = np.asarray(broken_by)
    if through is None:
        return broken_by == ROBUST
    return (broken_by == ROBUST) | (broken_by > through)


def _check_counts(k, n, name="k") -> tuple[int, int]:
    check(isinstance(n, (int, np.integer)) and n >= 0, f"n must be an integer >= 0, got {n!r}")
    check(isinstance(k, (int, np.integer)) and 0 <= k <= n,
          f"{name} must be an integer in [0, n = {n}], got {k!r}")
    return int(k), int(n)


def _log_pmf(n: int, p: float) -> np.ndarray:
    """log P(X = j), j = 0..n, for X ~ Binomial(n, p) with 0 < p < 1."""
    j = np.arange(1, n + 1, dtype=np.float64)
    log_choose = np.concatenate([[0.0], np.cumsum(np.log(n - j + 1) - np.log(j))])
    j = np.arange(n + 1, dtype=np.float64)
    return log_choose + j * np.log(p) + (n - j) * np.log1p(-p)


def binom_cdf(k: int, n: int, p: float) -> float:
    """P(X ≤ k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    logs = _log_pmf(n, p)
    # Sum the shorter side of the distribution (fewer terms, no 1 − (nearly 1) cancellation).
    if k < n * p:
        return float(np.exp(logs[:k + 1]).sum())
    return float(1.0 - np.exp(logs[k + 1:]).sum())


def binom_sf(k: int, n: int, p: float) -> float:
    """P(X > k) for X ~ Binomial(n, p)."""
    if k < 0:
        return 1.0
    if k >= n or p <= 0.0:
        return 0.0
    if p >= 1.0:
        return 1.0
    logs = _log_pmf(n, p)
    if k + 1 > n * p:
        return float(np.exp(logs[k + 1:]).sum())
    return float(1.0 - np.exp(logs[:k + 1]).sum())


def _bisect(f, lo: float, hi: float) -> float:
    """The root of f, increasing on [lo, hi] with f(lo) < 0 < f(hi), to 1e-14."""
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-14:
            break
    return 0.5 * (lo + hi)


def clopper_pearson(k: int, n: int, alpha: float = 0.05) -> tuple[float, float]:
    """The exact 1 − alpha interval (low, high) of a proportion with k successes in n trials."""
    k, n = _check_counts(k, n)
    check(n >= 1, "clopper_pearson needs n >= 1 trials, got 0")
    check(0 < alpha < 1, f"alpha must lie in (0, 1), got {alpha!r}")
    # low: P(X ≥ k | p) = alpha/2, increasing in p; high: P(X ≤ k | p) = alpha/2, decreasing.
    low = 0.0 if k == 0 else _bisect(lambda p: binom_sf(k - 1, n, p) - alpha / 2, 0.0, 1.0)
    high = 1.0 if k == n else _bisect(lambda p: alpha / 2 - binom_cdf(k, n, p), 0.0, 1.0)
    return low, high


def binomial_test_half(b: int, m: int) -> float:
    """Two-sided exact p-value of b successes in m trials under p = 1/2 (1.0 when m = 0)."""
    b, m = _check_counts(b, m, "b")
    if m == 0:
        return 1.0
    return min(1.0, 2.0 * binom_cdf(min(b, m - b), m, 0.5))


def mcnemar(ours, theirs) -> dict:
    """The exact McNemar test of two defenses' per-image results on the same images (1-d bool
    arrays): b (kept only by `ours`), c (only by `theirs`), and the two-sided p-value."""
    ours, theirs = _paired(ours, theirs)
    b, c = int(np.sum(ours & ~theirs)), int(np.sum(~ours & theirs))
    return {"b": b, "c": c, "p_value": binomial_test_half(b, b + c)}


def paired_difference(ours, theirs, alpha: float = 0.05) -> dict:
    """Accuracy of `ours` minus accuracy of `theirs` on the same images, its exact interval
    conditional on the discordant count (see the module docstring), and the McNemar test."""
    ours, theirs = _paired(ours, theirs)
    n = ours.size
    test = mcnemar(ours, theirs)
    b, c = test["b"], test["c"]
    m = b + c
    lo, hi = clopper_pearson(b, m, alpha) if m else (0.5, 0.5)
    return {"difference": (b - c) / n, "low": m / n * (2 * lo - 1), "high": m / n * (2 * hi - 1),
            "alpha": alpha, "n": int(n), **test}


def _paired(ours, theirs):
    ours, theirs = np.asarray(ours), np.asarray(theirs)
    check(ours.dtype == bool and theirs.dtype == bool and ours.ndim == 1
          and ours.shape == theirs.shape and ours.size > 0,
          f"a paired comparison needs two non-empty 1-d boolean arrays of the same length, got "
          f"{ours.dtype} {ours.shape} and {theirs.dtype} {theirs.shape}")
    return ours, theirs
