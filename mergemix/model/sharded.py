"""Models sharded over an FSDP launch's processes that no process ever holds whole while it trains.

Read the usual way, every process of a launch loads the whole base before sharding it: 8 processes on a node
hold 8 full copies in host memory (an 8B model in fp32: 8 × 32 GB). Here the module is built on the meta
device, sharded (`mergemix.collective.shard_model`: FSDP2, each decoder layer, then the root) and each process
fills only its own rows (dim 0, torch.chunk's split) of every parameter, read from the checkpoint's
safetensors files, which are memory-mapped so that only those rows are read (`load_sharded`). An expert or a
mixture run trains such a base in place and the base's rows are read back from its files afterwards
(`trainable`): each process holds one float32 shard, not the base's and a copy's. A sharded model is gathered
whole on the main process alone, and only when it must be saved or scored (`gathered`).
"""

from __future__ import annotations

import copy
import logging
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import torch

from mergemix.collective import shard_model, shard_rows
from mergemix.errors import MergemixError

log = logging.getLogger(__name__)


class Rows(Protocol):
    """A checkpoint's tensors by name, read rows at a time (mergemix.merge.lazy.SafetensorsState)."""

    def __contains__(self, name: object) -> bool: ...
    def __getitem__(self, name: str) -> torch.Tensor: ...
    def rows(self, name: str, rows: slice) -> torch.Tensor: ...


# how to open again the checkpoint each model of `load_sharded` was read from, for `trainable`
_SOURCES: weakref.WeakKeyDictionary[torch.nn.Module, Callable[[], Rows | None]] = weakref.WeakKeyDictionary()


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether `model` is sharded with FSDP2 (its parameters are this process's rows)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def _empty_sharded(config: Any, dtype: torch.dtype, device: torch.device, trust_remote_code: bool = False,
                   generation_config: Any = None, layer_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """A model of `config` sharded over the launch (`shard_model`, its decoder layers gathered in
    `layer_dtype`), its parameters allocated on `device` (only this process's rows) and not yet filled.
    Buffers (rotary frequencies) are computed as usual: they are not sharded."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=trust_remote_code)
    model.tie_weights()  # init_empty_weights leaves a tied output embedding untied
    if generation_config is not None:
        model.generation_config = generation_config
    shard_model(model, device, layer_dtype)
    buffers = {n: b.to(device) for n, b in model.named_buffers()}
    model.to_empty(device=device)  # parameters and buffers: the buffers are put back
    for name, b in buffers.items():
        owner, _, leaf = name.rpartition(".")
        model.get_submodule(owner)._buffers[leaf] = b
    return model.eval()


def _fill(model: torch.nn.Module, rows_of: Callable[[str, slice | None], torch.Tensor]) -> None:
    """Write every parameter's local rows from `rows_of(name, rows)` (cast to the parameter's dtype)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            local, rows = shard_rows(p)
            local.copy_(rows_of(name, rows))


def _fill_from(model: torch.nn.Module, state: Rows) -> None:
    """Write every parameter's local rows from the checkpoint `state`."""
    _fill(model, lambda name, rows: state.rows(name, rows) if rows is not None else state[name])


def load_sharded(path: Path, open_rows: Callable[[], Rows | None], dtype: torch.dtype, device: torch.device,
                 trust_remote_code: bool = False, layer_dtype: torch.dtype | None = None) -> torch.nn.Module:
    """The checkpoint directory `path` (its config; its tensors in `open_rows()`, its memory-mapped safetensors
    files) as a model sharded over the launch, in `dtype` on `device`: each process reads only its rows of
    each tensor. Its decoder layers are gathered in `layer_dtype` where every forward pass runs under autocast
    to it (`shard_model`). A collective: every process calls it. A checkpoint without safetensors files
    (`open_rows()` is None) and tensor names that are not the model's own (an older layout that transformers
    renames when loading) are refused in one line."""
    from transformers import AutoConfig, GenerationConfig

    state = open_rows()
    if state is None:
        raise MergemixError(f"base.path: {path} holds no model*.safetensors; an FSDP launch reads the base shard "
                            "by shard from safetensors files: save it with save_pretrained, or launch "
                            "data-parallel (--multi_gpu)")
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    try:
        generation = GenerationConfig.from_pretrained(path, local_files_only=True)
    except OSError:  # no generation_config.json: the model's default, as from_pretrained leaves it
        generation = None
    model = _empty_sharded(config, dtype, device, trust_remote_code, generation, layer_dtype)
    missing = [n for n, _ in model.named_parameters() if n not in state]
    if missing:
        raise MergemixError(f"base.path: {path} has no tensor {missing[0]!r} ({len(missing)} missing) in its "
                            "safetensors files; an FSDP launch reads tensors by the model's own names: save the "
                            "base again with save_pretrained, or launch data-parallel (--multi_gpu)")
    _fill_from(model, state)
    _SOURCES[model] = open_rows
    params = list(model.parameters())
    log.info("base %s: sharded over %d processes, this one read %s of its %s parameters%s", path.name,
             params[0].device_mesh.size(), f"{sum(shard_rows(p)[0].numel() for p in params):,}",
             f"{sum(p.numel() for p in params):,}", f"; layers gathered in {layer_dtype}" if layer_dtype else "")
    return model


@contextmanager
def trainable(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """A model to train that starts as `model`, which is as it was afterwards. Unsharded: a deep copy. A
    sharded float32 model of `load_sharded` trains itself, in place, and its rows are read back from its
    checkpoint when the body ends (its copy would be a second shard of the base in every process); any other
    sharded model gives a new sharded float32 copy of its rows (the training's master weights)."""
    if not is_sharded(model):
        yield copy.deepcopy(model)
        return
    reopen = _SOURCES.get(model)
    if reopen is not None and next(model.parameters()).dtype == torch.float32:
        try:
            yield model
        finally:
            model.zero_grad(set_to_none=True)
            state = reopen()
            assert state is not None, "load_sharded read this checkpoint"
            _fill_from(model, state)
        return
    p = next(model.parameters())
    out = _empty_sharded(model.config, torch.float32, p.device, generation_config=model.generation_config)
    source = {n: shard_rows(q)[0] for n, q in model.named_parameters()}
    _fill(out, lambda name, _rows: source[name])
    yield out


def gathered(model: torch.nn.Module, dtype: torch.dtype | None = None) -> torch.nn.Module | None:
    """`model` whole, for saving or scoring it: itself when it is not sharded; a sharded model is gathered
    (a collective every process joins) into a whole copy on the main process, on the CPU, in `dtype` (default:
    its own), and the other processes get None."""
    if not is_sharded(model):
        return model if dtype is None else model.to(dtype)
    from accelerate import init_empty_weights
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not full:
        return None
    dtype = dtype or next(model.parameters()).dtype
    with init_empty_weights(include_buffers=False):
        whole = AutoModelForCausalLM.from_config(model.config, dtype=dtype)
    whole.load_state_dict({n: t.to(dtype) for n, t in full.items()}, assign=True)
    whole.tie_weights()
    whole.generation_config = model.generation_config
    return whole.eval()
