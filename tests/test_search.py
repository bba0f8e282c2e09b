from __future__ import annotations

import numpy as np
import pytest

from mergemix.errors import MergemixError
from mergemix.mixture import to_mixture
from mergemix.recipe import MixtureSpec
from mergemix.search.seeds import seed_points, simplex_candidates
from mergemix.search.surrogate import SURROGATES, loo_rmse


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


def test_repetition_cap_moves_share_to_the_others() -> None:
    shares = to_mixture({"a": 0.5, "b": 0.3, "c": 0.2}, {"a": 100, "b": 1000, "c": 50},
                        MixtureSpec(total_tokens=1000, max_epochs=2))
    by = {s.domain: s for s in shares}
    assert by["a"].tokens == 200 and by["a"].capped
    assert by["c"].tokens == 100 and by["c"].capped
    assert by["b"].tokens == 700 and not by["b"].capped
    assert sum(s.ratio for s in shares) == pytest.approx(1.0)
    with pytest.raises(MergemixError, match="raise the cap or lower the budget"):
        to_mixture({"a": 0.5, "b": 0.5}, {"a": 10, "b": 10}, MixtureSpec(total_tokens=1000, max_epochs=2))
