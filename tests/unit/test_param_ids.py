"""Canonical param ids (properties) and the lazy walk of pending params."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import finite_floats, int64s, param_names
from tidegate.params import GridSource, ListSource, Param, Pending, canonical, param_id_of
from tidegate.spec import SpecError, job_from_dict

scalars = st.one_of(finite_floats, int64s, st.text(max_size=8), st.booleans())
param_sets = st.dictionaries(param_names, scalars, min_size=1, max_size=5)


@given(param_sets, st.randoms())
def test_key_order_never_changes_an_id(values: dict[str, Any], rnd: Any) -> None:
    keys = list(values)
    rnd.shuffle(keys)
    assert param_id_of({k: values[k] for k in keys}) == param_id_of(values)


@given(st.dictionaries(param_names, st.integers(-(2**53), 2**53), min_size=1, max_size=4),
       st.data())
def test_an_int_and_its_float_are_one_param(ints: dict[str, int], data: st.DataObject) -> None:
    """Any mix of ints and their float spellings (1 and 1.0) has one id."""
    floated = {k: float(v) if data.draw(st.booleans()) else v for k, v in ints.items()}
    assert param_id_of(floated) == param_id_of(ints)


@given(param_sets, param_sets)
def test_ids_differ_exactly_when_the_canonical_values_do(a: dict[str, Any],
                                                         b: dict[str, Any]) -> None:
    same = ({k: (type(v) if isinstance(v, bool | str) else "number", canonical(v))
             for k, v in a.items()}
            == {k: (type(v) if isinstance(v, bool | str) else "number", canonical(v))
                for k, v in b.items()})
    assert (param_id_of(a) == param_id_of(b)) == same


@given(finite_floats.filter(lambda f: not f.is_integer()), param_names)
def test_fractional_floats_and_other_values_keep_their_earlier_ids(x: float, name: str) -> None:
    """Only whole-number floats are spelled differently from the typed ids of earlier
    releases: every other value keeps its id."""
    for v in (x, 3, "a", True):
        assert param_id_of({name: v}) == param_id_of({name: v}, typed=True)


def test_edge_values() -> None:
    """-0.0 is 0; True is not 1; a big whole float is its int; ids are pinned."""
    assert param_id_of({"a": -0.0}) == param_id_of({"a": 0}) == param_id_of({"a": 0.0})
    assert param_id_of({"a": True}) != param_id_of({"a": 1})
    assert param_id_of({"a": 1e20}) == param_id_of({"a": 10**20})
    assert param_id_of({"a": 2**53 + 1}) != param_id_of({"a": float(2**53 + 1)})
    assert param_id_of({"beta": 0.1, "gamma": 0.05}) == "f8af5def85e53812"
    assert param_id_of({"n": 1.0}) == param_id_of({"n": 1}, typed=True)


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_nan_and_inf_are_refused_naming_the_value(tmp_path: Path, value: str) -> None:
    for parameters in ({"grid": {"x": [1.0, float(value)]}},
                       {"values": [{"x": 1.0}, {"x": float(value)}]}):
        with pytest.raises(SpecError) as err:
            job_from_dict({"model": "m:f", "parameters": parameters}, base_dir=tmp_path)
        (e,) = err.value.errors
        assert e.field.endswith("[1]") or e.field.endswith("[1].x"), e.field
        assert e.expected == "a finite number"
    # The CSV reader makes "nan" a null: refused too, at the same row.
    (tmp_path / "p.csv").write_text(f"x\n1.5\n{value}\n")
    with pytest.raises(SpecError, match=r"parameters\.file\[row 1, column 1\]: expected"):
        job_from_dict({"model": "m:f", "parameters": {"file": "p.csv"}}, base_dir=tmp_path)


@given(st.lists(st.integers(0, 30), unique=True, max_size=12),
       st.lists(st.integers(0, 30), unique=True, max_size=12))
def test_pending_yields_the_new_and_finds_the_orphans(spec: list[int],
                                                      committed: list[int]) -> None:
    """Walked to its end, the walk yields the spec's uncommitted params in order and
    knows the committed ones the spec lacks; before its end it claims to know none."""
    params = [Param(param_id_of({"k": k}), {"k": k}) for k in spec]
    done = {param_id_of({"k": k}) for k in committed}
    walk = Pending(ListSource(params), done)
    got = list(walk)
    assert got == [p for p in params if p.param_id not in done]
    assert walk.orphans() == done - {p.param_id for p in params}
    fresh = Pending(ListSource(params), done)
    assert fresh.orphans() == (set() if not done else None)


def test_a_grid_with_typed_ids_gives_the_earlier_releases_ids() -> None:
    grid = GridSource(["a", "b"], [[1.0, 2.5], ["x"]])
    assert [p.param_id for p in grid.typed_ids()] == [
        param_id_of({"a": 1.0, "b": "x"}, typed=True), param_id_of({"a": 2.5, "b": "x"})]
    assert [p.values for p in grid.typed_ids()] == [p.values for p in grid]
