"""A params file checked in Arrow and made into params a batch at a time (``FileSource``)
gives exactly the params, types and errors of reading it row by row."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet
import pytest
from hypothesis import HealthCheck, given, settings

from tidegate import paramfile, spec
from tidegate.paramfile import FileSource
from tidegate.params import Pending
from tidegate.spec import SpecError, load_job

SPEC = {"model": "m:f", "replicates": 1}


def _by_rows(table: pa.Table) -> Any:
    """What reading ``table`` row by row gives: the reference the Arrow checks must match."""
    rows = paramfile.normalised(table).to_pylist()
    return spec._expand_rows([(f"parameters.file[row {i}]", r) for i, r in enumerate(rows)])


def _outcome(fn: Any) -> Any:
    try:
        return fn()
    except SpecError as exc:
        return exc.errors


INT64 = 2**63
columns = st.one_of(
    *map(st.just, [pa.bool_(), pa.int64(), pa.uint64(), pa.float64(), pa.float32(),
                   pa.string()]),
)


def _values(t: pa.DataType, nulls: bool) -> st.SearchStrategy[Any]:
    if pa.types.is_boolean(t):
        base: st.SearchStrategy[Any] = st.booleans()
    elif t == pa.uint64():
        base = st.sampled_from([0, 1, 2**53 + 1, INT64 - 1, INT64, 2**64 - 1])
    elif pa.types.is_integer(t):
        base = st.sampled_from([0, -1, 7, 2**53, 2**53 + 1, -(2**53) - 1, -INT64, INT64 - 1])
    elif pa.types.is_floating(t):
        base = st.sampled_from([0.0, -0.0, 1.0, 0.5, -3.0, 1e300, float("inf"), float("nan"),
                                2.0**63, -(2.0**63), 2.0**62])
    else:
        base = st.sampled_from(["", "a", "b c", "é", "1"])
    return st.one_of(base, st.none()) if nulls else base


@st.composite
def tables(draw: st.DrawFn) -> pa.Table:
    types = draw(st.lists(columns, min_size=1, max_size=3))
    n = draw(st.integers(1, 12))
    nulls = draw(st.integers(0, 4)) == 0  # else nearly every table has one
    arrays = [pa.array(draw(st.lists(_values(t, nulls), min_size=n, max_size=n)), type=t)
              for t in types]
    return pa.table(arrays, names=[f"p{i}" for i in range(len(types))])


@settings(max_examples=300, deadline=None)
@given(tables())
def test_arrow_checks_give_what_row_by_row_gives(table: pa.Table) -> None:
    """Types, fits, params (ids, values and their Python types) and, for a file with a
    bad value or a repeated row, the errors: all as read row by row."""
    expected = _outcome(lambda: _by_rows(table))
    normal = paramfile.normalised(table)
    checked = paramfile.column_types(normal)
    if checked is None:  # refused only where row by row refuses too (then it names why)
        assert isinstance(expected, list), expected
        return
    assert not isinstance(expected, list), expected
    types, fits = checked
    assert types == expected.types
    assert fits == expected.fits
    got = list(FileSource(normal, "file-x"))
    assert got == list(expected.source)
    assert [[type(v) for v in p.values.values()] for p in got] == \
        [[type(v) for v in p.values.values()] for p in expected.source]


@pytest.mark.parametrize("suffix", [".csv", ".parquet", ".jsonl"])
def test_a_valid_file_is_a_file_source_equal_to_its_rows(tmp_path: Path, suffix: str) -> None:
    rows = [{"beta": 0.1 * i, "n": i, "kind": f"k{i % 3}", "flag": i % 2 == 0}
            for i in range(10_000)]
    path = tmp_path / f"params{suffix}"
    table = pa.Table.from_pylist(rows)
    if suffix == ".csv":
        pa_csv.write_csv(table, path)
    elif suffix == ".parquet":
        pa_parquet.write_table(table, path)
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "job.yaml").write_text(json.dumps({**SPEC, "parameters": {"file": path.name}}))
    job = load_job(tmp_path / "job.yaml")
    assert isinstance(job.params, FileSource)
    assert job.n_params == 10_000
    reference = _by_rows(table)
    assert list(job.params) == list(reference.source)
    assert job.param_types == reference.types == {
        "beta": "float", "n": "int", "kind": "str", "flag": "bool"}
    assert list(job.params.iter_from(9_990)) == list(reference.source)[9_990:]
    typed = job.params.typed_ids()
    assert [p.param_id for p in typed] == [p.param_id for p in reference.source.typed_ids()]
    assert typed.digest != job.params.digest


def _load(tmp_path: Path, name: str, content: bytes) -> Any:
    (tmp_path / name).write_bytes(content)
    (tmp_path / "job.yaml").write_text(json.dumps({**SPEC, "parameters": {"file": name}}))
    return load_job(tmp_path / "job.yaml")


def test_the_digest_is_of_the_bytes_and_names_the_same_params_in_the_same_order(
        tmp_path: Path) -> None:
    a = _load(tmp_path, "p.csv", b"beta,n\n0.1,1\n0.2,2\n").params
    again = _load(tmp_path, "p.csv", b"beta,n\n0.1,1\n0.2,2\n").params
    assert a.digest == again.digest and a.digest.startswith("file-")
    reordered = _load(tmp_path, "p.csv", b"beta,n\n0.2,2\n0.1,1\n").params
    grown = _load(tmp_path, "p.csv", b"beta,n\n0.1,1\n0.2,2\n0.3,3\n").params
    retyped = _load(tmp_path, "p.csv", b"beta,n\n0.1,1.5\n0.2,2\n").params
    assert len({a.digest, reordered.digest, grown.digest, retyped.digest}) == 4


def test_a_resume_from_a_watermark_skips_the_prefix(tmp_path: Path) -> None:
    body = "n\n" + "".join(f"{i}\n" for i in range(10_000))
    source = _load(tmp_path, "p.csv", body.encode()).params
    ids = [p.param_id for p in source]
    walk = Pending(source, set(ids[:9_000]), start=9_000)
    assert [p.param_id for p in walk] == ids[9_000:]
    assert walk.orphans() == set()


@pytest.mark.parametrize(("content", "field", "got"), [
    pytest.param(b"n\n1\n2\n1\n", "parameters.file[row 2]", "a duplicate of parameters.file[row 0]",
                 id="repeated-int"),
    pytest.param(b"x\n0.0\n-0.0\n", "parameters.file[row 1]",
                 "a duplicate of parameters.file[row 0]", id="signed-zero-is-one-param"),
    pytest.param(b"x\n1.5\ninf\n", "parameters.file[row 1].x", "inf", id="infinite"),
    pytest.param(b"x,y\n1,\n2,3\n", "parameters.file[row 0].y", "null", id="null"),
])
def test_a_bad_row_is_named_as_row_by_row_names_it(
        tmp_path: Path, content: bytes, field: str, got: str) -> None:
    with pytest.raises(SpecError) as info:
        _load(tmp_path, "p.csv", content)
    error = info.value.errors[0]
    assert error.field == field
    assert got in error.got


def test_a_uint64_past_int64_is_refused_at_its_row(tmp_path: Path) -> None:
    pa_parquet.write_table(pa.table({"n": pa.array([1, 2**63], pa.uint64())}),
                           tmp_path / "p.parquet")
    (tmp_path / "job.yaml").write_text(json.dumps({**SPEC, "parameters": {"file": "p.parquet"}}))
    with pytest.raises(SpecError) as info:
        load_job(tmp_path / "job.yaml")
    assert info.value.errors[0].field == "parameters.file[row 1].n"
    assert "64 bits" in info.value.errors[0].expected


@settings(max_examples=20, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.integers(-5, 5), min_size=1, max_size=50))
def test_int_file_digest_is_stable_across_reads(tmp_path: Path, ns: list[int]) -> None:
    body = ("n\n" + "".join(f"{n}\n" for n in ns)).encode()
    first = _outcome(lambda: _load(tmp_path, "p.csv", body))
    second = _outcome(lambda: _load(tmp_path, "p.csv", body))
    if isinstance(first, list):
        assert first == second and len(set(ns)) < len(ns)
    else:
        assert first.params.digest == second.params.digest
        assert [p.values["n"] for p in first.params] == ns


def test_repeated_rows_are_found_past_a_key_wider_than_64_bits() -> None:
    """Four columns of 100,000 distinct values each make a mixed-radix key of 10^20: the
    key is re-encoded on the way, and a row repeated far apart is still found."""
    n = 100_000
    cols = [pa.chunked_array([pa.array([(k * m) % n for k in range(n)], pa.int64())])
            for m in (1, 3, 7, 11)]
    # No column alone is distinct once its first value repeats at the end.
    cols = [pa.chunked_array([c.combine_chunks(), pa.array([c[0].as_py()], pa.int64())])
            for c in cols]
    assert not paramfile._rows_distinct(cols, n + 1)
    last = pa.chunked_array([cols[3].combine_chunks()[:-1], pa.array([1], pa.int64())])
    shifted = [*cols[:3], last]
    assert paramfile._rows_distinct(shifted, n + 1)
