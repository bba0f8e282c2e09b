"""The report's verdict: one line a team can act on, from the report's numbers (consistency.json's data).

It answers two questions, with their intervals, in words. Did the merge rank the real runs better than the
best predictor that trains nothing, and how does that stand against the noise ceiling? Did the proposal,
trained for real, beat uniform and token-proportional? "yes" when both hold, "no" when neither does,
"partly" otherwise.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from mergemix.report.metrics import fmt

NO_MERGE = {"interpolation": "interpolation", "token_closeness": "token-closeness", "log_prior": "log prior"}


def _ranking(t: dict[str, Any], n: int) -> tuple[bool, str]:
    merge = t["merge"]["spearman"]
    lo, hi = t["merge"]["spearman_ci_mixtures"]
    best = max(NO_MERGE, key=lambda k: -math.inf if t[k]["spearman"] is None else t[k]["spearman"])
    rho = t[best]["spearman"]
    ok = merge is not None and rho is not None and merge > rho
    inside = rho is not None and lo is not None and hi is not None and lo <= rho <= hi
    ceiling = f", noise ceiling {fmt(t['ceiling'])}" if t.get("ceiling") is not None else ""
    return ok, (f"the merge ranked the {n} real mixtures {'better' if ok else 'no better'} than the best predictor "
                f"that trains nothing (merge ρ {fmt(merge)} [{fmt(lo)}, {fmt(hi)}] against {NO_MERGE[best]} "
                f"{fmt(rho)}{', inside that interval' if inside else ''}{ceiling})")


def _against(real: dict[str, Any], label: str, name: str) -> tuple[bool, str]:
    p, b = real["proposal"], real[label]
    diff = p["mean"] - b["mean"]
    if len(p["seeds"]) > 1 and len(b["seeds"]) > 1:
        se = math.sqrt(np.var(p["seeds"], ddof=1) / len(p["seeds"]) + np.var(b["seeds"], ddof=1) / len(b["seeds"]))
        noise = f" ±{fmt(1.96 * se, 3)}" + (", within the seeds' noise" if abs(diff) <= 1.96 * se else "")
    else:
        noise = ", one seed: no noise estimate"
    return diff > 0, f"{name} {fmt(b['mean'], 3)} ({diff:+.3f}{noise})"


def verdict(data: dict[str, Any]) -> str:
    """The one-line verdict of a report (see the module docstring)."""
    ranked, ranking = _ranking(data["targets"]["objective"], len(data["mixtures"]))
    real = data["trained_for_real"]
    if "proposal" not in real:
        beat, proposal = False, "the proposal was not trained for real"
    else:
        parts = [_against(real, label, name) for label, name in (("uniform", "uniform"),
                                                                  ("token_prior", "token-proportional"))
                 if label in real]
        beat = all(ok for ok, _ in parts)
        proposal = (f"trained for real the proposal scored {fmt(real['proposal']['mean'], 3)}, "
                    f"{'beating' if beat else 'not beating'} " + " and ".join(text for _, text in parts))
        proposal += "" if len(parts) == 2 else " (it equals the other baseline, trained once)"
    answer = "yes" if ranked and beat else "no" if not ranked and not beat else "partly"
    return f"Verdict: {answer}. Ranking: {ranking}. Proposal: {proposal}."
