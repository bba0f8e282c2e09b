"""Does the merged proxy rank real mixtures the right way? The whole rank-consistency report on the demo.

Runs (or reuses) the demo's proposal, then trains `report.mixtures` real models twice each (two seeds:
the noise ceiling) and prints the merged proxy's Spearman ρ with its 95% interval beside the ceiling and
the predictors that need no merge, per capability, the compute ratio, and the proposal against uniform
and token-proportional, each trained for real. Everything is cached in the run directory: a rerun
resumes.

    python benchmarks/rank_consistency.py                      # demo scale: 0.8M parameters, 2 CPU cores
    python benchmarks/rank_consistency.py --scale large        # ~36M parameters, for a machine with a GPU
    python benchmarks/rank_consistency.py report.mixtures=16   # any recipe override

Demo scale on 2 CPU cores: 25 minutes measured with the base, experts and search trials cached (24
mixture runs of 300 steps, ~60 s each with other work on the machine); add ~7 minutes from nothing.
"""

from __future__ import annotations

import argparse
import logging
import time

from mergemix.recipe import load_recipe
from mergemix.report import rank_consistency
from mergemix.report.metrics import fmt

SCALES = {
    "demo": [],
    # ~36M parameters (hidden 512, 8 layers): minutes per mixture run on one GPU, hours on a CPU
    "large": ["base.demo.hidden=512", "base.demo.layers=8", "base.demo.heads=8", "base.demo.ffn=2048",
              "base.demo.vocab=4096", "base.demo.steps=3000", "base.demo.lr=1e-3", "base.demo.batch_size=32",
              "experts.batch_size=32", "experts.lr=3e-4", "experts.steps=300", "data.seq_len=256",
              "data.domains.code.max_chars=12000000", "data.domains.prose.max_chars=3000000"],
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/demo.yaml")
    p.add_argument("--scale", choices=sorted(SCALES), default="demo")
    p.add_argument("overrides", nargs="*", help="recipe overrides, e.g. report.mixtures=16")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    recipe = load_recipe(args.recipe, [*SCALES[args.scale], f"run_dir=runs/rank-consistency-{args.scale}",
                                       *args.overrides])
    start = time.perf_counter()
    result = rank_consistency(recipe)
    d = result.data
    obj = d["targets"]["objective"]
    m = obj["merge"]
    print(f"\nrank consistency, {args.scale} scale: {d['settings']['mixtures']} mixtures x {d['settings']['seeds']} "
          f"seeds, {d['settings']['mixture_steps']}-step real runs, {d['settings']['expert_steps']}-step experts")
    print(f"overall (objective) merge rho {fmt(m['spearman'])}  95% over mixtures "
          f"[{fmt(m['spearman_ci_mixtures'][0])}, {fmt(m['spearman_ci_mixtures'][1])}]  under item noise "
          f"[{fmt(m['spearman_ci_items'][0])}, {fmt(m['spearman_ci_items'][1])}]  tau {fmt(m['kendall'])}")
    print(f"noise ceiling (seed vs seed) {fmt(obj['ceiling'])}; like for like, the merge vs one seed "
          f"{fmt(m['spearman_one_seed'])}")
    print("no-model predictors: " + ", ".join(f"{k} {fmt(obj[k]['spearman'])}"
                                               for k in ("interpolation", "token_closeness", "log_prior")))
    print(f"partial rho of the merge given the interpolation {fmt(obj['partial_merge_given_interpolation'])}; "
          f"the proxy's best mixture is truly #{m['true_rank']} (regret {m['regret']:.3f})")
    for name, t in d["targets"].items():
        if name != "objective":
            print(f"  {name:<32} merge {fmt(t['merge']['spearman'])}  ceiling {fmt(t['ceiling'])}  "
                  f"interp {fmt(t['interpolation']['spearman'])}")
    c = d["compute"]
    print(f"compute: the mixture runs cost {c['mixture_over_proposal']:.1f}x the proposal's FLOPs")
    print("trained for real: " + ", ".join(f"{k} {v['mean']:.3f} (seeds {', '.join(f'{s:.3f}' for s in v['seeds'])})"
                                           for k, v in d["trained_for_real"].items()))
    for w in result.warnings:
        print(f"warning: {w}")
    print(f"\n{time.perf_counter() - start:.0f} s; report in {recipe.resolved_run_dir() / 'report' / 'index.html'}")


if __name__ == "__main__":
    main()
