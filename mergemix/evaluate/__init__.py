"""Evaluation: benchmark kinds (mergemix.catalog names them), the evaluator that scores a model on all of a
recipe's benchmarks, and the objective built from them."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from mergemix.catalog import BENCHMARK_KINDS
from mergemix.collective import Share
from mergemix.data.readers import resolve_paths
from mergemix.errors import MergemixError
from mergemix.evaluate.kinds import Benchmark, EvalContext, Items
from mergemix.evaluate.objective import Objective
from mergemix.recipe import BenchmarkSpec, looks_like_test_split

__all__ = ["Benchmark", "EvalContext", "Evaluator", "Items", "Objective", "read_benchmarks"]


def read_benchmarks(benchmarks: list[BenchmarkSpec], cache_dir: Path) -> dict[str, Any]:
    """Every benchmark's data, read and checked (run this before training: bad files fail fast)."""
    data = {}
    for spec in benchmarks:
        try:
            if spec.path and not spec.allow_test_split:
                _refuse_test_files(spec.path, cache_dir)
            data[spec.name] = BENCHMARK_KINDS.get(spec.kind).read(spec, cache_dir)
        except MergemixError as e:
            raise MergemixError(f"benchmark {spec.name!r}: {e}") from None
    return data


def _refuse_test_files(path: str, cache_dir: Path) -> None:
    """The split guard on the files a folder or glob resolves to (the recipe checks the path as written)."""
    for file in resolve_paths(path, cache_dir):
        part = looks_like_test_split(str(file))
        if part:
            raise MergemixError(f"{path} holds {file}, which looks like a test split ({part!r}): choosing a mixture "
                                "by its test score leaks the test set into the choice. Point at a validation "
                                "split, or set allow_test_split: true")


class Evaluator:
    """The `benchmarks`, tokenized once in `ctx`, scoring any model on demand. `data` is what
    `read_benchmarks` read (read here when not given)."""

    def __init__(self, benchmarks: list[BenchmarkSpec], ctx: EvalContext, data: dict[str, Any] | None = None):
        data = data if data is not None else read_benchmarks(benchmarks, ctx.cache_dir)
        self.autocast = ctx.autocast
        self.benchmarks: dict[str, Benchmark] = {}
        for spec in benchmarks:
            try:
                self.benchmarks[spec.name] = BENCHMARK_KINDS.get(spec.kind)(spec, ctx, data[spec.name])
            except MergemixError as e:
                raise MergemixError(f"benchmark {spec.name!r}: {e}") from None

    @torch.no_grad()
    def __call__(self, model: torch.nn.Module, share: Share | None = None) -> dict[str, dict[str, float]]:
        """benchmark → metric → value (plus `<metric>_se` standard errors) for `model` as it is now. With
        `share`, every process of a launch calls it together, each scoring its share of the items."""
        model.eval()
        with self.precision(model):
            return {name: bench.score(model, share) for name, bench in self.benchmarks.items()}

    @torch.no_grad()
    def items(self, model: torch.nn.Module, share: Share | None = None) -> Items:
        """benchmark → metric → per-item values for `model` as it is now, for every benchmark whose kind gives
        them (not lm_eval): two models scored here are compared item by item (`Objective.diff_se`)."""
        model.eval()
        with self.precision(model):
            return {name: bench.item_values(model, share) for name, bench in self.benchmarks.items()
                    if bench.paired}

    def precision(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        """Autocast to the context's dtype on the model's device, or nothing."""
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(next(model.parameters()).device.type, dtype=self.autocast)
