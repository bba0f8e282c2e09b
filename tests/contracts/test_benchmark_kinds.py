"""Every registered benchmark kind (mergemix.catalog.BENCHMARK_KINDS) keeps the scorer's contract: its
per-item values average to the aggregate it reports (kinds scored item by item), `n` counts what was scored,
its metrics are the ones the catalog lists, and a malformed item is a one-line error naming the file (or the
lm-eval task) and the line (or document). A kind added to the catalog fails here until it gets a case below."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from mergemix.catalog import BENCHMARK_KINDS
from mergemix.errors import MergemixError
from mergemix.evaluate import EvalContext, Evaluator
from mergemix.recipe import BenchmarkSpec

WORDS = "the quick brown fox jumps over the lazy dog"


@dataclass(frozen=True)
class Case:
    """Six valid items of the kind, one malformed item, the error it must give, and the spec's own fields."""

    items: list[dict[str, Any]]
    bad: dict[str, Any]
    error: str  # regular expression; {file} is the data file's name
    fields: dict[str, Any] = field(default_factory=dict)
    task: Callable[[Path, Path], Path] | None = None  # writes a task folder for the data file (lm_eval)


def _mc(i: int) -> dict[str, Any]:
    return {"question": f"{i} + {i} =", "choices": [str(2 * i), str(2 * i + 1), "fox"], "answer": 0}


def _lm_eval_task(root: Path, data: Path) -> Path:
    from mergemix.evaluate.lmeval import write_mc_task

    write_mc_task(root / "tasks", "contract_mc", data)
    return root / "tasks"


CASES = {
    "perplexity": Case([{"text": f"{WORDS} {i} " * 6} for i in range(6)], {"body": WORDS},
                       r"{file}:7: no field 'text'"),
    "multiple_choice": Case([_mc(i) for i in range(6)], {"choices": ["a", "b"], "answer": 0},
                            r"{file}:7: missing field question"),
    "generation": Case([{"question": f"{i} + 1 =", "answer": str(i + 1)} for i in range(6)], {"question": "q"},
                       r"{file}:7: missing field answer", {"shots": 1}),
    "lm_eval": Case([_mc(i) for i in range(6)], {"question": "q", "choices": ["a", "b"]},
                    r"lm-eval task 'contract_mc': document 6: .*no target", task=_lm_eval_task),
}


def test_every_registered_kind_has_a_contract_case() -> None:
    assert set(CASES) == set(BENCHMARK_KINDS)


def _spec(kind: str, case: Case, root: Path, items: list[dict[str, Any]]) -> BenchmarkSpec:
    data = root / f"{kind}.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    if case.task is not None:
        return BenchmarkSpec(name=kind, kind=kind, task=str(case.task(root, data)), **case.fields)
    return BenchmarkSpec(name=kind, kind=kind, path=str(data), **case.fields)


@pytest.mark.parametrize("kind", list(BENCHMARK_KINDS))
def test_items_average_to_the_aggregate(kind: str, tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    if kind == "lm_eval":
        pytest.importorskip("lm_eval")
    model, tok = tiny_lm
    case = CASES[kind]
    spec = _spec(kind, case, tmp_path, case.items)
    evaluator = Evaluator([spec], EvalContext(tok, 16, {}, tmp_path, 4, 0))
    bench = evaluator.benchmarks[kind]
    assert tuple(bench.metrics) == tuple(BENCHMARK_KINDS.meta(kind)["metrics"])
    scores = evaluator(model)[kind]
    reported = [m for m in bench.metrics if m in scores]
    assert reported and all(torch.isfinite(torch.tensor(scores[m])) for m in reported)
    if not bench.paired:  # aggregates only (lm-eval's): nothing to pair item by item
        assert kind not in evaluator.items(model)
        assert scores["n"] == len(case.items)
        return
    items = evaluator.items(model)[kind]
    scored = len(next(iter(items.values())))
    assert scores["n"] == scored
    for m, values in items.items():
        assert len(values) == scored
        assert scores[m] == pytest.approx(values.mean().item(), rel=1e-6, abs=1e-7), m


@pytest.mark.parametrize("kind", list(BENCHMARK_KINDS))
def test_a_malformed_item_is_one_line_naming_where(kind: str, tmp_path: Path) -> None:
    if kind == "lm_eval":
        pytest.importorskip("lm_eval")
    case = CASES[kind]
    spec = _spec(kind, case, tmp_path, [*case.items, case.bad])
    with pytest.raises(MergemixError, match=case.error.format(file=f"{kind}.jsonl")) as err:
        BENCHMARK_KINDS.get(kind).read(spec, tmp_path)
    assert "\n" not in str(err.value)
