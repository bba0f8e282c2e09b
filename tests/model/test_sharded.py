"""A base read shard by shard (mergemix.model.sharded), in one process of a one-process gloo group: the same
code a launch of N runs, here with N = 1 (the 2-process launches are in tests/pipelines/test_distributed.py)."""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergemix.errors import MergemixError
from mergemix.merge.lazy import checkpoint_state
from mergemix.model.modeling import save_checkpoint_dir
from mergemix.model.sharded import gathered, is_sharded, load_sharded, trainable


@pytest.fixture
def group(tmp_path: Path) -> Iterator[None]:
    """A process group of this process alone (what FSDP2 shards over)."""
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield
    torch.distributed.destroy_process_group()


@pytest.fixture
def base_dir(tiny_lm: tuple[Any, Any], tmp_path: Path) -> Path:
    model, tok = tiny_lm
    save_checkpoint_dir(model, tok, tmp_path / "base")
    return tmp_path / "base"


def test_a_sharded_base_and_its_gathering_equal_the_base(group: None, tiny_lm: tuple[Any, Any],
                                                          base_dir: Path) -> None:
    """The base built on the meta device and filled from its files scores as the base does (rotary buffers
    computed, the output embedding tied), and gathered whole it has the base's tensors."""
    base, _ = tiny_lm
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    want = base(input_ids=ids).logits
    sharded = load_sharded(base_dir, partial(checkpoint_state, base_dir), torch.float32, torch.device("cpu"))
    assert is_sharded(sharded) and not is_sharded(base)
    assert sharded.lm_head.weight is sharded.model.embed_tokens.weight
    torch.testing.assert_close(sharded(input_ids=ids).logits, want)
    whole = gathered(sharded, torch.float32)
    assert whole is not None and not is_sharded(whole)
    torch.testing.assert_close(whole(input_ids=ids).logits, want)
    assert whole.lm_head.weight is whole.model.embed_tokens.weight
    assert set(whole.state_dict()) == set(base.state_dict())


def _step(model: torch.nn.Module, ids: torch.Tensor) -> None:
    """One update that changes every parameter, and leaves gradients behind (what training does)."""
    model(input_ids=ids, labels=ids).loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)


def test_a_float32_sharded_base_trains_in_place_and_is_read_back(group: None, tiny_lm: tuple[Any, Any],
                                                                base_dir: Path) -> None:
    """No second shard: the base itself is what trains, and it is the base again afterwards, its gradients
    gone (they would hold a shard's worth of memory for nothing)."""
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    want = tiny_lm[0](input_ids=ids).logits
    sharded = load_sharded(base_dir, partial(checkpoint_state, base_dir), torch.float32, torch.device("cpu"))
    with trainable(sharded) as model:
        assert model is sharded
        _step(model, ids)
        assert not torch.allclose(model(input_ids=ids).logits, want)
    torch.testing.assert_close(sharded(input_ids=ids).logits, want)
    assert all(p.grad is None for p in sharded.parameters())


def test_other_models_train_a_float32_copy(group: None, tiny_lm: tuple[Any, Any], base_dir: Path) -> None:
    """A bf16 sharded base trains a float32 sharded copy of its rows; an unsharded one a deep copy; both stay."""
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    sharded = load_sharded(base_dir, partial(checkpoint_state, base_dir), torch.bfloat16, torch.device("cpu"))
    want = sharded(input_ids=ids).logits
    with trainable(sharded) as model:
        assert model is not sharded and is_sharded(model)
        assert {p.dtype for p in model.parameters()} == {torch.float32}
        torch.testing.assert_close(model(input_ids=ids).logits, want.float(), atol=0.05, rtol=0.05)
        _step(model, ids)
    torch.testing.assert_close(sharded(input_ids=ids).logits, want)
    base = tiny_lm[0]
    before = {n: t.clone() for n, t in base.state_dict().items()}
    with trainable(base) as model:
        assert model is not base
        _step(model, ids)
    for name, t in base.state_dict().items():
        torch.testing.assert_close(t, before[name])


def test_a_base_with_other_tensor_names_is_refused_in_one_line(group: None, base_dir: Path) -> None:
    tensors = load_file(str(base_dir / "model.safetensors"))
    save_file({f"transformer.{k}": v for k, v in tensors.items()}, str(base_dir / "model.safetensors"))
    with pytest.raises(MergemixError, match=r"base.path: .* has no tensor 'model.embed_tokens.weight' .* "
                                            "save_pretrained"):
        load_sharded(base_dir, partial(checkpoint_state, base_dir), torch.float32, torch.device("cpu"))


def test_an_fsdp_launch_refuses_a_base_without_safetensors(base_dir: Path, micro_data: dict[str, Any],
                                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Read shard by shard, the base must be safetensors files; said before any process group is needed."""
    from mergemix.recipe import recipe_from_dict
    from mergemix.run.workspace import _load_base
    from tests.conftest import micro_recipe_dict

    (base_dir / "model.safetensors").rename(base_dir / "pytorch_model.bin")
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    d = micro_recipe_dict(micro_data, tmp_path / "run", tmp_path / "cache")
    recipe = recipe_from_dict({**d, "base": {"path": str(base_dir)}})
    with pytest.raises(MergemixError, match="holds no model.*safetensors; an FSDP launch reads the base shard"):
        _load_base(base_dir, recipe)
