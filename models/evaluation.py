"""Confidence intervals the models' evaluations share: bootstrapped AUROC / AUPRC (and their paired differences),
Wilson intervals.

A model is compared with its rule (NEWS2, SAPS-I) on the same held-out people, so the difference is bootstrapped
pairwise: each resample scores both on the same rows. Rows of one person are not independent (a patient's
scoring points every minute; a provider's claims), so resampling is by person or provider when `groups` is given
(a cluster bootstrap).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

CONFIDENCE = 0.95


def auroc_interval(y: np.ndarray, score: np.ndarray, *, minus: np.ndarray | None = None,
                   groups: np.ndarray | None = None, seed: int = 0, resamples: int = 500) -> tuple[float, float]:
    """Percentile interval of AUROC(score), or of AUROC(score) - AUROC(minus) on the same resamples."""
    from sklearn.metrics import roc_auc_score

    return metric_interval(roc_auc_score, y, score, minus=minus, groups=groups, seed=seed, resamples=resamples)


def auprc_interval(y: np.ndarray, score: np.ndarray, *, minus: np.ndarray | None = None,
                   groups: np.ndarray | None = None, seed: int = 0, resamples: int = 500) -> tuple[float, float]:
    """Percentile interval of AUPRC (average precision), or of a paired AUPRC difference, as auroc_interval."""
    from sklearn.metrics import average_precision_score

    return metric_interval(average_precision_score, y, score, minus=minus, groups=groups, seed=seed,
                           resamples=resamples)


def metric_interval(metric: Callable[[np.ndarray, np.ndarray], float], y: np.ndarray, score: np.ndarray, *,
                    minus: np.ndarray | None = None, groups: np.ndarray | None = None, seed: int = 0,
                    resamples: int = 500) -> tuple[float, float]:
    """Percentile interval of metric(y, score), or of metric(score) - metric(minus) on the same resamples.

    groups: a label per row; whole groups are resampled (rows of a person or a provider stay together).
    Resamples that hold one outcome only are skipped; (nan, nan) when none is usable.
    """
    y, score = np.asarray(y), np.asarray(score)
    rng = np.random.default_rng(seed)
    if groups is None:
        members = [np.array([i]) for i in range(len(y))]
    else:
        _, inverse = np.unique(np.asarray(groups), return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.flatnonzero(np.diff(inverse[order])) + 1)
    values = []
    for _ in range(resamples):
        rows = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        if y[rows].min() == y[rows].max():
            continue
        v = metric(y[rows], score[rows])
        values.append(v - metric(y[rows], minus[rows]) if minus is not None else v)
    if not values:
        return math.nan, math.nan
    tail = 100 * (1 - CONFIDENCE) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def wilson(successes: int, trials: int) -> tuple[float, float]:
    """Wilson score interval of a proportion (sensible at 0 and at small n, unlike the normal approximation)."""
    if trials <= 0:
        return math.nan, math.nan
    z = 1.959963984540054  # the 97.5th percentile of the standard normal
    p = successes / trials
    centre = (p + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / (1 + z * z / trials)
    return max(0.0, centre - half), min(1.0, centre + half)
