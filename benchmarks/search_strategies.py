"""Search strategies side by side on the demo's experts, at one trial budget, in one run.

For each strategy: the verified objective of its α*, the trials it scored after the references (base,
vertices, uniform, token prior), and its wall time (gradient's includes its descent; its trials are the
points of the descent it verifies, search.gradient_verify + 1 at most). Twice: on the demo's four domains, and on a 3-domain
problem (the same experts, `facts` pinned at 0), where a fine grid gives the reference optimum and each
strategy's regret against it. Every strategy gets its own trial log, so none reuses another's merges.

    nice -n 10 python benchmarks/search_strategies.py                 # demo recipe, budget 12, grid step 1/10
    python benchmarks/search_strategies.py --trials 39 --grid 91      # the demo's own budget (seeds 40 + verify 5)

Base, data and experts are those of `mergemix propose recipes/demo.yaml` (cached; trained here when missing).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import time

import numpy as np

from mergemix.recipe import load_recipe
from mergemix.run.experts import general_probs, train_experts
from mergemix.run.scoring import open_scoring
from mergemix.run.workspace import evaluation_key, open_workspace
from mergemix.search.driver import Problem, search_stage


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/demo.yaml")
    p.add_argument("--trials", type=int, default=12, help="trials per strategy after the references")
    p.add_argument("--grid", type=int, default=66, help="trials of the reference grid (66: step 1/10 for K = 3)")
    p.add_argument("--strategies", nargs="+", default=["surface", "tpe", "cmaes", "gp", "gradient"])
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    # seeds: the references (K + 2) and a few more; verify: the rest of the budget (surface's own split)
    seeds = 6 + max(args.trials // 2, 2)
    overrides = [*args.overrides, f"search.trials={args.trials}", f"search.seeds={seeds}",
                 f"search.verify={max(args.trials - (seeds - 6), 0)}"]
    recipe = load_recipe(args.recipe, overrides)
    ws = open_workspace(recipe)
    experts = train_experts(recipe, ws.model, ws.base_hash, ws.blocks, ws.run_dir)
    names = recipe.domain_names
    scorer = open_scoring(ws, experts)
    differentiable = scorer.differentiable()  # strategy gradient

    prior = np.array(general_probs(ws.blocks, names))
    eval_key = evaluation_key(ws, experts)
    out = ws.run_dir / "search_strategies"
    shutil.rmtree(out, ignore_errors=True)  # fresh logs and studies: every strategy pays for its merges
    out.mkdir(parents=True)
    pinned = names[-1]
    scenarios = [(f"{len(names)} domains", recipe, args.strategies),
                 (f"{len(names) - 1} domains ({pinned} pinned at 0)",
                  load_recipe(args.recipe, [*overrides, f"mixture.pinned={{{pinned}: 0.0}}"]),
                  [*args.strategies, "grid"])]
    rows = []
    for label, r, strategies in scenarios:
        bounds = r.mixture.bounds(names, ws.available)
        results = {}
        for s in strategies:
            rs = load_recipe(args.recipe, [*overrides, f"search.trials={args.grid}"]) if s == "grid" else r
            if s == "grid":
                rs = rs.model_copy(update={"mixture": r.mixture})
            start_s = time.perf_counter()
            problem = Problem(rs.name, names, prior, bounds, rs.evaluation, rs.search, rs.seed)
            res = search_stage(problem, scorer.evaluate_alpha, out / f"{label[:1]}-{s}.jsonl", eval_key, s,
                               differentiable=differentiable)
            wall = time.perf_counter() - start_s
            used = len(res.trials) - (len(names) + 2)
            results[s] = (res.star.objective, used, wall, res.star.alpha)
        best = results["grid"][0] if "grid" in results else None
        for s, (obj, used, wall, alpha) in results.items():
            regret = "" if best is None else f"{best - obj:.3f}"
            mix = " ".join(f"{alpha[d]:.2f}" for d in names)
            rows.append((label, s, f"{obj:.3f}", str(used), f"{wall:.0f}", regret, mix))
    scorer.merger.restore()
    head = ("problem", "strategy", "objective", "trials", "wall s", "regret", f"alpha* ({' '.join(names)})")
    widths = [max(len(str(x[i])) for x in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        print("  ".join(str(v).ljust(w) for v, w in zip(row, widths, strict=True)))
    print(f"(budget {args.trials} trials after the {len(names) + 2} references; grid {args.grid} trials; objective "
          "= the verified score of alpha*; regret = grid optimum - objective)")


if __name__ == "__main__":
    main()
