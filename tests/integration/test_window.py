"""The window, measured on the scheduler itself: a real LocalCluster in this process with
a scheduler plugin that records how many tasks the scheduler holds."""

from __future__ import annotations

import asyncio
from pathlib import Path

from distributed import LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

from tests.conftest import read_dataset, synthetic_spec, write_spec
from tidegate.cluster import ClusterOptions, open_cluster
from tidegate.runner import Runner, RunOptions
from tidegate.spec import load_job


class PeakTasks(SchedulerPlugin):
    """Records the most tasks the scheduler ever held at once."""

    def __init__(self) -> None:
        self.peak = 0
        self.scheduler = None

    async def start(self, scheduler) -> None:
        self.scheduler = scheduler

    def transition(self, key, start, finish, *args, **kwargs) -> None:
        self.peak = max(self.peak, len(self.scheduler.tasks))


async def _run_with_peak(spec: Path, batch_size: int | None) -> tuple[int, object]:
    cluster = await open_cluster(ClusterOptions(workers=2, threads_per_worker=1))
    try:
        assert isinstance(cluster.local, LocalCluster)
        plugin = PeakTasks()
        scheduler = cluster.local.scheduler
        await scheduler.register_scheduler_plugin(plugin, name="peak", idempotent=False)
        runner = Runner(load_job(spec), cluster,
                        RunOptions(batch_size=batch_size, flush_params=50))
        summary = await runner.run()
        return plugin.peak, summary
    finally:
        await cluster.close()


def test_scheduler_task_count_bounded_by_window(tmp_path: Path) -> None:
    """Peak tasks on the scheduler stay within B x (R + T) on a job 40x that size."""
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(200))
    peak, summary = asyncio.run(_run_with_peak(spec, batch_size=5))
    assert summary.ok == 200
    window = 5 * (2 + 1)
    assert 2 + 1 <= peak <= window
    assert summary.peak_inflight_tasks <= window
    assert len(read_dataset(tmp_path / "out" / "params")) == 200


def test_adaptive_window_bounds_scheduler_tasks(tmp_path: Path) -> None:
    """Unpinned, B starts small (slow start), grows with headroom, and the scheduler
    never holds more than the largest B's tasks."""
    values = [{"k": i, "run_seconds": 0.02} for i in range(400)]
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(400, parameters={"values": values}))
    peak, summary = asyncio.run(_run_with_peak(spec, batch_size=None))
    assert summary.ok == 400
    assert summary.batch_min == 1  # 2 threads // 2 replicates
    assert summary.batch_max > summary.batch_min
    assert peak <= summary.batch_max * (2 + 1)


async def _run_recording_gathers(spec: Path) -> tuple[list[str], object]:
    cluster = await open_cluster(ClusterOptions(workers=2, threads_per_worker=1))
    gathered: list[str] = []
    real_gather = cluster.gather

    async def recording_gather(futures):
        results = await real_gather(futures)
        # A fused task (several replicates and their targets in one) brings a list.
        for r in results:
            gathered.extend(type(x).__name__ for x in (r if isinstance(r, list) else [r]))
        return results

    cluster.gather = recording_gather  # type: ignore[method-assign]
    try:
        summary = await Runner(load_job(spec), cluster, RunOptions()).run()
        return gathered, summary
    finally:
        await cluster.close()


def test_outputs_none_keeps_tables_on_the_cluster(tmp_path: Path) -> None:
    """With outputs: none, only target results travel to tidegate, never a SimReturn."""
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(12, outputs="none"))
    gathered, summary = asyncio.run(_run_recording_gathers(spec))
    assert summary.ok == 12
    assert gathered == ["TargetResult"] * 12
    assert not (tmp_path / "out" / "model_outputs").exists()
    assert len(read_dataset(tmp_path / "out" / "targets" / "score")) == 12


def test_outputs_none_without_targets_summarises_on_the_cluster(tmp_path: Path) -> None:
    """No targets and outputs: none: one small summary per param comes back, and a
    replicate's failure still reaches the params dataset."""
    values = [{"k": i, "fail": "x" if i == 3 else ""} for i in range(6)]
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(
        6, outputs="none", targets=[], parameters={"values": values}))
    gathered, summary = asyncio.run(_run_recording_gathers(spec))
    assert (summary.ok, summary.failed) == (5, 1)
    assert gathered == ["TargetResult"] * 6
    failed = [r for r in read_dataset(tmp_path / "out" / "params") if r["status"] == "failed"]
    assert [r["param_k"] for r in failed] == [3]
