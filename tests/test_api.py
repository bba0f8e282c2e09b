"""The pipeline by stage (mergemix.api.MixtureRun): typed results, reuse of what the run holds, progress."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from mergemix import MixtureRun, Proposal, load_recipe
from mergemix.run.experts import Expert
from mergemix.search.trials import SearchResult, Trial

pytestmark = pytest.mark.slow


def test_the_stages_one_by_one_and_again(micro_recipe_file: Path) -> None:
    seen: list[Trial] = []
    run = MixtureRun(load_recipe(micro_recipe_file), on_trial=seen.append)
    experts = run.experts()
    assert [e.domain for e in experts] == ["math", "prose", "code"] and all(isinstance(e, Expert) for e in experts)
    searched = run.search()
    assert isinstance(searched, SearchResult) and seen and all(isinstance(t, Trial) for t in seen)
    assert {t.kind for t in seen} >= {"base", "vertex", "uniform", "token_prior"}
    proposal = run.propose()  # the search's result is read back, not searched again
    assert isinstance(proposal, Proposal) and proposal.alpha_star == searched.star.alpha
    assert (run.recipe.resolved_run_dir() / "proposal.json").exists()
    # a pipeline that starts over (a new process, say) finds everything on disk
    again = MixtureRun(load_recipe(micro_recipe_file))
    start = time.perf_counter()
    assert again.propose() == proposal
    assert time.perf_counter() - start < 60
