"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

from hypothesis import strategies as st

# Names a spec accepts as parameters: they become Parquet columns param_<name>.
param_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True).filter(
    lambda name: name != "id"
)

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _distinct(values: st.SearchStrategy) -> st.SearchStrategy:
    # unique=True compares with ==, so 0.0 and -0.0 count as one value, as in the spec.
    return st.lists(values, min_size=1, max_size=4, unique=True)


# One grid axis: distinct values of a single type, as a spec must give them.
grid_axes = st.one_of(
    _distinct(finite_floats),
    _distinct(int64s),
    _distinct(st.text(max_size=8)),
    _distinct(st.booleans()),
)

grids = st.dictionaries(param_names, grid_axes, min_size=1, max_size=3)
