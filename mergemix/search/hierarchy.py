"""Top-down search over grouped domains (paper §3.5), and the reuse of an earlier proposal's ratios.

Domains are grouped (mixture.groups); a domain in no group is a group of its own. Stage 1 searches the shares
of the groups, each group's share split over its domains in token proportion (the domains' bounds kept by
projecting the split onto them). Stage 2 then searches each group of two or more domains in turn, every domain
outside it pinned where the best mixture so far has it: the group's total is fixed, a bound like any other
(`Bounds.fix`), so the stage is an ordinary search of the feasible set. Every point of either stage is a real
merge of all the domains' experts at the flat mixture, logged in trials.jsonl; α* is the best feasible scored
point over all stages.

mixture.reuse with keep: ratios adds one group, `reused`, split by the earlier proposal's ratios instead of the
token prior; stage 2 leaves it alone, so only its total moves against the other domains.

Budget: search.trials (default: seeds − K − 2 + verify, a flat search's) is split over the stages in proportion
to the coordinates each one searches (groups − 1, then domains − 1 per group; pinned ones not counted), at
least coordinates + 2 per stage; search.timeout_s likewise. Each stage spends its share on its own seed points
(vertices, uniform, prior, draws) and then its strategy's; the references (base, each expert alone, uniform,
token prior) are scored once and reused by every stage.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from mergemix.errors import MergemixError
from mergemix.evaluate.differentiable import GradientObjective
from mergemix.feasible import TOL, Bounds
from mergemix.recipe import MixtureSpec
from mergemix.search.driver import Problem, search_stage
from mergemix.search.levels import level_of
from mergemix.search.trials import Raw, SearchResult, Trial, alpha_key

log = logging.getLogger(__name__)


def _free(bounds: Bounds) -> int:
    """Coordinates a search of `bounds` has: its unpinned entries less one."""
    return max(len(bounds.free) - 1, 0)


def stage_budgets(total: int, dims: list[int]) -> list[int]:
    """`total` trials split over stages in proportion to their coordinates, at least coordinates + 2 each."""
    return [max(round(total * d / sum(dims)), d + 2) for d in dims]


def search_mixtures(
    problem: Problem,
    mixture: MixtureSpec,
    evaluate_alpha: Callable[[dict[str, float]], Raw],
    log_path: Path,
    eval_key: str,
    strategy: str,
    differentiable: GradientObjective | None = None,
    on_trial: Callable[[Trial], None] | None = None,
) -> SearchResult:
    """Search the problem's mixtures with `strategy`: one `search_stage`, or top-down stages where `mixture`
    groups domains (mixture.groups, or mixture.reuse keeping the earlier ratios); the result's trials are
    every stage's (flat α), its star the best feasible of them, its ranking theirs merged. `differentiable`
    serves the gradient strategy, which searches flat shares only; `on_trial` sees every finished trial."""
    domains, bounds, prior, pull = problem.domains, problem.bounds, problem.prior, problem.pull
    level = level_of(mixture, domains, bounds, prior)
    if level is None:
        return search_stage(problem, evaluate_alpha, log_path, eval_key, strategy, differentiable=differentiable,
                            on_trial=on_trial)
    spec = problem.search
    if strategy == "gradient":
        raise MergemixError("search.strategy gradient searches flat shares: it does not take mixture.groups or "
                            "mixture.reuse with keep: ratios; choose another strategy or drop the grouping")
    groups = {u: idx for u, idx in zip(level.units, level.members, strict=True) if u in mixture.groups}
    inner = {g: _free(bounds.subset(idx)) for g, idx in groups.items()}
    inner = {g: d for g, d in inner.items() if d > 0}
    dims = [max(_free(level.bounds), 1), *inner.values()]
    total = spec.trials or max(spec.seeds - len(domains) - 2, 2) + spec.verify
    budgets = stage_budgets(total, dims)
    log.info("hierarchical search: %d trials for the groups' shares, then %s", budgets[0],
             ", ".join(f"{b} within {g}" for g, b in zip(inner, budgets[1:], strict=True)) or "nothing within groups")

    def stage(i: int, k: int, stage_bounds: Bounds) -> Problem:
        """The problem of stage `i` within `stage_bounds`, whose seed points are counted beyond `k` references."""
        budget = budgets[i]
        timeout = spec.timeout_s * dims[i] / sum(dims) if spec.timeout_s else None
        return replace(problem, bounds=stage_bounds, search=spec.model_copy(update={
            "trials": budget, "seeds": k + max(budget - spec.verify, 2), "timeout_s": timeout}))

    def score(t: Trial) -> float:
        return pull.score(t, domains)

    results: list[SearchResult] = []
    if _free(level.bounds) > 0:
        results.append(search_stage(stage(0, 0, bounds), evaluate_alpha, log_path, eval_key, strategy,
                                    level=level, tag="groups:", on_trial=on_trial))
    elif not inner:  # nothing to search top-down
        return search_stage(problem, evaluate_alpha, log_path, eval_key, strategy, differentiable=differentiable,
                            on_trial=on_trial)
    # stage 1 has nothing to search when all groups but one are pinned: stage 2 starts from that point
    start = level.alpha(dict(zip(level.units, level.bounds.project(level.prior)[0].tolist(), strict=True)))
    best = results[0] if results else None
    for i, g in enumerate(inner, start=1):
        current = best.star.alpha if best else start
        others = {d: current[d] for j, d in enumerate(domains) if j not in groups[g]}
        fixed = bounds.fix(others)
        free = [j for j in groups[g] if not fixed.pinned[j]]
        mass = 1.0 - fixed.lo[[j for j in range(len(domains)) if j not in free]].sum()
        if not fixed.lo[free].sum() + TOL < mass < fixed.hi[free].sum() - TOL:
            log.info("hierarchical search: group %s's share %.4g leaves its domains one mixture (their bounds); "
                     "nothing to search within it", g, sum(current[domains[j]] for j in groups[g]))
            continue
        res = search_stage(stage(i, len(domains) + 2, fixed), evaluate_alpha, log_path, eval_key, strategy,
                           tag=f"{g}:", on_trial=on_trial)
        results.append(res)
        if best is None or score(res.star) > score(best.star):
            best = res
    if best is None:  # every stage was left one point by the bounds: the flat search handles that case
        return search_stage(problem, evaluate_alpha, log_path, eval_key, strategy, differentiable=differentiable,
                            on_trial=on_trial)
    trials: dict[Any, Trial] = {}
    for res in results:
        for t in res.trials:
            trials.setdefault(alpha_key(t.alpha), t)
    log.info("hierarchical search: alpha* %s (groups %s)", best.star.alpha, level.shares(best.star.alpha))
    ranked = {alpha_key(t.alpha): t for res in results for t in res.ranked}
    return SearchResult(results[0].base, list(trials.values()), results[0].objective, best.star,
                        best.surrogate_loo_rmse, best.predicted_star, sorted(ranked.values(), key=lambda t: -score(t)))
