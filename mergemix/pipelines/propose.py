"""`propose`: the whole MergeMix pipeline, stage by stage, each stage reusing what is already on disk.

workspace (data → base → packed blocks) → experts → scoring session → search → mixture → proposal.json
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from mergemix.artifacts import read_json, stable_hash, write_json
from mergemix.catalog import DIFFERENTIABLE, STRATEGIES
from mergemix.collective import processes
from mergemix.errors import MergemixError
from mergemix.evaluate import Evaluator, Objective
from mergemix.feasible import Bounds
from mergemix.proposal import Margin, Proposal, Scored, Signal
from mergemix.recipe import EvalSpec, MixtureSpec, Recipe
from mergemix.run.experts import Expert, general_probs, train_experts
from mergemix.run.scoring import ScoringSession, free_memory, scoring_session
from mergemix.run.workspace import Workspace, evaluation_key, open_workspace
from mergemix.search.driver import Problem
from mergemix.search.hierarchy import search_mixtures
from mergemix.search.levels import level_of
from mergemix.search.mixture import to_mixture
from mergemix.search.trials import SearchResult, Trial, vertices

log = logging.getLogger(__name__)


@dataclass
class ProposalWithSearch:
    """A proposal and what it came from, in memory for later stages (the report): the experts, the search's
    trials and objective, and the evaluator that scored them."""

    proposal: Proposal
    experts: list[Expert]
    search: SearchResult
    evaluator: Evaluator


def propose(recipe: Recipe) -> Proposal | None:
    """Run the MergeMix pipeline for `recipe` and return the proposal (also written to proposal.json in
    the run directory). Stages whose inputs are unchanged are reused; a killed run resumes.

    Under a multi-process launch every process trains the experts data-parallel, then all search together
    (mergemix.collective: each holds 1/N of base and task vectors); the main process returns the proposal,
    the others None."""
    check_launch(recipe)
    done = propose_on(open_workspace(recipe, distributed=True))
    return done.proposal if done else None


def propose_on(ws: Workspace, train: bool = True, strategy: str | None = None,
               on_trial: Callable[[Trial], None] | None = None) -> ProposalWithSearch | None:
    """Experts → search → mixture → proposal.json on the workspace `ws`. `strategy` overrides search.strategy;
    without `train` the experts must already be in the run directory. Under a launch every process takes
    part and the main process returns the result, the others None. The model is the base again afterwards.
    `on_trial` sees every trial of the search as it is finished."""
    experts = expert_stage(ws, train)
    with scoring_session(ws, experts) as session:
        return search_and_propose(ws, experts, session, strategy, on_trial) if session else None


def check_launch(recipe: Recipe) -> None:
    """What a multi-process launch cannot search, refused in one line before anything trains:
    `search.verify_real` trains its runs inside the search, on the main process alone, where the other
    processes cannot join them."""
    n = processes()
    if n > 1 and recipe.search.verify_real:
        raise MergemixError(f"search.verify_real: its real runs train inside the search, on the main process "
                            f"alone, which a launch of {n} processes cannot do yet; set search.verify_real "
                            "0 for the launch, or run as one process")


def expert_stage(ws: Workspace, train: bool, domains: Sequence[str] | None = None) -> list[Expert]:
    """Train or reuse the experts of `domains` (default: all; with `train` False, only reuse: a missing one
    is an error)."""
    with ws.timings.stage("experts"):
        return train_experts(ws.recipe, ws.model, ws.base_hash, ws.blocks, ws.run_dir, tokenizer=ws.tokenizer,
                             domains=domains, reuse_only=not train)


def search_problem(ws: Workspace) -> Problem:
    """The workspace's search: its domains, token prior, feasible set, objective, settings and seed."""
    r = ws.recipe
    names = r.domain_names
    return Problem(r.name, names, np.array(general_probs(ws.blocks, names)), r.mixture.bounds(names, ws.available),
                   r.evaluation, r.search, r.seed)


def search_experts(ws: Workspace, experts: Sequence[Expert], session: ScoringSession,
                   strategy: str | None = None,
                   on_trial: Callable[[Trial], None] | None = None) -> tuple[SearchResult, str]:
    """Search over `experts`, scored by `session`: the trials' result and the strategy that searched
    (`strategy`, else search.strategy; `auto` chosen by `choose_strategy`). The model is the base afterwards.

    The result is stored in search.json beside the trial log under a key of everything it depends on
    (`search_key`), and a rerun with that key reads it instead of searching: a finished proposal costs
    seconds to make again. Not for the optuna strategies, whose shared study other workers may have grown."""
    recipe = ws.recipe
    with ws.timings.stage("search"):
        problem = search_problem(ws)
        name = strategy or recipe.search.strategy
        if name == "auto":
            staged = level_of(recipe.mixture, problem.domains, problem.bounds, problem.prior) is not None
            name = choose_strategy(recipe.evaluation, ws.model, staged, session.sharded)
        eval_key = evaluation_key(ws, experts)
        key = search_key(problem, recipe.mixture, eval_key, name)
        stored = _stored_search(ws.run_dir / SEARCH_FILE, key, problem)
        if stored is not None:
            log.info("search: %s holds the result of this search (nothing it depends on changed); reusing it",
                     ws.run_dir / SEARCH_FILE)
            return stored, name
        result = search_mixtures(problem, recipe.mixture, session.evaluate_alpha, ws.run_dir / "trials.jsonl",
                                 eval_key, name, session.differentiable(), on_trial)
        session.merger.restore()
        if not STRATEGIES.get(name).shared:
            write_json(ws.run_dir / SEARCH_FILE, {"key": key, "result": result.record()})
    return result, name


SEARCH_FILE = "search.json"
SEARCH_VERSION = 1  # part of search_key: a change of what the search computes makes stored results stale


def search_key(problem: Problem, mixture: MixtureSpec, eval_key: str, strategy: str) -> str:
    """What a search's result depends on: the experts, merge and benchmarks (`eval_key`), the objective and the
    search's settings, the feasible set, the token prior, the grouping of domains, the seed and the strategy."""
    return stable_hash([SEARCH_VERSION, Objective.VERSION, eval_key, strategy, problem.domains,
                        problem.evaluation.model_dump(mode="json", exclude={"batch_size"}),
                        problem.search.model_dump(mode="json", exclude={"strategy", "verify_real"}),
                        problem.bounds.lo.tolist(), problem.bounds.hi.tolist(), problem.prior.tolist(),
                        mixture.model_dump(mode="json", include={"groups", "reuse"}), problem.seed])


def _stored_search(path: Path, key: str, problem: Problem) -> SearchResult | None:
    """The result search.json holds for `key`, or None (no file, another key, or not readable)."""
    if not path.exists():
        return None
    try:
        stored = read_json(path)
        if stored.get("key") != key:
            return None
        def objective(base: Trial, trials: list[Trial]) -> Objective:
            experts = [t.raw for t in vertices(trials)][: len(problem.domains)]
            return Objective.from_references(problem.evaluation, base.raw, experts)

        return SearchResult.restore(stored["result"], problem.domains, objective)
    except (ValueError, KeyError, TypeError) as e:
        log.warning("search: %s is unreadable (%s); searching again", path, e)
        return None


def choose_strategy(evaluation: EvalSpec, model: torch.nn.Module, staged: bool, sharded: bool = False) -> str:
    """What search.strategy `auto` searches with: `gradient` where it can run, else `surface`; the choice and
    its reason are logged. Gradient is the default because its proposal trained best on both testbeds
    (docs/fidelity.md, "Rank consistency on both testbeds"); it needs flat shares (not `staged`:
    mixture.groups or reuse keeping ratios), every weighted benchmark differentiable (perplexity,
    multiple_choice: the descent would leave the others out), and memory beside the merger for the merged
    parameters and their gradients (fp32, plus a cast copy for a model below it): in a launch's `sharded`
    search, each process's rows of them."""
    why = None
    weighted = [b for b in evaluation.benchmarks if evaluation.weight(b.capability) > 0]
    flat = [b.name for b in weighted if b.kind not in DIFFERENTIABLE]
    if staged:
        why = "the search is staged (mixture.groups or mixture.reuse), and gradient searches flat shares"
    elif flat:
        why = f"{', '.join(flat)}: no gradient, so the descent would leave them out"
    else:
        params = list(model.parameters())
        need = sum(p.numel() * (8 + (p.element_size() if p.element_size() < 4 else 0)) for p in params)
        need //= processes() if sharded else 1
        free = free_memory(params[0].device)
        if need > free:
            why = f"the descent needs {need / 2**30:.1f} GiB beside the merger, {free / 2**30:.1f} GiB is free"
    chosen = "surface" if why else "gradient"
    log.info("search.strategy auto: %s%s", chosen, f" ({why})" if why else "")
    return chosen


def search_and_propose(ws: Workspace, experts: Sequence[Expert], session: ScoringSession,
                       strategy: str | None = None,
                       on_trial: Callable[[Trial], None] | None = None) -> ProposalWithSearch:
    """Search → mixture → proposal.json over `experts`, scored by `session` (the main process's, under a
    launch). The model is the base again afterwards."""
    recipe = ws.recipe
    names = recipe.domain_names
    result, strategy = search_experts(ws, experts, session, strategy, on_trial)
    bounds = recipe.mixture.bounds(names, ws.available)
    real = None
    if recipe.search.verify_real:
        from mergemix.pipelines.verify_real import verify_real

        with ws.timings.stage("verify_real"):
            star, real = verify_real(ws, result, bounds, session.evaluator)
        result = replace(result, star=star, predicted_star=star.predicted)
    if warning := left_out(result.star.alpha, bounds):
        log.warning(warning)
    with ws.timings.stage("mixture"):
        shares = to_mixture(result.star.alpha, ws.available, recipe.mixture)
        vertices = result.vertices
        best_expert = max(vertices, key=lambda t: t.objective)
        units = recipe.mixture.units(names)
        groups = units if len(units) < len(names) else {}
        proposal = Proposal(
            name=recipe.name,
            seed=recipe.seed,
            base=ws.base_source.record(),
            domains=names,
            alpha_star=result.star.alpha,
            mixture=shares,
            total_tokens=recipe.mixture.total_tokens,
            proposal=_scored(result.star, result.predicted_star),
            baselines={
                "base": _scored(result.base),
                "uniform": _scored(result.by_kind("uniform")),
                "token_prior": _scored(result.by_kind("token_prior")),
                f"expert:{names[vertices.index(best_expert)]}": _scored(best_expert),
            },
            signal=_signal(result, recipe.evaluation),
            strategy=strategy,
            surrogate=recipe.search.surrogate,
            surrogate_prior=recipe.search.surrogate_prior,
            surrogate_loo_rmse={g: round(v, 6) for g, v in result.surrogate_loo_rmse.items()},
            n_trials=len(result.trials) + 1,
            active_bounds=bounds.active(result.star.alpha),
            groups=groups,
            group_shares={g: round(sum(result.star.alpha[d] for d in ds), 6) for g, ds in groups.items()},
            weights=result.objective.weights(),
            normalization=result.objective.references(),
            margins=_margins(result, session, bounds),
            verify_real=real,
            merge_weights={} if session.replay is None else {
                d: round(w, 6) for d, w in zip(session.names, session.weights(result.star.alpha), strict=True)},
        )
        write_json(ws.run_dir / "proposal.json", proposal.model_dump(mode="json"))
    write_json(ws.run_dir / "timings.json", ws.timings.stages)
    log.info("timings (s): %s", ", ".join(f"{k} {v}" for k, v in ws.timings.stages.items()))
    return ProposalWithSearch(proposal, list(experts), result, session.evaluator)


def _signal(result: SearchResult, evaluation: EvalSpec) -> list[Signal]:
    """Each benchmark's spread over base + experts beside its item noise, as the objective judged it before
    the search (low-signal benchmarks flagged, with the weight they got)."""
    rows = []
    for b in evaluation.benchmarks:
        m = b.objective_metric
        values = [t.raw[b.name][m] for t in result.vertices]
        noise = result.objective.noise[b.name]
        rows.append(Signal(
            benchmark=b.name, metric=m, base=round(result.base.raw[b.name][m], 5), expert_min=round(min(values), 5),
            expert_max=round(max(values), 5), spread=round(noise.spread, 5), stderr=round(noise.stderr, 5),
            low_signal=noise.low, weight=round(noise.weight, 4),
        ))
    return rows


def left_out(alpha: dict[str, float], bounds: Bounds, floor: float = 0.01) -> str | None:
    """A warning where `alpha` leaves a domain (below `floor`) out that the `bounds` let it keep. Short
    experts stay near the base, and a merge of them does not show what a full run that never sees a domain
    forgets: on the ledger testbed two proposals that did so collapsed trained for real, the worst runs there
    (all tables with 75-step experts, -0.74; all letters with replay 0.25, -0.81); with a 1% floor the same
    searches' proposals scored 0.05 and 0.11 trained for real (docs/fidelity.md, "Leaving a domain out")."""
    absent = [d for d, hi in zip(bounds.domains, bounds.hi, strict=True) if alpha[d] < floor <= hi]
    if not absent:
        return None
    return (f"alpha* leaves out {', '.join(absent)} (below {floor:.0%}): a merge of short experts cannot show "
            "what a run without them forgets, and such runs collapsed on the ledger testbed (docs/fidelity.md). "
            f"Unless you mean to drop them, keep a floor: mixture.min_share: "
            f"{{{', '.join(f'{d}: {floor}' for d in absent)}}}")


def _scored(t: Trial, predicted: float | None = None) -> Scored:
    return Scored(alpha=t.alpha, objective=round(t.objective, 6),
                  capabilities={g: round(v, 6) for g, v in t.capabilities.items()},
                  predicted=None if predicted is None else round(predicted, 6))


def _margins(result: SearchResult, session: ScoringSession, bounds: Bounds) -> list[Margin]:
    """The guard: the proposal's objective minus uniform's and token-proportional's, with a 95% interval
    from item noise, paired item by item (the three merges are scored again for their per-item values:
    three more merges; `Objective.diff_se`), the surrogate's predicted margin, and which mixture bounds a
    baseline breaks (it could not be proposed); logs a warning when the interval reaches 0. The model is the
    base again afterwards."""
    star, objective = result.star, result.objective
    try:
        items = session.items_at(star.alpha)
        out = []
        for label, kind in (("uniform", "uniform"), ("token-proportional", "token_prior")):
            b = result.by_kind(kind)
            out.append(_margin(label, star, b, objective.diff_se(star.raw, b.raw, items, session.items_at(b.alpha)),
                               result.predicted_star, bounds.outside(b.alpha)))
    finally:
        session.merger.restore()
    return out


def _margin(label: str, star: Trial, b: Trial, se: float, predicted_star: float | None,
            outside: dict[str, str]) -> Margin:
    """One baseline's margin (see `_margins`), `se` the standard error of the difference, `outside` the
    bounds the baseline breaks."""
    diff, half = star.objective - b.objective, 1.96 * se
    pred = None if predicted_star is None else round(predicted_star - b.objective, 6)
    m = Margin(baseline=label, verified=round(diff, 6), low=round(diff - half, 6), high=round(diff + half, 6),
               predicted=pred, outside=outside)
    if m.within_noise:
        log.warning("proposal - %s: %+.3f (95%% [%+.3f, %+.3f]): %s", label, m.verified, m.low, m.high, m.verdict)
    return m
