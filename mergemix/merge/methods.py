"""Merge methods as plain per-tensor functions: (base, task vectors stacked on dim 0, weights) → tensor."""

from __future__ import annotations

from collections.abc import Callable

import torch

from mergemix.registry import Registry

MergeFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
MERGE_METHODS: Registry[MergeFn] = Registry("merge method")


@MERGE_METHODS.register("linear")
def linear(base: torch.Tensor, taus: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """Task arithmetic: Θ(α) = Θ_base + Σ_k α_k τ_k, with τ_k = Θ_k − Θ_base (float32 accumulation)."""
    return base + torch.tensordot(alpha.to(taus.dtype), taus, dims=1)
