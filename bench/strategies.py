"""The four ways to run a sweep, each on the scenario's shared LocalCluster.

- ``naive``: submit every sim and agg at once, gather the aggs at the end, then gather
  every sim again for the model outputs (what a submit-all runner does).
- ``fixed``: submit B params, gather them, write Parquet, release, repeat (a barrier
  per batch).
- ``dask-window``: the raw Dask idiom, no tidegate code in the loop: an
  ``as_completed`` window, ``next_batch``, one gather, a ``map`` refill; Parquet every
  1,000 params.
- ``tidegate``: tidegate.runner.Runner, adaptive unless the arm pins B.

The first three use the harness's synchronous client; tidegate its own asynchronous
one (tidegate.cluster.Cluster wraps ``Client(asynchronous=True)``), on the same
scheduler. Each measures its own wall time, from its first submission (tidegate: the
call to ``Runner.run``) to its last write.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from distributed import Client, as_completed, wait

from bench.cluster import BenchCluster
from bench.sampler import Probe
from bench.scenarios import Arm
from bench.workload import ParquetSink, Submitted, Tasks
from tidegate.cluster import Cluster
from tidegate.runner import Runner, RunOptions
from tidegate.spec import Job

FLUSH_PARAMS = 1000  # tidegate's default flush_params, for the window strategy


def gather(client: Client, futures: list[Any], deadline: float) -> list[Any]:
    """``client.gather`` that gives up at ``deadline`` (TimeoutError: the arm did not
    finish). Futures already finished still need their data fetched, and when the
    worker holding it dies the key is recomputed; with the cluster short of workers
    (a nanny whose restart failed) an unbounded gather hung a whole bench run."""
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("the run's time limit passed")
    # Client.gather takes no timeout; its own sync call does (callback_timeout).
    out: list[Any] = client.sync(client._gather, futures, errors="skip",
                                 callback_timeout=left)
    return out


@dataclass(slots=True)
class Outcome:
    status: str  # "ok" | "did not finish" | "failed"
    wall_s: float
    params_ok: int
    params_failed: int
    detail: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """Runs one job; ``probe`` may be called from the sampler thread meanwhile."""

    def __init__(self, arm: Arm, cluster: BenchCluster, job: Job, output: Path):
        self.arm = arm
        self.cluster = cluster
        self.job = job
        self.output = output
        self.n = job.n_params
        self.done = 0

    @property
    def batch(self) -> int:
        return self.arm.batch or self.n

    def probe(self) -> Probe | None:
        return Probe(self.batch, len(self.cluster.client.futures), self.done)

    def run(self, time_limit: float) -> Outcome:
        # distributed.wait and as_completed act through the current client's event
        # loop: make it this one, whichever client was created last.
        with self.cluster.client.as_current():
            return self._run(time_limit)

    def _run(self, time_limit: float) -> Outcome:
        raise NotImplementedError

    def _outcome(self, status: str, start: float, sink: ParquetSink) -> Outcome:
        return Outcome(status, time.monotonic() - start, sink.ok, self.n - sink.ok)


class Naive(Strategy):
    _subs: tuple[Submitted, ...] = ()  # while running: every param's futures, for probe()

    def _run(self, time_limit: float) -> Outcome:
        tasks, sink = Tasks(self.cluster.client, self.job), ParquetSink(self.output)
        start = time.monotonic()
        subs = tasks.submit(list(range(self.n)))
        self._subs = tuple(subs)
        client = self.cluster.client
        try:
            wait([f for s in subs for f in s.watch], timeout=time_limit)
            results = gather(client, [f for s in subs for f in s.aggs], start + time_limit)
            if tasks.outputs:
                results += gather(client, [f for s in subs for f in s.sims],
                                  start + time_limit)
        except TimeoutError:
            self._subs = ()
            return self._outcome("did not finish", start, sink)
        self._subs = ()
        del subs
        sink.add(results)
        sink.flush()
        self.done = sink.ok
        return self._outcome("ok", start, sink)

    def probe(self) -> Probe | None:
        subs = self._subs
        done = sum(all(f.done() for f in s.watch) for s in subs) if subs else self.done
        return Probe(self.batch, len(self.cluster.client.futures), done)


class Fixed(Strategy):
    def _run(self, time_limit: float) -> Outcome:
        tasks, sink = Tasks(self.cluster.client, self.job), ParquetSink(self.output)
        start = time.monotonic()
        deadline = start + time_limit
        for first in range(0, self.n, self.batch):
            subs = tasks.submit(list(range(first, min(first + self.batch, self.n))))
            try:
                wait([f for s in subs for f in s.watch], timeout=deadline - time.monotonic())
                sink.add(gather(self.cluster.client,
                                [f for s in subs for f in s.to_gather(tasks.outputs)],
                                deadline))
            except TimeoutError:
                return self._outcome("did not finish", start, sink)
            del subs  # the barrier: the whole batch is released at once
            sink.flush()
            self.done = sink.ok + sink.failed
        return self._outcome("ok", start, sink)


class DaskWindow(Strategy):
    def _run(self, time_limit: float) -> Outcome:
        client = self.cluster.client
        self._tasks, sink = Tasks(client, self.job), ParquetSink(self.output)
        start = time.monotonic()
        self._deadline = start + time_limit
        self._ac = as_completed(loop=client.loop, timeout=time_limit)
        # watched key -> (its param's futures, how many of its watched futures are left)
        self._inflight: dict[str, tuple[Submitted, list[int]]] = {}
        self._admitted = 0
        self._admit(self.batch)
        try:
            while not self._ac.is_empty():
                # No local name may keep a completed param's futures (and its results on
                # the cluster) alive past this iteration: one call does the whole step.
                self.done += self._step(sink)
                self._admit(self.batch - (self._admitted - self.done))
        except TimeoutError:
            return self._outcome("did not finish", start, sink)
        sink.flush()
        return self._outcome("ok", start, sink)

    def _step(self, sink: ParquetSink) -> int:
        ready = []
        for f in [next(self._ac), *self._ac.next_batch(block=False)]:
            s, left = self._inflight.pop(f.key)
            left[0] -= 1
            if left[0] == 0:
                ready.append(s)
        if ready:
            outputs = self._tasks.outputs
            sink.add(gather(self.cluster.client,
                            [f for s in ready for f in s.to_gather(outputs)], self._deadline))
            if sink.pending >= FLUSH_PARAMS:
                sink.flush()
        return len(ready)

    def _admit(self, room: int) -> None:
        indices = list(range(self._admitted, min(self._admitted + room, self.n)))
        if not indices:
            return
        self._admitted += len(indices)
        for s in self._tasks.submit(indices):
            left = [len(s.watch)]
            for f in s.watch:
                self._inflight[f.key] = (s, left)
            self._ac.update(s.watch)


class Tidegate(Strategy):
    _runner: Runner | None = None
    _client: Client | None = None

    @property
    def batch(self) -> int:
        return self._runner.batch_size if self._runner else 0

    def probe(self) -> Probe | None:
        runner, client = self._runner, self._client
        if runner is None or client is None:
            return None
        return Probe(runner.batch_size, len(client.futures), runner.snapshot().done)

    def run(self, time_limit: float) -> Outcome:
        return asyncio.run(self._run_async(time_limit))

    async def _run_async(self, time_limit: float) -> Outcome:
        client = await Client(self.cluster.address, asynchronous=True)
        # local=None: closing it afterwards must leave the shared LocalCluster running.
        cluster = Cluster(client, None)
        runner = Runner(self.job, cluster, RunOptions(batch_size=self.arm.batch))
        self._runner, self._client = runner, client
        stop = asyncio.get_running_loop().call_later(time_limit, runner.stop)
        start = time.monotonic()
        try:
            summary = await runner.run()
        finally:
            wall = time.monotonic() - start
            stop.cancel()
            await cluster.close()
        status = {"succeeded": "ok", "interrupted": "did not finish"}.get(summary.state, "failed")
        detail = {
            "batch_min": summary.batch_min,
            "batch_max": summary.batch_max,
            "batch_final": summary.batch_final,
            "oom_events": summary.oom_events,
            "worker_restarts": summary.worker_restarts,
            "worker_losses": summary.worker_losses,
            "peak_inflight_tasks": summary.peak_inflight_tasks,
            "parts": summary.parts,
            "quarantined": summary.quarantined,
            "sim_tasks": summary.sim_tasks,
            "sims_submitted": summary.sims_submitted,
        }
        return Outcome(status, wall, summary.ok, self.n - summary.ok, detail)


STRATEGY_CLASSES: dict[str, type[Strategy]] = {
    "naive": Naive,
    "fixed": Fixed,
    "dask-window": DaskWindow,
    "tidegate": Tidegate,
}
