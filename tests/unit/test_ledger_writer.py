"""The ledger (real SQLite) and the part writer (real Parquet read back with pyarrow)."""

from __future__ import annotations

import copy
import shutil
import sqlite3
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import yaml

from tidegate.migrations import SchemaError, SchemaTooNew
from tidegate.simreturn import TaskError, run_sim, run_target
from tidegate.spec import load_job
from tidegate.store import SCHEMA_VERSION, Ledger, LedgerMismatch
from tidegate.writer import LEDGER, PartWriter, discard_output, remove_unrecorded

MODEL = "tidegate.workloads:synthetic"
# An output the release before schema versions wrote: 2 of 3 params committed.
OUTPUT_V1 = Path(__file__).parent.parent / "fixtures" / "output_v1"


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


def test_remove_unrecorded_keeps_parts_params_rows_name(tmp_path: Path) -> None:
    """A part file the ledger's parts table lacks but its params rows still name (a
    deleted parts row) is kept: it may be those params' only data."""
    writer = _writer(tmp_path)
    _add(writer, "p1")
    referenced = set(writer.write_part(1).files)
    _add(writer, "p2")
    orphan = set(writer.write_part(2).files)
    removed = remove_unrecorded(tmp_path, set(), referenced=[1])
    assert set(removed) == orphan
    assert all((tmp_path / f).exists() for f in referenced)


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


def _user_version(path: Path) -> int:
    with sqlite3.connect(path) as db:
        return int(db.execute("PRAGMA user_version").fetchone()[0])


def test_new_ledger_records_its_schema_version(tmp_path: Path) -> None:
    """A fresh ledger is created through the migrations and carries the newest version."""
    path = tmp_path / LEDGER
    with Ledger(path) as ledger:
        assert ledger.schema_version == SCHEMA_VERSION == 6
    assert _user_version(path) == 6
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
            "6",
        )


def test_a_parts_params_are_found_by_the_index_not_a_scan(tmp_path: Path) -> None:
    """Resume asks each committed part for its params: one index look-up each, never a
    scan of every committed param (900 scans of 900,000 rows took 51 s)."""
    path = tmp_path / LEDGER
    with Ledger(path):
        pass
    with sqlite3.connect(path) as db:
        plan = " ".join(str(row[-1]) for row in db.execute(
            "EXPLAIN QUERY PLAN SELECT param_id FROM params WHERE part = ?", (1,)))
    assert "USING INDEX params_part" in plan or "USING COVERING INDEX params_part" in plan, plan


def test_ledger_of_the_unversioned_release_migrates_to_the_newest(tmp_path: Path) -> None:
    """The fixture's ledger (user_version 0, read as version 1) is migrated to the newest
    on open and resumes its job with its parts, params and counts as they were. Its
    identity lists every param id (as that release recorded it): the rest of it matches,
    so it is adopted, and its params keep that release's typed ids (its run_seconds
    0.0 is not spelled 0 in them)."""
    root = shutil.copytree(OUTPUT_V1, tmp_path / "output_v1")
    path = root / "out" / LEDGER
    job = load_job(root / "job.yaml")
    with Ledger(path) as ledger:
        assert ledger.schema_version == SCHEMA_VERSION
        assert not ledger.typed_ids()
        assert ledger.bind(job.job_id, job.fingerprint, job.identity()) is True
        assert ledger.typed_ids()
        assert ledger.bind(job.job_id, job.fingerprint, job.identity()) is True
        committed = ledger.committed_param_ids()
        counts = ledger.counts()
        assert (counts.ok, counts.failed, counts.parts) == (2, 0, 2)
        assert ledger.next_part() == 2
        files = ledger.files()
    assert len(files) == 6 and all((root / "out" / f).is_file() for f in files)
    by_k = {p.values["k"]: p.param_id for p in job.params.typed_ids()}
    assert committed == {by_k[0], by_k[1]}
    assert not committed & {p.param_id for p in job.params}  # canonical ids differ here
    assert _user_version(path) == SCHEMA_VERSION
    with Ledger(path) as ledger:
        assert ledger.typed_ids()
        assert [p.sizes for p in ledger.parts()] == [{}, {}]  # v1 parts: total size only
        assert ledger.intents() == []


def test_ledger_of_the_unversioned_release_adopts_grown_params_not_new_names(
        tmp_path: Path) -> None:
    """Adopting a ledger that lists param ids ignores them: one more param is the same
    job; a new parameter name is another, refused naming it, and the ledger keeps its
    old identity."""
    root = shutil.copytree(OUTPUT_V1, tmp_path / "output_v1")
    spec = yaml.safe_load((root / "job.yaml").read_text())
    named = copy.deepcopy(spec)
    for row in named["parameters"]["values"]:
        row["extra"] = 1
    (root / "named.yaml").write_text(yaml.safe_dump(named))
    spec["parameters"]["values"].append({"k": 3, "output_bytes": 256, "run_seconds": 0.0})
    (root / "job.yaml").write_text(yaml.safe_dump(spec))
    path = root / "out" / LEDGER
    with Ledger(path) as ledger:
        before = ledger._meta()
    other = load_job(root / "named.yaml")
    with Ledger(path) as ledger, pytest.raises(LedgerMismatch,
                                               match=r"differs in: param_names\)"):
        ledger.bind(other.job_id, other.fingerprint, other.identity())
    with Ledger(path) as ledger:
        assert ledger._meta() == before
    job = load_job(root / "job.yaml")
    with Ledger(path) as ledger:
        assert ledger.bind(job.job_id, job.fingerprint, job.identity()) is True
        assert ledger.typed_ids()


@pytest.mark.parametrize("content", [b"", b"\x00garbage" * 500], ids=["short", "long"])
def test_ledger_that_is_not_sqlite_is_refused(tmp_path: Path, content: bytes) -> None:
    """A ledger file of other bytes raises SchemaError naming it; it is left as it was."""
    path = tmp_path / LEDGER
    path.write_bytes(b"not SQLite: " + content)
    with pytest.raises(SchemaError) as err:
        Ledger(path)
    assert str(err.value).startswith(f"{path}: not a SQLite database")
    assert "expected a tidegate ledger" in str(err.value)
    assert path.read_bytes() == b"not SQLite: " + content
    assert [p.name for p in tmp_path.iterdir()] == [LEDGER]


def test_sqlite_file_without_ledger_tables_is_refused(tmp_path: Path) -> None:
    """Someone else's SQLite file at the ledger's path is not taken for a ledger."""
    path = tmp_path / LEDGER
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE params (name TEXT, value REAL)")
    with pytest.raises(SchemaError) as err:
        Ledger(path)
    assert str(err.value) == (
        f"{path}: not a tidegate ledger: expected tables meta, params, parts, found params; "
        "point `output` elsewhere or rerun with --restart to discard it"
    )


def test_ledger_from_a_newer_release_is_refused(tmp_path: Path) -> None:
    """A ledger at a version above this release's raises SchemaTooNew with both numbers."""
    path = tmp_path / LEDGER
    Ledger(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(SchemaTooNew) as err:
        Ledger(path)
    assert str(err.value) == (
        f"{path}: tidegate ledger schema version {SCHEMA_VERSION + 1} is newer than this "
        f"release supports (newest {SCHEMA_VERSION}); upgrade tidegate to use it"
    )
