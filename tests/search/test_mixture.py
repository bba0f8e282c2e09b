from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from mergemix.cli import main
from mergemix.feasible import Bounds


@pytest.mark.slow
def test_an_impossible_repetition_cap_stops_before_any_expert(micro_recipe_file: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load(micro_recipe_file.read_text())
    raw["mixture"]["max_epochs"] = 0.01  # the micro domains hold a few thousand tokens; the budget is 100k
    micro_recipe_file.write_text(yaml.safe_dump(raw))
    assert main(["propose", str(micro_recipe_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert err.startswith("error: mixture.max_epochs: 0.01 epochs") and "raise mixture.max_epochs to at least" in err
    run = Path(raw["run_dir"])
    assert not (run / "experts").exists() and not list(run.rglob("*.safetensors"))
    assert not (run / "trials.jsonl").exists()


def test_projection_lands_inside_the_bounds_and_keeps_inside_points() -> None:
    b = Bounds.build(["a", "b", "c"], {"c": 0.1}, {"a": 0.2}, {"b": 0.3})
    assert b.problem() is None and not b.unconstrained
    rng = np.random.default_rng(0)
    x = rng.dirichlet(np.ones(3), size=200)
    p = b.project(x)
    assert all(b.contains(row) for row in p)
    np.testing.assert_allclose(p[:, 1], 0.3)
    inside = np.array([[0.15, 0.3, 0.55]])
    np.testing.assert_allclose(b.project(inside), inside, atol=1e-12)
    assert b.active({"a": 0.2, "b": 0.3, "c": 0.5}) == {"a": "max_share", "b": "pinned"}


@pytest.mark.parametrize(("mixture", "pattern"), [
    ({"min_share": {"math": 0.6, "code": 0.5}}, r"lower shares .* sum to 1.1, above 1"),
    ({"pinned": {"math": 0.5}, "max_share": {"math": 0.3}}, r"mixture.pinned: math pinned at 0.5 is above its max_share"),
    ({"max_share": {"math": 0.2, "prose": 0.2, "code": 0.2}}, r"upper shares \(mixture.max_share\) sum to 0.6"),
    ({"min_share": {"mathh": 0.1}}, r"mixture.min_share: unknown domain mathh"),
    ({"max_share": {"math": 1.5}}, r"mixture.max_share: .*must lie in \[0, 1\]"),
    ({"max_epochs": 1, "total_tokens": 100000}, r"raise them"),
])
def test_infeasible_bounds_are_refused_at_validation(micro_recipe_file: Path, mixture: dict, pattern: str,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    raw = yaml.safe_load(micro_recipe_file.read_text())
    raw["mixture"].update(mixture)
    if "max_epochs" in mixture:  # every domain's tokens given: the cap is checked without reading data
        for d in raw["data"]["domains"]:
            d["available_tokens"] = 20000
    micro_recipe_file.write_text(yaml.safe_dump(raw))
    assert main(["validate", str(micro_recipe_file)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err


def test_a_mixture_that_leaves_a_domain_out_is_flagged_with_the_floor_to_set() -> None:
    from mergemix.feasible import Bounds
    from mergemix.pipelines.propose import left_out

    free = Bounds.build(["calendar", "tables", "letters"], {}, {}, {})
    msg = left_out({"calendar": 0.0, "tables": 0.004, "letters": 0.996}, free)
    assert msg is not None and msg.startswith("alpha* leaves out calendar, tables (below 1%)")
    assert msg.endswith("keep a floor: mixture.min_share: {calendar: 0.01, tables: 0.01}")
    assert left_out({"calendar": 0.02, "tables": 0.2, "letters": 0.78}, free) is None
    # a share the recipe itself holds below the floor (pinned at 0, max_share) is what the user asked for
    held = Bounds.build(["calendar", "tables", "letters"], {}, {"tables": 0.005}, {"calendar": 0.0})
    assert left_out({"calendar": 0.0, "tables": 0.004, "letters": 0.996}, held) is None
