"""tidegate across hosts: a `dask scheduler`, two `dask worker` hosts and tidegate, each
in a network namespace of its own on a private bridge (tests/multihost.py). A worker
host partitioned mid-job (its link down, not a process killed) is a lost worker, not an
OOM kill; B is not halved for it; every param is written once. The scheduler host
restarted mid-job: the run resumes from its ledger."""

from __future__ import annotations

import contextlib
import json
import re
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import read_dataset, wait_for_part, write_spec
from tests.multihost import Hosts, NetnsUnavailable, Run, run_in, until

# The scheduler drops a worker that has not heartbeaten for this long (Dask's default is
# 5 minutes), and every comm gives up on an unanswered peer after the TCP timeout (Dask:
# 30 s; 11 s is the least it accepts) and on a connect after the connect timeout.
FAST_DASK = {
    "DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "5s",
    "DASK_DISTRIBUTED__COMM__TIMEOUTS__TCP": "11s",
    "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT": "5s",
}

MODEL = '''
import time, uuid
from pathlib import Path

MARKS = Path({marks!r})


def simulate(params, seed):
    """Sleeps run_seconds; leaves a mark naming the param, seed and the host it ran on,
    so the test counts every execution, recomputations included."""
    try:
        from distributed import get_worker
        host = get_worker().address.split("://")[-1].rsplit(":", 1)[0]
    except ValueError:
        host = "none"
    (MARKS / f"{{params['k']}}_{{seed}}_{{host}}_{{uuid.uuid4().hex[:8]}}").touch()
    time.sleep(params["run_seconds"])
    return {{"data": {{"x": [float(params["k"])]}}}}
'''


@contextlib.contextmanager
def running_hosts(root: Path, dask_env: dict[str, str]) -> Iterator[Hosts]:
    """The hosts with their scheduler and two workers up, torn down afterwards whatever
    happens. Building them needs root and iproute2: without them the test fails saying
    so (CI runs as root)."""
    h = Hosts(root, workers=2, dask_env=dask_env)
    try:
        try:
            h.build()
        except NetnsUnavailable as exc:
            pytest.fail(f"cannot build the test's hosts (network namespaces): {exc}",
                        pytrace=False)
        h.start_scheduler()
        h.start_workers()
        h.wait_for_workers(2)
        yield h
    finally:
        h.close()


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    with running_hosts(tmp_path / "hosts", FAST_DASK) as h:
        yield h


def _job(tmp_path: Path, n: int, run_seconds: float, replicates: int = 2) -> Path:
    """The job's spec in ``tmp_path``/job, its marks in ``tmp_path``/marks."""
    # The job's code path holds the model alone: the hosts' logs and the marks change
    # while it runs, and would change the job's code hash between a run and its rerun.
    marks, job = tmp_path / "marks", tmp_path / "job"
    marks.mkdir()
    job.mkdir()
    (job / "mhmodel.py").write_text(MODEL.format(marks=str(marks)))
    spec = {
        "job_id": "multihost",
        "model": "mhmodel:simulate",
        "code_paths": ["."],
        "parameters": {"values": [{"k": i, "run_seconds": run_seconds} for i in range(n)]},
        "replicates": replicates,
        "seed": 11,
        "output": "out",
    }
    return write_spec(job / "job.yaml", spec)


def _marks(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(k, seed, host) of every execution of a sim."""
    return [tuple(p.name.split("_")[:3]) for p in (tmp_path / "marks").iterdir()]  # type: ignore[misc]


def _summary(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def _start_run(hosts: Hosts, spec: Path, *extra: str) -> Run:
    return run_in(hosts, "client", [
        sys.executable, "-m", "tidegate", "run", str(spec), "--scheduler",
        hosts.scheduler_address, "--json", "--no-progress", "--flush-params", "4", *extra],
        cwd=spec.parent)


def _finish(run: Run, timeout: float, code: int = 0) -> dict[str, Any]:
    """The run's exit code checked, its --json summary."""
    assert run.wait(timeout) == code, run.err.text()
    return _summary(run.out.text())


def _check_lost_not_oom(summary: dict[str, Any], stderr: str, worker_ip: str) -> None:
    """One loss, classified lost; no OOM event and no backoff of B (a lost worker's
    memory tells nothing of the sims' memory: B shrinks only to the ceiling that the
    workers left can hold)."""
    assert summary["worker_losses"] == {"lost": 1}, summary
    assert summary["oom_events"] == 0, summary
    assert re.search(rf"worker tcp://{re.escape(worker_ip)}:\d+ lost: lost", stderr), stderr
    assert "action=oom_detected" not in stderr
    assert "OOM event" not in stderr  # the controller's backoff reason


def _check_once(tmp_path: Path, n: int, reps: int, summary: dict[str, Any],
                lost_ip: str | None) -> int:
    """Every param and every sim's output written exactly once (read back with pyarrow);
    returns how many sim executions were recomputations. Those are bounded by the window
    (a committed param is never run again: only params in flight can be) and, with a
    host lost, are all of sims that had run on that host."""
    ids = [r["param_id"] for r in read_dataset(tmp_path / "job" / "out" / "params")]
    assert len(ids) == len(set(ids)) == n
    data = read_dataset(tmp_path / "job" / "out" / "model_outputs" / "data")
    assert len({(r["param_id"], r["replicate"]) for r in data}) == len(data) == n * reps
    marks = _marks(tmp_path)
    runs = Counter((k, seed) for k, seed, _ in marks)
    assert len(runs) == n * reps
    again = sum(c - 1 for c in runs.values())
    assert again <= summary["batch_size"]["max"] * reps, (again, summary["batch_size"])
    if lost_ip is not None:
        on_lost = {(k, seed) for k, seed, host in marks if host == lost_ip}
        assert {sim for sim, c in runs.items() if c > 1} <= on_lost
    return again


def test_partitioned_worker_host_is_lost_not_oom(tmp_path: Path, hosts: Hosts) -> None:
    """w2's link goes down mid-job: the scheduler drops it, tidegate classifies it lost
    (no exit code ever comes: the host is unreachable), no OOM event, no backoff of B;
    the link comes back, w2's supervisor restarts `dask worker` (Dask's worker closed
    itself when its scheduler comm broke), and every param is written exactly once."""
    n, reps = 50, 2
    spec = _job(tmp_path, n, run_seconds=0.5, replicates=reps)
    run = _start_run(hosts, spec)
    assert wait_for_part(run.proc, tmp_path / "job" / "out", timeout=60), run.err.text()
    cut = time.monotonic()
    hosts.partition("w2")
    lost = run.err.wait_for(r"action=worker_lost", timeout=60)
    declared = time.monotonic() - cut
    hosts.heal("w2")
    summary = _finish(run, timeout=120)
    assert lost is not None, run.err.text()
    _check_lost_not_oom(summary, run.err.text(), hosts.hosts["w2"].address)
    again = _check_once(tmp_path, n, reps, summary, hosts.hosts["w2"].address)
    print(f"lost declared {declared:.1f} s after the cut; recomputed {again} of "
          f"{n * reps} sims; B max {summary['batch_size']['max']}; "
          f"w2's dask worker started {hosts.starts('w2')} times")


@pytest.mark.slow
def test_worker_restarted_by_the_ttl_check_after_the_link_returns_is_lost(
        tmp_path: Path) -> None:
    """The scheduler's worker-ttl runs out before the TCP timeout (5 s against Dask's
    30 s), it asks w2's nanny to restart its worker, and the link is back in time for
    that: the worker process exits 0 at the nanny's kill, which alone would read as a
    planned restart. tidegate reads the scheduler's worker-ttl-timed-out event: lost."""
    env = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "5s"}
    with running_hosts(tmp_path / "hosts", env) as hosts:
        n, reps = 50, 2
        spec = _job(tmp_path, n, run_seconds=0.5, replicates=reps)
        run = _start_run(hosts, spec)
        assert wait_for_part(run.proc, tmp_path / "job" / "out", timeout=60), run.err.text()
        hosts.partition("w2")
        until(lambda: "failed to heartbeat" in hosts.log("scheduler"), 60,
              "the scheduler's worker-ttl check")
        hosts.heal("w2")
        summary = _finish(run, timeout=120)
        assert "Restarting worker" in hosts.log("w2"), "the nanny did not restart it"
        _check_lost_not_oom(summary, run.err.text(), hosts.hosts["w2"].address)
        _check_once(tmp_path, n, reps, summary, hosts.hosts["w2"].address)


def test_scheduler_host_restarted_mid_job_resumes(tmp_path: Path, hosts: Hosts) -> None:
    """The scheduler process is killed on its host and started again on the same
    address: `tidegate run` ends saying the scheduler was lost (its in-flight work is
    gone with the scheduler's state), the workers' supervisors bring `dask worker` back
    (each closed itself when its scheduler comm broke), and a rerun resumes from the
    ledger: the committed params are kept, none is written twice."""
    n, reps = 40, 2
    spec = _job(tmp_path, n, run_seconds=0.3, replicates=reps)
    run = _start_run(hosts, spec)
    assert wait_for_part(run.proc, tmp_path / "job" / "out", timeout=60), run.err.text()
    hosts.kill_scheduler()
    hosts.start_scheduler()
    assert run.wait(timeout=120) == 3, run.err.text()  # the cluster: see the exit codes
    assert "lost the connection to the scheduler" in run.err.text()
    manifest = json.loads((tmp_path / "job" / "out" / "manifest.json").read_text())
    assert manifest["state"] == "interrupted"
    hosts.wait_for_workers(2)
    summary = _finish(_start_run(hosts, spec), timeout=120)
    assert 0 < summary["params"]["resumed"] < n
    assert summary["params"]["ok"] == n
    _check_once(tmp_path, n, reps, summary, None)
    print(f"resumed {summary['params']['resumed']} of {n}; dask worker started "
          f"{hosts.starts('w1')} and {hosts.starts('w2')} times")


# As docs/operations.md recommends across hosts: a worker-ttl of 15 s, Dask's own comm
# timeouts (30 s).
DOCUMENTED_DASK = {"DASK_DISTRIBUTED__SCHEDULER__WORKER_TTL": "15s"}


@pytest.mark.slow
def test_a_minute_long_partition_in_a_three_minute_job(tmp_path: Path) -> None:
    """A clean run of about 3 minutes, then the same job again with w2's link down for
    60 s from about 30% in: w2 is lost (not OOM), B is not halved, every param is
    written once, and only sims of params in flight on w2 ran again. The wall time
    against the clean run is printed (bench territory, not asserted)."""
    n, reps, seconds = 180, 2, 2.0
    with running_hosts(tmp_path / "hosts", DOCUMENTED_DASK) as hosts:
        clean_dir, cut_dir = tmp_path / "clean", tmp_path / "cut"
        clean_dir.mkdir()
        cut_dir.mkdir()
        clean = _finish(_start_run(hosts, _job(clean_dir, n, seconds, reps)), timeout=600)
        assert clean["worker_losses"] == {}
        _check_once(clean_dir, n, reps, clean, None)

        run = _start_run(hosts, _job(cut_dir, n, seconds, reps))
        until(lambda: len(list((cut_dir / "marks").iterdir())) >= 0.3 * n * reps, 300,
              "30% of the sims to start")
        cut = time.monotonic()
        hosts.partition("w2")
        lost = run.err.wait_for(r"action=worker_lost", timeout=120)
        declared = time.monotonic() - cut
        assert lost is not None, run.err.text()
        time.sleep(max(0.0, 60 - (time.monotonic() - cut)))  # the outage lasts 60 s
        hosts.heal("w2")
        summary = _finish(run, timeout=900)
        _check_lost_not_oom(summary, run.err.text(), hosts.hosts["w2"].address)
        again = _check_once(cut_dir, n, reps, summary, hosts.hosts["w2"].address)
        ratio = summary["wall_seconds"] / clean["wall_seconds"]
        print(f"clean {clean['wall_seconds']:.0f} s; partitioned {summary['wall_seconds']:.0f}"
              f" s ({ratio:.2f}x); lost declared {declared:.1f} s after the cut; "
              f"recomputed {again} of {n * reps} sims; B max {summary['batch_size']['max']}"
              f", min {summary['batch_size']['min']}")
