"""Experts trained elsewhere (experts.checkpoints): checked against the base before anything runs, merged like
mergemix's own, and alone or mixed with domains mergemix trains."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergemix.artifacts import read_jsonl
from mergemix.errors import MergemixError
from mergemix.pipelines.propose import propose
from mergemix.recipe import load_recipe

pytestmark = pytest.mark.slow
DOMAINS = ["math", "prose", "code"]


def _elsewhere(run: Path, root: Path, domains: list[str]) -> dict[str, str]:
    """Copies of a run's experts as another tool leaves them: Hugging Face directories, no manifest."""
    out = {}
    for d in domains:
        shutil.copytree(run / "experts" / d, root / d, ignore=shutil.ignore_patterns("manifest.json"))
        out[d] = str(root / d)
    return out


def _given(checkpoints: dict[str, str]) -> str:
    return "experts.checkpoints=" + json.dumps(checkpoints)


def test_experts_given_as_checkpoints_give_the_same_trials_and_proposal(micro_recipe_file: Path,
                                                                         tmp_path: Path) -> None:
    recipe = load_recipe(micro_recipe_file)
    own = propose(recipe)
    run = recipe.resolved_run_dir()
    given = _elsewhere(run, tmp_path / "elsewhere", DOMAINS)
    other = load_recipe(micro_recipe_file, [f"run_dir={tmp_path / 'given'}", _given(given)])
    assert propose(other) == own
    assert not (tmp_path / "given" / "experts").exists()  # nothing trained
    want = [(t["alpha"], t["raw"]) for t in read_jsonl(run / "trials.jsonl")]
    assert [(t["alpha"], t["raw"]) for t in read_jsonl(tmp_path / "given" / "trials.jsonl")] == want
    # one domain given (in bfloat16: cast when read), the others trained here
    half = load_file(str(tmp_path / "elsewhere" / "math" / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16) for k, v in half.items()}, str(tmp_path / "elsewhere" / "math" /
                                                                      "model.safetensors"))
    mixed = load_recipe(micro_recipe_file, [f"run_dir={tmp_path / 'mixed'}", _given({"math": given["math"]})])
    proposal = propose(mixed)
    assert sorted(p.name for p in (tmp_path / "mixed" / "experts").iterdir()) == ["code", "prose"]
    for d in ("code", "prose"):  # the experts trained here keep the keys they have without any given
        key = json.loads((tmp_path / "mixed" / "experts" / d / "manifest.json").read_text())["key"]
        assert key == json.loads((run / "experts" / d / "manifest.json").read_text())["key"]
    assert sum(proposal.alpha_star.values()) == pytest.approx(1.0, abs=1e-5)


def test_a_given_expert_that_cannot_merge_is_refused_in_one_line(micro_recipe_file: Path, tmp_path: Path) -> None:
    recipe = load_recipe(micro_recipe_file)
    propose(recipe)
    given = _elsewhere(recipe.resolved_run_dir(), tmp_path / "elsewhere", ["math"])
    state = load_file(str(Path(given["math"]) / "model.safetensors"))
    name = next(k for k, v in state.items() if v.ndim == 2)
    state[name] = torch.zeros(3, 5)  # another architecture's tensor under the same name
    save_file(state, str(Path(given["math"]) / "model.safetensors"))
    from peft import LoraConfig, get_peft_model

    from mergemix.model.modeling import build_demo_model
    from mergemix.recipe import DemoBaseSpec

    other_base = build_demo_model(DemoBaseSpec(hidden=48, layers=1, heads=2, ffn=64, vocab=300), 300, 32, 0, seed=0)
    get_peft_model(other_base, LoraConfig(r=2, target_modules="all-linear")).save_pretrained(tmp_path / "adapter")
    cases = [
        (str(tmp_path / "adapter"), r"^experts.checkpoints.math: .*adapter: .*the base's is .*; an expert must be "
                                    r"trained from this base"),
        (given["math"], rf"^experts.checkpoints.math: {given['math']}: tensor {name} has shape \[3, 5\], "
                        r"the base's is .*; an expert must be trained from this base"),
        (str(tmp_path / "nowhere"), r"^experts.checkpoints.math: .*nowhere: no such directory"),
    ]
    for path, pattern in cases:
        bad = load_recipe(micro_recipe_file, [f"run_dir={tmp_path / 'bad'}", _given({"math": path})])
        with pytest.raises(MergemixError, match=pattern) as err:
            propose(bad)
        assert "\n" not in str(err.value)
        assert not (tmp_path / "bad" / "experts").exists() and not (tmp_path / "bad" / "proposal.json").exists()
    with pytest.raises(MergemixError, match=r"experts.checkpoints: unknown domain cod \(domains: code, math, prose\)"):
        load_recipe(micro_recipe_file, [_given({"cod": given["math"]})])
