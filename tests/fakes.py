"""An in-memory cluster with the interface of tidegate.cluster.Cluster (ClusterPort).

It models workers (address, threads, memory limit, which worker runs what, a restart
that comes back under a new address) and runs the real task functions in this process,
a thread's worth of tasks per worker at each ``completed`` call. With ``resources`` its
workers carry the tidegate-memory resource (their memory limit) and a pass runs sims on
a worker only while their requests fit it, as Dask's constrained queue does; a loss then
names the task that was running. Tests drive it: a
``on_run`` hook may kill the worker a task runs on, ``hold`` keeps tasks from running,
``disconnect`` drops the scheduler connection. Its clock advances ``tick`` seconds at
each ``completed`` call, so the run loop's timing rules run in milliseconds.
"""

from __future__ import annotations

import asyncio
import functools
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tidegate.cluster import WorkerInfo
from tidegate.losses import Cause, MemoryKill, WorkerLoss
from tidegate.outcome import FailureKind, Result, TaskFailure
from tidegate.simreturn import TaskError, run_sim
from tidegate.window import TaskKeys
from tidegate.worker import run_target_list

MiB = 2**20
# Dask's distributed.scheduler.allowed-failures
ALLOWED_FAILURES = 3


def _sim(model: str, values: dict[str, Any], pid: str, rep: int, seed: int,
         timeout_s: float | None, deps: list[Any]) -> Any:
    return run_sim(model, values, pid, rep, seed, timeout_s)


def after_aggs(n: int, action: Callable[[], None]) -> Callable[[FakeTask], Cause | None]:
    """An ``on_run`` hook calling ``action`` as the ``n``-th agg task starts (say, to
    disconnect or lose every worker mid-job)."""
    done = 0

    def hook(task: FakeTask) -> Cause | None:
        nonlocal done
        if task.key.startswith("agg-"):
            done += 1
            if done == n:
                action()
        return None

    return hook


@dataclass(slots=True)
class FakeWorker:
    address: str
    nthreads: int
    memory_limit: int
    rss: int = 0
    status: str = "running"
    capacity: int = 0
    name: str = ""
    idle: int | None = None  # its tree's RSS when it last ran nothing, as the plugin says

    def info(self) -> WorkerInfo:
        return WorkerInfo(self.address, self.nthreads, self.memory_limit, self.rss, 0, 0,
                          self.status, name=self.name, capacity=self.capacity,
                          idle=self.idle)


@dataclass(slots=True)
class FakeTask:
    key: str
    param_id: str
    run: Callable[[list[Any]], Any]
    deps: tuple[str, ...]
    worker: str
    watched: bool
    request: int = 0
    priority: int = 0
    result: Any = None
    state: str = "pending"  # pending | finished | erred | cancelled
    deaths: int = 0


@dataclass
class FakeCluster:
    n_workers: int = 2
    threads: int = 1
    memory_limit: int = 1024 * MiB
    tick: float = 0.1
    # Called before a task runs; returning a Cause kills the task's worker with it.
    on_run: Callable[[FakeTask], Cause | None] | None = None
    address: str = "fake://scheduler"
    connected: bool = True
    embedded: bool = False  # as Cluster.embedded: the daemon may restart it
    closed: bool = False
    now: float = 0.0
    workers_: dict[str, FakeWorker] = field(default_factory=dict)
    tasks: dict[str, FakeTask] = field(default_factory=dict)
    held: set[str] = field(default_factory=set)  # keys the task predicate holds back
    hold: Callable[[FakeTask], bool] | None = None
    submitted: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)  # restart_worker's addresses
    cancelled: list[str] = field(default_factory=list)
    max_tasks: int = 0  # most tasks the client held at once
    # A cancelled task that had started runs on for this many ticks on its worker (a
    # thread cannot be interrupted), then ``on_linger_end`` may kill that worker.
    linger_ticks: int = 0
    on_linger_end: Callable[[FakeTask], Cause | None] | None = None
    lingering: dict[str, tuple[FakeTask, int]] = field(default_factory=dict)
    started: set[str] = field(default_factory=set)  # keys whose function began
    resources: bool = False  # workers carry the tidegate-memory resource
    # A worker killed as a task starts reports nothing running (its start report lost).
    start_reports_lost: bool = False
    # Its nanny reads the start record its threads wrote (tidegate.starts): a loss names
    # the task its thread had started, reported or not.
    start_record: bool = False
    # (worker address, keys) of each pass that ran sims together on one worker
    together: list[tuple[str, tuple[str, ...]]] = field(default_factory=list)
    _kills: list[MemoryKill] = field(default_factory=list)
    _ready: list[str] = field(default_factory=list)
    _losses: list[WorkerLoss] = field(default_factory=list)
    _names: itertools.count = field(default_factory=itertools.count)

    def __post_init__(self) -> None:
        for _ in range(self.n_workers):
            self._new_worker()

    def clock(self) -> float:
        return self.now

    # --- the test's controls ----------------------------------------------------------

    def kill_worker(self, address: str, cause: Cause, rss: int | None = None,
                    executing: tuple[str, ...] | None = None,
                    recorded: bool = False) -> WorkerLoss:
        """The worker dies; the nanny brings up a new one under a new address; the tasks
        it was processing go to the least busy worker, or fail with KilledWorker.
        ``executing``: the keys it was running (None: not reported)."""
        processing = tuple(k for k, t in self.tasks.items()
                           if t.worker == address and t.state == "pending")
        name = self.workers_[address].name
        del self.workers_[address]
        self._new_worker(name)
        exitcode = {Cause.OOM_KILL: -9, Cause.EVICTED: -15, Cause.CRASH: 3}.get(cause)
        loss = WorkerLoss(address, cause, exitcode, rss, processing, self.now, executing,
                          recorded=recorded)
        self._losses.append(loss)
        for key in processing:
            task = self.tasks[key]
            task.deaths += 1
            if task.deaths > ALLOWED_FAILURES:
                self._fail(task, FailureKind.KILLED_WORKER,
                           TaskError("KilledWorker", f"{key} was on {task.deaths} dying workers"))
            else:
                task.worker = self._least_busy(task.request)
        return loss

    def kill_child(self, key: str, child_rss: int) -> MemoryKill:
        """tidegate's worker plugin kills the child process of the sim ``key``."""
        task = self.tasks[key]
        kill = MemoryKill(task.worker, key, 4242, child_rss, self.memory_limit,
                          self.memory_limit, self.now)
        self._kills.append(kill)
        return kill

    def lose_all_workers(self) -> None:
        """Every worker goes and none comes back (their nannies gave up); the tasks wait
        on the scheduler for a worker, as Dask's no-worker state does."""
        self.workers_.clear()

    def add_workers(self, n: int) -> None:
        """``n`` new workers join; waiting tasks go to them."""
        for _ in range(n):
            self._new_worker()
        for task in self.tasks.values():
            if task.state == "pending" and task.worker not in self.workers_:
                task.worker = self._least_busy(task.request)

    def disconnect(self) -> None:
        """The scheduler connection breaks: Dask cancels every future."""
        self.connected = False
        for task in self.tasks.values():
            if task.state == "pending":
                task.state = "cancelled"
                if task.watched:
                    self._ready.append(task.key)

    def running_on(self, address: str) -> list[str]:
        return [t.param_id for t in self.tasks.values()
                if t.worker == address and t.state == "pending"]

    # --- ClusterPort ------------------------------------------------------------------

    async def add_code_paths(self, paths: Sequence[str], key: str = "") -> None:
        return None

    async def restart_worker(self, address: str) -> None:
        """A planned restart (Cluster.restart_worker): the worker comes back under a new
        address, its loss classified planned."""
        self.restarted.append(address)
        if address in self.workers_:
            self.kill_worker(address, Cause.PLANNED)

    async def wait_for_workers(self, timeout_s: float) -> list[WorkerInfo]:
        return await self.workers()

    async def workers(self) -> list[WorkerInfo]:
        return [w.info() for w in self.workers_.values()]

    async def worker_count(self) -> int:
        return len(self.workers_)

    async def close(self) -> None:
        self.closed, self.connected = True, False

    async def watch_workers(self, clock: Callable[[], float]) -> FakeCluster:
        return self

    def losses(self) -> list[WorkerLoss]:
        out, self._losses = self._losses, []
        return out

    def memory_kills(self) -> list[MemoryKill]:
        out, self._kills = self._kills, []
        return out

    async def host_layout(self) -> dict[str, dict[str, Any]]:
        return {}

    async def place_waiting(self) -> int:
        return 0

    def submit_params(
        self,
        job_key: str,
        params: Sequence[tuple[str, Mapping[str, Any], Sequence[int], int]],
        model: str,
        targets: Sequence[tuple[str, str]],
        want_outputs: bool,
        requests: Sequence[int] | None = None,
        priorities: Sequence[int] | None = None,
        sim_timeout_s: float | None = None,
        fuse: Sequence[int] | None = None,  # the fake runs one task per sim regardless
        groups: Sequence[int] | None = None,  # and of each param alone
    ) -> list[TaskKeys]:
        out = []
        for i, (pid, values, seeds, attempt) in enumerate(params):
            request = requests[i] if requests is not None and self.resources else 0
            priority = priorities[i] if priorities is not None else 0
            suffix = f"-r{attempt}" if attempt else ""
            sims = []
            for rep, seed in enumerate(seeds):
                key = f"sim-{job_key}-{pid}-{rep}{suffix}"
                run = functools.partial(_sim, model, dict(values), pid, rep, seed,
                                        sim_timeout_s)
                self._add(FakeTask(key, pid, run, (), self._least_busy(request), False,
                                   request, priority))
                sims.append(key)
            specs = list(targets) or ([] if want_outputs else [(None, None)])
            finals = []
            for name, fn in specs:
                key = f"agg-{job_key}-{pid}-{name or 'summary'}{suffix}"
                run = functools.partial(run_target_list, fn, name, pid)
                self._add(FakeTask(key, pid, run, tuple(sims), self._least_busy(), False))
                finals.append(key)
            watch = finals or sims
            for key in watch:
                self.tasks[key].watched = True
            gather = finals + (sims if want_outputs else [])
            out.append(TaskKeys(tuple(sims), tuple(finals), tuple(watch), tuple(gather)))
        self.max_tasks = max(self.max_tasks, len(self.tasks))
        return out

    async def completed(self, timeout: float) -> list[str]:
        await asyncio.sleep(0)
        self.now += self.tick
        if self.connected:
            self._linger()
            self._run_some()
        out, self._ready = self._ready, []
        return out

    async def gather(self, keys: Sequence[str]) -> list[Result]:
        out: list[Result] = []
        for key in keys:
            task = self.tasks[key]
            if task.state == "finished":
                out.append(task.result)
            elif task.state == "cancelled":
                out.append(TaskFailure(FailureKind.CANCELLED,
                                       TaskError("Cancelled", f"task {key} was cancelled")))
            else:
                out.append(task.result)
        return out

    def release(self, keys: Sequence[str]) -> None:
        for key in keys:
            self.tasks.pop(key, None)

    async def cancel(self, keys: Sequence[str]) -> None:
        for key in keys:
            task = self.tasks.pop(key, None)
            if task is None:
                continue
            self.cancelled.append(key)
            if task.watched:  # as_completed yields a cancelled future too
                self._ready.append(key)
            if self.linger_ticks and key in self.started and task.worker in self.workers_:
                self.lingering[key] = (task, self.linger_ticks)

    async def executing(self, job_key: str) -> int | None:
        return len(self.lingering)

    async def cancel_all(self) -> None:
        await self.cancel(list(self.tasks))
        self._ready.clear()  # Cluster.cancel_all clears its as_completed

    # --- the simulation ---------------------------------------------------------------

    def _new_worker(self, name: str | None = None) -> None:
        n = next(self._names)
        address = f"tcp://fake-{n}"
        self.workers_[address] = FakeWorker(
            address, self.threads, self.memory_limit,
            capacity=self.memory_limit if self.resources else 0,
            name=name if name is not None else str(n))

    def _least_busy(self, request: int = 0) -> str:
        eligible = [a for a, w in self.workers_.items() if request <= w.capacity or not request]
        if not eligible:
            return ""  # no worker: the task waits for one (add_workers)
        load = dict.fromkeys(eligible, 0)
        for t in self.tasks.values():
            if t.state == "pending" and t.worker in load:
                load[t.worker] += 1
        return min(load, key=lambda a: (load[a], a))

    def _add(self, task: FakeTask) -> None:
        self.tasks[task.key] = task
        self.submitted.append(task.key)

    def _fail(self, task: FakeTask, kind: FailureKind, error: TaskError) -> None:
        task.state, task.result = "erred", TaskFailure(kind, error)
        if task.watched:
            self._ready.append(task.key)
        for other in list(self.tasks.values()):
            if task.key in other.deps and other.state == "pending":
                self._fail(other, kind, error)

    def _linger(self) -> None:
        for key, (task, left) in list(self.lingering.items()):
            if left > 1:
                self.lingering[key] = (task, left - 1)
                continue
            del self.lingering[key]
            cause = self.on_linger_end(task) if self.on_linger_end is not None else None
            if cause is not None and task.worker in self.workers_:
                # The cancelled task is no longer the worker's: a record names no task
                # it held.
                self.kill_worker(task.worker, cause, rss=self.memory_limit,
                                 executing=() if self.start_record else None,
                                 recorded=self.start_record)

    def _runnable(self, task: FakeTask) -> bool:
        if task.state != "pending" or (self.hold is not None and self.hold(task)):
            return False
        return all(self.tasks[d].state == "finished" for d in task.deps if d in self.tasks)

    def _run_some(self) -> None:
        """Each worker runs up to its threads' worth of runnable tasks."""
        for address in list(self.workers_):
            if address not in self.workers_:  # an earlier task's hook removed it
                continue
            budget = self.threads
            free = self.workers_[address].capacity
            ran: list[str] = []
            queue = sorted(self.tasks.values(), key=lambda t: -t.priority)  # stable
            for task in queue:
                if budget == 0 or address not in self.workers_:
                    break
                if task.worker != address or not self._runnable(task):
                    continue
                if task.request and task.request > free:
                    break  # head of line: the worker's constrained queue waits
                budget -= 1
                free -= task.request
                self.started.add(task.key)
                ran.append(task.key)
                cause = self.on_run(task) if self.on_run is not None else None
                if cause is not None:
                    executing = (task.key,) if self.resources else None
                    if executing and self.start_reports_lost:
                        executing = ()  # killed before its start report left the worker
                    if self.start_record:
                        executing = (task.key,)
                    self.kill_worker(address, cause, rss=self.memory_limit,
                                     executing=executing, recorded=self.start_record)
                    break
                deps = [self.tasks[d].result for d in task.deps]
                task.result, task.state = task.run(deps), "finished"
                if task.watched:
                    self._ready.append(task.key)
            sims = tuple(k for k in ran if k.startswith("sim-"))
            if len(sims) > 1:
                self.together.append((address, sims))
