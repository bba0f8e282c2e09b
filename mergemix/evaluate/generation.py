"""The `generation` benchmark kind: ICLiP prompts (BOSE, arXiv 2503.00812), greedy answers, exact match / F1.

A prompt is a one-line light instruction, `shots` solved examples and the question; the model's greedy
continuation up to the first stop string is its answer. The examples are drawn once with the recipe seed
from the file's own items and held out of the scored items, so no scored question ever sits in a prompt
with its answer. Every prompt carries the same examples in the same order: scores differ between models,
not between prompts.
"""

from __future__ import annotations

import collections
import logging
import random
import re
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from mergemix.catalog import BENCHMARK_KINDS
from mergemix.collective import Share
from mergemix.data.readers import read_records, resolve_paths
from mergemix.errors import MergemixError
from mergemix.evaluate.kinds import Benchmark, EvalContext, model_device
from mergemix.model.modeling import cache_kwarg, cache_of, max_positions
from mergemix.recipe import BenchmarkSpec

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "Question: {question}\nAnswer:"


@dataclass(frozen=True)
class GenRecord:
    where: str  # file:line, for error messages
    question: str
    answers: list[str]  # acceptable answers; the first one is shown when the item is an example


def load_generation_items(path: str, cache_dir: Path) -> list[GenRecord]:
    """The items of a generation file: `question` and `answer` (text) or `answers` (a list of texts)."""
    items = []
    for file in resolve_paths(path, cache_dir):
        for where, rec in read_records(file, "auto"):
            if not isinstance(rec, dict):
                raise MergemixError(f"{where}: expected an object with question and answer (or answers)")
            if "question" not in rec or ("answer" not in rec and "answers" not in rec):
                missing = "question" if "question" not in rec else "answer"
                raise MergemixError(f"{where}: missing field {missing} (need question, and answer or answers)")
            q = rec["question"]
            answers = rec["answers"] if "answers" in rec else [rec["answer"]]
            if not isinstance(q, str) or not q.strip():
                raise MergemixError(f"{where}: question must be non-empty text, got {q!r}")
            if not isinstance(answers, list) or not answers or not all(isinstance(a, str) for a in answers):
                raise MergemixError(f"{where}: answer must be text, answers a non-empty list of texts")
            if not all(normalize_answer(a) for a in answers):
                raise MergemixError(f"{where}: empty answer (nothing left after removing case, punctuation and "
                                    f"articles): {answers!r}")
            items.append(GenRecord(where, q, answers))
    return items


# SQuAD's answer normalization: lower case, no punctuation, no articles, single spaces.
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    return " ".join(_ARTICLES.sub(" ", text.lower().translate(_PUNCT)).split())


def exact_match(prediction: str, answers: list[str]) -> float:
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: list[str]) -> float:
    """SQuAD token F1 of the normalized prediction against its best-matching answer."""
    pred = normalize_answer(prediction).split()
    best = 0.0
    for answer in answers:
        gold = normalize_answer(answer).split()
        common = sum((collections.Counter(pred) & collections.Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def cut_at_stop(text: str, stop: list[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    cuts = [i for s in stop if (i := text.find(s)) >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


def _as_list(ids: int | list[int] | None) -> list[int]:
    return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)


@torch.no_grad()
def greedy_generate(model: torch.nn.Module, tokenizer: object, prompts: list[list[int]], max_new_tokens: int,
                    stop: list[str]) -> list[str]:
    """Greedy continuations of token-id prompts, decoded and cut at the first stop string.

    Prompts are left-padded into one batch (attention mask and position ids say where each starts), and the
    key/value cache carries the prompt forward, so each new token costs one position. A model that returns
    no cache gets the whole sequence again at every step. A row stops at EOS or a stop string; the batch
    stops when every row has (or after `max_new_tokens`).
    """
    dev = model_device(model)
    eos = getattr(tokenizer, "eos_token_id", None)
    pad = eos if eos is not None else 0
    ends = {eos} | set(_as_list(getattr(getattr(model, "generation_config", None), "eos_token_id", None)))
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for r, p in enumerate(prompts):
        ids[r, width - len(p) :] = torch.tensor(p)
        mask[r, width - len(p) :] = 1
    ids, mask = ids.to(dev), mask.to(dev)
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
    new: list[list[int]] = [[] for _ in prompts]
    done = [False] * len(prompts)
    texts = [""] * len(prompts)
    for step in range(max_new_tokens):
        nxt = out.logits[:, -1].argmax(-1)
        for r, tok in enumerate(nxt.tolist()):
            if done[r]:
                continue
            if tok in ends:  # the tokenizer's EOS and any end id of the model (a chat model's end of turn)
                done[r] = True
                continue
            new[r].append(tok)
            texts[r], done[r] = cut_at_stop(tokenizer.decode(new[r], skip_special_tokens=True), stop)  # type: ignore[attr-defined]
        if all(done) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones((len(prompts), 1))], dim=1)
        positions = positions[:, -1:] + 1
        cache = cache_of(out)
        if cache is not None:
            out = model(input_ids=nxt[:, None], attention_mask=mask, position_ids=positions, use_cache=True,
                        **cache_kwarg(model, cache))
        else:
            ids = torch.cat([ids, nxt[:, None]], dim=1)
            out = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp(min=0))
    return texts


class Generation(Benchmark):
    """Open-ended questions answered greedily after in-context examples (ICLiP): exact_match and f1 (SQuAD
    normalization; the best over the item's acceptable answers). Chance is 0."""

    metrics = BENCHMARK_KINDS.meta("generation")["metrics"]
    higher_is_better = {"exact_match": True, "f1": True}
    chance = 0.0

    @staticmethod
    def read(spec: BenchmarkSpec, cache_dir: Path) -> list[GenRecord]:
        assert spec.path is not None
        items = load_generation_items(spec.path, cache_dir)
        if len(items) < spec.shots + 2:
            raise MergemixError(f"{spec.path}: {len(items)} items; {spec.shots} are held out as in-context "
                                "examples and at least 2 are needed to score: add items or lower shots")
        return items

    def __init__(self, spec: BenchmarkSpec, ctx: EvalContext, data: list[GenRecord]) -> None:
        super().__init__(spec, ctx, data)
        rng = random.Random(ctx.seed)
        order = rng.sample(range(len(data)), len(data))
        self.shots = [data[i] for i in order[: spec.shots]]
        scored = [data[i] for i in sorted(order[spec.shots :])]
        if spec.max_items is not None and len(scored) > spec.max_items:
            scored = rng.sample(scored, spec.max_items)
        self.items = scored
        self._template = spec.question_template or DEFAULT_TEMPLATE
        header = spec.instruction.strip() + "\n\n" + "".join(
            f"{self._prompt(s.question)} {s.answers[0]}\n\n" for s in self.shots
        )
        self.prompts = [self.ctx.ids(header + self._prompt(it.question)) for it in self.items]

    def _prompt(self, question: str) -> str:
        return self._template.replace("{question}", question)

    def answers(self, model: torch.nn.Module) -> list[str]:
        """The model's answer to every scored item, in item order (batches of similar prompt length)."""
        limit = (max_positions(model) or 2048) - self.spec.max_new_tokens
        order = sorted(range(len(self.prompts)), key=lambda i: (-len(self.prompts[i]), i))
        out = [""] * len(self.prompts)
        bs = self.ctx.batch_size
        for b in range(0, len(order), bs):
            chunk = order[b : b + bs]
            texts = greedy_generate(model, self.ctx.tokenizer, [self.prompts[i][-limit:] for i in chunk],
                                    self.spec.max_new_tokens, self.spec.stop)
            for i, text in zip(chunk, texts, strict=True):
                out[i] = text.strip()
        return out

    def item_values(self, model: torch.nn.Module, share: Share | None = None) -> dict[str, torch.Tensor]:
        """Every item on every process (greedy decoding stops when a batch is done, which would put the
        processes of a sharded launch out of step)."""
        preds = self.answers(model)
        return {name: torch.tensor([fn(p, it.answers) for p, it in zip(preds, self.items, strict=True)])
                for name, fn in (("exact_match", exact_match), ("f1", token_f1))}
