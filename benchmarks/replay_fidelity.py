"""How well do merged proxies rank real mixture runs, for each expert replay setting?

Trains one real model per mixture from the demo base (the ground truth), trains the experts once per
replay setting, and prints Spearman ρ between proxy and truth (with replay, a mixture's proxy is the merge at
the weights it maps to, as in the pipeline: mergemix.merge.replay), per benchmark and for the objective, next
to the cheapest predictor that uses the experts without merging them (linear interpolation of the
experts' own scores). Results are cached in the run directory, so an interrupted run resumes.

    python benchmarks/replay_fidelity.py                # demo recipe, 10 mixtures, replay 0, 0.25 and 0.5
    python benchmarks/replay_fidelity.py --replay 0 0.25 0.5 --mixtures 12 --steps 400

On 2 CPU cores the defaults take about 15 minutes (demo base, 10 mixture runs of ~35 s, 12 experts).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

from mergemix.artifacts import write_json
from mergemix.evaluate import Objective
from mergemix.merge import InPlaceMerger
from mergemix.merge.replay import merge_weights, replay_matrix
from mergemix.model.modeling import fingerprint
from mergemix.model.train import Sampler, TrainConfig, make_accelerator, train
from mergemix.recipe import load_recipe
from mergemix.run.experts import general_probs, replay_share, train_experts
from mergemix.run.scoring import evaluator as workspace_evaluator
from mergemix.run.workspace import open_workspace


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", default="recipes/demo.yaml")
    p.add_argument("--mixtures", type=int, default=10, help="real mixture runs (Dirichlet(1) draws)")
    p.add_argument("--steps", type=int, default=300, help="training steps of each mixture run")
    p.add_argument("--replay", type=float, nargs="+", default=[0.0, 0.25, 0.5])
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)

    recipe = load_recipe(args.recipe, [*args.overrides, "run_dir=runs/replay-fidelity"])
    ws = open_workspace(recipe)
    model, names = ws.model, recipe.domain_names
    evaluator = workspace_evaluator(ws)
    base_raw = evaluator(model)
    rng = np.random.default_rng(recipe.seed + 101)
    alphas = rng.dirichlet(np.ones(len(names)), size=args.mixtures)

    # ground truth: one real model per mixture, the experts' optimizer, sampled in proportion
    truth_path = ws.run_dir / f"truth-{args.steps}.json"
    truth = json.loads(truth_path.read_text()) if truth_path.exists() else {}
    pools = tuple(ws.blocks[n].blocks["expert"] for n in names)
    e = recipe.experts
    for i, a in enumerate(alphas):
        if str(i) in truth:
            continue
        m = copy.deepcopy(model)
        cfg = TrainConfig(steps=args.steps, lr=e.lr, warmup_steps=e.warmup_steps, weight_decay=e.weight_decay,
                          betas=e.betas)
        train(m, Sampler(pools, tuple(a), e.batch_size, seed=recipe.seed + 500 + i), cfg, desc=f"mixture {i}",
              accelerator=make_accelerator(recipe.device))
        truth[str(i)] = evaluator(m)
        write_json(truth_path, truth)
    truth_raw = [truth[str(i)] for i in range(len(alphas))]
    objective = Objective.from_references(recipe.evaluation, base_raw, truth_raw)

    def scores(raws: list[dict]) -> dict[str, list[float]]:
        out = {b.name: [objective.oriented(b.name, r) for r in raws] for b in recipe.evaluation.benchmarks}
        out["objective"] = [objective(r)[2] for r in raws]
        return out

    true_scores = scores(truth_raw)
    rows = []
    for replay in args.replay:
        r = load_recipe(args.recipe, [*args.overrides, f"run_dir=runs/replay-fidelity/replay-{replay}",
                                      f"experts.replay={replay}"])
        experts = train_experts(r, model, fingerprint(ws.base_path), ws.blocks, r.resolved_run_dir())
        states = [x.state() for x in experts]
        merger = InPlaceMerger(model, states)
        # each mixture scored as the pipeline scores it: with replay, by the merge weights it maps to
        weights = replay_matrix(replay_share(r.experts), general_probs(ws.blocks, names))
        proxy_raw = []
        for a in alphas:
            merger.apply(merge_weights(weights, list(a)))
            proxy_raw.append(evaluator(model))
        expert_raw = []
        for k in range(len(names)):
            merger.apply(list(np.eye(len(names))[k]))
            expert_raw.append(evaluator(model))
        merger.restore()
        proxy = scores(proxy_raw)
        per_expert = scores(expert_raw)
        interp = {key: list(alphas @ np.array(vals)) for key, vals in per_expert.items()}
        for key in true_scores:
            lo, hi = bootstrap_rho(proxy[key], true_scores[key], recipe.seed)
            rows.append((replay, key, spearmanr(proxy[key], true_scores[key])[0], lo, hi,
                         spearmanr(interp[key], true_scores[key])[0]))

    print(f"\n{args.mixtures} mixtures, {args.steps}-step real runs vs merged proxies "
          f"({recipe.experts.num_steps(recipe.data.seq_len)}-step experts); 90% bootstrap interval over mixtures")
    print(f"{'replay':>7}  {'target':<20}{'merge rho':>10}{'90% interval':>16}{'interp rho':>11}")
    for replay, key, rho_m, lo, hi, rho_i in rows:
        print(f"{replay:>7.2f}  {key:<20}{rho_m:>10.2f}{f'[{lo:.2f}, {hi:.2f}]':>16}{rho_i:>11.2f}")
    write_json(Path(ws.run_dir) / "replay_fidelity.json",
               [{"replay": r[0], "target": r[1], "merge_rho": r[2], "merge_rho_90": [r[3], r[4]], "interp_rho": r[5]}
                for r in rows])


def bootstrap_rho(pred: list[float], true: list[float], seed: int, n: int = 2000) -> tuple[float, float]:
    """5th and 95th percentile of Spearman rho over mixtures resampled with replacement."""
    rng = np.random.default_rng(seed)
    p, t = np.asarray(pred), np.asarray(true)
    rhos = []
    for _ in range(n):
        idx = rng.integers(0, len(p), len(p))
        if len(set(idx)) > 2:
            rho = spearmanr(p[idx], t[idx])[0]
            if np.isfinite(rho):
                rhos.append(rho)
    return float(np.percentile(rhos, 5)), float(np.percentile(rhos, 95))


if __name__ == "__main__":
    main()
