"""Merging experts: methods registered by name, and the in-place merger used for every trial."""

from mergemix.merge.inplace import InPlaceMerger
from mergemix.merge.methods import MERGE_METHODS

__all__ = ["MERGE_METHODS", "InPlaceMerger"]
