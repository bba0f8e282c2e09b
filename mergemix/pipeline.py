"""`propose`: the whole MergeMix pipeline, stage by stage, each stage reusing what is already on disk.

data → base → packed blocks → experts → in-place merger → search → mixture → proposal.json
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mergemix.artifacts import ensure_dir, stable_hash, write_json, write_text
from mergemix.bases import BaseSource, resolve_base
from mergemix.collective import follow, leading, processes, shard_model, tell
from mergemix.data.prepare import DomainBlocks, DomainDocs, load_domain, pack_domain
from mergemix.errors import MergemixError
from mergemix.evaluate import Evaluator, Items, read_benchmarks
from mergemix.evaluate.differentiable import DIFFERENTIABLE, GradientObjective
from mergemix.experts import Expert, general_probs, precision_key, replay_share, train_experts
from mergemix.merge import InPlaceMerger
from mergemix.merge.lazy import checkpoint_state
from mergemix.merge.replay import merge_weights, replay_matrix
from mergemix.mixture import available_tokens, check_cap, to_mixture
from mergemix.modeling import build_demo_base, check_checkpoint_dir, fingerprint, load_base, max_positions
from mergemix.progress import progress
from mergemix.proposal import Margin, Proposal, Scored, Signal
from mergemix.recipe import Recipe, dump_recipe
from mergemix.search import SearchResult, Trial
from mergemix.search.feasible import Bounds
from mergemix.search.hierarchy import level_of, run_hierarchical
from mergemix.train import process_state

log = logging.getLogger(__name__)


@dataclass
class Timings:
    """Wall-clock seconds per stage, written to timings.json (kept out of proposal.json, which must be
    identical for identical inputs)."""

    stages: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        log.info("stage %s ...", name)
        start = time.perf_counter()
        yield
        self.stages[name] = round(time.perf_counter() - start, 2)
        log.info("stage %s done in %.1f s", name, self.stages[name])


@dataclass
class Workspace:
    """What the stages hand each other in memory (each is also on disk or in the cache)."""

    recipe: Recipe
    run_dir: Path
    cache_dir: Path
    timings: Timings
    docs: dict[str, DomainDocs] = field(default_factory=dict)
    base_path: Path | None = None
    base_source: BaseSource | None = None  # what base.path named (a directory, a GGUF file, the demo base)
    base_hash: str = ""
    model: torch.nn.Module | None = None
    tokenizer: object = None
    blocks: dict[str, DomainBlocks] = field(default_factory=dict)
    available: dict[str, int] = field(default_factory=dict)  # tokens the team has per domain (mixture bounds)
    experts: list[Expert] = field(default_factory=list)
    benchmark_data: dict[str, Any] = field(default_factory=dict)


def is_main_process() -> bool:
    """True in a plain run and in the main process (rank 0) of a multi-process launch."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def _main_process_first(device: str) -> Iterator[None]:
    """Run the body on the main process first, then on the others (which then find its caches written)."""
    if processes() == 1:
        yield
        return
    with process_state(device).main_process_first():
        yield


def _setup(recipe: Recipe) -> Workspace:
    if recipe.threads:
        torch.set_num_threads(recipe.threads)
    torch.manual_seed(recipe.seed)
    run_dir = ensure_dir(recipe.resolved_run_dir(), "run_dir")
    cache_dir = ensure_dir(recipe.resolved_cache_dir(), "cache_dir")
    if is_main_process():
        write_text(run_dir / "recipe.resolved.yaml", dump_recipe(recipe))
    return Workspace(recipe, run_dir, cache_dir, Timings())


def prepare_base_and_data(ws: Workspace) -> None:
    """Read and split the domains, get the base (local or demo, built once), pack every domain."""
    r = ws.recipe
    if r.base.path:  # before minutes of reading data; a GGUF file is converted once, by the main process
        with _main_process_first(r.device):
            ws.base_path, ws.base_source = resolve_base(r.base.path, ws.cache_dir)
        check_checkpoint_dir(ws.base_path)
    with ws.timings.stage("data"), _main_process_first(r.device):
        ws.benchmark_data = read_benchmarks(r, ws.cache_dir)  # small files: fail fast
        ws.docs = {d.name: load_domain(d, r.data.split, r.seed, ws.cache_dir)
                   for d in progress(r.data.domains, desc="read domains", leave=False)}
    with ws.timings.stage("base"):
        if not r.base.path:
            ws.base_source = BaseSource(path=None, format="demo")
            pools = {n: d.pools["base"] for n, d in ws.docs.items()}
            ws.base_path = build_demo_base(r.base.demo, pools, r.data.seq_len, r.seed, ws.cache_dir, r.device)
        _load_model(ws)
        assert ws.model is not None
        limit = max_positions(ws.model)
        if limit is not None and r.data.seq_len > limit:
            raise MergemixError(f"data.seq_len: {r.data.seq_len} is longer than the base's context of {limit} "
                                "tokens; lower data.seq_len")
        ws.base_hash = stable_hash([fingerprint(ws.base_path), r.base.dtype])
    with ws.timings.stage("pack"), _main_process_first(r.device):
        ws.blocks = {n: pack_domain(d, ws.tokenizer, r.data.seq_len, ws.cache_dir) for n, d in ws.docs.items()}
    ws.available = available_tokens(r, {n: b.n_tokens for n, b in ws.blocks.items()})
    # The first moment every domain's token count is known: refuse an impossible cap before any expert.
    check_cap(r.mixture, ws.available)


def _load_model(ws: Workspace) -> None:
    """The base model and tokenizer from the base's checkpoint, the model on the run's device."""
    assert ws.base_path is not None
    ws.model, ws.tokenizer = load_base(ws.base_path, ws.recipe.base)
    if ws.recipe.device == "auto" and torch.cuda.is_available():
        ws.model.to("cuda")


def benchmark_key(recipe: Recipe, ws: Workspace) -> str:
    """What a model's raw scores depend on besides the model: each benchmark's data and scoring fields.
    Objective weights, capability groups, metric choice and ceiling are left out: they are recomputed from
    the raw scores, so re-weighting an objective re-uses every evaluation already made."""
    benches = [
        [b.model_dump(mode="json", exclude={"metric", "capability", "ceiling", "allow_test_split"}),
         stable_hash(ws.benchmark_data[b.name])]
        for b in recipe.evaluation.benchmarks
    ]
    return stable_hash([recipe.data.seq_len, benches])


def evaluation_key(recipe: Recipe, ws: Workspace) -> str:
    """What raw trial scores depend on: the experts, the merge method, the benchmarks and, with replay, that
    an α is a mixture (its merge weights mapped by `replay_of`; before, α was the merge weights)."""
    share = replay_share(recipe.experts)
    return stable_hash([[e.key for e in ws.experts], recipe.merge.key(), benchmark_key(recipe, ws),
                        *([["replay weights", share]] if share > 0 else [])])


def _signal(result: SearchResult, recipe: Recipe) -> list[Signal]:
    """Each benchmark's spread over base + experts beside its item noise, as the objective judged it before
    the search (low-signal benchmarks flagged, with the weight they got)."""
    experts = [t for t in result.trials if t.kind == "vertex"]
    rows = []
    for b in recipe.evaluation.benchmarks:
        m = b.objective_metric
        values = [t.raw[b.name][m] for t in experts]
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
    searches' proposals scored 0.05 and 0.11 trained for real (README, "Leaving a domain out")."""
    absent = [d for d, hi in zip(bounds.domains, bounds.hi, strict=True) if alpha[d] < floor <= hi]
    if not absent:
        return None
    return (f"alpha* leaves out {', '.join(absent)} (below {floor:.0%}): a merge of short experts cannot show "
            "what a run without them forgets, and such runs collapsed on the ledger testbed (README). Unless you "
            f"mean to drop them, keep a floor: mixture.min_share: {{{', '.join(f'{d}: {floor}' for d in absent)}}}")


def _scored(t: Trial, predicted: float | None = None) -> Scored:
    return Scored(alpha=t.alpha, objective=round(t.objective, 6),
                  capabilities={g: round(v, 6) for g, v in t.capabilities.items()},
                  predicted=None if predicted is None else round(predicted, 6))


def _margins(result: SearchResult, s: Scoring, bounds: Bounds) -> list[Margin]:
    """The guard: the proposal's objective minus uniform's and token-proportional's, with a 95% interval
    from item noise, paired item by item (the three merges are scored again for their per-item values:
    three more merges; `Objective.diff_se`), the surrogate's predicted margin, and which mixture bounds a
    baseline breaks (it could not be proposed); logs a warning when the interval reaches 0. The model is the
    base again afterwards."""
    star, objective = result.star, result.objective
    try:
        items = s.items_at(star.alpha)
        out = []
        for label, kind in (("uniform", "uniform"), ("token-proportional", "token_prior")):
            b = result.by_kind(kind)
            out.append(_margin(label, star, b, objective.diff_se(star.raw, b.raw, items, s.items_at(b.alpha)),
                               result.predicted_star, bounds.outside(b.alpha)))
    finally:
        s.merger.restore()
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


@dataclass
class Scoring:
    """The workspace's benchmarks and an in-place merger of its experts on its model: what scores a mixture."""

    evaluator: Evaluator
    merger: InPlaceMerger
    model: torch.nn.Module
    names: list[str]  # the domains, in the order of the merger's experts
    # the main process of a launch's collective search: each merge and evaluation it makes is first sent to
    # the other processes, which make it with it (mergemix.collective.follow)
    leads: bool = False
    # merge weights w = replay @ alpha of a mixture alpha when the experts replayed general data
    # (mergemix.merge.replay); None: w = alpha
    replay: torch.Tensor | None = None

    def evaluate_alpha(self, alpha: dict[str, float]) -> dict[str, dict[str, float]]:
        """Merge the experts for mixture `alpha` (domain → share; at its merge weights, `replay`) into the model
        and score it."""
        self._merge("evaluate_alpha", alpha)
        return self.evaluator(self.model)

    def items_at(self, alpha: dict[str, float]) -> Items:
        """Merge for mixture `alpha` and score it item by item (`Evaluator.items`)."""
        self._merge("items_at", alpha)
        return self.evaluator.items(self.model)

    def weights(self, alpha: dict[str, float]) -> list[float]:
        """The merge weights of mixture `alpha`, in the merger's order of experts."""
        return merge_weights(self.replay, [alpha[d] for d in self.names])

    def _merge(self, method: str, alpha: dict[str, float]) -> None:
        if self.leads:
            tell(method, alpha)
        self.merger.apply(self.weights(alpha))

    def differentiable(self) -> GradientObjective:
        """The objective as a function differentiable in the mixture α (strategy gradient)."""
        if self.replay is None:
            return GradientObjective(self.evaluator.benchmarks, self.model, self.merger.merged_state)
        m = self.replay

        def merged_state(alpha: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.merger.merged_state(m.to(alpha) @ alpha)

        return GradientObjective(self.evaluator.benchmarks, self.model, merged_state)


def replay_of(ws: Workspace) -> torch.Tensor | None:
    """The workspace's `replay_matrix`: its experts' replayed share and the domains' token proportions."""
    return replay_matrix(replay_share(ws.recipe.experts), general_probs(ws.blocks, ws.recipe.domain_names))


def merger(ws: Workspace, experts: Sequence[Expert] | None = None) -> InPlaceMerger:
    """An in-place merger of `experts` (default: the workspace's) on the workspace's model. With merge.stream
    it reads Θ_base from the base checkpoint's own files instead of keeping a copy."""
    recipe = ws.recipe
    assert ws.model is not None
    base_files = checkpoint_state(ws.base_path) if recipe.merge.stream and ws.base_path else None
    return InPlaceMerger(ws.model, {e.domain: e.state() for e in (ws.experts if experts is None else experts)},
                         recipe.merge, recipe.seed, base_files)


def scoring(ws: Workspace, experts: Sequence[Expert] | None = None) -> Scoring:
    """A `Scoring` of `experts` (default: the workspace's) on the workspace's model."""
    recipe = ws.recipe
    assert ws.model is not None
    evaluator = Evaluator(recipe, ws.tokenizer, {n: b.blocks["heldout"] for n, b in ws.blocks.items()},
                          ws.cache_dir, ws.benchmark_data)
    return Scoring(evaluator, merger(ws, experts), ws.model, recipe.domain_names, replay=replay_of(ws))


@dataclass
class Proposed:
    """What `run_proposal` leaves in memory for later stages (the report): the model is the base again."""

    proposal: Proposal
    search: SearchResult
    evaluator: Evaluator


def propose(recipe: Recipe) -> Proposal | None:
    """Run the MergeMix pipeline for `recipe` and return the proposal (also written to proposal.json in
    the run directory). Stages whose inputs are unchanged are reused; a killed run resumes.

    Under a multi-process launch every process trains the experts data-parallel, then all search together
    (mergemix.collective: each holds 1/N of base and task vectors); the main process returns the proposal,
    the others None."""
    check_launch(recipe)
    ws = start(recipe, distributed=True)
    proposed = run_proposal(ws)
    return proposed.proposal if proposed else None


def train_experts_only(recipe: Recipe, domains: Sequence[str] | None = None) -> list[Expert]:
    """Train (or reuse) the experts of `domains` (default: all) and stop: one job per expert on its own GPU,
    node or scheduler slot; a later `propose` reuses every finished one."""
    unknown = [d for d in domains or [] if d not in recipe.domain_names]
    if unknown:
        raise MergemixError(f"--domain: no domain {unknown[0]!r} in the recipe (domains: "
                            f"{', '.join(recipe.domain_names)})")
    ws = start(recipe, distributed=True)
    _experts(ws, train=True, domains=domains)
    return ws.experts


def check_launch(recipe: Recipe) -> None:
    """What a multi-process launch cannot search, refused in one line before anything trains:
    `search.verify_real` trains its runs inside the search, on the main process alone, where the other
    processes cannot join them; the gradient strategy differentiates through the whole merged weights, which
    no process holds in a launch's sharded search."""
    n = processes()
    if n > 1 and recipe.search.verify_real:
        raise MergemixError(f"search.verify_real: its real runs train inside the search, on the main process "
                            f"alone, which a launch of {n} processes cannot do yet; set search.verify_real "
                            "0 for the launch, or run as one process")
    if n > 1 and recipe.search.strategy == "gradient":
        raise MergemixError(f"search.strategy: gradient needs the whole merged model on one process, and a launch "
                            f"of {n} processes searches a sharded one; choose another strategy for the launch, or "
                            "run as one process")


def start(recipe: Recipe, distributed: bool = False) -> Workspace:
    """Set up the run directory and bring base, data and benchmarks into memory. Commands that cannot run
    under a multi-process launch yet leave `distributed` False and are refused in one line."""
    n = processes()
    if n > 1 and not distributed:
        raise MergemixError(f"this command runs as one process, got {n} (accelerate launch, torchrun); "
                            "only propose, experts and report run multi-process: start it with python -m mergemix")
    precision_key(recipe)  # a precision this device cannot train in fails here, before any training
    ws = _setup(recipe)
    prepare_base_and_data(ws)
    return ws


def search(recipe: Recipe, strategy: str | None = None, worker: bool = False) -> Proposed | SearchResult:
    """Only the search, over the experts a `propose` run left in the run directory (none is trained). With
    `worker`, add trials to the shared study and return the search result without writing proposal.json."""
    ws = start(recipe)
    if worker:
        _experts(ws, train=False)
        return _search(ws, scoring(ws), strategy)[0]
    proposed = run_proposal(ws, strategy, train=False)
    assert proposed is not None  # one process: it is the main one
    return proposed


def _search(ws: Workspace, s: Scoring, strategy: str | None) -> tuple[SearchResult, Bounds, str]:
    """Search over the workspace's experts, scored by `s`: the trials' result, the bounds and the strategy
    that searched (`strategy`, else search.strategy; `auto` chosen by `choose_strategy`)."""
    recipe = ws.recipe
    with ws.timings.stage("search"):
        names = recipe.domain_names
        prior = np.array(general_probs(ws.blocks, names))
        bounds = recipe.mixture.bounds(names, ws.available)
        name = strategy or recipe.search.strategy
        if name == "auto":
            name = choose_strategy(ws, level_of(recipe, bounds, prior) is not None)
        result = run_hierarchical(recipe, s.evaluate_alpha, prior, ws.run_dir / "trials.jsonl",
                                  evaluation_key(recipe, ws), bounds, name,
                                  None if s.leads else s.differentiable())
        s.merger.restore()
    return result, bounds, name


def choose_strategy(ws: Workspace, staged: bool) -> str:
    """What search.strategy `auto` searches with: `gradient` where it can run, else `surface`; the choice and
    its reason are logged. Gradient is the default because its proposal trained best on both testbeds
    (README, "Rank consistency on both testbeds"); it needs the whole merged model in one process, flat
    shares (not `staged`: mixture.groups or reuse keeping ratios), every weighted benchmark differentiable
    (perplexity, multiple_choice: the descent would leave the others out), and memory beside the merger for
    the merged parameters and their gradients (fp32, plus a cast copy for a model below it)."""
    recipe, why = ws.recipe, None
    assert ws.model is not None
    weighted = [b for b in recipe.evaluation.benchmarks if recipe.evaluation.weight(b.capability) > 0]
    flat = [b.name for b in weighted if b.kind not in DIFFERENTIABLE]
    if processes() > 1:
        why = f"a launch of {processes()} processes searches a sharded model"
    elif staged:
        why = "the search is staged (mixture.groups or mixture.reuse), and gradient searches flat shares"
    elif flat:
        why = f"{', '.join(flat)}: no gradient, so the descent would leave them out"
    else:
        params = list(ws.model.parameters())
        need = sum(p.numel() * (8 + (p.element_size() if p.element_size() < 4 else 0)) for p in params)
        free = free_memory(params[0].device)
        if need > free:
            why = f"the descent needs {need / 2**30:.1f} GiB beside the merger, {free / 2**30:.1f} GiB is free"
    chosen = "surface" if why else "gradient"
    log.info("search.strategy auto: %s%s", chosen, f" ({why})" if why else "")
    return chosen


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return int(psutil.virtual_memory().available)


Then = Callable[[Proposed, Scoring], None]


def _collective(ws: Workspace, strategy: str | None, then: Then | None) -> Proposed | None:
    """`_propose` under a multi-process launch, made by every process together (mergemix.collective): the
    model is sharded with FSDP2 and each process's merger holds its shard; the main process proposes (and
    runs `then`), sending each merge and evaluation it makes to the others, which make them in step until it
    is done. Then every process reads the whole base again for what follows (the report's mixture runs train
    from it; the sharded model equals it)."""
    assert ws.model is not None
    shard_model(ws.model)
    s = scoring(ws)
    proposed = None
    if is_main_process():
        s.leads = True
        with leading():
            proposed = _propose(ws, s, strategy, then)
    else:
        follow(s)
    del s  # the sharded merger, before the whole base is read
    log.info("the search is done: reading the whole base again for the stages that follow")
    ws.model = None
    _load_model(ws)
    return proposed


def _experts(ws: Workspace, train: bool, domains: Sequence[str] | None = None) -> None:
    """Train or reuse the experts of `domains` (default: all; with `train` False, only reuse: a missing one
    is an error)."""
    assert ws.model is not None and ws.base_path is not None
    with ws.timings.stage("experts"):
        ws.experts = train_experts(ws.recipe, ws.model, ws.base_hash, ws.blocks, ws.run_dir, tokenizer=ws.tokenizer,
                                   domains=domains, reuse_only=not train)


def run_proposal(ws: Workspace, strategy: str | None = None, train: bool = True,
                 then: Then | None = None) -> Proposed | None:
    """Experts → search → mixture → proposal.json, on a workspace from `start`. `strategy` overrides
    search.strategy; without `train` the experts must already be in the run directory. `then(proposed, s)`
    runs on the main process after the proposal, while `s` can still merge and score mixtures (the report's
    merged proxies). Under a multi-process launch every process searches (`_collective`); the main process
    returns what it proposed, the others None. The model is the base again afterwards."""
    _experts(ws, train)
    if processes() > 1:
        return _collective(ws, strategy, then)
    return _propose(ws, scoring(ws), strategy, then)


def _propose(ws: Workspace, s: Scoring, strategy: str | None, then: Then | None = None) -> Proposed:
    """Search → mixture → proposal.json over the workspace's experts, scored by `s`; then `then`."""
    recipe = ws.recipe
    names = recipe.domain_names
    result, bounds, strategy = _search(ws, s, strategy)
    real = None
    if recipe.search.verify_real:
        from mergemix.verify_real import verify_real

        with ws.timings.stage("verify_real"):
            star, real = verify_real(ws, result, bounds, s.evaluator)
        result = replace(result, star=star, predicted_star=star.predicted)
    if warning := left_out(result.star.alpha, bounds):
        log.warning(warning)
    with ws.timings.stage("mixture"):
        shares = to_mixture(result.star.alpha, ws.available, recipe.mixture)
        vertices = [t for t in result.trials if t.kind == "vertex"]
        best_expert = max(vertices, key=lambda t: t.objective)
        units = recipe.mixture.units(names)
        groups = units if len(units) < len(names) else {}
        proposal = Proposal(
            name=recipe.name,
            seed=recipe.seed,
            base=ws.base_source.record() if ws.base_source else {},
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
            signal=_signal(result, recipe),
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
            margins=_margins(result, s, bounds),
            verify_real=real,
            merge_weights={} if s.replay is None else {
                d: round(w, 6) for d, w in zip(s.names, s.weights(result.star.alpha), strict=True)},
        )
        write_json(ws.run_dir / "proposal.json", proposal.model_dump(mode="json"))
    write_json(ws.run_dir / "timings.json", ws.timings.stages)
    log.info("timings (s): %s", ", ".join(f"{k} {v}" for k, v in ws.timings.stages.items()))
    proposed = Proposed(proposal, result, s.evaluator)
    if then is not None:
        then(proposed, s)
    return proposed
