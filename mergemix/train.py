"""The one training loop: demo-base pre-training, experts, and mixture runs.

Batches are a pure function of (seed, step), so a run resumed from a checkpoint sees exactly the batches
an uninterrupted run would have seen, and every process of a multi-GPU run (accelerate) draws the same
global batch and keeps its own slice of rows.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mergemix.artifacts import atomic_path
from mergemix.errors import MergemixError
from mergemix.progress import progress

log = logging.getLogger(__name__)


def mixture_rows(pools: Sequence[torch.Tensor], probs: Sequence[float], n: int, rng: np.random.Generator) -> torch.Tensor:
    """`n` blocks, each from a pool chosen with probability `probs` (then a uniform block of that pool)."""
    if n == 0:
        return torch.empty((0, pools[0].shape[1]), dtype=torch.long)
    p = np.asarray(probs, dtype=np.float64)
    choice = rng.choice(len(pools), size=n, p=p / p.sum())
    rows = [pools[k][rng.integers(len(pools[k]))] for k in choice]
    return torch.stack(rows)


@dataclass(frozen=True)
class Sampler:
    """Global batch for a step: `own_rows` from `own` plus the rest drawn from `pools` with `probs`."""

    pools: tuple[torch.Tensor, ...]
    probs: tuple[float, ...]
    batch_size: int
    seed: int
    own: torch.Tensor | None = None
    own_rows: int = 0

    def __call__(self, step: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, step])
        parts = []
        if self.own is not None and self.own_rows:
            parts.append(mixture_rows([self.own], [1.0], self.own_rows, rng))
        parts.append(mixture_rows(self.pools, self.probs, self.batch_size - self.own_rows, rng))
        return torch.cat(parts)


@dataclass(frozen=True)
class TrainConfig:
    steps: int
    lr: float
    warmup_steps: int
    schedule: str = "constant"  # "constant" after warmup, or "cosine" decay to 10% of lr
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    checkpoint_every: int = 50
    max_grad_norm: float = 1.0

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "cosine":
            t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0


def make_accelerator(device: str = "auto"):  # -> accelerate.Accelerator
    from accelerate import Accelerator

    return Accelerator(cpu=device == "cpu")


def train(
    model: torch.nn.Module,
    sampler: Callable[[int], torch.Tensor],
    cfg: TrainConfig,
    checkpoint: Path | None = None,
    desc: str = "train",
    accelerator=None,
) -> list[float]:
    """Train `model` in place for `cfg.steps` AdamW steps; return the loss of every step.

    With `checkpoint`, state (weights, optimizer, losses) is saved there every `cfg.checkpoint_every`
    steps and a run finding one resumes from it. The caller removes the checkpoint once the result is saved.
    """
    accelerator = accelerator or make_accelerator()
    decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
    start, losses = 0, []
    if checkpoint is not None and checkpoint.exists():
        resumed = load_checkpoint(checkpoint, model, opt, sched, desc)
        if resumed is not None:
            start, losses = resumed
            log.info("%s: resuming at step %d of %d", desc, start, cfg.steps)
    model.train()
    pmodel, opt = accelerator.prepare(model, opt)
    rank, world = accelerator.process_index, accelerator.num_processes
    bar = progress(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, leave=False,
               disable=not accelerator.is_local_main_process)
    for step in bar:
        batch = sampler(step)[rank::world].to(accelerator.device)
        loss = pmodel(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(pmodel.parameters(), cfg.max_grad_norm)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = accelerator.reduce(loss.detach(), reduction="mean").item()
        if not math.isfinite(value):
            raise MergemixError(f"{desc}: loss is {value} at step {step}; lower the learning rate")
        losses.append(value)
        bar.set_postfix(loss=f"{value:.3f}")
        done = step + 1
        if checkpoint is not None and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            if accelerator.is_main_process:
                save_checkpoint(checkpoint, accelerator.unwrap_model(pmodel), opt, sched, done, losses)
            accelerator.wait_for_everyone()
    accelerator.free_memory()  # prepare() keeps references: without this every expert stays in memory
    del pmodel, opt
    model.eval()
    return losses


_META = "mergemix.checkpoint"


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, step: int, losses: list[float]) -> None:
    """Write a resume checkpoint as one safetensors file, atomically: tensors (parameters, optimizer
    state, the CPU RNG state) as tensors, and step, losses, optimizer hyper-parameters and the scheduler's
    counters as JSON in its metadata. Nothing in it is a pickle, so loading it cannot run code."""
    tensors = {f"model/{n}": p.detach().to("cpu").contiguous() for n, p in model.named_parameters()}
    opt_state = opt.state_dict()
    scalars: dict[str, dict[str, float | int | bool]] = {}
    for idx, entry in opt_state["state"].items():
        for k, v in entry.items():
            if torch.is_tensor(v):
                tensors[f"optim/{idx}/{k}"] = v.detach().to("cpu").contiguous()
            else:
                scalars.setdefault(str(idx), {})[k] = v
    tensors["rng/cpu"] = torch.get_rng_state()
    meta = {"step": step, "losses": losses, "param_groups": opt_state["param_groups"], "optim_scalars": scalars,
            "scheduler": sched.state_dict()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META: json.dumps(meta)})


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, desc: str) -> tuple[int, list[float]] | None:
    """Restore a checkpoint written by `save_checkpoint` into model, optimizer and scheduler; return
    (step, losses). A file that is not one (an old pickle, a planted or foreign file, another model's) is
    never unpickled or executed: it is reported in one line and training starts over (None)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        params = dict(model.named_parameters())
        saved = {k.removeprefix("model/") for k in tensors if k.startswith("model/")}
        if saved != set(params) or any(tensors[f"model/{n}"].shape != p.shape for n, p in params.items()):
            raise ValueError("its parameters do not match the model's")
        state: dict[int, dict[str, object]] = {}
        for k, v in tensors.items():
            if k.startswith("optim/"):
                _, idx, name = k.split("/", 2)
                state.setdefault(int(idx), {})[name] = v
        for idx, entry in meta["optim_scalars"].items():
            state.setdefault(int(idx), {}).update(entry)
        groups = [{**g, "betas": tuple(g["betas"])} if "betas" in g else g for g in meta["param_groups"]]
        opt.load_state_dict({"state": state, "param_groups": groups})  # checks the groups before changing
    except (SafetensorError, OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s: %s is not a resume checkpoint of this model (%s); starting over", desc, path, e)
        return None
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(tensors[f"model/{n}"])
    sched.load_state_dict(meta["scheduler"])
    torch.set_rng_state(tensors["rng/cpu"])
    return meta["step"], list(meta["losses"])


def remove_checkpoint(path: Path | None) -> None:
    if path is not None and path.exists():
        os.unlink(path)
