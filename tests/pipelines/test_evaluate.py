"""`mergemix evaluate --stability` on the micro recipe, and the Kendall tau statistics behind it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from mergemix.cli import main
from mergemix.pipelines.evaluate import stability_rows
from mergemix.recipe import load_recipe


def test_stability_taus_follow_the_metric_along_each_path(micro_recipe_file: Path) -> None:
    recipe = load_recipe(micro_recipe_file)
    steps = [0.0, 0.5, 1.0]

    def raw(loss: float, acc: float) -> dict:
        mc = {m: acc for m in ("score", "acc", "acc_norm", "blank_ppl", "margin")}
        return {"target": {"loss": loss}, "math_heldout": {"loss": loss}, "sums": mc}

    base = raw(4.0, 0.3)
    scores = {  # math: loss falls, acc rises; prose: loss rises, acc flat; code: loss falls then rises
        "math": [base, raw(3.5, 0.4), raw(3.0, 0.5)],
        "prose": [base, raw(4.5, 0.3), raw(5.0, 0.3)],
        "code": [base, raw(3.0, 0.6), raw(3.5, 0.2)],
    }
    rows = {(r.benchmark, r.metric): r for r in stability_rows(recipe.evaluation.benchmarks, steps, scores)}
    loss = rows["target", "loss"]
    assert loss.tau_max == pytest.approx(1.0) and loss.tau_min == pytest.approx(-1.0)  # -loss: math improves
    assert loss.tau_mean == pytest.approx((1 - 1 + 1 / 3) / 3) and loss.abs_tau_mean == pytest.approx(7 / 9)
    # rank of base, math, prose, code at t = 0.5 (-loss: -4, -3.5, -4.5, -3) vs t = 1 (-4, -3, -5, -3.5)
    assert loss.rank_tau == pytest.approx(4 / 6)
    acc = rows["sums", "acc"]
    assert acc.tau_max == pytest.approx(1.0) and acc.tau_min == pytest.approx(-1 / 3)  # the flat path is NaN
    assert not math.isnan(acc.tau_mean)


@pytest.mark.slow
def test_cli_evaluate_stability_prints_and_writes_the_table(
    micro_recipe_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-q", "evaluate", str(micro_recipe_file), "--stability"]) == 0
    out = capsys.readouterr().out
    assert "rank mid→end" in out and "Kendall tau along the path" in out
    for metric in ("acc", "acc_norm", "blank_ppl", "score", "margin", "loss"):
        assert f" {metric} " in out
    report = json.loads((micro_recipe_file.parent / "run" / "stability.json").read_text())
    assert report["steps"] == [0.0, 0.25, 0.5, 0.75, 1.0] and report["experts"] == ["math", "prose", "code"]
    assert len(report["scores"]["math"]) == 5 and report["scores"]["math"][0] == report["scores"]["code"][0]
    rows = {(r["benchmark"], r["metric"]) for r in report["rows"]}
    assert ("sums", "blank_ppl") in rows and ("target", "loss") in rows and len(rows) == 7


def test_cli_evaluate_refuses_a_test_split_before_any_work(
    micro_recipe_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["-q", "evaluate", str(micro_recipe_file), "evaluation.benchmarks.sums.path=data/test.jsonl"]) == 2
    err = capsys.readouterr().err
    assert "evaluation.benchmarks[2]: path data/test.jsonl looks like a test split" in err and "Traceback" not in err
    assert not (micro_recipe_file.parent / "run").exists()
