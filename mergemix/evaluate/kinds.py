"""Benchmark kinds: perplexity (held-out loss) and multiple choice (log-likelihood of each option).

Every kind is built once per run (data read and tokenized once) and then scores any model: `score(model)`
returns each metric's value and its standard error over items (`<metric>_se`), so a user can compare the
spread between mixtures with the noise of the score.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F

from mergemix.data.prepare import pack_texts
from mergemix.data.readers import read_records, read_texts, resolve_paths
from mergemix.errors import MergemixError
from mergemix.modeling import max_positions
from mergemix.recipe import BenchmarkSpec
from mergemix.registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalContext:
    """What benchmarks need besides their spec: the tokenizer, block length and held-out pools."""

    tokenizer: object
    seq_len: int
    heldout: dict[str, torch.Tensor]
    cache_dir: Path
    batch_size: int
    seed: int


class Benchmark:
    """A benchmark kind. `read` loads and checks the data before anything is trained (a malformed file
    fails in seconds, not after the experts); the constructor tokenizes it; `score` scores a model."""

    metrics: ClassVar[tuple[str, ...]]  # the first one is the default objective metric
    higher_is_better: ClassVar[dict[str, bool]]

    def __init__(self, spec: BenchmarkSpec, ctx: EvalContext, data: Any) -> None:
        self.spec = spec
        self.ctx = ctx

    @staticmethod
    def read(spec: BenchmarkSpec, cache_dir: Path) -> Any:
        raise NotImplementedError

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        raise NotImplementedError


BENCHMARKS: Registry[type[Benchmark]] = Registry("benchmark kind")


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    n = values.numel()
    mean = values.mean().item()
    se = values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return mean, se


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


@BENCHMARKS.register("perplexity")
class Perplexity(Benchmark):
    """Mean next-token loss (nats per token) on held-out text, packed into blocks of seq_len tokens."""

    metrics = ("loss",)
    higher_is_better = {"loss": False}

    @staticmethod
    def read(spec: BenchmarkSpec, cache_dir: Path) -> list[str] | None:
        """The texts of a path benchmark; None for a domain's held-out pool (packed with the domain)."""
        if spec.path is None:
            return None
        texts = read_texts(spec.path, "auto", spec.text_field, cache_dir)
        if not any(t.strip() for t in texts):
            raise MergemixError(f"{spec.path}: holds no text")
        return texts

    def __init__(self, spec: BenchmarkSpec, ctx: EvalContext, data: list[str] | None) -> None:
        super().__init__(spec, ctx, data)
        if data is None:
            assert spec.domain is not None
            blocks = ctx.heldout[spec.domain]
        else:
            blocks, _ = pack_texts(data, ctx.tokenizer, ctx.seq_len, desc=spec.name)
            if len(blocks) == 0:
                raise MergemixError(
                    f"benchmark {spec.name!r}: {spec.path} holds fewer than seq_len={ctx.seq_len} tokens of text"
                )
        if spec.max_items is not None and len(blocks) > spec.max_items:
            idx = sorted(random.Random(ctx.seed).sample(range(len(blocks)), spec.max_items))
            blocks = blocks[idx]
        if len(blocks) < 2:
            raise MergemixError(f"has {len(blocks)} block of {ctx.seq_len} tokens; at least 2 are needed to "
                                "estimate the noise of the score: add text or lower data.seq_len")
        self.blocks = blocks

    @torch.no_grad()
    def score(self, model: torch.nn.Module) -> dict[str, float]:
        dev = _device(model)
        losses = []
        for i in range(0, len(self.blocks), self.ctx.batch_size):
            batch = self.blocks[i : i + self.ctx.batch_size].to(dev)
            logits = model(input_ids=batch).logits[:, :-1].float()
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="none")
            losses.append(nll.view(len(batch), -1).mean(dim=1).cpu())
        mean, se = _mean_se(torch.cat(losses))
        return {"loss": mean, "loss_se": se, "n": float(len(self.blocks))}


@dataclass(frozen=True)
class MCItem:
    sequences: list[list[int]]  # question + option, tokenized whole, one per option
    option_tokens: list[int]  # how many trailing tokens of each sequence are the option
    option_chars: list[int]
    answer: int


def load_mc_items(path: str, cache_dir: Path) -> list[tuple[str, str, list[str], int]]:
    """(location, question, choices, answer) from a multiple-choice file; a malformed line is an error
    naming the file and line."""
    items = []
    for file in resolve_paths(path, cache_dir):
        for where, rec in read_records(file, "auto"):
            if not isinstance(rec, dict):
                raise MergemixError(f"{where}: expected an object with question, choices, answer")
            missing = [k for k in ("question", "choices", "answer") if k not in rec]
            if missing:
                raise MergemixError(f"{where}: missing field {', '.join(missing)} (need question, choices, answer)")
            q, choices, answer = rec["question"], rec["choices"], rec["answer"]
            if not isinstance(q, str):
                raise MergemixError(f"{where}: question must be text, got {type(q).__name__}")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise MergemixError(f"{where}: choices must be a list of two or more strings")
            if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
                raise MergemixError(f"{where}: answer must be an index into choices (0..{len(choices) - 1}), got {answer!r}")
            items.append((where, q, choices, answer))
    if len(items) < 2:
        raise MergemixError(f"{path}: {len(items)} multiple-choice items; at least 2 are needed")
    return items


@BENCHMARKS.register("multiple_choice")
class MultipleChoice(Benchmark):
    """Each option is scored by the log-likelihood of its tokens in `question + " " + option`.

    acc: the option with the highest total log-likelihood is right. acc_norm: the same, divided by the
    option's length in characters (as lm-eval). score: mean log-probability per token of the correct
    option minus the mean of that of the wrong options; continuous, so it ranks weak models far more
    stably than accuracy (FIELD_NOTES: ρ 0.64 vs ≈ 0 between two trainings of the same mixtures).
    """

    metrics = ("score", "acc", "acc_norm")
    higher_is_better = {"score": True, "acc": True, "acc_norm": True}

    @staticmethod
    def read(spec: BenchmarkSpec, cache_dir: Path) -> list[tuple[str, str, list[str], int]]:
        assert spec.path is not None
        return load_mc_items(spec.path, cache_dir)

    def __init__(self, spec: BenchmarkSpec, ctx: EvalContext, data: list[tuple[str, str, list[str], int]]) -> None:
        super().__init__(spec, ctx, data)
        raw = data
        if spec.max_items is not None and len(raw) > spec.max_items:
            raw = random.Random(ctx.seed).sample(raw, spec.max_items)
        self.items = [self._tokenize(q, choices, answer) for _, q, choices, answer in raw]
        self.chance = sum(1 / len(it.sequences) for it in self.items) / len(self.items)

    def _tokenize(self, question: str, choices: list[str], answer: int) -> MCItem:
        """Each option is scored inside the tokenization of the whole text `question + " " + option`; its
        tokens are those beyond the question's own token count (lm-eval's rule). Tokenizing an option on
        its own would add a word-start marker for SentencePiece models."""
        def ids(text: str) -> list[int]:
            return self.ctx.tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]

        n_context = len(ids(question))
        sequences = [ids(f"{question} {c}") for c in choices]
        return MCItem(
            sequences=sequences,
            option_tokens=[max(1, len(seq) - n_context) for seq in sequences],
            option_chars=[len(c) for c in choices],
            answer=answer,
        )

    @torch.no_grad()
    def _option_logprobs(self, model: torch.nn.Module) -> list[list[tuple[float, int]]]:
        """(sum of log-probs, token count) of every option of every item, in length-sorted batches."""
        max_len = max_positions(model) or 2048
        requests = []
        for i, it in enumerate(self.items):
            for j, (seq, n) in enumerate(zip(it.sequences, it.option_tokens, strict=True)):
                ids = seq[-max_len:]
                requests.append((i, j, ids, min(n, len(ids) - 1)))
        requests.sort(key=lambda r: -len(r[2]))
        out: list[list[tuple[float, int]]] = [[(0.0, 0)] * len(it.sequences) for it in self.items]
        dev = _device(model)
        bs = self.ctx.batch_size
        for b in range(0, len(requests), bs):
            chunk = requests[b : b + bs]
            width = len(chunk[0][2])
            ids = torch.zeros((len(chunk), width), dtype=torch.long)
            for r, (_, _, seq, _) in enumerate(chunk):
                ids[r, : len(seq)] = torch.tensor(seq)
            logprobs = torch.log_softmax(model(input_ids=ids.to(dev)).logits.float(), dim=-1).cpu()
            for r, (i, j, seq, n) in enumerate(chunk):
                pos = torch.arange(len(seq) - n - 1, len(seq) - 1)
                target = torch.tensor(seq[len(seq) - n :])
                out[i][j] = (logprobs[r, pos, target].sum().item(), n)
        return out

    def score(self, model: torch.nn.Module) -> dict[str, float]:
        scored = self._option_logprobs(model)
        acc, acc_norm, margin = [], [], []
        for it, opts in zip(self.items, scored, strict=True):
            total = [lp for lp, _ in opts]
            per_tok = [lp / max(n, 1) for lp, n in opts]
            per_char = [lp / max(c, 1) for lp, c in zip(total, it.option_chars, strict=True)]
            acc.append(float(max(range(len(total)), key=total.__getitem__) == it.answer))
            acc_norm.append(float(max(range(len(per_char)), key=per_char.__getitem__) == it.answer))
            wrong = [v for k, v in enumerate(per_tok) if k != it.answer]
            margin.append(per_tok[it.answer] - sum(wrong) / len(wrong))
        result = {"n": float(len(self.items)), "chance": self.chance}
        for name, values in (("acc", acc), ("acc_norm", acc_norm), ("score", margin)):
            result[name], result[f"{name}_se"] = _mean_se(torch.tensor(values))
        return result
