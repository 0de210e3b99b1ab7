"""`tidegate run --scheduler`: a real `dask scheduler` and two `dask worker` processes
on 127.0.0.1."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import read_dataset, synthetic_spec, tidegate, write_spec


@pytest.fixture
def remote_scheduler(tmp_path: Path) -> Iterator[str]:
    """A scheduler and two single-threaded workers, torn down after the test."""
    sched_file = tmp_path / "scheduler.json"
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", "0", "--no-dashboard", "--scheduler-file", str(sched_file)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            assert time.monotonic() < deadline, "scheduler did not start"
            assert procs[0].poll() is None, "scheduler exited"
            time.sleep(0.05)
        address = json.loads(sched_file.read_text())["address"]
        for _ in range(2):
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "distributed.cli.dask_worker", address,
                     "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                     "--memory-limit", "1GiB"],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                )
            )
        yield address
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=30)


def test_run_on_remote_cluster(tmp_path: Path, remote_scheduler: str) -> None:
    """A job runs to completion on an existing cluster reached by address."""
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(30))
    proc = tidegate("run", spec, "--scheduler", remote_scheduler, "--json", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["params"]["ok"] == 30
    rows = read_dataset(tmp_path / "out" / "params")
    assert len({r["param_id"] for r in rows}) == 30
    data = read_dataset(tmp_path / "out" / "model_outputs" / "data")
    assert len({(r["param_id"], r["replicate"]) for r in data}) == 60
