"""Is an expert the same architecture as the base? Names, shapes and dtypes, checked before any merge.

A safetensors file is checked from its header alone (a few KB), so a checkpoint of any size costs nothing to
check. The answer is the first mismatching tensor, in a sentence a user can act on, or None.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

# safetensors' dtype codes for the dtypes a model's parameters come in
_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64"}

Spec = tuple[tuple[int, ...], str]  # shape, safetensors dtype code


def dtype_code(dtype: torch.dtype) -> str:
    return _CODES.get(dtype, str(dtype).removeprefix("torch."))


def file_specs(path: str | Path) -> dict[str, Spec]:
    """Name → (shape, dtype code) of every tensor in a safetensors file, from its header (no tensor is read).
    Raises ValueError when the file is not safetensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            slices = {k: f.get_slice(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
            return {k: (tuple(s.get_shape()), s.get_dtype()) for k, s in slices.items()}
    except SafetensorError as e:
        raise ValueError(f"not a safetensors file: {e}") from None


def tensor_specs(state: Mapping[str, torch.Tensor]) -> dict[str, Spec]:
    """Name → (shape, dtype code); a lazily read state answers from its file's header (its `specs`)."""
    specs = getattr(state, "specs", None)
    if specs is not None:
        return dict(specs)
    return {k: (tuple(t.shape), dtype_code(t.dtype)) for k, t in state.items()}


def first_mismatch(base: Mapping[str, Spec], expert: Mapping[str, Spec], complete: bool = True,
                   dtypes: bool = True) -> str | None:
    """The first way `expert` differs from `base`, or None. Tensors the base lacks always count; tensors the
    expert lacks count when `complete` (a full expert saves every parameter); dtypes count when `dtypes`."""
    for name, (shape, dtype) in expert.items():
        if name not in base:
            return f"tensor {name} is not in the base"
        b_shape, b_dtype = base[name]
        if shape != b_shape:
            return f"tensor {name} has shape {list(shape)}, the base's is {list(b_shape)}"
        if dtypes and dtype != b_dtype:
            return f"tensor {name} is {dtype}, the base's is {b_dtype}"
    if complete:
        missing = next((n for n in base if n not in expert), None)
        if missing is not None:
            return f"tensor {missing} of the base is missing"
    return None


def check_expert_file(paths: str | Path | Sequence[str | Path], base: Mapping[str, Spec],
                      dtypes: bool = True) -> str | None:
    """Why the expert in the safetensors file(s) `paths` (one file, or a checkpoint's shards) cannot be merged
    into `base`, or None when it can (a dtype of its own is fine without `dtypes`: it is cast when read)."""
    specs: dict[str, Spec] = {}
    try:
        for path in [paths] if isinstance(paths, str | Path) else paths:
            specs.update(file_specs(path))
    except (OSError, ValueError) as e:
        return f"cannot read it ({e})"
    return first_mismatch(base, specs, dtypes=dtypes)
