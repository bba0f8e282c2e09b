"""User-facing errors: the CLI prints their message and exits non-zero, without a traceback."""

from __future__ import annotations


class MergemixError(Exception):
    """An error the user can fix; the message names the file, field or line, and what to do."""
