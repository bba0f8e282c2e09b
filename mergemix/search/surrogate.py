"""Surrogates: one regressor per capability group, mapping α (on the simplex) to its normalized score.

`lightgbm` is the paper's choice. `quadratic` (Scheffé mixture model: α_i and α_i·α_j terms, ridge) is
smooth and needs fewer points. Each reports its leave-one-out error so a user knows when to trust it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from mergemix.registry import Registry

log = logging.getLogger(__name__)

Predictor = Callable[[np.ndarray], np.ndarray]
Fitter = Callable[[np.ndarray, np.ndarray, int], Predictor]
SURROGATES: Registry[Fitter] = Registry("surrogate")


@SURROGATES.register("lightgbm")
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


@SURROGATES.register("quadratic")
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
