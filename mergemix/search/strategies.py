"""Search strategies behind one ask/tell interface, chosen by name (search.strategy).

Every strategy starts from the same references (base, vertices, uniform, token prior: scored by the driver)
and the same feasible seed points, asks for mixtures inside the feasible set, and is told each scored trial.

- `surface`: the paper's performance surface mapping: the seeds, one surrogate per capability, a dense
  search of the feasible set on the surrogates, the top candidates verified (the default).
- `tpe`, `cmaes`, `gp`: optuna's samplers over the stick-breaking cube (mergemix.search.space), in a shared
  study (mergemix.search.study) that several workers can fill; the seeds are enqueued first.
- `gradient`: Adam on the logits of α through the merged model's differentiable scores; the points along
  the descent are verified (mergemix.search.gradient).
- `grid`: every point of a regular simplex grid (K <= 3), projected into the feasible set: the reference
  optimum the others are measured against.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from mergemix.catalog import STRATEGIES
from mergemix.feasible import Bounds
from mergemix.recipe import EvalSpec, SearchSpec
from mergemix.search.seeds import simplex_candidates
from mergemix.search.space import SimplexMap
from mergemix.search.surrogate import PriorBasis, fit_with_prior, prior_basis
from mergemix.search.trials import Trial, alpha_key, as_alpha, vertices

if TYPE_CHECKING:
    from mergemix.evaluate import Objective
    from mergemix.evaluate.differentiable import GradientObjective

log = logging.getLogger(__name__)

Ask = tuple[str, str, dict[str, float]]  # trial id, kind, α (domain → weight, rounded)


@dataclass
class Context:
    """What every strategy is given: its settings, the objective's benchmarks, the seed, the feasible set,
    the references already scored, the feasible seed points (kind, α) and the penalty α* is scored with."""

    search: SearchSpec
    evaluation: EvalSpec
    seed: int
    bounds: Bounds
    prior: np.ndarray
    objective: Objective
    references: list[Trial]  # vertices, uniform, token prior (not the base)
    seeds: list[tuple[str, np.ndarray]]  # feasible seed points after the references
    penalty: Callable[[np.ndarray], np.ndarray]  # of α rows: kl_weight × KL(α ‖ prior) (KlPull.penalty)
    budget: int  # trials asked at most, seeds included (references not counted)
    storage: str = ""  # RDB URL of the shared study
    study_name: str = ""
    domains: list[str] = field(default_factory=list)
    differentiable: GradientObjective | None = None  # the objective, differentiable in α (strategy gradient)

    def value(self, t: Trial) -> float:
        """What α* maximizes, for a trial in this context's coordinates: its objective less the penalty."""
        return t.objective - float(self.penalty(t.vector(self.domains))[0])


class Strategy:
    """ask() → the next (id, kind, α) to score, or None when done; tell(trial) after it is scored."""

    shared = False  # runs in a shared optuna study (several workers)

    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx
        self.loo: dict[str, float] = {}

    def ask(self) -> Ask | None:
        raise NotImplementedError

    def tell(self, trial: Trial) -> None:
        """Default: nothing to learn."""

    def predict(self, alpha: np.ndarray) -> float | None:
        """The strategy's model of the objective at α (surrogate strategies), else None."""
        return None




class _Queue(Strategy):
    """Asks fixed points in order."""

    def __init__(self, ctx: Context, points: list[Ask]) -> None:
        super().__init__(ctx)
        self.queue = points

    def ask(self) -> Ask | None:
        return self.queue.pop(0) if self.queue else None


def _seed_asks(ctx: Context) -> list[Ask]:
    k = len(ctx.domains)
    return [(f"seed-{i:03d}", kind, as_alpha(ctx.domains, vec)) for i, (kind, vec) in enumerate(ctx.seeds, start=k + 2)]


class Surface(_Queue):
    """Seeds → one surrogate per capability → dense feasible candidates → verify the best few."""

    def __init__(self, ctx: Context) -> None:
        super().__init__(ctx, _seed_asks(ctx))
        self.trials: list[Trial] = list(ctx.references)
        self.fitted = False
        self.predictors: dict[str, Any] = {}

    def tell(self, trial: Trial) -> None:
        self.trials.append(trial)

    def ask(self) -> Ask | None:
        if not self.queue and not self.fitted:
            self.fitted = True
            self.queue = self._verify_points()
        return super().ask()

    def _verify_points(self) -> list[Ask]:
        ctx, spec = self.ctx, self.ctx.search
        groups = list(self.trials[0].capabilities)
        x = np.stack([t.vector(ctx.domains) for t in self.trials])
        for g in groups:
            y = np.array([t.capabilities[g] for t in self.trials])
            # the recipe guarantees >= K + 2 >= 4 points
            self.predictors[g], self.loo[g] = fit_with_prior(spec.surrogate, spec.surrogate_prior, x, y,
                                                             ctx.seed, self._basis(g))
        log.info("surrogate (%s, prior %s) leave-one-out RMSE: %s", spec.surrogate, spec.surrogate_prior,
                 ", ".join(f"{g} {v:.3f}" for g, v in self.loo.items()))
        cand = simplex_candidates(ctx.prior, spec.candidates, spec.concentration, ctx.seed)
        if not ctx.bounds.unconstrained:
            cand = ctx.bounds.project(cand)
        pred = self._predict(cand) - ctx.penalty(cand)
        # The best predicted points, at least 0.05 apart (L1) from each other and from every seed.
        chosen: list[np.ndarray] = []
        for idx in np.argsort(-pred, kind="stable"):
            if len(chosen) >= spec.verify:
                break
            point = cand[idx]
            if all(np.abs(point - c).sum() > 0.05 for c in [*chosen, *x]):
                chosen.append(point)
        return [(f"verify-{j}", "verify", as_alpha(ctx.domains, p)) for j, p in enumerate(chosen)]

    def _basis(self, group: str) -> PriorBasis | None:
        """The no-merge predictors of `group` for search.surrogate_prior; None when it is `none`, or in a stage
        of a hierarchical search (its units are groups of domains, which have no expert of their own)."""
        ctx = self.ctx
        experts = {max(t.alpha, key=t.alpha.__getitem__): t for t in vertices(ctx.references)}
        if ctx.search.surrogate_prior == "none" or not set(ctx.domains) <= set(experts):
            return None
        return prior_basis(group, np.array([experts[d].capabilities[group] for d in ctx.domains]), ctx.prior,
                           [(b.capability, b.domain) for b in ctx.evaluation.benchmarks], ctx.domains)

    def _predict(self, points: np.ndarray) -> np.ndarray:
        groups = list(self.predictors)
        preds = {g: self.predictors[g](points) for g in groups}
        return np.array([self.ctx.objective.combine({g: preds[g][i] for g in groups}) for i in range(len(points))])

    def predict(self, alpha: np.ndarray) -> float | None:
        return float(self._predict(alpha[None])[0]) if self.predictors else None


class Grid(_Queue):
    """The regular grid {i/n} over the unpinned domains with the most points within the budget, projected
    into the feasible set (duplicates dropped). At most 3 unpinned domains: the grid grows as n^(m-1)."""

    def __init__(self, ctx: Context) -> None:
        space = SimplexMap(ctx.bounds)
        m = len(space.free)
        n = 1
        while math.comb(n + 1 + m - 1, m - 1) <= ctx.budget:
            n += 1
        free = np.array(_compositions(n, m), dtype=np.float64) / n * space.mass
        points = np.tile(np.where(ctx.bounds.pinned, ctx.bounds.lo, 0.0), (len(free), 1))
        points[:, space.free] = free
        if not ctx.bounds.unconstrained:
            points = ctx.bounds.project(points)
        unique = list(dict.fromkeys(tuple(np.round(p, 6)) for p in points))
        log.info("grid: step 1/%d, %d feasible points", n, len(unique))
        super().__init__(ctx, [(f"grid-{i:04d}", "grid", as_alpha(ctx.domains, np.array(p)))
                               for i, p in enumerate(unique)])


def _compositions(n: int, k: int) -> list[list[int]]:
    """All k non-negative integers summing to n, in lexicographic order."""
    if k == 1:
        return [[n]]
    return [[i, *rest] for i in range(n, -1, -1) for rest in _compositions(n - i, k - 1)]


class _Optuna(Strategy):
    """An optuna sampler in a shared study; the seed points are enqueued (once) before any sampled trial."""

    shared = True

    def sampler(self, seed: int) -> Any:
        raise NotImplementedError

    def __init__(self, ctx: Context) -> None:
        from mergemix.search.study import Shared

        super().__init__(ctx)
        self.space = SimplexMap(ctx.bounds)
        fixed = [(dict(zip(self.space.names, self.space.to_cube(np.array(list(a.values()))), strict=True)),
                  {"alpha": a, "kind": kind, "tid": tid}) for tid, kind, a in _seed_asks(ctx)]
        self.shared_study = Shared(ctx.storage, ctx.study_name, self.sampler, ctx.seed, fixed)
        self.pending: dict[Any, Any] = {}  # alpha_key → the optuna trial in flight

    def _sample(self, trial: Any) -> dict[str, Any]:
        u = [trial.suggest_float(name, 0.0, 1.0) for name in self.space.names]
        vec = self.space.to_alpha(u)
        return {"alpha": as_alpha(self.ctx.domains, vec), "kind": self.name, "tid": f"{self.name}-{trial.number:04d}"}

    @property
    def name(self) -> str:
        return next(n for n in STRATEGIES if STRATEGIES.get(n) is type(self))

    def ask(self) -> Ask | None:
        if self.shared_study.count() >= self.ctx.budget:
            return None
        item = self.shared_study.pop(self._sample if self.space.names else None)
        if item is None:
            return None
        trial, rec = item
        alpha = {d: rec["alpha"][d] for d in self.ctx.domains}
        self.pending[alpha_key(alpha)] = trial
        return rec["tid"], rec["kind"], alpha

    def tell(self, trial: Trial) -> None:
        value = self.ctx.value(trial)
        self.shared_study.finish(self.pending.pop(alpha_key(trial.alpha)), trial.raw, value)

    def history(self) -> list[dict[str, Any]]:
        """Every finished trial of the study, from all workers."""
        return self.shared_study.complete()


class TPE(_Optuna):
    def sampler(self, seed: int) -> Any:
        import optuna

        # constant_liar: a point another worker is scoring counts as scored badly, so workers spread out
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=0, multivariate=True, constant_liar=True)


class CMAES(_Optuna):
    def sampler(self, seed: int) -> Any:
        import optuna

        return optuna.samplers.CmaEsSampler(seed=seed, n_startup_trials=0)


class GP(_Optuna):
    def sampler(self, seed: int) -> Any:
        import optuna

        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=0)

