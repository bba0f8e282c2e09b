"""One small registry for everything chosen by name in a recipe: merge methods, benchmark kinds,
surrogates. Names are checked when the recipe is parsed, with a "did you mean" hint."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from mergemix.errors import MergemixError

T = TypeVar("T")


_ALL: list[Registry] = []


class Registry(Generic[T]):
    """A named table of implementations. Register with the decorator, look up with `get`."""

    def __init__(self, what: str) -> None:
        self.what = what
        self._items: dict[str, T] = {}
        _ALL.append(self)

    def register(self, name: str) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.what} {name!r} registered twice")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise MergemixError(self.unknown_message(name)) from None

    def unknown_message(self, name: str) -> str:
        close = difflib.get_close_matches(name, list(self._items), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        return f"unknown {self.what} {name!r} (known: {', '.join(sorted(self._items))}){hint}"

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._items))


def describe(obj: object) -> str:
    """One line about a registered item: its `description`, else its docstring's first line; a benchmark
    kind adds its metrics."""
    doc = (getattr(obj, "__doc__", None) or "").strip().split("\n\n")[0]
    text = getattr(obj, "description", None) or " ".join(doc.split()).split(". ")[0].rstrip(".")
    metrics = getattr(obj, "metrics", None)
    return f"{text} [metrics: {', '.join(metrics)}]" if metrics else text


def catalog() -> str:
    """Every registry of the package and what it holds, for `mergemix ls` (imports every module first)."""
    import importlib
    import pkgutil

    import mergemix

    for mod in pkgutil.walk_packages(mergemix.__path__, "mergemix."):
        try:
            importlib.import_module(mod.name)
        except ImportError:  # an optional dependency missing: that module's registries are left out
            continue
    lines = []
    for reg in sorted(_ALL, key=lambda r: r.what):
        lines.append(f"{reg.what} names:")
        width = max((len(n) for n in reg), default=0)
        lines += [f"  {name:<{width}}  {describe(reg._items[name])}".rstrip() for name in reg]
    return "\n".join(lines)
