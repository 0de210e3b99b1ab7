"""`tidegate run` end to end: real LocalCluster worker processes, real Parquet, real SQLite."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path

import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from tests.conftest import (
    read_dataset,
    start_tidegate,
    synthetic_spec,
    tidegate,
    wait_for_part,
    wait_quietly,
    write_spec,
)


def _summary(proc) -> dict:
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ledger_ids(out: Path) -> list[str]:
    with sqlite3.connect(out / "_ledger.sqlite") as db:
        return [r[0] for r in db.execute("SELECT param_id FROM params")]


def _assert_exactly_once(out: Path, n_params: int) -> None:
    ids = [r["param_id"] for r in read_dataset(out / "params")]
    assert len(ids) == n_params
    assert len(set(ids)) == n_params
    assert sorted(ids) == sorted(_ledger_ids(out))


def test_sir_example_end_to_end(tmp_path: Path, sir_dir: Path) -> None:
    """The SIR example runs to completion and every dataset has its rows and schema."""
    out = tmp_path / "sir"
    proc = tidegate("run", sir_dir / "job.yaml", "--output", out, "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = _summary(proc)
    for key in ("job_id", "state", "params", "batch_size", "oom_events", "worker_restarts",
                "wall_seconds", "output"):
        assert key in summary
    assert summary["state"] == "succeeded"
    n = summary["params"]["total"]
    assert n >= 100
    assert summary["params"] == {"total": n, "ok": n, "failed": 0, "resumed": 0, "quarantined": 0,
                                 "orphaned": 0}
    assert summary["batch_size"]["min"] <= summary["batch_size"]["final"]

    params = pq.read_table(out / "params")
    assert params.num_rows == n
    assert {"param_id", "param_beta", "param_gamma", "seeds", "status", "error"} <= set(
        params.column_names
    )
    assert set(params.column("status").to_pylist()) == {"ok"}
    assert all(len(s) == 3 for s in params.column("seeds").to_pylist())

    for target in ("incidence", "peak"):
        t = pq.read_table(out / "targets" / target)
        assert t.num_rows == n
        assert t.column_names == ["param_id", "loss", "n_replicates", "diagnostics"]
        assert set(t.column("n_replicates").to_pylist()) == {3}
        assert set(t.column("param_id").to_pylist()) == set(params.column("param_id").to_pylist())

    incidence = ds.dataset(out / "model_outputs" / "incidence").to_table()
    assert incidence.column_names[:3] == ["param_id", "replicate", "seed"]
    pairs = set(zip(incidence.column("param_id").to_pylist(),
                    incidence.column("replicate").to_pylist(), strict=True))
    assert len(pairs) == n * 3
    summary_rows = ds.dataset(out / "model_outputs" / "summary").to_table()
    assert summary_rows.num_rows == n * 3

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state"] == "succeeded"
    assert manifest["counts"]["ok"] == n
    _assert_exactly_once(out, n)


def test_failing_params_are_recorded_and_exit_4(tmp_path: Path) -> None:
    """Params whose model raises are written as failed with their error; the rest are ok."""
    values = [{"k": i, "fail": "bad k" if i % 4 == 0 else ""} for i in range(12)]
    spec = write_spec(tmp_path / "job.yaml",
                      synthetic_spec(12, parameters={"values": values}))
    proc = tidegate("run", spec, "--json", "--no-progress")
    assert proc.returncode == 4, proc.stderr
    summary = _summary(proc)
    assert summary["state"] == "completed_with_failures"
    assert summary["params"]["failed"] == 3 and summary["params"]["ok"] == 9
    rows = read_dataset(tmp_path / "out" / "params")
    failed = [r for r in rows if r["status"] == "failed"]
    assert sorted(r["param_k"] for r in failed) == [0, 4, 8]
    for r in failed:
        assert r["error_type"] == "RuntimeError"
        assert "bad k" in r["error"]
        assert "Traceback" in r["traceback"]
    assert all(r["error"] is None for r in rows if r["status"] == "ok")
    # Targets are written for the ok params only.
    scored = {r["param_id"] for r in read_dataset(tmp_path / "out" / "targets" / "score")}
    assert scored == {r["param_id"] for r in rows if r["status"] == "ok"}


def _kill_spec(tmp_path: Path, name: str) -> Path:
    values = [{"k": i, "output_bytes": 4096, "run_seconds": 0.04} for i in range(48)]
    spec = synthetic_spec(48, parameters={"values": values}, output=name)
    return write_spec(tmp_path / f"{name}.yaml", spec)


def _dump(out: Path) -> dict[str, list[dict]]:
    return {
        "params": read_dataset(out / "params"),
        "data": read_dataset(out / "model_outputs" / "data"),
        "score": read_dataset(out / "targets" / "score"),
    }


def test_sigkill_then_resume_equals_clean_run(tmp_path: Path) -> None:
    """kill -9 of tidegate and its cluster at a random point, then a rerun: every param
    exactly once and the output equal, row for row, to an uninterrupted run."""
    clean = tidegate("run", _kill_spec(tmp_path, "clean"), "--json", "--no-progress")
    assert clean.returncode == 0, clean.stderr
    expected = _dump(tmp_path / "clean")

    spec = _kill_spec(tmp_path, "killed")
    out = tmp_path / "killed"
    rng = random.Random()
    for _ in range(2):
        proc = start_tidegate("run", spec, "--flush-params", "3", "--no-progress")
        try:
            # Once the run is producing parts, kill it at a random moment.
            if wait_for_part(proc, out):
                wait_quietly(proc, rng.uniform(0.0, 1.5))
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    resumed = tidegate("run", spec, "--json", "--no-progress")
    assert resumed.returncode == 0, resumed.stderr
    summary = _summary(resumed)
    assert summary["params"]["ok"] == 48
    _assert_exactly_once(out, 48)
    assert _dump(out) == expected


def test_ctrl_c_flushes_and_rerun_resumes(tmp_path: Path) -> None:
    """SIGINT to the process group: exit 130 with completed params committed; a rerun
    finishes the rest without redoing them."""
    values = [{"k": i, "run_seconds": 0.1} for i in range(40)]
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(40, parameters={"values": values}))
    out = tmp_path / "out"
    proc = start_tidegate("run", spec, "--flush-params", "2", "--batch-size", "2",
                          "--no-progress")
    assert wait_for_part(proc, out), proc.communicate()[1]
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    committed = len(_ledger_ids(out))
    assert 0 < committed < 40
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state"] == "interrupted"
    rerun = tidegate("run", spec, "--json", "--no-progress")
    assert rerun.returncode == 0, rerun.stderr
    assert _summary(rerun)["params"]["resumed"] == committed
    _assert_exactly_once(out, 40)


def test_changed_spec_is_refused_unless_restart(tmp_path: Path) -> None:
    """Another spec pointed at the same output is refused with exit 2; --restart redoes it."""
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(4))
    assert tidegate("run", spec, "--no-progress").returncode == 0
    write_spec(tmp_path / "job.yaml", synthetic_spec(4, seed=8))
    refused = tidegate("run", spec, "--no-progress")
    assert refused.returncode == 2
    assert "seed" in refused.stderr and "--restart" in refused.stderr
    assert "Traceback" not in refused.stderr
    again = tidegate("run", spec, "--restart", "--json", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert _summary(again)["params"]["resumed"] == 0
    _assert_exactly_once(tmp_path / "out", 4)


def test_unreachable_scheduler_exits_3(tmp_path: Path) -> None:
    """A scheduler address nobody listens on gives exit 3 and a message, no traceback."""
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(2))
    proc = tidegate("run", spec, "--scheduler", "tcp://127.0.0.1:9", "--no-progress")
    assert proc.returncode == 3
    assert "cannot reach the Dask scheduler at tcp://127.0.0.1:9" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out" / "params").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--batch-size", "0"], "--batch-size: expected a whole number >= 1, got 0"),
        (["--memory-limit", "lots"], "--memory-limit: expected a size"),
        (["--workers", "two"], "--workers: expected a whole number >= 1, got 'two'"),
        (["--scheduler", "tcp://127.0.0.1:9", "--workers", "2"], "cannot be combined"),
    ],
)
def test_bad_flags_exit_2(tmp_path: Path, args: list[str], needle: str) -> None:
    """Bad command-line values name the flag, what was expected and what came."""
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(2))
    proc = tidegate("run", spec, *args)
    assert proc.returncode == 2
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


MIXED_MODEL = '''
import pyarrow as pa

def simulate(params, seed):
    if params["k"] == 3:
        return {"data": pa.table({"x": ["not a number"]})}  # a string where floats were
    if params["k"] == 5:
        return {"data": pa.table({"x": pa.array([seed % 7], pa.int64())})}  # casts to float
    return {"data": pa.table({"x": [seed / 3.0]})}
'''


def test_a_param_whose_output_misfits_fails_alone(tmp_path: Path) -> None:
    """One param returns a string column where the others return floats, all in one part:
    that param alone is failed with the column named; the others' rows are all written,
    and a rerun (resume) keeps the dataset readable as one table."""
    (tmp_path / "mixed.py").write_text(MIXED_MODEL)
    spec = write_spec(tmp_path / "job.yaml", {
        "job_id": "mixed", "model": "mixed:simulate", "code_paths": ["."],
        "parameters": {"grid": {"k": list(range(8))}}, "replicates": 2, "output": "out",
    })
    proc = tidegate("run", spec, "--workers", "1", "--json", "--no-progress",
                    "--flush-params", "100")
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    summary = _summary(proc)
    assert (summary["params"]["ok"], summary["params"]["failed"]) == (7, 1)
    (bad,) = [r for r in read_dataset(tmp_path / "out" / "params") if r["status"] == "failed"]
    assert bad["param_k"] == 3 and bad["error_type"] == "OutputSchemaError"
    assert "'x': expected double, got string" in bad["error"]
    data = ds.dataset(tmp_path / "out" / "model_outputs" / "data").to_table()
    assert data.schema.field("x").type == "double"
    assert data.num_rows == 7 * 2
    again = tidegate("run", spec, "--workers", "1", "--json", "--no-progress")
    assert again.returncode == 4 and _summary(again)["params"]["resumed"] == 8


# A model whose workers close for good (the worker and its nanny, as after a worker
# closed itself) while they belong to a doomed scheduler: the first `doomed` one to run
# param k == 6 dooms its own scheduler, or every scheduler with DOOM_ALL set.
_DYING_MODEL = '''
import os, pathlib
from distributed import get_worker
from tidegate.workloads import synthetic

HERE = pathlib.Path(__file__).parent

def model(params, seed):
    worker = get_worker()
    address = worker.scheduler.address
    doomed = HERE / "doomed"
    if params["k"] == 6 and (os.environ.get("DOOM_ALL") or not doomed.exists()):
        tmp = HERE / f"doomed.{os.getpid()}"
        tmp.write_text(address)
        os.replace(tmp, doomed)
    if doomed.exists() and doomed.read_text() == address:
        worker.loop.add_callback(worker.close, nanny=True, reason="test: workers gone")
    return synthetic(params, seed)
'''


def _dying_spec(tmp_path: Path, n: int) -> Path:
    code = tmp_path / "code"
    code.mkdir()
    (code / "dying.py").write_text(_DYING_MODEL)
    values = [{"k": i, "run_seconds": 0.05} for i in range(n)]
    spec = synthetic_spec(n, parameters={"values": values}, model="dying:model",
                          code_paths=[str(code)])
    return write_spec(tmp_path / "job.yaml", spec)


def test_embedded_cluster_without_workers_is_restarted_and_the_job_resumes(
        tmp_path: Path) -> None:
    """The embedded cluster's workers and nannies close for good mid-run: tidegate
    restarts its own cluster once (a WARNING naming why) and the same run finishes
    succeeded, every param exactly once in the Parquet output."""
    spec = _dying_spec(tmp_path, 30)
    proc = tidegate("run", spec, "--workers", "2", "--threads-per-worker", "1",
                    "--flush-params", "2", "--no-workers-timeout", "1", "--json",
                    "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "code" / "doomed").exists()  # the workers did close
    restarts = [line for line in proc.stderr.splitlines()
                if "restarting the embedded cluster (1 of 3)" in line]
    assert len(restarts) == 1 and "WARNING" in restarts[0], proc.stderr
    assert "no workers for" in restarts[0]
    assert "restarting the embedded cluster (2 of 3)" not in proc.stderr
    summary = _summary(proc)
    assert summary["state"] == "succeeded"
    assert summary["params"]["ok"] == 30
    _assert_exactly_once(tmp_path / "out", 30)


def test_embedded_cluster_restarts_are_bounded(tmp_path: Path) -> None:
    """Workers that close on every cluster: three restarts, then exit 130 with the
    summary and a message, no traceback; what completed is committed."""
    spec = _dying_spec(tmp_path, 30)
    env = dict(os.environ, DOOM_ALL="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "tidegate", "run", str(spec), "--workers", "1",
         "--threads-per-worker", "1", "--flush-params", "1", "--batch-size", "1",
         "--no-workers-timeout", "1", "--no-progress"],
        capture_output=True, text=True, timeout=300, env=env, check=False)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for i in (1, 2, 3):
        assert f"restarting the embedded cluster ({i} of 3)" in proc.stderr
    assert "(4 of 3)" not in proc.stderr
    assert "after 3 restarts of the embedded cluster" in proc.stderr
    assert "interrupted" in proc.stderr and "params" in proc.stderr  # the summary
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["state"] == "interrupted"


_FLAGS: tuple[list[str], ...] = ([], ["--force"], ["--restart"], ["--force", "--restart"])


@pytest.mark.parametrize("every_flag", [
    pytest.param(False, id="each-output-once"),
    # Each output with each of the four flag sets: twelve runs of ~3 s each.
    pytest.param(True, id="every-flag", marks=pytest.mark.slow),
])
def test_outputs_nested_in_another_jobs_output_are_refused(
        tmp_path: Path, every_flag: bool) -> None:
    """An output inside another job's output, or containing one, is refused with exit 2
    naming it, whatever --force or --restart say; the job's own output resumes."""
    first = write_spec(tmp_path / "first.yaml", synthetic_spec(3, output="outs/first"))
    assert tidegate("run", first, "--no-progress").returncode == 0
    outer = tmp_path / "outs" / "first"
    second = write_spec(tmp_path / "second.yaml", synthetic_spec(3, job_id="second"))
    outputs = ((outer / "inner", "is inside"), (outer / "params" / "x", "is inside"),
               (tmp_path / "outs", "contains"))
    for i, (output, how) in enumerate(outputs):
        # Light: each output once, with the flags of the strongest refusal last.
        for extra in (_FLAGS if every_flag else (_FLAGS[i + 1],)):
            proc = tidegate("run", second, "--output", output, "--no-progress", *extra)
            assert proc.returncode == 2, (output, extra, proc.stderr)
            assert f"{how} another job's output {outer}" in proc.stderr, proc.stderr
            assert "Traceback" not in proc.stderr
    assert not (outer / "inner").exists() and not (outer / "params" / "x").exists()
    assert not (tmp_path / "outs" / "_ledger.sqlite").exists()
    again = tidegate("run", first, "--json", "--no-progress")
    assert again.returncode == 0, again.stderr
    assert _summary(again)["params"]["resumed"] == 3
    _assert_exactly_once(outer, 3)


def test_nested_search_is_bounded(tmp_path: Path) -> None:
    """Below an output with more entries than the search reads, tidegate says it gave
    up (exit 2) rather than walk on or write blind; a job's output inside it is found
    before the limit."""
    big = tmp_path / "big"
    (big / "files").mkdir(parents=True)
    for i in range(10_001):
        (big / "files" / f"f{i}").touch()
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(2, output="big"))
    proc = tidegate("run", spec, "--force", "--no-progress")
    assert proc.returncode == 2, proc.stderr
    assert "more than 10000 entries" in proc.stderr and "stopped there" in proc.stderr
    assert not (big / "_ledger.sqlite").exists()


@pytest.mark.parametrize(("change", "needle"), [
    ({"model": "tidegate.workloads:_run_child"}, "private (starts with '_')"),
    ({"output": "a\x00b"}, "output: expected a path without NUL bytes"),
    ({"output": "o" * 300}, "(a component of 300 bytes)"),
    ({"code_paths": ["c" * 5000]}, "code_paths[0]: expected a path without NUL bytes"),
])
def test_refused_references_and_unusable_paths_exit_2(tmp_path: Path, change: dict,
                                                      needle: str) -> None:
    """A private callable or a path the file system would refuse: exit 2 and a message
    naming the field, before any cluster starts; no traceback."""
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(2, **change))
    proc = tidegate("run", spec)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr
    assert "Traceback" not in proc.stderr


def test_a_params_file_past_max_file_bytes_exits_2(tmp_path: Path) -> None:
    """`run --max-file-bytes` lowers the params file's limit: a larger file is refused
    with its size and the limit, exit 2, before any cluster starts; no traceback."""
    (tmp_path / "p.csv").write_text("k\n" + "\n".join(map(str, range(50))) + "\n")
    size = (tmp_path / "p.csv").stat().st_size
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(0, parameters={"file": "p.csv"}))
    proc = tidegate("run", spec, "--max-file-bytes", str(size - 1))
    assert proc.returncode == 2, proc.stderr
    assert (f"parameters.file: expected at most {size - 1:,} bytes (limits.max_file_bytes), "
            f"got {size:,} bytes in 'p.csv'") in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
