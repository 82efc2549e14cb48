"""The uncertainty around a sweep's numbers: a bootstrap interval over test cases and a paired test.

A row of a report (one setting, several seeds) has a per-case Dice for every seed's network; the seeds
share the test split (it is carved with `split_seed`, not the run's seed), so each case's Dice is
averaged over the seeds first. Over those per-case means:

- a 95% bootstrap confidence interval of the mean (scipy.stats.bootstrap, BCa, seeded: a rerun of the
  report gives the same interval), which says how much the test set itself leaves the mean uncertain;
- a two-sided Wilcoxon signed-rank test (scipy.stats.wilcoxon) against the same cases of another
  network (the runs' own baseline, or a reference row such as L1 at the same ratio): p < 0.05 says the
  difference is unlikely to be chance on these cases. It does not cover seed-to-seed variation, which the
  ± std over seeds shows.
"""
from __future__ import annotations

import math
import statistics
from typing import Mapping, Optional, Sequence

import numpy as np

CONFIDENCE = 0.95
RESAMPLES = 2000


def per_case_mean(tables: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """case -> mean over the tables (one per seed) of the cases every table has; NaN (ignored) cases dropped."""
    if not tables:
        return {}
    common = set(tables[0]).intersection(*tables[1:])
    out = {}
    for case in sorted(common):
        values = [t[case] for t in tables]
        if not any(math.isnan(v) for v in values):
            out[case] = statistics.fmean(values)
    return out


def bootstrap_ci(values: Sequence[float], confidence: float = CONFIDENCE, seed: int = 0) -> tuple[float, float]:
    """Bootstrap interval of the mean of `values` (BCa; percentile when BCa is degenerate)."""
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return (math.nan, math.nan)
    if np.all(data == data[0]):
        return (float(data[0]), float(data[0]))
    for method in ("BCa", "percentile"):
        result = bootstrap((data,), np.mean, confidence_level=confidence, n_resamples=RESAMPLES, method=method,
                           rng=np.random.default_rng(seed))
        low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
        if not (math.isnan(low) or math.isnan(high)):
            return low, high
    return (math.nan, math.nan)


def paired_p(a: Mapping[str, float], b: Mapping[str, float]) -> Optional[float]:
    """Two-sided Wilcoxon signed-rank p-value of a vs b over their common cases; 1.0 when they agree on
    every case, None with fewer than 5 common cases (no test is meaningful)."""
    from scipy.stats import wilcoxon

    common = sorted(set(a) & set(b))
    if len(common) < 5:
        return None
    x, y = np.array([a[c] for c in common]), np.array([b[c] for c in common])
    if np.allclose(x, y):
        return 1.0
    return float(wilcoxon(x, y, zero_method="wilcox", alternative="two-sided").pvalue)
