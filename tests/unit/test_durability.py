"""Schema fit at record time, staged parts and intents, and resume's checks: real Parquet
and real SQLite, no cluster."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.conftest import synthetic_spec, write_spec
from tidegate.cli import main
from tidegate.commit import Commit
from tidegate.knobs import FlushPolicy
from tidegate.simreturn import SimReturn, table_to_ipc
from tidegate.spec import Job, load_job
from tidegate.states import JobState
from tidegate.store import Ledger
from tidegate.verify import OutputDamaged, check_parts
from tidegate.writer import LEDGER, LOCK, PartWriter, SchemaMismatch, fit, storable_schema


def _sim(pid: str, rep: int, table: pa.Table) -> SimReturn:
    return SimReturn(pid, rep, 100 + rep, {"data": table_to_ipc(table)})


def _writer(root: Path) -> PartWriter:
    return PartWriter(root, ["k"], {"k": "int"}, "all", [])


def _job(tmp_path: Path, n: int = 4) -> Job:
    spec = synthetic_spec(n, targets=[], replicates=1)
    return load_job(write_spec(tmp_path / "job.yaml", spec))


def _commit(job: Job) -> Commit:
    return Commit(job, FlushPolicy(params=1000, nbytes=1 << 30, seconds=3600))


def _record(commit: Commit, job: Job, i: int, table: pa.Table) -> Any:
    p = list(job.params)[i]
    return commit.record(p.param_id, p.values, job.seeds(p.param_id), None,
                         [_sim(p.param_id, 0, table)])


FLOATS = pa.table({"x": pa.array([1.5, 2.5])})
STRINGS = pa.table({"x": pa.array(["a", "b"])})


# --- item 7: a param whose outputs do not fit fails alone ------------------------------


def test_replicates_of_different_types_fail_only_their_param(tmp_path: Path) -> None:
    """A param whose replicates return float then string fails with a message naming the
    output, the column and both types; the other params of the part are written."""
    w = _writer(tmp_path)
    assert w.add("good", {"k": 1}, [100], None, [_sim("good", 0, FLOATS)], []) is None
    error = w.add("bad", {"k": 2}, [100, 101], None,
                  [_sim("bad", 0, FLOATS), _sim("bad", 1, STRINGS)], [])
    assert error is not None and error.type == "OutputSchemaError"
    assert "output 'data'" in error.message
    assert "'x': expected double, got string" in error.message
    written = w.write_part(0)
    assert written.statuses == [("good", "ok"), ("bad", "failed")]
    data = pq.read_table(tmp_path / "model_outputs" / "data").to_pylist()
    assert {r["param_id"] for r in data} == {"good"}
    params = pq.read_table(tmp_path / "params").to_pylist()
    assert params[1]["error_type"] == "OutputSchemaError"


def test_a_failing_first_param_does_not_fix_the_schema(tmp_path: Path) -> None:
    """The schema is fixed by the first param that fits whole, not by a param that fails."""
    w = _writer(tmp_path)
    bad = w.add("bad", {"k": 1}, [1, 2], None,
                [_sim("bad", 0, STRINGS), _sim("bad", 1, FLOATS)], [])
    assert bad is not None
    assert w.add("good", {"k": 2}, [1], None, [_sim("good", 0, FLOATS)], []) is None
    assert w.schemas["data"].field("x").type == pa.float64()


@pytest.mark.parametrize(("first", "later", "fits"), [
    (pa.float64(), pa.int64(), True),
    (pa.int64(), pa.int32(), True),
    (pa.int64(), pa.uint32(), True),
    (pa.float64(), pa.float32(), True),
    (pa.large_string(), pa.string(), True),
    (pa.float64(), pa.null(), True),
    (pa.int64(), pa.float64(), False),
    (pa.int32(), pa.int64(), False),
    (pa.int64(), pa.uint64(), False),
    (pa.string(), pa.int64(), False),
    (pa.float32(), pa.float64(), False),
])
def test_only_lossless_casts_fit(first: pa.DataType, later: pa.DataType, fits: bool) -> None:
    """int -> float, narrower -> wider ints and floats, null -> anything fit; nothing else."""
    def one(t: pa.DataType) -> pa.Array:
        value = None if t == pa.null() else "1" if pa.types.is_string(t) or \
            pa.types.is_large_string(t) else 1
        return pa.array([value], t)

    schema = storable_schema(pa.table({"x": one(first)}), "data")
    table = pa.table({"x": one(later)})
    if fits:
        assert fit(table, schema, "data").schema.field("x").type == first
    else:
        with pytest.raises(SchemaMismatch, match=f"'x': expected {first}, got {later}"):
            fit(table, schema, "data")


def test_missing_and_extra_columns_are_named() -> None:
    """A table lacking a column or carrying a new one names both."""
    schema = storable_schema(pa.table({"x": [1.0], "y": [1]}), "data")
    with pytest.raises(SchemaMismatch) as err:
        fit(pa.table({"x": [1.0], "z": ["a"]}), schema, "data")
    assert "'y': expected int64, got no such column" in str(err.value)
    assert "'z': not in the dataset (got string)" in str(err.value)


def test_a_union_column_fails_its_param_not_the_part(tmp_path: Path) -> None:
    """A column Parquet cannot store fails its param at record time; the part is written."""
    union = pa.UnionArray.from_sparse(pa.array([0, 1], pa.int8()),
                                      [pa.array([1, 2]), pa.array(["a", "b"])])
    w = _writer(tmp_path)
    error = w.add("u", {"k": 1}, [1], None, [_sim("u", 0, pa.table({"x": union}))], [])
    assert error is not None and "cannot be stored in Parquet" in error.message
    assert "'x' sparse_union" in error.message
    w.add("ok", {"k": 2}, [1], None, [_sim("ok", 0, FLOATS)], [])
    assert [s for _, s in w.write_part(0).statuses] == ["failed", "ok"]


def test_schema_is_fixed_by_the_first_committed_part_across_runs(tmp_path: Path) -> None:
    """After a resume, the first committed part's footer fixes the schema: a param whose
    outputs differ fails (and counts as failed), one that widens losslessly is cast."""
    job = _job(tmp_path)
    c = _commit(job)
    c.resume(0)
    assert _record(c, job, 0, FLOATS) is None
    c.close(JobState.INTERRUPTED)
    c = _commit(job)
    c.resume(0)
    error = _record(c, job, 1, STRINGS)
    assert error is not None and "expected double, got string" in error.message
    assert _record(c, job, 2, pa.table({"x": pa.array([3], pa.int64())})) is None
    closed = c.close(JobState.INTERRUPTED)
    assert (closed.ok, closed.failed) == (2, 1)
    data = ds.dataset(job.output_dir / "model_outputs" / "data").to_table()
    assert data.schema.field("x").type == pa.float64()
    assert sorted(data.column("x").to_pylist()) == [1.5, 2.5, 3.0]


# --- item 9: staged parts are invisible; intents roll forward or back -------------------


def test_a_staged_part_is_invisible_to_readers(tmp_path: Path) -> None:
    """Staged files (written, not yet published) are seen by neither pyarrow.dataset
    discovery nor a DuckDB `*.parquet` glob; after publishing both read them."""
    from tidegate.writer import publish

    w = _writer(tmp_path)
    w.add("p", {"k": 1}, [1], None, [_sim("p", 0, FLOATS)], [])
    staged = w.stage_part(0)
    assert all((tmp_path / i.tmp).is_file() for i in staged.info.values())
    assert ds.dataset(tmp_path / "model_outputs" / "data").to_table().num_rows == 0
    glob = f"{tmp_path}/model_outputs/data/*.parquet"
    with pytest.raises(duckdb.IOException):
        duckdb.sql(f"SELECT count(*) FROM '{glob}'").fetchall()
    publish(tmp_path, staged)
    assert duckdb.sql(f"SELECT count(*) FROM '{glob}'").fetchall() == [(2,)]


def _intent(job: Job, published: bool) -> None:
    """Leave part 0 as a run that died after recording its intent would."""
    from tidegate.store import RecordedFile
    from tidegate.writer import publish

    c = _commit(job)
    c.resume(0)
    _record(c, job, 0, FLOATS)
    w = c._writer
    staged = w.stage_part(0)
    sizes = {f: RecordedFile(i.nbytes, i.sha256, i.tmp) for f, i in staged.info.items()}
    c.ledger.record_intent(0, sizes, staged.statuses)
    if published:
        publish(job.output_dir, staged)
    c.close_ledger()


def test_an_intent_whose_files_are_in_place_rolls_forward(tmp_path: Path) -> None:
    """Files renamed into place with their recorded sizes: resume commits the part."""
    job = _job(tmp_path)
    _intent(job, published=True)
    resumed = _commit(job).resume(0)
    assert resumed.committed == {next(iter(job.params)).param_id}
    with Ledger(job.output_dir / LEDGER) as ledger:
        assert ledger.intents() == [] and len(ledger.parts()[0].sizes) == 2


def test_an_intent_whose_files_are_not_in_place_rolls_back(tmp_path: Path) -> None:
    """Files still under temporary names: resume removes them, nothing is committed."""
    job = _job(tmp_path)
    _intent(job, published=False)
    assert list(job.output_dir.rglob(".part-*.tmp"))
    resumed = _commit(job).resume(0)
    assert resumed.committed == frozenset()
    assert not list(job.output_dir.rglob(".part-*")) and not list(job.output_dir.rglob("part-*"))


# --- item 8: resume refuses damage --------------------------------------------------------


def _two_parts(tmp_path: Path) -> Job:
    job = _job(tmp_path)
    for i in range(2):
        c = _commit(job)
        c.resume(0)
        _record(c, job, i, FLOATS)
        c.close(JobState.INTERRUPTED)
    return job


def _damage(out: Path, how: str) -> None:
    part = out / "model_outputs" / "data" / "part-000001.parquet"
    if how == "truncated":
        part.write_bytes(part.read_bytes()[:-10])
    elif how == "deleted":
        part.unlink()
    elif how == "params-rows":
        with sqlite3.connect(out / LEDGER) as db:
            db.execute("PRAGMA foreign_keys=OFF")
            db.execute("DELETE FROM params WHERE part = 1")


@pytest.mark.parametrize("how", ["truncated", "deleted", "params-rows"])
def test_resume_refuses_a_damaged_output(tmp_path: Path, how: str) -> None:
    """A truncated or deleted part, or deleted ledger rows, stop the resume with a message
    naming the part and `tidegate verify --repair`; nothing is removed."""
    job = _two_parts(tmp_path)
    out = job.output_dir
    _damage(out, how)
    before = sorted(p.name for p in out.rglob("*"))
    with pytest.raises(OutputDamaged) as err:
        _commit(job).resume(0)
    assert "part 1:" in str(err.value)
    assert f"tidegate verify {out} --repair" in str(err.value)
    assert sorted(p.name for p in out.rglob("*")) == before


def test_a_missing_ledger_beside_parts_is_refused_not_cleaned(tmp_path: Path) -> None:
    """With the ledger deleted, resume refuses and every part file stays."""
    job = _two_parts(tmp_path)
    out = job.output_dir
    (out / LEDGER).unlink()
    parts = sorted(out.rglob("part-*.parquet"))
    with pytest.raises(OutputDamaged, match=r"ledger _ledger\.sqlite is missing"):
        _commit(job).resume(0)
    assert sorted(out.rglob("part-*.parquet")) == parts and len(parts) == 4


# --- tidegate verify ----------------------------------------------------------------------


def test_verify_finds_a_bit_flip_resume_does_not_see(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """A flipped byte of the same size passes resume's cheap check; verify's checksum finds
    it (exit 1); --repair un-commits the part (exit 0), and a resume reruns its param."""
    job = _two_parts(tmp_path)
    out = job.output_dir
    part = out / "model_outputs" / "data" / "part-000001.parquet"
    raw = bytearray(part.read_bytes())
    raw[8] ^= 0xFF
    part.write_bytes(bytes(raw))
    with Ledger(out / LEDGER) as ledger:
        assert check_parts(out, ledger, full=False) == []
    assert main(["verify", str(out)]) == 1
    assert "sha256 differs" in capsys.readouterr().out
    assert main(["verify", str(out), "--repair"]) == 0
    assert "part 1: un-committed" in capsys.readouterr().out
    assert main(["verify", str(out)]) == 0
    resumed = _commit(job).resume(0)
    assert resumed.committed == {next(iter(job.params)).param_id}


def test_verify_rebuilds_a_lost_ledger_from_the_parts(tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    """Without a ledger verify reports damage (1); --repair rebuilds it from the parts'
    param ids and statuses, and the job resumes with both params committed."""
    job = _two_parts(tmp_path)
    out = job.output_dir
    (out / LEDGER).unlink()
    assert main(["verify", str(out)]) == 1
    assert "missing" in capsys.readouterr().out
    assert main(["verify", str(out), "--repair", "--json"]) == 0
    assert '"clean": true' in capsys.readouterr().out
    resumed = _commit(job).resume(0)
    assert resumed.committed == {next(iter(job.params)).param_id, list(job.params)[1].param_id}
    assert (resumed.ok, resumed.failed) == (2, 0)


@pytest.mark.parametrize("make", ["missing", "file", "empty"])
def test_verify_bad_input_exits_2(tmp_path: Path, make: str,
                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Not a directory, or a directory with no tidegate output: exit 2 naming it, with
    --repair too, which leaves no lock file behind."""
    target = tmp_path / "x"
    if make == "file":
        target.write_text("hi")
    elif make == "empty":
        target.mkdir()
    for repair in ([], ["--repair"]):
        assert main(["verify", str(target), *repair]) == 2
        err = capsys.readouterr().err
        assert err.startswith("tidegate: error: OUTPUT_DIR:") and "Traceback" not in err
    if make == "empty":  # --repair took no lock there: it is not an output
        assert list(target.iterdir()) == []


def test_a_failed_write_removes_its_temporaries_and_commits_nothing(tmp_path: Path) -> None:
    """A write that fails mid-part (a file size limit here) leaves no temporary file and
    no ledger row; the error names the path and says no space."""
    import resource

    job = _job(tmp_path)
    c = _commit(job)
    c.resume(0)
    _record(c, job, 0, pa.table({"x": pa.array([float(i) for i in range(50_000)])}))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    import signal

    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, hard))
    try:
        closed = c.close(JobState.SUCCEEDED)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old)
    assert closed.state == JobState.INTERRUPTED
    assert closed.error is not None and "no space left on device" in str(closed.error)
    assert str(job.output_dir) in str(closed.error)
    assert (closed.ok, closed.parts) == (0, 0)
    leftovers = [p.name for p in job.output_dir.rglob("*")
                 if p.name.startswith(".") and p.name != LOCK]  # the lock file stays
    assert leftovers == [] and not list(job.output_dir.rglob("part-*"))
    assert os.path.exists(job.output_dir / LEDGER)


@pytest.mark.parametrize("manifest", ["missing", "malformed", "no job"])
def test_verify_repair_without_a_usable_manifest_says_what_to_do(tmp_path: Path,
                                                                 manifest: str) -> None:
    """A lost ledger beside parts whose manifest is missing, not JSON, or names no job:
    `verify --repair` (the real CLI) exits 2 naming the manifest and what is wrong, no
    traceback, nothing removed; it offers --restart only where a run accepts it (without
    a manifest or ledger `run` refuses the directory as someone else's)."""
    from tests.conftest import tidegate

    job = _two_parts(tmp_path)
    out = job.output_dir
    (out / LEDGER).unlink()
    if manifest == "missing":
        (out / "manifest.json").unlink()
    elif manifest == "malformed":
        (out / "manifest.json").write_text('{"job_id": "synthetic", ')
    else:
        (out / "manifest.json").write_text('["synthetic"]')
    before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
    done = tidegate("verify", out, "--repair")
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr
    assert "Traceback" not in err and err.startswith("tidegate: error: cannot rebuild")
    assert f"{out / 'manifest.json'} " + {"missing": "is missing", "malformed": "cannot be read",
                                          "no job": "names no job"}[manifest] in err
    assert f"move params/, model_outputs/, targets/ out of {out}" in err
    assert ("--restart" in err) == (manifest != "missing")
    assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
    if manifest == "missing":  # what the message leaves out would indeed be refused
        spec = tmp_path / "job.yaml"
        refused = tidegate("run", spec, "--restart", "--no-progress", cwd=tmp_path)
        assert refused.returncode == 2 and "--force" in refused.stderr, refused.stderr


def test_a_linked_part_file_the_ledger_does_not_name_is_reported_and_refused(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A link named like a part that no ledger row names would be read by any dataset
    reader as this output's data: verify reports it (exit 1), resume refuses it naming
    it, and neither removes the link or its target."""
    from tidegate.writer import UnsafeOutput

    job = _two_parts(tmp_path)
    out = job.output_dir
    copy = tmp_path / "copy.parquet"
    copy.write_bytes((out / "params" / "part-000000.parquet").read_bytes())
    link = out / "params" / "part-000009.parquet"
    link.symlink_to(copy)
    assert main(["verify", str(out)]) == 1
    assert "part 9: params/part-000009.parquet: not in the ledger, and a symbolic link" \
        in capsys.readouterr().out
    with pytest.raises(UnsafeOutput, match=r"part-000009\.parquet is a symbolic link"):
        _commit(job).resume(0)
    assert link.is_symlink() and copy.exists()


# --- parts are written in the background --------------------------------------------


def _gated_commit(job: Job, gate: Any, policy: FlushPolicy) -> Commit:
    """A Commit whose part writes wait for ``gate`` (a threading.Event) to be set."""
    c = Commit(job, policy)
    write = c._writer.write_taken

    def gated(taken: Any) -> Any:
        assert gate.wait(30), "the test never opened the gate"
        return write(taken)

    c._writer.write_taken = gated  # type: ignore[method-assign]
    return c


def _ids_in(job: Job) -> list[str]:
    return sorted(ds.dataset(job.output_dir / "params").to_table().column("param_id")
                  .to_pylist())


def test_a_part_is_written_while_the_loop_goes_on(tmp_path: Path) -> None:
    """maybe_flush hands the part to a thread and returns at once; params completed
    meanwhile buffer for the next part; the part counts once the thread is done and
    the next call commits it. Every param is in the output once."""
    import threading

    job = _job(tmp_path, n=4)
    gate = threading.Event()
    c = _gated_commit(job, gate, FlushPolicy(params=2, nbytes=1 << 30, seconds=3600))
    c.resume(0)
    _record(c, job, 0, FLOATS)
    _record(c, job, 1, FLOATS)
    assert c.maybe_flush(0) is None  # the write waits at the gate: nothing blocks here
    _record(c, job, 2, FLOATS)
    assert c.maybe_flush(0) is None
    assert c.ledger.counts().params == 0
    assert c.seconds_to_flush(0) < 1  # the loop looks again soon
    gate.set()
    c._staging[1].result(timeout=30)  # type: ignore[index]
    flushed = c.maybe_flush(0)
    assert flushed is not None and flushed.params == 2
    assert c.ledger.counts().params == 2
    _record(c, job, 3, FLOATS)
    closed = c.close(JobState.SUCCEEDED)
    assert (closed.ok, closed.parts) == (4, 2)
    assert _ids_in(job) == sorted(p.param_id for p in job.params)


def test_results_twice_a_part_wait_for_the_write(tmp_path: Path) -> None:
    """Back-pressure: with a part still being written, buffering twice what makes a part
    due makes maybe_flush wait for that write, then start the next."""
    import threading

    job = _job(tmp_path, n=4)
    gate = threading.Event()
    c = _gated_commit(job, gate, FlushPolicy(params=1, nbytes=1 << 30, seconds=3600))
    c.resume(0)
    _record(c, job, 0, FLOATS)
    assert c.maybe_flush(0) is None  # part 0 at the gate
    _record(c, job, 1, FLOATS)
    assert c.maybe_flush(0) is None  # 1 buffered: below twice the policy
    _record(c, job, 2, FLOATS)
    threading.Timer(0.2, gate.set).start()  # the wait below must be what lets it finish
    flushed = c.maybe_flush(0)
    assert flushed is not None and flushed.params == 1
    assert c._writer.pending_params == 0  # params 1 and 2 are the next part, in flight
    closed = c.close(JobState.SUCCEEDED)
    assert (closed.ok, closed.parts) == (3, 2)


def test_a_failed_background_write_raises_at_the_next_call(tmp_path: Path) -> None:
    """A write that fails in the thread raises OutputWriteError on the loop, its
    temporaries removed and nothing committed; a rerun resumes those params."""
    from tidegate.writer import OutputWriteError

    job = _job(tmp_path, n=2)
    c = Commit(job, FlushPolicy(params=1, nbytes=1 << 30, seconds=3600))

    def failing(taken: Any) -> Any:
        raise OutputWriteError(job.output_dir / "params", OSError(28, "No space left"))

    c._writer.write_taken = failing  # type: ignore[method-assign]
    c.resume(0)
    _record(c, job, 0, FLOATS)
    assert c.maybe_flush(0) is None
    c._staging[1].exception(timeout=30)  # type: ignore[index]
    with pytest.raises(OutputWriteError):
        c.maybe_flush(0)
    closed = c.close(JobState.SUCCEEDED, OutputWriteError(job.output_dir, OSError(28, "x")))
    assert closed.ok == 0 and closed.state is JobState.INTERRUPTED
    leftovers = [p for p in job.output_dir.rglob("*") if p.is_file()
                 and p.name not in (LEDGER, LOCK, "manifest.json")]
    assert leftovers == []
