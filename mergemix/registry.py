"""One small registry for everything chosen by name in a recipe: merge methods, benchmark kinds, surrogates,
search strategies, built-in corpora, packaged bases.

An entry names its implementation as a `"module:attribute"` string with static metadata (a description,
a benchmark kind's metrics), and the module is imported on the first `get`. So a recipe checks every name,
and `mergemix ls` lists every entry, without importing torch-heavy code. The package's entries are declared
in one table, `mergemix.catalog`; a plugin or a test adds its own with `Registry.add`.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from mergemix.errors import MergemixError

T = TypeVar("T")


@dataclass(frozen=True)
class Entry:
    """One registered name: where its implementation lives (`"module:attribute"`, or the object itself) and
    what is known of it without importing it."""

    target: Any
    description: str
    meta: Mapping[str, Any] = field(default_factory=dict)

    def load(self) -> Any:
        if not isinstance(self.target, str):
            return self.target
        module, _, attr = self.target.partition(":")
        return getattr(importlib.import_module(module), attr)


class Registry(Generic[T]):
    """A named table of implementations, loaded on first use. Add with `add`, look up with `get`."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._entries: dict[str, Entry] = {}
        self._loaded: dict[str, T] = {}

    def add(self, name: str, target: str | T, description: str, **meta: Any) -> None:
        """Register `name`: `target` is `"module:attribute"` (imported on first `get`) or the object itself;
        `meta` holds what callers need before loading it (a benchmark kind's `metrics`)."""
        if name in self._entries:
            raise ValueError(f"{self.what} {name!r} registered twice")
        self._entries[name] = Entry(target, description, meta)

    def remove(self, name: str) -> None:
        """Unregister `name` (a test's temporary entry)."""
        del self._entries[name]
        self._loaded.pop(name, None)

    def get(self, name: str) -> T:
        """The implementation of `name`, importing its module on first use."""
        if name not in self._loaded:
            self._loaded[name] = self.entry(name).load()
        return self._loaded[name]

    def entry(self, name: str) -> Entry:
        try:
            return self._entries[name]
        except KeyError:
            raise MergemixError(self.unknown_message(name)) from None

    def meta(self, name: str) -> Mapping[str, Any]:
        """What is known of `name` without importing it."""
        return self.entry(name).meta

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self._entries), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.what} {name!r} (known: {', '.join(sorted(self._entries))}){hint}"

    def check(self, name: str) -> str:
        """`name` if it is registered; else a ValueError with the known names and a suggestion (for pydantic
        validators)."""
        if name not in self._entries:
            raise ValueError(self.unknown_message(name))
        return name

    def describe(self, name: str) -> str:
        """One line about `name`: its description, plus a benchmark kind's metrics."""
        entry = self.entry(name)
        metrics = entry.meta.get("metrics")
        return f"{entry.description} [metrics: {', '.join(metrics)}]" if metrics else entry.description

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))
