"""α* → the mid-training mixture: share, tokens and epochs per domain.

The paper's rule: the ratio of a domain is its merge weight. tokens_d = ratio_d × total budget;
epochs_d = tokens_d / available_d. The bounds (min/max share, pinned shares, the repetition cap) are kept by
the search itself, so α* already respects them and the ratios are α* unchanged.
"""

from __future__ import annotations

import logging

import numpy as np

from mergemix.errors import MergemixError
from mergemix.proposal import Share
from mergemix.recipe import DomainSpec, MixtureSpec

log = logging.getLogger(__name__)


def available_tokens(domains: list[DomainSpec], n_tokens: dict[str, int]) -> dict[str, int]:
    """Tokens the team has per domain: its `available_tokens` where the recipe gives it, else the tokens read."""
    return {d.name: d.available_tokens or n_tokens[d.name] for d in domains}


def check_cap(spec: MixtureSpec, available: dict[str, int]) -> None:
    """Refuse bounds no mixture meets once the domains' token counts are known (one line): above all a
    repetition cap under which all domains together cannot fill `total_tokens`, so a run stops before any
    expert is trained rather than at the mixture stage."""
    if spec.max_epochs is not None:
        reachable = sum(spec.max_epochs * v for v in available.values())
        if reachable < spec.total_tokens:
            need = spec.total_tokens / sum(available.values())
            raise MergemixError(
                f"mixture.max_epochs: {spec.max_epochs:g} epochs of every domain give {reachable:,.0f} tokens, "
                f"less than mixture.total_tokens {spec.total_tokens:,}; raise mixture.max_epochs to at least "
                f"{need:.3g} or lower mixture.total_tokens"
            )
    problem = spec.bounds(list(available), available).problem()
    if problem:
        raise MergemixError(f"mixture: {problem} (mixture.max_epochs {spec.max_epochs:g} allows each domain at most "
                            "max_epochs x its available tokens)" if spec.max_epochs else f"mixture: {problem}")


def to_mixture(alpha: dict[str, float], available: dict[str, int], spec: MixtureSpec) -> list[Share]:
    """Ratios (= α), tokens and epochs per domain for `spec.total_tokens`, with the bound each domain sits on.
    An α outside the bounds is refused: the search only proposes feasible mixtures."""
    bounds = spec.bounds(list(alpha), available)
    if not bounds.contains(np.array(list(alpha.values()))):
        raise MergemixError(f"mixture: {alpha} lies outside the recipe's bounds (min/max share, pinned, max_epochs)")
    active = bounds.active(alpha)
    out = []
    for d, a in alpha.items():
        tokens = round(a * spec.total_tokens)
        out.append(Share(domain=d, alpha=a, ratio=a, tokens=tokens, available_tokens=available[d],
                         epochs=round(tokens / available[d], 4), capped=active.get(d) == "max_epochs",
                         bound=active.get(d)))
    return out
