"""Progress bars: tqdm, off under `-q`, and rate-limited where they do not go to a terminal.

tqdm reads its `TQDM_*` environment defaults once, when it is imported, which happens long before the CLI
has parsed `-q`; so the switch lives here and every bar of the package is made by `progress`. Written to a
log file or a pipe, each refresh of a bar is one more carriage-return-separated copy of it (thousands per
run at tqdm's 0.1 s default); there a bar appears only after `LOG_INTERVAL` seconds and refreshes at most
that often, so short bars leave nothing and long ones a line every half minute. The bars transformers and
datasets draw themselves (loading weights, saving datasets) are switched off in both cases.
"""

from __future__ import annotations

import sys
from typing import Any

import tqdm.auto as _auto
from tqdm import std
from tqdm.auto import tqdm

LOG_INTERVAL = 30.0  # seconds between refreshes of a bar that is not on a terminal

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Switch every bar made from now on off (True) or back on."""
    global _quiet
    _quiet = quiet


def _on_terminal(stream: Any = None) -> bool:
    return bool(getattr(stream or sys.stderr, "isatty", lambda: False)())


def _console() -> bool:
    """False in a notebook, whose widget bars neither flood logs nor need a terminal."""
    return _auto.notebook_tqdm is std.tqdm


def library_bars() -> bool:
    """Whether other libraries' own bars may show: not under -q, and on a terminal (or in a notebook)."""
    return not _quiet and (_on_terminal() or not _console())


class _LogBar(tqdm):
    """A bar for a log: a new postfix or description waits for the next timed refresh (tqdm would redraw
    at once, past `mininterval` and `delay`)."""

    def set_postfix(self, ordered_dict: Any = None, refresh: bool = False, **kwargs: Any) -> None:
        super().set_postfix(ordered_dict, refresh=refresh, **kwargs)

    def set_description(self, desc: str | None = None, refresh: bool = False) -> None:
        super().set_description(desc, refresh=refresh)


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """A tqdm bar over `iterable` (tqdm's keyword arguments), honouring the quiet switch."""
    if _quiet:
        kwargs["disable"] = True
    elif _console() and not _on_terminal(kwargs.get("file")):
        kwargs["mininterval"] = max(kwargs.get("mininterval", 0.0), LOG_INTERVAL)
        kwargs.setdefault("delay", LOG_INTERVAL)
        return _LogBar(iterable, **kwargs)
    return tqdm(iterable, **kwargs)
