"""Coordinates for samplers: the feasible set as the unit cube [0, 1]^(m-1), m = the unpinned domains.

Stick-breaking: u_j ∈ [0, 1] becomes the fraction z_j = 1 − (1 − u_j)^(1/(m−1−j)) of what is left, so
uniform u gives Dirichlet(1), uniform on the simplex; the m − 1 coordinates have no redundant scale direction
(a softmax of m logits would). Pinned domains keep their share; the result is projected into the bounds,
so every point a sampler proposes is feasible, and a feasible point maps back to itself.
"""

from __future__ import annotations

import numpy as np

from mergemix.feasible import Bounds


class SimplexMap:
    def __init__(self, bounds: Bounds) -> None:
        self.bounds = bounds
        self.free = bounds.free
        self.mass = 1.0 - float(bounds.lo[bounds.pinned].sum())
        self.names = [f"u{j}" for j in range(len(self.free) - 1)]

    def _exponent(self, j: int) -> float:
        return float(len(self.free) - 1 - j)

    def to_alpha(self, u: list[float]) -> np.ndarray:
        """Cube coordinates → a feasible α (all domains, recipe order)."""
        x = np.where(self.bounds.pinned, self.bounds.lo, 0.0)
        rest = self.mass
        for j, i in enumerate(self.free[:-1]):
            z = 1.0 - (1.0 - u[j]) ** (1.0 / self._exponent(j))
            x[i] = rest * z
            rest -= x[i]
        if self.free:
            x[self.free[-1]] = rest
        return self.bounds.project(x)[0]

    def to_cube(self, alpha: np.ndarray) -> list[float]:
        """A feasible α → cube coordinates with to_alpha(to_cube(α)) = α (used to enqueue seed points)."""
        u, rest = [], self.mass
        for j, i in enumerate(self.free[:-1]):
            z = min(max(alpha[i] / rest, 0.0), 1.0) if rest > 1e-12 else 0.0
            u.append(float(1.0 - (1.0 - z) ** self._exponent(j)))
            rest -= alpha[i]
        return u
