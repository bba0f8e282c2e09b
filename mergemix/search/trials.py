"""The trial log: one JSON line per evaluated α, appended as each finishes, so a rerun resumes."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergemix.artifacts import append_jsonl, read_jsonl


def alpha_key(alpha: Mapping[str, float]) -> tuple[tuple[str, float], ...]:
    """Identity of a mixture (domain → weight), rounded so that float noise does not split it."""
    return tuple((d, round(float(a), 6)) for d, a in sorted(alpha.items()))


class TrialLog:
    """Trials of one evaluation setting (`eval_key`: experts, benchmarks, merge method); lines written under
    another setting stay in the file but are not reused. Where one mixture was logged more than once (its
    scores recomputed for a changed objective), the last line counts."""

    def __init__(self, path: Path, eval_key: str) -> None:
        self.path = path
        self.eval_key = eval_key
        self._by_alpha: dict[tuple[tuple[str, float], ...], dict[str, Any]] = {}
        self._size = -1
        self._read()

    def _read(self) -> None:
        size = self.path.stat().st_size if self.path.exists() else 0
        if size == self._size:
            return
        self._size = size
        for rec in read_jsonl(self.path):
            if rec.get("eval_key") == self.eval_key:
                self._by_alpha[alpha_key(rec["alpha"])] = rec

    def get(self, alpha: Mapping[str, float]) -> dict[str, Any] | None:
        """The last record of `alpha`; the file is read again when it grew (another worker of a shared
        search appends to it too)."""
        key = alpha_key(alpha)
        if key not in self._by_alpha:
            self._read()
        return self._by_alpha.get(key)

    def add(self, record: dict[str, Any]) -> None:
        record = {**record, "eval_key": self.eval_key}
        append_jsonl(self.path, record)
        self._by_alpha[alpha_key(record["alpha"])] = record
