"""`rank_consistency`: does the merged proxy rank real mixtures the way real training does?

proposal (reused) → mixtures → merged proxies → real mixture runs (× seeds) → interference diagnostics
→ agreement of every predictor with the truth, per target → report/ (index.html, report.md,
consistency.json). Every finished piece is on disk, so a killed report resumes where it stopped.

Yardsticks, because a ρ alone means little:
- the noise ceiling: ρ between two trainings of the same mixtures with different seeds (with more seeds,
  the mean over pairs): how well one real training ranks another's results. Its like-for-like comparison
  is the merge's ρ against one seed (`spearman_one_seed`); against the mean of the seeds, which is less
  noisy, a good proxy can exceed it;
- predictors that need no merge: closeness to the token-proportional mixture (−KL), a log prior
  Σ_d w_d log(α_d + 0.01) weighted by the benchmarks that score a domain's own held-out text (uniform
  weights where none does), and the linear interpolation of the experts' own scores Σ_d α_d·score(expert_d),
  with the partial correlation of the merge and the truth given that interpolation (what merging adds).
  The experts' own scores are those of the vertex merges, which for linear merging without replay are the
  experts (with replay, the merges that stand for each domain alone: mergemix.merge.replay).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch

from mergemix.artifacts import read_json, stable_hash, write_json
from mergemix.evaluate import Objective
from mergemix.merge.lora import Applied, LoraExpert
from mergemix.model.modeling import param_count
from mergemix.model.sharded import is_sharded
from mergemix.model.train import process_state
from mergemix.pipelines.propose import ProposalWithSearch, check_launch, expert_stage, search_and_propose
from mergemix.progress import progress
from mergemix.recipe import Recipe
from mergemix.report.compute import accounting, tokens_per_evaluation
from mergemix.report.interference import dominance_warnings, interference_gamma, task_vector_cosines
from mergemix.report.metrics import agreement, finite, fmt, partial_spearman, spearman
from mergemix.report.render import Consistency, write_report
from mergemix.report.targets import Target, targets
from mergemix.report.verdict import verdict
from mergemix.run.experts import Expert, general_probs
from mergemix.run.mixture_runs import Mixture, choose_mixtures, mixture_run, run_key
from mergemix.run.scoring import ScoringSession, scoring_session
from mergemix.run.workspace import Workspace, benchmark_key, evaluation_key, open_workspace
from mergemix.search.surrogate import PRIOR_EPS
from mergemix.search.trials import TrialLog, alpha_key

log = logging.getLogger(__name__)

LOW_CEILING = 0.5  # below this seed-to-seed ρ a target cannot rank mixtures, whatever the proxy


def rank_consistency(recipe: Recipe) -> Consistency | None:
    """Build the rank-consistency report of `recipe` in <run_dir>/report and return its numbers. Runs (or
    reuses) the proposal first, then trains `report.mixtures` × `report.seeds` real models.

    Under a multi-process launch (accelerate launch, torchrun) every process trains the experts and then each
    mixture run data-parallel (or FSDP-sharded); the main process alone searches, merges, scores and writes,
    while the others wait; they return None."""
    check_launch(recipe)
    ws = open_workspace(recipe, distributed=True)
    names = recipe.domain_names
    prior = general_probs(ws.blocks, names)
    experts = expert_stage(ws, train=True)
    proposed, proxies = None, []
    with scoring_session(ws, experts) as session:
        if session is not None:  # the proposal, then the merged proxy of every mixture with the same session
            proposed = search_and_propose(ws, experts, session)
            (ws.run_dir / "report").mkdir(exist_ok=True)
            with ws.timings.stage("proxies"):
                mixtures = choose_mixtures(recipe, prior, proposed.proposal.alpha_star, ws.available)
                proxies = _proxies(ws, experts, proposed, mixtures, session)
    process_state(recipe.device).wait_for_everyone()  # the main process has searched and written proposal.json
    star = proposed.proposal.alpha_star if proposed else read_json(ws.run_dir / "proposal.json")["alpha_star"]
    mixtures = choose_mixtures(recipe, prior, star, ws.available)
    with ws.timings.stage("mixture runs"):
        runs = _truth(ws, proposed, mixtures)
    if proposed is None:
        return None
    if is_sharded(ws.model):  # an FSDP launch: the main process alone goes on, with the whole base
        ws.reload_model(whole=True)
    report_dir = ws.run_dir / "report"
    with ws.timings.stage("interference"):
        interference = _interference(ws, experts)
    objective = proposed.search.objective
    expert_raw = {d: t.raw for d, t in zip(names, proposed.search.vertices, strict=True)}
    data: dict[str, Any] = {
        "domains": names,
        "settings": {
            "mixtures": len(mixtures), "seeds": recipe.report.seeds,
            "mixture_steps": recipe.report.num_steps(recipe.experts, recipe.data.seq_len),
            "expert_steps": recipe.experts.num_steps(recipe.data.seq_len), "replay": recipe.experts.replay,
            "bootstrap": recipe.report.bootstrap,
        },
        "proposal": proposed.proposal.alpha_star,
    }
    warnings: list[str] = []
    data["mixtures"], data["targets"] = _agreements(recipe, objective, mixtures, proxies, runs, expert_raw, prior,
                                                    warnings)
    data["trained_for_real"] = {
        m["label"]: {"mean": m["truth"]["objective"], "seeds": [s["objective"] for s in m["truth_seeds"]]}
        for m in data["mixtures"] if m["label"] in ("proposal", "uniform", "token_prior")
    }
    warnings += _bound_warnings(recipe, ws.available, data["mixtures"], proposed.proposal.active_bounds)
    data["interference"] = interference
    if interference.get("gamma"):
        warnings += dominance_warnings(np.array(interference["gamma"]), names, np.array(interference["cosine"]))
    data["compute"] = _compute(ws, experts, proposed, runs)
    data["warnings"] = warnings
    data["verdict"] = verdict(data)
    result = Consistency(data, warnings)
    with ws.timings.stage("render"):
        write_report(result, report_dir)
    write_json(report_dir / "timings.json", ws.timings.stages)
    return result


def _bound_warnings(recipe: Recipe, available: dict[str, int], rows: list[dict[str, Any]],
                    active: dict[str, str]) -> list[str]:
    """Where the comparison of the proposal with uniform and token-proportional trained for real is not like
    for like: a baseline the mixture bounds exclude (the search could never pick it), and bounds of
    `max_epochs` set for mixture.total_tokens where the mixture runs train far fewer tokens (at the runs'
    budget the proposal would not have been held to them)."""
    names = recipe.domain_names
    bounds = recipe.mixture.bounds(names, available)
    out = []
    for row in rows:
        broken = bounds.outside(row["alpha"]) if row["label"] in ("uniform", "token_prior") else {}
        if broken:
            out.append(f"{row['label']} lies outside the mixture bounds ({'; '.join(f'{d} {w}' for d, w in broken.items())})"
                       ": the search could not propose it, so its real result is no fair bar for the proposal")
    capped = sorted(d for d, why in active.items() if why == "max_epochs")
    tokens = recipe.report.num_steps(recipe.experts, recipe.data.seq_len) * recipe.experts.tokens_per_step(recipe.data.seq_len)
    if capped and recipe.mixture.total_tokens and tokens < recipe.mixture.total_tokens:
        out.append(f"the proposal sits on max_epochs at {', '.join(capped)}, a cap set for mixture.total_tokens = "
                   f"{recipe.mixture.total_tokens:,}; each mixture run trains {tokens:,} tokens, where no mixture is held "
                   f"to it: to compare like for like, report with mixture.total_tokens={tokens}")
    return out


def _proxies(ws: Workspace, experts: list[Expert], proposed: ProposalWithSearch, mixtures: list[Mixture],
             s: ScoringSession) -> list[dict[str, Any]]:
    """Raw scores of the merged proxy at every mixture: from the search where it scored the same α (the
    proposal, uniform, token-proportional), else merged by `s` and scored here and logged in
    report/proxies.jsonl."""
    run_tokens = ws.recipe.report.run_tokens(ws.recipe.experts, ws.recipe.data.seq_len)
    trial_log = TrialLog(ws.run_dir / "report" / "proxies.jsonl", evaluation_key(ws, experts, run_tokens))
    # the search's scores stand for these mixtures unless repetition is counted, at another budget there
    searched = {} if ws.recipe.search.repetition == "discount" else {
        alpha_key(t.alpha): {"raw": t.raw} for t in proposed.search.trials}
    s.at_budget(run_tokens)  # repetition at the runs' budget, what the truth is trained at
    out = []
    try:
        for m in progress(mixtures, desc="merged proxies", leave=False):
            rec = searched.get(alpha_key(m.alpha)) or trial_log.get(m.alpha)
            if rec is None:
                rec = {"label": m.label, "alpha": m.alpha, "raw": s.evaluate_alpha(m.alpha)}
                trial_log.add(rec)
            out.append(rec["raw"])
    finally:
        s.merger.restore()  # the mixture runs start from the base
    return out


def _truth(ws: Workspace, proposed: ProposalWithSearch | None, mixtures: list[Mixture]) -> list[list[dict[str, Any]]]:
    """Records of the real mixture runs, [mixture][seed]; seed by seed, so a report stopped half-way
    already holds one training of every mixture. `proposed` is None on the processes other than the main one
    of a multi-process launch: they train and get no records."""
    r = ws.recipe
    bench_key = benchmark_key(ws)
    jobs = [(i, s) for s in range(r.report.seeds) for i in range(len(mixtures))]
    keys = {(i, s): run_key(r, ws.base_hash, ws.blocks, mixtures[i].alpha, s, bench_key) for i, s in jobs}
    out_dir = ws.run_dir / "report" / "runs"
    done = sum((out_dir / f"{k}.json").exists() for k in keys.values())
    log.info("mixture runs: %d of %d already done", done, len(jobs))
    runs: list[list[dict[str, Any]]] = [[{} for _ in range(r.report.seeds)] for _ in mixtures]
    for i, s in progress(jobs, desc="mixture runs", leave=False):
        record = mixture_run(r, ws.model, ws.blocks, mixtures[i], s, keys[i, s], out_dir,
                             proposed.evaluator if proposed else None)
        runs[i][s] = record or {}
    return runs


def _interference(ws: Workspace, experts: list[Expert]) -> dict[str, Any]:
    """Task-vector cosines and the curvature interference γ at the base, cached in report/interference.json."""
    r = ws.recipe
    n_rows = r.report.interference_batches * r.experts.batch_size
    key = stable_hash([[e.key for e in experts], n_rows, r.seed])
    path = ws.run_dir / "report" / "interference.json"
    if path.exists() and read_json(path).get("key") == key:
        return read_json(path)
    base = {n: p.detach() for n, p in ws.model.named_parameters()}  # the base again (after the mixture runs)
    states = [e.state() for e in experts]
    cosines = task_vector_cosines(base, [Applied(s, base) if isinstance(s, LoraExpert) else s for s in states])
    out: dict[str, Any] = {"key": key, "cosine": np.round(cosines, 4).tolist()}
    if n_rows:
        rng = np.random.default_rng([r.seed, 9])
        batches = []
        for d in r.domain_names:
            pool = ws.blocks[d].blocks["expert"]
            idx = np.sort(rng.choice(len(pool), size=min(n_rows, len(pool)), replace=False))
            batches.append(pool[torch.as_tensor(idx)])
        gamma = interference_gamma(ws.model, batches, batch_size=r.experts.batch_size,
                                   max_batches=r.report.interference_batches)
        out["gamma"] = np.round(gamma.gamma, 4).tolist()
        out["grad_norm"] = np.round(gamma.grad_norms, 6).tolist()
        out["tokens"] = int(sum(b.numel() for b in batches))
    write_json(path, out)
    return out


def _prior_weights(recipe: Recipe, target: Target) -> tuple[list[float], str]:
    """Domain weights of the log prior: the target's weight on benchmarks that score a domain's own
    held-out text; uniform where the target names no domain."""
    names = recipe.domain_names
    w = dict.fromkeys(names, 0.0)
    for b in recipe.evaluation.benchmarks:
        if b.domain is not None and b.name in target.coef:
            w[b.domain] += target.coef[b.name]
    if sum(w.values()) <= 0:
        return [1.0] * len(names), "uniform (no benchmark of this target scores a domain)"
    return [w[d] for d in names], "benchmarks that score a domain's held-out text"


def _predictors(recipe: Recipe, objective: Objective, t: Target, alphas: np.ndarray, prior: np.ndarray,
                weights: list[float], proxies: list[dict[str, Any]],
                expert_raw: dict[str, Any]) -> dict[str, tuple[np.ndarray, Any]]:
    """Each predictor's score of every mixture for target `t` (with its item standard errors, if any);
    `weights` are the log prior's domain weights."""
    return {
        "merge": (np.array([t.value(objective, raw) for raw in proxies]),
                  np.array([t.se(objective, raw) for raw in proxies])),
        "interpolation": (alphas @ np.array([t.value(objective, expert_raw[d]) for d in recipe.domain_names]), None),
        "token_closeness": (-(prior * np.log(prior / (alphas + 1e-12))).sum(axis=1), None),
        "log_prior": (np.log(alphas + PRIOR_EPS) @ np.asarray(weights), None),
    }


def _target_agreement(recipe: Recipe, predictors: dict[str, tuple[np.ndarray, Any]], seeds: np.ndarray,
                      truth_se: np.ndarray) -> dict[str, Any]:
    """Every predictor against the truth (mean over seeds), the noise ceiling and the partial ρ."""
    truth = seeds.mean(axis=1)
    n_boot, seed = recipe.report.bootstrap, recipe.seed
    entry: dict[str, Any] = {
        name: agreement(p, truth, se, truth_se if se is not None else None, n_boot, seed)
        for name, (p, se) in predictors.items()
    }
    pairs = [(a, b) for a in range(seeds.shape[1]) for b in range(a + 1, seeds.shape[1])]
    entry["ceiling"] = finite(float(np.mean([spearman(seeds[:, a], seeds[:, b]) for a, b in pairs]))) if pairs else None
    proxy, interp = predictors["merge"][0], predictors["interpolation"][0]
    entry["merge"]["spearman_one_seed"] = finite(float(np.mean([spearman(proxy, seeds[:, s])
                                                                for s in range(seeds.shape[1])])))
    entry["partial_merge_given_interpolation"] = finite(partial_spearman(proxy, truth, interp))
    return entry


def _agreements(recipe: Recipe, objective: Objective, mixtures: list[Mixture], proxies: list[dict[str, Any]],
                runs: list[list[dict[str, Any]]], expert_raw: dict[str, Any], prior: tuple[float, ...],
                warnings: list[str]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per mixture: every target's proxy, truth and interpolation; per target: every predictor's agreement
    with the truth. Appends a warning for each target too noisy to rank, and where merging loses to
    interpolation."""
    names = recipe.domain_names
    alphas = np.array([[m.alpha[d] for d in names] for m in mixtures])
    rows: list[dict[str, Any]] = [
        {"label": m.label, "alpha": m.alpha, "proxy": {}, "proxy_se": {}, "truth": {}, "truth_se": {},
         "truth_seeds": [{} for _ in range(recipe.report.seeds)], "interpolation": {}}
        for m in mixtures
    ]
    per_target: dict[str, Any] = {}
    for t in targets(objective):
        weights, prior_basis = _prior_weights(recipe, t)
        predictors = _predictors(recipe, objective, t, alphas, np.asarray(prior), weights, proxies, expert_raw)
        seeds = np.array([[t.value(objective, run["raw"]) for run in mix_runs] for mix_runs in runs])  # (M, S)
        seeds_se = np.array([[t.se(objective, run["raw"]) for run in mix_runs] for mix_runs in runs])
        truth_se = np.sqrt((seeds_se**2).sum(axis=1)) / seeds.shape[1]
        entry = per_target[t.name] = _target_agreement(recipe, predictors, seeds, truth_se)
        entry["log_prior_basis"] = prior_basis
        if seeds.shape[1] > 1 and not (entry["ceiling"] or 0) >= LOW_CEILING:
            warnings.append(f"{t.name}: two trainings of the same mixtures agree only with rho "
                            f"{fmt(entry['ceiling'])}; this target is too noisy to rank mixtures at this scale "
                            "(more items, a continuous metric, or longer mixture runs)")
        (proxy, proxy_se), (interp, _) = predictors["merge"], predictors["interpolation"]
        for i, row in enumerate(rows):
            row["proxy"][t.name] = round(float(proxy[i]), 6)
            row["proxy_se"][t.name] = round(float(proxy_se[i]), 6)
            row["truth"][t.name] = round(float(seeds[i].mean()), 6)
            row["truth_se"][t.name] = round(float(truth_se[i]), 6)
            row["interpolation"][t.name] = round(float(interp[i]), 6)
            for s in range(seeds.shape[1]):
                row["truth_seeds"][s][t.name] = round(float(seeds[i, s]), 6)
    merge, interp_a = per_target["objective"]["merge"], per_target["objective"]["interpolation"]
    if (merge["spearman"] or 0) < (interp_a["spearman"] or 0):
        warnings.append(f"objective: interpolating the experts' own scores ranks the real mixtures better "
                        f"(rho {fmt(interp_a['spearman'])}) than merging them ({fmt(merge['spearman'])})")
    return rows, per_target


def _compute(ws: Workspace, experts: list[Expert], proposed: ProposalWithSearch,
             runs: list[list[dict[str, Any]]]) -> dict[str, float]:
    """Tokens and FLOPs of the proposal (experts + its merge evaluations) against the mixture runs (training
    + one evaluation each). The report's own proxy evaluations and interference passes are in neither."""
    return accounting(
        n_params=param_count(ws.model),
        expert_tokens=sum(int(e.manifest["tokens"]) for e in experts),
        proposal_evaluations=proposed.proposal.n_trials,
        mixture_tokens=sum(int(run["tokens"]) for mix_runs in runs for run in mix_runs),
        mixture_evaluations=sum(len(mix_runs) for mix_runs in runs),
        eval_tokens=tokens_per_evaluation(ws.model, proposed.evaluator),
    )
