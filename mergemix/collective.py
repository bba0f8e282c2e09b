"""The search under a multi-process launch: one search, made by every process together.

The base is sharded with FSDP2 (torch's `fully_shard`), so each of N processes holds 1/N of it, and each
process's InPlaceMerger keeps and merges only its rows of every parameter (mergemix.merge.inplace): 1/N of the
base copy and of the K task vectors. A forward pass of a sharded model is a collective (each layer gathers its
weights from every process), so every process must make the same forward passes in step. The main process
runs the search as a single process would (strategies, surrogate, trial log, the proposal's guard) and, before
each merge and evaluation it makes, broadcasts the α and the kind of evaluation to the others; they merge
their shard and make the same evaluation, discarding its scores, until told to stop. Every process scores
the same items as the main one: their merges are in step, and each benchmark that can split its items
(perplexity, multiple choice) gives every process its share (`Share`), whose per-item values are gathered so
that every process holds all of them. A sharded forward pass is a collective per layer, so a process with fewer
batches than another runs padding batches (one token, dropped) until all have run as many.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

log = logging.getLogger(__name__)


def processes() -> int:
    """How many processes the launch started (1 in a plain run)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


Share = tuple[int, int]  # (this process's rank, processes): it scores items rank, rank + N, rank + 2N, ...


def launch_share() -> Share:
    """This process's share of a launch's items."""
    return int(os.environ.get("RANK", "0")), processes()


def gather(obj: Any) -> list[Any]:
    """Every process's `obj`, in rank order, on every process (a collective)."""
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def is_main_process() -> bool:
    """True in a plain run and in the main process (rank 0) of a multi-process launch."""
    return int(os.environ.get("RANK", "0")) == 0


def fsdp_launch() -> bool:
    """Whether the launch asks for FSDP (accelerate launch --use_fsdp or an FSDP accelerate config): then no
    process holds the base whole (mergemix.model.sharded)."""
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def shard_model(model: torch.nn.Module, device: torch.device | None = None,
                layer_dtype: torch.dtype | None = None) -> None:
    """Shard `model` in place over the launch's processes with FSDP2, on `device` (default: its parameters';
    a model on the meta device names the device its shards will live on): each decoder layer (the
    classes the model names in `_no_split_modules`, as accelerate's FSDP2 wrapping does), then the rest at the
    root. Process r holds chunk r of torch.chunk(parameter, N) along dim 0 of every parameter. Every module,
    the root too, reshards after its forward pass, so between evaluations each process holds only its shard
    (which the merger overwrites) and at most one layer is gathered whole at a time.

    `layer_dtype` (bf16, fp16), for a model every forward pass of which runs under autocast to that dtype:
    the decoder layers' weights are gathered in it (FSDP2's MixedPrecisionPolicy; gradients reduced in
    float32, the shards stay in their dtype). Autocast would cast each gathered float32 weight to a copy that
    backward keeps, which holds the whole model in that dtype in every process until backward passes it (0.27
    GiB for SmolLM2-135M); gathered in that dtype, backward gathers each layer again instead. Their inputs are
    not cast (the residual stream stays in the root's dtype) and the root (embeddings, final norm) is gathered
    as it is, so the numbers are autocast's but for the layers' norm weights, rounded to `layer_dtype`."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = device or next(model.parameters()).device
    mesh = init_device_mesh(device.type, (torch.distributed.get_world_size(),))
    policy = MixedPrecisionPolicy() if layer_dtype is None else \
        MixedPrecisionPolicy(param_dtype=layer_dtype, reduce_dtype=torch.float32, cast_forward_inputs=False)
    layers = set(getattr(model, "_no_split_modules", None) or [])
    for module in list(model.modules()):
        if module is not model and type(module).__name__ in layers:
            fully_shard(module, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)


def shard_rows(p: torch.Tensor) -> tuple[torch.Tensor, slice | None]:
    """The tensor this process writes for parameter `p` and which rows (dim 0) of `p` it holds: `p` itself and
    None (all of them), or for a DTensor sharded by FSDP2 (`fully_shard`: Shard(0), torch.chunk's split of
    ⌈n / N⌉ rows per process, the last ones fewer or none) its local tensor and the rows it holds."""
    from torch.distributed.tensor import DTensor, Shard

    p = p.detach()
    if not isinstance(p, DTensor):
        return p, None
    if tuple(p.placements) != (Shard(0),):
        raise ValueError(f"a parameter sharded as {p.placements} cannot be merged; only FSDP2's Shard(0)")
    local = p.to_local()
    step = -(-p.shape[0] // p.device_mesh.size())
    start = min(p.device_mesh.get_local_rank() * step, p.shape[0])
    assert local.shape[0] == min(start + step, p.shape[0]) - start, "not torch.chunk's split"
    return local, slice(start, start + local.shape[0])


def _broadcast(command: Any = None) -> Any:
    """The main process's `command`, on every process (a pickled object; None: stop)."""
    box = [command]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def tell(method: str, payload: Any) -> None:
    """On the main process, before it calls its scoring's `method` with `payload` (a mixture to merge and
    evaluate, or a gradient step's inputs): the other processes (in `follow`) make the same call."""
    _broadcast((method, payload))


@contextmanager
def leading() -> Iterator[None]:
    """On the main process, around everything it `tell`s: the other processes are told to stop when the body
    ends, by an error too."""
    try:
        yield
    finally:
        _broadcast(None)


def follow(scoring: Any) -> int:
    """On every other process: make each call the main process tells of (merges and evaluations, gradient
    steps) on `scoring`, the results dropped, until it says stop; logs and returns how many evaluations."""
    n = 0
    while (command := _broadcast()) is not None:
        method, payload = command
        getattr(scoring, method)(payload)
        n += method in ("evaluate_alpha", "items_at")
    log.info("followed the main process's search: %d evaluations", n)
    return n
