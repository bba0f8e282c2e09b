"""Data: readers, built-in corpora, splitting and packing."""
