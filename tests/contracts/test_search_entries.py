"""Every registered surrogate and search strategy (mergemix.catalog) keeps the search's contract.

Surrogates: finite predictions, one per query point, the same for the same seed. Strategies: every mixture a
strategy asks for lies in the feasible set (only the references — base, vertices, uniform, token prior — may
lie outside it), α* is feasible, and the same seed asks for the same mixtures in the same order. The scores
come from a known formula (tests/search/test_driver.py), so what is tested is the strategy, not a model."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from mergemix.catalog import STRATEGIES, SURROGATES
from mergemix.recipe import load_recipe
from mergemix.search.driver import search_stage
from tests.search.problems import problem
from tests.search.test_driver import _analytic

REFERENCES = {"base", "vertex", "uniform", "token_prior"}
PRIOR = [0.2, 0.5, 0.3]


@pytest.mark.parametrize("name", list(SURROGATES))
def test_a_surrogate_predicts_every_point_the_same_for_the_same_seed(name: str) -> None:
    rng = np.random.default_rng(0)
    x = rng.dirichlet(np.ones(3), size=24)
    y = x[:, 0] - 2 * (x[:, 1] - 0.3) ** 2
    q = rng.dirichlet(np.ones(3), size=50)
    fit = SURROGATES.get(name)
    first, again = fit(x, y, 7)(q), fit(x, y, 7)(q)
    assert first.shape == (50,) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, again)


class Formula:
    """The known surface of `_analytic` as the gradient strategy's differentiable objective: what a merged
    model's `GradientObjective` gives it (prepare, the model it runs, the estimate at α)."""

    model = torch.nn.Linear(1, 1)

    def prepare(self, objective: Any) -> dict[str, float]:
        return {}

    def __call__(self, alpha: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
        math, _, code = alpha
        return code - 1.5 * (code - 0.5) ** 2 + math - 1.5 * (math - 0.3) ** 2


def _search(strategy: str, recipe_file: Path, log: Path) -> Any:
    recipe = load_recipe(recipe_file, ["mixture.max_share={math: 0.35}", "mixture.min_share={code: 0.1}",
                                       "search.trials=12", "search.candidates=2000", "search.gradient_steps=8",
                                       f"search.storage=sqlite:///{log.with_suffix('.db')}"])
    return search_stage(problem(recipe, PRIOR), _analytic, log, "k", strategy, differentiable=Formula())


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_a_strategy_asks_only_feasible_mixtures_and_repeats_itself(strategy: str, micro_recipe_file: Path,
                                                                   tmp_path: Path) -> None:
    first = _search(strategy, micro_recipe_file, tmp_path / "first.jsonl")
    again = _search(strategy, micro_recipe_file, tmp_path / "again.jsonl")
    recipe = load_recipe(micro_recipe_file, ["mixture.max_share={math: 0.35}", "mixture.min_share={code: 0.1}"])
    bounds = recipe.mixture.bounds(recipe.domain_names)
    asked = [t for t in first.trials if t.kind not in REFERENCES]
    assert asked, "the strategy asked for nothing"
    outside = [t.alpha for t in asked if not bounds.contains(t.vector(recipe.domain_names))]
    assert outside == []
    assert bounds.contains(first.star.vector(recipe.domain_names))
    assert [t.alpha for t in first.trials] == [t.alpha for t in again.trials]
