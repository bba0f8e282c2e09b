"""The pipeline by stage, for a training pipeline that calls mergemix step by step and resumes.

    run = MixtureRun(load_recipe("recipe.yaml"), on_trial=lambda t: print(t.alpha, t.objective))
    experts = run.experts()          # list[Expert]: trained, reused, or given (experts.checkpoints)
    searched = run.search()          # SearchResult: every trial, α*, the objective
    proposal = run.propose()         # Proposal: written to proposal.json
    report = run.report()            # Consistency: the rank-consistency report

Each stage reuses what the run directory holds, as the CLI does: a stage called again, or after a killed
pipeline, costs seconds (the experts' manifests, trials.jsonl, search.json). `on_trial` sees every trial of
the search as it is finished: log it to your experiment tracker.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cached_property

from mergemix.pipelines.propose import (
    ProposalWithSearch,
    check_launch,
    expert_stage,
    propose_on,
    search_experts,
)
from mergemix.proposal import Proposal
from mergemix.recipe import Recipe
from mergemix.report.consistency import rank_consistency
from mergemix.report.render import Consistency
from mergemix.run.experts import Expert
from mergemix.run.scoring import scoring_session
from mergemix.run.workspace import Workspace, open_workspace
from mergemix.search.trials import SearchResult, Trial


class MixtureRun:
    """One mergemix run, a method per stage, each with a typed result (one process; a multi-process launch
    runs the CLI or `propose`)."""

    def __init__(self, recipe: Recipe, on_trial: Callable[[Trial], None] | None = None) -> None:
        check_launch(recipe)
        self.recipe = recipe
        self.on_trial = on_trial

    @cached_property
    def workspace(self) -> Workspace:
        """Base, data and benchmarks in memory (opened on first use)."""
        return open_workspace(self.recipe)

    def experts(self, domains: Sequence[str] | None = None) -> list[Expert]:
        """Train (or reuse) the experts of `domains` (default: all); given ones are checked and taken as they are."""
        return expert_stage(self.workspace, train=True, domains=domains)

    def search(self, strategy: str | None = None) -> SearchResult:
        """The search over the experts (trained first if need be), without writing a proposal."""
        experts = self.experts()
        with scoring_session(self.workspace, experts) as session:
            assert session is not None  # one process
            return search_experts(self.workspace, experts, session, strategy, self.on_trial)[0]

    def propose(self, strategy: str | None = None) -> Proposal:
        """The proposal (search reused from search.json when nothing changed), written to proposal.json."""
        return self.propose_with_search(strategy).proposal

    def propose_with_search(self, strategy: str | None = None) -> ProposalWithSearch:
        """The proposal with the experts, search and evaluator it came from."""
        done = propose_on(self.workspace, strategy=strategy, on_trial=self.on_trial)
        assert done is not None  # one process: the main one
        return done

    def report(self) -> Consistency:
        """The rank-consistency report: real mixture runs against the merged proxy (report/ in the run)."""
        result = rank_consistency(self.recipe)
        assert result is not None  # one process: the main one
        return result
