"""LoRA experts as the merger sees them: for each adapted weight of the base, the low-rank factors of its update.

A peft adapter directory (adapter_config.json and adapter_model.safetensors, as `save_pretrained` writes
them) holds, for each adapted linear layer, A [r, d_in] and B [d_out, r]: the layer's weight W becomes
W + s B A, with s = lora_alpha / r (lora_alpha / √r with rslora). A merge of several such experts needs only
Σ_k α_k s_k B_k A_k per weight, one matmul of the experts' factors laid side by side (peft's "cat"
combination), so K task vectors are never formed: what is kept grows with K · r · (d_in + d_out).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from mergemix.merge.check import Spec

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_FILE = "adapter_model.safetensors"
_PREFIX = "base_model.model."  # peft's prefix of the wrapped model's module names
_FACTORS = (".lora_A.weight", ".lora_B.weight")


@dataclass(frozen=True)
class Factors:
    """One adapted weight's update s B A; `transpose` for weights stored [d_in, d_out] (GPT-2's Conv1D, peft's
    fan_in_fan_out), whose update is (s B A)ᵀ."""

    a: torch.Tensor  # [r, d_in]
    b: torch.Tensor  # [d_out, r]
    scale: float
    transpose: bool = False

    def to(self, device: torch.device) -> Factors:
        return Factors(self.a.to(device), self.b.to(device), self.scale, self.transpose)

    def rows(self, rows: slice) -> Factors:
        """The factors of rows `rows` (dim 0) of the weight's update: B[rows] A is exactly those rows of B A
        (for a transposed weight, (B A[:, rows])ᵀ), so a process merging one shard of the weight forms only
        its rows."""
        if self.transpose:
            return Factors(self.a[:, rows], self.b, self.scale, True)
        return Factors(self.a, self.b[rows], self.scale, False)

    def shape(self) -> tuple[int, int]:
        """The shape of the weight this update applies to."""
        out, inp = self.b.shape[0], self.a.shape[1]
        return (inp, out) if self.transpose else (out, inp)


def weighted_delta(factors: Sequence[Factors], weights: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Σ_i w_i s_i B_i A_i (of one weight's shape) in `dtype`, as one matmul of the factors concatenated along
    the rank: [d_out, Σr] @ [Σr, d_in]. Differentiable in `weights`."""
    lefts, rights = [], []
    for f, w in zip(factors, weights, strict=True):
        a = f.a.to(dtype) * (w.to(dtype) * f.scale)
        b = f.b.to(dtype)
        lefts.append(a.T if f.transpose else b)  # (B A)ᵀ = Aᵀ Bᵀ
        rights.append(b.T if f.transpose else a)
    return torch.cat(lefts, dim=1) @ torch.cat(rights, dim=0)


class LoraExpert(Mapping[str, Factors]):
    """Base parameter name → Factors of a peft LoRA adapter directory, read into memory (they are small).

    Only plain LoRA on linear layers is merged: a directory with another kind of adapter (DoRA, per-module
    ranks, extra trained modules, LoRA biases, embedding adapters) is a ValueError saying what it holds."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            config = json.loads((self.path / ADAPTER_CONFIG).read_text())
            tensors = load_file(str(self.path / ADAPTER_FILE))
            r, lora_alpha = int(config["r"]), float(config["lora_alpha"])
        except (OSError, ValueError, TypeError, KeyError, SafetensorError) as e:
            raise ValueError(f"not a peft LoRA adapter directory ({type(e).__name__}: {e})") from None
        if config.get("peft_type") != "LORA":
            raise ValueError(f"{ADAPTER_CONFIG}: peft_type is {config.get('peft_type')}, not LORA")
        for field in ("use_dora", "lora_bias", "modules_to_save", "rank_pattern", "alpha_pattern"):
            if config.get(field):
                raise ValueError(f"{ADAPTER_CONFIG}: {field} is set; only plain LoRA adapters are merged")
        scale = lora_alpha / (math.sqrt(r) if config.get("use_rslora") else r)
        transpose = bool(config.get("fan_in_fan_out"))
        modules = set()
        for key in tensors:
            suffix = next((s for s in _FACTORS if key.endswith(s)), None)
            if suffix is None:
                raise ValueError(f"tensor {key} is not a LoRA factor of a linear layer (lora_A or lora_B)")
            modules.add(key.removesuffix(suffix))
        self._factors = {}
        for module in sorted(modules):
            a, b = (tensors.get(module + s) for s in _FACTORS)
            if a is None or b is None:
                raise ValueError(f"{module}: has only one of lora_A and lora_B")
            self._factors[module.removeprefix(_PREFIX) + ".weight"] = Factors(a, b, scale, transpose)

    def __getitem__(self, name: str) -> Factors:
        return self._factors[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._factors)

    def __len__(self) -> int:
        return len(self._factors)

    def mismatch(self, base: Mapping[str, Spec]) -> str | None:
        """The first adapter whose weight is not in `base` or whose factors do not fit its shape, or None."""
        for name, f in self._factors.items():
            if name not in base:
                return f"its adapter on {name} adapts no weight of the base"
            if f.a.dim() != 2 or f.b.dim() != 2 or f.a.shape[0] != f.b.shape[1]:
                return (f"its adapter on {name} has factors of shapes {list(f.a.shape)} and {list(f.b.shape)}, "
                        "not [r, d_in] and [d_out, r]")
            if f.shape() != base[name][0]:
                return f"its adapter on {name} updates a {list(f.shape())} weight, the base's is {list(base[name][0])}"
        return None


class Applied(Mapping[str, torch.Tensor]):
    """A LoRA expert's weights W + s B A (float64) of the weights it adapts, formed one at a time on access:
    the mapping of expert weights that code reading full experts' task vectors takes. Weights it does not
    adapt are absent (their task vector is zero). The last weight formed is kept, for readers that take it
    chunk by chunk."""

    def __init__(self, lora: LoraExpert, base: Mapping[str, torch.Tensor]) -> None:
        self.lora, self.base = lora, base
        self._last: tuple[str, torch.Tensor] | None = None

    def __getitem__(self, name: str) -> torch.Tensor:
        if self._last is None or self._last[0] != name:
            w = self.base[name]
            one = torch.ones(1, dtype=torch.float64, device=w.device)
            self._last = name, w.to(torch.float64) + weighted_delta([self.lora[name].to(w.device)], one, torch.float64)
        return self._last[1]

    def __iter__(self) -> Iterator[str]:
        return iter(self.lora)

    def __len__(self) -> int:
        return len(self.lora)


def check_adapter(path: str | Path, base: Mapping[str, Spec]) -> str | None:
    """Why the LoRA adapter directory `path` cannot be merged into `base`, or None when it can."""
    try:
        return LoraExpert(path).mismatch(base)
    except ValueError as e:
        return f"cannot read it ({e})"
