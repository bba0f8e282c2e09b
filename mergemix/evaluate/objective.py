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

Low signal: a benchmark whose spread over the base and the experts lies within its item noise (below
`low_signal_ratio` standard errors) cannot rank the merges in between, and would only add noise to the
search. By `low_signal` it is dropped (weight 0), downweighted (weight spread / (ratio x stderr)) or kept;
a capability weighs in the objective by its recipe weight times the mean weight of its benchmarks.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from mergemix.catalog import BENCHMARK_KINDS, CHANCE_METRICS
from mergemix.errors import MergemixError
from mergemix.evaluate.kinds import Items
from mergemix.recipe import BenchmarkSpec, EvalSpec

log = logging.getLogger(__name__)

Raw = Mapping[str, Mapping[str, float]]  # benchmark → metric → value


def _sign(b: BenchmarkSpec) -> float:
    """+1 where higher values of the benchmark's objective metric are better, -1 where lower are."""
    return 1.0 if BENCHMARK_KINDS.get(b.kind).higher_is_better[b.objective_metric] else -1.0


def _oriented(b: BenchmarkSpec, raw: Raw) -> float:
    """The benchmark's objective metric with its sign set so that higher is better."""
    return _sign(b) * raw[b.name][b.objective_metric]


@dataclass(frozen=True)
class Noise:
    """Can a benchmark tell models apart? Its metric's spread (max - min) over base + experts, the mean
    standard error over items of the same models, and the weight it gets in the objective (1 unless low)."""

    spread: float
    stderr: float
    low: bool
    weight: float


def _noise(b: BenchmarkSpec, spec: EvalSpec, raws: Sequence[Raw]) -> Noise:
    m = b.objective_metric
    values = [r[b.name][m] for r in raws]
    spread = max(values) - min(values)
    ses = [r[b.name].get(f"{m}_se", float("nan")) for r in raws]
    stderr = sum(ses) / len(ses)
    low = spec.low_signal_ratio > 0 and math.isfinite(stderr) and spread <= spec.low_signal_ratio * stderr
    weight = 1.0
    if low and spec.low_signal == "drop":
        weight = 0.0
    elif low and spec.low_signal == "downweight":
        weight = spread / (spec.low_signal_ratio * stderr) if stderr > 0 else 0.0
    return Noise(spread, stderr, low, weight)


@dataclass(frozen=True)
class Objective:
    """Normalization references (per benchmark: value mapped to 0, value mapped to 1), each benchmark's
    signal and weight, and the capability weights."""

    VERSION = 3  # part of the trial log's key: logged normalized scores are stale when this changes

    spec: EvalSpec
    refs: dict[str, tuple[float, float]]
    noise: dict[str, Noise] = field(default_factory=dict)

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
        noise = {b.name: _noise(b, spec, [base, *experts]) for b in spec.benchmarks}
        for name, n in noise.items():
            if n.low:
                action = {"drop": "dropped from the objective", "downweight": f"weighted {n.weight:.2f}",
                          "keep": "kept (evaluation.low_signal: keep)"}[spec.low_signal]
                log.warning("benchmark %s: its spread over the base and the experts (%.4g) is within its item "
                            "noise (%.4g x stderr %.4g): it cannot rank merges; %s", name, n.spread,
                            spec.low_signal_ratio, n.stderr, action)
        if not any(n.weight > 0 and spec.weight(b.capability) > 0 for b, n in zip(spec.benchmarks, noise.values(),
                                                                                  strict=True)):
            log.warning("every weighted benchmark is low-signal: keeping them all in the objective")
            noise = {k: Noise(n.spread, n.stderr, n.low, 1.0) for k, n in noise.items()}
        return cls(spec, refs, noise)

    def benchmark_weight(self, bench: str) -> float:
        """1, or less for a low-signal benchmark (see the module docstring)."""
        return self.noise[bench].weight if bench in self.noise else 1.0

    def group_weight(self, group: str) -> float:
        """The recipe weight of `group` times the mean weight of its benchmarks."""
        ws = [self.benchmark_weight(b.name) for b in self.spec.benchmarks if b.capability == group]
        return self.spec.weight(group) * sum(ws) / len(ws)

    def coefficients(self) -> dict[str, float]:
        """Each benchmark's coefficient on its normalized score in the objective (they sum to 1)."""
        groups = self.weights()
        total = sum(groups.values())
        out = {}
        for b in self.spec.benchmarks:
            inside = sum(self.benchmark_weight(x.name) for x in self.spec.benchmarks if x.capability == b.capability)
            out[b.name] = groups[b.capability] / total * self.benchmark_weight(b.name) / inside if inside else 0.0
        return out

    def se(self, raw: Raw, coef: Mapping[str, float] | None = None) -> float:
        """Standard error over benchmark items (benchmarks independent) of Σ coef_b × normalized_b, by
        default the objective itself; a benchmark without a `<metric>_se` adds nothing."""
        var = 0.0
        for b in self.spec.benchmarks:
            c = (coef if coef is not None else self.coefficients()).get(b.name, 0.0)
            lo, hi = self.refs[b.name]
            span = hi - lo if abs(hi - lo) > 1e-9 else 1.0
            se = raw[b.name].get(f"{b.objective_metric}_se", float("nan"))
            var += (c * se / span) ** 2 if math.isfinite(se) else 0.0
        return math.sqrt(var)

    def diff_se(self, a: Raw, b: Raw, items_a: Items, items_b: Items) -> float:
        """Standard error over benchmark items of objective(a) − objective(b) for two models scored on the same
        items (benchmarks independent): from the per-item differences where both have per-item values
        (`Evaluator.items`), which cancels what the two share (an item hard for both); else, for that
        benchmark, from the two standard errors in quadrature, as if the two were independent."""
        var = 0.0
        for bench, c in self.coefficients().items():
            spec = next(x for x in self.spec.benchmarks if x.name == bench)
            lo, hi = self.refs[bench]
            span = hi - lo if abs(hi - lo) > 1e-9 else 1.0
            m = spec.objective_metric
            if bench in items_a and bench in items_b:
                d = (items_a[bench][m] - items_b[bench][m]).double()
                se = float(d.std(unbiased=True)) / math.sqrt(d.numel()) if d.numel() > 1 else math.nan
            else:
                se = math.hypot(a[bench].get(f"{m}_se", math.nan), b[bench].get(f"{m}_se", math.nan))
            var += (c * se / span) ** 2 if math.isfinite(se) else 0.0
        return math.sqrt(var)

    def references(self) -> dict[str, dict[str, str | float]]:
        """Per benchmark: its metric, capability group, and the metric values (in its own units) that
        normalize to 0 and to 1, for proposal.json."""
        return {b.name: {"metric": b.objective_metric, "capability": b.capability,
                         "zero": round(_sign(b) * self.refs[b.name][0], 6),
                         "one": round(_sign(b) * self.refs[b.name][1], 6)}
                for b in self.spec.benchmarks}

    def weights(self) -> dict[str, float]:
        """Objective weight of every capability group (low-signal benchmarks lower it)."""
        return {g: self.group_weight(g) for g in sorted({b.capability for b in self.spec.benchmarks})}

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
        """Per group, the mean of its benchmarks' normalized scores, weighted by their signal (the plain mean
        where every benchmark of the group is dropped)."""
        norm = self.normalized(raw)
        groups: dict[str, list[tuple[float, float]]] = {}
        for b in self.spec.benchmarks:
            groups.setdefault(b.capability, []).append((norm[b.name], self.benchmark_weight(b.name)))
        out = {}
        for g, pairs in sorted(groups.items()):
            total = sum(w for _, w in pairs)
            out[g] = (sum(v * w for v, w in pairs) / total if total > 0 else sum(v for v, _ in pairs) / len(pairs))
        return out

    def combine(self, capabilities: Mapping[str, float]) -> float:
        """Weighted mean of capability scores (recipe weights, missing groups weigh 1, times the mean signal
        weight of the group's benchmarks)."""
        weights = {g: self.group_weight(g) for g in capabilities}
        total = sum(weights.values())
        return sum(weights[g] * v for g, v in capabilities.items()) / total

    def __call__(self, raw: Raw) -> tuple[dict[str, float], dict[str, float], float]:
        """(normalized per benchmark, per capability, objective) of one evaluation."""
        caps = self.capabilities(raw)
        return self.normalized(raw), caps, self.combine(caps)
