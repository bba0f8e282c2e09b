"""Rank-consistency report: real mixture runs against the merged proxy, beside the noise ceiling and
predictors that need no merge (`mergemix report RECIPE`)."""

from mergemix.report.consistency import rank_consistency
from mergemix.report.render import Consistency

__all__ = ["Consistency", "rank_consistency"]
