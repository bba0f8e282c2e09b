"""The lm_eval benchmark kind, and mergemix's own multiple-choice scoring checked against lm-eval's."""

from __future__ import annotations

import copy
import json
import random
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mergemix.artifacts import stable_hash
from mergemix.errors import MergemixError
from mergemix.evaluate import EvalContext, Evaluator
from mergemix.evaluate.kinds import MultipleChoice
from mergemix.evaluate.lmeval import LmEval, write_mc_task
from mergemix.recipe import BenchmarkSpec, recipe_from_dict

NEEDS = "lm-eval is not installed (pip install 'mergemix[lmeval]'); `make test` installs it"


def _items(n: int = 30) -> list[dict[str, Any]]:
    """Questions with options of different token and character lengths, so acc and acc_norm differ."""
    rng = random.Random(7)
    words = "the quick brown fox jumps over lazy dog".split()
    out = []
    for _ in range(n):
        a, b = rng.randint(0, 40), rng.randint(0, 40)
        choices = [str(a + b), str(a + b + rng.randint(1, 9)), " ".join(rng.sample(words, rng.randint(1, 3)))]
        if rng.random() < 0.5:
            choices.append(f"{a} {b}")
        out.append({"question": f"{a} + {b} =", "choices": choices, "answer": rng.randrange(len(choices))})
    return out


def _write_task(root: Path, items: list[dict[str, Any]], name: str = "local_mc") -> tuple[Path, Path]:
    """(jsonl file, task folder): the items as a multiple-choice file and as the lm-eval task that
    scores it the way kind multiple_choice does."""
    data = root / "mc.jsonl"
    data.write_text("".join(json.dumps(it) + "\n" for it in items))
    write_mc_task(root / "tasks", name, data)
    return data, root / "tasks"


def _ctx(tok: Any, tmp_path: Path, batch_size: int = 8) -> EvalContext:
    return EvalContext(tok, 32, {}, tmp_path, batch_size, 0)


def test_spec_needs_task_exactly_for_kind_lm_eval() -> None:
    BenchmarkSpec(name="t", kind="lm_eval", task="arc_easy")
    with pytest.raises(ValueError, match="kind lm_eval needs task"):
        BenchmarkSpec(name="t", kind="lm_eval")
    with pytest.raises(ValueError, match="other kinds take no task"):
        BenchmarkSpec(name="t", kind="multiple_choice", path="x.jsonl", task="arc_easy")
    with pytest.raises(ValueError, match="give neither path nor domain"):
        BenchmarkSpec(name="t", kind="lm_eval", task="arc_easy", path="x.jsonl")
    with pytest.raises(ValueError, match="metric 'loss' is not one of"):
        BenchmarkSpec(name="t", kind="lm_eval", task="arc_easy", metric="loss")


def test_missing_lm_eval_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    spec = BenchmarkSpec(name="t", kind="lm_eval", task=str(tmp_path))
    with pytest.raises(MergemixError, match=r"needs lm-eval .*pip install 'mergemix\[lmeval\]'"):
        LmEval.read(spec, tmp_path)


def test_mergemix_accuracy_equals_lm_eval_item_by_item(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason=NEEDS)
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    model, tok = tiny_lm
    items = _items()
    data, folder = _write_task(tmp_path, items)
    tm = TaskManager(include_path=str(folder), include_defaults=False)
    out = evaluator.evaluate(lm=HFLM(pretrained=model, tokenizer=tok, batch_size=8), task_dict=tm.load(["local_mc"]),
                             log_samples=True, bootstrap_iters=0)
    theirs = {s["doc_id"]: (s["acc"], s["acc_norm"]) for s in out["samples"]["local_mc"]}
    assert sorted(theirs) == list(range(len(items)))

    spec = BenchmarkSpec(name="mc", kind="multiple_choice", path=str(data))
    loaded = MultipleChoice.read(spec, tmp_path)
    ours = {}
    for i, item in enumerate(loaded):  # one item at a time: per-item correctness from the public score()
        scored = MultipleChoice(spec, _ctx(tok, tmp_path), [item]).score(model)
        ours[i] = (scored["acc"], scored["acc_norm"])
    assert ours == theirs
    assert 0 < sum(a for a, _ in ours.values()) < len(items)  # the comparison is not trivially all-0 or all-1
    assert any(a != n for a, n in ours.values())  # acc_norm is compared on items where it differs from acc

    whole = MultipleChoice(spec, _ctx(tok, tmp_path), loaded).score(model)  # batched, as in a run
    assert whole["acc"] == pytest.approx(out["results"]["local_mc"]["acc,none"])
    assert whole["acc_norm"] == pytest.approx(out["results"]["local_mc"]["acc_norm,none"])


def _recipe(micro_data: dict[str, Any], tmp_path: Path, benchmarks: list[dict[str, Any]]) -> Any:
    from tests.conftest import micro_recipe_dict

    raw = micro_recipe_dict(micro_data, tmp_path / "run", tmp_path / "cache")
    raw["evaluation"] = {"batch_size": 8, "benchmarks": benchmarks}
    return recipe_from_dict(raw)


def test_lm_eval_kind_scores_like_multiple_choice_and_follows_in_place_weight_changes(
    tiny_lm: tuple[Any, Any], micro_data: dict[str, Any], tmp_path: Path
) -> None:
    pytest.importorskip("lm_eval", reason=NEEDS)
    model, tok = tiny_lm
    model = copy.deepcopy(model)  # its weights are rewritten below
    data, folder = _write_task(tmp_path, _items(40))
    recipe = _recipe(micro_data, tmp_path, [
        {"name": "mc", "kind": "multiple_choice", "path": str(data), "metric": "acc"},
        {"name": "lm", "kind": "lm_eval", "task": str(folder)},
        {"name": "lm_sample", "kind": "lm_eval", "task": str(folder), "metric": "acc_norm", "max_items": 7},
    ])
    evaluate = Evaluator(recipe.evaluation.benchmarks, _ctx(tok, tmp_path, recipe.evaluation.batch_size))
    before = evaluate(model)
    assert before["lm_sample"]["n"] == 7
    assert set(before["lm"]) == {"acc", "acc_se", "acc_norm", "acc_norm_se", "n", "chance"}
    for key in ("acc", "acc_norm", "n", "chance"):
        assert before["lm"][key] == pytest.approx(before["mc"][key])
    assert before["lm"]["acc_se"] == pytest.approx(before["mc"]["acc_se"])

    # A merge rewrites the resident model's parameters in place: the same wrapped model must be re-scored,
    # not answered from a cache.
    other = copy.deepcopy(model)
    torch.manual_seed(1)
    other.apply(other._init_weights)
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            p.copy_(q)
    after = evaluate(model)
    assert after["lm"] != before["lm"]
    assert after["lm"]["acc"] == pytest.approx(after["mc"]["acc"])
    fresh = Evaluator(recipe.evaluation.benchmarks, _ctx(tok, tmp_path, recipe.evaluation.batch_size))(model)  # a new HFLM and freshly loaded task
    assert after["lm"] == fresh["lm"]


def test_few_shot_prompts_are_the_same_for_every_merge(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason=NEEDS)
    model, tok = tiny_lm
    _, folder = _write_task(tmp_path, _items(12))
    task_yaml = folder / "local_mc.yaml"
    task = yaml.safe_load(task_yaml.read_text())
    task_yaml.write_text(yaml.safe_dump({**task, "num_fewshot": 3, "fewshot_split": "validation"}))
    spec = BenchmarkSpec(name="t", kind="lm_eval", task=str(folder))
    bench = LmEval(spec, _ctx(tok, tmp_path), LmEval.read(spec, tmp_path))
    prompts = []
    for _ in range(2):
        bench.score(model)
        prompts.append([instance.args[0] for instance in bench.task.instances])
    assert prompts[0][0].count("\n\n") == 3  # three examples precede the question
    assert prompts[0] == prompts[1]


def test_task_is_resolved_and_checked_before_training(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason=NEEDS)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(MergemixError, match="no lm-eval task definition found"):
        LmEval.read(BenchmarkSpec(name="t", kind="lm_eval", task=str(empty)), tmp_path)
    with pytest.raises(MergemixError, match="no such file or folder"):
        LmEval.read(BenchmarkSpec(name="t", kind="lm_eval", task=str(tmp_path / "nope.yaml")), tmp_path)

    data, folder = _write_task(tmp_path, _items(5))
    spec = BenchmarkSpec(name="t", kind="lm_eval", task=str(folder / "local_mc.yaml"), metric="exact_match")
    with pytest.raises(MergemixError, match="reports acc, acc_norm, not 'exact_match'"):
        LmEval.read(spec, tmp_path)

    key = LmEval.read(BenchmarkSpec(name="t", kind="lm_eval", task=str(folder)), tmp_path)
    assert key["task"] == "local_mc" and key["n_docs"] == 5
    assert stable_hash(LmEval.read(BenchmarkSpec(name="t", kind="lm_eval", task=str(folder)), tmp_path)) == \
        stable_hash(key)  # the trial log's key (mergemix.run.workspace.evaluation_key) is stable ...
    edited = [{**it, "answer": (it["answer"] + 1) % len(it["choices"])} for it in _items(5)]
    _write_task(tmp_path, edited)
    changed = LmEval.read(BenchmarkSpec(name="t", kind="lm_eval", task=str(folder)), tmp_path)
    assert changed["docs"] != key["docs"] and changed["config"] == key["config"]  # ... and follows the data
    _write_task(tmp_path, _items(6), name="second")
    with pytest.raises(MergemixError, match="holds 2 tasks"):
        LmEval.read(BenchmarkSpec(name="t", kind="lm_eval", task=str(folder)), tmp_path)


def test_unknown_task_name_suggests_close_matches(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason=NEEDS)
    from lm_eval.tasks import TaskManager

    from mergemix.evaluate import lmeval

    _, folder = _write_task(tmp_path, _items(3), name="arc_easy")  # stands in for lm-eval's ~6 s index
    monkeypatch.setattr(lmeval, "_builtin_tasks", lambda: TaskManager(include_path=str(folder), include_defaults=False))
    with pytest.raises(MergemixError, match=r"unknown lm-eval task 'arc_esay'; did you mean 'arc_easy'"):
        LmEval.read(BenchmarkSpec(name="t", kind="lm_eval", task="arc_esay"), tmp_path)


def test_a_task_scored_on_its_test_split_needs_allow_test_split(tmp_path: Path) -> None:
    pytest.importorskip("lm_eval", reason=NEEDS)
    _, folder = _write_task(tmp_path, _items(5))
    yaml_path = folder / "local_mc.yaml"
    task = yaml.safe_load(yaml_path.read_text())
    task["dataset_kwargs"]["data_files"] = {"test": task["dataset_kwargs"]["data_files"]["validation"]}
    yaml_path.write_text(yaml.safe_dump({**task, "test_split": "test", "validation_split": None}))
    with pytest.raises(MergemixError, match="scored on its test split"):
        LmEval.read(BenchmarkSpec(name="t", kind="lm_eval", task=str(folder)), tmp_path)
    spec = BenchmarkSpec(name="t", kind="lm_eval", task=str(folder), allow_test_split=True)
    assert LmEval.read(spec, tmp_path)["n_docs"] == 5


def test_a_task_folder_that_runs_python_needs_trust_task_code(tmp_path: Path) -> None:
    """`!function` makes lm-eval import a Python file from the task folder: code, so opt-in."""
    pytest.importorskip("lm_eval", reason=NEEDS)
    _, folder = _write_task(tmp_path, _items(5))
    marker = tmp_path / "ran.txt"
    (folder / "utils.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n\ndef text(doc):\n"
                                     "    return doc['question']\n")
    yaml_path = folder / "local_mc.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("doc_to_text: question", "doc_to_text: !function utils.text"))
    with pytest.raises(MergemixError, match=r"local_mc.yaml has a !function tag.*trust_task_code: true"):
        LmEval.read(BenchmarkSpec(name="t", kind="lm_eval", task=str(folder)), tmp_path)
    assert not marker.exists(), "the folder's code ran before it was trusted"
    spec = BenchmarkSpec(name="t", kind="lm_eval", task=str(folder), trust_task_code=True)
    assert LmEval.read(spec, tmp_path)["n_docs"] == 5 and marker.exists()
    with pytest.raises(ValueError, match="trust_task_code is not used by kind perplexity"):
        BenchmarkSpec(name="t", kind="perplexity", path="x.txt", trust_task_code=True)
