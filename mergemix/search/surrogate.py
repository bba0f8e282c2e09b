"""Surrogates: one regressor per capability group, mapping α (on the simplex) to its normalized score.

`lightgbm` is the paper's choice. `quadratic` (Scheffé mixture model: α_i and α_i·α_j terms, ridge) is
smooth and needs fewer points. Each reports its leave-one-out error so a user knows when to trust it.

A surrogate may also start from what is known before any merge (`search.surrogate_prior`, `fit_with_prior`):
the linear interpolation of the experts' own scores Σ_d α_d·score(expert_d), a log prior
Σ_d w_d log(α_d + 0.01) and the closeness to the token-proportional mixture −KL(prior ‖ α). `residual` fits
the surrogate to what the interpolation leaves and keeps the fit only where its leave-one-out error beats the
interpolation alone, so the search's model is never worse (out of sample) than that predictor; `feature` gives
the three predictors to the surrogate as inputs beside α.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mergemix.catalog import SURROGATES

log = logging.getLogger(__name__)

Predictor = Callable[[np.ndarray], np.ndarray]
Fitter = Callable[[np.ndarray, np.ndarray, int], Predictor]


def fit_lightgbm(x: np.ndarray, y: np.ndarray, seed: int) -> Predictor:
    import lightgbm as lgb

    params = {
        "objective": "regression",
        "learning_rate": 0.05,
        "num_leaves": 7,
        "min_data_in_leaf": 3,  # ~40 seed points: the default of 20 would fit a constant
        "min_data_in_bin": 1,
        "bagging_fraction": 0.9,
        "bagging_freq": 1,
        "lambda_l2": 1.0,
        "seed": seed,
        "deterministic": True,
        "force_row_wise": True,
        "num_threads": 1,
        "verbose": -1,
    }
    model = lgb.train(params, lgb.Dataset(x, y, params={"verbose": -1}), num_boost_round=200)
    return lambda q: np.asarray(model.predict(q), dtype=np.float64)


def _scheffe(x: np.ndarray) -> np.ndarray:
    k = x.shape[1]
    pairs = [x[:, i] * x[:, j] for i in range(k) for j in range(i + 1, k)]
    return np.column_stack([x, *pairs]) if pairs else x


def fit_quadratic(x: np.ndarray, y: np.ndarray, seed: int) -> Predictor:
    f = _scheffe(x)
    ridge = 1e-3 * np.eye(f.shape[1])
    coef = np.linalg.solve(f.T @ f + ridge, f.T @ y)
    return lambda q: _scheffe(q) @ coef


def loo_rmse(fit: Fitter, x: np.ndarray, y: np.ndarray, seed: int) -> float:
    """Leave-one-out root-mean-square error of the surrogate on the evaluated points."""
    errors = []
    for i in range(len(x)):
        keep = np.arange(len(x)) != i
        errors.append(fit(x[keep], y[keep], seed)(x[i : i + 1])[0] - y[i])
    return float(np.sqrt(np.mean(np.square(errors))))


PRIOR_EPS = 0.01  # the log prior's floor (also the report's no-model log prior)


@dataclass(frozen=True)
class PriorBasis:
    """What one capability group's surrogate may know before any merge: each expert's own score in the
    group (the vertex merges, domain order), the token-proportional mixture and the log prior's domain
    weights."""

    experts: np.ndarray  # (K,) the group's score of each expert
    token_prior: np.ndarray  # (K,)
    log_weights: np.ndarray  # (K,)

    def interpolation(self, x: np.ndarray) -> np.ndarray:
        return np.atleast_2d(x) @ self.experts

    def features(self, x: np.ndarray) -> np.ndarray:
        """α beside the interpolation, the log prior and −KL(token prior ‖ α)."""
        x = np.atleast_2d(x)
        log_prior = np.log(x + PRIOR_EPS) @ self.log_weights
        closeness = -(self.token_prior * np.log(self.token_prior / (x + 1e-12))).sum(axis=1)
        return np.column_stack([x, self.interpolation(x), log_prior, closeness])


def prior_basis(group: str, experts: np.ndarray, token_prior: np.ndarray,
                benchmarks: Sequence[tuple[str, str | None]], domains: Sequence[str]) -> PriorBasis:
    """The no-merge predictors of capability `group`: `experts` are its scores of each expert (domain
    order); the log prior weighs each domain by the group's benchmarks (capability, domain) that score that
    domain's held-out text, uniformly where none does."""
    weights = np.array([sum(cap == group and dom == d for cap, dom in benchmarks) for d in domains], dtype=np.float64)
    return PriorBasis(np.asarray(experts, dtype=np.float64), np.asarray(token_prior, dtype=np.float64),
                      weights if weights.sum() > 0 else np.ones(len(domains)))


def fit_with_prior(name: str, prior: str, x: np.ndarray, y: np.ndarray, seed: int,
                   basis: PriorBasis | None) -> tuple[Predictor, float]:
    """The surrogate `name` fitted on (x, y) with the prior lever `prior` (none | residual | feature; none
    when there is no `basis`), and its leave-one-out RMSE."""
    fit = SURROGATES.get(name)
    if basis is None:
        prior = "none"
    if prior == "feature":
        def fit_features(xs: np.ndarray, ys: np.ndarray, s: int) -> Predictor:
            model = fit(basis.features(xs), ys, s)
            return lambda q: model(basis.features(q))

        return fit_features(x, y, seed), loo_rmse(fit_features, x, y, seed)
    if prior == "residual":
        assert basis is not None
        residual = y - basis.interpolation(x)
        alone = float(np.sqrt(np.mean(np.square(residual))))  # the interpolation fits nothing: no LOO needed
        loo = loo_rmse(fit, x, residual, seed)
        if loo >= alone:
            log.info("surrogate: the residual fit (LOO RMSE %.4f) does not beat the interpolation alone (%.4f); "
                     "using the interpolation", loo, alone)
            return basis.interpolation, alone
        model = fit(x, residual, seed)
        return (lambda q: basis.interpolation(q) + model(q)), loo
    return fit(x, y, seed), loo_rmse(fit, x, y, seed)
