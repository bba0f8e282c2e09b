from __future__ import annotations

import torch

from mergemix.merge import InPlaceMerger


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))


def _expert(model: torch.nn.Module, shift: float) -> dict[str, torch.Tensor]:
    return {n: p.detach() + shift * torch.randn_like(p) for n, p in model.named_parameters()}


def test_vertices_base_and_linear_combination() -> None:
    model = _model()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    e1, e2 = _expert(model, 0.1), _expert(model, 0.3)
    merger = InPlaceMerger(model, [e1, e2])
    merger.apply([1.0, 0.0])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, e1[n])
    merger.apply([0.25, 0.75])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, base[n] + 0.25 * (e1[n] - base[n]) + 0.75 * (e2[n] - base[n]))
    merger.apply([0.0, 0.0])
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, base[n])
    merger.apply([0.5, 0.5])
    merger.restore()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p, base[n])


def test_merging_is_in_place() -> None:
    model = _model()
    ptrs = [p.data_ptr() for p in model.parameters()]
    merger = InPlaceMerger(model, [_expert(model, 0.1), _expert(model, 0.1)])
    merger.apply([0.3, 0.7])
    assert [p.data_ptr() for p in model.parameters()] == ptrs


def test_wrong_alpha_length() -> None:
    model = _model()
    merger = InPlaceMerger(model, [_expert(model, 0.1)])
    try:
        merger.apply([0.5, 0.5])
    except ValueError as e:
        assert "expected (1,)" in str(e)
    else:
        raise AssertionError("no error for a wrong alpha length")
