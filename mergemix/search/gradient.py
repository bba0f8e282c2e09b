"""Strategy `gradient`: learnable merging. α is learned by Adam through the merged model itself.

Θ(α) = Θ_base + Σ_k α_k τ_k is built as tensors differentiable in α (`InPlaceMerger.merged_state`) and the
model is called on them with `torch.func.functional_call`, so the differentiable part of the objective
(held-out loss, option log-likelihoods: mergemix.evaluate.differentiable) back-propagates to α. Generation
benchmarks have no gradient: they weigh only in the verification. The objective maximized is the recipe's,
normalized and weighted as the verification scores it (non-differentiable benchmarks left out, the others
keeping their relative weights), less search.kl_weight × KL(α ‖ token prior).

Parameterization: α = Π(softmax(z)), Adam on the logits z, Π the Euclidean projection onto the feasible set
{lo ≤ α ≤ hi, Σα = 1} (`Bounds.project`, the one every strategy uses). Why a projection rather than a
constrained parameterization: one map covers every bound the recipe has (min/max share, pins, repetition
caps) and every α of the descent is feasible, so each can be verified and become α*. Π is the identity inside
the bounds (plain softmax when there are none) and piecewise linear, with an exact Jacobian here: the
coordinates strictly inside their bounds share the sum's correction τ; those on a bound (pinned ones always)
are constant. A logit whose share sits on a bound still moves through the softmax's normalization, so a
share can leave its bound again.

The descent runs once (search.gradient_steps steps of search.gradient_batch items per benchmark, Adam at
search.gradient_lr); its start point and search.gradient_verify points along it, the last its end point, are
then asked for like any strategy's points: really merged and evaluated, logged in trials.jsonl; α* is the
best verified point. With search.timeout_s the descent stops at half of it, to leave time to verify.

Memory, on top of the merger's K task vectors (4 K bytes per parameter in fp32): the merged parameters and
their gradients (8 bytes per parameter, plus a cast copy for a model below fp32), one group's K-row product in
merged_state's weighted sum (merge.memory_mb bounds the groups), and the activations of one step kept for
backward: gradient_batch × seq_len tokens per benchmark (for Llama-3.2-1B ~4 MiB per token in fp32, see
docs/fidelity.md, "Sizing notes"). When that does not fit, lower search.gradient_batch.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from mergemix.errors import MergemixError
from mergemix.feasible import Bounds
from mergemix.progress import progress
from mergemix.search.strategies import Ask, Context, _Queue
from mergemix.search.trials import as_alpha

log = logging.getLogger(__name__)


def project(x: torch.Tensor, bounds: Bounds) -> torch.Tensor:
    """Π(x): the Euclidean projection of one point onto the feasible set, differentiable in `x`. The point is
    found by `Bounds.project`; the coordinates strictly inside their bounds are x − τ with τ recomputed from
    them, so the gradient is the projection's own (constant on the others)."""
    point = torch.as_tensor(bounds.project(x.detach().cpu().double().numpy())[0], dtype=x.dtype, device=x.device)
    lo = torch.as_tensor(bounds.lo, dtype=x.dtype, device=x.device)
    hi = torch.as_tensor(bounds.hi, dtype=x.dtype, device=x.device)
    free = (point > lo + 1e-9) & (point < hi - 1e-9)
    if not free.any():
        return point
    tau = (x[free].sum() - (1 - point[~free].sum())) / free.sum()
    return torch.where(free, x - tau, point)


class Gradient(_Queue):
    """Adam on softmax logits of α through the merged model's differentiable scores; the path verified."""

    def __init__(self, ctx: Context) -> None:
        if ctx.differentiable is None:
            raise MergemixError("search.strategy gradient needs the merged model (run it through mergemix propose "
                                "or mergemix search); choose another strategy here")
        super().__init__(ctx, [])
        self.descended = False

    def ask(self) -> Ask | None:
        if not self.descended:
            self.descended = True
            path = self._descend()
            # the budget keeps the end of the path (the start point is often a reference, scored already)
            asks = [(f"gradient-{i:03d}", "gradient", as_alpha(self.ctx.domains, p)) for i, p in enumerate(path)]
            self.queue = asks[max(len(asks) - self.ctx.budget, 0):]
        return super().ask()

    def _start(self) -> np.ndarray:
        ctx, how = self.ctx, self.ctx.search.gradient_start
        if how == "best":
            feasible = [t for t in ctx.references if ctx.bounds.contains(t.vector(ctx.domains))]
            if feasible:
                best = max(feasible, key=ctx.value)
                return best.vector(ctx.domains)
            how = "prior"
        point = ctx.prior if how == "prior" else np.full(len(ctx.domains), 1.0 / len(ctx.domains))
        return ctx.bounds.project(point)[0]

    def _descend(self) -> list[np.ndarray]:
        """Run the descent; return its start point and the points to verify along it."""
        ctx, spec = self.ctx, self.ctx.search
        assert ctx.differentiable is not None
        estimate = ctx.differentiable
        estimate.prepare(ctx.objective)
        start = self._start()
        # softmax(log α) = α; a share of 0 (a vertex, a bound at 0) starts at e^-7 of the largest
        z = torch.tensor(np.log(np.maximum(start, 1e-3 * start.max())), dtype=torch.float32, requires_grad=True)
        prior = torch.tensor(ctx.prior, dtype=torch.float32)
        opt = torch.optim.Adam([z], lr=spec.gradient_lr)
        generator = torch.Generator().manual_seed(ctx.seed)
        steps = spec.gradient_steps
        marks = {int(round(steps * (j + 1) / spec.gradient_verify)) for j in range(spec.gradient_verify)}
        path = [start]
        began = time.monotonic()
        model = estimate.model
        was_training = model.training
        model.eval()
        bar = progress(total=steps, desc="gradient descent", leave=False)
        try:
            for step in range(1, steps + 1):
                value = self._step(z, opt, prior, generator)
                bar.update()
                bar.set_postfix(estimate=f"{value:.3f}")
                late = spec.timeout_s is not None and time.monotonic() - began > spec.timeout_s / 2
                if step in marks or late:
                    with torch.no_grad():
                        path.append(project(torch.softmax(z, dim=0), ctx.bounds).double().numpy())
                if late:
                    log.warning("gradient: stopped after %d of %d steps at half of search.timeout_s", step, steps)
                    break
        finally:
            bar.close()
            model.train(was_training)
        log.info("gradient: %d steps from %s to %s", steps, np.round(start, 3), np.round(path[-1], 3))
        return path

    @torch.enable_grad()
    def _step(self, z: torch.Tensor, opt: torch.optim.Optimizer, prior: torch.Tensor,
              generator: torch.Generator) -> float:
        """One Adam step on the logits `z`; returns the estimate (less the KL penalty) before it."""
        spec = self.ctx.search
        assert self.ctx.differentiable is not None
        alpha = project(torch.softmax(z, dim=0), self.ctx.bounds)
        value = self.ctx.differentiable(alpha, spec.gradient_batch, generator)
        if spec.kl_weight:
            value = value - spec.kl_weight * (torch.special.xlogy(alpha, alpha) - alpha * prior.log()).sum()
        opt.zero_grad()
        (-value).backward()
        assert z.grad is not None
        log.debug("gradient: estimate %.6f, gradient in the logits %s, at %s", value.item(),
                  np.array2string(-z.grad.numpy(), precision=6, separator=","), alpha.detach().numpy().round(3))
        opt.step()
        return value.item()
