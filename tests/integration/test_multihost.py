"""tidegate across hosts: a `dask scheduler`, two `dask worker` hosts and tidegate, each
in a network namespace of its own on a private bridge (tests/multihost.py). A worker
host partitioned mid-job (its link down, not a process killed) is a lost worker, not an
OOM kill; B is not halved for it; every param is written once. The scheduler host
restarted mid-job: the run resumes from its ledger."""

from __future__ import annotations

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
from tests.multihost import Hosts, NetnsUnavailable, run_in

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


@pytest.fixture
def hosts(tmp_path: Path) -> Iterator[Hosts]:
    """The hosts, torn down after the test whatever happens. Building them needs root and
    iproute2: without them the test fails saying so (CI runs as root)."""
    h = Hosts(tmp_path / "hosts", workers=2, dask_env=FAST_DASK)
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


def _job(tmp_path: Path, n: int, run_seconds: float, replicates: int = 2) -> Path:
    marks = tmp_path / "marks"
    marks.mkdir()
    (tmp_path / "mhmodel.py").write_text(MODEL.format(marks=str(marks)))
    spec = {
        "job_id": "multihost",
        "model": "mhmodel:simulate",
        "code_paths": ["."],
        "parameters": {"values": [{"k": i, "run_seconds": run_seconds} for i in range(n)]},
        "replicates": replicates,
        "seed": 11,
        "output": "out",
    }
    return write_spec(tmp_path / "job.yaml", spec)


def _marks(tmp_path: Path) -> list[tuple[str, str, str]]:
    """(k, seed, host) of every execution of a sim."""
    return [tuple(p.name.split("_")[:3]) for p in (tmp_path / "marks").iterdir()]  # type: ignore[misc]


def _summary(stdout: str) -> dict[str, Any]:
    return json.loads(stdout.strip().splitlines()[-1])


def _tidegate(hosts: Hosts, *args: str | Path) -> list[str | Path]:
    return [sys.executable, "-m", "tidegate", *args]


def test_partitioned_worker_host_is_lost_not_oom(tmp_path: Path, hosts: Hosts) -> None:
    """w2's link goes down mid-job: the scheduler drops it, tidegate classifies it lost
    (no exit code ever comes: the host is unreachable), no OOM event, no backoff of B;
    the link comes back, w2's supervisor restarts `dask worker` (Dask's worker closed
    itself when its scheduler comm broke), and every param is written exactly once."""
    n, reps = 50, 2
    spec = _job(tmp_path, n, run_seconds=0.5, replicates=reps)
    proc, err = run_in(hosts, "client", _tidegate(
        hosts, "run", spec, "--scheduler", hosts.scheduler_address, "--json",
        "--no-progress", "--flush-params", "4"), cwd=tmp_path)
    try:
        assert wait_for_part(proc, tmp_path / "out", timeout=60), err.text()
        cut = time.monotonic()
        hosts.partition("w2")
        lost = err.wait_for(r"action=worker_lost", timeout=60)
        declared = time.monotonic() - cut
        assert lost is not None, err.text()
        hosts.heal("w2")
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    stderr = err.text()
    print(f"lost declared after {declared:.1f} s: {lost.strip()}")
    assert proc.returncode == 0, stderr
    assert re.search(r"worker tcp://10\.77\.0\.12:\d+ lost: lost \(exit code None\)", lost), lost
    summary = _summary(stdout)
    assert summary["worker_losses"] == {"lost": 1}, summary
    assert summary["oom_events"] == 0
    assert "action=oom_detected" not in stderr
    assert "OOM event" not in stderr
    ids = [r["param_id"] for r in read_dataset(tmp_path / "out" / "params")]
    assert len(ids) == len(set(ids)) == n
    data = read_dataset(tmp_path / "out" / "model_outputs" / "data")
    assert len({(r["param_id"], r["replicate"]) for r in data}) == len(data) == n * reps
    runs = Counter((k, seed) for k, seed, _ in _marks(tmp_path))
    again = sum(c - 1 for c in runs.values())
    print(f"sims {n * reps}, executions {sum(runs.values())}, recomputed {again}, "
          f"B max {summary['batch_size']['max']}, w2 starts {hosts.starts('w2')}")
