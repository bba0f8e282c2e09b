"""The GPU check's script (benchmarks/gpu_check.py), dry-run on CPU with a 2-layer model: a session lent a
GPU runs it as it is, so it must not rot between such sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_gpu_check_runs_every_check_and_saves_a_loadable_model(tmp_path: Path) -> None:
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--small",
                           "--steps", "1", "--repeats", "1", "--save", str(tmp_path / "base"),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FAILED" not in done.stdout, done.stdout
    figures = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert figures["train"]["fp32 tokens/s"] > 0 and figures["train"]["bf16 tokens/s"] > 0
    assert figures["merge"]["parameters"] > 0 and figures["merge"]["merge GB/s"] > 0
    from mergemix.model.modeling import load_base

    model, tokenizer = load_base(tmp_path / "base")  # what scoring_speed.py --base reads
    assert model.config.num_hidden_layers == 2 and tokenizer.eos_token_id is not None
