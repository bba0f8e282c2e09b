"""What repeated data is worth: a mixture's weights discounted for the epochs it implies (search.repetition).

A merge of short experts cannot show repetition: the merge at α looks the same whether a domain's share fills
its data once or six times over. Muennighoff et al. 2023 ("Scaling Data-Constrained Language Models") fit the
value of U unique tokens seen e times (R = e − 1 repetitions) as U + U R* (1 − exp(−R / R*)) unique-token
equivalents, with R* ≈ 15.4: per token trained, value(e) = (1 + R* (1 − exp(−(e − 1) / R*))) / e for
e > 1, and 1 for data seen at most once. A mixture α of a budget of T tokens trains e_d = α_d T / A_d epochs
of domain d (A_d its available tokens), so `discounted` scores it by the merge at α_d value(e_d),
rescaled to the sum of α (α = 0 stays the base). Off by default, until measured (docs/fidelity.md).
"""

from __future__ import annotations

import torch

R_STAR = 15.4  # Muennighoff et al. 2023: repetitions after which repeated tokens' value has decayed by 1/e


def token_value(epochs: torch.Tensor, r_star: float = R_STAR) -> torch.Tensor:
    """The value of a token trained at `epochs` passes over its data, in fresh tokens (1 up to one epoch)."""
    e = epochs.clamp(min=1.0)
    return (1 + r_star * (1 - torch.exp(-(e - 1) / r_star))) / e


def discounted(alpha: torch.Tensor, budget: float, available: torch.Tensor, r_star: float = R_STAR) -> torch.Tensor:
    """The weights a merge stands for mixture `alpha` at with repetition counted: each share times the value of
    its tokens at the epochs `budget` tokens put on its `available` ones, rescaled to the sum of `alpha`.
    Differentiable in `alpha` (the gradient strategy)."""
    weighted = alpha * token_value(alpha * budget / available, r_star)
    total = weighted.sum()
    return weighted * (alpha.sum() / total) if total > 0 else weighted
