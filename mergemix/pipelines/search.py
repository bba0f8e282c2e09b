"""`mergemix search`: only the search, over the experts a `propose` run left in the run directory.

`search_again` searches (with another strategy, say) and writes a new proposal.json; `search_worker` adds
trials to a shared optuna study beside other workers and writes no proposal. Neither trains an expert.
"""

from __future__ import annotations

from mergemix.pipelines.propose import ProposalWithSearch, expert_stage, propose_on, search_experts
from mergemix.recipe import Recipe
from mergemix.run.scoring import scoring_session
from mergemix.run.workspace import open_workspace
from mergemix.search.trials import SearchResult


def search_again(recipe: Recipe, strategy: str | None = None) -> ProposalWithSearch:
    """Search over the run's experts with `strategy` (default search.strategy) and propose again."""
    done = propose_on(open_workspace(recipe), train=False, strategy=strategy)
    assert done is not None  # one process: the main one
    return done


def search_worker(recipe: Recipe, strategy: str | None = None) -> SearchResult:
    """Add trials to the shared study of the run's search (an optuna strategy) and return what it holds."""
    ws = open_workspace(recipe)
    experts = expert_stage(ws, train=False)
    with scoring_session(ws, experts) as session:
        assert session is not None  # one process
        return search_experts(ws, experts, session, strategy)[0]
