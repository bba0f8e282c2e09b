from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch

from mergemix.train import Sampler, TrainConfig, train


class Killed(Exception):
    pass


def test_resumed_training_equals_uninterrupted(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    model, tok = tiny_lm
    pools = (torch.randint(0, len(tok), (20, 16)), torch.randint(0, len(tok), (20, 16)))
    sampler = Sampler(pools, (0.7, 0.3), batch_size=4, seed=3, own=pools[0], own_rows=2)
    cfg = TrainConfig(steps=6, lr=1e-3, warmup_steps=2, checkpoint_every=2)

    straight = copy.deepcopy(model)
    losses = train(straight, sampler, cfg)

    def dies_at_step_5(step: int) -> torch.Tensor:
        if step == 5:
            raise Killed
        return sampler(step)

    ckpt = tmp_path / "ckpt.safetensors"
    resumed = copy.deepcopy(model)
    with pytest.raises(Killed):
        train(resumed, dies_at_step_5, cfg, checkpoint=ckpt)
    assert ckpt.exists()
    resumed = copy.deepcopy(model)  # a fresh process: only the checkpoint survives
    losses2 = train(resumed, sampler, cfg, checkpoint=ckpt)
    assert losses2 == pytest.approx(losses)
    for (n, a), (_, b) in zip(straight.named_parameters(), resumed.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, msg=n)


def test_sampler_share_and_determinism() -> None:
    own = torch.zeros((5, 4), dtype=torch.long)
    other = torch.ones((5, 4), dtype=torch.long)
    s = Sampler((other,), (1.0,), batch_size=8, seed=0, own=own, own_rows=6)
    batch = s(7)
    assert batch.shape == (8, 4) and int((batch[:, 0] == 0).sum()) == 6
    assert torch.equal(s(7), batch)


def test_constant_schedule_after_warmup() -> None:
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=4)
    assert cfg.lr_factor(0) < cfg.lr_factor(3) < 1.0
    assert cfg.lr_factor(4) == cfg.lr_factor(99) == 1.0
    cos = TrainConfig(steps=100, lr=1.0, warmup_steps=0, schedule="cosine")
    assert cos.lr_factor(0) == pytest.approx(1.0) and cos.lr_factor(100) == pytest.approx(0.1)


class _Planted:
    """Unpickling this creates `marker`: a stand-in for code planted in a run directory."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (Path.touch, (self.marker,))


@pytest.mark.parametrize("name", ["ckpt.safetensors", "ckpt.pt"])
def test_planted_pickle_is_never_loaded(tiny_lm: tuple[Any, Any], tmp_path: Path, name: str,
                                        caplog: pytest.LogCaptureFixture) -> None:
    import pickle

    model, tok = tiny_lm
    pools = (torch.randint(0, len(tok), (20, 16)),)
    sampler = Sampler(pools, (1.0,), batch_size=4, seed=3)
    cfg = TrainConfig(steps=3, lr=1e-3, warmup_steps=0, checkpoint_every=10)
    marker = tmp_path / "pwned"
    ckpt = tmp_path / name
    ckpt.write_bytes(pickle.dumps({"model": _Planted(marker)}))
    straight = copy.deepcopy(model)
    losses = train(straight, sampler, cfg)
    planted = copy.deepcopy(model)
    with caplog.at_level("WARNING"):
        losses2 = train(planted, sampler, cfg, checkpoint=ckpt)
    assert not marker.exists()
    assert "is not a resume checkpoint of this model" in caplog.text and "starting over" in caplog.text
    assert losses2 == pytest.approx(losses) and len(losses2) == cfg.steps  # a clean restart from step 0


def test_checkpoint_holds_no_pickle(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    """The checkpoint is a plain safetensors file: tensors plus JSON metadata."""
    import json

    from safetensors import safe_open

    model, tok = tiny_lm
    sampler = Sampler((torch.randint(0, len(tok), (20, 16)),), (1.0,), batch_size=4, seed=3)
    cfg = TrainConfig(steps=4, lr=1e-3, warmup_steps=1, checkpoint_every=2)

    def dies_at_step_3(step: int) -> torch.Tensor:
        if step == 3:
            raise Killed
        return sampler(step)

    ckpt = tmp_path / "ckpt.safetensors"
    with pytest.raises(Killed):
        train(copy.deepcopy(model), dies_at_step_3, cfg, checkpoint=ckpt)
    with safe_open(str(ckpt), framework="pt") as f:
        meta = json.loads(f.metadata()["mergemix.checkpoint"])
        keys = set(f.keys())
    assert meta["step"] == 2 and len(meta["losses"]) == 2
    assert {f"model/{n}" for n, _ in model.named_parameters()} <= keys and any(k.startswith("optim/") for k in keys)
