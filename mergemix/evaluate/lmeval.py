"""Benchmark kind `lm_eval`: score the resident (merged) model on an lm-evaluation-harness task.

The task is resolved and loaded when the recipe's benchmarks are read, before anything is trained: an
unknown name, a folder without task YAMLs, a dataset that is not available offline, or a metric the task
does not report fails in seconds. Scoring wraps the in-memory model in lm-eval's `HFLM` and runs the
task's requests on it as it is now: no response cache (`use_cache`) and no request cache
(`cache_requests`), so scores follow the weights when a merge rewrites them in place.

lm-eval is optional (`pip install 'mergemix[lmeval]'`) and imported only when this kind is used.
Needs lm-eval >= 0.4.12 (the `TaskManager.load` API).
"""

from __future__ import annotations

import difflib
import functools
import json
import logging
import math
import random
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from mergemix.artifacts import Hasher
from mergemix.catalog import BENCHMARK_KINDS
from mergemix.collective import Share
from mergemix.errors import MergemixError
from mergemix.evaluate.kinds import Benchmark, EvalContext
from mergemix.recipe import BenchmarkSpec

log = logging.getLogger(__name__)

# Non-mean metrics (f1, bleu, ...) get their standard error by bootstrap; mean metrics (acc, ...) in
# closed form. 1000 resamples put the error of the error near 2%, at a fraction of lm-eval's 100000.
BOOTSTRAP_ITERS = 1000


def _import_lm_eval() -> ModuleType:
    """The `lm_eval` package, or a MergemixError that says how to install it."""
    try:
        import lm_eval
        import lm_eval.evaluator
        import lm_eval.models.huggingface
        import lm_eval.tasks
    except ImportError as e:
        raise MergemixError(f"kind lm_eval needs lm-eval ({e}): pip install 'mergemix[lmeval]'") from None
    quiet = logging.getLogger("lm_eval")
    if quiet.level == logging.NOTSET:  # lm-eval logs every request batch at INFO: keep its warnings only
        quiet.setLevel(logging.WARNING)
    return lm_eval


@functools.lru_cache(maxsize=1)
def _builtin_tasks() -> Any:
    """lm-eval's index of its built-in tasks (indexing them takes ~6 s, so once per process)."""
    return _import_lm_eval().tasks.TaskManager()


def _resolve(task: str) -> tuple[Any, str]:
    """(task manager, task name) for a task name, a folder holding one task, or a task YAML file."""
    path = Path(task).expanduser()
    if path.exists():
        folder = path if path.is_dir() else path.parent
        tm = _import_lm_eval().tasks.TaskManager(include_path=str(folder), include_defaults=False)
        names = [n for n in tm.all_subtasks
                 if path.is_dir() or Path(tm.task_index[n].yaml_path or "").resolve() == path.resolve()]
        if not names:
            raise MergemixError(f"task {task}: no lm-eval task definition found (a YAML file with a `task:` "
                                "key, as in lm-eval's own task folders)")
        if len(names) > 1:
            raise MergemixError(f"task {task}: holds {len(names)} tasks ({', '.join(names)}); point task at the "
                                "YAML file of the one to score")
        return tm, names[0]
    if task.endswith((".yaml", ".yml")) or "/" in task:
        raise MergemixError(f"task {task}: no such file or folder")
    tm = _builtin_tasks()
    if task in tm.all_subtasks:
        return tm, task
    if task in tm.all_groups or task in tm.all_tags:
        raise MergemixError(f"task {task!r} is a group of tasks; give one benchmark per task of it")
    close = difflib.get_close_matches(task, tm.all_subtasks, n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise MergemixError(f"unknown lm-eval task {task!r}{hint}")


def _refuse_task_code(spec: BenchmarkSpec) -> None:
    """A task folder whose YAML uses `!function` runs Python from that folder when lm-eval loads it: refused
    unless the benchmark says it trusts the folder (`trust_task_code`), as checkpoints need trust_remote_code."""
    assert spec.task is not None
    path = Path(spec.task).expanduser()
    if spec.trust_task_code or not path.exists():
        return
    folder = path if path.is_dir() else path.parent
    for f in sorted(p for p in folder.rglob("*") if p.suffix in (".yaml", ".yml")):
        if "!function" in f.read_text(encoding="utf-8", errors="replace"):
            raise MergemixError(f"task {spec.task}: {f} has a !function tag, which imports and runs Python from "
                                "the task folder; set trust_task_code: true on this benchmark if you trust that "
                                "code")


def _load_task(spec: BenchmarkSpec) -> tuple[Any, str, Path | None]:
    """(lm-eval task dict with the one task loaded, task name, its YAML file), the objective metric
    checked against what the task reports."""
    assert spec.task is not None
    _refuse_task_code(spec)
    tm, name = _resolve(spec.task)
    try:
        task_dict = tm.load([name])
    except Exception as e:  # lm-eval and datasets raise anything from KeyError to ConnectionError
        raise MergemixError(
            f"lm-eval task {name!r} could not be loaded ({type(e).__name__}: {e}). Offline, a task's dataset "
            "must already be in the local Hugging Face datasets cache; or define the task in a local folder "
            "with `dataset_path: json` and `data_files`"
        ) from None
    reported = sorted(task_dict["tasks"][name].higher_is_better())
    metric = spec.objective_metric
    if metric not in reported:
        raise MergemixError(f"lm-eval task {name!r} reports {', '.join(reported) or 'no metric'}, not {metric!r}; "
                            f"set metric to one of them that mergemix knows ({', '.join(LmEval.metrics)})")
    yaml_path = tm.task_index[name].yaml_path
    return task_dict, name, Path(yaml_path) if yaml_path else None


def write_mc_task(folder: Path, name: str, data: Path) -> Path:
    """Write the lm-eval task that scores a multiple-choice file of kind multiple_choice (lines with
    `question`, `choices`, `answer`) the way that kind does: prompt = the question, target delimiter " ",
    options = the choices, acc and acc_norm. Returns the task's YAML file."""
    import yaml

    task = {
        "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"validation": str(data)}},
        "validation_split": "validation", "output_type": "multiple_choice", "doc_to_text": "question",
        "doc_to_choice": "choices", "doc_to_target": "answer", "target_delimiter": " ",
        "metric_list": [{"metric": m, "aggregation": "mean", "higher_is_better": True} for m in ("acc", "acc_norm")],
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(yaml.safe_dump(task, sort_keys=False), encoding="utf-8")
    return path


def _check_doc(task: Any, name: str, index: int, doc: Any) -> None:
    """A document the task cannot turn into a request (a field missing, an answer out of range), refused in
    one line naming the task and the document."""
    try:
        task.doc_to_text(doc)
        target = task.doc_to_target(doc)
        if target is None:
            raise ValueError("doc_to_target gave no target (a missing field?)")
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            if isinstance(target, int) and not 0 <= target < len(choices):
                raise ValueError(f"answer {target} is not an index of its {len(choices)} choices")
    except Exception as e:  # noqa: BLE001  (whatever the task's templates raise)
        shown = str(e) or type(e).__name__
        raise MergemixError(f"lm-eval task {name!r}: document {index}: {type(e).__name__}: {shown}; fix the "
                            "document or the task's doc_to_text / doc_to_target / doc_to_choice") from None


def _digest(texts: list[str]) -> str:
    h = Hasher()
    for t in texts:
        h.update(t)
    return h.hexdigest()


class LmEval(Benchmark):
    """An lm-evaluation-harness task, scored as lm-eval scores it.

    Metrics are the task's own (`acc,none` → `acc`, its stderr → `acc_se`), plus `n` (items scored) and
    `chance` (mean of 1 / number of choices for multiple-choice tasks, else 0), which the objective maps
    to 0 for accuracies. A task may report only some of the metrics below; the one chosen by `metric`
    (default acc) is checked against the task when the recipe's benchmarks are read.
    """

    metrics = BENCHMARK_KINDS.meta("lm_eval")["metrics"]
    higher_is_better = {"acc": True, "acc_norm": True, "exact_match": True, "f1": True, "mcc": True, "bleu": True,
                        "word_perplexity": False, "byte_perplexity": False, "bits_per_byte": False}
    paired = False  # lm-eval reports aggregates: two models are compared by their standard errors alone

    @staticmethod
    def read(spec: BenchmarkSpec, cache_dir: Path) -> dict[str, Any]:
        """Resolve and load the task (fail fast), and return what identifies its content for the trial
        log's key: the task name, lm-eval's version, the task's configuration files and its documents."""
        lm_eval = _import_lm_eval()
        task_dict, name, yaml_path = _load_task(spec)
        task = task_dict["tasks"][name]
        if task.has_test_docs() and not spec.allow_test_split:
            raise MergemixError(f"lm-eval task {name!r} is scored on its test split: choosing a mixture by its "
                                "test score leaks the test set into the choice. Use a task whose test_split is a "
                                "validation split, or set allow_test_split: true")
        config_files = []  # the task's folder: its YAML, the YAMLs it includes, python helpers
        if yaml_path is not None:
            config_files = [p.read_text(encoding="utf-8", errors="replace")
                            for p in sorted(yaml_path.parent.iterdir()) if p.suffix in (".yaml", ".yml", ".py")]
        for i, doc in enumerate(task.eval_docs):  # lm-eval would fail deep inside the scoring instead
            _check_doc(task, name, i, doc)
        docs = [json.dumps(doc, sort_keys=True, default=str) for doc in task.eval_docs]
        if len(docs) < 2:
            raise MergemixError(f"lm-eval task {name!r} has {len(docs)} document; at least 2 are needed")
        return {"task": name, "lm_eval": lm_eval.__version__, "config": _digest(config_files),
                "docs": _digest(docs), "n_docs": len(docs)}

    def __init__(self, spec: BenchmarkSpec, ctx: EvalContext, data: dict[str, Any]) -> None:
        super().__init__(spec, ctx, data)
        self._lm_eval = _import_lm_eval()
        self.task_dict, self.task_name, _ = _load_task(spec)
        self.task = self.task_dict["tasks"][self.task_name]
        n = data["n_docs"]
        self.samples = None
        if spec.max_items is not None and n > spec.max_items:
            self.samples = {self.task_name: sorted(random.Random(ctx.seed).sample(range(n), spec.max_items))}
        log.info("benchmark %s: lm-eval task %s (%s), %d of %d documents", spec.name, self.task_name,
                 self.task.OUTPUT_TYPE, spec.max_items if self.samples else n, n)
        self._lm: Any = None

    def _wrapped(self, model: torch.nn.Module) -> Any:
        """lm-eval's HFLM around `model` itself (no copy), built once per model object."""
        if self._lm is None or self._lm.model is not model:
            hflm = self._lm_eval.models.huggingface.HFLM
            self._lm = hflm(pretrained=model, tokenizer=self.ctx.tokenizer, batch_size=self.ctx.batch_size)
        return self._lm

    @torch.no_grad()
    def score(self, model: torch.nn.Module, share: Share | None = None) -> dict[str, float]:
        """Every document on every process (lm-eval runs its own loop); `share` is not used."""
        # Few-shot examples are drawn from the task's generator on every call: reseed it so that every
        # merge is scored on the same prompts.
        self.task.set_fewshot_seed(seed=self.ctx.seed)
        out = self._lm_eval.evaluator.evaluate(
            lm=self._wrapped(model), task_dict=self.task_dict, samples=self.samples, cache_requests=False,
            bootstrap_iters=BOOTSTRAP_ITERS, log_samples=True,
        )
        items = out["samples"][self.task_name]
        chance = 0.0
        if self.task.OUTPUT_TYPE == "multiple_choice":
            chance = sum(1 / len(self.task.doc_to_choice(s["doc"])) for s in items) / len(items)
        result = {"n": float(len(items)), "chance": chance}
        reported = out["results"][self.task_name]
        for key, value in sorted(reported.items()):  # "acc,none", "acc_stderr,none", "exact_match,strict-match"
            metric, _, filter_name = key.partition(",")
            if metric not in self.metrics or metric in result:
                continue
            if filter_name != "none" and f"{metric},none" in reported:
                continue
            se = reported.get(f"{metric}_stderr,{filter_name}")
            result[metric] = float(value)
            result[f"{metric}_se"] = float(se) if isinstance(se, (int, float)) else math.nan
        return result
