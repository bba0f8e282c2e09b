"""LoRA experts in the merger: equal to peft's own merge of the same weighted adapters, mixed with full experts,
under TIES (formed per tensor), streamed, and refused in one line when they do not fit the base."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from mergemix.catalog import MERGE_METHODS
from mergemix.errors import MergemixError
from mergemix.merge import InPlaceMerger
from mergemix.merge.check import tensor_specs
from mergemix.merge.lora import ADAPTER_FILE, LoraExpert, check_adapter
from mergemix.merge.methods import merge_tensor
from mergemix.recipe import MergeSpec

# two adapters of different ranks, scales and targets (one adapts every linear layer, one only q and v)
ADAPTERS = {"a": {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"},
            "b": {"r": 2, "lora_alpha": 5, "target_modules": ["q_proj", "v_proj"]}}


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture
def adapters(tiny_lm: tuple[Any, Any], tmp_path: Path) -> tuple[torch.nn.Module, dict[str, Path]]:
    """(a copy of the tiny base, adapter directories saved by peft with random nonzero A and B)."""
    from peft import LoraConfig, get_peft_model

    base = copy.deepcopy(tiny_lm[0])
    dirs = {}
    for i, (name, kw) in enumerate(ADAPTERS.items()):
        torch.manual_seed(i)
        peft_model = get_peft_model(copy.deepcopy(base), LoraConfig(init_lora_weights=False, **kw))
        dirs[name] = tmp_path / name
        peft_model.save_pretrained(dirs[name])
    return base, dirs


def _peft_reference(base: torch.nn.Module, dirs: dict[str, Path], weights: list[float]) -> dict[str, torch.Tensor]:
    """Θ_base + Σ w_k s_k B_k A_k by peft: the adapters combined with "cat", then merged into the weights."""
    from peft import PeftModel

    names = list(dirs)
    model = PeftModel.from_pretrained(copy.deepcopy(base), dirs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(dirs[name], adapter_name=name)
    model.add_weighted_adapter(names, weights, "mix", combination_type="cat")
    model.set_adapter("mix")
    return _params(model.merge_and_unload())


def test_lora_merge_equals_peft_merge_of_the_weighted_adapters(adapters: tuple[torch.nn.Module, dict[str, Path]]
                                                               ) -> None:
    base, dirs = adapters
    before = _params(base)
    merger = InPlaceMerger(base, {n: LoraExpert(d) for n, d in dirs.items()})
    assert merger.rows == [] and merger.groups[0].taus.shape[0] == 0  # no task vector is formed
    for weights in ([0.7, 0.3], [0.0, 1.0], [1.5, -0.5]):
        merger.apply(weights)
        reference = _peft_reference(_with(base, before), dirs, weights)
        got = _params(base)
        assert set(got) == set(reference)
        for n in got:
            torch.testing.assert_close(got[n], reference[n], rtol=1e-5, atol=1e-6)
        changed = [n for n in got if not torch.equal(got[n], before[n])]
        assert changed and all(".self_attn." in n or ".mlp." in n for n in changed)  # adapted weights only
    merger.restore()
    assert all(torch.equal(p, before[n]) for n, p in _params(base).items())


def _with(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> torch.nn.Module:
    """A copy of `model` holding `state`."""
    out = copy.deepcopy(model)
    out.load_state_dict(state, strict=False)
    return out


@pytest.mark.parametrize("spec", [MergeSpec(), MergeSpec(normalize=True, scale=0.5)], ids=["linear", "normalized"])
def test_full_and_lora_experts_mix(adapters: tuple[torch.nn.Module, dict[str, Path]], spec: MergeSpec) -> None:
    """A full expert beside the LoRA ones: its task vector adds as usual (also where no adapter acts, e.g. the
    norms and embeddings); normalize divides by all three weights."""
    base, dirs = adapters
    before = _params(base)
    torch.manual_seed(5)
    full = {n: p + 0.01 * torch.randn_like(p) for n, p in before.items()}
    weights = [0.5, 0.2, 0.3]
    merger = InPlaceMerger(base, {"a": LoraExpert(dirs["a"]), "full": full, "b": LoraExpert(dirs["b"])}, spec)
    merger.apply(weights)
    lora = _peft_reference(_with(base, before), dirs, [weights[0], weights[2]])
    factor = spec.scale / (sum(weights) if spec.normalize else 1)
    for n, got in _params(base).items():
        want = before[n] + factor * ((lora[n] - before[n]) + weights[1] * (full[n] - before[n]))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the differentiable form gives the same weights, and a gradient for every weight
    alpha = torch.tensor(weights, requires_grad=True)
    state = merger.merged_state(alpha)
    for n, got in _params(base).items():
        torch.testing.assert_close(state[n].detach(), got, rtol=1e-6, atol=1e-7)
    sum(t.square().sum() for t in state.values()).backward()
    assert alpha.grad is not None and bool((alpha.grad != 0).all())


def test_ties_forms_each_lora_task_vector_per_tensor(adapters: tuple[torch.nn.Module, dict[str, Path]]) -> None:
    """TIES trims each expert's own task vector, so a LoRA expert's s B A is formed: the merge equals the
    per-tensor reference on those task vectors; streamed with a tiny budget gives the same bits."""
    base, dirs = adapters
    before = _params(base)
    loras = {n: LoraExpert(d) for n, d in dirs.items()}
    spec = MergeSpec(method="ties", density=0.3)
    merger = InPlaceMerger(base, loras, spec)
    assert merger.rows == [0, 1]
    weights = torch.tensor([0.6, 0.4])
    merger.apply(weights)
    resident = _params(base)
    for n, got in resident.items():
        taus = [(e[n].b @ e[n].a) * e[n].scale if n in e else torch.zeros_like(got) for e in loras.values()]
        want = merge_tensor(MERGE_METHODS.get("ties"), before[n], taus, weights, density=0.3)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    streamed = InPlaceMerger(_with(base, before), loras, spec.model_copy(update={"stream": True, "memory_mb": 0.001}))
    streamed.apply(weights)
    assert all(torch.equal(p, resident[n]) for n, p in streamed.model.named_parameters())


def test_linear_lora_merge_streamed_in_small_groups_is_the_same(adapters: tuple[torch.nn.Module, dict[str, Path]]
                                                                ) -> None:
    base, dirs = adapters
    before = _params(base)
    loras = {n: LoraExpert(d) for n, d in dirs.items()}
    InPlaceMerger(base, loras).apply([0.3, 0.7])
    small = InPlaceMerger(_with(base, before), loras, MergeSpec(stream=True, memory_mb=0.001))
    assert len(small.groups) == len(before)
    small.apply([0.3, 0.7])
    for n, p in small.model.named_parameters():
        torch.testing.assert_close(p, base.get_parameter(n), rtol=0, atol=1e-7)


def test_an_adapter_that_does_not_fit_the_base_is_refused_in_one_line(
        adapters: tuple[torch.nn.Module, dict[str, Path]], tmp_path: Path) -> None:
    base, dirs = adapters
    path = dirs["b"] / ADAPTER_FILE
    tensors = load_file(str(path))
    key = next(k for k in tensors if k.endswith("q_proj.lora_A.weight"))
    save_file({**tensors, key: torch.zeros(2, 48)}, str(path))  # another model's width
    with pytest.raises(MergemixError, match=r"^expert b: cannot merge it into the base: its adapter on "
                       r"model\.layers\.0\.self_attn\.q_proj\.weight updates a \[32, 48\] weight, the base's is "
                       r"\[32, 32\]$"):
        InPlaceMerger(base, {n: LoraExpert(d) for n, d in dirs.items()})
    assert check_adapter(tmp_path / "missing", tensor_specs(_params(base))).startswith(
        "cannot read it (not a peft LoRA adapter directory")


def test_report_cosines_of_lora_experts_equal_those_of_their_merged_weights(
        adapters: tuple[torch.nn.Module, dict[str, Path]]) -> None:
    from mergemix.merge.lora import Applied
    from mergemix.report.interference import task_vector_cosines

    base, dirs = adapters
    before = _params(base)
    applied = [Applied(LoraExpert(d), before) for d in dirs.values()]
    merged = [_peft_reference(base, {n: d}, [1.0]) for n, d in dirs.items()]
    want = task_vector_cosines(before, merged)
    assert abs(want[0, 1]) > 1e-3  # the adapters share q and v
    np.testing.assert_allclose(task_vector_cosines(before, applied), want, atol=1e-4)


@pytest.mark.parametrize("method", ["linear", "ties"])
def test_mergekit_merges_the_exported_lora_references_the_same(adapters: tuple[torch.nn.Module, dict[str, Path]],
                                                              tmp_path: Path, method: str) -> None:
    """What `mergemix export` writes for LoRA experts (BASE+ADAPTER) runs in mergekit (given a LoRA merge
    cache) and gives the merger's weights: mergekit merges each adapter into the base with peft, so its task
    vector is (Θ_base + s B A) − Θ_base, equal to s B A up to rounding."""
    pytest.importorskip("mergekit", reason="mergekit is a test extra: pip install 'mergemix[test]'")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    from safetensors.torch import load_file as load

    from mergemix.pipelines.export import mergekit_config, mergekit_model

    base, dirs = adapters
    base.save_pretrained(tmp_path / "base")
    spec = MergeSpec(method=method, density=0.5)
    alpha = {"a": 0.7, "b": 0.6}
    models = {n: mergekit_model(tmp_path / "base", d, lora=True) for n, d in dirs.items()}
    config = mergekit_config(spec, tmp_path / "base", models, alpha, "float32")
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"),
              MergeOptions(lora_merge_cache=str(tmp_path / "cache"), copy_tokenizer=False, write_model_card=False))
    theirs = load(str(tmp_path / "mk" / "model.safetensors"))
    before = _params(base)
    InPlaceMerger(base, {n: LoraExpert(d) for n, d in dirs.items()}, spec).apply(list(alpha.values()))
    mine = _params(base)
    assert set(theirs) <= set(mine) and any(not torch.equal(t, before[n]) for n, t in theirs.items())
    for n, t in theirs.items():
        torch.testing.assert_close(mine[n], t, rtol=0, atol=1e-6)
