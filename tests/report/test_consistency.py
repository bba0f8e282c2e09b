"""The rank-consistency report: metrics, mixture choice, the whole report on the micro recipe, its page in a
real browser, and a report killed mid-way that resumes without losing finished mixture runs."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mergemix.errors import MergemixError
from mergemix.recipe import recipe_from_dict
from mergemix.report.consistency import _bound_warnings
from mergemix.report.metrics import agreement, pairwise_accuracy, partial_spearman, recovery, top_rho
from mergemix.run.mixture_runs import choose_mixtures
from tests.conftest import micro_recipe_dict

REPORT = {"mixtures": 6, "seeds": 2, "steps": 8, "bootstrap": 100, "interference_batches": 1}


def test_rank_metrics_on_known_orders() -> None:
    up = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert pairwise_accuracy(up, up) == 1.0
    assert pairwise_accuracy(up, up[::-1]) == 0.0
    assert pairwise_accuracy([1.0, 1.0, 2.0], [1.0, 2.0, 3.0]) == pytest.approx(5 / 6)  # one tie counts half
    assert recovery([1.0, 1.0], [2.0, 2.0]) == 0.5
    assert np.isnan(recovery([1.0], [0.0]))
    truth = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    # right at the top, wrong at the bottom: the top-quarter rho sees only the top
    assert top_rho([5, 4, 3, 2, 1, 0, 7, 6, 8, 9, 10, 11], truth) == pytest.approx(1.0)
    a = agreement(up, up, [0.0] * 5, [0.0] * 5, n_boot=100)
    assert a["spearman"] == pytest.approx(1.0) and a["kendall"] == pytest.approx(1.0)
    assert a["true_rank"] == 1 and a["regret"] == 0.0
    assert a["spearman_ci_items"] == [pytest.approx(1.0), pytest.approx(1.0)]
    noisy = agreement(up, up, [5.0] * 5, [5.0] * 5, n_boot=200)
    assert noisy["spearman_ci_items"][0] < 0.5  # item noise far above the spread: the interval says so


def test_partial_correlation_tells_what_a_predictor_adds() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(size=200)
    y = z + 0.1 * rng.normal(size=200)
    only_z = z + 0.01 * rng.normal(size=200)  # knows nothing beyond z
    more = y + 0.01 * rng.normal(size=200)  # knows y's own part too
    assert abs(partial_spearman(only_z, y, z)) < 0.2
    assert partial_spearman(more, y, z) > 0.8


def test_mixtures_include_the_fixed_points_then_spread(micro_data: dict[str, Any], tmp_path: Path) -> None:
    d = micro_recipe_dict(micro_data, tmp_path / "run", tmp_path / "cache")
    d["report"] = {"mixtures": 8, "include": [{"math": 3, "code": 1}]}
    recipe = recipe_from_dict(d)
    star = {"math": 0.5, "prose": 0.3, "code": 0.2}
    plenty = dict.fromkeys(recipe.domain_names, 10**6)
    mixes = choose_mixtures(recipe, (0.2, 0.3, 0.5), star, plenty)
    assert [m.label for m in mixes[:4]] == ["proposal", "uniform", "token_prior", "include-0"]
    assert mixes[3].alpha == {"math": 0.75, "prose": 0.0, "code": 0.25}
    assert len(mixes) == 8 and all(abs(sum(m.alpha.values()) - 1) < 1e-5 for m in mixes)
    points = np.array([[m.alpha[x] for x in recipe.domain_names] for m in mixes])
    gaps = np.linalg.norm(points[:, None] - points[None], axis=-1)[np.triu_indices(8, 1)]
    assert gaps.min() > 0.1  # spread: no two mixtures nearly the same
    # a proposal equal to uniform is trained once
    same = choose_mixtures(recipe, (0.2, 0.3, 0.5), dict.fromkeys(recipe.domain_names, 1 / 3), plenty)
    assert [m.label for m in same[:3]] == ["proposal", "token_prior", "include-0"]


def test_report_mixtures_respect_the_caps_at_the_runs_budget(micro_data: dict[str, Any], tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A small domain held to max_epochs: every mixture the report spreads or includes repeats it at most
    max_epochs times at the runs' budget (2 x 6 steps x 8 x 32 = 3,072 tokens); report.space simplex is the
    whole simplex again."""
    d = micro_recipe_dict(micro_data, tmp_path / "run", tmp_path / "cache")
    d["mixture"] = {"total_tokens": 100000, "max_epochs": 4}
    d["report"] = {"mixtures": 12}
    available = {"math": 300, "prose": 50000, "code": 50000}  # math: at most 4 x 300 / 3,072 = 0.39
    star = {"math": 0.3, "prose": 0.3, "code": 0.4}
    mixes = choose_mixtures(recipe_from_dict(d), (0.2, 0.4, 0.4), star, available)
    assert len(mixes) == 12
    epochs = {m.label: m.alpha["math"] * 3072 / 300 for m in mixes}
    assert all(e <= 4 + 1e-4 for label, e in epochs.items() if label not in ("uniform", "token_prior")), epochs
    simplex = choose_mixtures(recipe_from_dict({**d, "report": {"mixtures": 12, "space": "simplex"}}),
                              (0.2, 0.4, 0.4), star, available)
    assert max(m.alpha["math"] * 3072 / 300 for m in simplex if m.label.startswith("spread")) > 4
    with pytest.raises(MergemixError, match=r"report.include\[0\]: .* breaks the mixture bounds at the runs' "
                                            r"budget \(math above max_epochs .*set report.space: simplex"):
        choose_mixtures(recipe_from_dict({**d, "report": {"include": [{"math": 1.0}]}}), (0.2, 0.4, 0.4), star,
                        available)
    # a feasible set too small for report.mixtures distinct points: said, and what there is is used
    pinned = {**d, "mixture": {"total_tokens": 100000, "pinned": {"math": 0.2, "prose": 0.4}}}
    with caplog.at_level(logging.WARNING, logger="mergemix.run.mixture_runs"):
        few = choose_mixtures(recipe_from_dict(pinned), (0.2, 0.4, 0.4), {"math": 0.2, "prose": 0.4, "code": 0.4},
                              available)
    assert len(few) < 12 and "the feasible set holds only" in caplog.text


def test_report_says_when_the_proposal_is_not_compared_like_for_like(micro_data: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    d = micro_recipe_dict(micro_data, tmp_path / "run", tmp_path / "cache")
    d["mixture"] = {"total_tokens": 100000, "max_epochs": 2}
    recipe = recipe_from_dict(d)  # report runs: 2 x 6 steps x 8 sequences x 32 tokens = 3,072 tokens
    available = {"math": 10000, "prose": 50000, "code": 50000}  # math: at most 2 x 10,000 / 100,000 = 0.2
    rows = [{"label": "proposal", "alpha": {"math": 0.2, "prose": 0.4, "code": 0.4}},
            {"label": "uniform", "alpha": dict.fromkeys(["math", "prose", "code"], 1 / 3)},
            {"label": "spread-3", "alpha": {"math": 0.9, "prose": 0.05, "code": 0.05}}]
    warnings = _bound_warnings(recipe, available, rows, {"math": "max_epochs"})
    assert warnings == [
        "uniform lies outside the mixture bounds (math above max_epochs (0.333 > 0.200)): the search could not "
        "propose it, so its real result is no fair bar for the proposal",
        "the proposal sits on max_epochs at math, a cap set for mixture.total_tokens = 100,000; each mixture run "
        "trains 3,072 tokens, where no mixture is held to it: to compare like for like, report with "
        "mixture.total_tokens=3072"]
    assert _bound_warnings(recipe, {n: 10**6 for n in available}, rows, {}) == []


def test_report_recipe_errors(micro_data: dict[str, Any], tmp_path: Path) -> None:
    d = micro_recipe_dict(micro_data, tmp_path / "run", tmp_path / "cache")
    with pytest.raises(MergemixError, match="report.include\\[0\\]: unknown domain maths"):
        recipe_from_dict({**d, "report": {"include": [{"maths": 1.0}]}})
    with pytest.raises(MergemixError, match="report.steps or report.tokens, not both"):
        recipe_from_dict({**d, "report": {"steps": 5, "tokens": 500}})


def test_mixture_runs_train_with_the_reports_schedule(micro_data: dict[str, Any], tmp_path: Path) -> None:
    """report.lr and report.warmup_steps set how the real runs train (default: the experts'), and their run key
    follows the schedule used: an experts.lr of its own leaves the report's runs as they were."""
    import torch

    from mergemix.run.mixture_runs import Mixture, mixture_run, run_key
    from mergemix.run.workspace import open_workspace

    d = micro_recipe_dict(micro_data, tmp_path / "run", tmp_path / "cache")
    recipe = recipe_from_dict({**d, "report": {"steps": 3}})
    ws = open_workspace(recipe)
    mix = Mixture("uniform", {"math": 1 / 3, "prose": 1 / 3, "code": 1 / 3})

    def key(r: Any) -> str:
        return run_key(r, ws.base_hash, ws.blocks, mix.alpha, 0, "bench")

    assert recipe.report.schedule(recipe.experts) == (2e-3, 1)
    pinned = recipe_from_dict({**d, "experts": {**d["experts"], "lr": 5e-4, "warmup_steps": 4},
                               "report": {"steps": 3, "lr": 2e-3, "warmup_steps": 1}})
    assert key(pinned) == key(recipe)
    assert key(recipe_from_dict({**d, "report": {"steps": 3, "lr": 5e-4}})) != key(recipe)
    assert key(recipe_from_dict({**d, "report": {"steps": 3, "warmup_steps": 2}})) != key(recipe)

    def moved(r: Any, name: str) -> bool:
        trained: dict[str, torch.Tensor] = {}

        def evaluate(model: torch.nn.Module) -> dict[str, dict[str, float]]:
            trained.update({k: v.detach().clone() for k, v in model.state_dict().items()})
            return {}

        mixture_run(r, ws.model, ws.blocks, mix, 0, key(r), tmp_path / name, evaluate)
        return any(not torch.equal(v, trained[k]) for k, v in ws.model.state_dict().items())

    assert moved(recipe, "experts_lr")
    # the experts' rate is 2e-3; a vanishing report.lr leaves every weight as the base's
    assert not moved(recipe_from_dict({**d, "report": {"steps": 3, "lr": 1e-30}}), "report_lr")


def _report_recipe(micro_data: dict[str, Any], tmp_path: Path, **report: Any) -> Path:
    d = micro_recipe_dict(micro_data, tmp_path / "run", tmp_path / "cache")
    d["report"] = {**REPORT, **report}
    path = tmp_path / "micro.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture(scope="module")
def micro_report(micro_data: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A whole report on the micro recipe, made once through the CLI."""
    from mergemix.cli import main

    tmp = tmp_path_factory.mktemp("report")
    assert main(["-q", "report", str(_report_recipe(micro_data, tmp))]) == 0
    return tmp / "run" / "report"


@pytest.mark.slow
def test_report_writes_every_artifact(micro_report: Path) -> None:
    data = json.loads((micro_report / "consistency.json").read_text())
    assert len(data["mixtures"]) == 6
    assert {m["label"] for m in data["mixtures"]} >= {"proposal", "uniform", "token_prior"}
    assert set(data["targets"]) == {"objective", "capability:coding", "capability:math", "benchmark:target",
                                    "benchmark:math_heldout", "benchmark:sums"}
    objective = data["targets"]["objective"]
    for predictor in ("merge", "interpolation", "token_closeness", "log_prior"):
        assert -1 <= objective[predictor]["spearman"] <= 1
    assert objective["ceiling"] is not None and len(data["mixtures"][0]["truth_seeds"]) == 2
    assert "domain's held-out text" in data["targets"]["capability:math"]["log_prior_basis"]
    # the verdict leads all three formats
    assert data["verdict"].startswith("Verdict: ") and "Ranking: the merge ranked the 6 real mixtures" in data["verdict"]
    assert f"**{data['verdict']}**" in (micro_report / "report.md").read_text()
    import html

    assert html.escape(data["verdict"]) in (micro_report / "index.html").read_text()
    assert "uniform" in data["targets"]["capability:coding"]["log_prior_basis"]
    inter = data["interference"]
    assert np.allclose(np.diag(inter["cosine"]), 1.0, atol=1e-3)
    assert np.allclose(np.diag(inter["gamma"]), 1.0)
    c = data["compute"]
    assert c["mixture_train_tokens"] == 6 * 2 * 8 * 8 * 32  # mixtures x seeds x steps x batch x seq_len
    assert c["mixture_over_proposal"] > 0
    assert len(list((micro_report / "runs").glob("*.json"))) == 12
    assert not list((micro_report / "runs").glob("*.pt"))  # checkpoints removed once a run is saved
    md = (micro_report / "report.md").read_text()
    assert "| objective |" in md and "noise ceiling" in md
    for fig in ("scatter", "predictors", "trained", "interference"):
        assert (micro_report / "figures" / f"{fig}.png").read_bytes()[:4] == b"\x89PNG"


def _browser() -> tuple[str, str] | None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    return (chromium, driver) if chromium and driver else None


@pytest.mark.slow
@pytest.mark.skipif(_browser() is None, reason="no chromium + chromedriver here: `.ci/run` installs Debian's "
                    "chromium and chromium-driver; without a package manager this test cannot run")
def test_index_html_renders_in_headless_chromium(micro_report: Path) -> None:
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the test extra")
    chromium, driver_path = _browser()  # type: ignore[misc]
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--no-first-run", f"--user-data-dir={micro_report.parent / 'chromium-profile'}"):
        opts.add_argument(flag)
    service = webdriver.ChromeService(executable_path=driver_path)
    browser = webdriver.Chrome(options=opts, service=service)
    try:
        browser.get((micro_report / "index.html").resolve().as_uri())
        rows = browser.execute_script("return document.querySelectorAll('#rank-table tbody tr').length")
        assert rows == 6
        shown = browser.execute_script("return document.querySelector('#rank-table').getBoundingClientRect().height")
        assert shown > 50
        images = browser.execute_script(
            "return Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth, i.getBoundingClientRect().width])"
        )
        assert sorted(alt for alt, *_ in images) == ["interference", "predictors", "scatter", "trained"]
        for alt, complete, natural, width in images:
            assert complete and natural > 100 and width > 100, f"figure {alt} did not render"
    finally:
        browser.quit()


@pytest.mark.slow
def test_killed_report_keeps_finished_mixture_runs(micro_data: dict[str, Any], tmp_path: Path) -> None:
    recipe = _report_recipe(micro_data, tmp_path, steps=20, mixtures=5, interference_batches=0)
    runs = tmp_path / "run" / "report" / "runs"
    cmd = [sys.executable, "-m", "mergemix.cli", "-q", "report", str(recipe)]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 240
    while time.time() < deadline and len(list(runs.glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in runs.glob("*.json")}
    assert 2 <= len(finished) < 10, "the report should have been killed between mixture runs"
    assert not (tmp_path / "run" / "report" / "index.html").exists()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    after = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in runs.glob("*.json")}
    assert len(after) == 10
    for name, before in finished.items():
        assert after[name] == before, f"finished mixture run {name} was trained again"
    assert (tmp_path / "run" / "report" / "index.html").exists()


def test_one_seed_gives_no_ceiling_and_no_noise_warning(micro_data: dict[str, Any], tmp_path: Path) -> None:
    from mergemix.report.consistency import _target_agreement

    d = micro_recipe_dict(micro_data, tmp_path / "run", tmp_path / "cache")
    recipe = recipe_from_dict({**d, "report": {"seeds": 1, "bootstrap": 100}})
    truth = np.arange(6, dtype=float)
    predictors = {name: (truth + i, None) for i, name in enumerate(("interpolation", "token_closeness", "log_prior"))}
    predictors["merge"] = (truth, np.zeros(6))
    entry = _target_agreement(recipe, predictors, truth[:, None], np.zeros(6))
    assert entry["ceiling"] is None
    assert entry["merge"]["spearman"] == pytest.approx(1.0)
    assert entry["merge"]["spearman_one_seed"] == pytest.approx(1.0)
    assert entry["partial_merge_given_interpolation"] is None  # merge and interpolation are the same ranking
    json.dumps(entry, allow_nan=False)  # every number is finite or null


def _verdict_data(merge: float, interpolation: float, proposal: list[float]) -> dict[str, Any]:
    target = {"merge": {"spearman": merge, "spearman_ci_mixtures": [merge - 0.3, min(merge + 0.2, 1.0)]},
              "interpolation": {"spearman": interpolation}, "token_closeness": {"spearman": 0.1},
              "log_prior": {"spearman": None}, "ceiling": 0.9}
    real = {"proposal": {"mean": float(np.mean(proposal)), "seeds": proposal},
            "uniform": {"mean": 0.05, "seeds": [0.04, 0.06]}, "token_prior": {"mean": 0.02, "seeds": [0.01, 0.03]}}
    return {"targets": {"objective": target}, "mixtures": [{}] * 12, "trained_for_real": real}


def test_the_verdict_says_no_yes_and_partly_with_the_intervals() -> None:
    from mergemix.report.verdict import verdict

    no = verdict(_verdict_data(0.3, 0.6, [0.0, 0.02]))
    assert no.startswith("Verdict: no. Ranking: the merge ranked the 12 real mixtures no better than the best "
                         "predictor that trains nothing (merge ρ 0.30 [0.00, 0.50] against interpolation 0.60, "
                         "noise ceiling 0.90)")
    assert "not beating uniform 0.050 (-0.040 ±" in no and "token-proportional 0.020 (-0.010 ±" in no
    yes = verdict(_verdict_data(0.8, 0.6, [0.30, 0.32]))
    assert yes.startswith("Verdict: yes. ") and "inside that interval" in yes and "beating uniform" in yes
    assert "within the seeds' noise" not in yes  # +0.26 with seeds 0.02 apart: beyond it
    assert verdict(_verdict_data(0.8, 0.6, [0.0, 0.02])).startswith("Verdict: partly. ")
