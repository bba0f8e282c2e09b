"""The merger on a model sharded with FSDP2 over 2 real processes (gloo on CPU): each process merges only its
rows of every parameter, reading only those rows of the experts, and the gathered result equals the
one-process merge."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergemix.catalog import MERGE_METHODS
from mergemix.merge import InPlaceMerger
from mergemix.merge.lazy import SafetensorsState
from mergemix.merge.lora import LoraExpert
from mergemix.recipe import MergeSpec

pytestmark = pytest.mark.slow

WORLD = 2
FULL = ["e0", "e1", "e2", "e3", "e4"]
# (label, merge spec, experts: full checkpoints by name, "lora": the peft adapter, α). Up to 4 experts torch
# sums over them in the same order whatever the row range; with 5 or more its vectorized loop and the scalar
# loop that ends a tensor sum in different orders, and a shard's tensors end elsewhere than the whole ones
CASES: list[tuple[str, dict[str, Any], list[str], list[float]]] = [
    ("linear", {"method": "linear"}, ["e0", "e1", "e2"], [0.5, 0.3, 0.2]),
    ("ties", {"method": "ties", "density": 0.5}, ["e0", "e1", "e2"], [0.4, 0.4, 0.2]),
    ("dare", {"method": "dare_linear", "density": 0.6}, ["e0", "e1", "e2"], [0.2, 0.5, 0.3]),
    ("dare_streamed", {"method": "dare_ties", "density": 0.6, "stream": True}, ["e0", "e1"], [0.7, 0.3]),
    ("lora_linear", {"method": "linear"}, ["e0", "lora", "e1"], [0.3, 0.5, 0.2]),
    ("lora_ties", {"method": "ties", "density": 0.5}, ["lora", "e1"], [0.6, 0.4]),
    ("linear_k6", {"method": "task_arithmetic"}, [*FULL, "lora"], [0.1, 0.2, 0.15, 0.25, 0.2, 0.1]),
]
# the contract of every registered merge method (tests/contracts): sharded equals whole
CASES += [(f"registered-{m}", {"method": m, "density": 0.7}, ["e0", "e1"], [0.45, 0.55]) for m in MERGE_METHODS]
EXACT = {label for label, _, names, _ in CASES if len(names) <= 4}


def _model() -> torch.nn.Module:
    """A 1-layer Llama whose embedding rows (301) do not split evenly over 2 processes."""
    from mergemix.model.modeling import build_demo_model
    from mergemix.recipe import DemoBaseSpec

    spec = DemoBaseSpec(hidden=32, layers=1, heads=2, ffn=64, vocab=301)
    return build_demo_model(spec, 301, 64, 0, seed=0).eval()


def _base(root: Path) -> torch.nn.Module:
    """The model holding the saved base (its parameters: the output embedding is tied to the input's)."""
    model = _model()
    state = load_file(str(root / "base.safetensors"))
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(state[n])
    return model


def _gathered(model: torch.nn.Module, names: list[str]) -> dict[str, torch.Tensor]:
    """The sharded model's parameters `names`, whole, on the main process (a collective; {} elsewhere)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {n: full[n].clone() for n in names} if full else {}


def _experts(root: Path, names: list[str]) -> dict[str, Any]:
    return {n: LoraExpert(root / n) if n == "lora" else SafetensorsState(root / f"{n}.safetensors") for n in names}


def _sharded(rank: int, root: Path) -> None:
    """One process of the launch: shard the base, merge every case, gather the merged model to the main
    process (which saves it) and note the task-vector entries this process keeps."""
    import json

    from mergemix.collective import shard_model

    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{root / 'store'}", rank=rank,
                                         world_size=WORLD)
    try:
        model = _base(root)
        params = [n for n, _ in model.named_parameters()]
        shard_model(model)
        sizes = {}
        for label, spec, names, alpha in CASES:
            base_files = SafetensorsState(root / "base.safetensors")
            merger = InPlaceMerger(model, _experts(root, names), MergeSpec(**spec), seed=3, base_files=base_files)
            merger.apply(alpha)
            full = _gathered(model, params)
            if rank == 0:
                save_file(full, str(root / f"{label}.safetensors"))
            sizes[label] = [sum(g.taus.numel() for g in merger.groups if g.taus is not None),
                            sum(g.base.numel() for g in merger.groups if g.base is not None)]
            merger.restore()
        restored = _gathered(model, params)
        if rank == 0:
            save_file(restored, str(root / "restored.safetensors"))
        (root / f"sizes{rank}.json").write_text(json.dumps(sizes))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Base, five full experts and a peft LoRA adapter on disk, merged by a 2-process sharded launch."""
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("shard")
    base = _model()
    state = {n: p.detach().clone() for n, p in base.named_parameters()}
    save_file(state, str(root / "base.safetensors"))
    for i, name in enumerate(FULL):
        g = torch.Generator().manual_seed(i)
        save_file({n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in state.items()},
                  str(root / f"{name}.safetensors"))
    torch.manual_seed(7)
    get_peft_model(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear",
                                                   init_lora_weights=False)).save_pretrained(root / "lora")
    torch.multiprocessing.spawn(_sharded, args=(root,), nprocs=WORLD, join=True)
    return root


def _one_process(root: Path, spec: dict[str, Any], names: list[str], alpha: list[float]) -> dict[str, torch.Tensor]:
    model = _base(root)
    merger = InPlaceMerger(model, _experts(root, names), MergeSpec(**spec), seed=3,
                           base_files=SafetensorsState(root / "base.safetensors"))
    merger.apply(alpha)
    return {n: p.detach() for n, p in model.named_parameters()}


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_sharded_merge_equals_one_process_merge(launched: Path, case: tuple[str, dict[str, Any], list[str],
                                                                               list[float]]) -> None:
    """Bit for bit up to 4 experts; to 1e-6 with 6 (the order torch sums them in differs in tensor tails)."""
    label, spec, names, alpha = case
    want = _one_process(launched, spec, names, alpha)
    got = load_file(str(launched / f"{label}.safetensors"))
    base = load_file(str(launched / "base.safetensors"))
    assert set(got) == set(want)
    assert any(not torch.equal(want[n], base[n]) for n in want)  # the merge changed the model
    for n in want:
        if label in EXACT:
            assert torch.equal(got[n], want[n]), (label, n, (got[n] - want[n]).abs().max())
        else:
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-6, msg=f"{label} {n}")


def test_sharded_restore_puts_the_base_back(launched: Path) -> None:
    base = load_file(str(launched / "base.safetensors"))
    restored = load_file(str(launched / "restored.safetensors"))
    assert all(torch.equal(restored[n], base[n]) for n in base)


def test_each_process_keeps_its_share_of_the_task_vectors(launched: Path) -> None:
    """Each of the 2 processes keeps about half the entries of task vectors and base copy that a one-process
    merger keeps (the embedding's 301 rows split 151 / 150); a linear merge keeps no task vector of the LoRA
    expert, a streamed one none at all, nor a base copy (it reads the base's file)."""
    import json

    sizes = [json.loads((launched / f"sizes{r}.json").read_text()) for r in range(WORLD)]
    n_params = sum(p.numel() for p in _model().parameters())
    for label, spec, names, _ in CASES:
        if spec.get("stream"):
            assert all(s[label] == [0, 0] for s in sizes)
            continue
        kept = len(names) - (label in ("lora_linear", "linear_k6"))  # a linear merge takes LoRA by its factors
        assert sum(s[label][0] for s in sizes) == kept * n_params
        assert sum(s[label][1] for s in sizes) == n_params
        for s in sizes:
            assert s[label][0] == pytest.approx(kept * n_params / WORLD, rel=0.01)
            assert s[label][1] == pytest.approx(n_params / WORLD, rel=0.01)
