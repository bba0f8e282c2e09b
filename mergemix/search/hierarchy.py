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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mergemix.errors import MergemixError
from mergemix.evaluate.differentiable import GradientObjective
from mergemix.recipe import Recipe
from mergemix.search import Raw, SearchResult, Trial, kl_divergence, run_search
from mergemix.search.feasible import TOL, Bounds
from mergemix.search.strategies import as_alpha
from mergemix.search.trials import alpha_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Level:
    """Stage-1 coordinates: a share per unit (group, or a domain of no group); `lift` splits each unit's share
    over its domains by `split` (projected onto their bounds), giving the flat mixture that is merged."""

    name: str
    units: list[str]
    members: list[list[int]]  # indices (recipe order) of each unit's domains
    split: np.ndarray  # per domain: its share of its unit (sums to 1 over each unit)
    flat: Bounds  # per domain
    bounds: Bounds  # per unit: Σ of its domains' lower and upper shares
    prior: np.ndarray  # per unit: Σ of its domains' token prior

    @classmethod
    def build(cls, units: dict[str, list[str]], split: dict[str, float], flat: Bounds, prior: np.ndarray) -> Level:
        """`units`: unit → its domains; `split`: domain → weight within its unit (normalized here; a unit of
        weight 0 is split evenly)."""
        domains = list(flat.domains)
        members = [[domains.index(d) for d in ds] for ds in units.values()]
        within = np.zeros(len(domains))
        for idx in members:
            w = np.array([split[domains[i]] for i in idx], dtype=np.float64)
            within[idx] = w / w.sum() if w.sum() > 0 else 1.0 / len(idx)
        lo = np.array([flat.lo[idx].sum() for idx in members])
        hi = np.array([min(flat.hi[idx].sum(), 1.0) for idx in members])

        def source(idx: list[int], which: tuple[str | None, ...]) -> str | None:
            if flat.pinned[idx].all():
                return "pinned"
            return next((which[i] for i in idx if which[i] and which[i] != "pinned"), None)

        bounds = Bounds(tuple(units), lo, hi, tuple(source(idx, flat.lo_from) for idx in members),
                        tuple(source(idx, flat.hi_from) for idx in members))
        return cls("groups", list(units), members, within, flat, bounds,
                   np.array([prior[idx].sum() for idx in members]))

    def lift(self, points: np.ndarray) -> np.ndarray:
        """Rows of unit shares → rows of domain shares (recipe order)."""
        points = np.atleast_2d(np.asarray(points, dtype=np.float64))
        out = np.zeros((len(points), len(self.flat.domains)))
        for u, idx in enumerate(self.members):
            share = points[:, u]
            out[:, idx] = self.flat.subset(idx).project(share[:, None] * self.split[idx], share)
        return out

    def alpha(self, point: dict[str, float]) -> dict[str, float]:
        """The flat mixture of a point of unit shares (domain → weight, as a trial's α)."""
        return as_alpha(list(self.flat.domains), self.lift(np.array([point[u] for u in self.units]))[0])

    def shares(self, alpha: dict[str, float]) -> dict[str, float]:
        """Each unit's share of a flat mixture."""
        domains = self.flat.domains
        return {u: round(sum(alpha[domains[i]] for i in idx), 6) for u, idx in zip(self.units, self.members,
                                                                                    strict=True)}

    def key(self) -> Any:
        """What the lift depends on (in the name of a stage's shared study)."""
        return [self.units, self.members, np.round(self.split, 6).tolist()]


def level_of(recipe: Recipe, bounds: Bounds, prior: np.ndarray) -> Level | None:
    """Stage 1 of the recipe's hierarchical search, or None when no domains are grouped (a flat search)."""
    domains = recipe.domain_names
    units = recipe.mixture.units(domains)
    if len(units) == len(domains):
        return None
    split = dict(zip(domains, prior.tolist(), strict=True))
    if recipe.mixture.reuse is not None and recipe.mixture.reuse.keep == "ratios":
        split.update(recipe.mixture.reuse.shares(domains))
    return Level.build(units, split, bounds, prior)


def _free(bounds: Bounds) -> int:
    """Coordinates a search of `bounds` has: its unpinned entries less one."""
    return max(len(bounds.free) - 1, 0)


def stage_budgets(total: int, dims: list[int]) -> list[int]:
    """`total` trials split over stages in proportion to their coordinates, at least coordinates + 2 each."""
    return [max(round(total * d / sum(dims)), d + 2) for d in dims]


def run_hierarchical(
    recipe: Recipe,
    evaluate_alpha: Callable[[dict[str, float]], Raw],
    prior: np.ndarray,
    log_path: Path,
    eval_key: str,
    bounds: Bounds | None = None,
    strategy: str | None = None,
    differentiable: GradientObjective | None = None,
) -> SearchResult:
    """`run_search`, top-down when the recipe groups domains (mixture.groups, or mixture.reuse keeping the
    earlier ratios); the result's trials are every stage's (flat α), its star the best feasible of them, its
    ranking theirs merged. `differentiable` serves the gradient strategy, which searches flat shares only."""
    domains = recipe.domain_names
    bounds = bounds or recipe.mixture.bounds(domains)
    level = level_of(recipe, bounds, prior)
    if level is None:
        return run_search(recipe, evaluate_alpha, prior, log_path, eval_key, bounds, strategy,
                          differentiable=differentiable)
    spec = recipe.search
    if (strategy or spec.strategy) == "gradient":
        raise MergemixError("search.strategy gradient searches flat shares: it does not take mixture.groups or "
                            "mixture.reuse with keep: ratios; choose another strategy or drop the grouping")
    groups = {u: idx for u, idx in zip(level.units, level.members, strict=True) if u in recipe.mixture.groups}
    inner = {g: _free(bounds.subset(idx)) for g, idx in groups.items()}
    inner = {g: d for g, d in inner.items() if d > 0}
    dims = [max(_free(level.bounds), 1), *inner.values()]
    total = spec.trials or max(spec.seeds - len(domains) - 2, 2) + spec.verify
    budgets = stage_budgets(total, dims)
    log.info("hierarchical search: %d trials for the groups' shares, then %s", budgets[0],
             ", ".join(f"{b} within {g}" for g, b in zip(inner, budgets[1:], strict=True)) or "nothing within groups")

    def stage(i: int, k: int) -> Recipe:
        """The recipe of stage `i`, whose seed points are counted beyond `k` references."""
        budget = budgets[i]
        timeout = spec.timeout_s * dims[i] / sum(dims) if spec.timeout_s else None
        return recipe.model_copy(update={"search": spec.model_copy(update={
            "trials": budget, "seeds": k + max(budget - spec.verify, 2), "timeout_s": timeout})})

    def score(t: Trial) -> float:
        penalty = spec.kl_weight * float(kl_divergence(t.vector(domains), prior)[0]) if spec.kl_weight else 0.0
        return t.objective - penalty

    results: list[SearchResult] = []
    if _free(level.bounds) > 0:
        results.append(run_search(stage(0, 0), evaluate_alpha, prior, log_path, eval_key, bounds, strategy,
                                  level=level, tag="groups:"))
    elif not inner:  # nothing to search top-down
        return run_search(recipe, evaluate_alpha, prior, log_path, eval_key, bounds, strategy,
                          differentiable=differentiable)
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
        res = run_search(stage(i, len(domains) + 2), evaluate_alpha, prior, log_path, eval_key, fixed, strategy,
                         tag=f"{g}:")
        results.append(res)
        if best is None or score(res.star) > score(best.star):
            best = res
    if best is None:  # every stage was left one point by the bounds: the flat search handles that case
        return run_search(recipe, evaluate_alpha, prior, log_path, eval_key, bounds, strategy,
                          differentiable=differentiable)
    trials: dict[Any, Trial] = {}
    for res in results:
        for t in res.trials:
            trials.setdefault(alpha_key(t.alpha), t)
    log.info("hierarchical search: alpha* %s (groups %s)", best.star.alpha, level.shares(best.star.alpha))
    ranked = {alpha_key(t.alpha): t for res in results for t in res.ranked}
    return SearchResult(results[0].base, list(trials.values()), results[0].objective, best.star,
                        best.surrogate_loo_rmse, best.predicted_star, sorted(ranked.values(), key=lambda t: -score(t)))
