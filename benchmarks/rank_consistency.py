"""Does the merged proxy rank real mixtures the right way? The rank-consistency report on both testbeds.

For each recipe (the demo and the ledger testbed by default) it runs (or reuses) the proposal, then trains
`report.mixtures` real models `report.seeds` times each (two seeds: the noise ceiling) and prints the
merged proxy's Spearman ρ with its 95% interval beside the ceiling, every predictor that needs no merge and
the interpolation of the experts' own scores, per capability; then the proposal against uniform and
token-proportional, each trained for real (mean over seeds ± 1.96 item standard errors, and each seed).

The proposal is made for the mixture runs' token budget (mixture.total_tokens is set to it, unless given):
its max_epochs bounds are then those of the real runs, so uniform and token-proportional are mixtures it
could have proposed.

`--lever KEY=VALUE` (repeatable; several overrides in one lever are separated by spaces) adds a lever: a
recipe override whose real runs are the report's (refused when it changes how they train or what scores them:
experts.batch_size, report.*, the benchmarks; experts.lr and experts.warmup_steps change the experts only, as
the real runs keep the recipe's schedule through report.lr and report.warmup_steps; objective weights and
evaluation.low_signal_ratio change the search only). For each lever the search is run again (an `experts.*`
lever trains its experts in a run directory of its own), its merged proxy scores the report's mixtures (its
merge rho, against the same real runs), and its proposal is trained for real with the report's seeds where it
is not one of the report's mixtures already. Every score is normalized with the recipe's objective, so the
rows compare. The "surrogate rho" column is the search's surrogate, refitted on its trials with the lever's
settings, ranking the report's mixtures against the truth. Levers the issue names: merge.scale (first-order
theory: a mixture run of T steps moves about T / T_expert times as far as an expert), experts.steps (the
horizon), experts.lr and experts.warmup_steps, experts.replay, search.surrogate_prior, search.final.

    python benchmarks/rank_consistency.py                                  # both testbeds, demo scale
    python benchmarks/rank_consistency.py --recipe recipes/ledger.yaml     # one testbed
    python benchmarks/rank_consistency.py --lever merge.scale=2 --lever experts.steps=75 report.mixtures=6
    python benchmarks/rank_consistency.py --scale large                    # ~36M parameters, for a GPU

The table's last row per testbed is `search.verify_real=1`: it would train the proposal, uniform and
token-proportional with seed number 0, which are the report's seed-0 runs, and pick the best; its "proposal"
column is that pick's real runs (seed 0 chose it; the other seeds check it). One table at the end holds
every testbed and lever.

Demo scale on 2 CPU cores: about 40 minutes per testbed from nothing with other work on the machine (24
mixture runs of 300 steps, 60-100 s each); a search lever adds 2-5 minutes, an experts.* lever 5-10.
Everything is cached in each run directory (runs/rank-consistency-NAME-SCALE): a rerun resumes.
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import numpy as np

from mergemix.recipe import Recipe, load_recipe
from mergemix.report import rank_consistency
from mergemix.report.metrics import agreement, fmt

RECIPES = ["recipes/demo.yaml", "recipes/ledger.yaml"]
SCALES = {
    "demo": [],
    # ~36M parameters (hidden 512, 8 layers): minutes per mixture run on one GPU, hours on a CPU; the experts
    # (and real runs) continue at the base's final learning rate (10% of its 1e-3), as the demo's do
    "large": ["base.demo.hidden=512", "base.demo.layers=8", "base.demo.heads=8", "base.demo.ffn=2048",
              "base.demo.vocab=4096", "base.demo.steps=3000", "base.demo.lr=1e-3", "base.demo.batch_size=32",
              "experts.batch_size=32", "experts.lr=1e-4", "experts.steps=300", "data.seq_len=256"],
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


def _proxy_agreement(ws: Any, experts: Any, objective: Any, d: dict[str, Any], seed: int) -> dict[str, Any]:
    """The merged proxy of `experts` (with the merge settings of `ws`) at the report's mixtures, scored with
    `objective`, against the truth (objective, mean over seeds)."""
    from mergemix.run.scoring import open_scoring

    s = open_scoring(ws, experts)
    s.at_budget(ws.recipe.report.run_tokens(ws.recipe.experts, ws.recipe.data.seq_len))  # the runs' budget
    try:
        proxy = [objective(s.evaluate_alpha(m["alpha"]))[2] for m in d["mixtures"]]
    finally:
        s.merger.restore()
    return agreement(proxy, [m["truth"]["objective"] for m in d["mixtures"]], n_boot=1000, seed=seed)


def _surrogate_rho(recipe: Recipe, proposed: Any, d: dict[str, Any]) -> float | None:
    """Spearman ρ of the search's surrogate (refitted on every search trial but the base, with the recipe's
    surrogate and prior lever) at the report's mixtures against the truth (objective, mean over seeds)."""
    from mergemix.search.surrogate import fit_with_prior, prior_basis

    names, objective = recipe.domain_names, proposed.search.objective
    trials = [t for t in proposed.search.trials if t.kind != "base"]
    vertices = {max(t.alpha, key=t.alpha.__getitem__): t for t in proposed.search.vertices}
    x = np.array([t.vector(names) for t in trials])
    q = np.array([[m["alpha"][n] for n in names] for m in d["mixtures"]])
    preds = {}
    for g in trials[0].capabilities:
        basis = prior_basis(g, np.array([vertices[n].capabilities[g] for n in names]), np.array(d["token_prior"]),
                            [(b.capability, b.domain) for b in recipe.evaluation.benchmarks], names)
        model, _ = fit_with_prior(recipe.search.surrogate, recipe.search.surrogate_prior, x,
                                  np.array([t.capabilities[g] for t in trials]), recipe.seed, basis)
        preds[g] = model(q)
    pred = [objective.combine({g: p[i] for g, p in preds.items()}) for i in range(len(q))]
    return agreement(pred, [m["truth"]["objective"] for m in d["mixtures"]], n_boot=100)["spearman"]


def _truth_key(recipe: Recipe, ws: Any) -> str:
    """What the real runs of `recipe` depend on (the report's run key of the uniform mixture, seed 0)."""
    from mergemix.run.mixture_runs import run_key
    from mergemix.run.workspace import benchmark_key

    uniform = {n: 1 / len(recipe.domain_names) for n in recipe.domain_names}
    return run_key(recipe, ws.base_hash, ws.blocks, uniform, 0, benchmark_key(ws))


def _real_seeds(recipe: Recipe, ref: tuple[Any, Any], alpha: dict[str, float]) -> list[float]:
    """`alpha` trained for real with the report's seeds (the report's runs, saved with them; reused where
    done), each scored with the recipe's objective. `recipe` trains them as the report does (its truth key)."""
    from mergemix.run.mixture_runs import Mixture, mixture_run, run_key
    from mergemix.run.workspace import benchmark_key

    ws, proposed = ref
    bench_key = benchmark_key(ws)  # hashes every benchmark's data: once, not per seed
    out = []
    for s in range(ws.recipe.report.seeds):
        key = run_key(recipe, ws.base_hash, ws.blocks, alpha, s, bench_key)
        rec = mixture_run(ws.recipe, ws.model, ws.blocks, Mixture("proposal", alpha), s, key,
                          ws.run_dir / "report" / "runs", proposed.evaluator)
        out.append(proposed.search.objective(rec["raw"])[2])
    return out


def _lever_row(path: str, settings: list[str], lever: str, d: dict[str, Any], ref: tuple[Any, Any]) -> dict[str, Any]:
    """The proposal run again with the override `lever` (its own run directory for an experts.* lever); its
    merged proxy ranked against the report's real runs and its proposal trained for real with the report's
    seeds (reused where it is one of the report's mixtures; saved with the report's runs). `ref`: the recipe's
    (workspace, proposal), whose objective normalizes every score."""
    from mergemix.pipelines.propose import propose_on
    from mergemix.run.workspace import open_workspace
    from mergemix.search.trials import alpha_key

    ref_ws, ref_proposed = ref
    # the real runs keep the recipe's schedule when a lever changes the experts' (experts.lr, warmup_steps)
    lr, warmup = ref_ws.recipe.report.schedule(ref_ws.recipe.experts)
    overrides = [*settings, f"report.steps={d['settings']['mixture_steps']}", f"report.lr={lr}",
                 f"report.warmup_steps={warmup}", *lever.split()]
    if any(o.startswith("experts.") for o in lever.split()):
        slug = "".join(c if c.isalnum() else "-" for c in lever)
        overrides.append(f"run_dir={ref_ws.run_dir}/lever-{slug}")
    recipe = load_recipe(path, overrides)
    ws = open_workspace(recipe)
    if _truth_key(recipe, ws) != _truth_key(ref_ws.recipe, ref_ws):
        raise SystemExit(f"--lever {lever}: it changes how the real runs train (or what scores them), so the "
                         "report's runs cannot judge it; choose a lever of the search, the merge or the experts' "
                         "horizon, learning rate, warmup and replay")
    proposed = propose_on(ws)
    assert proposed is not None
    objective = ref_proposed.search.objective
    star = proposed.proposal.alpha_star
    known = {alpha_key(m["alpha"]): m for m in d["mixtures"]}
    if alpha_key(star) in known:
        seeds = [s["objective"] for s in known[alpha_key(star)]["truth_seeds"]]
    else:
        seeds = _real_seeds(recipe, ref, star)
    return {"lever": lever, "proposal": seeds, "alpha": star,
            "merge": _proxy_agreement(ws, proposed.experts, objective, d, recipe.seed),
            "surrogate_rho": _surrogate_rho(recipe, proposed, d)}


def _cells(row: dict[str, Any], d: dict[str, Any]) -> str:
    obj = d["targets"]["objective"]
    best = max(("token_closeness", "log_prior"), key=lambda k: obj[k]["spearman"] or -2)
    real = {m["label"]: m["truth_seeds"] for m in d["mixtures"]}

    def mean(seeds: list[float]) -> str:
        return f"{np.mean(seeds):.3f} ({', '.join(f'{v:.3f}' for v in seeds)})"

    return (f"{row['testbed']:<8}{row['lever']:<34}{_rho(row.get('merge', obj['merge'])):>20}{fmt(obj['ceiling']):>9}"
            f"{best + ' ' + fmt(obj[best]['spearman']):>22}"
            f"{fmt(obj['interpolation']['spearman']):>8}{fmt(row['surrogate_rho']):>11}   {mean(row['proposal']):<26}"
            f"{mean([s['objective'] for s in real['uniform']]):<26}{mean([s['objective'] for s in real['token_prior']])}")


TABLE_HEAD = (f"{'testbed':<8}{'lever':<34}{'merge rho [95%]':>20}{'ceiling':>9}{'best no-model':>22}{'interp':>8}"
              f"{'surr. rho':>11}   {'proposal real (seeds)':<26}{'uniform real':<26}token-prop. real")


def report_one(path: str, scale: str, overrides: list[str], levers: list[str]) -> list[str]:
    """Print one testbed's rank consistency; return its lines of the lever table."""
    name = load_recipe(path).name
    extra = LARGE_DATA.get(name, []) if scale == "large" else []
    # The proposal is judged by mixture runs of `tokens` tokens: it is made for that budget (its max_epochs
    # bounds those of the runs), so that uniform and token-proportional are mixtures it could have proposed.
    r = load_recipe(path, [*SCALES[scale], *extra, *overrides])
    tokens = r.report.num_steps(r.experts, r.data.seq_len) * r.experts.batch_size * r.data.seq_len
    settings = [*SCALES[scale], *extra, f"run_dir=runs/rank-consistency-{name}-{scale}",
                f"mixture.total_tokens={tokens}", *overrides]
    recipe = load_recipe(path, settings)
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
    d["token_prior"] = [next(m for m in d["mixtures"] if m["label"] == "token_prior")["alpha"][n]
                        for n in recipe.domain_names]
    proposed_seeds = [s["objective"] for s in next(m for m in d["mixtures"] if m["label"] == "proposal")["truth_seeds"]]
    ref = _proposed(recipe)
    rows = [{"lever": "recipe", "proposal": proposed_seeds, "surrogate_rho": _surrogate_rho(recipe, ref[1], d)}]
    for lever in levers:
        rows.append(_lever_row(path, settings, lever, d, ref))
        print(f"  {lever}: merge rho {_rho(rows[-1]['merge'])}; proposal {rows[-1]['alpha']}, trained for real "
              f"{', '.join(f'{v:.3f}' for v in rows[-1]['proposal'])}")
    # search.verify_real=1 trains the proposal, uniform and token-proportional with seed number 0 for
    # report.steps: exactly the report's seed-0 runs. Its pick is judged on the other seeds.
    real = {m["label"]: [s["objective"] for s in m["truth_seeds"]] for m in d["mixtures"]}
    pick = max(("proposal", "uniform", "token_prior"), key=lambda k: real[k][0])
    rows.append({"lever": "verify_real=1", "proposal": real[pick], "surrogate_rho": None})
    print(f"  verify_real=1 (the report's seed-0 runs of proposal, uniform, token-proportional) picks {pick}; "
          "the other seeds are its held-out check")
    print(f"{time.perf_counter() - start:.0f} s; report in {recipe.resolved_run_dir() / 'report' / 'index.html'}")
    return [_cells({"testbed": recipe.name, **r}, d) for r in rows]


def _proposed(recipe: Recipe) -> tuple[Any, Any]:
    """The recipe's workspace and proposal again, everything reused from its run directory."""
    from mergemix.pipelines.propose import propose_on
    from mergemix.run.workspace import open_workspace

    ws = open_workspace(recipe)
    return ws, propose_on(ws)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--recipe", action="append", help="recipe to run (repeatable; default: the demo and ledger)")
    p.add_argument("--scale", choices=sorted(SCALES), default="demo")
    p.add_argument("--lever", action="append", default=[], metavar="KEY=VALUE",
                   help="a lever to compare with the recipe (repeatable), e.g. merge.scale=2 or experts.steps=75")
    p.add_argument("overrides", nargs="*", help="recipe overrides for every recipe, e.g. report.mixtures=16")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    table = [TABLE_HEAD]
    for path in args.recipe or RECIPES:
        table += report_one(path, args.scale, args.overrides, args.lever)
    print("\n" + "\n".join(table))
    print("merge rho, ceiling, no-model and interpolation rho: objective, truth = mean over seeds; real: objective "
          "of each mixture trained for real (mean, then each seed); higher is better")


if __name__ == "__main__":
    main()
