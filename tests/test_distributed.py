"""A real multi-process launch on CPU (accelerate launch, gloo): data-parallel experts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.slow


def _run(cmd: list[str]) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": "29533"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout + done.stderr


def test_two_process_expert_equals_one_process(micro_recipe_file: Path, tmp_path: Path) -> None:
    """The same global batch split over 2 processes (each accumulating 2 micro-batches) gives the
    1-process expert's weights to float rounding, and only the main process writes the expert."""
    one, two = tmp_path / "one", tmp_path / "two"
    cmd = ["-m", "mergemix", "experts", str(micro_recipe_file)]
    _run([sys.executable, *cmd, f"run_dir={one}", "--domain", "math"])
    accelerate = str(Path(sys.executable).parent / "accelerate")
    # accelerate's --cpu launches one process unless mpirun is set up; --multi_gpu starts torch.distributed.run,
    # which on a machine without CUDA (or with device: cpu in the recipe) trains on CPU over gloo
    log = _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29533",
                *cmd, f"run_dir={two}", "experts.micro_batch_size=2", "--domain", "math"])
    assert log.count("stage experts ...") == 2  # two processes ran the stage
    assert log.count("expert math: 6 steps") == 1  # logged by the process that saves, after saving
    files = sorted(p.name for p in (one / "experts" / "math").iterdir())
    assert sorted(p.name for p in (two / "experts" / "math").iterdir()) == files
    a = load_file(str(one / "experts" / "math" / "model.safetensors"))
    b = load_file(str(two / "experts" / "math" / "model.safetensors"))
    assert a.keys() == b.keys()
    for n in a:
        torch.testing.assert_close(b[n], a[n], rtol=1e-4, atol=1e-5, msg=n)
