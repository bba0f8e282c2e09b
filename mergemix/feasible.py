"""The feasible set of mixtures: the simplex cut by per-domain bounds lo_k <= α_k <= hi_k.

Bounds come from the recipe (mixture.min_share, max_share, pinned) and from the repetition cap: a domain
with `available` tokens cannot exceed max_epochs × available / total_tokens of the budget. Every strategy
searches inside this set, so the verified α* is the mixture proposed (ratios = α*, the paper's rule).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

TOL = 1e-6  # α is logged rounded to 6 decimals


@dataclass(frozen=True)
class Bounds:
    """Lower and upper share per domain, and which recipe field sets each."""

    domains: tuple[str, ...]
    lo: np.ndarray
    hi: np.ndarray
    lo_from: tuple[str | None, ...]  # "min_share" | "pinned" | None
    hi_from: tuple[str | None, ...]  # "max_share" | "max_epochs" | "pinned" | None

    @classmethod
    def build(cls, domains: list[str], min_share: dict[str, float], max_share: dict[str, float],
              pinned: dict[str, float], cap: dict[str, float] | None = None) -> Bounds:
        """`cap`: domain → the share its repetition cap allows (max_epochs × available / total_tokens)."""
        lo, hi, lo_from, hi_from = [], [], [], []
        for d in domains:
            if d in pinned:
                lo.append(pinned[d])
                lo_from.append("pinned")
                hi.append(pinned[d])
                hi_from.append("pinned")
                continue
            lo.append(min_share.get(d, 0.0))
            lo_from.append("min_share" if d in min_share else None)
            limits = [(1.0, None), (max_share.get(d, 1.0), "max_share"), ((cap or {}).get(d, 1.0), "max_epochs")]
            value, source = min(limits, key=lambda t: t[0])
            hi.append(value)
            hi_from.append(source if value < 1.0 else None)
        return cls(tuple(domains), np.array(lo, dtype=np.float64), np.array(hi, dtype=np.float64),
                   tuple(lo_from), tuple(hi_from))

    @property
    def pinned(self) -> np.ndarray:
        """Per domain: whether its share is pinned (lo = hi, from mixture.pinned or a fixed group total)."""
        return np.array([src == "pinned" for src in self.hi_from], dtype=bool)

    @property
    def free(self) -> list[int]:
        """Indices of the domains whose share is searched (not pinned)."""
        return [i for i, p in enumerate(self.pinned) if not p]

    @property
    def unconstrained(self) -> bool:
        return not (self.lo > 0).any() and not (self.hi < 1).any()

    def problem(self) -> str | None:
        """Why no mixture satisfies the bounds, or None. Names the recipe fields to change."""
        for d, lo, hi, src in zip(self.domains, self.lo, self.hi, self.hi_from, strict=True):
            if lo > hi + TOL:
                return (f"domain {d}: its lower share {lo:g} is above its upper share {hi:g} (from mixture.{src}); "
                        "lower the min/pin or raise the bound")
        if self.lo.sum() > 1 + TOL:
            return (f"the lower shares (mixture.min_share and mixture.pinned) sum to {self.lo.sum():g}, above 1; "
                    "lower them")
        if self.hi.sum() < 1 - TOL:
            sources = sorted({s for s in self.hi_from if s})
            return (f"the upper shares (mixture.{', mixture.'.join(sources)}) sum to {self.hi.sum():g}, below 1, so "
                    "no mixture fills the budget; raise them")
        return None

    def contains(self, alpha: np.ndarray) -> bool:
        return bool((alpha >= self.lo - TOL).all() and (alpha <= self.hi + TOL).all()
                    and abs(alpha.sum() - 1) < 10 * TOL)

    def project(self, x: np.ndarray, total: float | np.ndarray = 1.0) -> np.ndarray:
        """Euclidean projection of `x` (rows) onto {lo <= α <= hi, Σα = total}: α = clip(x − τ, lo, hi) with τ
        found by bisection (the sum is monotone in τ). Points already inside stay where they are. `total` may
        differ per row (a group's share split over its domains: mergemix.search.hierarchy)."""
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        total = np.broadcast_to(np.asarray(total, dtype=np.float64), (len(x),))
        low = (x - self.hi).min(axis=1) - 1.0
        high = (x - self.lo).max(axis=1) + 1.0
        for _ in range(100):  # the interval shrinks to 2^-100 of its width
            tau = (low + high) / 2
            over = np.clip(x - tau[:, None], self.lo, self.hi).sum(axis=1) > total
            low = np.where(over, tau, low)
            high = np.where(over, high, tau)
        return np.clip(x - ((low + high) / 2)[:, None], self.lo, self.hi)

    def fix(self, shares: dict[str, float]) -> Bounds:
        """These bounds with the domains of `shares` pinned there: a search of the other domains whose total
        is held at 1 − Σ shares (a group's share, in the second stage of a hierarchical search)."""
        lo, hi = self.lo.copy(), self.hi.copy()
        lo_from, hi_from = list(self.lo_from), list(self.hi_from)
        for i, d in enumerate(self.domains):
            if d in shares:
                lo[i] = hi[i] = shares[d]
                lo_from[i] = hi_from[i] = "pinned"
        return Bounds(self.domains, lo, hi, tuple(lo_from), tuple(hi_from))

    def subset(self, idx: list[int]) -> Bounds:
        """The bounds of the domains at `idx` alone (their sum is set by whoever projects onto them)."""
        return Bounds(tuple(self.domains[i] for i in idx), self.lo[idx], self.hi[idx],
                      tuple(self.lo_from[i] for i in idx), tuple(self.hi_from[i] for i in idx))

    def outside(self, alpha: dict[str, float]) -> dict[str, str]:
        """Domain → the bound `alpha` breaks there (above max_share / max_epochs / a pin, below min_share)."""
        out = {}
        for i, d in enumerate(self.domains):
            if alpha[d] > self.hi[i] + TOL:
                out[d] = f"above {self.hi_from[i] or 'its maximum'} ({alpha[d]:.3f} > {self.hi[i]:.3f})"
            elif alpha[d] < self.lo[i] - TOL:
                out[d] = f"below {self.lo_from[i] or 'its minimum'} ({alpha[d]:.3f} < {self.lo[i]:.3f})"
        return out

    def active(self, alpha: dict[str, float]) -> dict[str, str]:
        """Domain → the bound it sits on at `alpha` (min_share, max_share, max_epochs, pinned)."""
        out = {}
        for i, d in enumerate(self.domains):
            if self.hi_from[i] == "pinned":
                out[d] = "pinned"
            elif self.hi_from[i] and alpha[d] >= self.hi[i] - TOL:
                out[d] = str(self.hi_from[i])
            elif self.lo_from[i] and alpha[d] <= self.lo[i] + TOL:
                out[d] = str(self.lo_from[i])
        return out
