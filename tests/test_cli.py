"""The CLI as a new user meets it: bad input exits non-zero with a short message and no traceback."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mergemix.cli import main


def _recipe(micro_recipe_file: Path, edit: Any) -> Path:
    raw = yaml.safe_load(micro_recipe_file.read_text())
    edit(raw)
    micro_recipe_file.write_text(yaml.safe_dump(raw))
    return micro_recipe_file


def _set_bench_path(path: str) -> Any:
    def edit(raw: dict) -> None:
        raw["evaluation"]["benchmarks"][2]["path"] = path

    return edit


def test_validate_prints_resolved_recipe(micro_recipe_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(micro_recipe_file), "experts.steps=3"]) == 0
    out = capsys.readouterr()
    assert yaml.safe_load(out.out)["experts"]["steps"] == 3 and "valid" in out.err


@pytest.mark.parametrize(
    ("case", "pattern"),
    [
        ("unknown_key", r"micro.yaml: experts.lrr: unknown key; did you mean 'lr'"),
        ("missing_file", r"domain 'code': .*missing.parquet: no such file or directory"),
        ("empty_domain", r"domain 'code': .*empty.jsonl holds no text"),
        ("negative_budget", r"micro.yaml: mixture.total_tokens: must be > 0, got -100"),
        ("bad_json_benchmark", r"bad.jsonl:2: not valid JSON"),
        ("run_dir_under_a_file", r"run_dir: cannot create directory .*afile/run .*set run_dir to a directory"),
        ("cache_dir_is_a_file", r"cache_dir: cannot create directory .*afile .*set cache_dir to a directory"),
    ],
)
def test_bad_input_exits_with_a_located_message(
    case: str, pattern: str, micro_recipe_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    tmp = micro_recipe_file.parent
    (tmp / "empty.jsonl").write_text("")
    (tmp / "bad.jsonl").write_text(
        json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n{'question': 'single quotes'}\n"
    )
    edits = {
        "unknown_key": lambda r: r["experts"].update(lrr=1),
        "missing_file": lambda r: r["data"]["domains"][2].update(source=str(tmp / "missing.parquet")),
        "empty_domain": lambda r: r["data"]["domains"][2].update(source=str(tmp / "empty.jsonl")),
        "negative_budget": lambda r: r["mixture"].update(total_tokens=-100),
        "bad_json_benchmark": _set_bench_path(str(tmp / "bad.jsonl")),
        "run_dir_under_a_file": lambda r: r.update(run_dir=str(tmp / "afile" / "run")),
        "cache_dir_is_a_file": lambda r: r.update(cache_dir=str(tmp / "afile")),
    }
    (tmp / "afile").write_text("a regular file where a directory should go")
    path = _recipe(micro_recipe_file, edits[case])
    assert main(["-q", "propose", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ")
    assert re.search(pattern, last), err
    assert not (tmp / "run" / "proposal.json").exists()
    assert not (tmp / "run" / "experts").exists(), "bad input must fail before any training"


def test_error_from_a_real_process_has_no_traceback(micro_recipe_file: Path) -> None:
    path = _recipe(micro_recipe_file, lambda r: r["experts"].update(lr=-1))
    proc = subprocess.run([sys.executable, "-m", "mergemix.cli", "propose", str(path)], capture_output=True, text=True)
    assert proc.returncode == 2
    assert "experts.lr: must be > 0, got -1" in proc.stderr and "Traceback" not in proc.stderr


def test_a_recipe_path_that_is_a_directory_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "mine.yaml").write_text("name: x\n")
    assert main(["validate", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {tmp_path}: is a directory, not a recipe; give the recipe's YAML file (mine.yaml)"


@pytest.mark.slow
@pytest.mark.parametrize("quiet", [True, False])
def test_progress_bars_stay_out_of_quiet_runs_and_logs(micro_recipe_file: Path, quiet: bool) -> None:
    """stderr is a pipe here, as when output goes to a log: -q prints no bar; without -q a bar appears only
    after it has run for 30 s (none in this seconds-long run), instead of a refresh every 0.1 s."""
    cmd = [sys.executable, "-m", "mergemix.cli", *(["-q"] if quiet else []), "propose", str(micro_recipe_file)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "\r" not in proc.stderr and "%|" not in proc.stderr, proc.stderr[-2000:]
    assert ("stage experts" in proc.stderr) != quiet  # the log itself is still there without -q


def test_fp16_on_cpu_is_one_line_before_any_training(micro_recipe_file: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-q", "propose", str(micro_recipe_file), "experts.precision=fp16"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: experts.precision: fp16 needs a CUDA GPU (float16 autocast and its loss scaler); "
                   "use bf16 or fp32 on CPU")
    assert not (micro_recipe_file.parent / "run").exists()
