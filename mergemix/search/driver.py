"""The search driver: references → a strategy's ask/tell loop (mergemix.search.strategies) → α*.

The base, the vertices, uniform and the token prior are scored first (they fix the normalization and are the
baselines); then the strategy asks for feasible mixtures until it is done or the budget (search.trials,
search.timeout_s) is spent. Every evaluated α goes to `trials.jsonl` as soon as it is scored; a rerun with
the same experts and benchmarks takes finished trials from the log (or the shared study) instead of
evaluating them again.

A hierarchical search (mergemix.search.hierarchy) runs this driver once per stage: with a `Level` the strategy
moves in the shares of groups, and each point it asks for is lifted to the flat mixture that is merged, scored
and logged.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mergemix.artifacts import stable_hash
from mergemix.catalog import STRATEGIES
from mergemix.errors import MergemixError
from mergemix.evaluate import Objective
from mergemix.evaluate.differentiable import GradientObjective
from mergemix.feasible import Bounds
from mergemix.progress import progress
from mergemix.recipe import EvalSpec, SearchSpec
from mergemix.search.seeds import seed_points
from mergemix.search.strategies import Context
from mergemix.search.trials import KlPull, Raw, SearchResult, Trial, TrialLog, alpha_key, as_alpha

if TYPE_CHECKING:
    from mergemix.search.levels import Level

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """What a search needs to know of its run: the domains and their token prior, the feasible set, the
    benchmarks' objective, the search's own settings and seed, and the run's name (shared studies' names)."""

    name: str
    domains: list[str]
    prior: np.ndarray
    bounds: Bounds
    evaluation: EvalSpec
    search: SearchSpec
    seed: int

    @property
    def pull(self) -> KlPull:
        return KlPull(self.search.kl_weight, self.prior)


def study_name(problem: Problem, strategy: str, eval_key: str, bounds: Bounds, level: Level | None = None) -> str:
    """The shared study of one search: same experts, benchmarks, objective, bounds, seed and strategy (a
    larger search.trials or timeout_s continues the same study), and the same stage of a hierarchical one."""
    # the gradient strategy's own fields (search.gradient_*) are no part of an optuna study
    own = {f for f in SearchSpec.model_fields if f.startswith("gradient_")}
    key = stable_hash([eval_key, problem.evaluation.model_dump(mode="json", exclude={"batch_size", "precision"}),
                       problem.search.model_dump(mode="json", exclude={"storage", "timeout_s", "strategy", "trials",
                                                                       "surrogate_prior", "verify_real", "launch",
                                                                       "repetition", "repetition_r_star", *own}),
                       bounds.lo.tolist(), bounds.hi.tolist(), problem.seed, *([level.key()] if level else [])])
    return f"{problem.name}-{strategy}-{key[:12]}" + (f"-{level.name}" if level else "")


def search_stage(
    problem: Problem,
    evaluate_alpha: Callable[[dict[str, float]], Raw],
    log_path: Path,
    eval_key: str,
    strategy: str,
    *,
    differentiable: GradientObjective | None = None,
    level: Level | None = None,
    tag: str = "",
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """Search the problem's feasible set with `strategy` (a registered name) for the α maximizing the objective
    minus search.kl_weight × KL(α ‖ token prior). `evaluate_alpha` merges and scores one α (all zeros:
    the base itself). The references are always scored but α* is chosen among feasible points only.
    `differentiable` estimates the objective differentiably in α on the merged model (strategy gradient
    only; flat searches only, not a `level`).

    With `level` the strategy searches the level's units (groups) from the level's own seed points (its
    vertices, uniform, prior and draws: search.seeds of them, all in its budget) and every point is its lift;
    `tag` prefixes the ids and kinds of the strategy's trials (the stage that asked for them). `on_trial` is
    called with every trial as it is finished (scored, or read from the log): a pipeline's progress.
    """
    spec, domains, bounds, prior, pull = problem.search, problem.domains, problem.bounds, problem.prior, problem.pull
    k = len(domains)
    units = level.units if level else domains
    name = strategy
    if name == "auto":
        raise MergemixError("search.strategy auto is chosen where the model is known (mergemix.pipelines.propose."
                            "choose_strategy: propose, search); pass search_stage a strategy by name")
    cls = STRATEGIES.get(name)
    trial_log = TrialLog(log_path, eval_key)
    # Derived scores depend on the objective's definition too: a trial scored under another one is re-used
    # (no merge, no evaluation) and logged again with its scores recomputed.
    # how scores are computed (batch size, precision: in eval_key when it changes them) is no part of the objective
    objective_key = stable_hash([problem.evaluation.model_dump(mode="json", exclude={"batch_size", "precision"}),
                                 Objective.VERSION])

    def unit_penalty(points: np.ndarray) -> np.ndarray:
        """The penalty of points in the strategy's coordinates (a level's: of their lift)."""
        return pull.penalty(level.lift(points) if level else points)

    def flat(point: dict[str, float]) -> dict[str, float]:
        return level.alpha(point) if level else point

    def view(t: Trial) -> Trial:
        """A trial as the strategy sees it: α in its own coordinates."""
        return replace(t, alpha=t.point, point=None) if level and t.point is not None else t

    def score(t: Trial) -> float:
        return pull.score(t, domains)

    def run(tid: str, kind: str, alpha: dict[str, float], point: dict[str, float] | None = None) -> Trial:
        rec = trial_log.get(alpha)
        if rec is not None:
            return Trial(tid, kind, alpha, rec["raw"], predicted=rec.get("predicted"), point=point)
        return Trial(tid, kind, alpha, evaluate_alpha(alpha), point=point)

    def finish(trial: Trial, objective: Objective) -> Trial:
        trial.normalized, trial.capabilities, trial.objective = objective(trial.raw)
        logged = trial_log.get(trial.alpha)
        if logged is None or logged.get("objective_key") != objective_key:
            trial_log.add({**trial.record(), "objective_key": objective_key})
        if on_trial is not None:
            on_trial(trial)
        return trial

    seeds = seed_points(prior, k + 2 if level else spec.seeds, spec.concentration, problem.seed)
    references = [("base", "base", {d: 0.0 for d in domains})]
    references += [(f"seed-{i:03d}", kind, as_alpha(domains, vec)) for i, (kind, vec) in enumerate(seeds[: k + 2])]
    rest = seeds[k + 2:]
    if level is not None:
        rest = seed_points(level.prior, spec.seeds, spec.concentration, problem.seed)
        if not level.bounds.unconstrained:
            rest = [(kind, level.bounds.project(vec)[0]) for kind, vec in rest]
    elif not bounds.unconstrained:
        # The references stay (normalization, baselines); every other seed is moved into the feasible set,
        # led by the feasible points nearest uniform and the token prior.
        extra = [("uniform_feasible", np.full(k, 1.0 / k)), ("token_prior_feasible", prior)]
        rest = [(kind, bounds.project(vec)[0]) for kind, vec in extra + rest][: max(spec.seeds - k - 2, 2)]
    budget = spec.trials or len(rest) + spec.verify
    storage = ""
    if cls.shared:
        from mergemix.search.study import storage_url

        storage = storage_url(spec.storage, log_path.parent)
    study = study_name(problem, name, eval_key, level.bounds if level else bounds, level)
    bar = progress(total=len(references) + budget, desc=f"merge + evaluate ({tag}{name})", leave=False)
    # The base and the vertices come first: they fix the normalization of every other score.
    if cls.shared:
        scored = _shared_references(storage, study, references, run, bar)
    else:
        scored = []
        for ref in references:
            scored.append(run(*ref))
            bar.update()
    base, refs = scored[0], scored[1:]
    objective = Objective.from_references(problem.evaluation, base.raw, [t.raw for t in refs[:k]])
    finish(base, objective)
    trials = [finish(t, objective) for t in refs]

    ctx = Context(spec, problem.evaluation, problem.seed, level.bounds if level else bounds, level.prior if level else prior, objective,
                  [] if level else list(trials), rest, unit_penalty, budget, storage, study, units,
                  None if level else differentiable)
    strat = cls(ctx)
    listed = {alpha_key(t.alpha): t for t in trials}
    # What the strategy was told of: a level's strategy starts from nothing (the references are not points of
    # its coordinates), so one of its points that lands on a reference is told too, scored from the log.
    seen = set() if level else set(listed)
    deadline = time.monotonic() + spec.timeout_s if spec.timeout_s else math.inf
    while time.monotonic() < deadline and (ask := strat.ask()) is not None:
        tid, kind, point = ask
        alpha = flat(point)
        if not cls.shared and alpha_key(alpha) in seen:  # a projection that landed on a point already scored
            continue
        t = run(tag + tid, tag + kind, alpha, point if level else None)
        predicted = strat.predict(np.array([point[u] for u in units]))
        if predicted is not None:
            t.predicted = predicted
        t.normalized, t.capabilities, t.objective = objective(t.raw)
        strat.tell(view(t))  # the shared study first: a kill between the two leaves the trial where workers see it
        t = finish(t, objective)
        if alpha_key(alpha) not in listed:
            trials.append(t)
            listed[alpha_key(alpha)] = t
        elif level and listed[alpha_key(alpha)].point is None:  # a reference that is also a point of the level
            listed[alpha_key(alpha)].point = point
        seen.add(alpha_key(alpha))
        bar.update()
        bar.set_postfix(best=f"{max(score(t) for t in trials):.3f}")
    if cls.shared:  # the union of every worker's trials
        own = {alpha_key(t.alpha): t for t in trials}
        union = {alpha_key(t.alpha): t for t in refs}
        for r in strat.history():
            alpha = flat(r["alpha"])
            t = union.setdefault(alpha_key(alpha), own.get(alpha_key(alpha)) or finish(
                Trial(tag + r["tid"], tag + r["kind"], alpha, r["raw"], point=r["alpha"] if level else None), objective))
            if level and t.point is None:  # a reference that is also a point of the level
                t.point = r["alpha"]
        trials = list(union.values())
    bar.close()

    # A level's α* is one of its own points (a reference off the level, e.g. uniform over all domains, would
    # break the split the level holds: the earlier ratios of mixture.reuse).
    ranked = sorted((t for t in trials if bounds.contains(t.vector(domains)) and (level is None or t.point)),
                    key=lambda t: -score(t))
    if not ranked:
        raise MergemixError("search: no feasible trial finished within search.timeout_s; raise it")
    if spec.final == "best":
        star = ranked[0]
    else:
        top = [t.point if level else t.alpha for t in ranked[: spec.top_k]]
        point = as_alpha(units, np.mean([[c[u] for u in units] for c in top if c], axis=0))
        alpha = flat(point)
        existing = next((t for t in trials if t.alpha == alpha), None)
        star = existing or finish(run(f"{tag}top-k-mean", f"{tag}top_k_mean", alpha, point if level else None),
                                  objective)
        if existing is None:
            trials.append(star)
    coords = star.point if level else star.alpha
    predicted = strat.predict(np.array([coords[u] for u in units])) if coords is not None else None
    return SearchResult(base, trials, objective, star, strat.loo, predicted, ranked)


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
