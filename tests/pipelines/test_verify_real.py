"""search.verify_real: the top candidates and the baselines trained for real; the real-best is proposed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mergemix import Proposal, load_recipe, propose
from mergemix.artifacts import read_json

pytestmark = pytest.mark.slow


def test_verify_real_proposes_the_real_best_and_records_its_cost(micro_recipe_file: Path) -> None:
    recipe = load_recipe(micro_recipe_file, ["search.verify_real=1", "report.steps=4"])
    proposal = propose(recipe)
    assert isinstance(proposal, Proposal) and proposal.verify_real is not None
    v = proposal.verify_real
    labels = [r.label for r in v.runs]
    # the search's best candidate and the baselines, each alpha once (a candidate equal to a baseline is
    # trained once, under the candidate's label)
    assert labels[0] == "candidate-0" and "uniform" in labels and len(labels) == len({json.dumps(r.alpha, sort_keys=True)
                                                                                        for r in v.runs}) >= 2
    best = max(v.runs, key=lambda r: r.real)
    assert v.chosen == best.label and proposal.alpha_star == best.alpha
    assert proposal.proposal.objective == pytest.approx(best.merged, abs=1e-6)
    per_run = 4 * recipe.experts.batch_size * recipe.data.seq_len
    assert all(r.tokens == per_run for r in v.runs) and v.tokens == per_run * len(v.runs) and v.steps == 4
    # the real scores are a real run's, not the proxy's: saved per run, and they differ from the merge
    saved = sorted((recipe.resolved_run_dir() / "verify_real").glob("*.json"))
    assert len(saved) == len(v.runs) and all(read_json(p)["steps"] == 4 for p in saved)
    assert any(abs(r.real - r.merged) > 1e-6 for r in v.runs)
    on_disk = read_json(recipe.resolved_run_dir() / "proposal.json")
    assert on_disk["verify_real"]["chosen"] == v.chosen and on_disk["alpha_star"] == best.alpha
    assert "real verification" in proposal.table() and "<- chosen" in proposal.table()
    # a rerun trains nothing again and proposes the same
    again = propose(recipe)
    assert again is not None and again.alpha_star == proposal.alpha_star
    assert len(list((recipe.resolved_run_dir() / "verify_real").glob("*.json"))) == len(v.runs)
