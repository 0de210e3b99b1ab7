"""A background thread that samples a run: every 0.1 s this process's RSS, every 0.5 s
the workers' memory (tidegate.cluster.Cluster.workers(), the scheduler's identity), the
client's own futures, the strategy's batch size and the scheduler's task count; and,
where a scenario asks, every 20 ms each worker's process tree (TreeSampler)."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from bench.cluster import BenchCluster
from tidegate.cluster import Cluster

RSS_EVERY_S = 0.1
SAMPLE_EVERY_S = 0.5


@dataclass(frozen=True, slots=True)
class Probe:
    """What a strategy reports about itself while it runs."""

    batch: int  # B: params allowed in flight (fixed for all but tidegate)
    inflight_tasks: int  # the client's own futures (len(client.futures))
    done: int  # params completed


@dataclass(slots=True)
class Series:
    t: list[float] = field(default_factory=list)
    batch: list[int] = field(default_factory=list)
    inflight_tasks: list[int] = field(default_factory=list)
    scheduler_tasks: list[int] = field(default_factory=list)
    done: list[int] = field(default_factory=list)
    worker_mem_frac: list[float | None] = field(default_factory=list)  # max over workers
    worker_rss_mib: list[float] = field(default_factory=list)  # sum over workers
    client_rss_mib: list[float] = field(default_factory=list)  # above the baseline


class Sampler:
    def __init__(self, cluster: BenchCluster, probe: Callable[[], Probe | None]):
        self.cluster = cluster
        self.probe = probe
        self.series = Series()
        self.peak_mem_frac = 0.0
        self.process = psutil.Process()
        self.rss_before = self.process.memory_info().rss
        self.peak_rss = self.rss_before
        self._rss_now = self.rss_before
        self._workers = Cluster(cluster.monitor, None)  # read-only use: memory snapshots
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-sampler", daemon=True)
        self._t0 = 0.0

    def start(self) -> Sampler:
        self.rss_before = self.peak_rss = self.process.memory_info().rss
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self._sample(time.monotonic() - self._t0)  # the state at the end, too

    @property
    def peak_rss_delta(self) -> int:
        return self.peak_rss - self.rss_before

    def _loop(self) -> None:
        next_sample = 0.0
        while not self._stop.is_set():
            self._rss_now = self.process.memory_info().rss
            self.peak_rss = max(self.peak_rss, self._rss_now)
            now = time.monotonic() - self._t0
            if now >= next_sample:
                next_sample = now + SAMPLE_EVERY_S
                self._sample(now)
            self._stop.wait(RSS_EVERY_S)

    def _sample(self, now: float) -> None:
        probe = self.probe()
        try:
            workers = self.cluster.monitor.sync(self._workers.workers)
        except Exception:  # the scheduler busy or a worker restarting: skip this one
            workers = []
        fracs = [w.rss / w.memory_limit for w in workers if w.memory_limit]
        frac = max(fracs) if fracs else None
        if frac is not None:
            self.peak_mem_frac = max(self.peak_mem_frac, frac)
        s = self.series
        s.t.append(round(now, 3))
        s.batch.append(probe.batch if probe else 0)
        s.inflight_tasks.append(probe.inflight_tasks if probe else 0)
        s.done.append(probe.done if probe else 0)
        s.scheduler_tasks.append(self.cluster.scheduler_tasks)
        s.worker_mem_frac.append(round(frac, 4) if frac is not None else None)
        s.worker_rss_mib.append(round(sum(w.rss for w in workers) / 2**20, 1))
        s.client_rss_mib.append(round((self._rss_now - self.rss_before) / 2**20, 1))

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self.series)


TREE_EVERY_S = 0.02


class TreeSampler:
    """Peak RSS of each worker's process tree (the worker process and all its
    descendants), every 20 ms, read with psutil from this process.

    The scheduler's view (worker heartbeats, the worker's own RSS) misses memory a task
    holds in a child process; the kernel's OOM killer and a cgroup limit do not. Worker
    pids come from ``client.run(os.getpid)`` and are asked again when one disappears (a
    restarted worker is a new process)."""

    def __init__(self, cluster: BenchCluster, memory_limit: int):
        self.cluster = cluster
        self.limit = memory_limit
        self.peak: dict[str, int] = {}  # worker address -> peak tree RSS in bytes
        self._pids: dict[str, int] = {}
        self._procs: dict[str, psutil.Process] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-trees", daemon=True)

    def start(self) -> TreeSampler:
        self._refresh()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    @property
    def peak_frac(self) -> dict[str, float]:
        return {w: round(b / self.limit, 4) for w, b in sorted(self.peak.items())}

    def _refresh(self) -> None:
        try:
            pids = dict(self.cluster.monitor.run(os.getpid))
        except Exception:  # a worker restarting: try again on the next sample
            return
        self._pids = pids
        self._procs = {}
        for worker, pid in pids.items():
            with contextlib.suppress(psutil.NoSuchProcess):
                self._procs[worker] = psutil.Process(pid)

    def _loop(self) -> None:
        while not self._stop.wait(TREE_EVERY_S):
            gone = False
            for worker, proc in list(self._procs.items()):
                try:
                    tree = [proc, *proc.children(recursive=True)]
                except psutil.NoSuchProcess:
                    gone = True
                    continue
                total = 0
                for p in tree:
                    with contextlib.suppress(psutil.NoSuchProcess):  # a child that just exited
                        total += p.memory_info().rss
                if total > self.peak.get(worker, 0):
                    self.peak[worker] = total
            if gone or len(self._procs) < len(self._pids) or not self._procs:
                self._refresh()
