"""Every entry of every registry (mergemix.catalog) loads from its `module:attribute`, says what it is, and
the metadata a recipe checks names by agrees with the implementation; `Registry.add` puts a new entry under
the same checks."""

from __future__ import annotations

import pytest

from mergemix.catalog import BENCHMARK_KINDS, DIFFERENTIABLE, PACKAGED, REGISTRIES, catalog
from mergemix.errors import MergemixError
from mergemix.model.packaged import PackagedModel
from mergemix.registry import Registry

ENTRIES = [(reg, name) for reg in REGISTRIES for name in reg]


@pytest.mark.parametrize(("registry", "name"), ENTRIES, ids=[f"{r.what}:{n}" for r, n in ENTRIES])
def test_every_entry_loads_and_is_described(registry: Registry, name: str) -> None:
    assert registry.get(name) is not None
    assert registry.describe(name) and name in catalog()


def test_benchmark_metadata_is_the_implementation_s() -> None:
    for kind in BENCHMARK_KINDS:
        impl = BENCHMARK_KINDS.get(kind)
        assert tuple(impl.metrics) == tuple(BENCHMARK_KINDS.meta(kind)["metrics"])
        assert set(impl.metrics) <= set(impl.higher_is_better)
    assert set(DIFFERENTIABLE) <= set(BENCHMARK_KINDS)
    assert all(isinstance(PACKAGED.get(n), PackagedModel) and PACKAGED.get(n).install for n in PACKAGED)


def test_an_added_entry_is_loaded_lazily_and_checked_by_name() -> None:
    reg: Registry = Registry("thing")
    reg.add("dumps", "json:dumps", "JSON text of an object")
    assert "dumps" in reg and reg.describe("dumps") == "JSON text of an object"
    assert reg.get("dumps")([1]) == "[1]"
    with pytest.raises(ValueError, match="registered twice"):
        reg.add("dumps", "json:dumps", "again")
    with pytest.raises(MergemixError, match=r"unknown thing 'dump' \(known: dumps\); did you mean 'dumps'\?"):
        reg.get("dump")
    with pytest.raises(ValueError, match="unknown thing 'dump'"):
        reg.check("dump")
    reg.remove("dumps")
    assert "dumps" not in reg
