from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from mergemix.catalog import BUILTINS
from mergemix.data.builtin import _stdlib_files, materialize
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


LEDGER = ["calendar", "tables", "letters", "shipping_notes", "due_dates_mc", "table_rows_mc"]


@pytest.mark.parametrize("name", LEDGER)
def test_ledger_corpora_are_deterministic(name: str) -> None:
    make = BUILTINS.get(name)
    assert make() == make()  # generated from fixed seeds: the same testbed on every run and machine


def test_due_dates_mc_is_well_formed(cache: Path) -> None:
    import datetime

    items = load_mc_items("builtin:due_dates_mc", cache)
    assert len(items) == 400
    for _, question, choices, answer, _ in items:
        start, _, days = question.rpartition("\n")[2].removesuffix(" days =").partition(" + ")
        right = datetime.date.fromisoformat(start) + datetime.timedelta(days=int(days))
        assert choices[answer] == str(right) and len(set(choices)) == 4


def test_table_rows_mc_answer_keeps_the_header_order(cache: Path) -> None:
    items = load_mc_items("builtin:table_rows_mc", cache)
    assert len(items) > 350
    for _, question, choices, answer, _ in items:
        header = question.splitlines()[0].split(", ")
        fields = choices[answer].split(", ")
        assert len(fields) == len(header) - 1 and len(set(choices)) == 4
        # numbers sit where the header puts count/price/age; a shuffled option puts them elsewhere
        numeric = [f.replace(".", "").isdigit() for f in fields]
        assert numeric == [h in ("count", "price", "age") for h in header[1:]]


def test_shipping_notes_is_no_training_text(cache: Path) -> None:
    notes = _texts("shipping_notes", cache)
    training = set(_texts("calendar", cache) + _texts("tables", cache) + _texts("letters", cache))
    assert not training.intersection(notes)
    # each note mixes all three forms: a letter, a date sum and a table
    assert all(n.startswith("Dear ") and " on 20" in n and "town, item, count, price" in n for n in notes)
