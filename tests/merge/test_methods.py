"""Merge methods against mergekit 0.1.5 (a test extra): the same tensors from the same inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergemix.catalog import MERGE_METHODS
from mergemix.merge import InPlaceMerger
from mergemix.merge.methods import drop, merge_tensor
from mergemix.recipe import MergeSpec

mergekit = pytest.importorskip("mergekit", reason="mergekit is a test extra: pip install 'mergemix[test]'")


def _llama(seed: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, vocab_size=64, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny fp32 base and two experts: the base plus noise of two sizes (some entries of opposite sign)."""
    root = tmp_path_factory.mktemp("ckpt")
    base = _llama(0)
    paths = {"base": root / "base"}
    base.save_pretrained(paths["base"])
    for i, (name, shift) in enumerate((("code", 0.02), ("math", 0.05))):
        expert = _llama(0)
        gen = torch.Generator().manual_seed(i + 1)
        with torch.no_grad():
            for p in expert.parameters():
                p.add_(shift * torch.randn(p.shape, generator=gen))
        paths[name] = root / name
        expert.save_pretrained(paths[name])
    return paths


def _mergekit(paths: dict[str, Path], out: Path, method: str, weights: list[float], **params: object) -> dict:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    density = params.pop("density", None)
    models = [{"model": str(paths[n]), "parameters": {"weight": w, **({"density": density} if density else {})}}
              for n, w in zip(("code", "math"), weights, strict=True)]
    config = MergeConfiguration.model_validate({
        "merge_method": method, "base_model": str(paths["base"]), "models": models, "dtype": "float32",
        "parameters": params,
    })
    run_merge(config, str(out), MergeOptions(copy_tokenizer=False, write_model_card=False))
    state: dict = {}
    for f in sorted(out.glob("*.safetensors")):
        state.update(load_file(str(f)))
    return state


def _mergemix(paths: dict[str, Path], spec: MergeSpec, weights: list[float]) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from mergemix.merge.lazy import SafetensorsState

    model = AutoModelForCausalLM.from_pretrained(paths["base"], dtype=torch.float32)
    experts = {n: SafetensorsState(paths[n] / "model.safetensors") for n in ("code", "math")}
    InPlaceMerger(model, experts, spec).apply(weights)
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("method", "ours", "params"), [
    ("task_arithmetic", MergeSpec(method="linear"), {}),
    ("task_arithmetic", MergeSpec(method="task_arithmetic", scale=0.7), {"lambda": 0.7}),
    ("ties", MergeSpec(method="ties", density=0.3), {"density": 0.3}),
    ("ties", MergeSpec(method="ties", density=0.6, normalize=False, rescale=True),
     {"density": 0.6, "normalize": False, "rescale": True}),
])
def test_checkpoint_merges_equal_mergekit(checkpoints: dict[str, Path], tmp_path: Path, method: str,
                                          ours: MergeSpec, params: dict) -> None:
    weights = [0.35, 0.65]
    theirs = _mergekit(checkpoints, tmp_path / "out", method, weights, **params)
    mine = _mergemix(checkpoints, ours, weights)
    assert set(theirs) == set(mine)
    for name, t in theirs.items():
        torch.testing.assert_close(mine[name], t, atol=1e-6, rtol=0)
    if method == "task_arithmetic" and ours.scale == 1:
        assert all(torch.equal(mine[n], t) for n, t in theirs.items())  # bit for bit


def test_dare_drop_draws_the_same_mask_as_mergekit() -> None:
    from mergekit.sparsify import RescaleNorm, SparsificationMethod, sparsify

    tau = torch.randn(40, 30, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    theirs = sparsify(tau, density=0.4, method=SparsificationMethod.random, rescale_norm=RescaleNorm.l1)
    mine = drop(tau, 0.4, True, torch.Generator().manual_seed(11))
    assert torch.equal(mine, theirs)
    assert 0.3 < (mine != 0).float().mean() < 0.5


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties", "ties", "task_arithmetic"])
def test_per_tensor_merge_equals_mergekit_merge_group(method: str) -> None:
    """Same inputs and, for DARE, the same draws (one generator consumed in expert order, as mergekit's
    global one is): the same merged tensor."""
    from mergekit.merge_methods import registry
    from mergekit.merge_methods.base import TensorGroup

    g = torch.Generator().manual_seed(5)
    base = torch.randn(24, 16, generator=g)
    experts = [base + 0.1 * torch.randn(24, 16, generator=g) for _ in range(3)]
    weights = [0.2, 0.5, 0.3]
    group = TensorGroup.from_tensors([base, *experts], base_index=0)
    spec = MERGE_METHODS.get(method)
    torch.manual_seed(9)
    theirs = registry.get(method).merge_group(
        group, weight=dict(zip([1, 2, 3], weights, strict=True)), density={1: 0.5, 2: 0.5, 3: 0.5},
        rescale=spec.rescale, normalize=spec.normalize, int8_mask=False, **{"lambda": 1.0})
    shared = torch.Generator().manual_seed(9)
    mine = merge_tensor(spec, base, [e - base for e in experts], torch.tensor(weights), density=0.5,
                        generators=[shared] * 3)
    torch.testing.assert_close(mine, theirs, atol=1e-6, rtol=0)


def test_dare_is_task_arithmetic_in_expectation() -> None:
    """Over seeds, DARE's drop-and-rescale averages to the task vector itself."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(64, generator=g)
    taus = [0.1 * torch.randn(64, generator=g) for _ in range(2)]
    a = torch.tensor([0.4, 0.6])
    spec = MERGE_METHODS.get("dare_linear")
    mean = torch.stack([
        merge_tensor(spec, base, taus, a, density=0.5, rescale=True,
                     generators=[torch.Generator().manual_seed(s), torch.Generator().manual_seed(10_000 + s)])
        for s in range(2000)
    ]).mean(0)
    exact = base + 0.4 * taus[0] + 0.6 * taus[1]
    assert (mean - exact).abs().max() < 0.01  # per-entry std over 2000 draws ~0.002


def test_recipe_names_a_method_with_a_hint_and_keys_only_changes(micro_recipe_file: Path) -> None:
    from mergemix.errors import MergemixError
    from mergemix.recipe import load_recipe

    with pytest.raises(MergemixError, match=r"merge\.method: .*unknown merge method 'tie'.*did you mean 'ties'"):
        load_recipe(micro_recipe_file, ["merge.method=tie"])
    assert load_recipe(micro_recipe_file).merge.key() == "linear"  # trial logs of earlier runs still count
    assert load_recipe(micro_recipe_file, ["merge.stream=true", "merge.memory_mb=64"]).merge.key() == "linear"
    ties = load_recipe(micro_recipe_file, ["merge.method=ties", "merge.density=0.2"]).merge
    assert ties.key() == ["ties", {"density": 0.2}]
