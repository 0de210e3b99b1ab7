"""The ledger (real SQLite) and the part writer (real Parquet read back with pyarrow)."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tidegate.simreturn import TaskError, run_sim, run_target
from tidegate.store import Ledger, LedgerMismatch
from tidegate.writer import LEDGER, PartWriter, discard_output, remove_unrecorded

MODEL = "tidegate.workloads:synthetic"


def _writer(root: Path, outputs: str | list[str] = "all") -> PartWriter:
    return PartWriter(root, ["a", "b"], {"a": "float", "b": "str"}, outputs, ["t"])


def _add(writer: PartWriter, pid: str, error: TaskError | None = None) -> None:
    sims = [run_sim(MODEL, {"output_bytes": 2048}, pid, r, 10 + r) for r in range(2)]
    target = run_target("tidegate.workloads:synthetic_loss", "t", pid, *sims)
    writer.add(pid, {"a": 1.5, "b": "x"}, [10, 11], error, sims, [target])


def test_ledger_commit_is_exactly_once(tmp_path: Path) -> None:
    """A param id can be committed once; a second commit of it is rolled back whole."""
    with Ledger(tmp_path / LEDGER) as ledger:
        ledger.bind("j", "f1", {"model": "m"})
        ledger.commit(0, ["params/part-000000.parquet"], [("p1", "ok"), ("p2", "failed")], 10)
        with pytest.raises(sqlite3.IntegrityError):
            ledger.commit(1, ["params/part-000001.parquet"], [("p3", "ok"), ("p1", "ok")], 10)
        assert ledger.committed_param_ids() == {"p1", "p2"}
        counts = ledger.counts()
        assert (counts.ok, counts.failed, counts.parts) == (1, 1, 1)
        assert ledger.next_part() == 1
        assert ledger.files() == {"params/part-000000.parquet"}


def test_ledger_survives_reopen_and_refuses_other_job(tmp_path: Path) -> None:
    """A reopened ledger resumes the same job and names what differs for another one."""
    path = tmp_path / LEDGER
    with Ledger(path) as ledger:
        assert ledger.bind("j", "f1", {"model": "m", "seed": 1}) is False
        ledger.commit(0, ["params/part-000000.parquet"], [("p1", "ok")], 5)
    with Ledger(path) as ledger:
        assert ledger.bind("j", "f1", {"model": "m", "seed": 1}) is True
        assert ledger.committed_param_ids() == {"p1"}
        with pytest.raises(LedgerMismatch) as err:
            ledger.bind("j", "f2", {"model": "m", "seed": 2})
    assert err.value.differs == ["seed"]
    assert "--restart" in str(err.value)


def test_part_writer_writes_every_dataset(tmp_path: Path) -> None:
    """One part holds params, model outputs with their key columns, and target rows."""
    writer = _writer(tmp_path)
    _add(writer, "p1")
    _add(writer, "p2", TaskError("ValueError", "boom", "Traceback ..."))
    written = writer.write_part(0)
    assert written.files == [
        "model_outputs/data/part-000000.parquet",
        "params/part-000000.parquet",
        "targets/t/part-000000.parquet",
    ]
    assert written.statuses == [("p1", "ok"), ("p2", "failed")]
    assert writer.pending_params == 0
    params = pq.read_table(tmp_path / "params").to_pylist()
    assert [r["status"] for r in params] == ["ok", "failed"]
    assert params[0]["param_a"] == 1.5 and params[0]["param_b"] == "x"
    assert params[0]["seeds"] == [10, 11]
    assert params[1]["error"] == "ValueError: boom" and params[1]["error_type"] == "ValueError"
    data = ds.dataset(tmp_path / "model_outputs" / "data").to_table()
    assert data.column_names[:3] == ["param_id", "replicate", "seed"]
    assert set(data.column("param_id").to_pylist()) == {"p1", "p2"}
    assert sorted(set(data.column("replicate").to_pylist())) == [0, 1]
    targets = pq.read_table(tmp_path / "targets" / "t").to_pylist()
    assert [(r["param_id"], r["n_replicates"]) for r in targets] == [("p1", 2), ("p2", 2)]
    assert not list(tmp_path.rglob(".part-*"))


def test_outputs_selection(tmp_path: Path) -> None:
    """outputs: none writes no model outputs, only params and targets."""
    writer = _writer(tmp_path, outputs="none")
    _add(writer, "p1")
    written = writer.write_part(3)
    assert written.files == ["params/part-000003.parquet", "targets/t/part-000003.parquet"]


def test_remove_unrecorded_keeps_only_ledger_files(tmp_path: Path) -> None:
    """Part files and temporaries the ledger does not name are removed; others stay."""
    writer = _writer(tmp_path)
    _add(writer, "p1")
    kept = set(writer.write_part(0).files)
    _add(writer, "p2")
    orphan = set(writer.write_part(1).files)
    (tmp_path / "params" / ".part-000002.parquet.tmp").write_bytes(b"partial")
    (tmp_path / "params" / "notes.txt").write_text("user file")
    removed = remove_unrecorded(tmp_path, kept)
    assert set(removed) == orphan | {"params/.part-000002.parquet.tmp"}
    assert all((tmp_path / f).exists() for f in kept)
    assert (tmp_path / "params" / "notes.txt").exists()


def test_discard_output_removes_only_tidegate_files(tmp_path: Path) -> None:
    """--restart removes the datasets, manifest and ledger, and nothing else."""
    writer = _writer(tmp_path)
    _add(writer, "p1")
    writer.write_part(0)
    Ledger(tmp_path / LEDGER).close()
    (tmp_path / "manifest.json").write_text("{}")
    (tmp_path / "README").write_text("mine")
    discard_output(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README"]
