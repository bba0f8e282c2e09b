from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mergemix.data.builtin import BUILTINS, _stdlib_files, materialize
from mergemix.evaluate.generation import load_generation_items
from mergemix.evaluate.kinds import load_mc_items


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("builtin")


def _texts(name: str, cache: Path) -> list[str]:
    with open(materialize(name, cache)) as f:
        return [json.loads(line)["text"] for line in f]


def test_all_builtins_generate_nonempty(cache: Path) -> None:
    for name in BUILTINS:
        assert materialize(name, cache).stat().st_size > 10_000, name


def test_stdlib_target_never_appears_in_code_or_prose(cache: Path) -> None:
    target = _texts("stdlib_modules", cache)
    assert len(target) > 10
    training = _texts("code", cache) + _texts("prose", cache)

    def long_lines(text: str) -> set[str]:
        return {s for line in text.splitlines() if len(s := line.strip()) > 50}

    # Lines found in three or more standard-library modules are idioms and licence headers, not content.
    counts = Counter(line for p in _stdlib_files() for line in long_lines(p.read_text(errors="replace")))
    training_lines = set().union(*(long_lines(doc) for doc in training))
    for module in target:
        for line in long_lines(module):
            if counts[line] < 3:
                assert line not in training_lines, line


def test_code_has_no_docstrings_and_prose_is_docs(cache: Path) -> None:
    code = _texts("code", cache)
    assert sum('"""' in c for c in code) < 0.2 * len(code)  # only string literals that are not docstrings
    prose = _texts("prose", cache)
    assert all(len(p) > 200 for p in prose)


def test_word_problems_mc_is_well_formed(cache: Path) -> None:
    items = load_mc_items("builtin:word_problems_mc", cache)
    assert len(items) == 400
    for _, question, choices, answer, _ in items:
        assert question.endswith(" =") and len(set(choices)) == 4
        work = question.rpartition("Answer: ")[2].removesuffix(" =")
        assert eval(work) == int(choices[answer])  # noqa: S307 - generated arithmetic like "12 + 7"


def test_word_problems_gen_is_well_formed(cache: Path) -> None:
    items = load_generation_items("builtin:word_problems_gen", cache)
    assert len(items) == 200
    mc = {q for _, q, _, _, _ in load_mc_items("builtin:word_problems_mc", cache)}
    for it in items:
        work = it.question.rpartition("Answer: ")[2].removesuffix(" =")
        assert eval(work) == int(it.answers[0])  # noqa: S307 - generated arithmetic like "12 + 7"
        assert it.question not in mc
