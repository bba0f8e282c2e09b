"""α* → the mid-training mixture: share, tokens and epochs per domain.

The paper's rule: the ratio of a domain is its merge weight. tokens_d = ratio_d × total budget;
epochs_d = tokens_d / available_d. With a repetition cap (max_epochs), a domain that would be repeated
more often is held at the cap and the share it loses moves to the others in proportion to their α.
"""

from __future__ import annotations

import logging

from mergemix.errors import MergemixError
from mergemix.proposal import Share
from mergemix.recipe import MixtureSpec

log = logging.getLogger(__name__)


def to_mixture(alpha: dict[str, float], available: dict[str, int], spec: MixtureSpec) -> list[Share]:
    """Ratios, tokens and epochs per domain for `spec.total_tokens`, honouring `spec.max_epochs`."""
    ratio = dict(alpha)
    capped: set[str] = set()
    if spec.max_epochs is not None:
        cap_share = {d: spec.max_epochs * available[d] / spec.total_tokens for d in alpha}
        if sum(cap_share.values()) < 1:
            raise MergemixError(
                f"mixture.max_epochs: {spec.max_epochs} epochs of every domain give "
                f"{sum(spec.max_epochs * v for v in available.values()):,.0f} tokens, less than "
                f"mixture.total_tokens {spec.total_tokens:,}; raise the cap or lower the budget"
            )
        while True:
            over = [d for d in ratio if d not in capped and ratio[d] > cap_share[d] + 1e-12]
            if not over:
                break
            capped.update(over)
            for d in over:
                ratio[d] = cap_share[d]
            free = [d for d in ratio if d not in capped]
            if not free:
                break
            left = 1.0 - sum(ratio[d] for d in capped)
            weight = sum(alpha[d] for d in free)
            for d in free:
                ratio[d] = left * (alpha[d] / weight if weight > 0 else 1 / len(free))
        for d in sorted(capped):
            log.warning("domain %s held at %.1f epochs: its share moved from %.3f to %.3f", d, spec.max_epochs,
                        alpha[d], ratio[d])
    out = []
    for d, a in alpha.items():
        tokens = round(ratio[d] * spec.total_tokens)
        out.append(Share(domain=d, alpha=a, ratio=round(ratio[d], 6), tokens=tokens, available_tokens=available[d],
                         epochs=round(tokens / available[d], 4), capped=d in capped))
    return out
