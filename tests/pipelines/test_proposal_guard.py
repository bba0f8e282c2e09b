"""The proposal's guard: its margin over a baseline, with an interval, and the warning when within noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mergemix.evaluate import Objective
from mergemix.feasible import Bounds
from mergemix.proposal import Margin
from mergemix.recipe import BenchmarkSpec, EvalSpec


def test_margin_within_noise_says_so() -> None:
    clear = Margin(baseline="uniform", verified=0.2, low=0.1, high=0.3, predicted=0.25)
    assert not clear.within_noise
    assert clear.line() == "proposal - uniform: +0.200 verified, 95% [+0.100, +0.300], predicted +0.250"
    noisy = Margin(baseline="token-proportional", verified=0.02, low=-0.03, high=0.07)
    assert noisy.within_noise and "WITHIN NOISE" in noisy.line()
    barred = Margin(baseline="uniform", verified=-0.07, low=-0.1, high=-0.04,
                    outside={"letters": "above max_epochs (0.333 > 0.226)"})
    assert "BELOW: the proposal scores lower than this baseline" in barred.line()
    assert barred.line().endswith("(uniform lies outside the mixture bounds: letters above max_epochs (0.333 > 0.226); "
                                  "no mixture this run may propose)")


def test_bounds_name_what_a_mixture_breaks() -> None:
    b = Bounds(("a", "b", "c"), np.array([0.1, 0.0, 0.0]), np.array([1.0, 0.2, 1.0]), ("min_share", None, None),
               (None, "max_epochs", None))
    assert b.outside({"a": 0.5, "b": 0.25, "c": 0.25}) == {"b": "above max_epochs (0.250 > 0.200)"}
    assert b.outside({"a": 0.05, "b": 0.2, "c": 0.75}) == {"a": "below min_share (0.050 < 0.100)"}
    assert b.outside({"a": 0.4, "b": 0.2, "c": 0.4}) == {}


def test_objective_se_follows_the_benchmarks_item_noise() -> None:
    spec = EvalSpec(benchmarks=[BenchmarkSpec(name="a", kind="perplexity", domain="d", capability="x"),
                                BenchmarkSpec(name="b", kind="perplexity", domain="d", capability="y")],
                    low_signal="keep")
    base = {"a": {"loss": 4.0, "loss_se": 0.1}, "b": {"loss": 3.0, "loss_se": 0.2}}
    experts = [{"a": {"loss": 3.0, "loss_se": 0.1}, "b": {"loss": 2.0, "loss_se": 0.2}}]
    obj = Objective.from_references(spec, base, experts)
    # objective = (norm_a + norm_b) / 2, each normalized by a spread of 1.0
    assert obj.se(base) == pytest.approx(((0.5 * 0.1) ** 2 + (0.5 * 0.2) ** 2) ** 0.5)
    assert obj.se(base, {"a": 1.0}) == pytest.approx(0.1)


def test_diff_se_pairs_items_and_falls_back_to_quadrature() -> None:
    spec = EvalSpec(benchmarks=[BenchmarkSpec(name="a", kind="perplexity", domain="d", capability="x"),
                                BenchmarkSpec(name="b", kind="perplexity", domain="d", capability="y")],
                    low_signal="keep")
    base = {"a": {"loss": 4.0, "loss_se": 0.1}, "b": {"loss": 3.0, "loss_se": 0.2}}
    obj = Objective.from_references(spec, base, [{"a": {"loss": 3.0, "loss_se": 0.1},
                                                  "b": {"loss": 2.0, "loss_se": 0.2}}])
    g = torch.Generator().manual_seed(0)
    hard = 3 * torch.rand(400, generator=g)  # items differ a lot in difficulty, the same for both models
    one = {"a": {"loss": hard + 0.01 * torch.randn(400, generator=g)}}
    two = {"a": {"loss": hard + 0.05 + 0.01 * torch.randn(400, generator=g)}}
    raw_one = {"a": {"loss": float(one["a"]["loss"].mean()), "loss_se": float(hard.std() / 20)},
               "b": {"loss": 3.0, "loss_se": 0.2}}
    raw_two = {"a": {"loss": float(two["a"]["loss"].mean()), "loss_se": float(hard.std() / 20)},
               "b": {"loss": 3.0, "loss_se": 0.2}}
    d = one["a"]["loss"] - two["a"]["loss"]
    paired_a = 0.5 * float(d.std() / 20)  # coefficient 1/2, spread 1
    unpaired_b = 0.5 * (0.2**2 + 0.2**2) ** 0.5  # b has no per-item values: the two standard errors in quadrature
    se = obj.diff_se(raw_one, raw_two, one, two)
    assert se == pytest.approx((paired_a**2 + unpaired_b**2) ** 0.5, rel=1e-6)
    # pairing removes what the items share: far below the unpaired standard error of benchmark a
    assert paired_a < 0.1 * 0.5 * 2**0.5 * float(hard.std() / 20)
    assert obj.diff_se(raw_one, raw_one, one, one) == pytest.approx(unpaired_b)  # a vs itself: no noise on a
