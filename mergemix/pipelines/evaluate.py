"""Which benchmark metrics are stable enough to rank models? Kendall τ along training (BOSE, arXiv 2503.00812).

The checkpoints are the straight paths from the base to each expert, Θ(t) = Θ_base + t·(Θ_k − Θ_base) for
t in `steps`: a merge with α = t·e_k, which mergemix can always form in place, with no saved intermediate
checkpoint. Every metric of every benchmark is scored at every point (the base, t = 0, once).

Two statistics per benchmark metric, each a Kendall τ (scipy.stats.kendalltau, tau-b):
- **along training**: τ between t and the metric (oriented so higher is better: loss enters as −loss), for
  each expert; the table gives the mean, min and max over experts, and the mean of |τ|. +1 means the metric
  improves monotonically along the path, −1 that it worsens monotonically (an expert forgetting what the
  target needs is stable too, so |τ| is the stability and the sign the direction). A metric that wanders
  (accuracy on a weak model) sits near 0.
- **rank mid→end**: τ between the ranking of the base and the K experts halfway along their paths (the
  middle step) and the ranking at t = 1. It asks whether a half-trained checkpoint already orders the
  models as the finished ones do — the consistency a proxy that ranks mixtures needs. With K = 4 it has
  five models, so steps of 0.2 are all it can resolve.
A τ is NaN where the metric does not move at all (scipy leaves it undefined).
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from scipy.stats import kendalltau

from mergemix.artifacts import write_json
from mergemix.catalog import BENCHMARK_KINDS
from mergemix.pipelines.propose import expert_stage
from mergemix.progress import progress
from mergemix.recipe import BenchmarkSpec, Recipe
from mergemix.run.scoring import open_scoring
from mergemix.run.workspace import open_workspace

log = logging.getLogger(__name__)

STEPS = (0.0, 0.25, 0.5, 0.75, 1.0)
Raw = dict[str, dict[str, float]]


@dataclass(frozen=True)
class StabilityRow:
    benchmark: str
    metric: str
    tau_mean: float
    tau_min: float
    tau_max: float
    abs_tau_mean: float
    rank_tau: float


@dataclass(frozen=True)
class StabilityReport:
    steps: list[float]
    experts: list[str]
    scores: dict[str, list[Raw]]  # expert → raw scores at each step (step 0 is the base)
    rows: list[StabilityRow]

    def table(self) -> str:
        head = f"{'benchmark':<22}{'metric':<13}{'tau mean':>9}{'min':>8}{'max':>8}{'|tau|':>8}{'rank mid→end':>14}"
        lines = [head]
        for r in self.rows:
            lines.append(f"{r.benchmark:<22}{r.metric:<13}{r.tau_mean:>9.3f}{r.tau_min:>8.3f}{r.tau_max:>8.3f}"
                         f"{r.abs_tau_mean:>8.3f}{r.rank_tau:>14.3f}")
        lines.append(f"Kendall tau along the path base → expert (t = {', '.join(f'{t:g}' for t in self.steps)}; "
                     f"{len(self.experts)} experts): +1 improves monotonically, |tau| is the stability. rank "
                     f"mid→end: tau between the rankings of base + experts at t = {self.steps[len(self.steps) // 2]:g} "
                     "and t = 1.")
        return "\n".join(lines)

    def scores_table(self) -> str:
        """Every metric of the base and of each expert (t = 1), one row per model."""
        cols = [(b, m) for b, metrics in self.scores[self.experts[0]][0].items() for m in metrics
                if not m.endswith("_se") and m not in ("n", "chance")]
        names = [f"{b}.{m}" for b, m in cols]
        widths = [max(9, len(n) + 2) for n in names]
        lines = [f"{'model':<14}" + "".join(f"{n:>{w}}" for n, w in zip(names, widths, strict=True))]
        models = [("base", self.scores[self.experts[0]][0])] + [(e, self.scores[e][-1]) for e in self.experts]
        for label, raw in models:
            lines.append(f"{label:<14}" + "".join(f"{raw[b][m]:>{w}.4f}" for (b, m), w in zip(cols, widths, strict=True)))
        return "\n".join(lines)


def _tau(x: Sequence[float], y: Sequence[float]) -> float:
    with warnings.catch_warnings():  # a constant input: scipy warns and returns NaN, which we report
        warnings.simplefilter("ignore")
        return float(kendalltau(x, y).statistic)


def _stats(values: list[float]) -> tuple[float, float, float, float]:
    """(mean, min, max, mean |·|) of the defined values; NaN when none is."""
    v = [x for x in values if not math.isnan(x)]
    if not v:
        return (math.nan,) * 4
    return sum(v) / len(v), min(v), max(v), sum(abs(x) for x in v) / len(v)


def stability_rows(benchmarks: list[BenchmarkSpec], steps: Sequence[float],
                   scores: dict[str, list[Raw]]) -> list[StabilityRow]:
    """The τ table from the scores along each expert's path (see the module docstring)."""
    mid = len(steps) // 2
    rows = []
    for b in benchmarks:
        kind = BENCHMARK_KINDS.get(b.kind)
        reported = next(iter(scores.values()))[0][b.name]
        for m in (m for m in kind.metrics if m in reported):  # an lm-eval task reports only its own metrics
            sign = 1.0 if kind.higher_is_better[m] else -1.0
            paths = {e: [sign * raw[b.name][m] for raw in path] for e, path in scores.items()}
            taus = [_tau(steps, p) for p in paths.values()]
            base = next(iter(paths.values()))[0]
            rank = _tau([base, *(p[mid] for p in paths.values())], [base, *(p[-1] for p in paths.values())])
            rows.append(StabilityRow(b.name, m, *_stats(taus), rank))
    return rows


def evaluate_paths(recipe: Recipe, steps: Sequence[float] = STEPS) -> StabilityReport:
    """Score the base and the path to every expert (training or reusing the experts as `propose` does),
    write `stability.json` to the run directory and return the report."""
    steps = sorted(set(steps) | {0.0, 1.0})
    ws = open_workspace(recipe)
    s = open_scoring(ws, expert_stage(ws, train=True))
    evaluator, merger = s.evaluator, s.merger
    names = recipe.domain_names
    bar = progress(total=1 + len(names) * (len(steps) - 1), desc="evaluate checkpoints", leave=False)
    base = evaluator(ws.model)
    bar.update()
    scores: dict[str, list[Raw]] = {}
    try:
        for k, name in enumerate(names):
            scores[name] = [base]
            for t in steps[1:]:
                merger.apply([t if j == k else 0.0 for j in range(len(names))])
                scores[name].append(evaluator(ws.model))
                bar.update()
    finally:
        bar.close()
        merger.restore()
    rows = stability_rows(recipe.evaluation.benchmarks, steps, scores) if len(steps) > 2 else []
    report = StabilityReport(list(steps), names, scores, rows)
    write_json(ws.run_dir / "stability.json", _finite(asdict(report)))
    return report


def _finite(obj: object) -> object:
    """NaN as null: JSON has no NaN."""
    if isinstance(obj, float):
        return None if math.isnan(obj) else obj
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    return obj
