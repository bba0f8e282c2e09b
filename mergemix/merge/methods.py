"""Merge methods as plain per-tensor functions; mergemix.catalog names them.

Every method here is Θ = Θ_base + λ · combine(α, sparsify(τ_1) … sparsify(τ_K)), with τ_k = Θ_k − Θ_base:

- `sparsify` acts on one expert's task vector for one tensor and does not depend on α, so a merger applies it
  once, not per trial: `trim` keeps the largest-magnitude share `density` (TIES), `drop` keeps each entry
  with probability `density` from a seeded generator (DARE). With `rescale`, the kept entries are scaled so
  the tensor keeps its L1 norm (mergekit 0.1.5's rescale; ≈ 1/density, DARE's own factor, in expectation).
- `combine` is elementwise over the K stacked task vectors, so it runs on flat buffers holding many tensors
  at once: the weighted sum, with TIES's sign election (`consensus`: each entry keeps only the experts whose
  weighted sign agrees with the majority's) and `normalize` (divide by the weight that took part).

Semantics follow mergekit 0.1.5's task_arithmetic, ties, dare_linear and dare_ties (same order of floating
point operations, so fp32 results are equal); tests/merge/test_methods.py checks them against mergekit.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import torch

SignMethod = Literal["sum", "count"]


def trim(tau: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """TIES trim: keep the `density` share (at least one entry) of largest |τ|, zero the rest."""
    del generator  # deterministic
    if density >= 1:
        return tau
    if density <= 0 or tau.numel() == 0:
        return torch.zeros_like(tau)
    k = max(1, int(density * tau.numel()))
    mask = torch.zeros(tau.numel(), dtype=tau.dtype, device=tau.device)
    mask[torch.argsort(tau.abs().reshape(-1).float(), descending=True)[:k]] = 1
    return _rescaled(tau, mask.reshape_as(tau), rescale)


def drop(tau: torch.Tensor, density: float, rescale: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """DARE: keep each entry with probability `density` (Bernoulli draws from `generator`), drop the rest."""
    if density >= 1:
        return tau
    work = tau.dtype if tau.device.type != "cpu" or tau.dtype == torch.bfloat16 else torch.float32
    mask = torch.bernoulli(torch.full_like(tau, density, dtype=work), generator=generator)
    return _rescaled(tau.to(work), mask, rescale).to(tau.dtype)


def _rescaled(tau: torch.Tensor, mask: torch.Tensor, rescale: bool, eps: float = 1e-7) -> torch.Tensor:
    masked = tau * mask
    if not rescale:
        return masked
    before, after = tau.abs().sum(), masked.abs().sum()
    if before < eps or after < eps:
        return masked
    return masked * (before / after)


def combine(
    taus: torch.Tensor,
    alpha: torch.Tensor,
    consensus: SignMethod | None = None,
    normalize: bool = False,
    scale: float = 1.0,
) -> torch.Tensor:
    """The merged task vector Σ_k α_k τ_k (times `scale`) of task vectors stacked on dim 0, elementwise.

    `consensus` ("sum": sign of the weighted sum; "count": the sign most experts have) keeps, per entry, only
    the experts agreeing with the elected sign (TIES's disjoint merge). `normalize` divides by the weight
    that took part (per entry with consensus; a zero divisor counts as 1, so all-zero α gives zero).
    Arithmetic in `taus`' dtype; `taus` is not modified.
    """
    weights = alpha.to(taus.dtype).reshape(-1, *([1] * (taus.dim() - 1)))
    weighted = taus * weights
    if consensus is None:
        return finish(weighted.sum(dim=0), weights.sum(dim=0), normalize, scale)
    sign = weighted.sign()
    votes = weighted.sum(dim=0) if consensus == "sum" else sign.sum(dim=0)
    mask = sign == (votes >= 0).to(weighted.dtype) * 2 - 1
    mixed = (weighted * mask).sum(dim=0)
    if normalize:
        divisor = (weights * mask).sum(dim=0)
        divisor[divisor == 0] = 1
        mixed /= divisor
    if scale != 1:
        mixed *= scale
    return mixed


def finish(mixed: torch.Tensor, weight: torch.Tensor, normalize: bool, scale: float) -> torch.Tensor:
    """The tail of a merge without sign election: the weighted sum `mixed` (changed in place) divided by the
    total `weight` with `normalize` (a total under 1e-8 counts as 1, so all-zero α gives zero), times `scale`."""
    if normalize:
        mixed /= torch.where(weight.abs() < 1e-8, torch.ones_like(weight), weight)
    if scale != 1:
        mixed *= scale
    return mixed


Sparsify = Callable[[torch.Tensor, float, bool, "torch.Generator | None"], torch.Tensor]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge: how each task vector is sparsified, whether signs are elected, and the defaults
    of `normalize` and `rescale` (mergekit's, so a mergekit YAML of the same name means the same merge)."""

    sparsify: Sparsify | None
    consensus: bool
    normalize: bool
    rescale: bool
    mergekit: str


TASK_ARITHMETIC = MergeMethod(None, False, False, False, "task_arithmetic")
TIES = MergeMethod(trim, True, True, False, "ties")
DARE_LINEAR = MergeMethod(drop, False, False, True, "dare_linear")
DARE_TIES = MergeMethod(drop, True, False, True, "dare_ties")


def merge_tensor(
    method: MergeMethod,
    base: torch.Tensor,
    taus: Sequence[torch.Tensor],
    alpha: torch.Tensor,
    *,
    density: float = 1.0,
    rescale: bool | None = None,
    normalize: bool | None = None,
    consensus: SignMethod = "sum",
    scale: float = 1.0,
    generators: Sequence[torch.Generator | None] | None = None,
) -> torch.Tensor:
    """One tensor merged from scratch: sparsify each task vector, combine, add to the base (in the base's
    dtype, as mergekit does). The in-place merger does the same with sparsification cached and many tensors
    per call; this is the reference form."""
    gens = generators or [None] * len(taus)
    rescale = method.rescale if rescale is None else rescale
    if method.sparsify is not None:
        taus = [method.sparsify(t, density, rescale, g) for t, g in zip(taus, gens, strict=True)]
    mixed = combine(torch.stack(list(taus)), alpha, consensus if method.consensus else None,
                    method.normalize if normalize is None else normalize, scale)
    return (base + mixed).to(base.dtype)
