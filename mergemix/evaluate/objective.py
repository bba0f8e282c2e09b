"""From raw benchmark scores to normalized capability scores and the objective.

Normalization puts every benchmark on the same footing, higher is better:
- accuracy metrics (acc, acc_norm): chance → 0, perfect → 1;
- continuous metrics (loss, score): the base model → 0, and one unit is the spread of the metric over the
  base and the experts (max − min). +0.5 means "better than the base by half of what separates the base
  and the specialists". The spread is positive even where every expert is worse than the base (short
  specialists forget), which a "best expert → 1" scale would turn upside down.
A capability's score is the mean over its benchmarks; the objective is the weighted mean over capabilities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergemix.evaluate.kinds import BENCHMARKS
from mergemix.recipe import BenchmarkSpec, EvalSpec

Raw = Mapping[str, Mapping[str, float]]  # benchmark → metric → value
CHANCE_METRICS = {"acc", "acc_norm"}


def _oriented(b: BenchmarkSpec, raw: Raw) -> float:
    """The benchmark's objective metric with its sign set so that higher is better."""
    m = b.objective_metric
    return (1.0 if BENCHMARKS.get(b.kind).higher_is_better[m] else -1.0) * raw[b.name][m]


@dataclass(frozen=True)
class Objective:
    """Normalization references (per benchmark: value mapped to 0, value mapped to 1) and weights."""

    VERSION = 2  # part of the trial log's key: logged normalized scores are stale when this changes

    spec: EvalSpec
    refs: dict[str, tuple[float, float]]

    @classmethod
    def from_references(cls, spec: EvalSpec, base: Raw, experts: Sequence[Raw]) -> Objective:
        refs = {}
        for b in spec.benchmarks:
            m = b.objective_metric
            if m in CHANCE_METRICS:
                refs[b.name] = (base[b.name]["chance"], 1.0)
            else:
                values = [_oriented(b, r) for r in (base, *experts)]
                refs[b.name] = (values[0], values[0] + max(values) - min(values))
        return cls(spec, refs)

    def oriented(self, bench: str, raw: Raw) -> float:
        return _oriented(next(x for x in self.spec.benchmarks if x.name == bench), raw)

    def normalized(self, raw: Raw) -> dict[str, float]:
        out = {}
        for b in self.spec.benchmarks:
            lo, hi = self.refs[b.name]
            span = hi - lo if abs(hi - lo) > 1e-9 else 1.0  # nothing moved it: report the raw gain
            out[b.name] = (self.oriented(b.name, raw) - lo) / span
        return out

    def capabilities(self, raw: Raw) -> dict[str, float]:
        norm = self.normalized(raw)
        groups: dict[str, list[float]] = {}
        for b in self.spec.benchmarks:
            groups.setdefault(b.capability, []).append(norm[b.name])
        return {g: sum(v) / len(v) for g, v in sorted(groups.items())}

    def combine(self, capabilities: Mapping[str, float]) -> float:
        """Weighted mean of capability scores (weights from the recipe; missing groups weigh 1)."""
        total = sum(self.spec.weight(g) for g in capabilities)
        return sum(self.spec.weight(g) * v for g, v in capabilities.items()) / total

    def __call__(self, raw: Raw) -> tuple[dict[str, float], dict[str, float], float]:
        """(normalized per benchmark, per capability, objective) of one evaluation."""
        caps = self.capabilities(raw)
        return self.normalized(raw), caps, self.combine(caps)
