"""The run loop on an in-memory FakeCluster: window, retries, isolation, quarantine,
drain, disconnects and resume, each in milliseconds (the same paths run on real
clusters in tests/integration)."""

from __future__ import annotations

import asyncio
import re
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import read_dataset, synthetic_spec
from tests.fakes import FakeCluster, FakeTask, after_aggs
from tidegate.cluster import SchedulerLost, WorkersLost
from tidegate.losses import Cause
from tidegate.metrics import Metrics
from tidegate.runner import Runner, RunOptions
from tidegate.spec import Job, job_from_dict
from tidegate.writer import read_manifest


def _job(tmp_path: Path, n: int, **overrides: Any) -> Job:
    return job_from_dict(synthetic_spec(n, **overrides), base_dir=tmp_path)


def _run(job: Job, fake: FakeCluster, **options: Any) -> Any:
    runner = Runner(job, fake, RunOptions(**options), clock=fake.clock)
    return asyncio.run(runner.run())


def _statuses(job: Job) -> Counter[str]:
    rows = read_dataset(job.output_dir / "params")
    assert len(rows) == len({r["param_id"] for r in rows}), "a param was written twice"
    return Counter(r["status"] for r in rows)


def test_every_param_is_written_exactly_once(tmp_path: Path) -> None:
    """30 params through the fake: each appears once, ok, with both replicates' rows."""
    job = _job(tmp_path, 30)
    summary = _run(job, FakeCluster(), flush_params=7)
    assert (summary.state, summary.ok, summary.failed) == ("succeeded", 30, 0)
    assert _statuses(job) == {"ok": 30}
    assert len(read_dataset(job.output_dir / "model_outputs" / "data")) > 0
    # A part is due every 7 params; one written in the background when the next is due
    # lets that one take what arrived meanwhile (up to 14): 5 parts (7 x 4 + 2) at most.
    assert 3 <= summary.parts <= 5


def test_pinned_window_bounds_the_tasks_held(tmp_path: Path) -> None:
    """With B pinned at 3, never more than 3 params' tasks (2 sims + 1 agg each) exist."""
    job = _job(tmp_path, 40)
    fake = FakeCluster()
    summary = _run(job, fake, batch_size=3)
    assert summary.ok == 40
    assert 0 < fake.max_tasks <= 3 * 3
    assert summary.peak_inflight_tasks <= 9


def test_a_model_error_fails_its_param_only(tmp_path: Path) -> None:
    """One param raising is recorded failed with its error; the job goes on."""
    values = [{"k": i, "fail": "boom" if i == 4 else ""} for i in range(10)]
    job = _job(tmp_path, 0, parameters={"values": values})
    summary = _run(job, FakeCluster())
    assert (summary.ok, summary.failed, summary.exit_code) == (9, 1, 4)
    assert summary.state == "completed_with_failures"
    failed = [r for r in read_dataset(job.output_dir / "params") if r["status"] == "failed"]
    assert [r["param_k"] for r in failed] == [4]
    assert failed[0]["error_type"] == "RuntimeError" and "boom" in failed[0]["error"]


def test_killed_worker_is_resubmitted_then_recorded(tmp_path: Path) -> None:
    """A param whose every worker crashes gets KilledWorker, is resubmitted twice (keys
    -r1, -r2) and then recorded failed; a crash is no memory kill, so no quarantine.
    One param in flight, one task per sim: a param sharing a worker with the crashing
    one three times fails with it, as on Dask (a crash is not isolated as a memory kill
    is), and whether one does depended on how far the fake's instant sims had grown B
    (2 of 6 runs of this file failed so)."""
    job = _job(tmp_path, 6, batch={"fuse": False, "size": 1})
    bad = list(job.params)[2].param_id

    def crash(task: FakeTask) -> Cause | None:
        return Cause.CRASH if task.param_id == bad and task.key.startswith("sim-") else None

    fake = FakeCluster(on_run=crash)
    summary = _run(job, fake)
    assert (summary.ok, summary.failed, summary.quarantined) == (5, 1, 0)
    assert any(k.endswith("-r2") and bad in k for k in fake.submitted)
    assert not any(k.endswith("-r3") for k in fake.submitted)
    failed = [r for r in read_dataset(job.output_dir / "params") if r["status"] == "failed"]
    assert failed[0]["error_type"] == "KilledWorker"
    assert summary.oom_events == 0 and summary.worker_losses == {"crash": summary.worker_restarts}


def test_poison_param_is_isolated_then_quarantined(tmp_path: Path) -> None:
    """A param that kills every worker it runs on for memory: after two shared kills it
    runs alone (nothing else in flight), is killed alone and quarantined with the
    worker's limit in the message; every other param completes."""
    job = _job(tmp_path, 12)
    poison = list(job.params)[1].param_id
    alone_runs: list[set[str]] = []
    fake: FakeCluster

    def kill(task: FakeTask) -> Cause | None:
        if task.param_id != poison or not task.key.startswith("sim-"):
            return None
        if re.search(r"-r\d+$", task.key):  # a rerun: the one that runs alone
            alone_runs.append({t.param_id for t in fake.tasks.values() if t.state == "pending"})
        return Cause.MEMORY_TERMINATE

    fake = FakeCluster(on_run=kill, memory_limit=400 * 2**20)
    summary = _run(job, fake)
    assert (summary.ok, summary.failed, summary.quarantined) == (11, 1, 1)
    assert alone_runs and all(s == {poison} for s in alone_runs)
    failed = [r for r in read_dataset(job.output_dir / "params") if r["status"] == "failed"]
    assert [r["param_id"] for r in failed] == [poison]
    assert failed[0]["error_type"] == "MemoryExceeded"
    assert "worker memory limit 400 MiB" in failed[0]["error"]
    assert summary.oom_events >= 3


def test_a_suspect_waits_for_cancelled_tasks_still_running(tmp_path: Path) -> None:
    """A cancelled poison task runs on and then kills its worker: the innocent suspect
    must not be running "alone" beside it (it was quarantined so under load, when a
    fixed wait after the cancellation was the only guard)."""
    job = _job(tmp_path, 2)
    poison, innocent = next(iter(job.params)).param_id, list(job.params)[1].param_id

    def kill(task: FakeTask) -> Cause | None:
        return Cause.MEMORY_TERMINATE if task.param_id == poison else None

    fake = FakeCluster(n_workers=1, on_run=kill, linger_ticks=40, on_linger_end=kill)
    # The innocent's rerun is slow: it would still be running when the poison's
    # leftover task ends and kills the worker.
    fake.hold = lambda t: t.param_id == innocent and bool(re.search(r"-r\d+$", t.key)) and bool(
        fake.lingering)
    summary = _run(job, fake, batch_size=2)
    assert (summary.ok, summary.quarantined) == (1, 1)
    rows = {r["param_id"]: r for r in read_dataset(job.output_dir / "params")}
    assert rows[innocent]["status"] == "ok"
    assert rows[poison]["error_type"] == "MemoryExceeded"


def test_innocent_suspect_completes_alone(tmp_path: Path) -> None:
    """A param on two memory-killed workers that runs fine alone is not quarantined."""
    job = _job(tmp_path, 8)
    suspect = next(iter(job.params)).param_id
    kills = 0

    def kill(task: FakeTask) -> Cause | None:
        nonlocal kills
        if task.param_id == suspect and kills < 2:
            kills += 1
            return Cause.OOM_KILL
        return None

    summary = _run(job, FakeCluster(on_run=kill))
    assert (summary.ok, summary.failed, summary.quarantined) == (8, 0, 0)
    assert summary.worker_losses == {"oom_kill": 2}


def test_an_oom_kill_halves_b(tmp_path: Path) -> None:
    """B pinned nowhere, a worker OOM-killed mid-run: the next decision backs off."""
    job = _job(tmp_path, 60)
    killed = False
    runner: Runner

    def kill(task: FakeTask) -> Cause | None:
        nonlocal killed
        if not killed and runner.batch_size >= 4:
            killed = True
            return Cause.OOM_KILL
        return None

    fake = FakeCluster(on_run=kill, threads=2)
    runner = Runner(job, fake, RunOptions(), clock=fake.clock)
    before: list[int] = []
    original = runner.limiter.controller.observe_oom

    def observe_oom(now: float) -> Any:
        before.append(runner.batch_size)
        return original(now)

    runner.limiter.controller.observe_oom = observe_oom  # type: ignore[method-assign]
    summary = asyncio.run(runner.run())
    assert summary.ok == 60 and summary.oom_events == 1
    assert before and before[0] >= 4
    assert runner.limiter.decision is not None
    assert summary.batch_min <= max(1, before[0] // 2)


def test_disconnect_interrupts_and_a_rerun_resumes(tmp_path: Path) -> None:
    """The scheduler goes away after some params: SchedulerLost, the manifest says
    interrupted, the committed params stay; a rerun runs only the rest, once each."""
    job = _job(tmp_path, 20)
    fake = FakeCluster()
    fake.on_run = after_aggs(9, fake.disconnect)
    with pytest.raises(SchedulerLost):
        _run(job, fake, flush_params=3)
    manifest = read_manifest(job.output_dir)
    assert manifest is not None and manifest["state"] == "interrupted"
    committed = sum(_statuses(job).values())
    assert 0 < committed < 20
    summary = _run(job, FakeCluster())
    assert (summary.state, summary.resumed, summary.ok) == ("succeeded", committed, 20)
    assert _statuses(job) == {"ok": 20}


def test_drain_lets_inflight_finish_and_admits_nothing(tmp_path: Path) -> None:
    """drain() stops admission; what is in flight completes and is committed; the job
    ends interrupted with the rest left for a resume."""
    job = _job(tmp_path, 50)
    fake = FakeCluster()
    runner = Runner(job, fake, RunOptions(batch_size=4), clock=fake.clock)
    admitted_after: list[int] = []

    def drain_at_10(task: FakeTask) -> Cause | None:
        if task.key.startswith("agg-") and runner.stats.ok == 10 and not runner.draining:
            runner.drain(60)
            admitted_after.append(len(fake.submitted))
        return None

    fake.on_run = drain_at_10
    summary = asyncio.run(runner.run())
    assert summary.state == "interrupted"
    assert admitted_after and len(fake.submitted) == admitted_after[0]
    assert 10 <= summary.ok < 50
    assert sum(_statuses(job).values()) == summary.ok


def test_stop_drops_inflight_work(tmp_path: Path) -> None:
    """stop() ends the run at once: in-flight tasks are cancelled, completed params
    committed, the state interrupted."""
    job = _job(tmp_path, 30)
    fake = FakeCluster()
    runner = Runner(job, fake, RunOptions(batch_size=5), clock=fake.clock)

    def hold_after_5(task: FakeTask) -> bool:
        if runner.stats.ok >= 5:
            runner.stop()
            return True
        return False

    fake.hold = hold_after_5
    summary = asyncio.run(runner.run())
    assert summary.state == "interrupted" and summary.exit_code == 130
    assert fake.tasks == {} and fake.cancelled
    assert sum(_statuses(job).values()) == summary.ok >= 5


def test_stop_ends_a_gather_that_never_returns(tmp_path: Path) -> None:
    """A gather waiting on a result Dask can never recompute (its task no-worker) is
    abandoned at stop(): the run ends interrupted, the params gathered before it
    committed, the one in that gather not (the next run runs it)."""
    job = _job(tmp_path, 30)

    class HangingGather(FakeCluster):
        calls = 0

        async def gather(self, keys: Any) -> Any:
            self.calls += 1
            if self.calls == 4:
                asyncio.get_running_loop().call_later(0.05, runner.stop)
                await asyncio.Event().wait()  # never set
            return await super().gather(keys)

    fake = HangingGather()
    runner = Runner(job, fake, RunOptions(batch_size=1), clock=fake.clock)
    summary = asyncio.run(asyncio.wait_for(runner.run(), 30))
    assert summary.state == "interrupted" and summary.exit_code == 130
    assert summary.ok == 3
    assert sum(_statuses(job).values()) == 3


def test_metrics_follow_the_run(tmp_path: Path) -> None:
    """The run's counters reach the registry: params by outcome, sims by outcome."""
    job = _job(tmp_path, 10)
    metrics = Metrics()
    fake = FakeCluster()
    summary = asyncio.run(Runner(job, fake, RunOptions(), metrics=metrics,
                                 clock=fake.clock).run())
    assert summary.ok == 10
    value = metrics.registry.get_sample_value
    assert value("tidegate_params_total", {"outcome": "ok"}) == 10
    assert value("tidegate_tasks_total", {"kind": "sim", "outcome": "ok"}) == 20
    assert value("tidegate_inflight_params") == 0


class _GatherHangs(FakeCluster):
    """Every worker leaves as the first gather starts, and that gather never returns:
    Dask recomputing lost results with no worker to run them. Reading the workers moves
    the fake clock, as the real one moves while the run waits."""

    async def gather(self, keys: Any) -> Any:
        self.workers_.clear()  # gone for good: no nanny brings them back
        await asyncio.Event().wait()

    async def workers(self) -> Any:
        self.now += 1.0
        return await super().workers()


def test_a_gather_waiting_on_no_workers_ends_in_workers_lost(tmp_path: Path) -> None:
    """A gather that waits for results no worker is left to recompute does not hang the
    run: after no_workers_timeout_s without workers it raises WorkersLost, as between
    passes, and the summary says so."""
    job = _job(tmp_path, 6)
    fake = _GatherHangs()
    runner = Runner(job, fake, RunOptions(poll_seconds=0.01), clock=fake.clock,
                    no_workers_timeout_s=5)
    with pytest.raises(WorkersLost, match="no workers"):
        asyncio.run(asyncio.wait_for(runner.run(), timeout=30))
