from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from mergemix.errors import MergemixError
from mergemix.model.train import Sampler, TrainConfig, resolve_precision, train


class Killed(Exception):
    pass


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_resumed_training_equals_uninterrupted(tiny_lm: tuple[Any, Any], tmp_path: Path, lora: bool) -> None:
    """Also for LoRA experts (peft adapters on the frozen base), whose checkpoint holds only the adapters."""
    from mergemix.recipe import LoraSpec
    from mergemix.run.experts import with_adapters

    base, tok = tiny_lm
    pools = (torch.randint(0, len(tok), (20, 16)), torch.randint(0, len(tok), (20, 16)))
    sampler = Sampler(pools, (0.7, 0.3), batch_size=4, seed=3, own=pools[0], own_rows=2)
    cfg = TrainConfig(steps=6, lr=1e-3, warmup_steps=2, checkpoint_every=2)

    def fresh() -> torch.nn.Module:
        """The model to train, as a new process builds it."""
        return with_adapters(copy.deepcopy(base), LoraSpec(r=2), seed=1) if lora else copy.deepcopy(base)

    straight = fresh()
    losses = train(straight, sampler, cfg)

    def dies_at_step_5(step: int) -> torch.Tensor:
        if step == 5:
            raise Killed
        return sampler(step)

    ckpt = tmp_path / "ckpt.safetensors"
    resumed = fresh()
    with pytest.raises(Killed):
        train(resumed, dies_at_step_5, cfg, checkpoint=ckpt)
    assert ckpt.exists()
    saved = {k for k in safe_open(str(ckpt), "pt").keys() if k.startswith("model/")}  # noqa: SIM118
    assert all(".lora_" in k for k in saved) == lora and saved
    resumed = fresh()  # a fresh process: only the checkpoint survives
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


def _params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _sampler(tok: Any, batch_size: int = 8) -> Sampler:
    gen = torch.Generator().manual_seed(0)
    pools = (torch.randint(0, len(tok), (40, 16), generator=gen),)
    return Sampler(pools, (1.0,), batch_size=batch_size, seed=5)


@pytest.mark.parametrize("checkpointing", [False, True])
def test_micro_batches_equal_one_batch(tiny_lm: tuple[Any, Any], checkpointing: bool) -> None:
    """4 micro-batches of 2 (gradients accumulated) give the same weights as one batch of 8."""
    model, tok = tiny_lm
    cfg = TrainConfig(steps=3, lr=1e-3, warmup_steps=0)
    full = copy.deepcopy(model)
    losses = train(full, _sampler(tok), cfg)
    micro = copy.deepcopy(model)
    cfg_micro = TrainConfig(steps=3, lr=1e-3, warmup_steps=0, micro_batch_size=2, gradient_checkpointing=checkpointing)
    losses_micro = train(micro, _sampler(tok), cfg_micro)
    assert losses_micro == pytest.approx(losses, rel=1e-5)
    a, b = _params(full), _params(micro)
    assert any(not torch.equal(a[n], _params(model)[n]) for n in a)  # training moved the weights
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-5, atol=1e-6, msg=n)
    assert not any(getattr(m, "gradient_checkpointing", False) for m in micro.modules())


def test_micro_batch_must_divide(tiny_lm: tuple[Any, Any]) -> None:
    model, tok = tiny_lm
    with pytest.raises(MergemixError, match=r"experts.micro_batch_size: 3 does not divide the 8"):
        train(copy.deepcopy(model), _sampler(tok), TrainConfig(steps=1, lr=1e-3, warmup_steps=0, micro_batch_size=3))


def test_bf16_mixed_precision_moves_every_weight_fp32_moves(tiny_lm: tuple[Any, Any]) -> None:
    """At lr 1e-5, pure bf16 weights would round most updates away; float32 master weights with bf16
    autocast change every weight float32 training changes, and stay float32."""
    model, tok = tiny_lm
    cfg = dict(steps=2, lr=1e-5, warmup_steps=0)
    before = _params(model)
    fp32 = copy.deepcopy(model)
    train(fp32, _sampler(tok), TrainConfig(**cfg, precision="fp32"))
    bf16 = copy.deepcopy(model)
    losses = train(bf16, _sampler(tok), TrainConfig(**cfg, precision="bf16"))
    moved32 = {n: before[n] != p for n, p in _params(fp32).items()}
    moved16 = {n: before[n] != p for n, p in _params(bf16).items()}
    assert sum(int(m.sum()) for m in moved32.values()) > 0.9 * sum(m.numel() for m in moved32.values())
    for n in moved32:
        assert bool((moved16[n] | ~moved32[n]).all()), n
    assert all(p.dtype == torch.float32 for p in bf16.parameters())
    # the forward really ran in bf16: its losses differ from fp32's by rounding, not more
    assert losses != train(copy.deepcopy(model), _sampler(tok), TrainConfig(**cfg, precision="fp32"))
    assert losses == pytest.approx(train(copy.deepcopy(model), _sampler(tok), TrainConfig(**cfg)), rel=0.02)


def test_low_precision_model_trains_with_float32_master_weights(tiny_lm: tuple[Any, Any]) -> None:
    """A base loaded in bfloat16 is upcast for training and handed back in bfloat16."""
    model, tok = tiny_lm
    low = copy.deepcopy(model).to(torch.bfloat16)
    train(low, _sampler(tok), TrainConfig(steps=1, lr=1e-3, warmup_steps=0, precision="bf16"))
    assert all(p.dtype == torch.bfloat16 for p in low.parameters())


def test_bad_precision_and_nan_messages(tiny_lm: tuple[Any, Any]) -> None:
    model, tok = tiny_lm
    assert resolve_precision("auto", "cpu") == "fp32"
    with pytest.raises(MergemixError, match="experts.precision: fp16 needs a CUDA GPU"):
        train(copy.deepcopy(model), _sampler(tok), TrainConfig(steps=1, lr=1e-3, warmup_steps=0, precision="fp16"))
    with pytest.raises(MergemixError, match=r"loss is (nan|inf).*learning rate \(1e\+30\) is the likely cause"):
        train(copy.deepcopy(model), _sampler(tok), TrainConfig(steps=4, lr=1e30, warmup_steps=0, max_grad_norm=0))
