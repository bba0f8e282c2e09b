"""Performance surface mapping: seeds → real merges → surrogates → dense simplex search → verification.

Every evaluated α goes to `trials.jsonl` as soon as it is scored; a rerun with the same experts and
benchmarks takes finished trials from the log instead of evaluating them again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mergemix.artifacts import stable_hash
from mergemix.evaluate import Objective
from mergemix.progress import progress
from mergemix.recipe import Recipe
from mergemix.search.seeds import seed_points, simplex_candidates
from mergemix.search.surrogate import SURROGATES, loo_rmse
from mergemix.search.trials import TrialLog

log = logging.getLogger(__name__)

Raw = dict[str, dict[str, float]]


@dataclass
class Trial:
    """One evaluated mixture: α, raw benchmark scores, normalized scores, capabilities, objective."""

    id: str
    kind: str
    alpha: dict[str, float]
    raw: Raw
    normalized: dict[str, float] = field(default_factory=dict)
    capabilities: dict[str, float] = field(default_factory=dict)
    objective: float = float("nan")
    predicted: float | None = None  # the surrogates' objective, for verified candidates

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def vector(self, domains: list[str]) -> np.ndarray:
        return np.array([self.alpha[d] for d in domains])


@dataclass
class SearchResult:
    base: Trial
    trials: list[Trial]  # every evaluated mixture on the simplex, in evaluation order
    objective: Objective
    star: Trial
    surrogate_loo_rmse: dict[str, float]
    predicted_star: float | None

    def by_kind(self, kind: str) -> Trial:
        return next(t for t in self.trials if t.kind == kind)


def _as_alpha(domains: list[str], vec: np.ndarray) -> dict[str, float]:
    vec = np.clip(vec, 0.0, None)
    vec = vec / vec.sum() if vec.sum() > 0 else vec
    return {d: round(float(a), 6) for d, a in zip(domains, vec, strict=True)}


def run_search(
    recipe: Recipe,
    evaluate_alpha: Callable[[dict[str, float]], Raw],
    prior: np.ndarray,
    log_path: Path,
    eval_key: str,
) -> SearchResult:
    """Search the simplex for the α maximizing the objective. `evaluate_alpha` merges and scores one α
    (all zeros: the base itself)."""
    spec = recipe.search
    domains = recipe.domain_names
    trial_log = TrialLog(log_path, eval_key)
    # Derived scores depend on the objective's definition too: a trial scored under another one is re-used
    # (no merge, no evaluation) and logged again with its scores recomputed.
    objective_key = stable_hash([recipe.evaluation.model_dump(mode="json", exclude={"batch_size"}),
                                 Objective.VERSION])
    pending: list[Trial] = []

    def run(tid: str, kind: str, alpha: dict[str, float]) -> Trial:
        rec = trial_log.get(alpha)
        if rec is not None:
            return Trial(tid, kind, alpha, rec["raw"], predicted=rec.get("predicted"))
        return Trial(tid, kind, alpha, evaluate_alpha(alpha))

    def finish(trial: Trial, objective: Objective) -> Trial:
        trial.normalized, trial.capabilities, trial.objective = objective(trial.raw)
        logged = trial_log.get(trial.alpha)
        if logged is None or logged.get("objective_key") != objective_key:
            trial_log.add({**trial.record(), "objective_key": objective_key})
        return trial

    seeds = seed_points(prior, spec.seeds, spec.concentration, recipe.seed)
    bar = progress(total=len(seeds) + 1 + spec.verify, desc="merge + evaluate", leave=False)
    # The base and the vertices come first: they fix the normalization of every other score.
    base = run("base", "base", {d: 0.0 for d in domains})
    bar.update()
    k = len(domains)
    for i, (kind, vec) in enumerate(seeds[:k]):
        pending.append(run(f"seed-{i:03d}", kind, _as_alpha(domains, vec)))
        bar.update()
    objective = Objective.from_references(recipe.evaluation, base.raw, [t.raw for t in pending])
    finish(base, objective)
    trials = [finish(t, objective) for t in pending]
    for i, (kind, vec) in enumerate(seeds[k:], start=k):
        trials.append(finish(run(f"seed-{i:03d}", kind, _as_alpha(domains, vec)), objective))
        bar.update()
        bar.set_postfix(best=f"{max(t.objective for t in trials):.3f}")

    # One surrogate per capability group, on every simplex point evaluated so far.
    groups = list(trials[0].capabilities)
    x = np.stack([t.vector(domains) for t in trials])
    fit = SURROGATES.get(spec.surrogate)
    predictors, loo = {}, {}
    for g in groups:
        y = np.array([t.capabilities[g] for t in trials])
        predictors[g] = fit(x, y, recipe.seed)
        loo[g] = loo_rmse(fit, x, y, recipe.seed)  # the recipe guarantees at least K + 2 >= 4 points
    log.info("surrogate (%s) leave-one-out RMSE: %s", spec.surrogate, ", ".join(f"{g} {v:.3f}" for g, v in loo.items()))

    def predict(points: np.ndarray) -> np.ndarray:
        preds = {g: predictors[g](points) for g in groups}
        return np.array([objective.combine({g: preds[g][i] for g in groups}) for i in range(len(points))])

    cand = simplex_candidates(prior, spec.candidates, spec.concentration, recipe.seed)
    pred = predict(cand)
    # The best predicted points, at least 0.05 apart (L1) from each other and from every seed.
    chosen: list[np.ndarray] = []
    for idx in np.argsort(-pred, kind="stable"):
        if len(chosen) >= spec.verify:
            break
        point = cand[idx]
        if all(np.abs(point - c).sum() > 0.05 for c in [*chosen, *x]):
            chosen.append(point)
    for j, point in enumerate(chosen):
        t = run(f"verify-{j}", "verify", _as_alpha(domains, point))
        t.predicted = float(predict(point[None])[0])
        trials.append(finish(t, objective))
        bar.update()
    bar.close()

    ranked = sorted(trials, key=lambda t: -t.objective)
    if spec.final == "best":
        star = ranked[0]
    else:
        mean = np.mean([t.vector(domains) for t in ranked[: spec.top_k]], axis=0)
        alpha = _as_alpha(domains, mean)
        existing = next((t for t in trials if t.alpha == alpha), None)
        star = existing or finish(run("top-k-mean", "top_k_mean", alpha), objective)
        if existing is None:
            trials.append(star)
    predicted_star = float(predict(star.vector(domains)[None])[0])
    return SearchResult(base, trials, objective, star, loo, predicted_star)
