"""`mergemix experts`: train (or reuse) experts and stop, one job per expert if you like."""

from __future__ import annotations

from collections.abc import Sequence

from mergemix.errors import MergemixError
from mergemix.pipelines.propose import expert_stage
from mergemix.recipe import Recipe
from mergemix.run.experts import Expert
from mergemix.run.workspace import open_workspace


def train_experts_only(recipe: Recipe, domains: Sequence[str] | None = None) -> list[Expert]:
    """Train (or reuse) the experts of `domains` (default: all) and stop: one job per expert on its own GPU,
    node or scheduler slot; a later `propose` reuses every finished one."""
    unknown = [d for d in domains or [] if d not in recipe.domain_names]
    if unknown:
        raise MergemixError(f"--domain: no domain {unknown[0]!r} in the recipe (domains: "
                            f"{', '.join(recipe.domain_names)})")
    ws = open_workspace(recipe, distributed=True)
    return expert_stage(ws, train=True, domains=domains)
