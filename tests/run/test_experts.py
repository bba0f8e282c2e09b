"""Experts: reuse, and a reused expert checked against the base."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mergemix import load_recipe
from mergemix.run.experts import train_experts
from mergemix.run.workspace import open_workspace

pytestmark = pytest.mark.slow


def test_a_replaced_expert_file_is_trained_again_with_one_line(
    micro_recipe_file: Path, caplog: pytest.LogCaptureFixture
) -> None:
    recipe = load_recipe(micro_recipe_file)
    ws = open_workspace(recipe)
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
    assert warnings[0].startswith(f"expert {first[0].domain}: {first[0].path} does not match the base: tensor {name} has "
                                  "shape [3, 5], the base's is ")
    assert warnings[0].endswith("training it again")
    # retrained to the same weights (training is deterministic); nothing else in the directory
    assert [e.key for e in again] == [e.key for e in first]
    retrained = load_file(str(path))
    assert all(torch.equal(retrained[n], trained[n]) for n in trained)
    assert not [p.name for p in first[0].path.iterdir() if p.name.startswith("checkpoint")]


def test_the_expert_key_changes_with_lora_and_only_then(micro_recipe_file: Path) -> None:
    """Full experts keep the key they had before `experts.lora`, `checkpoints` and `replay_proportions` existed;
    LoRA settings change it."""
    from types import SimpleNamespace

    from mergemix.artifacts import stable_hash
    from mergemix.run.experts import _seed, expert_key, precision_key

    recipe = load_recipe(micro_recipe_file)
    blocks: Any = {d: SimpleNamespace(content_hash=f"h-{d}") for d in recipe.domain_names}
    spec = recipe.experts
    before = spec.model_dump(mode="json", exclude={"steps", "tokens", "checkpoint_every", "lora", "checkpoints",
                                                   "replay_proportions", *spec.train_fields()})
    data = ["h-math"] + [f"h-{d}" for d in sorted(blocks)]  # replay 0.25 mixes every domain in
    assert expert_key(recipe, "b", blocks, "math") == stable_hash(
        ["b", data, before, spec.num_steps(recipe.data.seq_len), recipe.data.seq_len, _seed(recipe.seed, "math"),
         "math", *precision_key(recipe)])
    keys = {expert_key(load_recipe(micro_recipe_file, extra), "b", blocks, "math")
            for extra in ([], ["experts.lora.r=8"], ["experts.lora.r=4"], ["experts.lora.target_modules=[q_proj]"])}
    assert len(keys) == 4


def test_lora_experts_are_peft_adapters_and_propose_runs_end_to_end(micro_recipe_file: Path, tmp_path: Path) -> None:
    """experts.lora: each expert is a peft adapter directory (manifest last, kind lora) that peft loads; the
    search merges them; a second run reuses them; the exported merge equals peft's merge of the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from mergemix import propose
    from mergemix.artifacts import read_json, read_jsonl
    from mergemix.pipelines.export import MERGEKIT_YAML, export

    # without replay the mixture code=1 is merged at weight 1 on the code adapter: the expert itself
    recipe = load_recipe(micro_recipe_file, ["experts.lora.r=4", "experts.lora.alpha=8", "experts.lr=1e-2",
                                             "experts.replay=0"])
    proposal = propose(recipe)
    assert proposal is not None
    run = recipe.resolved_run_dir()
    for d in recipe.domain_names:
        folder = run / "experts" / d
        manifest = read_json(folder / "manifest.json")
        assert manifest["kind"] == "lora" and manifest["lora"]["r"] == 4 and len(manifest["loss_curve"]) == 6
        assert (folder / "adapter_model.safetensors").exists() and not (folder / "model.safetensors").exists()
    trials = read_jsonl(run / "trials.jsonl")
    base_score = next(t["objective"] for t in trials if t["kind"] == "base")
    assert any(t["objective"] != base_score for t in trials if t["kind"] == "vertex")  # the adapters act
    adapter = run / "experts" / "code" / "adapter_model.safetensors"
    mtime = adapter.stat().st_mtime_ns
    assert propose(recipe) == proposal
    assert adapter.stat().st_mtime_ns == mtime

    exported = export(run, "code=1", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(exported.path, dtype=torch.float32)
    ws = open_workspace(recipe)
    reference = PeftModel.from_pretrained(ws.model, run / "experts" / "code").merge_and_unload()
    want = dict(reference.named_parameters())
    for n, p in merged.named_parameters():
        torch.testing.assert_close(p, want[n], rtol=1e-5, atol=1e-6)
    config = yaml.safe_load((exported.path / MERGEKIT_YAML).read_text())
    assert config["models"][2]["model"].endswith(f"+{(run / 'experts' / 'code').resolve()}")
