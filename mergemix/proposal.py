"""The proposal: what `propose` returns and writes to proposal.json, and its readable table."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True)


class Share(_Frozen):
    domain: str
    alpha: float
    ratio: float
    tokens: int
    available_tokens: int
    epochs: float
    capped: bool  # held at the repetition cap (mixture.max_epochs)
    bound: str | None = None  # the bound the share sits on: min_share, max_share, max_epochs, pinned


class Scored(_Frozen):
    """A mixture scored by real merge + evaluation (the base has all weights 0)."""

    alpha: dict[str, float]
    objective: float
    capabilities: dict[str, float]
    predicted: float | None = None


class Signal(_Frozen):
    """Can this benchmark tell models apart? Spread of its metric over base + experts vs its noise."""

    benchmark: str
    metric: str
    base: float
    expert_min: float
    expert_max: float
    spread: float
    stderr: float
    low_signal: bool = False  # spread within item noise (evaluation.low_signal_ratio): flagged before the search
    weight: float = 1.0  # its weight in the objective (0: dropped; see evaluation.low_signal)

    @property
    def ratio(self) -> float:
        return self.spread / self.stderr if self.stderr > 0 else float("inf")


class Margin(_Frozen):
    """How much the proposal beats a baseline on the objective: verified by real merge + evaluation, with a
    95% interval from item noise (benchmarks independent; the two merges compared item by item, so what the
    items share cancels: `Objective.diff_se`), and as the surrogate predicted it. Within noise: the interval
    reaches 0 or below. Item noise only: a model trained on the mixture adds seed noise, and the merge's error
    as a stand-in for training (what the report measures) comes on top."""

    baseline: str
    verified: float
    low: float
    high: float
    predicted: float | None = None
    outside: dict[str, str] = {}  # domain → the mixture bound the baseline breaks: it is no choice for this run

    @property
    def within_noise(self) -> bool:
        """Not better beyond item noise: the interval reaches 0 or lies below it."""
        return self.low <= 0

    @property
    def verdict(self) -> str:
        if self.high < 0:
            return "BELOW: the proposal scores lower than this baseline, beyond item noise"
        return "WITHIN NOISE: the proposal may be no better than this baseline" if self.within_noise else "better"

    def line(self) -> str:
        pred = "" if self.predicted is None else f", predicted {self.predicted:+.3f}"
        warn = f"  {self.verdict}" if self.within_noise else ""
        bounds = "; ".join(f"{d} {why}" for d, why in self.outside.items())
        bounds = f"\n  ({self.baseline} lies outside the mixture bounds: {bounds}; no mixture this run may propose)" \
            if bounds else ""
        return (f"proposal - {self.baseline}: {self.verified:+.3f} verified, 95% [{self.low:+.3f}, {self.high:+.3f}]"
                f"{pred}{warn}{bounds}")


class RealRun(_Frozen):
    """One mixture of the real verification: its objective by the merged proxy and after a short real run."""

    label: str  # candidate-N (the search's N-th best), uniform, token_prior
    alpha: dict[str, float]
    merged: float
    real: float
    tokens: int  # tokens trained


class RealVerification(_Frozen):
    """search.verify_real: the top candidates and the baselines trained for real; the best became alpha*."""

    steps: int  # optimizer steps per run
    tokens: int  # tokens trained over all runs
    wall_s: float  # seconds this propose spent on it (runs reused from an earlier call cost ~0)
    runs: list[RealRun]
    chosen: str  # label of the run with the best real objective

    def lines(self) -> list[str]:
        out = [f"real verification ({len(self.runs)} runs of {self.steps} steps, {self.tokens:,} tokens, "
               f"{self.wall_s:.0f} s): objective merged -> real"]
        for r in self.runs:
            mark = "  <- chosen" if r.label == self.chosen else ""
            out.append(f"  {r.label:<14}{r.merged:>9.3f}{r.real:>9.3f}{mark}")
        return out


class Proposal(_Frozen):
    name: str
    seed: int
    # where the base came from: base.path as given, its format (demo, hf, gguf) and, for a GGUF file, its
    # architecture, tensor types and their summary (a dequantized Q4_1 base is not bit-equal to the published
    # weights); see mergemix.model.bases.BaseSource
    base: dict[str, Any] = {}
    domains: list[str]
    alpha_star: dict[str, float]
    mixture: list[Share]
    total_tokens: int
    proposal: Scored
    baselines: dict[str, Scored]  # base, uniform, token_prior, best_expert
    signal: list[Signal]
    strategy: str = "surface"  # the search strategy that found alpha*
    surrogate: str
    surrogate_prior: str = "none"  # search.surrogate_prior: what the surrogate started from
    surrogate_loo_rmse: dict[str, float]
    n_trials: int
    active_bounds: dict[str, str] = {}  # domain → the bound it sits on at alpha*
    # hierarchical search (mixture.groups, or mixture.reuse keeping ratios): group → its domains, and its share
    # of alpha* (a domain of no group is a group of its own); empty for a flat search
    groups: dict[str, list[str]] = {}
    group_shares: dict[str, float] = {}
    weights: dict[str, float] = {}  # objective weight per capability group
    # benchmark → metric, capability, and the metric values normalized to 0 and to 1
    normalization: dict[str, dict[str, str | float]] = {}
    margins: list[Margin] = []  # the proposal against uniform and token-proportional (the guard)
    verify_real: RealVerification | None = None  # search.verify_real > 0: the short real runs that chose alpha*
    # experts.replay > 0: the merge weights that scored alpha* (mergemix.merge.replay); empty without replay,
    # where they are alpha* itself
    merge_weights: dict[str, float] = {}

    def table(self) -> str:
        """Mixture and objective comparison, as plain text."""
        lines = [f"Proposed mixture for {self.name} ({self.total_tokens:,} tokens)", ""]
        if self.base.get("format") == "gguf":
            lines[-1:-1] = [f"base: {self.base['path']} ({self.base['architecture']} GGUF, {self.base['quantization']})"]
        lines.append(f"{'domain':<14}{'ratio':>8}{'tokens':>16}{'epochs':>9}")
        for s in self.mixture:
            flag = f"  ({s.bound})" if s.bound else ""
            lines.append(f"{s.domain:<14}{s.ratio:>8.3f}{s.tokens:>16,}{s.epochs:>9.2f}{flag}")
        if self.group_shares:
            lines.append("groups: " + ", ".join(f"{g} {v:.3f} ({' + '.join(self.groups[g])})"
                                                for g, v in self.group_shares.items()))
        groups = list(self.proposal.capabilities)
        widths = [max(10, len(g) + 2) for g in groups]
        lines += ["", f"{'mixture':<22}{'objective':>10}" + "".join(f"{g:>{w}}" for g, w in zip(groups, widths, strict=True))]
        rows = [("proposal (verified)", self.proposal), *((k, v) for k, v in self.baselines.items())]
        for label, sc in rows:
            lines.append(f"{label:<22}{sc.objective:>10.3f}"
                         + "".join(f"{sc.capabilities[g]:>{w}.3f}" for g, w in zip(groups, widths, strict=True)))
        if self.proposal.predicted is not None:
            lines.append(f"(surrogate predicted {self.proposal.predicted:.3f} for the proposal. Scores: base = 0; "
                         "one unit = the spread of base and experts on a benchmark; higher is better)")
        if self.margins:
            lines += ["", *(m.line() for m in self.margins)]
        if self.verify_real is not None:
            lines += ["", *self.verify_real.lines()]
        if self.merge_weights:
            lines += ["", "the experts replayed general data, so this mixture was scored by the merge at weights "
                      + ", ".join(f"{d} {w:.3f}" for d, w in self.merge_weights.items())]
        return "\n".join(lines)

    def signal_table(self) -> str:
        """Benchmarks' spread over base + experts next to their standard error over items."""
        lines = [f"{'benchmark':<22}{'metric':>8}{'base':>10}{'experts':>18}{'spread':>9}{'stderr':>9}{'ratio':>7}"
                 f"{'weight':>8}"]
        for s in self.signal:
            span = f"{s.expert_min:.3f}..{s.expert_max:.3f}"
            flag = "  LOW SIGNAL" if s.low_signal else ""
            lines.append(f"{s.benchmark:<22}{s.metric:>8}{s.base:>10.3f}{span:>18}{s.spread:>9.3f}{s.stderr:>9.3f}"
                         f"{s.ratio:>7.1f}{s.weight:>8.2f}{flag}")
        lines.append("ratio = spread / stderr: below ~3 the benchmark barely tells these models apart; LOW SIGNAL "
                     "(within item noise) weighs as evaluation.low_signal says")
        return "\n".join(lines)
