from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergemix.errors import MergemixError
from mergemix.merge import InPlaceMerger
from mergemix.merge.check import check_expert_file, tensor_specs
from mergemix.merge.replay import merge_weights, replay_matrix
from mergemix.recipe import MergeSpec


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


def _llama_pair(dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, dict[str, dict[str, torch.Tensor]]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64)
    model = LlamaForCausalLM(cfg).to(dtype)
    g = torch.Generator().manual_seed(1)
    experts = {name: {n: (p.detach().float() + s * torch.randn(p.shape, generator=g)).to(dtype)
                      for n, p in model.named_parameters()}
               for name, s in (("code", 0.01), ("math", 0.03), ("prose", 0.02))}
    return model, experts


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("method", ["linear", "ties", "dare_linear", "dare_ties"])
def test_streamed_merge_equals_resident_exactly(tmp_path: Path, method: str) -> None:
    """A tiny memory budget (every tensor a group of its own, task vectors read from the files for every
    merge) gives the same bits as the resident merge with one group."""
    from mergemix.merge.lazy import SafetensorsState

    model, experts = _llama_pair()
    for name, state in experts.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    files = {n: SafetensorsState(tmp_path / f"{n}.safetensors") for n in experts}
    resident = InPlaceMerger(model, experts, MergeSpec(method=method, density=0.4), seed=3)
    streamed = InPlaceMerger(model, files, MergeSpec(method=method, density=0.4, stream=True, memory_mb=0.001),
                             seed=3)
    assert len(resident.groups) == 1 and len(streamed.groups) == len(list(model.parameters()))
    for alpha in ([0.2, 0.5, 0.3], [1.0, 0.0, 0.0], [0.6, -0.1, 0.5]):
        resident.apply(alpha)
        want = _params(model)
        streamed.restore()
        streamed.apply(alpha)
        got = _params(model)
        assert all(torch.equal(got[n], want[n]) for n in want)


def test_streamed_merge_reads_the_base_from_its_file_instead_of_a_copy(tmp_path: Path) -> None:
    """With the base's own file, a streamed merger keeps no copy of Θ_base (it reads it for every merge) and
    gives the resident merge's bits; a tensor whose saved values differ from the model's keeps its copy."""
    from mergemix.merge.lazy import SafetensorsState, checkpoint_state

    model, experts = _llama_pair()
    model.save_pretrained(tmp_path / "base")
    base_file = checkpoint_state(tmp_path / "base")
    assert base_file is not None and checkpoint_state(tmp_path) is None
    for name, state in experts.items():
        save_file(state, str(tmp_path / f"{name}.safetensors"))
    files = {n: SafetensorsState(tmp_path / f"{n}.safetensors") for n in experts}
    before = _params(model)
    resident = InPlaceMerger(model, experts, MergeSpec(method="ties", density=0.4))
    spec = MergeSpec(method="ties", density=0.4, stream=True, memory_mb=0.01)
    streamed = InPlaceMerger(model, files, spec, base_files=base_file)
    assert len(streamed.groups) > 1 and all(g.base is None for g in streamed.groups)
    changed = {**before, "model.norm.weight": before["model.norm.weight"] + 1}
    save_file(changed, str(tmp_path / "changed.safetensors"))
    partly = InPlaceMerger(model, files, spec, base_files=SafetensorsState(tmp_path / "changed.safetensors"))
    kept = [g.names for g in partly.groups if g.base is not None]
    assert ["model.norm.weight"] in kept or any("model.norm.weight" in names for names in kept)
    assert len(kept) < len(partly.groups)
    for alpha in ([0.2, 0.5, 0.3], [0.6, -0.1, 0.5]):
        resident.apply(alpha)
        want = _params(model)
        for merger in (streamed, partly):
            merger.restore()
            assert all(torch.equal(p, before[n]) for n, p in _params(model).items())
            merger.apply(alpha)
            assert all(torch.equal(p, want[n]) for n, p in _params(model).items())
    assert all(torch.equal(streamed.base[n], before[n]) for n in before)


def test_dare_draws_follow_the_seed_and_not_the_expert_order() -> None:
    model, experts = _llama_pair()
    spec = MergeSpec(method="dare_linear", density=0.5)

    def merged(order: tuple[str, ...], alpha: list[float], seed: int) -> dict[str, torch.Tensor]:
        merger = InPlaceMerger(model, {n: experts[n] for n in order}, spec, seed=seed)
        merger.apply(alpha)
        out = _params(model)
        merger.restore()
        return out

    first = merged(("code", "math", "prose"), [0.2, 0.5, 0.3], 1)
    reordered = merged(("prose", "code", "math"), [0.3, 0.2, 0.5], 1)  # the same merge (sum in another order)
    for n, p in reordered.items():
        torch.testing.assert_close(p, first[n], atol=1e-6, rtol=0)
    other = merged(("code", "math", "prose"), [0.2, 0.5, 0.3], 2)
    assert max((other[n] - first[n]).abs().max().item() for n in first) > 1e-3


def test_bfloat16_task_vectors_accumulate_in_float32() -> None:
    model, experts = _llama_pair(torch.bfloat16)
    base = {n: p.float() for n, p in _params(model).items()}
    merger = InPlaceMerger(model, experts, "linear")
    assert all(g.taus is not None and g.taus.dtype == torch.bfloat16 for g in merger.groups)
    merger.apply([0.5, 0.25, 0.25])
    for n, p in _params(model).items():
        taus = [(experts[e][n].float() - base[n]).bfloat16().float() for e in ("code", "math", "prose")]
        want = (base[n] + (0.5 * taus[0] + 0.25 * taus[1] + 0.25 * taus[2])).bfloat16()
        assert p.dtype == torch.bfloat16
        torch.testing.assert_close(p, want, atol=0, rtol=0)
    wide = InPlaceMerger(model, experts, MergeSpec(task_vectors="float32"))
    assert all(g.taus is not None and g.taus.dtype == torch.float32 for g in wide.groups)


def test_merged_state_is_differentiable_in_alpha() -> None:
    model, experts = _llama_pair()
    merger = InPlaceMerger(model, experts)
    alpha = torch.tensor([0.2, 0.5, 0.3], requires_grad=True)
    state = merger.merged_state(alpha)
    name = "model.layers.0.mlp.up_proj.weight"
    state[name].sum().backward()
    assert alpha.grad is not None
    want = [(experts[e][name] - merger.base[name]).sum() for e in ("code", "math", "prose")]
    torch.testing.assert_close(alpha.grad, torch.stack(want), rtol=1e-4, atol=1e-4)
    merger.apply(alpha.detach())
    assert torch.equal(dict(model.named_parameters())[name].detach(), state[name].detach())


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_chunks_across_tensor_boundaries_give_the_reference_merge(monkeypatch: pytest.MonkeyPatch,
                                                                  method: str) -> None:
    """Steps of 96 entries share small tensors and cut large ones; each tensor still equals the reference
    per-tensor merge (mergekit's order of operations) bit for bit."""
    from mergemix.catalog import MERGE_METHODS
    from mergemix.merge import inplace
    from mergemix.merge.methods import merge_tensor

    monkeypatch.setattr(inplace, "CHUNK", 3 * 96)
    monkeypatch.setattr(inplace, "ALIGN", 32)
    model, experts = _llama_pair()
    base = _params(model)
    merger = InPlaceMerger(model, experts, MergeSpec(method=method, density=0.3))
    assert any(len(c.dests) > 1 for g in merger.groups for c in g.chunks)
    merger.apply([0.2, 0.5, 0.3])
    spec = MERGE_METHODS.get(method)
    for n, p in _params(model).items():
        taus = [experts[e][n] - base[n] for e in ("code", "math", "prose")]
        want = merge_tensor(spec, base[n], taus, torch.tensor([0.2, 0.5, 0.3]), density=0.3)
        assert torch.equal(p, want), n


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_eight_experts_and_odd_sizes_give_the_reference_merge(monkeypatch: pytest.MonkeyPatch, method: str) -> None:
    """With K ≥ 5 torch sums a tensor's last (numel mod 32) entries in another order than the rest; steps
    keep every entry in the loop it has in the whole-tensor (mergekit) merge, so tensors of odd sizes cut
    into steps and packed with others still equal it bit for bit."""
    from mergemix.catalog import MERGE_METHODS
    from mergemix.merge import inplace
    from mergemix.merge.methods import merge_tensor

    monkeypatch.setattr(inplace, "CHUNK", 8 * 1024)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(37, 29), torch.nn.Linear(29, 64), torch.nn.Linear(64, 75),
                                torch.nn.Linear(75, 3))
    base = _params(model)
    g = torch.Generator().manual_seed(2)
    experts = [{n: b + 10.0 ** (k % 5 - 2) * torch.randn(b.shape, generator=g) for n, b in base.items()}
               for k in range(8)]
    alpha = torch.linspace(-0.3, 0.9, 8)
    merger = InPlaceMerger(model, experts, MergeSpec(method=method, density=0.5))
    assert len(merger.groups) == 1 and len(merger.groups[0].chunks) > 4
    merger.apply(alpha)
    spec = MERGE_METHODS.get(method)
    for n, p in _params(model).items():
        want = merge_tensor(spec, base[n], [e[n] - base[n] for e in experts], alpha, density=0.5)
        assert torch.equal(p, want), n


def test_replay_weights_score_the_mixture_the_experts_stand_for() -> None:
    prior = [0.5, 0.3, 0.2]
    m = replay_matrix(0.25, prior)
    assert replay_matrix(0.0, prior) is None and merge_weights(None, [0.2, 0.8, 0.0]) == [0.2, 0.8, 0.0]
    alpha = [0.7, 0.3, 0.0]
    w = merge_weights(m, alpha)
    # each expert saw 0.75 of its domain and 0.25 of the prior: the merge at w stands for alpha again
    stands_for = [0.75 * wi + 0.25 * pi for wi, pi in zip(w, prior, strict=True)]
    assert stands_for == pytest.approx(alpha, abs=1e-12) and sum(w) == pytest.approx(1.0, abs=1e-12)
    assert w[2] == pytest.approx(-0.25 * 0.2 / 0.75)  # a domain left out: a step away from its expert
    assert merge_weights(m, [0.0, 0.0, 0.0]) == [0.0, 0.0, 0.0]  # the base stays the base
