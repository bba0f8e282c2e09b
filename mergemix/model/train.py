"""The one training loop: demo-base pre-training, experts, and mixture runs.

Batches are a pure function of (seed, step), so a run resumed from a checkpoint sees exactly the batches
an uninterrupted run would have seen, and every process of a multi-GPU run (accelerate) draws the same
global batch and keeps its own slice of rows.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from mergemix.artifacts import atomic_path
from mergemix.collective import fsdp_launch, is_main_process
from mergemix.errors import MergemixError
from mergemix.model.sharded import is_sharded
from mergemix.progress import progress
from mergemix.recipe import ExpertSpec

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
    micro_batch_size: int | None = None  # rows per forward/backward on each process; None: all its rows at once
    gradient_checkpointing: bool = False  # recompute activations in backward (HF models' own switch)
    precision: str = "fp32"  # auto | fp32 | bf16 | fp16 (see resolve_precision)

    @classmethod
    def constant(cls, spec: ExpertSpec, steps: int, lr: float | None = None,
                 warmup_steps: int | None = None) -> TrainConfig:
        """`spec`'s optimizer at a constant learning rate for `steps` steps: an expert's run, or with the
        report's `lr` and `warmup_steps` a mixture run's."""
        return cls(steps=steps, lr=spec.lr if lr is None else lr,
                   warmup_steps=spec.warmup_steps if warmup_steps is None else warmup_steps, schedule="constant",
                   weight_decay=spec.weight_decay, betas=spec.betas, checkpoint_every=spec.checkpoint_every,
                   **spec.train_fields())

    def lr_factor(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "cosine":
            t = (step - self.warmup_steps) / max(1, self.steps - self.warmup_steps)
            return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t))
        return 1.0


def _cpu(device: str) -> bool:
    """Whether a run on `device` trains on CPU. Said explicitly to accelerate: under a multi-process
    launcher (torch.distributed.run) it sets up gloo on a machine without CUDA only when told cpu=True."""
    return device == "cpu" or not torch.cuda.is_available()


# How long a process of a multi-process launch waits for the others at a collective. The main process
# searches, scores and renders alone while the others wait (report: between the experts and the mixture
# runs), which takes longer than torch's default of 30 minutes on a real model.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(hours=24)


def make_accelerator(device: str = "auto"):  # -> accelerate.Accelerator
    """An Accelerator for `device`, set up by the launch (accelerate launch flags or config, torchrun): one
    process, data-parallel (DDP), or FSDP2 full sharding when the launch asks for FSDP."""
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    if fsdp_launch() and os.environ.get("FSDP_VERSION", "1") != "2":
        raise MergemixError("accelerate config: FSDP version 1 is not supported; use FSDP version 2 (accelerate "
                            "launch --use_fsdp --fsdp_version 2, or fsdp_version: 2 in the accelerate config)")
    accelerator = Accelerator(cpu=_cpu(device), kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)])
    _fsdp_on_cpu(accelerator)
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """Honour an FSDP launch on CPU. accelerate 1.15 applies its FSDP config only on accelerator devices: on
    CPU it builds a plain data-parallel (gloo) state and silently ignores `--use_fsdp`. torch's FSDP2
    (`fully_shard`) itself runs on CPU over gloo, so the config's plugin is put back into accelerate's state
    and accelerate's own FSDP2 preparation runs: the CPU tests exercise the same code as a GPU launch."""
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    if fsdp_launch() and accelerator.distributed_type == DistributedType.MULTI_CPU:
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launch's FSDP_* settings
        accelerator.state.distributed_type = DistributedType.FSDP


def process_state(device: str = "auto"):  # -> accelerate.PartialState
    """This process's place in a (multi-process) launch, without building an Accelerator."""
    from accelerate import PartialState

    return PartialState(cpu=_cpu(device), timeout=PROCESS_GROUP_TIMEOUT)


AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_precision(precision: str, device: str, field: str = "experts.precision") -> str:
    """The training precision `precision` means on `device` ("cpu" or "cuda"): auto is bf16 on a CUDA GPU
    that supports it and fp32 elsewhere. A combination that cannot work is a MergemixError naming `field`."""
    bf16_ok = device == "cuda" and torch.cuda.is_bf16_supported()
    if precision == "auto":
        return "bf16" if bf16_ok else "fp32"
    if precision == "fp16" and device != "cuda":
        raise MergemixError(f"{field}: fp16 needs a CUDA GPU (float16 autocast and its loss scaler); "
                            "use bf16 or fp32 on CPU")
    if precision == "bf16" and device == "cuda" and not bf16_ok:
        raise MergemixError(f"{field}: this GPU has no bfloat16 support; use fp16 (with its loss scaler) or fp32")
    return precision


def train(
    model: torch.nn.Module,
    sampler: Callable[[int], torch.Tensor],
    cfg: TrainConfig,
    checkpoint: Path | None = None,
    desc: str = "train",
    accelerator=None,
) -> list[float]:
    """Train `model` in place for `cfg.steps` AdamW steps; return the (global batch) loss of every step.

    Precision: the weights and AdamW state are always float32 (a model loaded in bf16/fp16 is upcast for
    training and cast back after); bf16/fp16 run the forward pass under autocast, fp16 with a dynamic loss
    scaler. Autocast and scaler are torch's own rather than accelerate's mixed_precision, because
    accelerate fixes that once per process and the demo base (fp32) trains in the same process as experts.

    Each process takes its rows of the global batch (rank::world) and splits them into micro-batches of
    `cfg.micro_batch_size`; gradients are summed over micro-batches with each loss divided by their
    number (every row has the same number of tokens, so this is the mean over the global batch) and
    averaged over processes by DDP, so the update equals one full-batch step to float rounding.

    Under an FSDP launch each process keeps a shard of the float32 weights, gradients and AdamW state:
    `model` is sharded with FSDP2 already (`mergemix.model.sharded.trainable`, in float32: no process ever
    held it whole), or accelerate shards it in place (FSDP2 full shard). It stays sharded afterwards:
    `mergemix.model.sharded.gathered` gathers it on the main process, which alone saves or scores.

    With `checkpoint`, state (weights, optimizer, scheduler, losses, RNG) is saved every
    `cfg.checkpoint_every` steps and a run finding one resumes from it: in one safetensors file at
    `checkpoint`, or under FSDP sharded beside it (`sharded_dir`, torch.distributed.checkpoint: each process
    writes its part). The sampler needs no state: a step's batch is a function of the step. The caller removes
    the checkpoint once the result is saved (`remove_checkpoint`).
    """
    accelerator = accelerator or make_accelerator()
    fsdp = _check_sharding(accelerator)
    precision = resolve_precision(cfg.precision, accelerator.device.type)
    load_dtype = next(model.parameters()).dtype
    if is_sharded(model) and load_dtype != torch.float32:
        raise ValueError("a sharded model trains in float32: make it with mergemix.model.sharded.trainable")
    work = model if is_sharded(model) else model.float()  # float32 master weights
    decay = [p for n, p in work.named_parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for n, p in work.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=cfg.betas,
    )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cfg.lr_factor)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    start, losses = 0, []
    if checkpoint is not None and not fsdp and checkpoint.exists():
        resumed = load_checkpoint(checkpoint, work, opt, sched, desc, scaler)
        if resumed is not None:
            start, losses = resumed
            log.info("%s: resuming at step %d of %d", desc, start, cfg.steps)
    if cfg.gradient_checkpointing:
        _checkpointing(work, True)
    work.train()
    pmodel, opt = accelerator.prepare(work, opt)
    rank, world = accelerator.process_index, accelerator.num_processes
    if checkpoint is not None and fsdp:  # sharded state loads into the sharded model and optimizer
        resumed = load_sharded(sharded_dir(checkpoint), pmodel, opt, sched, scaler, rank)
        if resumed is not None:
            start, losses = resumed
            log.info("%s: resuming at step %d of %d (sharded checkpoint)", desc, start, cfg.steps)
    device = accelerator.device
    bar = progress(range(start, cfg.steps), desc=desc, initial=start, total=cfg.steps, leave=False,
                   disable=not accelerator.is_local_main_process)
    for step in bar:
        batch = sampler(step)
        micro = _micro_batch(len(batch), world, cfg.micro_batch_size)
        chunks = batch[rank::world].to(device).split(micro)
        loss = torch.zeros((), device=device)
        for i, chunk in enumerate(chunks):
            with contextlib.ExitStack() as stack:
                if i < len(chunks) - 1:
                    stack.enter_context(accelerator.no_sync(pmodel))  # all-reduce once, after the last
                if precision in AUTOCAST:
                    stack.enter_context(torch.autocast(device.type, dtype=AUTOCAST[precision]))
                part = pmodel(input_ids=chunk, labels=chunk).loss.float() / len(chunks)
                accelerator.backward(scaler.scale(part) if scaler else part)
            loss += part.detach()
        if scaler:
            scaler.unscale_(opt)
        if cfg.max_grad_norm:
            accelerator.clip_grad_norm_(pmodel.parameters(), cfg.max_grad_norm)
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        value = accelerator.reduce(loss, reduction="mean").item()
        if not math.isfinite(value):
            raise MergemixError(f"{desc}: loss is {value} at step {step}; {_nan_cause(precision, cfg.lr)}")
        losses.append(value)
        bar.set_postfix(loss=f"{value:.3f}")
        done = step + 1
        if checkpoint is not None and done % cfg.checkpoint_every == 0 and done < cfg.steps:
            if fsdp:
                save_sharded(sharded_dir(checkpoint), pmodel, opt, sched, done, losses, scaler, rank)
            elif is_main_process():
                save_checkpoint(checkpoint, accelerator.unwrap_model(pmodel), opt, sched, done, losses, scaler)
            accelerator.wait_for_everyone()
    accelerator.free_memory()  # prepare() keeps references: without this every expert stays in memory
    del pmodel, opt, work
    if cfg.gradient_checkpointing:
        _checkpointing(model, False)
    if not is_sharded(model):
        model.to(load_dtype)
    model.eval()
    return losses


def _check_sharding(accelerator) -> bool:
    """Whether the launch shards the model (FSDP2); a sharding mergemix cannot train is a MergemixError. An
    accelerator reused for several runs (the experts of one stage) may have had its shared state rebuilt from
    the launch since it was made, which on CPU forgets FSDP again: `_fsdp_on_cpu` first."""
    _fsdp_on_cpu(accelerator)
    kind = accelerator.distributed_type.value
    if kind in ("DEEPSPEED", "MEGATRON_LM"):
        raise MergemixError(f"accelerate config: {kind} is not supported; use FSDP version 2 (accelerate launch "
                            "--use_fsdp --fsdp_version 2) or data-parallel (accelerate launch --multi_gpu, torchrun)")
    return kind == "FSDP"


def _checkpointing(model: torch.nn.Module, on: bool) -> None:
    """Switch a HF model's activation checkpointing (renamed from gradient_checkpointing in transformers 5)."""
    if hasattr(model, "activation_checkpointing_enable"):
        if on:
            model.activation_checkpointing_enable({"use_reentrant": False})
        else:
            model.activation_checkpointing_disable()
    elif on:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_disable()


def _micro_batch(rows: int, world: int, micro: int | None) -> int:
    """Rows per micro-batch on each process; a global batch that does not split evenly is a MergemixError."""
    if rows % world:
        raise MergemixError(f"experts.batch_size: {rows} sequences do not split evenly over {world} processes; "
                            f"use a multiple of {world}")
    per_rank = rows // world
    if micro is None:
        return per_rank
    if per_rank % micro:
        raise MergemixError(f"experts.micro_batch_size: {micro} does not divide the {per_rank} sequences each of "
                            f"the {world} processes gets per step (batch_size {rows}); use a divisor of {per_rank}")
    return micro


def _nan_cause(precision: str, lr: float) -> str:
    """What most likely made the loss NaN/inf, and what to do."""
    if precision == "fp16":
        return ("float16 activations overflowed (the loss scaler cannot fix a forward overflow); use "
                "experts.precision bf16 (on a GPU that has it) or fp32")
    return (f"the weights are float32, so the learning rate ({lr:g}) is the likely cause: lower it, or check "
            "that the base loads correctly in float32")


_META = "mergemix.checkpoint"


def save_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, step: int, losses: list[float],
                    scaler: torch.amp.GradScaler | None = None) -> None:
    """Write a resume checkpoint as one safetensors file, atomically: tensors (parameters, optimizer
    state, the CPU RNG state) as tensors, and step, losses, optimizer hyper-parameters and the scheduler's
    counters as JSON in its metadata. Nothing in it is a pickle, so loading it cannot run code."""
    tensors = {f"model/{n}": p.detach().to("cpu").contiguous() for n, p in _trained(model).items()}
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
            "scheduler": sched.state_dict(), "scaler": scaler.state_dict() if scaler else None}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={_META: json.dumps(meta)})


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    sched: torch.optim.lr_scheduler.LRScheduler, desc: str,
                    scaler: torch.amp.GradScaler | None = None) -> tuple[int, list[float]] | None:
    """Restore a checkpoint written by `save_checkpoint` into model, optimizer and scheduler; return
    (step, losses). A file that is not one (an old pickle, a planted or foreign file, another model's) is
    never unpickled or executed: it is reported in one line and training starts over (None)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})[_META])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
        params = _trained(model)
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
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    torch.set_rng_state(tensors["rng/cpu"])
    return meta["step"], list(meta["losses"])


def _trained(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The parameters training changes (all but those frozen, e.g. the base's under LoRA adapters)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def sharded_dir(checkpoint: Path) -> Path:
    """Where the sharded (FSDP) checkpoints of a run whose single-file checkpoint is `checkpoint` live."""
    return checkpoint.with_name(checkpoint.name.removesuffix(".safetensors") + ".sharded")


_DONE = "done.json"  # written last: a step directory without it is a save a kill interrupted


def save_sharded(folder: Path, pmodel: torch.nn.Module, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, step: int, losses: list[float],
                 scaler: torch.amp.GradScaler | None, rank: int) -> None:
    """A resume checkpoint of a sharded (FSDP2) run, made by every process together: model and optimizer with
    torch.distributed.checkpoint (each process writes its shards into `folder/step-N`), each process's RNG
    state, then, once all have written, `done.json` (step, losses, scheduler, scaler) by the main process, and
    the older steps removed. A kill at any point leaves the last finished step readable."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    target = folder / f"step-{step:08d}"
    if is_main_process() and target.exists():  # the half-written save of a killed run
        shutil.rmtree(target)
    torch.distributed.barrier()
    model_state, optim_state = get_state_dict(pmodel, opt)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(target))
    save_file({"cpu": torch.get_rng_state()}, str(target / f"rng-{rank}.safetensors"))
    torch.distributed.barrier()
    if is_main_process():
        meta = {"step": step, "losses": losses, "scheduler": sched.state_dict(),
                "scaler": scaler.state_dict() if scaler else None}
        with atomic_path(target / _DONE) as tmp:
            tmp.write_text(json.dumps(meta))
        for old in folder.glob("step-*"):
            if old != target:
                shutil.rmtree(old, ignore_errors=True)


def load_sharded(folder: Path, pmodel: torch.nn.Module, opt: torch.optim.Optimizer,
                 sched: torch.optim.lr_scheduler.LRScheduler, scaler: torch.amp.GradScaler | None,
                 rank: int) -> tuple[int, list[float]] | None:
    """Restore the last finished step `save_sharded` wrote into the sharded model and optimizer (every process
    its part); return (step, losses), or None when there is none."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    finished = sorted(p.parent for p in folder.glob(f"step-*/{_DONE}"))
    if not finished:
        return None
    target = finished[-1]
    meta = json.loads((target / _DONE).read_text())
    model_state, optim_state = get_state_dict(pmodel, opt)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(target))
    set_state_dict(pmodel, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    sched.load_state_dict(meta["scheduler"])
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    rng = target / f"rng-{rank}.safetensors"
    if rng.exists():
        with safe_open(str(rng), framework="pt") as f:
            torch.set_rng_state(f.get_tensor("cpu"))
    return meta["step"], list(meta["losses"])


def remove_checkpoint(path: Path | None) -> None:
    """Remove a run's resume checkpoint: its single file and its sharded folder."""
    if path is None:
        return
    if path.exists():
        os.unlink(path)
    if sharded_dir(path).exists():
        shutil.rmtree(sharded_dir(path), ignore_errors=True)
