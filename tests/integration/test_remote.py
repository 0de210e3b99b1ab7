"""`tidegate run --scheduler`: a real `dask scheduler` and two `dask worker` processes
on 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from tests.conftest import (
    read_dataset,
    start_tidegate,
    synthetic_spec,
    tidegate,
    wait_for_part,
    write_spec,
)


@dataclass
class RemoteCluster:
    address: str
    nannies: list[subprocess.Popen]

    def worker_pids(self) -> list[int]:
        """The worker processes the `dask worker` nannies spawned."""
        return [c.pid for n in self.nannies for c in psutil.Process(n.pid).children()
                if "spawn_main" in " ".join(c.cmdline())]


@pytest.fixture
def remote_cluster(tmp_path: Path) -> Iterator[RemoteCluster]:
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
        yield RemoteCluster(address, procs[1:])
    finally:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=30)


def test_run_on_remote_cluster(tmp_path: Path, remote_cluster: RemoteCluster) -> None:
    """A job runs to completion on an existing cluster reached by address."""
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(30))
    proc = tidegate("run", spec, "--scheduler", remote_cluster.address, "--json",
                    "--no-progress")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["params"]["ok"] == 30
    rows = read_dataset(tmp_path / "out" / "params")
    assert len({r["param_id"] for r in rows}) == 30
    data = read_dataset(tmp_path / "out" / "model_outputs" / "data")
    assert len({(r["param_id"], r["replicate"]) for r in data}) == 60


def test_remote_worker_sigkill_is_classified(tmp_path: Path, remote_cluster: RemoteCluster
                                             ) -> None:
    """On `dask worker` nannies too, a SIGKILLed worker is reported with its exit code
    (classified oom_kill), B backs off, and every param is written once."""
    values = [{"k": i, "run_seconds": 0.05} for i in range(60)]
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(60, parameters={"values": values}))
    proc = start_tidegate("run", spec, "--scheduler", remote_cluster.address, "--json",
                          "--no-progress", "--flush-params", "4")
    assert wait_for_part(proc, tmp_path / "out"), proc.communicate()[1]
    pids = remote_cluster.worker_pids()
    assert len(pids) == 2
    os.kill(pids[0], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["worker_losses"] == {"oom_kill": 1}
    assert summary["oom_events"] == 1
    ids = [r["param_id"] for r in read_dataset(tmp_path / "out" / "params")]
    assert len(ids) == len(set(ids)) == 60


def test_remote_cluster_without_workers_ends_the_run_interrupted(
        tmp_path: Path, remote_cluster: RemoteCluster) -> None:
    """The remote cluster's nannies and workers die for good: tidegate does not own
    that cluster, so after --no-workers-timeout the run exits 130 saying to rerun when
    workers return, no traceback; a rerun resumes."""
    values = [{"k": i, "run_seconds": 0.1} for i in range(40)]
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(40, parameters={"values": values}))
    proc = start_tidegate("run", spec, "--scheduler", remote_cluster.address,
                          "--no-progress", "--flush-params", "2", "--batch-size", "2",
                          "--no-workers-timeout", "1")
    assert wait_for_part(proc, tmp_path / "out"), proc.communicate()[1]
    pids = remote_cluster.worker_pids()
    for nanny in remote_cluster.nannies:
        nanny.kill()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "has had no workers" in stderr
    assert "rerun when workers have joined the scheduler again" in stderr
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["state"] == "interrupted"
