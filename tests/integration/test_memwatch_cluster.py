"""The worker-side memory watch on a real LocalCluster: the tidegate-memory resource,
the tree metrics on heartbeats, the executing notice, and a sim whose child process runs
past the worker's limit failing alone while the worker lives on."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from distributed import Client, LocalCluster

from tidegate.simreturn import SimReturn, run_sim
from tidegate.worker import (
    EXECUTING_TOPIC,
    IDLE_RSS_METRIC,
    MEMORY_KILL_TOPIC,
    MEMORY_RESOURCE,
    TREE_RSS_METRIC,
    memory_watch_plugin,
)

MiB = 2**20
LIMIT = 600 * MiB
MODEL = "tidegate.workloads:synthetic"


async def _until(cond: Callable[[], Any], timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = await cond() if asyncio.iscoroutinefunction(cond) else cond()
        if value:
            return value
        await asyncio.sleep(0.05)
    raise TimeoutError("condition not met in time")


@contextlib.asynccontextmanager
async def _watched_worker() -> AsyncIterator[tuple[Client, list[dict[str, Any]]]]:
    """One worker of one thread with tidegate's memory watch, and the executing notices
    it sends, as they come."""
    async with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, memory_limit=LIMIT,
        dashboard_address=None, asynchronous=True,
    ) as cluster, Client(cluster, asynchronous=True) as client:
        await client.wait_for_workers(1)
        plugin = memory_watch_plugin()
        await client.register_plugin(plugin, name=plugin.name)
        notices: list[dict[str, Any]] = []
        client.subscribe_topic(EXECUTING_TOPIC, lambda event: notices.append(event[1]))
        yield client, notices


async def _scenario() -> dict[str, Any]:
    out: dict[str, Any] = {}
    async with _watched_worker() as (client, notices):

        async def worker_info() -> dict[str, Any] | None:
            workers = (await client.scheduler.identity())["workers"]
            if len(workers) != 1:
                return None
            (addr, info), = workers.items()
            return {"address": addr, **info}

        async def resourced() -> dict[str, Any] | None:
            info = await worker_info()
            return info if info and info.get("resources") else None

        out["before"] = await _until(resourced)
        out["pid_before"] = await client.run(os.getpid)

        async def with_tree_metric() -> dict[str, Any] | None:
            info = await worker_info()
            metrics = (info or {}).get("metrics", {})
            return metrics if metrics.get(TREE_RSS_METRIC) else None

        out["metrics"] = await _until(with_tree_metric)

        hog = client.submit(run_sim, MODEL, {"child_alloc_bytes": 700 * MiB,
                                             "child_seconds": 30}, "p-hog", 0, 1, pure=False)
        out["hog"] = await hog
        out["hog_key"] = hog.key
        ok = client.submit(run_sim, MODEL, {"child_alloc_bytes": 100 * MiB,
                                            "child_seconds": 0.5}, "p-ok", 0, 1, pure=False)
        out["ok"] = await ok
        out["ok_key"] = ok.key
        await _until(lambda: {n.get("key") for n in notices} >= {hog.key, ok.key})
        out["notices"] = list(notices)
        out["kills"] = [msg for _, msg in await client.get_events(MEMORY_KILL_TOPIC)]
        out["after"] = await worker_info()
        out["pid_after"] = await client.run(os.getpid)
    return out


def test_memory_watch_on_a_real_worker() -> None:
    out = asyncio.run(_scenario())
    before = out["before"]
    # The resource is the worker's memory limit in bytes.
    assert before["resources"] == {MEMORY_RESOURCE: float(LIMIT)}
    # The tree metrics reach the scheduler on heartbeats.
    assert out["metrics"][TREE_RSS_METRIC] > 10 * MiB
    assert out["metrics"][IDLE_RSS_METRIC] > 10 * MiB

    hog: SimReturn = out["hog"]
    assert hog.error is not None and hog.error.type == "MemoryExceeded", hog.error
    assert hog.outputs == {}
    (kill,) = out["kills"]
    assert kill["key"] == out["hog_key"] and kill["worker"] == before["address"]
    assert kill["limit"] == LIMIT and kill["tree_rss"] > 0.95 * LIMIT
    assert kill["child_rss"] > 300 * MiB

    # The same worker process lived through it: no restart, no new address.
    assert out["after"]["address"] == before["address"]
    assert out["pid_after"] == out["pid_before"]

    ok: SimReturn = out["ok"]
    assert ok.ok, ok.error
    assert ok.rss_delta_bytes >= 90 * MiB

    notice = {n["key"]: n for n in out["notices"]}
    assert notice[out["hog_key"]]["worker"] == before["address"]
    assert notice[out["ok_key"]]["worker"] == before["address"]


async def _fused_scenario() -> dict[str, Any]:
    from tidegate.worker import run_params

    async with _watched_worker() as (client, notices):
        light = {"output_bytes": 64}
        # Each replicate of the middle param holds 120 MiB while it runs, its
        # neighbours' nothing.
        heavy = {"alloc_bytes": 120 * MiB}
        params = [("p0", light, [1, 2, 3]), ("p1", heavy, [4, 5, 6]), ("p2", light, [7, 8, 9])]
        fused = client.submit(run_params, MODEL, params, pure=False)
        result = await fused
        single = client.submit(run_sim, MODEL, light, "p3", 0, 1, pure=False)
        await single
        await _until(lambda: single.key in {n.get("key") for n in notices})
        return {"result": result, "key": fused.key, "single": single.key,
                "notices": list(notices)}


def test_a_task_of_several_sims_announces_once_and_charges_each_sim_its_own_memory() -> None:
    out = asyncio.run(_fused_scenario())
    keys = [n["key"] for n in out["notices"]]
    # One notice for the task of nine sims, one for the task of one.
    assert keys.count(out["key"]) == 1, keys
    assert keys.count(out["single"]) == 1, keys
    per_param = out["result"]
    assert [len(p) for p in per_param] == [3, 3, 3]
    for sims, heavy in zip(per_param, (False, True, False), strict=True):
        for sim in sims:
            assert isinstance(sim, SimReturn) and sim.ok, sim
            # Each sim of the heavy param is charged its 120 MiB, each light one far less,
            # though every sim after the first begins from its predecessor's reading.
            if heavy:
                assert sim.rss_delta_bytes >= 100 * MiB, sim.rss_delta_bytes
            else:
                assert sim.rss_delta_bytes < 40 * MiB, sim.rss_delta_bytes
