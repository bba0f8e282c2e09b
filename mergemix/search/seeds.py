"""Seed design: the mixtures evaluated by real merging before any surrogate is fitted."""

from __future__ import annotations

import numpy as np


def seed_points(prior: np.ndarray, n: int, concentration: float, seed: int) -> list[tuple[str, np.ndarray]]:
    """(kind, alpha) pairs: the K vertices (each expert alone), uniform, the token-proportional prior, then
    Dirichlet(concentration·K·prior) draws around the prior (RegMix/DeMix practice) up to `n` in all."""
    k = len(prior)
    points: list[tuple[str, np.ndarray]] = [("vertex", np.eye(k)[i]) for i in range(k)]
    points += [("uniform", np.full(k, 1.0 / k)), ("token_prior", np.asarray(prior, dtype=np.float64))]
    rng = np.random.default_rng([seed, 17])
    alpha = np.maximum(concentration * k * np.asarray(prior), 1e-3)
    while len(points) < n:
        points.append(("dirichlet", rng.dirichlet(alpha)))
    return points


def simplex_candidates(prior: np.ndarray, n: int, concentration: float, seed: int) -> np.ndarray:
    """`n` points for the dense surrogate search: half uniform on the simplex, half around the prior."""
    rng = np.random.default_rng([seed, 29])
    k = len(prior)
    flat = rng.dirichlet(np.ones(k), size=n - n // 2)
    near = rng.dirichlet(np.maximum(concentration * k * np.asarray(prior), 1e-3), size=n // 2)
    return np.vstack([flat, near])
