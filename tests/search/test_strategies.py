"""Strategies, the stick-breaking space, and the shared optuna study across real processes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from mergemix import load_recipe, propose
from mergemix.artifacts import read_jsonl
from mergemix.feasible import Bounds
from mergemix.search.space import SimplexMap
from mergemix.search.strategies import _compositions
from mergemix.search.trials import alpha_key


def test_stick_breaking_cube_maps_into_the_feasible_set_and_back() -> None:
    b = Bounds.build(["a", "b", "c", "d"], {"d": 0.05}, {"a": 0.4}, {"b": 0.25})
    space = SimplexMap(b)
    assert space.names == ["u0", "u1"]  # 3 free domains: 2 coordinates, no redundant direction
    rng = np.random.default_rng(0)
    for u in rng.random((200, 2)):
        a = space.to_alpha(list(u))
        assert b.contains(a) and a[1] == pytest.approx(0.25)
        np.testing.assert_allclose(space.to_alpha(space.to_cube(a)), a, atol=1e-9)
    # unconstrained: uniform cube points are uniform on the simplex (mean 1/K)
    free = SimplexMap(Bounds.build(["a", "b", "c"], {}, {}, {}))
    mean = np.mean([free.to_alpha(list(u)) for u in rng.random((4000, 2))], axis=0)
    np.testing.assert_allclose(mean, 1 / 3, atol=0.02)


def test_grid_compositions() -> None:
    points = _compositions(4, 3)
    assert len(points) == 15 and all(sum(p) == 4 for p in points) and len({tuple(p) for p in points}) == 15


def _cli(recipe: Path, *args: str) -> subprocess.Popen[str]:
    """`mergemix -q search RECIPE [KEY=VALUE ...] [--flags]` in a process of its own."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    overrides = [a for a in args if "=" in a]
    flags = [a for a in args if "=" not in a]
    return subprocess.Popen([sys.executable, "-m", "mergemix.cli", "-q", "search", str(recipe), *overrides, *flags],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _study_trials(run: Path, strategy: str) -> list[dict]:
    import optuna

    storage = f"sqlite:///{run / 'study.db'}"
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)
             if s.study_name.startswith(f"micro-{strategy}-") and not s.study_name.endswith("/references")]
    assert len(names) == 1
    study = optuna.load_study(study_name=names[0], storage=storage)
    return [dict(t.user_attrs) for t in study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))]


@pytest.fixture
def trained(micro_recipe_file: Path) -> Path:
    """The micro recipe with its experts trained (and a surface search done) by propose."""
    propose(load_recipe(micro_recipe_file))
    return micro_recipe_file


@pytest.mark.slow
def test_a_killed_search_process_keeps_every_finished_trial(trained: Path) -> None:
    run = Path(yaml.safe_load(trained.read_text())["run_dir"])
    log = run / "trials.jsonl"
    proc = _cli(trained, "--strategy", "tpe", "--worker", "search.trials=16")
    deadline = time.monotonic() + 240
    while sum(r["kind"] == "tpe" for r in read_jsonl(log)) < 3:  # killed after three sampled trials
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = {alpha_key(r["alpha"]) for r in read_jsonl(log) if r["kind"] == "tpe"}
    rerun = _cli(trained, "--strategy", "tpe", "--worker", "search.trials=16")
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    done = _study_trials(run, "tpe")
    keys = [alpha_key(t["alpha"]) for t in done]
    assert before <= set(keys)  # every trial finished before the kill is in the study
    assert len(keys) == len(set(keys)) and len(done) >= 16 - 1  # one trial may have been in flight at the kill
    logged = [alpha_key(r["alpha"]) for r in read_jsonl(log)]
    assert len(logged) == len(set(logged))  # nothing scored twice


@pytest.mark.slow
def test_two_workers_share_one_study(trained: Path) -> None:
    run = Path(yaml.safe_load(trained.read_text())["run_dir"])
    workers = [_cli(trained, "--strategy", "tpe", "--worker", "search.trials=24") for _ in range(2)]
    for w in workers:
        out, err = w.communicate(timeout=300)
        assert w.returncode == 0, err
    done = _study_trials(run, "tpe")
    assert len({t["worker"] for t in done}) == 2  # both contributed
    keys = [alpha_key(t["alpha"]) for t in done]
    assert len(keys) == len(set(keys)) and 24 <= len(done) <= 25  # the union; no alpha evaluated twice
    logged = [alpha_key(r["alpha"]) for r in read_jsonl(run / "trials.jsonl")]
    assert len(logged) == len(set(logged)) and set(keys) <= set(logged)
    # a search (no --worker) over the finished study writes the proposal from the union
    final = _cli(trained, "--strategy", "tpe", "--json", "search.trials=24")
    out, err = final.communicate(timeout=300)
    assert final.returncode == 0, err
    proposal = json.loads(out)
    assert proposal["strategy"] == "tpe" and proposal["n_trials"] >= 24
