"""A scoring session: the run's experts merged in place on its model at any mixture, and scored.

`scoring_session` opens one for a search and what follows it (the proposal's margins, the report's merged
proxies). Under a multi-process launch the model is sharded (mergemix.collective) and the main process's
session leads: every merge and evaluation it makes is made by the other processes with it, in step.
"""

from __future__ import annotations

import logging
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
    tell,
)
from mergemix.evaluate import EvalContext, Evaluator, Items
from mergemix.evaluate.differentiable import GradientObjective
from mergemix.merge import InPlaceMerger
from mergemix.merge.lazy import checkpoint_state
from mergemix.merge.replay import merge_weights, replay_matrix
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
        """The merge weights of mixture `alpha`, in the merger's order of experts."""
        return merge_weights(self.replay, [alpha[d] for d in self.names])

    def _merge(self, method: str, alpha: dict[str, float]) -> None:
        if self.leads:
            tell(method, alpha)
        self.merger.apply(self.weights(alpha))

    def close(self) -> None:
        """The model is the base again, and the merger's copies are freed (`InPlaceMerger.close`)."""
        self.merger.close()

    def differentiable(self) -> GradientObjective:
        """The objective as a function differentiable in the mixture α (strategy gradient)."""
        if self.replay is None:
            return GradientObjective(self.evaluator.benchmarks, self.model, self.merger.merged_state)
        m = self.replay

        def merged_state(alpha: torch.Tensor) -> dict[str, torch.Tensor]:
            return self.merger.merged_state(m.to(alpha) @ alpha)

        return GradientObjective(self.evaluator.benchmarks, self.model, merged_state)


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
    return ScoringSession(evaluator(ws), merger, ws.model, recipe.domain_names, replay=replay_of(ws))


@contextmanager
def scoring_session(ws: Workspace, experts: Sequence[Expert]) -> Iterator[ScoringSession | None]:
    """A scoring session of `experts` for the body; afterwards the model is the base again and the session
    is closed (its merger's copies freed), so what follows (mixture runs) has the memory.

    Under a multi-process launch every process enters: the model is sharded with FSDP2 and each process's
    merger holds its shard. The main process gets the session, which leads (each merge and evaluation it makes
    is sent to the others first); the others follow it, making the same merges in step, until its body ends,
    and get None. Then every process reads the whole base again for what follows (mixture runs train from
    it; the sharded model equals it)."""
    if processes() == 1:
        session = open_scoring(ws, experts)
        try:
            yield session
        finally:
            session.close()
        return
    shard_model(ws.model)
    session = open_scoring(ws, experts)
    session.share = launch_share()
    if is_main_process():
        session.leads = True
        with leading():
            yield session
    else:
        follow(session)
        yield None
    session.close()  # the sharded merger's copies, before the whole base is read
    log.info("the search is done: reading the whole base again for the stages that follow")
    ws.reload_model()
