"""Every script in examples/ runs, at micro size, as a user would run it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from mergemix.recipe import load_recipe

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(*args: str) -> str:
    done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == ["experts_from_your_own_loop.py",
                                                             "train_on_the_mixture.py"]


def test_experts_from_your_own_loop(micro_recipe_file: Path, tmp_path: Path) -> None:
    out = _run(str(EXAMPLES / "experts_from_your_own_loop.py"), str(micro_recipe_file), "--steps", "2",
               "--out", str(tmp_path / "mine"))
    assert "Proposed mixture" in out
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["code", "math", "prose"]
    run = load_recipe(micro_recipe_file).resolved_run_dir()
    assert not (run / "experts").exists()  # mergemix trained none of them


def test_train_on_the_mixture(micro_recipe_file: Path, tmp_path: Path) -> None:
    _run("-m", "mergemix", "-q", "propose", str(micro_recipe_file))
    out = _run(str(EXAMPLES / "train_on_the_mixture.py"), str(micro_recipe_file), "--steps", "2",
               "--batch-size", "2", "--out", str(tmp_path / "trained"))
    assert "mid-trained on the proposed mixture for 2 steps" in out
    assert (tmp_path / "trained" / "config.json").exists()
