"""`mergemix ls` and `mergemix export`: the merged model loads, and mergekit's merge of the YAML equals it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from mergemix import load_recipe, propose
from mergemix.cli import main
from mergemix.pipelines.export import MERGEKIT_YAML


def test_ls_lists_every_registry(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["ls"]) == 0
    out = capsys.readouterr().out
    for line in ("merge method names:", "  ties ", "  dare_ties ", "benchmark kind names:", "surrogate names:",
                 "  lightgbm", "built-in corpus names:"):
        assert line in out
    assert "[metrics: score, acc, acc_norm, blank_ppl, margin]" in out


@pytest.mark.slow
def test_export_writes_a_loadable_model_and_the_same_merge_for_mergekit(
    micro_recipe_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoModelForCausalLM

    recipe = load_recipe(micro_recipe_file)
    proposal = propose(recipe)
    run = recipe.resolved_run_dir()

    assert main(["export", str(run), "--alpha", "nope=1"]) == 2
    assert "--alpha 'nope=1': expected proposal, best or DOMAIN=WEIGHT" in capsys.readouterr().err

    out = tmp_path / "merged"
    assert main(["export", str(run), "--alpha", "math=0.25,code=0.75", "--out", str(out)]) == 0
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    config = yaml.safe_load((out / MERGEKIT_YAML).read_text())
    assert config["merge_method"] == "task_arithmetic"
    # the micro experts replayed 25% general data (token proportions p): the mixture's merge weights are
    # (alpha - 0.25 p) / 0.75, so prose, left out, is a step away from its expert
    prior = proposal.baselines["token_prior"].alpha
    alpha = {"math": 0.25, "prose": 0.0, "code": 0.75}
    w = {d: (a - 0.25 * prior[d]) / 0.75 for d, a in alpha.items()}
    assert [Path(m["model"]).name for m in config["models"]] == ["math", "prose", "code"]
    assert [m["parameters"]["weight"] for m in config["models"]] == pytest.approx(list(w.values()), abs=1e-6)
    assert w["prose"] < 0
    from mergemix.artifacts import read_json, read_jsonl

    info = read_json(out / "mergemix.json")
    assert info["alpha"] == alpha and info["weights"] == pytest.approx(w, abs=1e-6)
    # the merge itself: the base plus the weighted task vectors
    from safetensors.torch import load_file

    base = AutoModelForCausalLM.from_pretrained(config["base_model"], dtype=torch.float32)
    experts = {Path(m["model"]).name: load_file(str(Path(m["model"]) / "model.safetensors"))
               for m in config["models"]}
    for n, p in base.named_parameters():
        want = p.detach() + sum(w[d] * (experts[d][n] - p.detach()) for d in alpha)
        torch.testing.assert_close(dict(model.named_parameters())[n].detach(), want, atol=1e-6, rtol=0)

    # mergekit, given the YAML, writes the same tensors
    pytest.importorskip("mergekit", reason="mergekit is a test extra: pip install 'mergemix[test]'")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge

    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mk"),
              MergeOptions(copy_tokenizer=False, write_model_card=False))
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "mk", dtype=torch.float32)
    mine = dict(model.named_parameters())
    for n, p in theirs.named_parameters():
        torch.testing.assert_close(mine[n].detach(), p.detach(), atol=1e-6, rtol=0)

    # the best-scoring trial's alpha
    assert main(["export", str(run), "--alpha", "best", "--out", str(tmp_path / "best")]) == 0
    best = max((t for t in read_jsonl(run / "trials.jsonl") if t["kind"] != "base"), key=lambda t: t["objective"])
    assert read_json(tmp_path / "best" / "mergemix.json")["alpha"] == {d: best["alpha"][d] for d in recipe.domain_names}

    # the proposal's alpha, by recipe file; the default directory is in the run
    assert main(["export", str(micro_recipe_file)]) == 0
    (folder,) = (run / "export").iterdir()
    assert folder.name.startswith("proposal-")
    assert yaml.safe_load((folder / MERGEKIT_YAML).read_text())["models"][0]["parameters"]["weight"] == \
        pytest.approx((proposal.alpha_star["math"] - 0.25 * prior["math"]) / 0.75, abs=1e-6)
