"""Cluster.gather on a real embedded cluster: a finished result whose worker is gone
and whose recomputation can never be scheduled is LOST within the gather's timeout,
not awaited for ever (make bench once sat 10 minutes in such a gather)."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from tidegate.cluster import ClusterOptions, open_cluster
from tidegate.outcome import FailureKind, TaskFailure


def _double(x: int) -> int:
    return 2 * x


async def _lost_gather(heard: bool) -> tuple[list[object], float, list[object]]:
    cluster = await open_cluster(ClusterOptions(workers=2, threads_per_worker=1))
    try:
        client = cluster.client
        await client.wait_for_workers(2)
        first, second = sorted(w.address for w in await cluster.workers())
        # Pinned to one worker: Dask recomputes a lost result with its restrictions, and
        # a worker the nanny starts again has another address, so it is no-worker for
        # ever (as a task whose resource its new worker lacks is, dask/distributed#6677).
        pinned = client.submit(_double, 21, key="sim-gather-pinned", workers=[first],
                               allow_other_workers=False, pure=False)
        free = client.submit(_double, 4, key="sim-gather-free", workers=[second],
                             allow_other_workers=False, pure=False)
        await asyncio.wait_for(client.gather([pinned, free]), 60)
        cluster._futures.update({str(pinned.key): pinned, str(free.key): free})
        pid = (await client.run(os.getpid, workers=[first]))[first]
        os.kill(pid, signal.SIGKILL)
        # Heard: the client knows the result is gone. Not yet: the gather itself finds
        # the worker dead, and Dask recomputes inside it.
        while heard and pinned.status == "finished":
            await asyncio.sleep(0.05)
        started = time.monotonic()
        got = await asyncio.wait_for(
            cluster.gather([str(pinned.key), str(free.key)], timeout_s=3), 60)
        waited = time.monotonic() - started
        # A result fetched once is fetched again by a later call.
        again = await asyncio.wait_for(cluster.gather([str(free.key)], timeout_s=3), 60)
        return got, waited, again
    finally:
        await cluster.close()


@pytest.mark.parametrize("heard", [True, False], ids=["loss-heard", "loss-found-by-gather"])
def test_a_result_that_can_never_be_recomputed_is_lost_within_the_timeout(heard: bool) -> None:
    got, waited, again = asyncio.run(_lost_gather(heard))
    lost, fetched = got
    assert isinstance(lost, TaskFailure) and lost.kind is FailureKind.LOST, lost
    assert "could not be fetched within 3 s" in lost.error.message
    assert fetched == 8
    assert again == [8]
    assert waited < 20, waited
