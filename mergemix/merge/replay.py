"""Merge weights for a mixture when the experts replayed general data.

An expert trained with a share r of every batch drawn from general data (all domains in token proportion p)
learned from the mixture (1 - r) e_k + r p, not from its domain alone. A merge with weights w (Σ w = 1) then
stands, to first order, for Σ_k w_k ((1 - r) e_k + r p) = (1 - r) w + r p. So the mixture α is scored by the
merge at w = (α - r (Σ α) p) / (1 - r): every α the search, the report and `export` handle is a mixture a team
can train, and α* is adopted as the proposal's shares with no second step (before, the ledger testbed's
all-letters α* at replay 0.25 was proposed as is, while its merge stood for a mixture with a quarter of
other data). A share below r p_d gets a negative weight, a step away from that expert: the first-order
picture of a run that holds back a domain the experts' replay kept, and no more than first order (mapped,
the all-letters mixture still scored best and trained for real collapsed: `mergemix.pipelines.propose.left_out` warns of it).
Σ α rather than 1 keeps α = 0 the base itself.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def replay_matrix(share: float, prior: Sequence[float]) -> torch.Tensor | None:
    """M (float64, K x K) with merge weights w = M α for mixture α, given the replayed `share` of every expert
    batch and the replay mix `prior` (token proportions, in the experts' order); None without replay (w = α)."""
    if share <= 0:
        return None
    p = torch.tensor(list(prior), dtype=torch.float64)
    k = len(p)
    ones = torch.ones(k, dtype=torch.float64)
    return (torch.eye(k, dtype=torch.float64) - share * torch.outer(p, ones)) / (1 - share)


def merge_weights(matrix: torch.Tensor | None, alpha: Sequence[float]) -> list[float]:
    """The merge weights of mixture `alpha` under `matrix` (`replay_matrix`): `alpha` itself without one."""
    if matrix is None:
        return list(alpha)
    return (matrix @ torch.tensor(list(alpha), dtype=torch.float64)).tolist()
