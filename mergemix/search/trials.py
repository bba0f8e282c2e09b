"""Trials: one evaluated mixture each, the result of a search, what α* maximizes, and the trial log (one JSON
line per evaluated α, appended as each finishes, so a rerun resumes)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mergemix.artifacts import append_jsonl, read_jsonl

if TYPE_CHECKING:
    from mergemix.evaluate.objective import Objective

Raw = dict[str, dict[str, float]]  # benchmark → metric → value


@dataclass
class Trial:
    """One evaluated mixture: α, raw benchmark scores, normalized scores, capabilities, objective."""

    id: str
    kind: str  # base, vertex, uniform, token_prior, seed kinds, a strategy's kinds
    alpha: dict[str, float]
    raw: Raw
    normalized: dict[str, float] = field(default_factory=dict)
    capabilities: dict[str, float] = field(default_factory=dict)
    objective: float = float("nan")
    predicted: float | None = None  # the surrogates' objective, for verified candidates
    point: dict[str, float] | None = None  # the shares of groups a hierarchical stage chose α by (α is its lift)

    def record(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if v is not None}

    def vector(self, domains: list[str]) -> np.ndarray:
        return np.array([self.alpha[d] for d in domains])


@dataclass
class SearchResult:
    base: Trial
    trials: list[Trial]  # every evaluated mixture on the simplex, in evaluation order
    objective: Objective
    star: Trial
    surrogate_loo_rmse: dict[str, float]
    predicted_star: float | None
    ranked: list[Trial] = field(default_factory=list)  # feasible trials, best first by what α* maximizes

    def by_kind(self, kind: str) -> Trial:
        return next(t for t in self.trials if t.kind == kind)

    def record(self) -> dict[str, Any]:
        """The result as JSON. The objective is not stored: it is rebuilt from the base and the vertices
        (`restore`)."""
        return {"base": self.base.record(), "trials": [t.record() for t in self.trials], "star": self.star.record(),
                "ranked": [t.record() for t in self.ranked], "surrogate_loo_rmse": self.surrogate_loo_rmse,
                "predicted_star": self.predicted_star}

    @classmethod
    def restore(cls, record: dict[str, Any], domains: list[str],
                objective: Callable[[Trial, list[Trial]], Objective]) -> SearchResult:
        """The result `record` wrote, each α in the order of `domains` (JSON keeps keys sorted);
        `objective(base, trials)` rebuilds its objective."""

        def trial(rec: dict[str, Any]) -> Trial:
            return Trial(**{**rec, "alpha": {d: rec["alpha"][d] for d in domains}})

        trials = [trial(t) for t in record["trials"]]
        base = trial(record["base"])
        return cls(base, trials, objective(base, trials), trial(record["star"]), record["surrogate_loo_rmse"],
                   record["predicted_star"], [trial(t) for t in record["ranked"]])

    @property
    def vertices(self) -> list[Trial]:
        return vertices(self.trials)


def vertices(trials: Sequence[Trial]) -> list[Trial]:
    """The merges at each domain's vertex, in domain order: what stands for each expert alone."""
    return [t for t in trials if t.kind == "vertex"]


def as_alpha(domains: Sequence[str], vec: Sequence[float] | np.ndarray) -> dict[str, float]:
    """A point as domain → weight: clipped at 0, summing to 1, rounded to 6 decimals (a trial's identity)."""
    vec = np.clip(np.asarray(vec, dtype=float), 0.0, None)
    vec = vec / vec.sum() if vec.sum() > 0 else vec
    return {d: round(float(a), 6) for d, a in zip(domains, vec, strict=True)}


def kl_divergence(alpha: np.ndarray, prior: np.ndarray) -> np.ndarray:
    """KL(α ‖ prior) in nats per row of `alpha` (0 · log 0 = 0)."""
    alpha = np.atleast_2d(alpha)
    safe = np.where(alpha > 0, alpha, 1.0)
    return np.sum(np.where(alpha > 0, alpha * np.log(safe / prior), 0.0), axis=1)


@dataclass(frozen=True)
class KlPull:
    """What α* maximizes: the objective less `weight` × KL(α ‖ `prior`) in nats (search.kl_weight), a pull
    toward the token-proportional mix where the objective barely tells mixtures apart."""

    weight: float
    prior: np.ndarray

    def penalty(self, points: np.ndarray) -> np.ndarray:
        """The penalty of each row of `points` (0 without a weight)."""
        points = np.atleast_2d(points)
        return self.weight * kl_divergence(points, self.prior) if self.weight else np.zeros(len(points))

    def score(self, t: Trial, domains: list[str]) -> float:
        return t.objective - float(self.penalty(t.vector(domains))[0])


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
