"""docs/recipe.md is what `python -m mergemix.reference` prints, and every field says what it does briefly."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel

from mergemix.recipe import Recipe
from mergemix.reference import _models, render

DOCS = Path(__file__).resolve().parent.parent / "docs"


def test_the_recipe_reference_is_current() -> None:
    assert (DOCS / "recipe.md").read_text(encoding="utf-8") == render(), (
        "docs/recipe.md is stale: python -m mergemix.reference > docs/recipe.md")


def _fields(model: type[BaseModel], path: str = "") -> list[tuple[str, str]]:
    out = []
    for name, field in model.model_fields.items():
        out.append((f"{path}{name}", field.description or ""))
        for sub in _models(field.annotation):
            out += _fields(sub, f"{path}{name}.")
    return out


def test_every_field_is_described_in_at_most_two_lines() -> None:
    fields = _fields(Recipe)
    assert len(fields) > 100
    missing = [name for name, desc in fields if not desc]
    long = [f"{name} ({len(desc)} characters)" for name, desc in fields if len(desc) > 220]
    assert missing == [] and long == [], (missing, long)
