from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from mergemix.errors import MergemixError
from mergemix.recipe import Recipe, dump_recipe, load_recipe, looks_like_test_split, recipe_from_dict

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").glob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)
    assert path.read_text().startswith("#"), "a shipped recipe opens with a comment giving its command"


def test_demo_recipe_has_four_domains_and_downstream_targets() -> None:
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "demo.yaml")
    assert recipe.domain_names == ["code", "prose", "math", "facts"]
    # the objective is scored on targets that are not training domains
    assert all(b.domain is None for b in recipe.evaluation.benchmarks)


def test_ledger_recipe_scores_a_target_that_is_no_training_domain() -> None:
    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "ledger.yaml")
    assert recipe.domain_names == ["calendar", "tables", "letters"]
    sources = {d.source for d in recipe.data.domains}
    benches = recipe.evaluation.benchmarks
    assert all(b.domain is None and b.path not in sources for b in benches)
    assert sum(b.kind == "multiple_choice" for b in benches) >= 2
    assert any(b.kind == "perplexity" for b in benches)


def test_smollm2_recipe_names_the_packaged_base_and_scores_no_training_domain() -> None:
    from mergemix.catalog import PACKAGED

    recipe = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "smollm2.yaml")
    assert recipe.base.path in PACKAGED  # a name, not a machine path
    assert recipe.data.split.base == 0  # nothing is pre-trained on a real model's data
    sources = {d.source for d in recipe.data.domains}
    assert all(b.domain is None and b.path not in sources for b in recipe.evaluation.benchmarks)
    assert recipe.experts.precision == "bf16" and recipe.report.seeds >= 2 and recipe.report.mixtures >= 8


def _write(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_unknown_key_names_file_field_and_suggestion(micro_recipe_file: Path) -> None:
    raw = yaml.safe_load(micro_recipe_file.read_text())
    raw["experts"]["learning_rate"] = 0.1
    path = _write(micro_recipe_file.parent, raw)
    with pytest.raises(MergemixError) as e:
        load_recipe(path)
    msg = str(e.value)
    assert str(path) in msg and "experts.learning_rate: unknown key" in msg


def test_did_you_mean_for_close_key(micro_recipe_file: Path) -> None:
    raw = yaml.safe_load(micro_recipe_file.read_text())
    raw["experts"]["replays"] = 0.1
    with pytest.raises(MergemixError, match=r"experts.replays: unknown key; did you mean 'replay'\?"):
        load_recipe(_write(micro_recipe_file.parent, raw))


def test_negative_value_message(micro_recipe_file: Path) -> None:
    with pytest.raises(MergemixError, match=r"micro.yaml: experts.lr: must be > 0, got -1"):
        load_recipe(micro_recipe_file, ["experts.lr=-1"])
    with pytest.raises(MergemixError, match=r"mixture.total_tokens: must be > 0, got -5"):
        load_recipe(micro_recipe_file, ["mixture.total_tokens=-5"])


def test_list_fields_are_named_by_position(micro_recipe_file: Path) -> None:
    with pytest.raises(MergemixError, match=r"evaluation.benchmarks\[0\].kind: unknown benchmark kind 'perplexty'"
                       r".*did you mean 'perplexity'"):
        load_recipe(micro_recipe_file, ["evaluation.benchmarks.0.kind=perplexty"])


def test_overrides_by_dotted_path_and_by_name(micro_recipe_file: Path) -> None:
    r = load_recipe(micro_recipe_file, ["experts.steps=50", "search.seeds=20", "data.domains.code.max_chars=1000"])
    assert r.experts.steps == 50 and r.search.seeds == 20
    assert r.data.domains[2].name == "code" and r.data.domains[2].max_chars == 1000


@pytest.mark.parametrize(
    ("override", "pattern"),
    [
        ("experts.steps", "expected dotted.key=value"),
        ("data.domains.nope.max_chars=3", "no item named 'nope'"),
        ("data.domains.9.max_chars=3", "index 9 out of range"),
        ("search.seeds=2", "search.seeds must be at least 5"),
        ("experts.tokens=100", "set experts.steps or experts.tokens, not both"),
        ("merge.method=tiez", "unknown merge method 'tiez'"),
        ("search.surrogate=gp", "unknown surrogate 'gp'"),
        ("evaluation.weights.codng=1", "weight for unknown capability 'codng'.*did you mean 'coding'"),
    ],
)
def test_bad_overrides_are_explained(micro_recipe_file: Path, override: str, pattern: str) -> None:
    with pytest.raises(MergemixError, match=pattern):
        load_recipe(micro_recipe_file, [override])


def test_missing_file_and_bad_yaml(tmp_path: Path) -> None:
    with pytest.raises(MergemixError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n  data: [\n")
    with pytest.raises(MergemixError, match=r"bad.yaml: line \d+: not valid YAML"):
        load_recipe(bad)


def test_recipe_is_frozen_and_round_trips(micro_recipe_file: Path) -> None:
    r = load_recipe(micro_recipe_file)
    with pytest.raises(ValidationError):
        r.seed = 3  # type: ignore[misc]
    again = recipe_from_dict(yaml.safe_load(dump_recipe(r)))
    assert again == r


def test_token_budget_becomes_steps(micro_recipe_file: Path) -> None:
    r = load_recipe(micro_recipe_file, ["experts.steps=null", "experts.tokens=1000"])
    # 1000 tokens / (8 sequences x 32 tokens) = 3.9 → 4 steps
    assert r.experts.num_steps(r.data.seq_len) == 4


def test_names_cannot_escape_the_run_directory(micro_recipe_file: Path) -> None:
    for bad in ("..", ".", "a.b", "a/b"):
        with pytest.raises(MergemixError, match=r"data.domains\[0\].name"):
            load_recipe(micro_recipe_file, [f"data.domains.0.name={bad}"])


def test_base_share_defaults_to_zero_with_a_checkpoint(micro_recipe_file: Path, tmp_path: Path) -> None:
    raw = yaml.safe_load(micro_recipe_file.read_text())
    del raw["data"]["split"]["base"]
    raw["base"] = {"path": str(tmp_path)}
    assert recipe_from_dict(raw).data.split.base == 0.0
    del raw["base"]
    assert recipe_from_dict(raw).data.split.base == 0.5
    raw["data"]["split"]["base"] = 0
    with pytest.raises(MergemixError, match="data.split.base is 0, but the demo base"):
        recipe_from_dict(raw)


@pytest.mark.parametrize(
    ("path", "part"),
    [
        ("data/test.jsonl", "test.jsonl"),
        ("data/test/quiz.jsonl", "test"),
        ("/eval/quiz_test.jsonl", "quiz_test.jsonl"),
        ("/eval/quiz-TEST/part.parquet", "quiz-TEST"),
        ("/hf/quiz/test-00000-of-00001.parquet", "test-00000-of-00001.parquet"),
        ("data/validation.jsonl", None),
        ("data/contest.jsonl", None),
        ("data/latest/testing.jsonl", None),
        ("builtin:test", None),
    ],
)
def test_split_guard_rule(path: str, part: str | None) -> None:
    assert looks_like_test_split(path) == part


def test_split_guard_refuses_test_files_unless_allowed(micro_recipe_file: Path) -> None:
    raw = yaml.safe_load(micro_recipe_file.read_text())
    raw["evaluation"]["benchmarks"][2]["path"] = "/eval/test/quiz.jsonl"
    with pytest.raises(MergemixError, match=r"evaluation.benchmarks\[2\]: path /eval/test/quiz.jsonl looks like a "
                       r"test split \('test'\).*validation split, or set allow_test_split: true"):
        recipe_from_dict(raw)
    raw["evaluation"]["benchmarks"][2]["allow_test_split"] = True
    assert recipe_from_dict(raw).evaluation.benchmarks[2].allow_test_split


@pytest.mark.parametrize(
    ("bench", "pattern"),
    [
        ({"kind": "perplexity", "domain": "math", "shots": 2}, r"shots is not used by kind perplexity"),
        ({"kind": "generation", "path": "q.jsonl", "blank_template": "{question} ___ ."},
         r"blank_template is not used by kind generation"),
        ({"kind": "multiple_choice", "path": "q.jsonl", "blank_template": "{question}"},
         r"blank_template must contain ___ or \{blank\}"),
        ({"kind": "generation", "path": "q.jsonl", "question_template": "Q:"}, r"question_template must contain \{question\}"),
        ({"kind": "generation", "path": "q.jsonl", "stop": [""]}, r"stop strings must not be empty"),
        ({"kind": "generation", "path": "q.jsonl", "metric": "acc"}, r"metric 'acc' is not one of exact_match, f1"),
    ],
)
def test_benchmark_fields_are_checked(micro_recipe_file: Path, bench: dict, pattern: str) -> None:
    raw = yaml.safe_load(micro_recipe_file.read_text())
    raw["evaluation"]["benchmarks"][2] = {"name": "b", **bench}
    with pytest.raises(MergemixError, match=r"evaluation.benchmarks\[2\]: " + pattern):
        recipe_from_dict(raw)


def test_micro_batch_must_divide_batch(micro_recipe_file: Path) -> None:
    with pytest.raises(MergemixError, match=r"experts: .*micro_batch_size \(3\) must divide batch_size \(8\)"):
        load_recipe(micro_recipe_file, ["experts.micro_batch_size=3"])
    assert load_recipe(micro_recipe_file, ["experts.micro_batch_size=2"]).experts.micro_batch_size == 2
