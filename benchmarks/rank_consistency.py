"""Does the merged proxy rank real mixtures the right way? The rank-consistency report on both testbeds.

For each recipe (the demo and the ledger testbed by default) it runs (or reuses) the proposal, then trains
`report.mixtures` real models `report.seeds` times each (two seeds: the noise ceiling) and prints the
merged proxy's Spearman ρ with its 95% interval beside the ceiling, every predictor that needs no merge and
the interpolation of the experts' own scores, per capability; then the proposal against uniform and
token-proportional, each trained for real (mean over seeds ± 1.96 item standard errors, and each seed).

`--merge-scales 1,2` adds the merge-scale lever: the same mixtures' proxies merged as Θ_base + s·Σ α_k τ_k
(first-order theory: a mixture run of T steps moves about T / T_expert times as far as an expert) and
ranked against the same real runs; no mixture is trained again.

    python benchmarks/rank_consistency.py                                  # both testbeds, demo scale
    python benchmarks/rank_consistency.py --recipe recipes/ledger.yaml     # one testbed
    python benchmarks/rank_consistency.py --merge-scales 1,2 report.mixtures=6  # the scale lever, fewer runs
    python benchmarks/rank_consistency.py --scale large                    # ~36M parameters, for a GPU

Demo scale on 2 CPU cores: 25 minutes per testbed measured with the base, experts and search cached
(24 mixture runs of 300 steps, ~60 s each with other work on the machine); add ~7 minutes from nothing.
Everything is cached in each run directory (runs/rank-consistency-NAME-SCALE): a rerun resumes.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
from typing import Any

import numpy as np

from mergemix.recipe import Recipe, load_recipe
from mergemix.report import rank_consistency
from mergemix.report.metrics import agreement, fmt

RECIPES = ["recipes/demo.yaml", "recipes/ledger.yaml"]
SCALES = {
    "demo": [],
    # ~36M parameters (hidden 512, 8 layers): minutes per mixture run on one GPU, hours on a CPU
    "large": ["base.demo.hidden=512", "base.demo.layers=8", "base.demo.heads=8", "base.demo.ffn=2048",
              "base.demo.vocab=4096", "base.demo.steps=3000", "base.demo.lr=1e-3", "base.demo.batch_size=32",
              "experts.batch_size=32", "experts.lr=3e-4", "experts.steps=300", "data.seq_len=256"],
}
LARGE_DATA = {"demo": ["data.domains.code.max_chars=12000000", "data.domains.prose.max_chars=3000000"]}
PREDICTORS = ("interpolation", "token_closeness", "log_prior")


def _rho(entry: dict[str, Any]) -> str:
    lo, hi = entry["spearman_ci_mixtures"]
    return f"{fmt(entry['spearman'])} [{fmt(lo)}, {fmt(hi)}]"


def _trained_for_real(d: dict[str, Any]) -> str:
    rows = {m["label"]: m for m in d["mixtures"]}
    parts = []
    for label in ("proposal", "uniform", "token_prior"):
        m = rows[label]
        half = 1.96 * m["truth_se"]["objective"]
        seeds = ", ".join(f"{s['objective']:.3f}" for s in m["truth_seeds"])
        parts.append(f"{label} {m['truth']['objective']:.3f} ± {half:.3f} (seeds {seeds})")
    return "trained for real (objective, ± 1.96 item se): " + "; ".join(parts)


def _scale_lever(recipe: Recipe, d: dict[str, Any], scales: list[float]) -> list[str]:
    """Merge ρ on the objective of the report's mixtures with the task vectors scaled by each s."""
    from mergemix.pipeline import run_proposal, start

    ws = start(recipe)
    proposed = run_proposal(ws)  # everything cached: experts, trials
    names, objective = recipe.domain_names, proposed.search.objective
    truth = np.array([m["truth"]["objective"] for m in d["mixtures"]])
    seeds = np.array([[s["objective"] for s in m["truth_seeds"]] for m in d["mixtures"]])
    lines = []
    try:
        for s in scales:
            proxy = []
            for m in d["mixtures"]:
                proposed.merger.apply([s * m["alpha"][n] for n in names])
                proxy.append(objective(proposed.evaluator(ws.model))[2])
            a = agreement(proxy, truth, n_boot=recipe.report.bootstrap, seed=recipe.seed)
            per_seed = [agreement(proxy, seeds[:, k], n_boot=100)["spearman"] for k in range(seeds.shape[1])]
            one_seed = np.mean([math.nan if r is None else r for r in per_seed])
            best = d["mixtures"][int(np.argmax(proxy))]["label"]
            lines.append(f"  merge scale s={s:g}: objective rho {_rho(a)}  vs one seed {fmt(float(one_seed))}  "
                         f"proxy's best mixture: {best} (truly #{a['true_rank']}); proxy objective "
                         f"{min(proxy):.3f}..{max(proxy):.3f}")
    finally:
        proposed.merger.restore()
    return lines


def report_one(path: str, scale: str, overrides: list[str], scales: list[float]) -> None:
    name = load_recipe(path).name
    extra = LARGE_DATA.get(name, []) if scale == "large" else []
    recipe = load_recipe(path, [*SCALES[scale], *extra, f"run_dir=runs/rank-consistency-{name}-{scale}", *overrides])
    start = time.perf_counter()
    result = rank_consistency(recipe)
    d = result.data
    obj = d["targets"]["objective"]
    m = obj["merge"]
    s = d["settings"]
    print(f"\n== {recipe.name}: rank consistency, {scale} scale: {s['mixtures']} mixtures x {s['seeds']} seeds, "
          f"{s['mixture_steps']}-step real runs, {s['expert_steps']}-step experts, replay {s['replay']}")
    print(f"objective: merge rho {_rho(m)}  under item noise [{fmt(m['spearman_ci_items'][0])}, "
          f"{fmt(m['spearman_ci_items'][1])}]  tau {fmt(m['kendall'])}")
    print(f"noise ceiling (seed vs seed) {fmt(obj['ceiling'])}; like for like, the merge vs one seed "
          f"{fmt(m['spearman_one_seed'])}")
    print("no-model predictors and interpolation: " + ", ".join(f"{k} {_rho(obj[k])}" for k in PREDICTORS))
    print(f"partial rho of the merge given the interpolation {fmt(obj['partial_merge_given_interpolation'])}; "
          f"the proxy's best mixture is truly #{m['true_rank']} (regret {m['regret']:.3f})")
    for name, t in d["targets"].items():
        if name != "objective":
            print(f"  {name:<32} merge {fmt(t['merge']['spearman'])}  ceiling {fmt(t['ceiling'])}  "
                  + "  ".join(f"{k} {fmt(t[k]['spearman'])}" for k in PREDICTORS))
    print(f"compute: the mixture runs cost {d['compute']['mixture_over_proposal']:.1f}x the proposal's FLOPs")
    print(_trained_for_real(d))
    for w in result.warnings:
        print(f"warning: {w}")
    if scales:
        print("\n".join(_scale_lever(recipe, d, scales)))
    print(f"{time.perf_counter() - start:.0f} s; report in {recipe.resolved_run_dir() / 'report' / 'index.html'}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", action="append", help="recipe to run (repeatable; default: the demo and ledger)")
    p.add_argument("--scale", choices=sorted(SCALES), default="demo")
    p.add_argument("--merge-scales", type=lambda v: [float(x) for x in v.split(",")], default=[],
                   help="merge scales s to compare, comma-separated, e.g. 1,2")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every recipe, e.g. report.mixtures=16")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    for path in args.recipe or RECIPES:
        report_one(path, args.scale, args.overrides, args.merge_scales)


if __name__ == "__main__":
    main()
