"""Interference diagnostics: do the domains' updates and curvatures stay out of each other's way?

MergeMix ranks data mixtures by the loss of the merge Θ(α) = Θ_base + Σ_k α_k τ_k. Around the base that loss
expands as (paper §3.3)

    L(Θ(α)) ≈ L(Θ_base) + Σ_k α_k gᵀτ_k + ½ Σ_k Σ_j α_k α_j τ_kᵀ H τ_j,

whose first-order term is linear in α, as a data mixture's effect is to first order. The proxy's error is the
second-order term, and its cross terms (k ≠ j) are where domains interfere. Two diagnostics bound them:

- `task_vector_cosines`: the geometry of the τ_k themselves; free (no forward pass).
- `interference_gamma`: how much each domain's curvature reacts to another domain's gradient, relative to its
  own, from Hessian-vector products at the base.

`dominance_warnings` turns both into sentences a user can act on.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from mergemix.progress import progress

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger(__name__)

CHUNK = 1 << 22  # elements per block of a task vector: 4M × K float64 ≈ 32 MB per expert at a time
NEGATIVE_COSINE = -0.2  # task vectors from one base are near-orthogonal or aligned; below this they cancel

Params = dict[str, torch.Tensor]  # parameter name → tensor (a point or a direction in parameter space)
Chunk = tuple[torch.Tensor, float]  # a batch of token rows and its weight in the domain's mean


def task_vector_cosines(
    base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]]
) -> np.ndarray:
    """K×K cosine similarity of the flattened task vectors τ_k = Θ_k − Θ_base (dimensionless, in [−1, 1]).

    Only floating-point tensors of `base` count (integer buffers are skipped); a tensor an expert does not
    carry contributes zero to its task vector, as in the merge. Dot products accumulate in float64, block by
    block, so no vector of the full parameter count is ever built. A zero task vector has NaN cosines.
    """
    k = len(experts)
    gram = np.zeros((k, k))
    for name, b in base.items():
        if b.is_floating_point():
            gram += _tensor_gram(name, b, experts)
    norms = np.sqrt(np.diag(gram))
    with np.errstate(divide="ignore", invalid="ignore"):
        cos = np.clip(gram / np.outer(norms, norms), -1.0, 1.0)
    cos[np.diag_indices(k)] = np.where(norms > 0, 1.0, np.nan)
    return cos


def _tensor_gram(name: str, base: torch.Tensor, experts: Sequence[Mapping[str, torch.Tensor]]) -> np.ndarray:
    """τ_iᵀτ_j restricted to one tensor, in float64."""
    for e in experts:
        if name in e and e[name].shape != base.shape:
            raise ValueError(f"expert tensor {name} has shape {tuple(e[name].shape)}, "
                             f"the base {tuple(base.shape)}")
    flat = base.reshape(-1)
    gram = torch.zeros(len(experts), len(experts), dtype=torch.float64)
    for start in range(0, flat.numel(), CHUNK):
        b = flat[start:start + CHUNK].to(device="cpu", dtype=torch.float64)
        taus = torch.stack([
            e[name].reshape(-1)[start:start + CHUNK].to(device="cpu", dtype=torch.float64) - b if name in e
            else torch.zeros_like(b)
            for e in experts
        ])
        gram += taus @ taus.T
    return gram.numpy()


@dataclass(frozen=True)
class Gamma:
    """Cross-domain curvature at the base, for K domains in the order of the batches.

    response[k, j] = ‖H_k g_j‖ / ‖g_j‖: the curvature of domain k's loss along domain j's gradient direction
      (nats per token per squared parameter unit).
    gamma[k, j] = response[k, j] / response[k, k]: dimensionless, 1 on the diagonal.
    grad_norms[k] = ‖g_k‖ (nats per token per parameter unit).
    """

    gamma: np.ndarray
    response: np.ndarray
    grad_norms: np.ndarray


def interference_gamma(
    model: torch.nn.Module,
    batches: Sequence[torch.Tensor],
    batch_size: int = 8,
    max_batches: int | None = 2,
) -> Gamma:
    """γ_kj = (‖H_k g_j‖ / ‖g_j‖) / (‖H_k g_k‖ / ‖g_k‖) for an HF causal LM at its current weights (the base).

    H_k and g_k are the Hessian and gradient, with respect to every parameter (frozen or not), of domain k's
    mean next-token loss (nats per token) over the rows of `batches[k]`, a LongTensor (n, seq_len) of token
    blocks taken `batch_size` rows at a time and at most `max_batches` times (None: all rows).

    γ_kj > 1 means domain k's curvature reacts more to domain j's gradient than to its own: the cross terms
    ½ α_k α_j τ_kᵀHτ_j of the merge proxy's second-order error (paper §3.3) are then not small next to the
    diagonal ones, and mixtures trading k against j can be mis-ranked. See `dominance_warnings`.

    H_k v is the derivative of domain k's gradient along v, computed forward over reverse (`torch.func.jvp` of
    `torch.func.grad`): it equals the finite difference (g_k(Θ + εv) − g_k(Θ − εv)) / 2ε of the gradient that
    training uses. Reverse over reverse (autograd.grad of g·v) would give Hᵀv instead, and H is not symmetric
    where a backward is a convention rather than a derivative: nn.Embedding's padding_idx, which HF sets to
    pad_token_id (EOS for mergemix bases, a frequent token), drops row pad's lookup gradient but not its tied
    output-layer gradient; on a tiny Llama whose batches hold the pad token the two differed by ~90%.

    Cost: K·b gradient passes and K²·b Hessian-vector products for b = min(max_batches, ⌈n / batch_size⌉)
    batches per domain; a gradient pass costs about one training step, an HVP about three. For the 0.8M demo
    model (hidden 128, 2 layers, seq_len 128) with K = 4, b = 2 and batch_size 8 that is 8 + 32 passes: ~20 s
    (~80 training steps) on one CPU core. Memory: 2K copies of the parameters plus one batch's
    forward-over-reverse activations.

    Runs in the model's dtype (float32 for mergemix bases), in eval mode (no dropout), with the math attention
    kernel (CPU's fused SDPA kernel has no forward-mode AD; other non-eager implementations are switched to
    eager meanwhile). The model's parameters are not differentiated in place: weights, modes, requires_grad
    flags, `.grad` and attention implementation are untouched afterwards.
    """
    chunks = [_chunks(b, batch_size, max_batches) for b in batches]
    with _second_order_ready(model) as params, progress(total=2 * sum(map(len, chunks)), desc="interference",
                                                    leave=False) as bar:
        grads = [_mean_grad(model, params, c, bar) for c in chunks]
        grad_norms = np.array([_norm(g) for g in grads])
        if not np.all(grad_norms > 0):
            raise ValueError(f"the gradient of domain {int(np.argmin(grad_norms))} is zero at the base")
        response = np.array([[_norm(hv) for hv in _hvps(model, params, c, grads, bar)] for c in chunks])
    response /= grad_norms[None, :]
    gamma = response / np.diag(response)[:, None]
    log.info("interference γ (rows: curvature of domain k; columns: gradient of domain j):\n%s",
             np.array2string(gamma, precision=3))
    return Gamma(gamma=gamma, response=response, grad_norms=grad_norms)


def _chunks(rows: torch.Tensor, batch_size: int, max_batches: int | None) -> list[Chunk]:
    """(batch, weight) pairs whose weights (shares of the rows used) sum to 1."""
    if rows.dim() != 2 or rows.is_floating_point() or len(rows) == 0:
        raise ValueError(f"expected a non-empty LongTensor (n, seq_len) of tokens, "
                         f"got {rows.dtype} {tuple(rows.shape)}")
    parts = list(rows.split(batch_size))[:max_batches]
    used = sum(len(p) for p in parts)
    return [(p, len(p) / used) for p in parts]


@contextmanager
def _second_order_ready(model: torch.nn.Module) -> Iterator[Params]:
    """Eval mode and attention with forward-mode AD through its backward; then put both back.

    Yields the parameters detached: `torch.func` differentiates with respect to them, so the model's own
    parameters build no graph and get no `.grad`.
    """
    modes = [(m, m.training) for m in model.modules()]
    config = getattr(model, "config", None)
    attention = getattr(config, "_attn_implementation", None)
    switch = attention not in (None, "eager", "sdpa")  # e.g. flash_attention_2: no forward-mode AD at all
    model.eval()
    if switch:
        model.set_attn_implementation("eager")
    try:
        with sdpa_kernel(SDPBackend.MATH):  # CPU's fused SDPA kernel has no forward-mode AD
            yield {name: p.detach() for name, p in model.named_parameters()}
    finally:
        for m, training in modes:
            m.training = training  # not m.train(): that would recurse into children
        if switch:
            model.set_attn_implementation(attention)


def _loss_grad(model: torch.nn.Module, x: torch.Tensor) -> Callable[[Params], Params]:
    """Parameters → gradient of the mean next-token loss on the batch `x`."""
    x = x.to(next(model.parameters()).device)
    return torch.func.grad(lambda params: torch.func.functional_call(model, params, (x,), {"labels": x}).loss)


def _mean_grad(model: torch.nn.Module, params: Params, chunks: list[Chunk], bar: tqdm) -> Params:
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    for x, w in chunks:
        for name, g in _loss_grad(model, x)(params).items():
            total[name].add_(g, alpha=w)
        bar.update()
    return total


def _hvps(
    model: torch.nn.Module, params: Params, chunks: list[Chunk], vectors: list[Params], bar: tqdm
) -> list[Params]:
    """H v for each v in `vectors`: the chunks' mean gradient differentiated along v, forward over reverse."""
    total = [{name: torch.zeros_like(p) for name, p in params.items()} for _ in vectors]
    for x, w in chunks:
        grad = _loss_grad(model, x)
        for acc, v in zip(total, vectors, strict=True):
            for name, h in torch.func.jvp(grad, (params,), (v,))[1].items():
                acc[name].add_(h, alpha=w)
        bar.update()
    return total


def _norm(v: Params) -> float:
    return math.sqrt(sum(float(t.double().square().sum()) for t in v.values()))


def dominance_warnings(
    gamma: np.ndarray, names: Sequence[str], cosines: np.ndarray | None = None
) -> list[str]:
    """One sentence per pair of domains where the merge proxy may mis-rank mixtures; empty when all is well.

    γ (from `interference_gamma`) is diagonally dominant when every off-diagonal γ_kj < 1: each domain's
    curvature reacts most to its own gradient, so the second-order cross terms of the proxy's error (paper
    §3.3) are small next to the diagonal ones. Each ordered pair with γ_kj ≥ 1 gets a sentence.

    With `cosines` (from `task_vector_cosines`), each pair whose task vectors have cosine below −0.2 gets one
    too. Task vectors trained from one base are typically near-orthogonal or mildly aligned; strongly opposed
    ones undo each other in the merge, which lands near the base where training on the mixture would not (the
    cross term τ_kᵀHτ_j is then negative for any curvature close to isotropic along them).

    When a warning fires: trust the ranking of mixtures that trade those two domains less; verify more of the
    top proposals by training on them (search.verify); shorter or lower-learning-rate expert training shrinks
    ‖τ‖ and with it the second-order error (quadratic in τ); or merge the two domains into one expert.
    """
    k = len(names)
    if gamma.shape != (k, k):
        raise ValueError(f"gamma is {gamma.shape}, expected ({k}, {k}) for {k} names")
    out = [
        f"domain {names[i]}'s curvature reacts more to {names[j]}'s gradient than to its own "
        f"(γ = {gamma[i, j]:.2f}): merges that mix {names[i]} and {names[j]} may be mis-ranked"
        for i in range(k) for j in range(k) if i != j and not gamma[i, j] < 1
    ]
    if cosines is not None:
        out += [
            f"the task vectors of {names[i]} and {names[j]} point in opposite directions (cosine = "
            f"{cosines[i, j]:.2f}): merging them cancels part of both experts, so merges that mix {names[i]} "
            f"and {names[j]} may be mis-ranked"
            for i in range(k) for j in range(i + 1, k) if cosines[i, j] < NEGATIVE_COSINE
        ]
    return out
