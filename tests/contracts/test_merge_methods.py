"""Every registered merge method (mergemix.catalog.MERGE_METHODS) keeps the merge's contract: α = 0 is the
base, a vertex is that expert (with density 1 nothing is trimmed or dropped), restore puts the base back, and
the reference per-tensor form (`merge_tensor`) equals the in-place merger. Sharded equals whole: the 2-process
launch of tests/merge/test_shard.py runs every registered method too."""

from __future__ import annotations

import pytest
import torch

from mergemix.catalog import MERGE_METHODS
from mergemix.merge import InPlaceMerger
from mergemix.merge.methods import merge_tensor
from mergemix.recipe import MergeSpec


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))


def _experts(model: torch.nn.Module, k: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [{n: p.detach() + 0.05 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
            for _ in range(k)]


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_zero_is_the_base_and_a_vertex_is_the_expert(method: str) -> None:
    model = _model()
    base, experts = _params(model), _experts(model)
    merger = InPlaceMerger(model, experts, MergeSpec(method=method, density=1.0), seed=0)
    merger.apply([0.0, 0.0, 0.0])
    assert all(torch.equal(p, base[n]) for n, p in _params(model).items())
    for k, expert in enumerate(experts):
        merger.apply([1.0 if j == k else 0.0 for j in range(len(experts))])
        for n, p in _params(model).items():
            torch.testing.assert_close(p, expert[n], rtol=0, atol=1e-6, msg=f"{method}: vertex {k}, {n}")
    merger.restore()
    assert all(torch.equal(p, base[n]) for n, p in _params(model).items())


@pytest.mark.parametrize("method", list(MERGE_METHODS))
def test_the_in_place_merge_equals_the_reference_form(method: str) -> None:
    model = _model()
    base, experts = _params(model), _experts(model)
    alpha = [0.5, 0.3, 0.2]
    spec = MergeSpec(method=method, density=0.6)
    InPlaceMerger(model, experts, spec, seed=0).apply(alpha)
    impl = MERGE_METHODS.get(method)
    for n, p in _params(model).items():
        taus = [e[n] - base[n] for e in experts]
        if impl.sparsify is None:  # no random draw: the reference form is the same computation
            want = merge_tensor(impl, base[n], taus, torch.tensor(alpha), density=spec.density, scale=spec.scale)
            torch.testing.assert_close(p, want, rtol=1e-6, atol=1e-7, msg=f"{method}: {n}")
        assert p.shape == base[n].shape and torch.isfinite(p).all()


def test_every_method_name_loads_and_names_its_mergekit_method() -> None:
    for name in MERGE_METHODS:
        impl = MERGE_METHODS.get(name)
        assert impl.mergekit in ("task_arithmetic", "ties", "dare_linear", "dare_ties"), name
