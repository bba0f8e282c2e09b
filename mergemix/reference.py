"""The recipe reference, docs/recipe.md, generated from the pydantic models' fields and descriptions.

    python -m mergemix.reference > docs/recipe.md

tests/test_reference.py fails when docs/recipe.md is not what this prints, so the reference never drifts from
the code.
"""

from __future__ import annotations

import json
import re
import typing
from typing import Any

from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from mergemix.recipe import Recipe

HEADER = """# Recipe reference

Every field of a recipe, generated from the code (`python -m mergemix.reference > docs/recipe.md`; a test
checks it is current). A recipe is one YAML file; unknown keys are errors. Any field can be overridden on the
command line as a dotted key, e.g. `mergemix propose recipes/demo.yaml experts.steps=50`; list items by
position or by name (`data.domains.code.max_chars=1000000`). `mergemix validate RECIPE` prints a recipe with
every default filled in. How the fields work together: [guide.md](guide.md).
"""


def _models(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models inside a field's type (`X`, `X | None`, `list[X]`)."""
    out = []
    for arg in (annotation, *typing.get_args(annotation)):
        for inner in (arg, *typing.get_args(arg)):
            if isinstance(inner, type) and issubclass(inner, BaseModel) and inner not in out:
                out.append(inner)
    return out


def _type(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " or ".join(json.dumps(a) for a in typing.get_args(annotation))
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) else None
    text = text or str(annotation).replace("typing.", "")
    text = re.sub(r"Literal\[([^\]]*)\]", lambda m: m.group(1).replace("'", '"').replace(", ", " | "), text)
    for model in _models(annotation):
        text = text.replace(f"{model.__module__}.{model.__qualname__}", model.__name__)
    return text.replace("NoneType", "None")


def _default(field: Any) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        value = field.default_factory()
        return "see below" if isinstance(value, BaseModel) else f"`{json.dumps(value)}`"
    if field.default is PydanticUndefined:
        return ""
    value = field.default
    return f"`{json.dumps(list(value) if isinstance(value, tuple) else value)}`"


def _section(model: type[BaseModel], path: str, out: list[str], seen: set[type[BaseModel]]) -> None:
    doc = " ".join((model.__doc__ or "").split("\n\n")[0].split())
    out += ["", f"## `{path}`" if path else "## top level", ""]
    if doc and not doc.startswith(model.__name__ + "("):
        out += [doc, ""]
    out += ["| field | type | default | what it does |", "| --- | --- | --- | --- |"]
    nested = []
    for name, field in model.model_fields.items():
        desc = " ".join((field.description or "").split()).replace("|", "\\|")
        kind = _type(field.annotation).replace(" | ", " or ")
        out.append(f"| `{name}` | `{kind}` | {_default(field)} | {desc} |")
        nested += [(f"{path}.{name}" if path else name, m) for m in _models(field.annotation)]
    for sub_path, sub in nested:
        if sub not in seen:
            seen.add(sub)
            _section(sub, sub_path, out, seen)


def render() -> str:
    """docs/recipe.md as it should read."""
    out = [HEADER.rstrip("\n")]
    _section(Recipe, "", out, {Recipe})
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(render(), end="")
