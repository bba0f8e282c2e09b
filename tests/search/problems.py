"""A search problem from a recipe, for tests that drive the search without a workspace (a run's own comes from
mergemix.pipelines.propose.search_problem)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from mergemix.feasible import Bounds
from mergemix.recipe import Recipe
from mergemix.search.driver import Problem


def problem(recipe: Recipe, prior: Sequence[float] | np.ndarray, bounds: Bounds | None = None) -> Problem:
    names = recipe.domain_names
    return Problem(recipe.name, names, np.asarray(prior, dtype=float), bounds or recipe.mixture.bounds(names),
                   recipe.evaluation, recipe.search, recipe.seed)


def strategy(recipe: Recipe) -> str:
    """The recipe's strategy, surface for `auto` (which the pipeline chooses, knowing the model)."""
    return recipe.search.strategy if recipe.search.strategy != "auto" else "surface"
