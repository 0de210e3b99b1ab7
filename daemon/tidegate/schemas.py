"""A model output dataset keeps one schema: the first table written fixes it, and every
later table must fit it, losslessly cast where it can be (a narrower integer, an integer
where floats were, a float32, an all-null column). A table that does not fit fails its
param alone, with the columns and types named; nothing else of the part is lost.
"""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq

from tidegate.errors import TidegateError


class SchemaMismatch(TidegateError):
    """A param's model output does not fit its dataset's schema."""


def _int_fits(src: pa.DataType, dst: pa.DataType) -> bool:
    if not (pa.types.is_integer(src) and pa.types.is_integer(dst)):
        return False
    if pa.types.is_signed_integer(src) == pa.types.is_signed_integer(dst):
        return bool(dst.bit_width >= src.bit_width)
    # An unsigned integer fits a wider signed one; a signed never fits an unsigned.
    return pa.types.is_unsigned_integer(src) and dst.bit_width > src.bit_width


def castable(src: pa.DataType, dst: pa.DataType) -> bool:
    """Whether values of type ``src`` go into a column of type ``dst`` without loss of
    meaning (int -> float64 is allowed, as the issue of mixed int/float replicates needs)."""
    if src == dst or pa.types.is_null(src):
        return True
    if _int_fits(src, dst):
        return True
    if pa.types.is_floating(dst) and dst.bit_width == 64:
        return pa.types.is_integer(src) or pa.types.is_float32(src)
    if pa.types.is_large_string(dst):
        return pa.types.is_string(src)
    return False


def _describe(schema: pa.Schema) -> str:
    return ", ".join(f"{f.name}: {f.type}" for f in schema)


def check_writable(name: str, schema: pa.Schema) -> None:
    """SchemaMismatch if Parquet cannot hold ``schema`` (a union column, say): found
    before the param is buffered, not when its part is written."""
    try:
        pq.write_table(schema.empty_table(), io.BytesIO())
    except (pa.ArrowException, ValueError, TypeError) as exc:
        raise SchemaMismatch(
            f"output {name!r}: expected columns Parquet can store, got {_describe(schema)} "
            f"({type(exc).__name__}: {exc})"
        ) from None


def fit(name: str, table: pa.Table, schema: pa.Schema) -> pa.Table:
    """``table`` as ``schema``: same column names (in any order), each type equal or
    losslessly castable; SchemaMismatch naming the columns and types otherwise."""
    got = {f.name: f.type for f in table.schema}
    want = {f.name: f.type for f in schema}
    missing = [n for n in want if n not in got]
    extra = [n for n in got if n not in want]
    wrong = [n for n in want if n in got and not castable(got[n], want[n])]
    if missing or extra or wrong:
        problems = []
        if missing:
            problems.append(f"missing {', '.join(missing)}")
        if extra:
            problems.append(f"unexpected {', '.join(extra)}")
        problems += [f"{n}: expected {want[n]}, got {got[n]}" for n in wrong]
        raise SchemaMismatch(
            f"output {name!r} does not fit the schema its first part fixed "
            f"({_describe(schema)}): {'; '.join(problems)}"
        )
    if table.schema.names == schema.names and all(
        got[n] == want[n] for n in want
    ):
        return table
    return table.select(schema.names).cast(pa.schema([pa.field(n, want[n]) for n in want]))
