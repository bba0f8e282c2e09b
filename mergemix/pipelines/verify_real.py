"""`search.verify_real`: settle the proposal by short real training instead of the merged proxy alone.

After the search, the top N distinct feasible mixtures (by what the search maximizes) and the uniform and
token-proportional baselines are each trained for a short real run from the base (the report's mixture runs:
`report.steps` or `report.tokens`, seed number 0, the experts' optimizer with the report's schedule:
report.lr, report.warmup_steps), scored with the search's
objective, and the best becomes α*. Each run is saved under `<run_dir>/verify_real/<key>.json` with the
report's run key, so a rerun trains nothing again. What it cost (tokens trained, wall seconds this call
spent) goes to proposal.json and the printed table.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from mergemix.feasible import Bounds
from mergemix.proposal import RealRun, RealVerification
from mergemix.run.mixture_runs import Mixture, mixture_run, run_key
from mergemix.run.workspace import Workspace, benchmark_key
from mergemix.search.trials import SearchResult, Trial, alpha_key

log = logging.getLogger(__name__)


def candidates(result: SearchResult, bounds: Bounds, n: int) -> list[tuple[str, Trial]]:
    """(label, trial): the search's top `n` feasible mixtures, then uniform and token-proportional (their
    feasible projections where the bounds exclude them), each α once."""
    domains = list(result.star.alpha)
    out: list[tuple[str, Trial]] = [(f"candidate-{i}", t) for i, t in enumerate(result.ranked[:n])]
    for label in ("uniform", "token_prior"):
        options = [t for t in result.trials if t.kind in (label, f"{label}_feasible")]
        feasible = [t for t in options if bounds.contains(t.vector(domains))]
        if feasible:
            out.append((label, feasible[0]))
    seen: set[tuple[float, ...]] = set()
    unique = []
    for label, t in out:
        if alpha_key(t.alpha) not in seen:
            seen.add(alpha_key(t.alpha))
            unique.append((label, t))
    return unique


def verify_real(ws: Workspace, result: SearchResult, bounds: Bounds,
                evaluate: Callable[[torch.nn.Module], dict[str, dict[str, float]]]) -> tuple[Trial, RealVerification]:
    """Train and score every candidate of `result` (see `candidates`) for real on the workspace `ws`
    with `evaluate` (model → raw scores); return the real-best trial and the record."""
    recipe = ws.recipe
    out_dir = ws.run_dir / "verify_real"
    bench_key = benchmark_key(ws)
    steps = recipe.report.num_steps(recipe.experts, recipe.data.seq_len)
    start = time.perf_counter()
    runs: list[tuple[RealRun, Trial]] = []
    for label, trial in candidates(result, bounds, recipe.search.verify_real):
        key = run_key(recipe, ws.base_hash, ws.blocks, trial.alpha, 0, bench_key)
        record = mixture_run(recipe, ws.model, ws.blocks, Mixture(label, trial.alpha), 0, key, out_dir, evaluate)
        real = result.objective(record["raw"])[2]
        log.info("real verification: %s %s merged %.4f, real %.4f", label, trial.alpha, trial.objective, real)
        runs.append((RealRun(label=label, alpha=trial.alpha, merged=round(trial.objective, 6), real=round(real, 6),
                             tokens=int(record["tokens"])), trial))
    best_run, best = max(runs, key=lambda r: r[0].real)
    record = RealVerification(steps=steps, tokens=sum(r.tokens for r, _ in runs),
                              wall_s=round(time.perf_counter() - start, 1), runs=[r for r, _ in runs],
                              chosen=best_run.label)
    return best, record
