"""End to end: the whole pipeline on the micro recipe (real training, merging and scoring)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from mergemix import Proposal, load_recipe, propose
from mergemix.artifacts import read_jsonl, stable_hash
from mergemix.model.modeling import fingerprint
from mergemix.run.experts import general_probs, train_experts
from mergemix.run.scoring import open_scoring
from mergemix.run.workspace import open_workspace

pytestmark = pytest.mark.slow


def test_propose_writes_artifacts_and_reuses_experts(micro_recipe_file: Path,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    recipe = load_recipe(micro_recipe_file)
    with caplog.at_level(logging.WARNING, logger="mergemix.pipelines.propose"):
        proposal = propose(recipe)
    run = recipe.resolved_run_dir()
    assert isinstance(proposal, Proposal)

    # ratios on the simplex; tokens add up to the budget
    assert sum(proposal.alpha_star.values()) == pytest.approx(1.0, abs=1e-5)
    assert all(v >= 0 for v in proposal.alpha_star.values())
    assert sum(s.tokens for s in proposal.mixture) == pytest.approx(recipe.mixture.total_tokens, abs=3)
    assert [s.domain for s in proposal.mixture] == ["math", "prose", "code"]

    # trials: the base, 8 seeds, 2 verified candidates; each with per-benchmark scores and an objective
    trials = read_jsonl(run / "trials.jsonl")
    kinds = [t["kind"] for t in trials]
    assert kinds.count("base") == 1 and kinds.count("vertex") == 3 and kinds.count("verify") == 2
    assert len(trials) == 1 + 8 + 2
    for t in trials:
        assert set(t["raw"]) == {"target", "math_heldout", "sums"}
        assert set(t["capabilities"]) == {"coding", "math"}
    # the proposal is the best evaluated mixture, scored no worse than the baselines
    best = max(trials, key=lambda t: t["objective"])
    assert proposal.proposal.objective == pytest.approx(best["objective"], abs=1e-6)
    assert proposal.proposal.objective >= proposal.baselines["uniform"].objective
    assert proposal.baselines["base"].objective == pytest.approx(0.0, abs=1e-9)
    # the guard: the margin over each baseline, its 95% interval from item noise, and what the surrogate said
    margins = {m.baseline: m for m in proposal.margins}
    for label, key in (("uniform", "uniform"), ("token-proportional", "token_prior")):
        m = margins[label]
        assert m.verified == pytest.approx(proposal.proposal.objective - proposal.baselines[key].objective, abs=1e-5)
        assert m.low < m.verified < m.high and m.within_noise == (m.low <= 0)
        assert m.predicted == pytest.approx(proposal.proposal.predicted - proposal.baselines[key].objective, abs=1e-5)
        assert m.line() in proposal.table()

    # the experts replayed 25% general data: every alpha is a mixture, scored by the merge at
    # (alpha - 0.25 p) / 0.75; the search's score of alpha* is that merge's, and the gradient path merges alike
    ws = open_workspace(recipe)
    s = open_scoring(ws, train_experts(recipe, ws.model, ws.base_hash, ws.blocks, run, reuse_only=True))
    names = recipe.domain_names
    p = general_probs(ws.blocks, names)
    weights = [(proposal.alpha_star[d] - 0.25 * p[i]) / 0.75 for i, d in enumerate(names)]
    star_trial = next(t for t in trials if t["alpha"] == proposal.alpha_star)
    assert s.evaluate_alpha(proposal.alpha_star) == star_trial["raw"]
    mapped = {n: t.detach().clone() for n, t in ws.model.state_dict().items()}
    s.merger.apply(weights)
    assert all(torch.equal(mapped[n], t) for n, t in ws.model.state_dict().items())
    s.merger.apply(list(proposal.alpha_star.values()))  # alpha* as merge weights: another model
    assert not all(torch.equal(mapped[n], t) for n, t in ws.model.state_dict().items())
    grad_state = s.differentiable().merged_state(torch.tensor([proposal.alpha_star[d] for d in names]))
    assert all(torch.allclose(grad_state[n], mapped[n], atol=1e-6) for n in grad_state)
    # a domain left out is flagged (here the micro search leaves some out)
    absent = [d for d in names if proposal.alpha_star[d] < 0.01]
    assert (f"alpha* leaves out {', '.join(absent)} (below 1%)" in caplog.text) == bool(absent)
    assert proposal.merge_weights == pytest.approx(dict(zip(names, weights, strict=True)), abs=1e-6)
    assert "scored by the merge at weights" in proposal.table()
    s.merger.restore()

    on_disk = json.loads((run / "proposal.json").read_text())
    assert Proposal.model_validate(on_disk) == proposal
    assert (run / "recipe.resolved.yaml").exists()
    for d in recipe.domain_names:
        manifest = json.loads((run / "experts" / d / "manifest.json").read_text())
        assert manifest["steps"] == 6 and manifest["replay"] == 0.25 and len(manifest["loss_curve"]) == 6
        assert not list((run / "experts" / d).glob("checkpoint-*"))

    # a second run reuses the experts (files untouched) and every trial (the log does not grow)
    mtimes = {d: (run / "experts" / d / "model.safetensors").stat().st_mtime_ns for d in recipe.domain_names}
    again = propose(recipe)
    assert again == proposal
    assert mtimes == {d: (run / "experts" / d / "model.safetensors").stat().st_mtime_ns for d in recipe.domain_names}
    assert len(read_jsonl(run / "trials.jsonl")) == len(trials)


def test_same_recipe_and_seed_give_the_same_proposal(micro_recipe_file: Path, tmp_path: Path) -> None:
    raw: dict[str, Any] = yaml.safe_load(micro_recipe_file.read_text())
    outputs = []
    for i in range(2):
        raw["run_dir"] = str(tmp_path / f"run{i}")
        path = tmp_path / f"r{i}.yaml"
        path.write_text(yaml.safe_dump(raw))
        propose(load_recipe(path))
        outputs.append((tmp_path / f"run{i}" / "proposal.json").read_bytes())
    assert outputs[0] == outputs[1]


def test_a_finished_search_is_read_again_and_a_change_searches_again(
        micro_recipe_file: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    from mergemix.run.scoring import ScoringSession

    recipe = load_recipe(micro_recipe_file)
    propose(recipe)
    run = recipe.resolved_run_dir()
    proposal, stored = (run / "proposal.json").read_bytes(), json.loads((run / "search.json").read_text())

    def no_merge(self: Any, alpha: dict[str, float]) -> Any:
        raise AssertionError(f"the search merged {alpha} again")

    with monkeypatch.context() as m, caplog.at_level(logging.INFO, logger="mergemix.pipelines.propose"):
        m.setattr(ScoringSession, "evaluate_alpha", no_merge)
        propose(recipe)
    assert "holds the result of this search" in caplog.text
    assert (run / "proposal.json").read_bytes() == proposal
    # another objective is another search (its trials come from the log)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="mergemix.pipelines.propose"):
        propose(load_recipe(micro_recipe_file, ["evaluation.weights={coding: 2.0}"]))
    assert "holds the result of this search" not in caplog.text
    assert json.loads((run / "search.json").read_text())["key"] != stored["key"]


def test_killed_search_resumes_from_the_trial_log(micro_recipe_file: Path) -> None:
    recipe = load_recipe(micro_recipe_file)
    first = propose(recipe)
    log = recipe.resolved_run_dir() / "trials.jsonl"
    lines = log.read_text().splitlines(keepends=True)
    # a run killed after six trials, in the middle of writing the seventh (before the result was stored)
    log.write_text("".join(lines[:6]) + lines[6][:40])
    (recipe.resolved_run_dir() / "search.json").unlink()
    assert propose(recipe) == first
    trials = read_jsonl(log)
    assert len(trials) == len(lines)
    assert [t["alpha"] for t in trials[:6]] == [json.loads(x)["alpha"] for x in lines[:6]]


def test_a_local_hugging_face_checkpoint_as_base(micro_recipe_file: Path, tiny_lm: tuple[Any, Any],
                                                 tmp_path: Path) -> None:
    from mergemix.model.modeling import save_checkpoint_dir

    model, tok = tiny_lm
    save_checkpoint_dir(model, tok, tmp_path / "hf-base")
    raw = yaml.safe_load(micro_recipe_file.read_text())
    raw["base"] = {"path": str(tmp_path / "hf-base")}
    raw["data"]["split"] = {"heldout": 0.15, "base": 0.0}  # nothing is pre-trained here
    raw["data"]["seq_len"] = 16
    micro_recipe_file.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(micro_recipe_file)
    proposal = propose(recipe)
    assert sum(proposal.alpha_star.values()) == pytest.approx(1.0, abs=1e-5)
    manifest = json.loads((recipe.resolved_run_dir() / "experts" / "math" / "manifest.json").read_text())
    assert manifest["base_hash"] == stable_hash([fingerprint(tmp_path / "hf-base"), "float32"])
    assert not (tmp_path / "cache" / "bases").exists()  # no demo base was built


def test_a_directory_that_is_no_checkpoint_is_explained(micro_recipe_file: Path, tmp_path: Path) -> None:
    from mergemix import MergemixError

    with pytest.raises(MergemixError, match=r"base.path: .* is not a Hugging Face model directory"):
        propose(load_recipe(micro_recipe_file, [f"base.path={tmp_path}"]))


def test_fingerprint_tells_same_shape_checkpoints_apart(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    import copy

    import torch

    from mergemix.model.modeling import save_checkpoint_dir

    model, tok = tiny_lm
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    save_checkpoint_dir(model, tok, tmp_path / "a")
    save_checkpoint_dir(other, tok, tmp_path / "b")
    save_checkpoint_dir(model, tok, tmp_path / "c")
    assert fingerprint(tmp_path / "a") != fingerprint(tmp_path / "b")
    assert fingerprint(tmp_path / "a") == fingerprint(tmp_path / "c")


def test_reweighting_the_objective_reuses_every_merge(micro_recipe_file: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from mergemix.evaluate import Evaluator

    first = propose(load_recipe(micro_recipe_file))
    log = load_recipe(micro_recipe_file).resolved_run_dir() / "trials.jsonl"
    n_first = len(read_jsonl(log))

    calls = []
    score = Evaluator.__call__
    monkeypatch.setattr(Evaluator, "__call__", lambda self, model, share=None: calls.append(1) or score(self, model))
    second = propose(load_recipe(micro_recipe_file, ["evaluation.weights.coding=0"]))

    # the base and the 8 seeds come from the log; only verification candidates new to this objective
    # (at most search.verify = 2) are merged and scored
    assert len(calls) <= 2
    assert second.baselines["uniform"].capabilities == first.baselines["uniform"].capabilities
    assert second.baselines["uniform"].objective == pytest.approx(first.baselines["uniform"].capabilities["math"])
    # each reused trial is logged again with the new objective; the last line per mixture counts
    trials = read_jsonl(log)
    assert len(trials) >= n_first + 9
    assert {t["objective_key"] for t in trials[n_first:]} != {t["objective_key"] for t in trials[:n_first]}


def test_experts_as_separate_jobs_are_hugging_face_checkpoints(micro_recipe_file: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    """`mergemix experts --domain` trains that expert only, as a directory transformers opens as it is;
    propose reuses it, and trains again an expert in the older weights-only layout."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergemix.cli import main
    from mergemix.run.experts import Expert

    assert main(["-q", "experts", str(micro_recipe_file), "--domain", "math", "--domain", "prose"]) == 0
    experts = micro_recipe_file.parent / "run" / "experts"
    assert sorted(p.name for p in experts.iterdir()) == ["math", "prose"]
    manifest = json.loads((experts / "math" / "manifest.json").read_text())
    assert manifest["kind"] == "full" and manifest["dtype"] == "float32"
    model = AutoModelForCausalLM.from_pretrained(experts / "math", local_files_only=True)
    tok = AutoTokenizer.from_pretrained(experts / "math", local_files_only=True)
    ids = tok("12 + 7 = 19", return_tensors="pt").input_ids
    assert torch.isfinite(model(input_ids=ids, labels=ids).loss)
    state = Expert("math", experts / "math", manifest["key"], manifest).state()
    params = dict(model.named_parameters())
    assert set(state) == set(params)
    for n, p in params.items():
        torch.testing.assert_close(state[n], p.detach(), msg=n)

    mtime = (experts / "math" / "model.safetensors").stat().st_mtime_ns
    old = json.loads((experts / "prose" / "manifest.json").read_text())
    del old["kind"]  # as written before experts were Hugging Face directories
    (experts / "prose" / "manifest.json").write_text(json.dumps(old))
    (experts / "prose" / "config.json").unlink()
    with caplog.at_level("INFO"):
        propose(load_recipe(micro_recipe_file))
    assert "expert math: reusing" in caplog.text
    assert "expert prose: " in caplog.text and "older layout without config or tokenizer" in caplog.text
    assert (experts / "math" / "model.safetensors").stat().st_mtime_ns == mtime
    for d in ("math", "prose", "code"):
        assert json.loads((experts / d / "manifest.json").read_text())["kind"] == "full"
        assert (experts / d / "config.json").is_file() and (experts / d / "tokenizer.json").is_file()


def test_experts_unknown_domain_is_one_line(micro_recipe_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mergemix.cli import main

    assert main(["experts", str(micro_recipe_file), "--domain", "maths"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --domain: no domain 'maths' in the recipe "
                                               "(domains: math, prose, code)")
    assert not (micro_recipe_file.parent / "run").exists()


def test_a_noise_only_benchmark_is_flagged_and_dropped(micro_recipe_file: Path, tmp_path: Path) -> None:
    """A multiple-choice benchmark that holds no information: every item comes twice, once with each option
    right, so every model's mean score is 0 up to rounding while its items vary. Its spread over base and
    experts lies within its item noise, and it leaves the objective before the search."""
    import random

    rng = random.Random(7)
    noise = tmp_path / "coin.jsonl"
    with open(noise, "w") as f:
        for _ in range(30):
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            for answer in (0, 1):
                f.write(json.dumps({"question": f"{a} + {b} =", "choices": [str(a + b), str(a + b + 1)],
                                    "answer": answer}) + "\n")
    raw = yaml.safe_load(micro_recipe_file.read_text())
    raw["evaluation"]["benchmarks"].append(
        {"name": "coin", "kind": "multiple_choice", "path": str(noise), "capability": "math"})
    micro_recipe_file.write_text(yaml.safe_dump(raw))
    proposal = propose(load_recipe(micro_recipe_file))
    signal = {s.benchmark: s for s in proposal.signal}
    assert signal["coin"].low_signal and signal["coin"].weight == 0.0
    assert signal["coin"].spread < 0.01 * signal["coin"].stderr
    assert not signal["target"].low_signal and signal["target"].weight == 1.0
    assert "LOW SIGNAL" in proposal.signal_table()
    # math weighs by the share of its benchmarks that can rank merges; the objective ignores coin
    kept = [s for s in proposal.signal if s.benchmark in ("math_heldout", "sums")]
    assert proposal.weights["math"] == pytest.approx(sum(s.weight for s in kept) / 3)
    on_disk = json.loads((load_recipe(micro_recipe_file).resolved_run_dir() / "proposal.json").read_text())
    assert on_disk["signal"][-1]["low_signal"] is True


def test_a_scoring_precision_the_device_lacks_is_refused_before_anything_runs(micro_recipe_file: Path) -> None:
    from mergemix.errors import MergemixError

    recipe = load_recipe(micro_recipe_file, ["evaluation.precision=fp16"])
    with pytest.raises(MergemixError, match=r"^evaluation.precision: fp16 needs a CUDA GPU"):
        propose(recipe)
    assert not (recipe.resolved_run_dir() / "experts").exists()
