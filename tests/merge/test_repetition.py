"""search.repetition discount: the value of repeated tokens (Muennighoff et al. 2023) and the merge weights
a mixture is scored at when the data it repeats is counted."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergemix.artifacts import read_jsonl
from mergemix.merge.repetition import R_STAR, discounted, token_value
from mergemix.pipelines.propose import propose
from mergemix.recipe import load_recipe


def test_a_repeated_token_is_worth_less_the_more_it_is_repeated() -> None:
    e = torch.tensor([0.2, 1.0, 2.0, 6.0, 40.0], dtype=torch.float64)
    value = token_value(e)
    assert value[:2].tolist() == [1.0, 1.0]  # data seen at most once is worth its tokens
    assert value[3].item() == pytest.approx((1 + R_STAR * (1 - math.exp(-5 / R_STAR))) / 6)
    assert all(a > b for a, b in zip(value[1:].tolist(), value[2:].tolist(), strict=False))


def test_discounted_weights_shrink_a_repeated_domain_and_keep_the_sum() -> None:
    available = torch.tensor([1e6, 1e6, 1e4], dtype=torch.float64)
    alpha = torch.tensor([0.4, 0.4, 0.2], dtype=torch.float64, requires_grad=True)
    assert torch.equal(discounted(alpha.detach(), 1e4, available), alpha.detach())  # nothing repeated at 10k
    w = discounted(alpha, 1e6, available)  # the small domain: 0.2 x 1e6 / 1e4 = 20 epochs
    assert w.sum().item() == pytest.approx(1.0) and w[2] < 0.2 and w[0] == w[1] > 0.4
    w[2].backward()
    assert torch.isfinite(alpha.grad).all()
    assert discounted(torch.zeros(3, dtype=torch.float64), 1e6, available).tolist() == [0.0, 0.0, 0.0]


@pytest.mark.slow
def test_a_search_with_repetition_counted_scores_other_merges(micro_recipe_file: Path) -> None:
    plain = load_recipe(micro_recipe_file)
    propose(plain)
    log = read_jsonl(plain.resolved_run_dir() / "trials.jsonl")
    counted = load_recipe(micro_recipe_file, ["search.repetition=discount"])  # 100k tokens on ~5-20k a domain
    proposal = propose(counted)
    again = read_jsonl(counted.resolved_run_dir() / "trials.jsonl")[len(log):]
    assert again and {t["eval_key"] for t in again}.isdisjoint({t["eval_key"] for t in log})
    uniform = next(t for t in again if t["kind"] == "uniform")
    assert uniform["raw"] != next(t for t in log if t["kind"] == "uniform")["raw"]  # its merge was discounted
    assert sum(proposal.alpha_star.values()) == pytest.approx(1.0, abs=1e-5)
