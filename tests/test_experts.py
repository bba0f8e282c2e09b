"""Experts: reuse, and a reused expert checked against the base."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergemix import load_recipe
from mergemix.experts import train_experts
from mergemix.pipeline import start

pytestmark = pytest.mark.slow


def test_a_replaced_expert_file_is_trained_again_with_one_line(
    micro_recipe_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = load_recipe(micro_recipe_file)
    ws = start(recipe)
    assert ws.model is not None
    first = train_experts(recipe, ws.model, ws.base_hash, ws.blocks, ws.run_dir)
    path = first[0].path / "model.safetensors"
    trained = load_file(str(path))
    # another architecture's weights under the same name: one tensor of another shape
    name = next(n for n, t in trained.items() if t.ndim == 2)
    save_file({**trained, name: torch.zeros(3, 5)}, str(path))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mergemix"):
        again = train_experts(recipe, ws.model, ws.base_hash, ws.blocks, ws.run_dir)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"expert {first[0].domain}: {path} does not match the base: tensor {name} has "
                                  "shape [3, 5], the base's is ")
    assert warnings[0].endswith("training it again")
    # retrained to the same weights (training is deterministic); a Hugging Face directory, no leftovers
    assert [e.key for e in again] == [e.key for e in first]
    retrained = load_file(str(path))
    assert all(torch.equal(retrained[n], trained[n]) for n in trained)
    files = sorted(p.name for p in first[0].path.iterdir())
    assert {"config.json", "manifest.json", "model.safetensors"} <= set(files)
    assert not [f for f in files if f.startswith((".", "checkpoint-"))]
