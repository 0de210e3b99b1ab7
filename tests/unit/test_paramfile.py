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
from tidegate.params import Pending, param_id_of
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
    *map(st.just, [pa.bool_(), pa.int64(), pa.uint64(), pa.int8(), pa.uint8(), pa.int32(),
                   pa.float64(), pa.float32(), pa.string()]),
)


def _values(t: pa.DataType, nulls: bool) -> st.SearchStrategy[Any]:
    if pa.types.is_boolean(t):
        base: st.SearchStrategy[Any] = st.booleans()
    elif t == pa.uint64():
        base = st.sampled_from([0, 1, 2**53 + 1, INT64 - 1, INT64, 2**64 - 1])
    elif t in (pa.int8(), pa.uint8(), pa.int32()):
        base = st.sampled_from([0, 1, 7, 100] + ([-1, -100] if t != pa.uint8() else []))
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
    # Some columns dictionary-encoded (pandas categoricals), some tables in chunks (a
    # file of several blocks or row groups).
    arrays = [a.dictionary_encode() if draw(st.booleans()) and not pa.types.is_boolean(a.type)
              else a for a in arrays]
    table = pa.table(arrays, names=[f"p{i}" for i in range(len(types))])
    cut = draw(st.integers(0, n))
    return pa.concat_tables([table.slice(0, cut), table.slice(cut)])


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


def test_a_resume_from_a_watermark_skips_the_prefix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The skipped params' ids are never made (hashing 10^6 of them took seconds)."""
    body = "n\n" + "".join(f"{i}\n" for i in range(10_000))
    source = _load(tmp_path, "p.csv", body.encode()).params
    ids = [p.param_id for p in source]
    made = []

    def counted(values: Any, *, typed: bool = False) -> str:
        made.append(values)
        return param_id_of(values, typed=typed)
    monkeypatch.setattr(paramfile, "param_id_of", counted)
    walk = Pending(source, set(ids[:9_000]), start=9_000)
    assert [p.param_id for p in walk] == ids[9_000:]
    assert len(made) == 1_000
    assert walk.orphans() == set()


@pytest.mark.parametrize(("content", "field", "got"), [
    pytest.param(b"n\n1\n2\n1\n", "parameters.file[row 2]", "a duplicate of parameters.file[row 0]",
                 id="repeated-int"),
    pytest.param(b"x\n0.0\n-0.0\n", "parameters.file[row 1]",
                 "a duplicate of parameters.file[row 0]", id="signed-zero-is-one-param"),
    # Sorted with -0.0 before 0.0, (-0.0, 2) would sit between the twins.
    pytest.param(b"x,y\n-0.0,1\n-0.0,2\n0.0,1\n", "parameters.file[row 2]",
                 "a duplicate of parameters.file[row 0]", id="signed-zero-twins-apart"),
    pytest.param(b"x\n1.5\ninf\n", "parameters.file[row 1, column 1]", "inf", id="infinite"),
    pytest.param(b"x,y\n1,\n2,3\n", "parameters.file[row 0, column 2]", "null", id="null"),
])
def test_a_bad_row_is_named_by_row_and_column(
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
    assert info.value.errors[0].field == "parameters.file[row 1, column 1]"
    assert "64 bits" in info.value.errors[0].expected


def _errors(tmp_path: Path, name: str, content: bytes) -> list[Any]:
    with pytest.raises(SpecError) as info:
        _load(tmp_path, name, content)
    return list(info.value.errors)


def test_no_error_shows_a_column_name_and_many_are_cut_short(tmp_path: Path) -> None:
    """A header may hold someone's secret: errors name columns by number. A file bad
    in every row gets its first MAX_FILE_ERRORS errors and a count of the rest."""
    body = "ok,api_key_s3cr3t\n" + "".join(f"{i},{'' if i % 2 else 1}\n" for i in range(5000))
    errors = _errors(tmp_path, "p.csv", body.encode())
    assert len(errors) == spec.MAX_FILE_ERRORS + 1
    assert errors[0].field == "parameters.file[row 1, column 2]"
    assert "2,480 more" in errors[-1].got
    text = " ".join(f"{e.field} {e.expected} {e.got}" for e in errors)
    assert "s3cr3t" not in text and "_c2" not in text
    mixed = _errors(tmp_path, "p.jsonl", b'{"s3cr3t": 1}\n{"s3cr3t": 1}\n')
    assert "s3cr3t" not in str(mixed[0]) and mixed[0].field == "parameters.file[row 1]"


@pytest.mark.parametrize(("name", "content", "expected", "got"), [
    pytest.param("p.csv", b"ab,AB\n1,2\n", "differ in more than case", "columns 1 and 2",
                 id="case-collision"),
    pytest.param("p.jsonl", b"{}\n{}\n", "at least one column", "no columns", id="no-columns"),
    pytest.param("p.jsonl", b'{"a": ' + b"[" * 20_000 + b"]" * 20_000 + b"}\n",
                 "one flat object", "line 1 nested more than 512", id="nested-deep"),
])
def test_a_file_arrow_cannot_take_is_a_field_error(
        tmp_path: Path, name: str, content: bytes, expected: str, got: str) -> None:
    """Each of these crashed or was accepted before: a JSONL line nested 20,000 deep
    killed the process in Arrow's reader (a segfault)."""
    (error,) = _errors(tmp_path, name, content)
    assert error.field == "parameters.file"
    assert expected in error.expected
    assert got in error.got


def test_a_string_column_that_is_not_utf8_is_refused_at_load(tmp_path: Path) -> None:
    """Not when the walk reaches its row (then the job would stop part way)."""
    bad = pa.Array.from_buffers(pa.binary(), 3, [None, pa.py_buffer(b"\x00\x00\x00\x00"
                                                                    b"\x01\x00\x00\x00"
                                                                    b"\x02\x00\x00\x00"
                                                                    b"\x03\x00\x00\x00"),
                                                 pa.py_buffer(b"ab\xff")]).view(pa.string())
    pa_parquet.write_table(pa.table({"s": bad}), tmp_path / "p.parquet")
    (error,) = _errors(tmp_path, "p.parquet", (tmp_path / "p.parquet").read_bytes())
    assert error.field == "parameters.file"
    assert "readable .parquet" in error.expected


def test_a_parquet_file_past_the_limit_is_refused_before_it_is_read(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its footer's row count is checked first: 200 KB of parquet can hold 50 million
    rows, a table of several hundred MiB once read."""
    pa_parquet.write_table(pa.table({"n": pa.array([7] * 50_000, pa.int64())}),
                           tmp_path / "p.parquet")
    (tmp_path / "job.yaml").write_text(json.dumps({**SPEC, "parameters": {"file": "p.parquet"}}))

    def unread(*_: object) -> None:
        raise AssertionError("the rows were read")
    monkeypatch.setitem(spec._READERS, ".parquet", unread)
    with pytest.raises(SpecError) as info:
        spec.load_job(tmp_path / "job.yaml", limits=spec.SpecLimits(max_params=1000))
    assert "at most 1,000 parameter sets" in info.value.errors[0].expected
    assert "50,000" in info.value.errors[0].got


def test_a_file_of_many_chunks_is_one_source_in_file_order(tmp_path: Path) -> None:
    """A CSV several times the reader's 1 MB block and a parquet of several row groups
    are tables of many chunks; the walk and a walk from the middle keep file order."""
    rows = [{"i": i, "s": f"{i:08d}" * 4} for i in range(60_000)]
    table = pa.Table.from_pylist(rows)
    pa_csv.write_csv(table, tmp_path / "p.csv")
    pa_parquet.write_table(table, tmp_path / "p.parquet", row_group_size=7_000)
    for name in ("p.csv", "p.parquet"):
        source = _load(tmp_path, name, (tmp_path / name).read_bytes()).params
        assert isinstance(source, FileSource)
        assert source._table.column(0).num_chunks > 1
        assert [p.values["i"] for p in source] == list(range(60_000))
        assert [p.values["i"] for p in source.iter_from(59_990)] == list(range(59_990, 60_000))
        assert list(source.iter_from(60_000)) == []
        assert list(source.iter_from(70_000)) == []


def test_the_digest_names_the_arrow_version_that_parsed_the_bytes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Another Arrow may parse the same bytes into other values: its digest differs, so
    a resume walks from the first param instead of trusting the watermark."""
    before = _load(tmp_path, "p.csv", b"x\n1e5\n2\n").params.digest
    monkeypatch.setattr(pa, "__version__", "0.0.0-other")
    assert _load(tmp_path, "p.csv", b"x\n1e5\n2\n").params.digest != before


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


def test_a_repeated_row_is_found_among_columns_that_each_repeat() -> None:
    """Four columns of 100,000 distinct values each: no column alone tells, and a row
    repeated far from its twin is found; changing one value of it makes every row
    distinct again."""
    n = 100_000
    cols = [[(k * m) % n for k in range(n)] for m in (1, 3, 7, 11)]
    repeated = [pa.chunked_array([pa.array([*c, c[5]], pa.int64())]) for c in cols]
    assert paramfile.first_repeat(pa.table(repeated, names=list('abcd'))) == (5, n)
    changed = [pa.chunked_array([pa.array([*c, c[5] if j < 3 else -1], pa.int64())])
               for j, c in enumerate(cols)]
    assert paramfile.first_repeat(pa.table(changed, names=list('abcd'))) is None
    assert paramfile.first_repeat(pa.table(repeated[:1], names=['a']).slice(0, 1)) is None


def _errors_by_rows(table: pa.Table) -> list[Any]:
    """The errors of reading every row one by one, by position, cut as a file's are."""
    normal = paramfile.normalised(table)
    positional = normal.rename_columns([f"_c{j + 1}" for j in range(normal.num_columns)])
    try:
        spec._expand_rows([(f"parameters.file[row {i}]", r)
                           for i, r in enumerate(positional.to_pylist())])
    except SpecError as exc:
        errors = [spec._by_position(e) for e in exc.errors]
        shown = errors[:spec.MAX_FILE_ERRORS]
        if len(errors) > len(shown):
            shown.append(spec.FieldError("parameters.file", "no more errors",
                                         f"{len(errors) - len(shown):,} more, not shown"))
        return shown
    return []


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(tables())
def test_a_bad_file_is_named_as_reading_every_row_would(tmp_path: Path, table: pa.Table) -> None:
    """Only the rows at fault are read one by one (found in Arrow); the errors are the
    ones reading every row gives: the first MAX_FILE_ERRORS, and the count of the rest."""
    expected = _errors_by_rows(table)
    pa_parquet.write_table(table, tmp_path / "p.parquet")
    (tmp_path / "job.yaml").write_text(json.dumps({**SPEC, "parameters": {"file": "p.parquet"}}))
    got = _outcome(lambda: load_job(tmp_path / "job.yaml"))
    if not expected:
        assert not isinstance(got, list), got
    else:
        assert got == expected


def test_many_bad_values_are_counted_without_reading_every_row(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """200,000 nulls: 20 named, the rest counted; only the rows named are read."""
    n = 200_000
    pa_parquet.write_table(pa.table({"i": pa.array(range(n), pa.int64()),
                                     "x": pa.array([None] * n, pa.float64())}),
                           tmp_path / "p.parquet")
    (tmp_path / "job.yaml").write_text(json.dumps({**SPEC, "parameters": {"file": "p.parquet"}}))
    read: list[int] = []
    rows_of = spec._expand_rows

    def counted(rows: Any) -> Any:
        read.append(len(rows))
        return rows_of(rows)
    monkeypatch.setattr(spec, "_expand_rows", counted)
    with pytest.raises(SpecError) as info:
        load_job(tmp_path / "job.yaml")
    errors = info.value.errors
    assert [e.field for e in errors[:2]] == ["parameters.file[row 0, column 2]",
                                             "parameters.file[row 1, column 2]"]
    assert errors[-1].got == f"{n - spec.MAX_FILE_ERRORS:,} more, not shown"
    assert read == [spec.MAX_FILE_ERRORS + 1]
