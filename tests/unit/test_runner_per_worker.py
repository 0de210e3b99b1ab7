"""Per-worker admission in the run loop, on a FakeCluster whose workers carry the
tidegate-memory resource (the real cluster's side runs in tests/integration)."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import read_dataset, synthetic_spec
from tests.fakes import FakeCluster, FakeTask
from tidegate.losses import Cause
from tidegate.metrics import Metrics
from tidegate.runner import Runner, RunOptions
from tidegate.spec import Job, job_from_dict

MiB = 2**20


def _job(tmp_path: Path, values: list[dict[str, Any]], **overrides: Any) -> Job:
    spec = synthetic_spec(0, parameters={"values": values}, replicates=1, **overrides)
    return job_from_dict(spec, base_dir=tmp_path)


def _run(job: Job, fake: FakeCluster, metrics: Metrics | None = None, **options: Any) -> Any:
    runner = Runner(job, fake, RunOptions(**options), clock=fake.clock, metrics=metrics)
    return asyncio.run(runner.run())


def _pairs_on_one_worker(fake: FakeCluster) -> int:
    return len(fake.together)


def test_sims_that_cannot_share_a_worker_never_run_on_one(tmp_path: Path) -> None:
    """2 workers x 2 threads x 450 MiB, sims of 230 MiB working memory: whatever B is
    (pinned at 8 here), no two run on one worker; both workers are used."""
    values = [{"k": i, "alloc_bytes": 230 * MiB} for i in range(8)]
    job = _job(tmp_path, values)
    used: set[str] = set()

    def record(task: FakeTask) -> Cause | None:
        used.add(task.worker)
        return None

    fake = FakeCluster(threads=2, memory_limit=450 * MiB, resources=True, on_run=record)
    summary = _run(job, fake, batch_size=8)
    assert summary.ok == 8
    assert _pairs_on_one_worker(fake) == 0
    assert len(used) == 2
    assert summary.worker_restarts == 0


def test_small_sims_fill_every_thread_once_measured(tmp_path: Path) -> None:
    """The control for the test above: sims of 1 MiB share a worker's two threads once
    the first results say they fit (before that, one per worker)."""
    values = [{"k": i, "alloc_bytes": MiB} for i in range(24)]
    job = _job(tmp_path, values)
    fake = FakeCluster(threads=2, memory_limit=450 * MiB, resources=True)
    summary = _run(job, fake, batch_size=8)
    assert summary.ok == 24
    assert _pairs_on_one_worker(fake) > 0


def test_a_suspect_runs_alone_on_one_worker_while_the_others_work(tmp_path: Path) -> None:
    """A poison param: each kill strikes only the sim that was running (not those queued
    on the worker); after two it claims a whole worker, runs there with nothing beside
    it while the other worker goes on, is killed alone and quarantined; no innocent
    param is quarantined."""
    values = [{"k": i} for i in range(16)]
    job = _job(tmp_path, values)
    poison = list(job.params)[3].param_id
    beside: list[set[str]] = []
    fake: FakeCluster

    def kill(task: FakeTask) -> Cause | None:
        if task.param_id != poison or not task.key.startswith("sim-"):
            return None
        if task.request == fake.memory_limit and re.search(r"-r\d+$", task.key):
            beside.append({t.param_id for t in fake.tasks.values()
                           if t.worker == task.worker and t.key in fake.started
                           and t.state == "pending"} - {poison})
        return Cause.MEMORY_TERMINATE

    fake = FakeCluster(n_workers=2, threads=2, memory_limit=400 * MiB, resources=True,
                       on_run=kill)
    summary = _run(job, fake)
    assert (summary.ok, summary.failed, summary.quarantined) == (15, 1, 1)
    rows = {r["param_id"]: r for r in read_dataset(job.output_dir / "params")}
    assert rows[poison]["error_type"] == "MemoryExceeded"
    assert all(r["status"] == "ok" for pid, r in rows.items() if pid != poison)
    assert beside and all(not s for s in beside)


class _PoisonKills:
    """Kills the worker of each sim of ``poison`` as it starts, 50 times at most, so that
    a loop that never convicts it ends (the param then completes and the test fails)
    instead of running for ever."""

    def __init__(self, poison: str):
        self.poison, self.kills = poison, 0

    def __call__(self, task: FakeTask) -> Cause | None:
        if task.param_id == self.poison and task.key.startswith("sim-") and self.kills < 50:
            self.kills += 1
            return Cause.MEMORY_TERMINATE
        return None


@pytest.mark.parametrize("threads", [1, 2])
def test_a_poison_param_whose_start_was_never_reported_is_quarantined(
    tmp_path: Path, threads: int
) -> None:
    """Each worker the poison param kills dies before its start report leaves it (the
    loss names nothing running): the kill strikes every task the worker held, so the
    poison param is still isolated and quarantined, not failed by Dask's KilledWorker,
    and every innocent param completes."""
    values = [{"k": i} for i in range(16)]
    job = _job(tmp_path, values)
    poison = list(job.params)[3].param_id
    kill = _PoisonKills(poison)
    fake = FakeCluster(n_workers=2, threads=threads, memory_limit=400 * MiB,
                       resources=True, on_run=kill, start_reports_lost=True)
    summary = _run(job, fake)
    assert (summary.ok, summary.failed, summary.quarantined) == (15, 1, 1), kill.kills
    assert kill.kills <= 6
    rows = {r["param_id"]: r for r in read_dataset(job.output_dir / "params")}
    assert rows[poison]["error_type"] == "MemoryExceeded"
    assert "needs more memory than a worker" in rows[poison]["error"]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("record", [True, False], ids=["record", "no-record"])
def test_a_start_record_strikes_only_the_task_that_ran(
    tmp_path: Path, threads: int, record: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """Start reports lost on every kill. With each worker's start record read at its
    exit, only the poison param is struck and isolated and suspects stay beside the
    others; without it every kill strikes every task its worker held, so innocent
    params are isolated too and suspects run alone. Both quarantine the poison."""
    values = [{"k": i} for i in range(16)]
    job = _job(tmp_path, values)
    poison = list(job.params)[3].param_id
    kill = _PoisonKills(poison)
    fake = FakeCluster(n_workers=2, threads=threads, memory_limit=400 * MiB,
                       resources=True, on_run=kill, start_reports_lost=True,
                       start_record=record)
    runner = Runner(job, fake, RunOptions(), clock=fake.clock)
    with caplog.at_level(logging.WARNING, logger="tidegate"):
        summary = asyncio.run(asyncio.wait_for(runner.run(), 60))
    assert (summary.ok, summary.failed, summary.quarantined) == (15, 1, 1), kill.kills
    isolated = {r.getMessage().split()[1] for r in caplog.records
                if getattr(r, "action", "") == "param_isolated"}
    solo_alone = [r for r in caplog.records if getattr(r, "action", "") == "solo_alone"]
    if record:
        assert isolated == {poison} and kill.kills == 3  # two strikes, then alone
        assert runner.window.solo_beside and not solo_alone
    else:
        assert poison in isolated and len(isolated) > 1, isolated
        assert not runner.window.solo_beside and solo_alone


class _RecordNamesNoHeldTask(FakeCluster):
    """Every kill's start record names no task the worker held (``recorded_kills``), or
    there is none and no start was reported."""

    recorded_kills = False

    def kill_worker(self, address: str, cause: Cause, rss: int | None = None,
                    executing: tuple[str, ...] | None = None,
                    recorded: bool = False) -> Any:
        return super().kill_worker(address, cause, rss, (), self.recorded_kills)


@pytest.mark.parametrize("recorded", [True, False], ids=["record", "no-record"])
def test_kills_the_start_record_blames_on_no_held_task_strike_none(
    tmp_path: Path, recorded: bool, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker killed twice while the first param's sim was starting, its start record
    naming no task it held (a cancelled task running on: a thread cannot be stopped):
    nothing is struck, no param isolated, suspects stay beside the others. Without a
    record the same kills strike every task held, isolate the param and send suspects
    to run alone."""
    job = _job(tmp_path, [{"k": i} for i in range(8)])
    first = next(iter(job.params)).param_id
    kills: list[str] = []

    def kill(task: FakeTask) -> Cause | None:
        if task.param_id == first and task.key.startswith("sim-") and len(kills) < 2:
            kills.append(task.key)
            return Cause.MEMORY_TERMINATE
        return None

    fake = _RecordNamesNoHeldTask(n_workers=2, threads=1, memory_limit=400 * MiB,
                                  resources=True, on_run=kill)
    fake.recorded_kills = recorded
    runner = Runner(job, fake, RunOptions(), clock=fake.clock)
    with caplog.at_level(logging.WARNING, logger="tidegate"):
        summary = asyncio.run(asyncio.wait_for(runner.run(), 60))
    actions = [getattr(r, "action", "") for r in caplog.records]
    assert len(kills) == 2 and summary.ok == 8 and summary.oom_events == 2
    if recorded:
        assert "param_isolated" not in actions and "solo_alone" not in actions
        assert runner.window.solo_beside
    else:
        assert "param_isolated" in actions and "solo_alone" in actions


def test_a_memory_kill_of_a_worker_holding_no_task_keeps_suspects_beside(
    tmp_path: Path,
) -> None:
    """A worker killed for memory while it held no task (nothing assigned, so no start
    could be lost) leaves suspects admitted beside the others."""
    job = _job(tmp_path, [{"k": i} for i in range(6)])
    fake: FakeCluster
    killed: list[str] = []

    def kill_an_idle_worker(task: FakeTask) -> Cause | None:
        idle = [a for a in fake.workers_
                if not any(t.worker == a and t.state == "pending" for t in fake.tasks.values())]
        if not killed and idle:
            killed.append(idle[0])
            fake.kill_worker(idle[0], Cause.MEMORY_TERMINATE, rss=fake.memory_limit,
                             executing=())
        return None

    fake = FakeCluster(n_workers=3, threads=1, memory_limit=400 * MiB, resources=True,
                       on_run=kill_an_idle_worker, start_reports_lost=True)
    runner = Runner(job, fake, RunOptions(batch_size=1), clock=fake.clock)
    summary = asyncio.run(runner.run())
    assert killed and summary.ok == 6 and summary.oom_events == 1
    assert runner.window.solo_beside


class _CachedWorkers(FakeCluster):
    """Workers holding 60% of their limit at idle (a model's per-worker cache): never
    below low water."""

    def _new_worker(self, name: str | None = None) -> None:
        super()._new_worker(name)
        for w in self.workers_.values():
            w.rss = w.idle = int(0.6 * self.memory_limit)


def test_suspects_run_alone_on_workers_whose_idle_memory_is_above_low_water(
    tmp_path: Path,
) -> None:
    """Start reports lost (suspects then wait for the cluster to settle and run alone)
    on workers that sit at 60% of their limit when idle: at their idle memory they are
    settled, so the suspects run and the job ends (it waited for ever on "calm")."""
    job = _job(tmp_path, [{"k": i} for i in range(16)])
    fake = _CachedWorkers(n_workers=2, threads=1, memory_limit=400 * MiB, resources=True,
                          on_run=_PoisonKills(list(job.params)[3].param_id),
                          start_reports_lost=True)
    runner = Runner(job, fake, RunOptions(), clock=fake.clock)

    async def bounded() -> Any:
        return await asyncio.wait_for(runner.run(), 60)

    summary = asyncio.run(bounded())
    assert (summary.ok, summary.failed, summary.quarantined) == (15, 1, 1)


def _child_killing(tmp_path: Path, *, threads: int) -> tuple[Job, str, FakeCluster]:
    """6 params on workers of 400 MiB; the plugin kills the child of the third's sims."""
    job = _job(tmp_path, [{"k": i} for i in range(6)])
    heavy = list(job.params)[2].param_id
    fake: FakeCluster

    def child(task: FakeTask) -> Cause | None:
        if task.param_id == heavy and task.key.startswith("sim-"):
            fake.kill_child(task.key, 390 * MiB)
        return None

    fake = FakeCluster(threads=threads, memory_limit=400 * MiB, resources=True, on_run=child)
    return job, heavy, fake


def test_a_child_killed_for_memory_isolates_then_quarantines(tmp_path: Path) -> None:
    """The worker plugin killed a sim's child process: an OOM event and a backoff; the
    param reruns alone, and killed alone it is quarantined with the kill's numbers."""
    job, heavy, fake = _child_killing(tmp_path, threads=2)
    metrics = Metrics()
    summary = _run(job, fake, metrics)
    assert (summary.ok, summary.failed, summary.quarantined) == (5, 1, 1)
    assert summary.oom_events == 2 and summary.worker_restarts == 0
    row = next(r for r in read_dataset(job.output_dir / "params") if r["param_id"] == heavy)
    assert row["error_type"] == "MemoryExceeded"
    assert "390 MiB" in row["error"] and "ran alone" in row["error"]
    assert metrics.registry.get_sample_value("tidegate_child_kills_total") == 2


def test_slots_and_the_sim_request_are_exported_per_worker_name(tmp_path: Path) -> None:
    values = [{"k": i} for i in range(4)]
    job = _job(tmp_path, values)
    metrics = Metrics()
    fake = FakeCluster(threads=2, memory_limit=400 * MiB, resources=True)
    _run(job, fake, metrics)
    reg = metrics.registry
    assert reg.get_sample_value("tidegate_sim_request_bytes") and \
        reg.get_sample_value("tidegate_sim_request_bytes") <= 400 * MiB
    names = {w.name for w in fake.workers_.values()}
    for name in names:
        assert reg.get_sample_value("tidegate_worker_slots", {"worker": name}) >= 1
    assert reg.get_sample_value("tidegate_slots") >= 2


def test_admission_blocked_seconds_are_counted_by_reason(tmp_path: Path) -> None:
    """A pinned window full counts as `pinned`; a worker at high water as `memory`."""
    values = [{"k": i} for i in range(20)]
    metrics = Metrics()
    _run(_job(tmp_path, values), FakeCluster(resources=True), metrics, batch_size=1)
    seconds = metrics.registry.get_sample_value
    assert seconds("tidegate_admission_blocked_seconds_total", {"reason": "pinned"}) > 0
    assert seconds("tidegate_admission_blocked_seconds_total", {"reason": "memory"}) == 0

    hot = FakeCluster(resources=True)
    for w in hot.workers_.values():
        w.rss = int(0.9 * w.memory_limit)
    original = hot.completed

    async def completed(timeout: float) -> list[str]:
        if hot.now > 2.0:  # the pressure passes after a while (the fake's clock)
            for w in hot.workers_.values():
                w.rss = 0
        return await original(timeout)

    hot.completed = completed  # type: ignore[method-assign]
    metrics = Metrics()
    summary = _run(_job(tmp_path / "hot", values), hot, metrics)
    assert summary.ok == 20
    seconds = metrics.registry.get_sample_value
    assert seconds("tidegate_admission_blocked_seconds_total", {"reason": "memory"}) > 0


def test_a_child_killed_alone_on_a_one_thread_worker_is_quarantined_at_once(
    tmp_path: Path,
) -> None:
    """One thread per worker, all workers alike: the kill is exactly that sim's, on a
    worker as large as any, so it is quarantined without a rerun."""
    job, heavy, fake = _child_killing(tmp_path, threads=1)
    summary = _run(job, fake)
    assert (summary.ok, summary.failed, summary.quarantined) == (5, 1, 1)
    assert summary.oom_events == 1
    assert not [k for k in fake.submitted if heavy in k and re.search(r"-r\d+$", k)]
