"""Benchmark kinds: perplexity (held-out loss) and multiple choice (log-likelihood of each option, plain
and in a cloze text); generation lives in `generation.py`. `score_requests` is the batched log-likelihood
scorer of multiple choice, running each shared context once.

Every kind is built once per run (data read and tokenized once) and then scores any model: `score(model)`
returns each metric's value and its standard error over items (`<metric>_se`), so a user can compare the
spread between mixtures with the noise of the score.
"""

from __future__ import annotations

import logging
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn.functional as F

from mergemix.catalog import BENCHMARK_KINDS
from mergemix.collective import Share, gather
from mergemix.data.prepare import pack_texts
from mergemix.data.readers import read_records, read_texts, resolve_paths
from mergemix.errors import MergemixError
from mergemix.model.modeling import cache_kwarg, cache_of, max_positions
from mergemix.recipe import BenchmarkSpec

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalContext:
    """What benchmarks need besides their spec: the tokenizer, block length and held-out pools, and the dtype
    forward passes autocast to (None: the model's own)."""

    tokenizer: object
    seq_len: int
    heldout: dict[str, torch.Tensor]
    cache_dir: Path
    batch_size: int
    seed: int
    autocast: torch.dtype | None = None

    def ids(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens (benchmarks add what they need themselves)."""
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]


class Benchmark:
    """A benchmark kind. `read` loads and checks the data before anything is trained (a malformed file
    fails in seconds, not after the experts); the constructor tokenizes it; `score` scores a model."""

    metrics: ClassVar[tuple[str, ...]]  # the first one is the default objective metric
    higher_is_better: ClassVar[dict[str, bool]]
    chance: float | None = None  # the score of guessing, where the kind has one (the objective maps it to 0)
    paired: ClassVar[bool] = True  # whether `item_values` gives each item's values (two models compared item by item)

    def __init__(self, spec: BenchmarkSpec, ctx: EvalContext, data: Any) -> None:
        self.spec = spec
        self.ctx = ctx

    @staticmethod
    def read(spec: BenchmarkSpec, cache_dir: Path) -> Any:
        raise NotImplementedError

    def item_values(self, model: torch.nn.Module, share: Share | None = None) -> dict[str, torch.Tensor]:
        """metric → its value on every item, in the same item order on every call: what `score` averages, and
        what compares two models item by item (paired noise, `Objective.diff_se`). With `share` (a launch's
        collective search) this process scores only its share of the items, and gets every item's values
        from the others; a kind that cannot split scores every item on every process."""
        raise NotImplementedError

    def score(self, model: torch.nn.Module, share: Share | None = None) -> dict[str, float]:
        """Each metric's mean over items and its standard error (`<metric>_se`), the items scored (`n`), and
        `chance` where the kind has one."""
        values = self.item_values(model, share)
        result = {"n": float(len(next(iter(values.values()))))}
        if self.chance is not None:
            result["chance"] = self.chance
        for name, v in values.items():
            result[name], result[f"{name}_se"] = mean_se(v)
        return result


Items = dict[str, dict[str, torch.Tensor]]  # benchmark → metric → per-item values (Benchmark.item_values)


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """Mean over items and its standard error (nan for a single item)."""
    n = values.numel()
    mean = values.mean().item()
    se = values.std(unbiased=True).item() / math.sqrt(n) if n > 1 else float("nan")
    return mean, se


def model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class Perplexity(Benchmark):
    """Mean next-token loss (nats per token) on held-out text, packed into blocks of seq_len tokens."""

    metrics = BENCHMARK_KINDS.meta("perplexity")["metrics"]
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
    def item_values(self, model: torch.nn.Module, share: Share | None = None) -> dict[str, torch.Tensor]:
        """Each block's mean next-token loss."""
        dev = model_device(model)
        rank, world = share or (0, 1)
        mine = list(range(rank, len(self.blocks), world))
        batches = [mine[i : i + self.ctx.batch_size] for i in range(0, len(mine), self.ctx.batch_size)]
        losses = []
        for rows in batches:
            batch = self.blocks[rows].to(dev)
            logits = model(input_ids=batch).logits[:, :-1]
            losses.append(token_nll(logits, batch[:, 1:]).mean(dim=1).cpu())
        if world == 1:
            return {"loss": torch.cat(losses)}
        _note_share(self.spec.name, len(mine), len(self.blocks))
        most = math.ceil(math.ceil(len(self.blocks) / world) / self.ctx.batch_size)
        for _ in range(most - len(batches)):  # padding batches: the other processes' forwards are collective
            model(input_ids=self.blocks[:1, :1].to(dev))
        values = dict(zip(mine, torch.cat(losses).tolist() if losses else [], strict=True))
        merged = {i: v for part in gather(values) for i, v in part.items()}
        return {"loss": torch.tensor([merged[i] for i in range(len(self.blocks))])}


LOGIT_CHUNK = 4096  # positions per float32 log-softmax: 4096 x a 128k vocabulary is 2 GiB


def token_nll(logits: torch.Tensor, targets: torch.Tensor, chunk: int = LOGIT_CHUNK) -> torch.Tensor:
    """Negative log-likelihood (nats) of `targets` (rows x positions) under `logits` (rows x positions x vocab,
    in the model's dtype), in float32 a chunk of positions at a time: the float32 copy of a whole batch's
    full-vocabulary logits (rows x positions x vocab x 4 bytes) is never built."""
    flat = logits.reshape(-1, logits.shape[-1])
    target = targets.reshape(-1)
    nll = [F.cross_entropy(flat[i : i + chunk].float(), target[i : i + chunk], reduction="none")
           for i in range(0, len(flat), chunk)]
    return torch.cat(nll).view(targets.shape)


class MCRecord(NamedTuple):
    """One multiple-choice item as read from its file (`where` is `file:line`, for error messages)."""

    where: str
    question: str
    choices: list[str]
    answer: int
    blank: str | None = None  # cloze text with one ___ or {blank} marker, for blank_ppl


BLANK_MARKERS = ("{blank}", "___")


def _split_blank(text: str) -> tuple[str, str] | None:
    """(text before, text after) the first blank marker, or None when there is none."""
    for marker in BLANK_MARKERS:
        if marker in text:
            before, _, after = text.partition(marker)
            return before, after
    return None


def load_mc_items(path: str, cache_dir: Path) -> list[MCRecord]:
    """The items of a multiple-choice file; a malformed line is an error naming the file and line."""
    items = []
    for file in resolve_paths(path, cache_dir):
        for where, rec in read_records(file, "auto"):
            if not isinstance(rec, dict):
                raise MergemixError(f"{where}: expected an object with question, choices, answer")
            missing = [k for k in ("question", "choices", "answer") if k not in rec]
            if missing:
                raise MergemixError(f"{where}: missing field {', '.join(missing)} (need question, choices, answer)")
            q, choices, answer, blank = rec["question"], rec["choices"], rec["answer"], rec.get("blank")
            if not isinstance(q, str):
                raise MergemixError(f"{where}: question must be text, got {type(q).__name__}")
            if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
                raise MergemixError(f"{where}: choices must be a list of two or more strings")
            if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
                raise MergemixError(f"{where}: answer must be an index into choices (0..{len(choices) - 1}), got {answer!r}")
            if blank is not None and (not isinstance(blank, str) or _split_blank(blank) is None):
                raise MergemixError(f"{where}: blank must be text with a ___ or {{blank}} marker where each "
                                    f"option goes, got {blank!r}")
            items.append(MCRecord(where, q, choices, answer, blank))
    if len(items) < 2:
        raise MergemixError(f"{path}: {len(items)} multiple-choice items; at least 2 are needed")
    return items


@dataclass(frozen=True)
class MCItem:
    """One tokenized item: indices into the benchmark's table of unique scoring requests."""

    options: list[int]  # `context + " " + option`, scoring the option's tokens (acc, acc_norm, score, margin)
    blanks: list[int]  # each option in the blank of the cloze text, scoring from the blank on (blank_ppl)
    option_chars: list[int]
    answer: int


@dataclass(frozen=True)
class Request:
    """A token sequence whose last `n` tokens are scored (sum of log-probabilities)."""

    ids: tuple[int, ...]
    n: int


_NOTED: set[str] = set()


def _note_share(name: str, mine: int, total: int) -> None:
    """Log, once per benchmark, how many of its items this process scores."""
    if name not in _NOTED:
        _NOTED.add(name)
        log.info("benchmark %s: this process scores %d of %d items", name, mine, total)


def _prefix_groups(requests: Sequence[Request], max_len: int) -> tuple[list[tuple[int, ...]], dict]:
    """The distinct unscored prefixes, longest first, and the requests of each."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, req in enumerate(requests):
        ids = req.ids[-max_len:]
        n = min(req.n, len(ids) - 1)  # the first token has nothing before it to be scored from
        groups.setdefault(ids[: len(ids) - n], []).append(i)
    return sorted(groups, key=lambda p: (-len(p), groups[p][0])), groups


def score_requests(model: torch.nn.Module, requests: Sequence[Request], batch_size: int,
                   pad_to: int = 0) -> list[tuple[float, int]]:
    """(sum of log-probs of the scored tokens, their count) of every request.

    Requests whose unscored prefixes are equal (the options of one item: same context) share one forward
    pass of that prefix: prefixes run once, left-padded, longest first, and their key/value cache is copied
    to each continuation, so an item with four 2-token options over a 45-token question costs ~53 token
    positions instead of ~190. A model that returns no cache gets every sequence whole (`_score_whole`).
    Only the scored positions go through log_softmax. Sequences longer than the model's context keep their
    last tokens. `pad_to` chunks are run at least, the missing ones padding (one token each, as many forward
    passes as a real chunk, dropped): the processes of a sharded launch stay in step.
    """
    max_len = max_positions(model) or 2048
    prefixes, groups = _prefix_groups(requests, max_len)
    out: list[tuple[float, int]] = [(0.0, 0)] * len(requests)
    chunks = [prefixes[b : b + batch_size] for b in range(0, len(prefixes), batch_size)]
    for chunk in chunks:
        rows = [(g, i) for g, p in enumerate(chunk) for i in groups[p]]
        conts = [requests[i].ids[-max_len:][len(chunk[g]) :] for g, i in rows]
        for (_, i), value in zip(rows, _score_chunk(model, chunk, rows, conts), strict=True):
            out[i] = value
    pad = (0,)
    for _ in range(pad_to - len(chunks)):
        _score_chunk(model, [pad], [(0, -1)], [pad])
    return out


def _score_chunk(model: torch.nn.Module, chunk: list[tuple[int, ...]], rows: list[tuple[int, int]],
                 conts: list[tuple[int, ...]]) -> list[tuple[float, int]]:
    """The continuations `conts[r]` after the prefix `chunk[rows[r][0]]`: shared, else each sequence whole."""
    scored = _score_shared(model, chunk, [g for g, _ in rows], conts)
    if scored is None:
        scored = _score_whole(model, [chunk[g] + c for (g, _), c in zip(rows, conts, strict=True)],
                              [len(c) for c in conts])
    return scored


def _gather_logprobs(logits: torch.Tensor, rows: list[int], pos: list[int], target: list[int],
                     counts: list[int]) -> list[tuple[float, int]]:
    """Sums of log p(target) at (row, pos) of `logits`, in consecutive runs of `counts`."""
    dev = logits.device
    picked = logits[torch.tensor(rows, device=dev), torch.tensor(pos, device=dev)].float()
    lp = torch.log_softmax(picked, dim=-1).gather(1, torch.tensor(target, device=dev)[:, None])[:, 0].cpu()
    return [(part.sum().item(), n) for part, n in zip(lp.split(counts), counts, strict=True)]


def _score_shared(model: torch.nn.Module, prefixes: list[tuple[int, ...]], group: list[int],
                  conts: list[tuple[int, ...]]) -> list[tuple[float, int]] | None:
    """Continuations `conts[r]` after prefix `prefixes[group[r]]`, every continuation token scored; the
    prefixes run once and their cache is shared. None when the model keeps no cache."""
    dev = model_device(model)
    width = max(len(p) for p in prefixes)
    ids = torch.zeros((len(prefixes), width), dtype=torch.long)
    mask = torch.zeros((len(prefixes), width), dtype=torch.long)
    for g, p in enumerate(prefixes):
        ids[g, width - len(p) :] = torch.tensor(p)
        mask[g, width - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    first = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0), use_cache=True)
    cache = cache_of(first)
    if cache is None or not hasattr(cache, "reorder_cache"):
        return None
    index = torch.tensor(group, device=dev)
    cache.reorder_cache(index)  # one copy of its prefix's cache per continuation
    c_width = max(len(c) for c in conts)
    c_ids = torch.zeros((len(conts), c_width), dtype=torch.long)
    c_mask = torch.zeros((len(conts), c_width), dtype=torch.long)
    for r, c in enumerate(conts):
        c_ids[r, : len(c)] = torch.tensor(c)
        c_mask[r, : len(c)] = 1
    lengths = torch.tensor([len(prefixes[g]) for g in group], device=dev)
    # padding after a short continuation is never scored; clamped, it cannot run past a learned position table
    positions = (lengths[:, None] + torch.arange(c_width, device=dev)[None]).clamp(max=(max_positions(model) or 2**31) - 1)
    logits = model(input_ids=c_ids.to(dev), attention_mask=torch.cat([mask[index], c_mask.to(dev)], dim=1),
                   position_ids=positions, use_cache=True, **cache_kwarg(model, cache)).logits
    # The first continuation token is predicted from the prefix's last position, the others from the
    # continuation's own: one (rows x c_width + 1) table of logits covers both.
    logits = torch.cat([first.logits[index, -1:], logits], dim=1)
    rows, pos, target = [], [], []
    for r, c in enumerate(conts):
        rows += [r] * len(c)
        pos += range(len(c))
        target += c
    return _gather_logprobs(logits, rows, pos, target, [len(c) for c in conts])


def pack_scored(seqs: Sequence[Sequence[int]], ns: Sequence[int],
                ) -> tuple[torch.Tensor, list[int], list[int], list[int]]:
    """`seqs` right-padded into one batch of ids, and where their scored tokens (the last `ns[r]` of each) are
    predicted: (ids, row of each scored token, the position whose logits predict it, the token)."""
    ids = torch.zeros((len(seqs), max(len(s) for s in seqs)), dtype=torch.long)
    rows: list[int] = []
    pos: list[int] = []
    target: list[int] = []
    for r, (seq, n) in enumerate(zip(seqs, ns, strict=True)):
        ids[r, : len(seq)] = torch.tensor(seq)
        rows += [r] * n
        pos += range(len(seq) - n - 1, len(seq) - 1)
        target += seq[len(seq) - n :]
    return ids, rows, pos, target


def _score_whole(model: torch.nn.Module, seqs: list[tuple[int, ...]], ns: list[int]) -> list[tuple[float, int]]:
    """The last `ns[r]` tokens of each of `seqs`, each sequence run whole (right-padded)."""
    ids, rows, pos, target = pack_scored(seqs, ns)
    return _gather_logprobs(model(input_ids=ids.to(model_device(model))).logits, rows, pos, target, ns)


class MultipleChoice(Benchmark):
    """Each option is scored by the log-likelihood of its tokens in `context + " " + option`, the context
    being the item's question through `question_template`.

    acc: the option with the highest total log-likelihood is right. acc_norm: the same, divided by the option's
    length in characters (as lm-eval). score: mean log-probability per token of the correct option minus the
    mean of that of the wrong options; margin: minus the best wrong one. Continuous, they rank weak models far
    more stably than accuracy (docs/fidelity.md, "Sizing notes": ρ 0.64 vs −0.03 between two trainings of the
    same mixtures). blank_ppl (BOSE, arXiv 2503.00812): each option is put into the blank of a cloze text (the
    item's `blank`, else `blank_template`) and the completed text is scored by its mean log-probability per
    token from the blank to the end, so the words after the blank weigh in; the best is the model's answer. A
    blank at the very end scores the option alone, per token.
    """

    metrics = BENCHMARK_KINDS.meta("multiple_choice")["metrics"]
    higher_is_better = {m: True for m in metrics}

    @staticmethod
    def read(spec: BenchmarkSpec, cache_dir: Path) -> list[MCRecord]:
        assert spec.path is not None
        return load_mc_items(spec.path, cache_dir)

    def __init__(self, spec: BenchmarkSpec, ctx: EvalContext, data: list[MCRecord]) -> None:
        super().__init__(spec, ctx, data)
        raw = data
        if spec.max_items is not None and len(data) > spec.max_items:
            raw = random.Random(ctx.seed).sample(raw, spec.max_items)
        self._index: dict[Request, int] = {}
        self.requests: list[Request] = []
        self.items = [self._tokenize(rec) for rec in raw]
        self.chance = sum(1 / len(it.options) for it in self.items) / len(self.items)

    def _request(self, text: str, prefix: str) -> int:
        """Index of the request scoring what `text`, tokenized whole, has beyond `prefix`'s own tokens;
        identical requests (a blank at the end of the question) are scored once."""
        ids, n_prefix = self.ctx.ids(text), len(self.ctx.ids(prefix))
        if n_prefix == 0:  # nothing to predict the first token from: start from BOS (EOS where none), as lm-eval
            start = getattr(self.ctx.tokenizer, "bos_token_id", None)
            start = start if start is not None else getattr(self.ctx.tokenizer, "eos_token_id", None)
            ids = ([start] if start is not None else []) + ids
            n_prefix = 1 if start is not None else 0
        req = Request(tuple(ids), max(1, len(ids) - n_prefix))
        if req not in self._index:
            self._index[req] = len(self.requests)
            self.requests.append(req)
        return self._index[req]

    def _tokenize(self, rec: MCRecord) -> MCItem:
        """Each option is scored inside the tokenization of the whole text; its tokens are those beyond the
        context's own token count (lm-eval's rule). Tokenizing an option on its own would add a word-start
        marker for SentencePiece models. For the cloze text, whitespace before the blank goes with the
        option, as the space before an option does."""
        template = self.spec.question_template or "{question}"
        context = template.replace("{question}", rec.question)
        cloze = rec.blank or self.spec.blank_template.replace("{question}", rec.question)
        parts = _split_blank(cloze)
        assert parts is not None  # checked when the file and the recipe were read
        before, after = parts
        return MCItem(
            options=[self._request(f"{context} {c}", context) for c in rec.choices],
            blanks=[self._request(f"{before}{c}{after}", before.rstrip()) for c in rec.choices],
            option_chars=[len(c) for c in rec.choices],
            answer=rec.answer,
        )

    def _scored(self, model: torch.nn.Module, share: Share | None) -> list[tuple[float, int]]:
        """(sum of log-probs, tokens) of every request; with `share`, this process scores the requests of its
        items (rank, rank + N, ...) and the others' are gathered."""
        rank, world = share or (0, 1)
        if world == 1:
            return score_requests(model, self.requests, self.ctx.batch_size)
        parts = [sorted({r for it in self.items[k::world] for r in (*it.options, *it.blanks)}) for k in range(world)]
        max_len = max_positions(model) or 2048
        most = max(math.ceil(len(_prefix_groups([self.requests[r] for r in part], max_len)[0]) / self.ctx.batch_size)
                   for part in parts)
        _note_share(self.spec.name, len(self.items[rank::world]), len(self.items))
        mine = parts[rank]
        values = score_requests(model, [self.requests[r] for r in mine], self.ctx.batch_size, pad_to=most)
        merged: dict[int, tuple[float, int]] = {}
        for part in gather(dict(zip(mine, values, strict=True))):
            for r, v in part.items():
                merged.setdefault(r, v)  # a request two processes share (a question asked twice): the first
        return [merged[r] for r in range(len(self.requests))]

    def item_values(self, model: torch.nn.Module, share: Share | None = None) -> dict[str, torch.Tensor]:
        scored = self._scored(model, share)
        values: dict[str, list[float]] = {m: [] for m in self.metrics}
        for it in self.items:
            total = [scored[r][0] for r in it.options]
            per_tok = [scored[r][0] / max(scored[r][1], 1) for r in it.options]
            per_char = [lp / max(c, 1) for lp, c in zip(total, it.option_chars, strict=True)]
            cloze = [scored[r][0] / max(scored[r][1], 1) for r in it.blanks]
            wrong = [v for k, v in enumerate(per_tok) if k != it.answer]
            values["acc"].append(float(_argmax(total) == it.answer))
            values["acc_norm"].append(float(_argmax(per_char) == it.answer))
            values["blank_ppl"].append(float(_argmax(cloze) == it.answer))
            values["score"].append(per_tok[it.answer] - sum(wrong) / len(wrong))
            values["margin"].append(per_tok[it.answer] - max(wrong))
        return {name: torch.tensor(v) for name, v in values.items()}


def _argmax(values: list[float]) -> int:
    """Index of the largest value; the first one on ties (as max() picks)."""
    return max(range(len(values)), key=values.__getitem__)
