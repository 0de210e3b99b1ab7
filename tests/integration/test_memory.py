"""Memory-tight sweeps on real worker processes with small memory limits and spilling
off: the adaptive window against the naive submit-all runner, worker kills, working
memory, and poison params."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path

import dask
import pytest

from tests.conftest import read_dataset, start_tidegate, synthetic_spec, tidegate, write_spec
from tidegate.cluster import ClusterOptions, open_cluster
from tidegate.simreturn import run_sim, run_target

MiB = 2**20
# Spilling off: what does not fit in memory has nowhere to go (pause at 80%, nanny
# kill at 95% stay on).
NO_SPILL_ENV = {
    "DASK_DISTRIBUTED__WORKER__MEMORY__SPILL": "False",
    "DASK_DISTRIBUTED__WORKER__MEMORY__TARGET": "False",
}
TIGHT = ["--workers", "2", "--threads-per-worker", "1", "--memory-limit", "400MiB"]


@pytest.fixture
def no_spill(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in NO_SPILL_ENV.items():
        monkeypatch.setenv(name, value)
    dask.config.refresh()
    yield
    monkeypatch.undo()
    dask.config.refresh()


def _tight_values(n: int, output_mib: int, alloc_mib: int) -> list[dict]:
    return [
        {"k": i, "output_bytes": output_mib * MiB, "alloc_bytes": alloc_mib * MiB,
         "run_seconds": 0.0}
        for i in range(n)
    ]


def _summary(proc) -> dict:
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _memory_log(stderr: str, tail: int = 40) -> str:
    """The log lines that say why a worker was lost: the losses, the nanny's memory
    kills and pauses, and B's changes (the last ``tail`` of them)."""
    keys = ("action=worker_lost", "action=oom_detected", "action=child_killed",
            "action=batch_resized", "exceeded 95% memory budget", "Pausing worker")
    lines = [line for line in stderr.splitlines() if any(k in line for k in keys)]
    return "\n".join(lines[-tail:])


def test_tight_memory_with_the_controller_loses_no_worker(tmp_path: Path, no_spill) -> None:
    """SimReturns adding up to 5x the cluster's memory: the adaptive window writes every
    param and no worker is lost."""
    n, output_mib = 170, 24
    assert n * output_mib >= 5 * 800  # 2 workers x 400 MiB
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(
        n, replicates=1, outputs="none", parameters={"values": _tight_values(n, output_mib, 60)}))
    proc = tidegate("run", spec, *TIGHT, "--json", "--no-progress", timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = _summary(proc)
    assert summary["params"]["ok"] == n
    why = f"worker_losses={summary['worker_losses']}\n{_memory_log(proc.stderr)}"
    assert summary["worker_restarts"] == 0, why
    assert summary["oom_events"] == 0, why
    assert len({r["param_id"] for r in read_dataset(tmp_path / "out" / "params")}) == n


async def _naive(n: int, output_mib: int, alloc_mib: int, timeout: float) -> tuple[int, bool]:
    """Submit every sim and agg at once and hold every future to the end (what a
    submit-all runner does). Returns (workers lost, finished in time)."""
    cluster = await open_cluster(ClusterOptions(workers=2, threads_per_worker=1,
                                                memory_limit=400 * MiB))
    try:
        watch = await cluster.watch_workers(time.monotonic)
        client = cluster.client
        values = _tight_values(n, output_mib, alloc_mib)
        sims = client.map(run_sim, ["tidegate.workloads:synthetic"] * n, values,
                          [f"p{i}" for i in range(n)], [0] * n, list(range(n)), pure=False)
        aggs = [client.submit(run_target, "tidegate.workloads:synthetic_loss", "t", f"p{i}",
                              s, pure=False) for i, s in enumerate(sims)]
        gather = asyncio.ensure_future(client.gather(aggs))
        lost: list = []
        deadline = time.monotonic() + timeout
        # Until it finishes, or a worker is lost: either answers the question.
        while not gather.done() and not lost and time.monotonic() < deadline:
            await asyncio.wait({gather}, timeout=0.1)
            lost += [x for x in watch.losses() if x.cause != "planned"]
        finished = gather.done() and gather.exception() is None
        gather.cancel()
        return len(lost), finished
    finally:
        await cluster.close()


def test_tight_memory_naive_runner_loses_workers(no_spill) -> None:
    """The same workload submitted all at once loses workers or stalls: the scenario
    really is tight."""
    lost, finished = asyncio.run(_naive(170, 24, 60, timeout=60))
    assert lost > 0 or not finished


def test_sigkilled_worker_is_classified_and_job_completes(tmp_path: Path) -> None:
    """A worker SIGKILLed mid-job: classified as oom_kill, B backs off, every param is
    written exactly once."""
    values = [{"k": i, "run_seconds": 0.05} for i in range(80)]
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(80, parameters={"values": values}))
    proc = start_tidegate("run", spec, "--workers", "2", "--threads-per-worker", "1",
                          "--json", "--no-progress", "--flush-params", "5")
    try:
        out = tmp_path / "out"
        deadline = time.monotonic() + 120
        victim = None
        while victim is None and time.monotonic() < deadline and proc.poll() is None:
            # The embedded cluster's worker processes are tidegate's grandchildren.
            if not list((out / "params").glob("part-*.parquet")):
                time.sleep(0.05)
                continue
            workers = [p for p in _descendants(proc.pid) if "spawn_main" in _cmdline(p)]
            victim = workers[0] if workers else None
        assert victim is not None, "no worker process found"
        os.kill(victim, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert summary["worker_losses"].get("oom_kill") == 1
    assert summary["oom_events"] == 1
    assert summary["params"]["ok"] == 80
    assert "action=oom_detected" in stderr
    ids = [r["param_id"] for r in read_dataset(tmp_path / "out" / "params")]
    assert len(ids) == len(set(ids)) == 80


def _descendants(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _cmdline(pid: int) -> str:
    import psutil

    try:
        return " ".join(psutil.Process(pid).cmdline())
    except psutil.NoSuchProcess:
        return ""


def test_working_memory_keeps_heavy_sims_apart(tmp_path: Path, no_spill) -> None:
    """Two simulations at once on one worker exceed its limit: per-worker admission runs
    one per worker, on both, whatever B is; every param completes and no worker dies."""
    n = 40
    values = [{"k": i, "alloc_bytes": 170 * MiB, "output_bytes": MiB, "run_seconds": 0.1}
              for i in range(n)]
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(
        n, replicates=1, outputs="none", parameters={"values": values}))
    proc = tidegate("run", spec, "--workers", "2", "--threads-per-worker", "2",
                    "--memory-limit", "400MiB", "--json", "--no-progress", timeout=600)
    assert proc.returncode == 0, proc.stderr
    summary = _summary(proc)
    assert summary["params"]["ok"] == n
    assert summary["params"]["quarantined"] == 0
    why = f"{summary}\n{_memory_log(proc.stderr)}"
    assert summary["oom_events"] == 0 and summary["worker_restarts"] == 0, why


def test_poison_param_is_quarantined(tmp_path: Path, no_spill) -> None:
    """One param allocating more than a worker's limit among normal ones: quarantined
    with both numbers in its message, every other param ok, exit 1."""
    values = [{"k": i, "alloc_bytes": 20 * MiB, "run_seconds": 0.05} for i in range(30)]
    values[7] = {"k": 7, "alloc_bytes": 600 * MiB, "run_seconds": 1.0}
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(
        30, replicates=1, parameters={"values": values}))
    proc = tidegate("run", spec, *TIGHT, "--json", "--no-progress", timeout=600)
    assert proc.returncode == 4, proc.stderr
    summary = _summary(proc)
    # The log says why if another param failed too (isolated, quarantined, KilledWorker).
    assert summary["params"]["ok"] == 29, (summary["errors"], proc.stderr[-4000:])
    assert summary["params"]["failed"] == 1
    why = (summary["errors"], _memory_log(proc.stderr))
    assert summary["params"]["quarantined"] == 1, why
    rows = read_dataset(tmp_path / "out" / "params")
    (bad,) = [r for r in rows if r["status"] == "failed"]
    assert bad["param_k"] == 7
    assert bad["error_type"] == "MemoryExceeded"
    assert "needs more memory than a worker's limit" in bad["error"]
    assert "worker memory limit 400 MiB" in bad["error"]
    assert "RSS at the kill" in bad["error"]
