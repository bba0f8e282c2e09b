"""What the report ranks mixtures by: the objective, each capability group and each benchmark.

Each is a weighted sum of normalized benchmark scores (mergemix.evaluate.objective), so its standard error
follows from the benchmarks' standard errors over items.
"""

from __future__ import annotations

from dataclasses import dataclass

from mergemix.evaluate import Objective
from mergemix.evaluate.objective import Raw


@dataclass(frozen=True)
class Target:
    """`name` is "objective", "capability:NAME" or "benchmark:NAME"; `coef` weighs each benchmark's
    normalized score."""

    name: str
    coef: dict[str, float]

    @property
    def label(self) -> str:
        return self.name.split(":", 1)[-1]

    def value(self, objective: Objective, raw: Raw) -> float:
        norm = objective.normalized(raw)
        return sum(c * norm[b] for b, c in self.coef.items())

    def se(self, objective: Objective, raw: Raw) -> float:
        """Standard error over benchmark items (benchmarks independent), in the target's units."""
        return objective.se(raw, self.coef)


def targets(objective: Objective) -> list[Target]:
    """The objective, then each capability group, then each benchmark."""
    spec = objective.spec
    groups: dict[str, list[str]] = {}
    for b in spec.benchmarks:
        groups.setdefault(b.capability, []).append(b.name)
    out = [Target("objective", objective.coefficients())]
    out += [Target(f"capability:{g}", {b: 1 / len(bs) for b in bs}) for g, bs in sorted(groups.items())]
    if any(len(bs) > 1 for bs in groups.values()):
        out += [Target(f"benchmark:{b.name}", {b.name: 1.0}) for b in spec.benchmarks]
    return out
