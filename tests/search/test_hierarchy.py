"""Hierarchical (top-down) search over grouped domains, and the reuse of an earlier proposal's shares."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from mergemix import load_recipe, propose
from mergemix.artifacts import read_jsonl
from mergemix.cli import main
from mergemix.feasible import Bounds
from mergemix.recipe import Recipe, recipe_from_dict
from mergemix.search.hierarchy import search_mixtures, stage_budgets
from mergemix.search.levels import Level
from mergemix.search.trials import alpha_key
from tests.conftest import micro_recipe_dict
from tests.search.problems import problem
from tests.search.problems import strategy as _strategy

DOMAINS = ["math", "prose", "code", "facts"]
PRIOR = np.array([0.1, 0.4, 0.3, 0.2])  # token shares the analytic searches assume
GROUPS = {"numbers": ["math", "code"], "words": ["prose", "facts"]}


def _raw(micro_data: dict[str, Any], tmp_path: Path, **mixture: Any) -> dict[str, Any]:
    """The micro recipe with a fourth domain (facts) and `mixture` fields."""
    raw = micro_recipe_dict(micro_data, tmp_path / "run", tmp_path / "cache")
    raw["data"]["domains"].append({"name": "facts", "source": micro_data["sources"]["facts"]})
    raw["mixture"].update(mixture)
    return raw


def _analytic(alpha: dict[str, float]) -> dict[str, dict[str, float]]:
    """Scores of a known surface over the four domains (its optimum inside the simplex): the search is what is
    tested here, so merge + evaluation is replaced by the formula."""
    a = np.array([alpha[d] for d in DOMAINS])
    if not a.any():
        return {"target": {"loss": 4.0}, "math_heldout": {"loss": 4.0}, "sums": {"score": -1.0}}
    return {"target": {"loss": 3.0 - a[2] - 0.5 * a[3] + 1.5 * (a[2] - 0.5) ** 2 + (a[1] - 0.2) ** 2},
            "math_heldout": {"loss": 3.0 - a[0] + 1.5 * (a[0] - 0.3) ** 2 + (a[3] - 0.1) ** 2},
            "sums": {"score": -0.5 + a[0] - a[0] ** 2}}


class Counted:
    """The analytic scores, counting the mixtures scored; raises after `fail_after` of them (a killed run)."""

    def __init__(self, fail_after: int | None = None) -> None:
        self.calls: list[dict[str, float]] = []
        self.fail_after = fail_after

    def __call__(self, alpha: dict[str, float]) -> dict[str, dict[str, float]]:
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt
        self.calls.append(alpha)
        return _analytic(alpha)


def _vec(alpha: dict[str, float]) -> np.ndarray:
    return np.array([alpha[d] for d in DOMAINS])


def _search(recipe: Recipe, log: Path, evaluate: Counted, strategy: str | None = None) -> Any:
    # `auto` is the pipeline's to choose (it knows the model): these searches name theirs, surface by default
    return search_mixtures(problem(recipe, PRIOR), recipe.mixture, evaluate, log, "k", strategy or _strategy(recipe))


def test_level_lift_keeps_group_totals_token_split_and_bounds() -> None:
    flat = Bounds.build(DOMAINS, {"facts": 0.05}, {"code": 0.3}, {})
    level = Level.build(GROUPS, dict(zip(DOMAINS, PRIOR.tolist(), strict=True)), flat, PRIOR)
    assert level.units == ["numbers", "words"] and level.prior.tolist() == pytest.approx([0.4, 0.6])
    assert level.bounds.lo.tolist() == [0.0, 0.05] and level.bounds.hi.tolist() == [1.0, 1.0]
    points = level.bounds.project(np.random.default_rng(0).dirichlet(np.ones(2), size=200))
    for g, a in zip(points, level.lift(points), strict=True):
        assert flat.contains(a)
        assert a[0] + a[2] == pytest.approx(g[0]) and a[1] + a[3] == pytest.approx(g[1])  # group totals kept
        if a[2] < 0.3 - 1e-9:  # code below its cap: math and code in token proportion 0.1 : 0.3
            assert a[2] == pytest.approx(3 * a[0])
        else:  # at the cap the rest of the group's share goes to math
            assert a[0] == pytest.approx(g[0] - 0.3)
        if a[3] > 0.05 + 1e-9:
            assert a[1] == pytest.approx(2 * a[3])  # prose : facts = 0.4 : 0.2


def test_stage_budgets_follow_the_coordinates() -> None:
    assert stage_budgets(30, [1, 1, 1]) == [10, 10, 10]
    assert stage_budgets(20, [3, 1]) == [15, 5]
    assert stage_budgets(4, [1, 2]) == [3, 4]  # at least coordinates + 2 each


@pytest.mark.parametrize("strategy", ["surface", "tpe", "grid"])
def test_a_two_level_search_gives_flat_verified_ratios_within_bounds(strategy: str, micro_data: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    recipe = recipe_from_dict(_raw(micro_data, tmp_path, groups=GROUPS, max_share={"code": 0.3},
                                   min_share={"facts": 0.05}) | {"search": {
        "seeds": 8, "trials": 24, "candidates": 2000, "verify": 2}})
    log = tmp_path / "trials.jsonl"
    evaluate = Counted()
    res = _search(recipe, log, evaluate, strategy)
    star = res.star.alpha
    bounds = recipe.mixture.bounds(DOMAINS)
    assert list(star) == DOMAINS and sum(star.values()) == pytest.approx(1, abs=1e-5)
    assert bounds.contains(_vec(star))
    # alpha* is a trial really scored, logged with the objective the search chose it by
    logged = [r for r in read_jsonl(log) if r["alpha"] == star]
    assert len(logged) == 1 and logged[0]["objective"] == pytest.approx(res.star.objective)
    assert len({alpha_key(a) for a in evaluate.calls}) == len(evaluate.calls)  # no alpha scored twice
    stage1 = [r for r in read_jsonl(log) if r["kind"].startswith("groups:")]
    assert len(stage1) >= 4
    for r in stage1:  # group shares searched, each group split in token proportion (or at a bound)
        a, g = r["alpha"], r["point"]
        assert a["math"] + a["code"] == pytest.approx(g["numbers"], abs=2e-6)
        if a["code"] < 0.3 - 1e-6:
            assert a["code"] == pytest.approx(3 * a["math"], abs=1e-5)
        if a["facts"] > 0.05 + 1e-6:
            assert a["prose"] == pytest.approx(2 * a["facts"], abs=1e-5)
        assert bounds.contains(_vec(a))
    searched = 0
    for group, others in (("numbers", ["prose", "facts"]), ("words", ["math", "code"])):
        # stage 2 searches inside each group (unless alpha* so far leaves it one point), the others pinned
        within = [r["alpha"] for r in read_jsonl(log) if r["kind"].startswith(f"{group}:")]
        assert len({tuple(a[d] for d in others) for a in within}) <= 1
        assert all(bounds.contains(_vec(a)) for a in within)
        searched += len(within)
    assert searched >= 1
    # near the best feasible point of this surface (brute force over the feasible set)
    cand = bounds.project(np.random.default_rng(1).dirichlet(np.ones(4), size=20000))
    best = max(res.objective(_analytic(dict(zip(DOMAINS, c, strict=True))))[2] for c in cand)
    assert best - 0.1 < res.star.objective <= best + 1e-6


def test_a_killed_hierarchical_search_resumes_every_stage(micro_data: dict[str, Any], tmp_path: Path) -> None:
    raw = _raw(micro_data, tmp_path, groups=GROUPS) | {"search": {"seeds": 8, "trials": 18, "candidates": 1000,
                                                                  "verify": 2}}
    recipe = recipe_from_dict(raw)
    whole = Counted()
    reference = _search(recipe, tmp_path / "whole.jsonl", whole)
    log = tmp_path / "trials.jsonl"
    killed = Counted(fail_after=len(whole.calls) - 4)  # killed inside the last stage
    with pytest.raises(KeyboardInterrupt):
        _search(recipe, log, killed)
    rerun = Counted()
    res = _search(recipe, log, rerun)
    done = {alpha_key(a) for a in killed.calls}
    assert not done & {alpha_key(a) for a in rerun.calls}  # nothing finished before the kill is scored again
    assert len(killed.calls) + len(rerun.calls) == len(whole.calls)
    assert res.star.alpha == reference.star.alpha
    again = Counted()
    _search(recipe, log, again)
    assert again.calls == []


@pytest.mark.parametrize("max_share", [{}, {"math": 0.2, "code": 0.3}])
def test_with_the_groups_shares_pinned_only_the_inside_is_searched(max_share: dict, micro_data: dict[str, Any],
                                                                  tmp_path: Path) -> None:
    """Pins leave stage 1 nothing to search: stage 2 starts from them (or, where the bounds leave the group one
    mixture too, the flat search runs)."""
    recipe = recipe_from_dict(_raw(micro_data, tmp_path, groups={"numbers": ["math", "code"]}, max_share=max_share,
                                   pinned={"prose": 0.3, "facts": 0.2}) | {"search": {"seeds": 8, "trials": 8}})
    log = tmp_path / "trials.jsonl"
    star = _search(recipe, log, Counted()).star.alpha
    assert star["prose"] == 0.3 and star["facts"] == 0.2 and star["math"] + star["code"] == pytest.approx(0.5)
    searched = [r for r in read_jsonl(log) if r["kind"] not in ("base", "vertex", "uniform", "token_prior")]
    assert searched and all(r["alpha"]["prose"] == 0.3 and r["alpha"]["facts"] == 0.2 for r in searched)
    if max_share:
        assert star == {"math": 0.2, "prose": 0.3, "code": 0.3, "facts": 0.2}
    else:
        assert all(r["kind"].startswith("numbers:") for r in searched)


def test_a_shared_hierarchical_study_resumes_every_stage(micro_data: dict[str, Any], tmp_path: Path) -> None:
    """tpe keeps each stage's trials in its own optuna study (study.db beside the log): a rerun finds every
    stage's study full, scores nothing and proposes the same alpha*."""
    recipe = recipe_from_dict(_raw(micro_data, tmp_path, groups=GROUPS) | {"search": {
        "seeds": 8, "trials": 15, "verify": 2}})
    log = tmp_path / "trials.jsonl"
    first, again = Counted(), Counted()
    res = _search(recipe, log, first, "tpe")
    import optuna

    studies = [s.study_name for s in optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'study.db'}")
               if not s.study_name.endswith("/references")]
    assert len(studies) >= 2 and any(s.endswith("-groups") for s in studies)  # stage 1 and stage 2 studies
    assert _search(recipe, log, again, "tpe").star.alpha == res.star.alpha
    assert first.calls and again.calls == []


@pytest.mark.parametrize(("mixture", "pattern"), [
    ({"groups": {"numbers": ["math", "cod"]}}, r"mixture.groups.numbers: unknown domain cod \(domains: math, prose"),
    ({"groups": {"a": ["math", "code"], "b": ["code", "prose"]}}, r"domain code is listed in groups a and b; a "
     r"domain belongs to at most one group"),
    ({"groups": {"math": ["math", "code"]}}, r"mixture.groups: group math has the name of a domain"),
    ({"groups": {"a": []}}, r"mixture.groups: group a has no domains"),
    ({"groups": {"a.b": ["math"]}}, r"mixture.groups: group name 'a.b'"),
])
def test_bad_groups_are_refused_at_validation(micro_data: dict[str, Any], tmp_path: Path, mixture: dict,
                                              pattern: str, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_raw(micro_data, tmp_path, **mixture)))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err


def test_grid_counts_the_domains_of_each_stage(micro_data: dict[str, Any], tmp_path: Path) -> None:
    raw = _raw(micro_data, tmp_path) | {"search": {"strategy": "grid", "seeds": 8}}
    with pytest.raises(Exception, match="grid is for at most 3 unpinned domains"):
        recipe_from_dict(raw)
    raw["mixture"]["groups"] = GROUPS  # two groups of two: every stage searches two shares
    assert recipe_from_dict(raw).mixture.units(DOMAINS) == GROUPS
    raw["mixture"]["groups"] = {"most": ["math", "prose", "code", "facts"]}
    with pytest.raises(Exception, match="grid is for at most 3 unpinned domains .* got 4"):
        recipe_from_dict(raw)


def test_gradient_is_refused_with_groups_at_validation(micro_data: dict[str, Any], tmp_path: Path) -> None:
    raw = _raw(micro_data, tmp_path, groups=GROUPS) | {"search": {"strategy": "gradient", "seeds": 8}}
    with pytest.raises(Exception, match="search.strategy gradient searches flat shares"):
        recipe_from_dict(raw)


def _earlier(tmp_path: Path, alpha: dict[str, float]) -> Path:
    path = tmp_path / "earlier" / "proposal.json"
    path.parent.mkdir(exist_ok=True)
    path.write_text(json.dumps({"name": "earlier", "domains": list(alpha), "alpha_star": alpha}))
    return path


def test_reuse_keeps_the_earlier_ratios_and_searches_the_new_domain(micro_data: dict[str, Any],
                                                                     tmp_path: Path) -> None:
    earlier = _earlier(tmp_path, {"math": 0.5, "prose": 0.3, "code": 0.2})
    recipe = recipe_from_dict(_raw(micro_data, tmp_path, reuse={"proposal": str(earlier)}) | {"search": {
        "seeds": 8, "trials": 12, "candidates": 1000, "verify": 2}})
    assert recipe.mixture.units(DOMAINS) == {"reused": ["math", "prose", "code"], "facts": ["facts"]}
    log = tmp_path / "trials.jsonl"
    res = _search(recipe, log, Counted())
    searched = [r["alpha"] for r in read_jsonl(log) if r["kind"].startswith("groups:")]
    for a in [*searched, res.star.alpha]:  # every searched point and alpha* keep math : prose : code = 5 : 3 : 2
        old = a["math"] + a["prose"] + a["code"]
        assert [a["math"], a["prose"], a["code"]] == pytest.approx([0.5 * old, 0.3 * old, 0.2 * old], abs=1e-5)
    assert len({round(a["facts"], 4) for a in searched}) >= 4  # the new domain's share is what moved
    assert res.star.point is not None and sum(res.star.alpha.values()) == pytest.approx(1, abs=1e-5)


def test_reuse_can_pin_the_earlier_shares(micro_data: dict[str, Any], tmp_path: Path) -> None:
    earlier = _earlier(tmp_path, {"math": 0.5, "prose": 0.3, "code": 0.2})
    recipe = recipe_from_dict(_raw(micro_data, tmp_path, reuse={"proposal": str(earlier), "domains": ["code"],
                                                                "keep": "shares"}) | {"search": {
        "seeds": 8, "trials": 10, "candidates": 1000, "verify": 2}})
    bounds = recipe.mixture.bounds(DOMAINS)
    assert bounds.active({"math": 0.3, "prose": 0.3, "code": 0.2, "facts": 0.2}) == {"code": "pinned"}
    log = tmp_path / "trials.jsonl"
    res = _search(recipe, log, Counted())
    assert res.star.alpha["code"] == pytest.approx(0.2)
    chosen = [r["alpha"] for r in read_jsonl(log) if r["kind"] not in ("base", "vertex", "uniform", "token_prior")]
    assert chosen and all(a["code"] == pytest.approx(0.2) for a in chosen)
    assert len({a["facts"] for a in chosen}) > 3


@pytest.mark.parametrize(("reuse", "pattern"), [
    ({"proposal": "nowhere/proposal.json"}, r"mixture.reuse: proposal nowhere/proposal.json: file not found"),
    ({"proposal": "RECIPE"}, r"mixture.reuse: proposal .*r.yaml: not a mergemix proposal.json"),
    ({"proposal": "EARLIER", "domains": ["mathh"]}, r"mixture.reuse: domains: mathh is not a domain of this recipe"),
    ({"proposal": "EARLIER", "domains": ["facts"]}, r"mixture.reuse: domains: facts has no share in .*proposal.json"),
    ({"proposal": "EARLIER", "domains": ["math", "prose", "code", "facts"]}, r"domains: facts has no share"),
    ({"proposal": "FULL"}, r"every domain's share is reused, so nothing is left to search"),
    ({"proposal": "EARLIER", "keep": "all"}, r"mixture.reuse.keep: input should be 'ratios' or 'shares'"),
])
def test_bad_reuse_is_refused_in_one_line(micro_data: dict[str, Any], tmp_path: Path, reuse: dict, pattern: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.yaml"
    files = {"EARLIER": _earlier(tmp_path, {"math": 0.5, "prose": 0.3, "code": 0.2}), "RECIPE": path,
             "FULL": _earlier(tmp_path / "..", {"math": 0.4, "prose": 0.3, "code": 0.2, "facts": 0.1})}
    reuse = {**reuse, "proposal": str(files.get(reuse["proposal"], reuse["proposal"]))}
    path.write_text(yaml.safe_dump(_raw(micro_data, tmp_path, reuse=reuse)))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and re.search(pattern, err), err


def test_reused_ratios_and_groups_do_not_share_domains(micro_data: dict[str, Any], tmp_path: Path) -> None:
    earlier = _earlier(tmp_path, {"math": 0.5, "prose": 0.3, "code": 0.2})
    with pytest.raises(Exception, match="mixture.reuse: math is also in mixture.groups"):
        recipe_from_dict(_raw(micro_data, tmp_path, reuse={"proposal": str(earlier)}, groups={"n": ["math", "facts"]}))
    with pytest.raises(Exception, match="mixture.reuse: code is also in mixture.pinned"):
        recipe_from_dict(_raw(micro_data, tmp_path, reuse={"proposal": str(earlier)}, pinned={"code": 0.1}))


@pytest.mark.slow
def test_hierarchical_propose_then_reuse_its_ratios(micro_data: dict[str, Any], tmp_path: Path) -> None:
    raw = _raw(micro_data, tmp_path, groups=GROUPS, max_share={"code": 0.3})
    raw["search"].update(trials=12)
    path = tmp_path / "grouped.yaml"
    path.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(path)
    proposal = propose(recipe)
    a = proposal.alpha_star
    assert list(a) == DOMAINS and sum(s.ratio for s in proposal.mixture) == pytest.approx(1, abs=1e-5)
    assert {s.domain: s.ratio for s in proposal.mixture} == a and a["code"] <= 0.3 + 1e-6
    assert proposal.groups == GROUPS
    assert proposal.group_shares == {"numbers": pytest.approx(a["math"] + a["code"], abs=1e-6),
                                     "words": pytest.approx(a["prose"] + a["facts"], abs=1e-6)}
    run = recipe.resolved_run_dir()
    trials = read_jsonl(run / "trials.jsonl")
    star = [t for t in trials if t["alpha"] == a]
    assert len(star) == 1 and star[0]["objective"] == pytest.approx(proposal.proposal.objective, abs=1e-6)
    stages = {t["kind"].split(":")[0] for t in trials}
    assert stages >= {"base", "vertex", "groups"} and stages & {"numbers", "words"}  # both levels searched
    assert "groups: numbers" in proposal.table()

    # facts as a domain added to the mix of the other three: their ratios kept, facts' share searched
    earlier = tmp_path / "earlier.json"
    earlier.write_text((run / "proposal.json").read_text())
    raw["mixture"] = {"total_tokens": 100000, "reuse": {"proposal": str(earlier), "domains": ["math", "prose", "code"]}}
    path.write_text(yaml.safe_dump(raw))
    again = propose(load_recipe(path))
    b, old = again.alpha_star, sum(a[d] for d in ("math", "prose", "code"))
    total = sum(b[d] for d in ("math", "prose", "code"))
    for d in ("math", "prose", "code"):
        assert b[d] == pytest.approx(a[d] / old * total, abs=1e-4)
    assert again.group_shares == {"reused": pytest.approx(total, abs=1e-6), "facts": pytest.approx(b["facts"])}
    star = [t for t in read_jsonl(run / "trials.jsonl") if t["alpha"] == b]
    assert len(star) == 1 and star[0]["objective"] == pytest.approx(again.proposal.objective, abs=1e-6)
