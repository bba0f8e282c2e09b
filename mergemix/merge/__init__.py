"""Merging experts: the methods (named in mergemix.catalog) and the in-place merger used for every trial."""

from mergemix.merge.inplace import InPlaceMerger

__all__ = ["InPlaceMerger"]
