"""mergemix: propose a mid-training data mixture by merging per-domain experts (MergeMix).

Public API (mirrors the CLI)::

    from mergemix import load_recipe, propose
    proposal = propose(load_recipe("recipes/demo.yaml"))
    print(proposal.table())
    report = rank_consistency(load_recipe("recipes/demo.yaml"))  # real mixture runs vs the proxy
    print(report.summary())

By stage, inside a training pipeline: `MixtureRun` (mergemix.api); the proposed mixture as a dataset to
train on: `mixture_dataset` (mergemix.pipelines.mixtures).

Names are imported on first use, so `import mergemix.recipe` (a recipe's validation) loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_PUBLIC = {
    "Consistency": "mergemix.report",
    "MixtureRun": "mergemix.api",
    "MergemixError": "mergemix.errors",
    "Proposal": "mergemix.proposal",
    "Recipe": "mergemix.recipe",
    "load_recipe": "mergemix.recipe",
    "mixture_dataset": "mergemix.pipelines.mixtures",
    "propose": "mergemix.pipelines.propose",
    "rank_consistency": "mergemix.report",
}
__all__ = sorted(_PUBLIC)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'mergemix' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
