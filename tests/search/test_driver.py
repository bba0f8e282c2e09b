from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml

from mergemix import load_recipe, propose
from mergemix.artifacts import read_jsonl
from mergemix.catalog import SURROGATES
from mergemix.errors import MergemixError
from mergemix.recipe import MixtureSpec
from mergemix.search.driver import search_stage
from mergemix.search.mixture import check_cap, to_mixture
from mergemix.search.seeds import seed_points, simplex_candidates
from mergemix.search.surrogate import loo_rmse
from tests.search.problems import problem


def test_seed_design() -> None:
    prior = np.array([0.5, 0.3, 0.2])
    pts = seed_points(prior, 12, 1.0, seed=0)
    kinds = [k for k, _ in pts]
    assert kinds[:5] == ["vertex"] * 3 + ["uniform", "token_prior"] and len(pts) == 12
    for _, a in pts:
        assert a.min() >= 0 and a.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(pts[4][1], prior)
    again = seed_points(prior, 12, 1.0, seed=0)
    assert all(np.array_equal(a, b) for (_, a), (_, b) in zip(pts, again, strict=True))
    cand = simplex_candidates(prior, 1000, 1.0, seed=0)
    assert cand.shape == (1000, 3) and np.allclose(cand.sum(1), 1)


def test_quadratic_surrogate_recovers_a_quadratic_surface() -> None:
    rng = np.random.default_rng(0)
    x = rng.dirichlet(np.ones(3), size=30)
    y = 1.0 * x[:, 0] + 0.5 * x[:, 1] + 2.0 * x[:, 1] * x[:, 2]
    predict = SURROGATES.get("quadratic")(x, y, 0)
    q = rng.dirichlet(np.ones(3), size=5)
    np.testing.assert_allclose(predict(q), q[:, 0] + 0.5 * q[:, 1] + 2 * q[:, 1] * q[:, 2], atol=1e-2)
    assert loo_rmse(SURROGATES.get("quadratic"), x, y, 0) < 0.01


def test_lightgbm_surrogate_learns_a_trend_and_is_deterministic() -> None:
    rng = np.random.default_rng(1)
    x = rng.dirichlet(np.ones(3), size=40)
    y = x[:, 0]
    fit = SURROGATES.get("lightgbm")
    p1, p2 = fit(x, y, 0), fit(x, y, 0)
    q = np.array([[0.9, 0.05, 0.05], [0.05, 0.9, 0.05]])
    assert p1(q)[0] > p1(q)[1] + 0.3
    np.testing.assert_array_equal(p1(q), p2(q))


def test_mixture_ratios_tokens_epochs() -> None:
    shares = to_mixture({"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 100, "b": 1000, "c": 50}, MixtureSpec(total_tokens=1000))
    assert [s.tokens for s in shares] == [500, 300, 200]
    assert [s.epochs for s in shares] == [5.0, 0.3, 4.0]
    assert not any(s.capped for s in shares)


def test_repetition_cap_is_a_bound_and_an_impossible_cap_is_refused() -> None:
    spec = MixtureSpec(total_tokens=1000, max_epochs=2)
    available = {"a": 100, "b": 1000, "c": 50}
    shares = to_mixture({"a": 0.2, "b": 0.7, "c": 0.1}, available, spec)
    by = {s.domain: s for s in shares}
    assert by["a"].capped and by["a"].bound == "max_epochs" and by["c"].capped and not by["b"].capped
    assert [s.ratio for s in shares] == [0.2, 0.7, 0.1]
    with pytest.raises(MergemixError, match="outside the recipe's bounds"):
        to_mixture({"a": 0.5, "b": 0.3, "c": 0.2}, available, spec)
    with pytest.raises(MergemixError, match="raise mixture.max_epochs to at least 50 or lower"):
        check_cap(MixtureSpec(total_tokens=1000, max_epochs=2), {"a": 10, "b": 10})


@pytest.mark.slow
def test_a_constrained_search_proposes_the_verified_feasible_point(micro_recipe_file: Path) -> None:
    raw = yaml.safe_load(micro_recipe_file.read_text())
    # caps (max_epochs 1): math 0.5, prose 0.5, code 0.6 of the 100k budget; with math <= 0.2 and prose pinned
    # at 0.3 the feasible set is math in [0.1, 0.2], code = 0.7 - math
    for d, tokens in zip(raw["data"]["domains"], (50_000, 50_000, 60_000), strict=True):
        d["available_tokens"] = tokens
    raw["mixture"].update(max_epochs=1, max_share={"math": 0.2}, pinned={"prose": 0.3})
    micro_recipe_file.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(micro_recipe_file)
    proposal = propose(recipe)
    a = proposal.alpha_star
    assert a["prose"] == pytest.approx(0.3) and 0.1 - 1e-6 <= a["math"] <= 0.2 + 1e-6
    assert a["code"] <= 0.6 + 1e-6 and sum(a.values()) == pytest.approx(1.0, abs=1e-5)
    assert {s.domain: s.ratio for s in proposal.mixture} == a  # ratios are alpha*, nothing moved afterwards
    assert all(s.epochs <= 1 + 1e-4 for s in proposal.mixture)
    assert proposal.active_bounds["prose"] == "pinned"
    # a bound is named exactly where alpha* sits on it: math's max 0.2, or code's cap 0.6 (math at 0.1)
    on_bound = {"prose": "pinned"}
    if a["math"] >= 0.2 - 1e-6:
        on_bound["math"] = "max_share"
    if a["code"] >= 0.6 - 1e-6:
        on_bound["code"] = "max_epochs"
    assert proposal.active_bounds == on_bound
    # alpha* is a trial that was really merged and scored, and the proposal's score is that trial's
    trials = read_jsonl(recipe.resolved_run_dir() / "trials.jsonl")
    star = [t for t in trials if t["alpha"] == a]
    assert len(star) == 1 and star[0]["objective"] == pytest.approx(proposal.proposal.objective, abs=1e-6)
    # every trial the search chose (all but the references: base, vertices, uniform, token prior) is feasible
    for t in trials:
        if t["kind"] not in ("base", "vertex", "uniform", "token_prior"):
            x = t["alpha"]
            assert x["prose"] == pytest.approx(0.3) and x["math"] <= 0.2 + 1e-6 and x["code"] <= 0.6 + 1e-6, t


def _analytic(alpha: dict[str, float]) -> dict[str, dict[str, float]]:
    """Scores of a known surface (the optimum of each term at an interior point): the search driver and
    strategies are what is tested here, so the merge + evaluation is replaced by the formula."""
    a = np.array([alpha["math"], alpha["prose"], alpha["code"]])
    if not a.any():
        return {"target": {"loss": 4.0}, "math_heldout": {"loss": 4.0}, "sums": {"score": -1.0}}
    return {"target": {"loss": 3.0 - a[2] + 1.5 * (a[2] - 0.5) ** 2},
            "math_heldout": {"loss": 3.0 - a[0] + 1.5 * (a[0] - 0.3) ** 2},
            "sums": {"score": -0.5 + a[0] - a[0] ** 2}}


@pytest.mark.parametrize("strategy", ["surface", "tpe", "cmaes", "gp", "grid"])
def test_every_strategy_stays_feasible_and_nears_the_optimum(strategy: str, micro_recipe_file: Path,
                                                             tmp_path: Path) -> None:
    recipe = load_recipe(micro_recipe_file, ["mixture.max_share={math: 0.35}", "mixture.pinned={prose: 0.2}",
                                             "search.trials=20", "search.candidates=2000"])
    bounds = recipe.mixture.bounds(recipe.domain_names)
    prior = np.array([0.2, 0.5, 0.3])
    calls: list[dict[str, float]] = []

    def evaluate(alpha: dict[str, float]) -> dict[str, dict[str, float]]:
        calls.append(alpha)
        return _analytic(alpha)

    res = search_stage(problem(recipe, prior, bounds), evaluate, tmp_path / "trials.jsonl", "k", strategy)
    star = res.star.alpha
    assert bounds.contains(np.array(list(star.values()))) and star["prose"] == pytest.approx(0.2)
    assert len({tuple(sorted(c.items())) for c in calls}) == len(calls)  # no alpha evaluated twice
    assert len(calls) <= 1 + 5 + 20 + 1
    # the best feasible point of this surface, by brute force on a fine grid of math (code = 0.8 - math)
    grid = [{"math": m, "prose": 0.2, "code": 0.8 - m} for m in np.linspace(0, 0.35, 351)]
    best = max(res.objective(_analytic(g))[2] for g in grid)
    assert res.star.objective <= best + 1e-9 and res.star.objective > best - 0.05
