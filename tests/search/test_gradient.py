"""Learnable merging: the differentiable objective, the projection, and the gradient strategy end to end."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml

from mergemix import load_recipe, propose
from mergemix.artifacts import read_jsonl
from mergemix.errors import MergemixError
from mergemix.evaluate import EvalContext, Objective
from mergemix.evaluate.differentiable import GradientObjective
from mergemix.evaluate.kinds import MultipleChoice, Perplexity
from mergemix.feasible import Bounds
from mergemix.merge import InPlaceMerger
from mergemix.recipe import BenchmarkSpec, EvalSpec, recipe_from_dict
from mergemix.search.gradient import project


def test_projection_is_feasible_exact_and_differentiable() -> None:
    b = Bounds.build(["a", "b", "c", "d"], {"d": 0.05}, {"a": 0.2}, {"b": 0.3})
    rng = np.random.default_rng(0)
    for x in rng.dirichlet(np.ones(4), size=50):
        z = torch.tensor(x, requires_grad=True)
        a = project(z, b)
        np.testing.assert_allclose(a.detach().numpy(), b.project(x)[0], atol=1e-9)
        assert b.contains(a.detach().numpy())
        (a * torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=a.dtype)).sum().backward()
        assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad[1] == 0  # pinned: constant
    free = Bounds.build(["a", "b", "c"], {}, {}, {})
    x = torch.tensor([0.2, 0.3, 0.5], requires_grad=True)
    torch.testing.assert_close(project(x, free), x)  # inside the bounds: the identity


def test_differentiable_estimate_equals_the_scorer(tiny_lm: tuple[Any, Any], tmp_path: Path) -> None:
    """At any α the estimate on all items is the objective the real merge + evaluation gives."""
    base, tok = tiny_lm
    model = copy.deepcopy(base)
    ctx = EvalContext(tok, 16, {}, tmp_path, 4, 0)
    (tmp_path / "p.txt").write_text("the quick brown fox jumps over the lazy dog 0 1 2 3\n" * 20)
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(x) + "\n" for x in [
        {"question": "the quick brown", "choices": ["fox", "dog jumps", "0"], "answer": 0},
        {"question": "1 + 2 =", "choices": ["3", "4 4 4 4", "5", "lazy"], "answer": 2},
        {"question": "over the", "choices": ["lazy dog", "quick"], "answer": 1}]))
    specs = [BenchmarkSpec(name="ppl", kind="perplexity", path=str(tmp_path / "p.txt"), capability="a"),
             BenchmarkSpec(name="mc", kind="multiple_choice", path=str(tmp_path / "mc.jsonl"), metric="score",
                           capability="b"),
             BenchmarkSpec(name="mc_margin", kind="multiple_choice", path=str(tmp_path / "mc.jsonl"),
                           metric="margin", capability="b")]
    benches = {s.name: cls(s, ctx, cls.read(s, tmp_path))
               for s, cls in zip(specs, [Perplexity, MultipleChoice, MultipleChoice], strict=True)}
    torch.manual_seed(1)
    experts = [{n: p.detach() + 0.05 * torch.randn_like(p) for n, p in model.named_parameters()} for _ in range(3)]
    merger = InPlaceMerger(model, experts)

    def raw(alpha: list[float]) -> dict[str, dict[str, float]]:
        merger.apply(alpha)
        with torch.no_grad():
            return {n: b.score(model) for n, b in benches.items()}

    objective = Objective.from_references(EvalSpec(benchmarks=specs, weights={"a": 2.0, "b": 1.0}),
                                          raw([0, 0, 0]), [raw(list(np.eye(3)[k])) for k in range(3)])
    estimate = GradientObjective(benches, model, merger.merged_state)
    estimate.prepare(objective)
    alpha = [0.2, 0.5, 0.3]
    want = objective(raw(alpha))[2]
    merger.restore()
    a = torch.tensor(alpha, requires_grad=True)
    got = estimate(a, 0, torch.Generator().manual_seed(0))
    assert got.item() == pytest.approx(want, abs=1e-4)
    got.backward()
    assert a.grad is not None and torch.isfinite(a.grad).all() and a.grad.abs().sum() > 0
    for n, p in model.named_parameters():  # called functionally: the model is left as it was
        torch.testing.assert_close(p, dict(base.named_parameters())[n])


def test_a_bad_gradient_field_is_refused_in_one_line(micro_recipe_file: Path) -> None:
    for override, field in (("search.gradient_steps=0", "gradient_steps"), ("search.gradient_lr=-1", "gradient_lr"),
                            ("search.gradient_start=best_guess", "gradient_start")):
        with pytest.raises(MergemixError) as e:
            load_recipe(micro_recipe_file, [override])
        assert field in str(e.value) and "\n" not in str(e.value)


def _gradient_recipe(micro_recipe_file: Path, **mixture: Any) -> Path:
    """The micro recipe searched by `gradient` on held-out loss only (a fully differentiable objective)."""
    r = yaml.safe_load(micro_recipe_file.read_text())
    r["evaluation"]["benchmarks"] = [b for b in r["evaluation"]["benchmarks"] if b["kind"] == "perplexity"]
    r["search"].update(strategy="gradient", gradient_steps=12, gradient_lr=0.3, gradient_batch=0, gradient_verify=3)
    r["mixture"].update(mixture)
    path = micro_recipe_file.with_name(f"gradient-{len(mixture)}.yaml")
    path.write_text(yaml.safe_dump(r))
    return path


def test_auto_strategy_is_gradient_only_where_it_can_run(micro_recipe_file: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from mergemix.pipelines import propose

    recipe = load_recipe(_gradient_recipe(micro_recipe_file), ["search.strategy=auto"])
    model = propose.open_workspace(recipe).model
    assert propose.choose_strategy(recipe.evaluation, model, staged=False) == "gradient"
    # mixture.groups: gradient searches flat shares
    assert propose.choose_strategy(recipe.evaluation, model, staged=True) == "surface"
    need = 8 * sum(p.numel() for p in model.parameters())  # fp32 merged parameters and their gradients
    with monkeypatch.context() as m:  # too little memory for them
        m.setattr(propose, "free_memory", lambda device: need - 1)
        assert propose.choose_strategy(recipe.evaluation, model, staged=False) == "surface"
        # a sharded search holds each process's rows of them: half in a launch of 2
        m.setenv("WORLD_SIZE", "2")
        assert propose.choose_strategy(recipe.evaluation, model, staged=False, sharded=True) == "gradient"
        m.setattr(propose, "free_memory", lambda device: need // 2 - 1)
        assert propose.choose_strategy(recipe.evaluation, model, staged=False, sharded=True) == "surface"
    # a weighted benchmark without a gradient (generation) would be left out of the descent: surface
    gen = tmp_path / "gen.jsonl"
    gen.write_text("".join(json.dumps({"question": f"{i} + 1 =", "answer": str(i + 1)}) + "\n" for i in range(4)))
    r = yaml.safe_load(_gradient_recipe(micro_recipe_file).read_text())
    r["evaluation"]["benchmarks"].append({"name": "sums_gen", "kind": "generation", "path": str(gen),
                                          "capability": "gen", "shots": 0})
    r["search"]["strategy"] = "auto"
    assert propose.choose_strategy(recipe_from_dict(r).evaluation, model, staged=False) == "surface"
    r["evaluation"]["weights"] = {"gen": 0}
    assert propose.choose_strategy(recipe_from_dict(r).evaluation, model, staged=False) == "gradient"


@pytest.mark.slow
def test_gradient_improves_heldout_loss_and_keeps_the_bounds(micro_recipe_file: Path) -> None:
    recipe = load_recipe(_gradient_recipe(micro_recipe_file), ["search.strategy=auto"])  # auto: gradient here
    proposal = propose(recipe)
    assert proposal is not None and proposal.strategy == "gradient"
    trials = read_jsonl(recipe.resolved_run_dir() / "trials.jsonl")
    start = next(t for t in trials if t["kind"] == "token_prior")  # the start point: the token prior
    path = [t for t in trials if t["kind"] == "gradient"]
    assert 1 <= len(path) <= 3  # the start point is a reference, scored already
    assert path[-1]["objective"] > start["objective"]  # the end of the descent, really merged and evaluated
    assert proposal.proposal.objective >= path[-1]["objective"] - 1e-6
    assert proposal.alpha_star in [t["alpha"] for t in trials]  # α* is a verified point

    # the same experts under a max share and a pin: every point of the descent is feasible
    bounded = load_recipe(_gradient_recipe(micro_recipe_file, max_share={"code": 0.65}, pinned={"prose": 0.3}))
    proposal = propose(bounded)
    assert proposal is not None
    path = [t for t in read_jsonl(bounded.resolved_run_dir() / "trials.jsonl")
            if t["kind"] == "gradient" and t["alpha"]["prose"] == pytest.approx(0.3, abs=1e-6)]
    assert len(path) >= 2  # the feasible start point and the end point
    for t in path:
        assert t["alpha"]["code"] <= 0.65 + 1e-6 and sum(t["alpha"].values()) == pytest.approx(1, abs=1e-5)
    star = proposal.alpha_star
    assert star["prose"] == pytest.approx(0.3, abs=1e-6) and star["code"] <= 0.65 + 1e-6
    assert star in [t["alpha"] for t in path]  # the references lie outside these bounds
