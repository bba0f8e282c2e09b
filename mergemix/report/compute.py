"""Compute accounting: tokens and FLOPs spent by the proposal versus by the report's real mixture runs.

FLOPs follow the usual estimate for a dense transformer with N parameters: 6·N per trained token
(forward + backward) and 2·N per scored token (forward only). Scored tokens are counted, padding
included, by watching the model's inputs during one evaluation.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


@contextmanager
def counting_tokens(model: torch.nn.Module) -> Iterator[list[int]]:
    """Yields a one-element list that holds the number of input tokens `model` has seen so far."""
    seen = [0]

    def hook(_module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(ids, torch.Tensor):
            seen[0] += ids.numel()

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def tokens_per_evaluation(model: torch.nn.Module, evaluate: Callable[[torch.nn.Module], object]) -> int:
    with counting_tokens(model) as seen:
        evaluate(model)
    return seen[0]


def accounting(n_params: int, expert_tokens: int, proposal_evaluations: int, mixture_tokens: int,
               mixture_evaluations: int, eval_tokens: int) -> dict[str, float]:
    """Tokens and FLOPs of the proposal (experts + merge evaluations) and of the report's mixture runs."""
    proposal_flops = 6 * n_params * expert_tokens + 2 * n_params * eval_tokens * proposal_evaluations
    report_flops = 6 * n_params * mixture_tokens + 2 * n_params * eval_tokens * mixture_evaluations
    return {
        "parameters": n_params,
        "tokens_per_evaluation": eval_tokens,
        "proposal_train_tokens": expert_tokens,
        "proposal_evaluations": proposal_evaluations,
        "proposal_flops": float(proposal_flops),
        "mixture_train_tokens": mixture_tokens,
        "mixture_evaluations": mixture_evaluations,
        "mixture_flops": float(report_flops),
        "mixture_over_proposal": report_flops / proposal_flops if proposal_flops else float("nan"),
    }
