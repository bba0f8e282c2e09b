"""A differentiable estimate of the objective, for the gradient strategy (mergemix.search.gradient).

The objective is Σ_b c_b (s_b m_b − lo_b) / span_b over benchmarks b (`Objective.coefficients`, `refs`; s_b
the metric's orientation). Here m_b comes from a model called functionally on parameters that carry
gradients back to α, on a random minibatch of each benchmark's items (a stochastic gradient):

- perplexity: the mean next-token loss of the chosen blocks: the scorer's `loss` exactly;
- multiple_choice: each option's log-likelihood as the scorer computes it (whole sequences, right-padded,
  instead of the scorer's shared-prefix cache: same values). `score` and `margin` are differentiable as they
  are. The accuracies (`acc`, `acc_norm`, `blank_ppl`) are replaced by the expected accuracy of a chooser that
  picks each option with probability softmax(the option scores the scorer ranks by: total, per character,
  per token of the cloze text): the model's probability of the right answer among the options, on the
  accuracy's own scale (chance → 0, 1 → 1 after normalization);
- generation and lm_eval: decoded text and an external harness have no gradient. They are left out here
  (the other benchmarks keep their relative weights) and count only in the real evaluation of every point
  the strategy proposes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence

import torch
from torch.func import functional_call

from mergemix.catalog import BENCHMARK_KINDS, DIFFERENTIABLE
from mergemix.collective import Share
from mergemix.errors import MergemixError
from mergemix.evaluate.kinds import (
    Benchmark,
    MultipleChoice,
    Perplexity,
    Request,
    pack_scored,
    token_nll,
)
from mergemix.evaluate.objective import Objective
from mergemix.model.modeling import max_positions

log = logging.getLogger(__name__)

Forward = Callable[[torch.Tensor], torch.Tensor]  # input ids (rows x positions) → logits
Metric = Callable[[Benchmark, Forward, str, list[int], int], torch.Tensor]  # (…, metric, items, max_len) → value


class Kind:
    """How one benchmark kind is estimated differentiably: its item count and its metric on some items."""

    def __init__(self, size: Callable[[Benchmark], int], metric: Metric) -> None:
        self.size = size
        self.metric = metric


def _perplexity(bench: Benchmark, forward: Forward, metric: str, items: list[int], max_len: int) -> torch.Tensor:
    assert isinstance(bench, Perplexity) and metric == "loss"
    blocks = bench.blocks[items]
    return token_nll(forward(blocks)[:, :-1], blocks[:, 1:]).mean()


PERPLEXITY = Kind(lambda b: len(b.blocks), _perplexity)  # type: ignore[attr-defined]


def request_logprobs(forward: Forward, requests: Sequence[Request], max_len: int) -> tuple[torch.Tensor, list[int]]:
    """(sum of log-probs of each request's scored tokens, differentiable; their counts), every sequence run
    whole and right-padded; as `score_requests`, a sequence longer than the model's context keeps its last
    `max_len` tokens."""
    seqs = [r.ids[-max_len:] for r in requests]
    ns = [min(r.n, len(s) - 1) for r, s in zip(requests, seqs, strict=True)]
    ids, rows, pos, target = pack_scored(seqs, ns)
    logits = forward(ids)
    dev = logits.device
    picked = logits[torch.tensor(rows, device=dev), torch.tensor(pos, device=dev)].float()
    lp = torch.log_softmax(picked, dim=-1).gather(1, torch.tensor(target, device=dev)[:, None])[:, 0]
    owner = torch.tensor(rows, device=dev)
    return torch.zeros(len(seqs), device=dev, dtype=lp.dtype).index_add(0, owner, lp), ns


def _multiple_choice(bench: Benchmark, forward: Forward, metric: str, items: list[int],
                     max_len: int) -> torch.Tensor:
    assert isinstance(bench, MultipleChoice)
    chosen = [bench.items[i] for i in items]
    cloze = metric == "blank_ppl"
    wanted = sorted({r for it in chosen for r in (it.blanks if cloze else it.options)})
    at = {r: j for j, r in enumerate(wanted)}
    sums, counts = request_logprobs(forward, [bench.requests[r] for r in wanted], max_len)
    values = []
    for it in chosen:
        reqs = it.blanks if cloze else it.options
        lp = sums[[at[r] for r in reqs]]
        if metric == "acc":
            s = lp
        elif metric == "acc_norm":
            s = lp / torch.tensor([max(c, 1) for c in it.option_chars], device=lp.device, dtype=lp.dtype)
        else:  # per token: score, margin, blank_ppl
            s = lp / torch.tensor([max(counts[at[r]], 1) for r in reqs], device=lp.device, dtype=lp.dtype)
        wrong = torch.cat([s[: it.answer], s[it.answer + 1:]])
        if metric == "score":
            values.append(s[it.answer] - wrong.mean())
        elif metric == "margin":
            values.append(s[it.answer] - wrong.max())
        else:  # acc, acc_norm, blank_ppl: expected accuracy of a softmax chooser
            values.append(torch.softmax(s, dim=0)[it.answer])
    return torch.stack(values).mean()


MULTIPLE_CHOICE = Kind(lambda b: len(b.items), _multiple_choice)  # type: ignore[attr-defined]


class GradientObjective:
    """The objective of a merge Θ(α), differentiable in α, estimated on minibatches of the benchmarks.

    `merged_state(alpha)` gives the merged parameters as tensors differentiable in α
    (`InPlaceMerger.merged_state`); `model` is called on them with `torch.func.functional_call`, so it is
    never changed. Only the benchmarks of a kind in DIFFERENTIABLE with a positive coefficient count.
    """

    def __init__(self, benchmarks: Mapping[str, Benchmark], model: torch.nn.Module,
                 merged_state: Callable[[torch.Tensor], dict[str, torch.Tensor]]) -> None:
        self.benchmarks = dict(benchmarks)
        self.model = model
        self.merged_state = merged_state
        self.max_len = max_positions(model) or 2048
        self.dtypes = {n: p.dtype for n, p in model.named_parameters()}
        self.objective: Objective | None = None
        self.weights: dict[str, float] = {}

    def prepare(self, objective: Objective) -> dict[str, float]:
        """Fix the objective estimated (normalization and weights) and return each benchmark's weight in the
        estimate: its coefficient in the objective, renormalized over the differentiable benchmarks. A
        MergemixError when there are none."""
        coef = {n: c for n, c in objective.coefficients().items()
                if c > 0 and self.benchmarks[n].spec.kind in DIFFERENTIABLE}
        if not coef:
            raise MergemixError("search.strategy gradient: no weighted benchmark is differentiable (perplexity or "
                                "multiple_choice); add one, or choose another strategy")
        left = sorted(set(objective.coefficients()) - set(coef))
        if left:
            log.warning("gradient: %s not differentiable (or weight 0): left to the verification", ", ".join(left))
        total = sum(coef.values())
        self.objective = objective
        self.weights = {n: c / total for n, c in coef.items()}
        return self.weights

    def __call__(self, alpha: torch.Tensor, batch: int, generator: torch.Generator,
                 share: Share | None = None) -> torch.Tensor:
        """The estimate at `alpha` (a scalar tensor, higher is better) on `batch` random items per benchmark
        (all of them when `batch` is 0 or above their count), the model called on `merged_state(alpha)`;
        `prepare` first. With `share`: this process's part (`value`)."""
        params = {n: t.to(self.dtypes[n]) for n, t in self.merged_state(alpha).items()}
        device = next(iter(params.values())).device

        def forward(ids: torch.Tensor) -> torch.Tensor:
            return functional_call(self.model, params, args=(), kwargs={"input_ids": ids.to(device)}).logits

        return self.value(forward, batch, generator, share)

    def value(self, forward: Forward, batch: int, generator: torch.Generator, share: Share | None = None,
              in_step: bool = False) -> torch.Tensor:
        """The estimate with the model's logits given by `forward`, on `batch` random items per benchmark
        (`__call__`). With `share` (rank, N), every process of a launch draws the same items and scores its
        share of them (items rank, rank + N, ...): its part of the estimate, which summed over the processes is
        the whole one. `in_step`: the forward passes are collective (a sharded model), so a process with no
        item of a benchmark still runs one forward pass of one token for it, which adds 0."""
        rank, world = share or (0, 1)
        objective = self.objective
        assert objective is not None, "prepare(objective) first"
        parts: list[torch.Tensor] = []
        const = 0.0  # the normalization's offsets, counted once (by rank 0)
        for name, w in self.weights.items():
            bench = self.benchmarks[name]
            kind = DIFFERENTIABLE.get(bench.spec.kind)
            n = kind.size(bench)
            items = list(range(n)) if not batch or batch >= n else \
                sorted(torch.randperm(n, generator=generator)[:batch].tolist())
            metric = bench.spec.objective_metric
            sign = 1.0 if BENCHMARK_KINDS.get(bench.spec.kind).higher_is_better[metric] else -1.0
            lo, hi = objective.refs[name]
            span = hi - lo if abs(hi - lo) > 1e-9 else 1.0
            if world == 1:
                parts.append(w * (sign * kind.metric(bench, forward, metric, items, self.max_len) - lo) / span)
                continue
            mine = items[rank::world]
            if mine:  # the mean over these items, weighted by their part of all the items drawn
                value = kind.metric(bench, forward, metric, mine, self.max_len)
                parts.append(w * sign * value * (len(mine) / len(items)) / span)
            elif in_step:
                parts.append(0 * forward(torch.zeros((1, 1), dtype=torch.long)).float().sum())
            if rank == 0:
                const -= w * lo / span
        total = torch.zeros(()) if not parts else parts[0]
        for part in parts[1:]:
            total = total + part
        return total + const if const else total
