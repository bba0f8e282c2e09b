"""The package's imports run one way (mergemix.layers): a failing test names the import to remove."""

from __future__ import annotations

import subprocess
import sys

import pytest

from mergemix import layers


def test_every_import_runs_one_way_and_closes_no_circle() -> None:
    assert layers.problems() == []


def test_every_module_is_in_a_layer() -> None:
    for module in layers.graph():
        layers.layer_of(module)  # raises KeyError naming the module


def test_the_check_finds_an_import_up_a_layer_a_circle_and_a_stage_that_takes_the_recipe(
        monkeypatch: pytest.MonkeyPatch) -> None:
    graph = layers.graph()
    graph["mergemix.errors"] = [(1, "mergemix.recipe", ["Recipe"])]  # foundation → recipe: up a layer
    graph["mergemix.search.trials"] = [(1, "mergemix.search.driver", [])]  # driver → trials → driver: a circle
    graph["mergemix.merge.methods"] = [(1, "mergemix.recipe", ["MergeSpec", "Recipe"])]
    monkeypatch.setattr(layers, "graph", lambda: graph)
    found = layers.problems()
    assert any(p.startswith("mergemix.errors:1 imports mergemix.recipe, a higher layer") for p in found)
    circles = [set(p.removeprefix("circle: ").split(" <-> ")) for p in found if p.startswith("circle: ")]
    assert any({"mergemix.search.driver", "mergemix.search.trials"} <= c for c in circles)
    assert "mergemix.merge.methods:1 takes the whole Recipe; a stage takes its sub-specs" in found


def test_a_recipe_is_validated_without_importing_torch() -> None:
    code = ("import sys; from mergemix.recipe import load_recipe; load_recipe('recipes/demo.yaml'); "
            "print(sorted(m for m in ('torch', 'transformers', 'mergemix.evaluate', 'mergemix.merge') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
