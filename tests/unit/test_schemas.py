"""A model output dataset keeps one schema; a param whose outputs do not fit it fails
alone, and the rest of its part is written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tidegate.schemas import SchemaMismatch, castable, fit
from tidegate.simreturn import SimReturn, outputs_to_ipc
from tidegate.writer import PartWriter


def _sim(pid: str, rep: int, table: Any) -> SimReturn:
    return SimReturn(pid, rep, 100 + rep, outputs_to_ipc({"data": table}))


def _writer(root: Path) -> PartWriter:
    return PartWriter(root, ["k"], {"k": "int"}, "all", [])


def _written(root: Path) -> tuple[dict[str, dict[str, Any]], pa.Table]:
    params = pq.read_table(root / "params").to_pylist()
    return {r["param_id"]: r for r in params}, pq.read_table(root / "model_outputs" / "data")


@pytest.mark.parametrize(("src", "dst", "ok"), [
    (pa.int32(), pa.int64(), True),
    (pa.int64(), pa.float64(), True),
    (pa.float32(), pa.float64(), True),
    (pa.null(), pa.string(), True),
    (pa.uint8(), pa.int16(), True),
    (pa.int64(), pa.int32(), False),
    (pa.int8(), pa.uint64(), False),
    (pa.float64(), pa.int64(), False),
    (pa.string(), pa.float64(), False),
    (pa.float64(), pa.string(), False),
])
def test_castable_allows_only_lossless_widening(src: pa.DataType, dst: pa.DataType,
                                               ok: bool) -> None:
    """Integers widen and become float64, float32 widens; nothing else changes type."""
    assert castable(src, dst) is ok


def test_fit_reorders_and_casts_and_names_what_does_not_fit() -> None:
    """Columns in another order are reordered; a string where floats were is named."""
    schema = pa.schema([("x", pa.float64()), ("y", pa.string())])
    fitted = fit("data", pa.table({"y": ["a"], "x": pa.array([1], pa.int64())}), schema)
    assert fitted.schema == schema
    with pytest.raises(SchemaMismatch) as info:
        fit("data", pa.table({"x": ["a"], "z": [1]}), schema)
    text = str(info.value)
    assert "x: expected double, got string" in text
    assert "missing y" in text and "unexpected z" in text


def test_a_misfit_param_fails_alone_and_the_part_is_written(tmp_path: Path) -> None:
    """Replicates of one param return floats, another param a string column: that param
    is recorded failed with the columns named, every other param's rows are written."""
    w = _writer(tmp_path)
    assert w.add("p0", {"k": 0}, [1, 2], None, [_sim("p0", 0, {"x": [1.5]}),
                                                _sim("p0", 1, {"x": [2]})], []) is None
    error = w.add("p1", {"k": 1}, [1], None, [_sim("p1", 0, {"x": ["oops"]})], [])
    assert error is not None and error.type == "OutputSchemaMismatch"
    assert "x: expected double, got string" in error.message
    assert w.add("p2", {"k": 2}, [1], None, [_sim("p2", 0, {"x": [3.0]})], []) is None
    w.write_part(0)
    params, data = _written(tmp_path)
    assert {pid: r["status"] for pid, r in params.items()} == {
        "p0": "ok", "p1": "failed", "p2": "ok"}
    assert params["p1"]["error_type"] == "OutputSchemaMismatch"
    assert sorted(data.column("param_id").to_pylist()) == ["p0", "p0", "p2"]
    assert data.schema.field("x").type == pa.float64()


def test_an_unwritable_column_fails_its_param_before_it_is_buffered(tmp_path: Path) -> None:
    """A union column (Parquet has none) fails the param at add, not the part at write."""
    union = pa.UnionArray.from_sparse(pa.array([0, 1], pa.int8()),
                                      [pa.array([1, 2]), pa.array(["a", "b"])])
    w = _writer(tmp_path)
    error = w.add("p0", {"k": 0}, [1], None, [_sim("p0", 0, pa.table({"u": union}))], [])
    assert error is not None and error.type == "OutputSchemaMismatch" and "u:" in error.message
    assert w.add("p1", {"k": 1}, [1], None, [_sim("p1", 0, {"u": [1]})], []) is None
    w.write_part(0)
    params, data = _written(tmp_path)
    assert params["p0"]["status"] == "failed" and data.column("u").to_pylist() == [1]


def test_the_first_committed_part_fixes_the_schema_for_later_runs(tmp_path: Path) -> None:
    """A writer that adopts the committed schema refuses what the first part did not hold."""
    first = _writer(tmp_path)
    first.add("p0", {"k": 0}, [1], None, [_sim("p0", 0, {"x": [1.5]})], [])
    first.write_part(0)
    again = _writer(tmp_path)
    again.adopt_schema("data", pq.read_schema(tmp_path / "model_outputs/data/part-000000.parquet"))
    error = again.add("p1", {"k": 1}, [1], None, [_sim("p1", 0, {"x": ["text"]})], [])
    assert error is not None and "expected double, got string" in error.message
