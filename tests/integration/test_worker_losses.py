"""Each way a worker process can end gets its cause: real nannies, real signals."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from tidegate.cluster import ClusterOptions, WorkerWatch, open_cluster
from tidegate.losses import Cause, WorkerLoss
from tidegate.simreturn import run_sim
from tidegate.worker import EXIT_TOPIC
from tidegate.workloads import synthetic

MiB = 2**20
MODEL = "tidegate.workloads:synthetic"


async def _loss_where(watch: WorkerWatch, match, timeout: float = 60) -> WorkerLoss:
    """The next classified loss that ``match`` accepts; others (say, of a task Dask
    reran on the other worker) are skipped."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for loss in watch.losses():
            if match(loss):
                return loss
        await asyncio.sleep(0.05)
    raise TimeoutError("no matching worker loss classified")


async def _classify_each_end() -> dict[str, WorkerLoss]:
    cluster = await open_cluster(
        ClusterOptions(workers=2, threads_per_worker=1, memory_limit=400 * MiB)
    )
    client = cluster.client
    seen: dict[str, WorkerLoss] = {}
    try:
        watch = await cluster.watch_workers(time.monotonic)

        async def a_worker() -> tuple[str, int]:
            # Bounded: a nanny whose restart failed leaves one worker, and an unbounded
            # wait hung the suite instead of failing this test.
            await client.wait_for_workers(2, timeout=180)
            return sorted((await client.run(os.getpid)).items())[0]

        for label, signum in (("sigkill", signal.SIGKILL), ("sigterm", signal.SIGTERM)):
            addr, pid = await a_worker()
            os.kill(pid, signum)
            seen[label] = await _loss_where(watch, lambda x, a=addr: x.worker == a)

        await a_worker()
        crash = client.submit(synthetic, {"exit_code": 3}, 0, pure=False)
        seen["exit 3"] = await _loss_where(watch, lambda x: crash.key in x.processing)
        await client.cancel(crash)

        await a_worker()
        hog = client.submit(synthetic, {"alloc_bytes": 420 * MiB, "run_seconds": 5}, 0,
                            pure=False)
        seen["memory"] = await _loss_where(watch, lambda x: hog.key in x.processing)
        await client.cancel(hog)

        addr, _ = await a_worker()
        await client.retire_workers([addr])
        seen["retired"] = await _loss_where(watch, lambda x: x.worker == addr)
    finally:
        await cluster.close()
    return seen


def test_every_kind_of_worker_end_is_classified() -> None:
    """SIGKILL -> oom_kill, SIGTERM -> evicted, exit 3 -> crash, the nanny's memory kill
    -> memory_terminate (with its RSS and the task it ran), retirement -> planned."""
    seen = asyncio.run(_classify_each_end())
    assert (seen["sigkill"].cause, seen["sigkill"].exitcode) == (Cause.OOM_KILL, -9)
    assert (seen["sigterm"].cause, seen["sigterm"].exitcode) == (Cause.EVICTED, -15)
    assert (seen["exit 3"].cause, seen["exit 3"].exitcode) == (Cause.CRASH, 3)
    assert seen["memory"].cause == Cause.MEMORY_TERMINATE
    assert seen["memory"].rss is not None and seen["memory"].rss > 0.9 * 400 * MiB
    assert seen["retired"].cause == Cause.PLANNED


async def _executing_after_cancel() -> tuple[int | None, int | None, float]:
    cluster = await open_cluster(ClusterOptions(workers=1, threads_per_worker=1))
    try:
        await cluster.wait_for_workers(30)
        (keys,) = cluster.submit_params(
            "linger", [("p0", {"run_seconds": 3.0}, [1], 0)], "tidegate.workloads:synthetic",
            [], True,
        )
        deadline = time.monotonic() + 30
        while await cluster.executing("linger") == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)  # polling for the task to start, bounded
        cancelled_at = time.monotonic()
        await cluster.cancel(keys.all)
        right_after = await cluster.executing("linger")
        while (left := await cluster.executing("linger")) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return right_after, left, time.monotonic() - cancelled_at
    finally:
        await cluster.close()


def test_a_cancelled_task_counts_as_executing_until_it_returns() -> None:
    """The scheduler forgets a cancelled task at once; the worker runs it to its end,
    and Cluster.executing sees it there until then (the suspect-runs-alone gate)."""
    right_after, left, waited = asyncio.run(_executing_after_cancel())
    assert right_after == 1
    assert left == 0
    assert waited > 1.0  # it ran on for most of its 3 s after the cancellation


async def _killed_as_it_starts() -> tuple[WorkerLoss, list[dict], str, list[str]]:
    cluster = await open_cluster(
        ClusterOptions(workers=1, threads_per_worker=1, memory_limit=400 * MiB)
    )
    client = cluster.client
    try:
        watch = await cluster.watch_workers(time.monotonic)
        await client.wait_for_workers(1, timeout=180)
        done = client.submit(run_sim, MODEL, {}, "p-before", 0, 1, key="sim-before")
        await done
        # Killed a moment after its start: its report of the start, sent from the
        # worker's event loop, has no time to leave.
        kill = client.submit(run_sim, MODEL, {"kill_signal": int(signal.SIGKILL)}, "p-kill",
                             0, 2, key="sim-kill")
        queued = [client.submit(run_sim, MODEL, {}, f"p-{i}", 0, 3, key=f"sim-queued-{i}")
                  for i in range(2)]
        loss = await _loss_where(watch, lambda x: kill.key in x.processing)
        # The nanny said at its plugin's setup that exits will come (memory kills wait).
        assert watch.tracker.exits_expected
        events = [msg for _, msg in await client.get_events(EXIT_TOPIC)
                  if not msg.get("hooked")]
        await client.cancel([kill, *queued])
        return loss, events, str(kill.key), [str(q.key) for q in queued]
    finally:
        await cluster.close()


def test_a_worker_killed_as_a_task_starts_names_that_task() -> None:
    """A worker SIGKILLed by its own task right after the start: the nanny's exit event
    names that task from the start record the task's thread wrote (not the task the
    thread ran before), and the loss blames it alone, not those queued behind it."""
    loss, events, kill, queued = asyncio.run(_killed_as_it_starts())
    (exit_event,) = [e for e in events if e["worker"] == loss.worker]
    assert exit_event["exitcode"] == -signal.SIGKILL
    assert list(exit_event["started"]) == [kill]
    assert loss.cause is Cause.OOM_KILL
    assert loss.executing == (kill,) and loss.culprits == (kill,)
    assert not set(queued) & set(loss.culprits)
