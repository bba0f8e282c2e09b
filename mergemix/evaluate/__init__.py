"""Evaluation: benchmark kinds (registry), the evaluator that scores a model on all of a recipe's
benchmarks, and the objective built from them."""

from __future__ import annotations

from pathlib import Path

import torch

from mergemix.errors import MergemixError
from mergemix.evaluate.kinds import BENCHMARKS, Benchmark, EvalContext
from mergemix.evaluate.objective import Objective
from mergemix.recipe import Recipe

__all__ = ["BENCHMARKS", "Benchmark", "EvalContext", "Evaluator", "Objective"]


class Evaluator:
    """All benchmarks of a recipe, loaded and tokenized once, scoring any model on demand."""

    def __init__(self, recipe: Recipe, tokenizer: object, heldout: dict[str, torch.Tensor], cache_dir: Path):
        ctx = EvalContext(tokenizer, recipe.data.seq_len, heldout, cache_dir, recipe.evaluation.batch_size, recipe.seed)
        self.benchmarks: dict[str, Benchmark] = {}
        for spec in recipe.evaluation.benchmarks:
            try:
                self.benchmarks[spec.name] = BENCHMARKS.get(spec.kind)(spec, ctx)
            except MergemixError as e:
                raise MergemixError(f"evaluation.benchmarks {spec.name!r}: {e}") from None

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module) -> dict[str, dict[str, float]]:
        """benchmark → metric → value (plus `<metric>_se` standard errors) for `model` as it is now."""
        model.eval()
        return {name: bench.score(model) for name, bench in self.benchmarks.items()}
