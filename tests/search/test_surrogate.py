"""The surrogate's prior lever (search.surrogate_prior): never worse than the interpolation it starts from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mergemix import load_recipe
from mergemix.report.metrics import spearman
from mergemix.search.driver import search_stage
from mergemix.search.surrogate import PriorBasis, fit_with_prior
from tests.search.problems import problem, strategy
from tests.search.test_driver import _analytic

K = 4
EXPERTS = np.array([0.9, 0.2, 0.6, -0.3])  # each expert's own score: the interpolation Σ α_d·score_d


def _design(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Training points as the search has them (vertices, uniform, Dirichlet draws) and held-out candidates."""
    x = np.vstack([np.eye(K), np.full((1, K), 1 / K), rng.dirichlet(np.ones(K) * 2, size=35)])
    return x, rng.dirichlet(np.ones(K), size=2000)


def _basis() -> PriorBasis:
    return PriorBasis(EXPERTS, np.full(K, 1 / K), np.ones(K))


@pytest.mark.parametrize("draw", range(3))
def test_residual_ranks_a_prior_plus_noise_surface_as_well_as_the_prior(draw: int) -> None:
    rng = np.random.default_rng(draw)
    x, q = _design(rng)
    y = x @ EXPERTS + rng.normal(0, 0.05, len(x))  # the objective is the prior plus noise
    truth = q @ EXPERTS
    residual, loo = fit_with_prior("lightgbm", "residual", x, y, 0, _basis())
    plain, plain_loo = fit_with_prior("lightgbm", "none", x, y, 0, _basis())
    rho_prior = spearman(_basis().interpolation(q), truth)
    rho_residual, rho_plain = spearman(residual(q), truth), spearman(plain(q), truth)
    assert rho_residual >= rho_prior - 1e-9, (rho_residual, rho_prior)
    assert rho_residual > rho_plain and loo < plain_loo
    # the search's argmax on the residual surrogate is the prior's (a vertex here)
    assert np.argmax(residual(q)) == np.argmax(truth)


def test_residual_learns_what_the_prior_misses() -> None:
    rng = np.random.default_rng(5)
    x, q = _design(rng)

    def surface(a: np.ndarray) -> np.ndarray:  # an interior optimum that a linear prior cannot have
        return a @ EXPERTS - 3.0 * np.sum((a - np.array([0.5, 0.1, 0.3, 0.1])) ** 2, axis=1)

    y = surface(x) + rng.normal(0, 0.02, len(x))
    residual, _ = fit_with_prior("lightgbm", "residual", x, y, 0, _basis())
    feature, _ = fit_with_prior("lightgbm", "feature", x, y, 0, _basis())
    truth = surface(q)
    rho_prior = spearman(_basis().interpolation(q), truth)
    assert spearman(residual(q), truth) > rho_prior + 0.05
    assert spearman(feature(q), truth) > rho_prior


@pytest.mark.parametrize("prior", ["residual", "feature"])
def test_the_surface_search_with_a_prior_nears_the_optimum(prior: str, micro_recipe_file: Path,
                                                           tmp_path: Path) -> None:
    recipe = load_recipe(micro_recipe_file, [f"search.surrogate_prior={prior}", "search.candidates=2000"])
    res = search_stage(problem(recipe, [0.2, 0.5, 0.3]), _analytic, tmp_path / "trials.jsonl", "k", strategy(recipe))
    grid = [{"math": m, "prose": 1 - m - c, "code": c} for m in np.linspace(0, 1, 41) for c in np.linspace(0, 1, 41)
            if m + c <= 1 + 1e-9]
    best = max(res.objective(_analytic(g))[2] for g in grid)
    assert res.star.objective > best - 0.1
    assert set(res.surrogate_loo_rmse) == {"coding", "math"}
    verified = [t for t in res.trials if t.kind == "verify"]
    assert verified and all(t.predicted is not None for t in verified)
