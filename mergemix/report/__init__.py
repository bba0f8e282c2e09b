"""Rank-consistency report."""
