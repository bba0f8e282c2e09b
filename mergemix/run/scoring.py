"""A scoring session: the run's experts merged in place on its model at any mixture, and scored.

`scoring_session` opens one for a search and what follows it (the proposal's margins, the report's merged
proxies). Under a multi-process launch the main process's session leads: every merge, evaluation and gradient
step it makes is made by the other processes with it, in step (mergemix.collective), each scoring its share of
the items. The model is either sharded (FSDP2: each process holds 1/N of base and task vectors) or, where the
whole merger fits every process, kept whole (data-parallel: no collective forward passes). The gradient
strategy runs either way, its gradients in α summed over the processes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mergemix.collective import (
    Share,
    follow,
    is_main_process,
    launch_share,
    leading,
    processes,
    shard_model,
    shard_rows,
    tell,
)
from mergemix.evaluate import EvalContext, Evaluator, Items, Objective
from mergemix.evaluate.differentiable import GradientObjective
from mergemix.merge import InPlaceMerger
from mergemix.merge.lazy import checkpoint_state
from mergemix.merge.repetition import discounted
from mergemix.merge.replay import merge_weights, replay_matrix
from mergemix.model.sharded import is_sharded
from mergemix.model.train import AUTOCAST
from mergemix.run.experts import Expert, general_probs, replay_share
from mergemix.run.workspace import Workspace, scoring_precision

log = logging.getLogger(__name__)


@dataclass
class ScoringSession:
    """The run's benchmarks and an in-place merger of its experts on its model: what scores a mixture."""

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
    # a launch's collective session: this process's share of every benchmark's items (None: all of them)
    share: Share | None = None
    sharded: bool = False  # the model is sharded over the launch's processes (FSDP2)
    # search.repetition discount: (budget in tokens, available tokens per domain in `names` order, R*); None: off
    repetition: tuple[float, torch.Tensor, float] | None = None
    _estimate: GradientObjective | None = None  # this process's differentiable objective (strategy gradient)

    def evaluate_alpha(self, alpha: dict[str, float]) -> dict[str, dict[str, float]]:
        """Merge the experts for mixture `alpha` (domain → share; at its merge weights, `replay`) into the model
        and score it."""
        self._merge("evaluate_alpha", alpha)
        return self.evaluator(self.model, self.share)

    def items_at(self, alpha: dict[str, float]) -> Items:
        """Merge for mixture `alpha` and score it item by item (`Evaluator.items`)."""
        self._merge("items_at", alpha)
        return self.evaluator.items(self.model, self.share)

    def weights(self, alpha: dict[str, float]) -> list[float]:
        """The merge weights of mixture `alpha`, in the merger's order of experts (discounted for repetition
        first, with search.repetition)."""
        shares = [alpha[d] for d in self.names]
        if self.repetition is not None:
            shares = self._discount(torch.tensor(shares, dtype=torch.float64)).tolist()
        return merge_weights(self.replay, shares)

    def at_budget(self, tokens: float) -> None:
        """Count repetition at a budget of `tokens` from now on (the report's proxies: the runs' budget)."""
        if self.leads:
            tell("at_budget", tokens)
        if self.repetition is not None:
            self.repetition = (float(tokens), *self.repetition[1:])

    def _discount(self, alpha: torch.Tensor) -> torch.Tensor:
        assert self.repetition is not None
        budget, available, r_star = self.repetition
        return discounted(alpha, budget, available.to(alpha), r_star)

    def _merge(self, method: str, alpha: dict[str, float]) -> None:
        if self.leads:
            tell(method, alpha)
        self.merger.apply(self.weights(alpha))

    def close(self) -> None:
        """The model is the base again, and the merger's copies are freed (`InPlaceMerger.close`)."""
        self.merger.close()

    def differentiable(self) -> GradientObjective | CollectiveGradient:
        """The objective as a function differentiable in the mixture α (strategy gradient); under a launch,
        summed over the processes' shares of the items."""
        return self.estimate() if self.share is None else CollectiveGradient(self)

    def estimate(self) -> GradientObjective:
        """This process's differentiable objective, built once."""
        if self._estimate is None:
            m = self.replay

            def merged_state(alpha: torch.Tensor) -> dict[str, torch.Tensor]:
                shares = alpha if self.repetition is None else self._discount(alpha)
                return self.merger.merged_state(shares if m is None else m.to(shares) @ shares)

            plain = m is None and self.repetition is None
            self._estimate = GradientObjective(self.evaluator.benchmarks, self.model,
                                               self.merger.merged_state if plain else merged_state)
        return self._estimate

    def prepare_gradient(self, objective: Objective) -> dict[str, float]:
        return self.estimate().prepare(objective)

    def gradient_at(self, step: GradientStep) -> tuple[float, list[float], torch.Tensor]:
        """This process's part of the estimate at α and its gradient, summed over the processes (all-reduce):
        (the whole estimate, its gradient in α, the generator's state after the draws)."""
        alpha_values, batch, state = step
        alpha = torch.tensor(alpha_values, dtype=torch.float32, requires_grad=True)
        generator = torch.Generator()
        generator.set_state(state)
        with torch.enable_grad():
            if self.sharded:
                part = self._sharded_part(alpha, batch, generator)
            else:
                part = self.estimate()(alpha, batch, generator, self.share)
                if part.requires_grad:
                    part.backward()
        grad = alpha.grad if alpha.grad is not None else torch.zeros_like(alpha)
        # on the model's device: the process group of a GPU launch (NCCL) reduces GPU tensors only
        total = torch.cat([part.detach().reshape(1).double().cpu(), grad.double().cpu()])
        total = total.to(next(self.model.parameters()).device)
        torch.distributed.all_reduce(total)
        return total[0].item(), total[1:].tolist(), generator.get_state()


    def _sharded_part(self, alpha: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
        """This process's part of the estimate at `alpha` on a sharded model, its gradient in α left in
        `alpha.grad`. No process holds Θ(α) whole to differentiate through, so the chain rule is taken in two
        steps: the model is merged at α in place (each process its rows) and back-propagated as in sharded
        training (FSDP2 reduce-scatters the gradients, every process's forward passes in step: `in_step`),
        which leaves each process the gradient g of the whole estimate on its rows of Θ; then dα = the
        gradient in α of Σ ⟨g, Θ(α)⟩ over its rows (`merged_state`, so replay, repetition and the merge
        method are differentiated as in one process), summed over the processes by the caller."""
        estimate = self.estimate()
        self.merger.apply(self.weights(dict(zip(self.names, alpha.tolist(), strict=True))))
        params = dict(self.model.named_parameters())
        flags = {n: p.requires_grad for n, p in params.items()}
        device = next(iter(params.values())).device
        try:
            for p in params.values():
                p.requires_grad_(True)
                p.grad = None
            with self.evaluator.precision(self.model):  # as the model is scored (and gathered: shard_model)
                part = estimate.value(lambda ids: self.model(input_ids=ids.to(device)).logits, batch, generator,
                                      self.share, in_step=True)
            part.backward()
            # FSDP2 reduce-scatters the mean over the processes; the parts add up to the estimate: × N
            world = torch.distributed.get_world_size()
            grads = {n: shard_rows(p.grad)[0] for n, p in params.items() if p.grad is not None}
            rows = estimate.merged_state(alpha)
            inner = sum(((rows[n] * g.to(rows[n].dtype)).sum() for n, g in grads.items() if n in rows),
                        torch.zeros(()))
            (world * inner).backward()
        finally:
            for n, p in params.items():
                p.grad = None
                p.requires_grad_(flags[n])
        return part.detach()


GradientStep = tuple[list[float], int, torch.Tensor]  # α, items drawn per benchmark, the generator's state


class CollectiveGradient:
    """The gradient strategy's objective under a launch, called on the main process: each call
    is made by every process (`tell`, `follow`), each estimating on its share of the same drawn items, and
    the values and gradients are summed (all-reduce). Its result is a tensor whose value is the sum and
    whose gradient in α is the summed gradient, so the strategy's Adam step runs as in one process."""

    def __init__(self, session: ScoringSession) -> None:
        self.session = session
        self.model = session.model

    def prepare(self, objective: Objective) -> dict[str, float]:
        tell("prepare_gradient", objective)
        return self.session.prepare_gradient(objective)

    def __call__(self, alpha: torch.Tensor, batch: int, generator: torch.Generator) -> torch.Tensor:
        step = (alpha.detach().tolist(), batch, generator.get_state())
        tell("gradient_at", step)
        value, grad, state = self.session.gradient_at(step)
        generator.set_state(state)  # as far on as the draws took the processes' generators
        linear = (alpha * torch.tensor(grad, dtype=alpha.dtype)).sum()
        return linear - linear.detach() + value


def replay_of(ws: Workspace) -> torch.Tensor | None:
    """The workspace's `replay_matrix`: its experts' replayed share and the general data's proportions (the
    domains' token proportions, or experts.replay_proportions for experts trained elsewhere)."""
    spec, names = ws.recipe.experts, ws.recipe.domain_names
    given = spec.replay_proportions
    probs = tuple(given[d] / sum(given.values()) for d in names) if given else general_probs(ws.blocks, names)
    return replay_matrix(replay_share(spec), probs)


def evaluator(ws: Workspace) -> Evaluator:
    """The workspace's benchmarks on its tokenizer, held-out pools and data."""
    r = ws.recipe
    ctx = EvalContext(ws.tokenizer, r.data.seq_len, {n: b.blocks["heldout"] for n, b in ws.blocks.items()},
                      ws.cache_dir, r.evaluation.batch_size, r.seed, AUTOCAST.get(scoring_precision(r)))
    return Evaluator(r.evaluation.benchmarks, ctx, ws.benchmark_data)


def open_scoring(ws: Workspace, experts: Sequence[Expert]) -> ScoringSession:
    """A session of `experts` merged on the workspace's model. With merge.stream the merger reads Θ_base from
    the base checkpoint's own files instead of keeping a copy."""
    recipe = ws.recipe
    base_files = checkpoint_state(ws.base_path) if recipe.merge.stream else None
    merger = InPlaceMerger(ws.model, {e.domain: e.state() for e in experts}, recipe.merge, recipe.seed, base_files)
    repetition = None
    if recipe.search.repetition == "discount":
        available = torch.tensor([float(ws.available[d]) for d in recipe.domain_names], dtype=torch.float64)
        repetition = (float(recipe.mixture.total_tokens), available, recipe.search.repetition_r_star)
    return ScoringSession(evaluator(ws), merger, ws.model, recipe.domain_names, replay=replay_of(ws),
                          repetition=repetition)


@contextmanager
def scoring_session(ws: Workspace, experts: Sequence[Expert]) -> Iterator[ScoringSession | None]:
    """A scoring session of `experts` for the body; afterwards the model is the base again and the session
    is closed (its merger's copies freed), so what follows (mixture runs) has the memory.

    Under a multi-process launch every process enters: in a sharded search the model is sharded with FSDP2
    (under an FSDP launch it is already) and each process's merger holds its shard; in a data-parallel one each
    process holds it whole (under an FSDP launch it reads the whole base for the search). The main process gets
    the session, which leads (each merge and evaluation it makes is sent to the others first); the others
    follow it, making the same merges in step, until its body ends, and get None. Afterwards the model is the
    base again as the stages that follow take it: whole, or sharded under an FSDP launch (read again where the
    search held it the other way)."""
    if processes() == 1:
        session = open_scoring(ws, experts)
        try:
            yield session
        finally:
            session.close()
        return
    sharded = launch_mode(ws, len(experts)) == "sharded"
    fsdp = is_sharded(ws.model)
    if sharded and not fsdp:
        shard_model(ws.model)
    if fsdp and not sharded:
        ws.reload_model(whole=True)
    session = open_scoring(ws, experts)
    session.share, session.sharded = launch_share(), sharded
    if is_main_process():
        session.leads = True
        with leading():
            yield session
    else:
        follow(session)
        yield None
    session.close()  # the merger's copies, before the base is read again
    if sharded != fsdp:
        log.info("the search is done: reading the %s base again for the stages that follow",
                 "sharded" if fsdp else "whole")
        ws.reload_model()


def launch_mode(ws: Workspace, k: int) -> str:
    """search.launch, with auto resolved: data_parallel where every process can hold the whole merger (a copy
    of the base and K task vectors) and the descent's parameters and gradients beside its model, the
    device's free memory shared by the processes on it; else sharded. The choice is logged."""
    if ws.recipe.search.launch != "auto":
        log.info("search under a launch of %d processes: %s (search.launch)", processes(), ws.recipe.search.launch)
        return ws.recipe.search.launch
    params = list(ws.model.parameters())
    size = sum(p.numel() for p in params)
    need = size * (params[0].element_size() * (k + 1) + 8)
    device = params[0].device
    sharing = 1 if device.type == "cuda" else int(os.environ.get("LOCAL_WORLD_SIZE", processes()))
    free = free_memory(device) / sharing
    mode = "data_parallel" if need < 0.8 * free else "sharded"
    log.info("search under a launch of %d processes: %s (the whole merger needs %.1f GiB a process, %.1f GiB "
             "free)", processes(), mode, need / 2**30, free / 2**30)
    return mode


def free_memory(device: torch.device) -> int:
    """Bytes free on `device` now: the GPU's free memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    import psutil

    return int(psutil.virtual_memory().available)
