"""Offline corpora made at run time from what every Python install carries, plus generators.

Training domains:
  code   the standard library's source, docstrings removed
  prose  the standard library's docstrings (> 200 characters) and the language reference (pydoc_data)
  math   generated arithmetic: equations, chained operations, comparisons
  facts  generated encyclopedic sentences about invented towns and people

Downstream targets (never training domains; each draws on two domains at once, so the best mixture for
them is something the domain list alone does not tell):
  stdlib_modules     whole source files of standard-library modules held out of code and prose
                     (code interleaved with its docstrings: code + prose)
  word_problems      short stories about the invented towns and people with the arithmetic worked out
                     (facts + math)
  word_problems_mc   the same kind of problems as multiple choice: which number ends the worked answer
  word_problems_gen  the same kind of problems as open questions (generation): the number that ends the
                     worked answer

Modules are divided between training and the target by a hash of their path, so no target text is ever
a training text. Each corpus is written once as jsonl into the cache and then read like user data.
"""

from __future__ import annotations

import ast
import datetime
import functools
import hashlib
import inspect
import json
import logging
import random
import sys
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Any

from mergemix.artifacts import atomic_path
from mergemix.catalog import BUILTINS

log = logging.getLogger(__name__)

GENERATOR_VERSION = 3
Records = list[dict[str, Any]]

TARGET_BUCKETS = 10  # one module in ten is held out as the stdlib_modules target
# encodings/ is ~120 generated, near-identical codec tables: boilerplate on either side of the split
SKIP_PARTS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "encodings"}


def materialize(name: str, cache_dir: Path) -> Path:
    """Path of the jsonl file holding built-in corpus `name`, generating it on first use."""
    make = BUILTINS.get(name)
    key = f"{name}-py{sys.version_info.major}{sys.version_info.minor}-v{GENERATOR_VERSION}"
    path = Path(cache_dir) / "builtin" / f"{key}.jsonl"
    if not path.exists():
        log.info("generating built-in corpus %s", name)
        records = make()
        with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec) + "\n")
    return path


# ------------------------------------------------------------------------------------ standard library


def _stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in root.rglob("*.py") if not SKIP_PARTS.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def _is_target(path: Path) -> bool:
    digest = hashlib.sha256(path.name.encode() + str(path.parent.name).encode()).digest()
    return digest[0] % TARGET_BUCKETS == 0


def _long_lines(text: str) -> set[str]:
    return {s for line in text.splitlines() if len(s := line.strip()) > 50}


def _distinctive_lines(files: list[Path]) -> dict[Path, set[str]]:
    """Each module's long lines that occur in fewer than three modules: content, not idiom or boilerplate
    (`__class_getitem__ = classmethod(types.GenericAlias)`, licence headers)."""
    lines = {p: _long_lines(_read(p)) for p in files}
    counts = Counter(line for s in lines.values() for line in s)
    return {p: {line for line in s if counts[line] < 3} for p, s in lines.items()}


@functools.lru_cache(maxsize=1)  # shared by the code and prose corpora
def _training_files() -> list[Path]:
    """Modules for code and prose: not held out, and sharing no distinctive line with a held-out module
    (the standard library carries a few copied docstrings and vendored duplicates)."""
    files = _stdlib_files()
    distinctive = _distinctive_lines(files)
    held = set().union(*(distinctive[p] for p in files if _is_target(p)))
    return [p for p in files if not _is_target(p) and not (distinctive[p] & held)]


def _docstring_nodes(tree: ast.Module) -> list[ast.Expr]:
    nodes = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(
                first.value.value, str
            ):
                nodes.append(first)
    return nodes


def _split_module(source: str) -> tuple[str, list[str]]:
    """(source without docstrings, the docstrings) of one module; unparsable modules give ('', [])."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return "", []
    lines = source.splitlines(keepends=True)
    drop: set[int] = set()
    docs = []
    for node in _docstring_nodes(tree):
        docs.append(inspect.cleandoc(node.value.value))  # type: ignore[attr-defined]
        drop.update(range(node.lineno - 1, (node.end_lineno or node.lineno)))
    code = "".join(line for i, line in enumerate(lines) if i not in drop)
    return code, docs


@functools.cache  # every module is read by the overlap check and again by its corpus
def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _code() -> Records:
    out = []
    for p in _training_files():
        code, _ = _split_module(_read(p))
        if code.strip():
            out.append({"text": code})
    return out


def _prose() -> Records:
    out = []
    for p in _training_files():
        _, docs = _split_module(_read(p))
        out.extend({"text": d} for d in docs if len(d) > 200)
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    out.extend({"text": text} for _, text in sorted(topics.items()) if len(text) > 200)
    return out


def _stdlib_modules() -> Records:
    return [{"text": _read(p)} for p in _stdlib_files() if _is_target(p) and _read(p).strip()]


# ------------------------------------------------------------------------------------------ generators

_SYLLABLES = "ka lo ven mar tis bel dra no sul fen ri ash cor vel tam is gor le bri wen".split()
_PRODUCTS = "cheese wool glass copper salt honey timber rope pottery cider".split()
_JOBS = "baker miller weaver smith carpenter teacher fisher potter brewer clerk".split()
_ITEMS = "apples coins books jars ropes candles baskets stones".split()


def _names(rng: random.Random, n: int) -> list[str]:
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rng.choice(_SYLLABLES) for _ in range(rng.randint(2, 3))).capitalize())
    return sorted(out)


def _world() -> tuple[list[str], list[str]]:
    """Invented towns and people shared by `facts` and the word problems (seeded: always the same)."""
    rng = random.Random(1234)
    names = _names(rng, 700)
    rng.shuffle(names)
    return names[:200], names[200:]


def _facts() -> Records:
    rng = random.Random(1)
    towns, people = _world()
    out = []
    for i in range(6000):
        town, other, person = rng.choice(towns), rng.choice(towns), rng.choice(people)
        pop = rng.randint(2, 90) * 100
        sentences = [
            f"{town} is a town on the river {rng.choice(towns)}.",
            f"It has about {pop} inhabitants and is known for its {rng.choice(_PRODUCTS)}.",
            f"{person} was born in {town} and works as a {rng.choice(_JOBS)} in {other}.",
            f"The road from {town} to {other} is {rng.randint(3, 60)} miles long.",
            f"{person} has {rng.randint(1, 6)} children and keeps {rng.randint(2, 40)} {rng.choice(_ITEMS)}.",
        ]
        rng.shuffle(sentences)
        out.append({"text": " ".join(sentences[: rng.randint(3, 5)]) + ("\n" if i % 3 else "")})
    return out


def _expression(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 99), rng.randint(1, 99)
    op = rng.choice("+-*")
    if op == "*":
        a, b = rng.randint(0, 20), rng.randint(0, 20)
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return f"{a} {op} {b}", value


def _math() -> Records:
    rng = random.Random(2)
    out = []
    for _ in range(8000):
        lines = []
        for _ in range(rng.randint(4, 10)):
            kind = rng.random()
            expr, value = _expression(rng)
            if kind < 0.6:
                lines.append(f"{expr} = {value}")
            elif kind < 0.85:
                c = rng.randint(1, 9)
                lines.append(f"({expr}) + {c} = {value} + {c} = {value + c}")
            else:
                other = rng.randint(0, 150)
                rel = "<" if value < other else ">" if value > other else "="
                lines.append(f"{expr} = {value} {rel} {other}")
        out.append({"text": "\n".join(lines)})
    return out


def _word_problem(rng: random.Random, towns: list[str], people: list[str]) -> tuple[str, str, int, str]:
    """(story, question, answer, worked expression) of one problem about the invented world."""
    person, town, item = rng.choice(people), rng.choice(towns), rng.choice(_ITEMS)
    a, b = rng.randint(2, 40), rng.randint(1, 30)
    kind = rng.randrange(3)
    if kind == 0:
        story = f"{person} lives in {town} and has {a} {item}. At the market {person} buys {b} more."
        return story, f"How many {item} does {person} have now?", a + b, f"{a} + {b}"
    if kind == 1:
        a = a + b
        story = f"{person} brought {a} {item} to {town} and sold {b} of them."
        return story, f"How many {item} are left?", a - b, f"{a} - {b}"
    a, b = rng.randint(2, 12), rng.randint(2, 9)
    story = f"In {town}, {person} fills {a} baskets with {b} {item} each."
    return story, f"How many {item} is that in all?", a * b, f"{a} * {b}"


def _choice_item(rng: random.Random, question: str, right: str, wrong: list[str]) -> dict[str, Any]:
    """A multiple-choice record: `right` and `wrong` shuffled by `rng`, the answer the index of `right`."""
    choices = [right, *wrong]
    rng.shuffle(choices)
    return {"question": question, "choices": choices, "answer": choices.index(right)}


def _problems(seed: int, n: int) -> list[tuple[str, str, int, str]]:
    rng = random.Random(seed)
    towns, people = _world()
    return [_word_problem(rng, towns, people) for _ in range(n)]


def _word_problems() -> Records:
    return [
        {"text": f"{story} {question}\nAnswer: {work} = {answer}.\n"}
        for story, question, answer, work in _problems(seed=3, n=1500)
    ]


def _word_problems_mc() -> Records:
    """The worked expression ends the question and the options are numbers only, so the score measures
    the arithmetic, not the shared wording."""
    rng = random.Random(5)
    out = []
    for story, question, answer, work in _problems(seed=4, n=400):
        wrong = sorted({answer + d for d in (-10, -2, -1, 1, 2, 10) if answer + d >= 0} - {answer})
        out.append(_choice_item(rng, f"{story} {question}\nAnswer: {work} =", str(answer),
                                [str(w) for w in rng.sample(wrong, 3)]))
    return out


def _word_problems_gen() -> Records:
    """As word_problems_mc, with the number to be generated: the worked expression ends the question."""
    return [{"question": f"{story} {question}\nAnswer: {work} =", "answer": str(answer)}
            for story, question, answer, work in _problems(seed=6, n=200)]


# ----------------------------------------------------------------- the ledger testbed (recipes/ledger.yaml)
# Three generated domains about the same invented world, in three forms: `calendar` (date arithmetic),
# `tables` (comma-separated inventory and people records), `letters` (plain English letters, no numbers).
# Its targets mix the forms: `shipping_notes` are letters that report shipments with dates and a table,
# `due_dates_mc` asks for an arrival date after a letter-like sentence, `table_rows_mc` for the row that
# continues a table. Generated, so the testbed is the same on every Python version.

_EPOCH = datetime.date(2030, 1, 1)
_WEEKDAYS = "Monday Tuesday Wednesday Thursday Friday Saturday Sunday".split()
_WEATHER = "rain wind snow sun fog frost".split()
_TABLES = {
    "stock": ("town", "item", "count", "price"),
    "people": ("person", "job", "town", "age"),
}


def _day(rng: random.Random) -> datetime.date:
    return _EPOCH + datetime.timedelta(days=rng.randint(0, 3650))


def _row(rng: random.Random, schema: str, towns: list[str], people: list[str]) -> tuple[str, ...]:
    if schema == "stock":
        return rng.choice(towns), rng.choice(_ITEMS), str(rng.randint(1, 90)), f"{rng.randint(1, 40) / 4:.2f}"
    return rng.choice(people), rng.choice(_JOBS), rng.choice(towns), str(rng.randint(18, 80))


def _table(rng: random.Random, schema: str, rows: int, towns: list[str], people: list[str]) -> list[str]:
    return [", ".join(_TABLES[schema])] + [", ".join(_row(rng, schema, towns, people)) for _ in range(rows)]


def _calendar() -> Records:
    rng = random.Random(11)
    out = []
    for _ in range(6000):
        lines = []
        for _ in range(rng.randint(4, 10)):
            d, n, kind = _day(rng), rng.randint(1, 40), rng.random()
            later = d + datetime.timedelta(days=n)
            if kind < 0.5:
                lines.append(f"{d} + {n} days = {later}")
            elif kind < 0.7:
                lines.append(f"{later} - {n} days = {d}")
            elif kind < 0.85:
                lines.append(f"{d} is a {_WEEKDAYS[d.weekday()]}.")
            else:
                lines.append(f"From {d} to {later} is {n} days.")
        out.append({"text": "\n".join(lines)})
    return out


def _tables() -> Records:
    rng = random.Random(12)
    towns, people = _world()
    return [{"text": "\n".join(_table(rng, rng.choice(sorted(_TABLES)), rng.randint(3, 10), towns, people))}
            for _ in range(6000)]


def _letter(rng: random.Random, towns: list[str], people: list[str], middle: list[str]) -> str:
    writer, reader, town = rng.choice(people), rng.choice(people), rng.choice(towns)
    pool = [
        f"The {rng.choice(_WEATHER)} has not left {town} all week.",
        f"Our {rng.choice(_JOBS)} says the {rng.choice(_PRODUCTS)} from {rng.choice(towns)} is the best he has seen.",
        f"I hope the road to {rng.choice(towns)} is kinder to you than it was to me.",
        f"{rng.choice(people)} sends greetings and asks after your {rng.choice(_ITEMS)}.",
        f"The market in {town} was quiet, and the {rng.choice(_PRODUCTS)} sold slowly.",
        f"Please tell {rng.choice(people)} that the {rng.choice(_JOBS)} in {rng.choice(towns)} wants to see him.",
        f"We all miss you here in {town}.",
    ]
    rng.shuffle(pool)
    body = " ".join(pool[: rng.randint(2, 4)])
    return "\n\n".join([f"Dear {reader},", body, *middle, f"Yours,\n{writer}"]) + "\n"


def _letters() -> Records:
    rng = random.Random(13)
    towns, people = _world()
    return [{"text": _letter(rng, towns, people, [])} for _ in range(6000)]


def _shipment(rng: random.Random, towns: list[str], people: list[str]) -> tuple[str, datetime.date, int, str]:
    """(sentence, departure, days on the road, item) of one shipment in the invented world."""
    d, n, item = _day(rng), rng.randint(2, 20), rng.choice(_ITEMS)
    src, dst = rng.sample(towns, 2)
    return f"{rng.choice(people)} sends {item} from {src} to {dst} on {d}; the road takes {n} days.", d, n, item


def _shipping_notes() -> Records:
    rng = random.Random(14)
    towns, people = _world()
    out = []
    for _ in range(1500):
        sentence, d, n, _ = _shipment(rng, towns, people)
        middle = [f"{sentence} They arrive on {d + datetime.timedelta(days=n)}.",
                  "\n".join(_table(rng, "stock", rng.randint(2, 4), towns, people))]
        out.append({"text": _letter(rng, towns, people, middle)})
    return out


def _due_dates_mc() -> Records:
    """The sum ends the question, as in `calendar`, and the options are dates only, so the score measures
    the date arithmetic, not the shared wording."""
    rng = random.Random(15)
    towns, people = _world()
    out = []
    for _ in range(400):
        sentence, d, n, _ = _shipment(rng, towns, people)
        right = d + datetime.timedelta(days=n)
        wrong = [right + datetime.timedelta(days=k) for k in rng.sample((-7, -2, -1, 1, 2, 7), 3)]
        out.append(_choice_item(rng, f"{sentence}\n{d} + {n} days =", str(right), [str(x) for x in wrong]))
    return out


def _table_rows_mc() -> Records:
    """A table, then the first field of its next row: the options are the rest of that row as written and
    with its fields in the wrong order."""
    rng = random.Random(16)
    towns, people = _world()
    out = []
    for _ in range(400):
        schema = rng.choice(sorted(_TABLES))
        lines = _table(rng, schema, rng.randint(2, 5), towns, people)
        first, *rest = _row(rng, schema, towns, people)
        orders = [list(rest), [rest[1], rest[0], rest[2]], [rest[0], rest[2], rest[1]], [rest[2], rest[1], rest[0]]]
        right, *wrong = [", ".join(o) for o in orders]
        if len({right, *wrong}) < 4:  # a row whose fields coincide cannot be told from its shuffles
            continue
        out.append(_choice_item(rng, "\n".join(lines) + f"\n{first},", right, wrong))
    return out
