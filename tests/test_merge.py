from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergemix.errors import MergemixError
from mergemix.merge import InPlaceMerger
from mergemix.merge.check import check_expert_file, tensor_specs


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


def test_an_expert_of_another_shape_is_refused_naming_it_and_the_tensor() -> None:
    model = _model()
    good = _expert(model, 0.1)
    bad = {**good, "1.weight": torch.zeros(3, 3)}
    with pytest.raises(MergemixError, match=r"^expert math: .*tensor 1\.weight has shape \[3, 3\], the base's is "
                       r"\[2, 3\]$"):
        InPlaceMerger(model, {"code": good, "math": bad})
    with pytest.raises(MergemixError, match="expert code: .*tensor 0.weight is BF16, the base's is F32"):
        InPlaceMerger(model, {"code": {**good, "0.weight": good["0.weight"].bfloat16()}})
    with pytest.raises(MergemixError, match="expert #0: .*tensor 2.weight is not in the base"):
        InPlaceMerger(model, [{**good, "2.weight": torch.zeros(1)}])


def test_expert_file_check_reads_the_header(tmp_path: Path) -> None:
    model = _model()
    specs = tensor_specs(dict(model.named_parameters()))
    path = tmp_path / "e.safetensors"
    save_file({n: p.detach().clone() for n, p in model.named_parameters()}, str(path))
    assert check_expert_file(path, specs) is None
    save_file({n: p.detach().clone() for n, p in model.named_parameters() if n != "0.bias"}, str(path))
    assert check_expert_file(path, specs) == "tensor 0.bias of the base is missing"
    path.write_bytes(b"not a model")
    assert "cannot read it" in str(check_expert_file(path, specs))
