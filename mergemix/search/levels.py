"""Stage-1 coordinates of a top-down search (mergemix.search.hierarchy): a share per group of domains, each
group's share split over its domains, lifted to the flat mixture that is merged."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from mergemix.feasible import Bounds
from mergemix.recipe import MixtureSpec
from mergemix.search.trials import as_alpha


@dataclass(frozen=True)
class Level:
    """Stage-1 coordinates: a share per unit (group, or a domain of no group); `lift` splits each unit's share
    over its domains by `split` (projected onto their bounds), giving the flat mixture that is merged."""

    name: str
    units: list[str]
    members: list[list[int]]  # indices (recipe order) of each unit's domains
    split: np.ndarray  # per domain: its share of its unit (sums to 1 over each unit)
    flat: Bounds  # per domain
    bounds: Bounds  # per unit: Σ of its domains' lower and upper shares
    prior: np.ndarray  # per unit: Σ of its domains' token prior

    @classmethod
    def build(cls, units: dict[str, list[str]], split: dict[str, float], flat: Bounds, prior: np.ndarray) -> Level:
        """`units`: unit → its domains; `split`: domain → weight within its unit (normalized here; a unit of
        weight 0 is split evenly)."""
        domains = list(flat.domains)
        members = [[domains.index(d) for d in ds] for ds in units.values()]
        within = np.zeros(len(domains))
        for idx in members:
            w = np.array([split[domains[i]] for i in idx], dtype=np.float64)
            within[idx] = w / w.sum() if w.sum() > 0 else 1.0 / len(idx)
        lo = np.array([flat.lo[idx].sum() for idx in members])
        hi = np.array([min(flat.hi[idx].sum(), 1.0) for idx in members])

        def source(idx: list[int], which: tuple[str | None, ...]) -> str | None:
            if flat.pinned[idx].all():
                return "pinned"
            return next((which[i] for i in idx if which[i] and which[i] != "pinned"), None)

        bounds = Bounds(tuple(units), lo, hi, tuple(source(idx, flat.lo_from) for idx in members),
                        tuple(source(idx, flat.hi_from) for idx in members))
        return cls("groups", list(units), members, within, flat, bounds,
                   np.array([prior[idx].sum() for idx in members]))

    def lift(self, points: np.ndarray) -> np.ndarray:
        """Rows of unit shares → rows of domain shares (recipe order)."""
        points = np.atleast_2d(np.asarray(points, dtype=np.float64))
        out = np.zeros((len(points), len(self.flat.domains)))
        for u, idx in enumerate(self.members):
            share = points[:, u]
            out[:, idx] = self.flat.subset(idx).project(share[:, None] * self.split[idx], share)
        return out

    def alpha(self, point: dict[str, float]) -> dict[str, float]:
        """The flat mixture of a point of unit shares (domain → weight, as a trial's α)."""
        return as_alpha(list(self.flat.domains), self.lift(np.array([point[u] for u in self.units]))[0])

    def shares(self, alpha: dict[str, float]) -> dict[str, float]:
        """Each unit's share of a flat mixture."""
        domains = self.flat.domains
        return {u: round(sum(alpha[domains[i]] for i in idx), 6) for u, idx in zip(self.units, self.members,
                                                                                    strict=True)}

    def key(self) -> Any:
        """What the lift depends on (in the name of a stage's shared study)."""
        return [self.units, self.members, np.round(self.split, 6).tolist()]


def level_of(mixture: MixtureSpec, domains: list[str], bounds: Bounds, prior: np.ndarray) -> Level | None:
    """Stage 1 of a hierarchical search of `domains` grouped by `mixture` (mixture.groups, mixture.reuse
    keeping ratios), or None when no domains are grouped (a flat search)."""
    units = mixture.units(domains)
    if len(units) == len(domains):
        return None
    split = dict(zip(domains, prior.tolist(), strict=True))
    if mixture.reuse is not None and mixture.reuse.keep == "ratios":
        split.update(mixture.reuse.shares(domains))
    return Level.build(units, split, bounds, prior)
