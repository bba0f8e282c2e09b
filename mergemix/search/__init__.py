"""The search driver: references → a strategy's ask/tell loop (mergemix.search.strategies) → α*.

The base, the vertices, uniform and the token prior are scored first (they fix the normalization and are the
baselines); then the strategy asks for feasible mixtures until it is done or the budget (search.trials,
search.timeout_s) is spent. Every evaluated α goes to `trials.jsonl` as soon as it is scored; a rerun with
the same experts and benchmarks takes finished trials from the log (or the shared study) instead of
evaluating them again.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mergemix.artifacts import stable_hash
from mergemix.errors import MergemixError
from mergemix.evaluate import Objective
from mergemix.evaluate.differentiable import GradientObjective
from mergemix.progress import progress
from mergemix.recipe import Recipe
from mergemix.search.feasible import Bounds
from mergemix.search.seeds import seed_points
from mergemix.search.strategies import STRATEGIES, Context, as_alpha
from mergemix.search.trials import TrialLog, alpha_key

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
    ranked: list[Trial] = field(default_factory=list)  # feasible trials, best first by what α* maximizes

    def by_kind(self, kind: str) -> Trial:
        return next(t for t in self.trials if t.kind == kind)


def kl_divergence(alpha: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """KL(α ‖ prior) in nats per row of `alpha` (0 · log 0 = 0)."""
    alpha = np.atleast_2d(alpha)
    safe = np.where(alpha > 0, alpha, 1.0)
    return np.sum(np.where(alpha > 0, alpha * np.log(safe / prior), 0.0), axis=1)


def study_name(recipe: Recipe, strategy: str, eval_key: str, bounds: Bounds) -> str:
    """The shared study of one search: same experts, benchmarks, objective, bounds, seed and strategy (a
    larger search.trials or timeout_s continues the same study)."""
    # the gradient strategy's own fields (search.gradient_*) are no part of an optuna study
    own = {f for f in type(recipe.search).model_fields if f.startswith("gradient_")}
    key = stable_hash([eval_key, recipe.evaluation.model_dump(mode="json", exclude={"batch_size"}),
                       recipe.search.model_dump(mode="json", exclude={"storage", "timeout_s", "strategy", "trials",
                                                                      "surrogate_prior", "verify_real", *own}),
                       bounds.lo.tolist(), bounds.hi.tolist(), recipe.seed])
    return f"{recipe.name}-{strategy}-{key[:12]}"


def run_search(
    recipe: Recipe,
    evaluate_alpha: Callable[[dict[str, float]], Raw],
    prior: np.ndarray,
    log_path: Path,
    eval_key: str,
    bounds: Bounds | None = None,
    strategy: str | None = None,
    differentiable: GradientObjective | None = None,
) -> SearchResult:
    """Search the feasible set (`bounds`, default the whole simplex) with `strategy` (default
    search.strategy) for the α maximizing the objective minus search.kl_weight × KL(α ‖ token prior).
    `evaluate_alpha` merges and scores one α (all zeros: the base itself). The references are always scored
    but α* is chosen among feasible points only. `differentiable` estimates the objective differentiably in α
    on the merged model (strategy gradient only)."""
    spec = recipe.search
    domains = recipe.domain_names
    k = len(domains)
    bounds = bounds or recipe.mixture.bounds(domains)
    name = strategy or spec.strategy
    cls = STRATEGIES.get(name)
    trial_log = TrialLog(log_path, eval_key)
    # Derived scores depend on the objective's definition too: a trial scored under another one is re-used
    # (no merge, no evaluation) and logged again with its scores recomputed.
    objective_key = stable_hash([recipe.evaluation.model_dump(mode="json", exclude={"batch_size"}),
                                 Objective.VERSION])

    def penalty(points: np.ndarray) -> np.ndarray:
        points = np.atleast_2d(points)
        return spec.kl_weight * kl_divergence(points, prior) if spec.kl_weight else np.zeros(len(points))

    def score(t: Trial) -> float:
        """What α* maximizes: the objective, less the KL penalty toward the token prior."""
        return t.objective - float(penalty(t.vector(domains))[0])

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
    references = [("base", "base", {d: 0.0 for d in domains})]
    references += [(f"seed-{i:03d}", kind, as_alpha(domains, vec)) for i, (kind, vec) in enumerate(seeds[: k + 2])]
    rest = seeds[k + 2:]
    if not bounds.unconstrained:
        # The references stay (normalization, baselines); every other seed is moved into the feasible set,
        # led by the feasible points nearest uniform and the token prior.
        extra = [("uniform_feasible", np.full(k, 1.0 / k)), ("token_prior_feasible", prior)]
        rest = [(kind, bounds.project(vec)[0]) for kind, vec in extra + rest][: max(spec.seeds - k - 2, 2)]
    budget = spec.trials or len(rest) + spec.verify
    storage = ""
    if cls.shared:
        from mergemix.search.study import storage_url

        storage = storage_url(spec.storage, log_path.parent)
    bar = progress(total=len(references) + budget, desc=f"merge + evaluate ({name})", leave=False)
    # The base and the vertices come first: they fix the normalization of every other score.
    if cls.shared:
        scored = _shared_references(storage, study_name(recipe, name, eval_key, bounds), references, run, bar)
    else:
        scored = []
        for ref in references:
            scored.append(run(*ref))
            bar.update()
    base, refs = scored[0], scored[1:]
    objective = Objective.from_references(recipe.evaluation, base.raw, [t.raw for t in refs[:k]])
    finish(base, objective)
    trials = [finish(t, objective) for t in refs]

    ctx = Context(recipe, bounds, prior, objective, list(trials), rest, penalty, budget, storage,
                  study_name(recipe, name, eval_key, bounds), domains, differentiable)
    strat = cls(ctx)
    seen = {alpha_key(t.alpha) for t in trials}
    deadline = time.monotonic() + spec.timeout_s if spec.timeout_s else math.inf
    while time.monotonic() < deadline and (ask := strat.ask()) is not None:
        tid, kind, alpha = ask
        if not cls.shared and alpha_key(alpha) in seen:  # a projection that landed on a point already scored
            continue
        t = run(tid, kind, alpha)
        predicted = strat.predict(t.vector(domains))
        if predicted is not None:
            t.predicted = predicted
        t.normalized, t.capabilities, t.objective = objective(t.raw)
        strat.tell(t)  # the shared study first: a kill between the two leaves the trial where workers see it
        trials.append(finish(t, objective))
        seen.add(alpha_key(alpha))
        bar.update()
        bar.set_postfix(best=f"{max(score(t) for t in trials):.3f}")
    if cls.shared:  # the union of every worker's trials
        own = {alpha_key(t.alpha): t for t in trials}
        trials = list(refs) + [own.get(alpha_key(r["alpha"])) or finish(Trial(r["tid"], r["kind"], r["alpha"], r["raw"]),
                                                                          objective)
                               for r in strat.history()]
    bar.close()

    ranked = sorted((t for t in trials if bounds.contains(t.vector(domains))), key=lambda t: -score(t))
    if not ranked:
        raise MergemixError("search: no feasible trial finished within search.timeout_s; raise it")
    if spec.final == "best":
        star = ranked[0]
    else:
        mean = np.mean([t.vector(domains) for t in ranked[: spec.top_k]], axis=0)
        alpha = as_alpha(domains, mean)
        existing = next((t for t in trials if t.alpha == alpha), None)
        star = existing or finish(run("top-k-mean", "top_k_mean", alpha), objective)
        if existing is None:
            trials.append(star)
    return SearchResult(base, trials, objective, star, strat.loo, strat.predict(star.vector(domains)), ranked)


def _shared_references(storage: str, name: str, references: list[tuple[str, str, dict[str, float]]],
                       run: Callable[[str, str, dict[str, float]], Trial], bar: Any) -> list[Trial]:
    """The references scored once for all workers of a shared study: each worker scores the ones still
    queued, then waits for the others' (their raw scores are in the study)."""
    from mergemix.search.study import Shared

    study = Shared(storage, f"{name}/references", None, 0, [({}, {"alpha": a, "kind": kind, "tid": tid})
                                                            for tid, kind, a in references])
    while True:
        item = study.pop(None)
        if item is not None:
            trial, rec = item
            t = run(rec["tid"], rec["kind"], rec["alpha"])
            study.finish(trial, t.raw, 0.0)
            bar.update()
            continue
        done = {r["tid"]: r for r in study.complete()}
        if len(done) >= len(references):
            return [Trial(tid, kind, a, done[tid]["raw"]) for tid, kind, a in references]
        study.recover()
        time.sleep(0.5)
