"""Rank agreement between a predictor and the truth over a set of mixtures, with bootstrap intervals.

All rank statistics come from scipy.stats. Two kinds of uncertainty are reported for ρ and τ:
- over mixtures: a 95% bootstrap interval, the mixtures resampled with replacement (is the agreement a
  property of this particular set of mixtures?);
- under item noise: the 95% range of ρ when every score is redrawn from a normal with its standard error
  over benchmark items. It is a sensitivity check, not a bootstrap: it adds noise to scores that already
  carry it and treats the item noise of different models as independent, so it errs low.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import numpy as np
from scipy.stats import kendalltau, spearmanr

TOP_FRACTION = 0.25  # "top-25% rho": agreement among the mixtures that are truly best


def finite(x: float) -> float | None:
    """x, or None where it is nan or infinite (JSON has no nan)."""
    return float(x) if math.isfinite(x) else None


def fmt(x: float | None, digits: int = 2) -> str:
    """A statistic for a table: fixed digits, "n/a" where it is missing."""
    return "n/a" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman ρ; nan where either side is constant."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b)[0])


def kendall(a: Sequence[float], b: Sequence[float]) -> float:
    """Kendall τ-b; nan where either side is constant."""
    if len(a) < 3 or np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(kendalltau(a, b)[0])


def pairwise_accuracy(pred: Sequence[float], true: Sequence[float]) -> float:
    """Share of mixture pairs that the predictor orders as the truth does (a tie on either side counts ½)."""
    pairs = list(itertools.combinations(range(len(pred)), 2))
    agree = 0.0
    for i, j in pairs:
        s = np.sign(pred[i] - pred[j]) * np.sign(true[i] - true[j])
        agree += 1.0 if s > 0 else 0.5 if s == 0 else 0.0
    return agree / len(pairs)


def top_rho(pred: Sequence[float], true: Sequence[float]) -> float:
    """Spearman ρ among the truly best quarter of the mixtures (at least 3): does the predictor order the
    mixtures that matter, not only tell good from bad?"""
    n = max(3, math.ceil(TOP_FRACTION * len(true)))
    top = np.argsort(true)[::-1][:n]
    return spearman(np.asarray(pred)[top], np.asarray(true)[top])


def recovery(pred: Sequence[float], true: Sequence[float]) -> float:
    """Σ predicted / Σ actual: does the predictor get the size of the scores right, not only their order?
    (nan where the actual scores sum to about 0, as normalized scores around the base can.)"""
    total = float(np.sum(true))
    return float(np.sum(pred)) / total if abs(total) > 1e-9 else float("nan")


def partial_spearman(x: Sequence[float], y: Sequence[float], z: Sequence[float]) -> float:
    """Spearman correlation of x and y with z partialled out: what x tells about y beyond z."""
    rxy, rxz, ryz = spearman(x, y), spearman(x, z), spearman(y, z)
    denom = math.sqrt(max(0.0, (1 - rxz**2) * (1 - ryz**2)))
    return (rxy - rxz * ryz) / denom if denom > 1e-9 else float("nan")


def argmax_check(pred: Sequence[float], true: Sequence[float]) -> dict[str, float]:
    """True rank (1 = best) of the mixture the predictor ranks first, and its regret (best true score
    minus the true score of that mixture, in the target's units)."""
    pick = int(np.argmax(pred))
    order = np.argsort(true)[::-1]
    return {"true_rank": int(np.where(order == pick)[0][0]) + 1, "regret": float(np.max(true) - true[pick])}


def _interval(values: list[float]) -> list[float | None]:
    vals = [v for v in values if math.isfinite(v)]
    if len(vals) < 10:
        return [None, None]
    return [float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))]


def agreement(
    pred: Sequence[float],
    true: Sequence[float],
    pred_se: Sequence[float] | None = None,
    true_se: Sequence[float] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, object]:
    """Every agreement statistic of one predictor against the truth: ρ and τ with their 95% bootstrap
    interval over mixtures and, given standard errors, their 95% range under item noise."""
    p, t = np.asarray(pred, dtype=float), np.asarray(true, dtype=float)
    rng = np.random.default_rng(seed)
    out: dict[str, object] = {
        "spearman": finite(spearman(p, t)),
        "kendall": finite(kendall(p, t)),
        "top25_spearman": finite(top_rho(p, t)),
        "pairwise_accuracy": pairwise_accuracy(p, t),
        "recovery": finite(recovery(p, t)),
        **argmax_check(p, t),
    }
    boots: dict[str, list[float]] = {"spearman": [], "kendall": []}
    for _ in range(n_boot):
        idx = rng.integers(0, len(p), len(p))
        boots["spearman"].append(spearman(p[idx], t[idx]))
        boots["kendall"].append(kendall(p[idx], t[idx]))
    out["spearman_ci_mixtures"] = _interval(boots["spearman"])
    out["kendall_ci_mixtures"] = _interval(boots["kendall"])
    if pred_se is not None and true_se is not None:
        ps, ts = np.nan_to_num(np.asarray(pred_se, float)), np.nan_to_num(np.asarray(true_se, float))
        item: dict[str, list[float]] = {"spearman": [], "kendall": []}
        for _ in range(n_boot):
            pp, tt = p + rng.normal(0, 1, len(p)) * ps, t + rng.normal(0, 1, len(t)) * ts
            item["spearman"].append(spearman(pp, tt))
            item["kendall"].append(kendall(pp, tt))
        out["spearman_ci_items"] = _interval(item["spearman"])
        out["kendall_ci_items"] = _interval(item["kendall"])
    return out
