"""From raw benchmark scores to normalized capability scores and the objective.

Normalization puts every benchmark on the same footing, higher is better:
- accuracy-type metrics (acc, acc_norm, blank_ppl, exact_match, f1): chance → 0 (the benchmark's
  `chance`; 0 for generation), the benchmark's `ceiling` (default perfect, 1) → 1;
- continuous metrics (loss, score, margin): the base model → 0, and one unit is the spread of the metric
  over the base and the experts (max − min). +0.5 means "better than the base by half of what separates
  the base and the specialists". The spread is positive even where every expert is worse than the base
  (short specialists forget), which a "best expert → 1" scale would turn upside down. A `ceiling` given for
  a continuous metric is the value mapped to 1 instead (the base still → 0).
A capability's score is the mean over its benchmarks; the objective is the weighted mean over capabilities.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from mergemix.errors import MergemixError
from mergemix.evaluate.kinds import BENCHMARKS
from mergemix.recipe import BenchmarkSpec, EvalSpec

Raw = Mapping[str, Mapping[str, float]]  # benchmark → metric → value
CHANCE_METRICS = {"acc", "acc_norm", "blank_ppl", "exact_match", "f1"}


def _sign(b: BenchmarkSpec) -> float:
    """+1 where higher values of the benchmark's objective metric are better, -1 where lower are."""
    return 1.0 if BENCHMARKS.get(b.kind).higher_is_better[b.objective_metric] else -1.0


def _oriented(b: BenchmarkSpec, raw: Raw) -> float:
    """The benchmark's objective metric with its sign set so that higher is better."""
    return _sign(b) * raw[b.name][b.objective_metric]


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
            ceiling = None if b.ceiling is None else _sign(b) * b.ceiling
            accuracy = b.objective_metric in CHANCE_METRICS
            if accuracy:
                lo = base[b.name].get("chance", 0.0)
                refs[b.name] = (lo, 1.0 if ceiling is None else ceiling)
            else:
                values = [_oriented(b, r) for r in (base, *experts)]
                lo = values[0]
                refs[b.name] = (lo, lo + max(values) - min(values) if ceiling is None else ceiling)
            if ceiling is not None and ceiling <= refs[b.name][0]:
                raise MergemixError(
                    f"benchmark {b.name!r}: ceiling {b.ceiling} is no better than the value normalized to 0 "
                    f"({_sign(b) * refs[b.name][0]:.4g}, {'chance' if accuracy else 'the base'}); "
                    "raise it (or lower it, for a loss), or leave it out"
                )
        return cls(spec, refs)

    def references(self) -> dict[str, dict[str, str | float]]:
        """Per benchmark: its metric, capability group, and the metric values (in its own units) that
        normalize to 0 and to 1, for proposal.json."""
        return {b.name: {"metric": b.objective_metric, "capability": b.capability,
                         "zero": round(_sign(b) * self.refs[b.name][0], 6),
                         "one": round(_sign(b) * self.refs[b.name][1], 6)}
                for b in self.spec.benchmarks}

    def weights(self) -> dict[str, float]:
        """Objective weight of every capability group."""
        return {g: self.spec.weight(g) for g in sorted({b.capability for b in self.spec.benchmarks})}

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
