"""mergemix: propose a mid-training data mixture by merging per-domain experts (MergeMix).

Public API (mirrors the CLI)::

    from mergemix import load_recipe, propose
    proposal = propose(load_recipe("recipes/demo.yaml"))
    print(proposal.table())
    report = rank_consistency(load_recipe("recipes/demo.yaml"))  # real mixture runs vs the proxy
    print(report.summary())
"""

from __future__ import annotations

from mergemix.errors import MergemixError
from mergemix.pipeline import propose
from mergemix.proposal import Proposal
from mergemix.recipe import Recipe, load_recipe
from mergemix.report import Consistency, rank_consistency

__all__ = ["Consistency", "MergemixError", "Proposal", "Recipe", "load_recipe", "propose", "rank_consistency"]
__version__ = "0.1.0"
