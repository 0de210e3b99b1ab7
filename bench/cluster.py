"""One LocalCluster per scenario shape, shared by every strategy, with what the harness
measures on it: a scheduler plugin (peak task count, worker removals) and, where asked,
a worker plugin that logs every sim task execution (to count recomputations)."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path
from typing import Any

import dask
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin, WorkerPlugin

from bench.scenarios import Shape
from tidegate.cluster import keep_restarting_nannies
from tidegate.worker import CodePaths, ExitCodes, IgnoreSigint, MemoryWatch

# Set before the LocalCluster starts: each nanny copies the config it is created with and
# hands it to its worker processes, restarts included.
RESTART_TIMEOUT_S = 15

NO_SPILL = {"distributed.worker.memory.spill": False, "distributed.worker.memory.target": False}


def tls_everywhere() -> dict[str, Any]:
    """Dask settings that make every cluster and client of this process use mutual TLS
    with one generated credential, as tidegate's embedded cluster does (``--tls``)."""
    from distributed.security import Security

    sec = Security.temporary()
    out: dict[str, Any] = {"distributed.comm.require-encryption": True,
                           "distributed.comm.tls.ca-file": sec.tls_ca_file}
    for role in ("scheduler", "worker", "client"):
        out[f"distributed.comm.tls.{role}.cert"] = getattr(sec, f"tls_{role}_cert")
        out[f"distributed.comm.tls.{role}.key"] = getattr(sec, f"tls_{role}_key")
    return out


class SchedulerStats(SchedulerPlugin):
    """Most tasks the scheduler held at once, and worker removals, since ``reset``."""

    name = "bench-stats"

    def __init__(self) -> None:
        self.scheduler: Any = None
        self.peak_tasks = 0
        self.removed = 0

    async def start(self, scheduler: Any) -> None:
        self.scheduler = scheduler

    def transition(self, key: Any, start: str, finish: str, *args: Any, **kwargs: Any) -> None:
        n = len(self.scheduler.tasks)
        if n > self.peak_tasks:
            self.peak_tasks = n

    def remove_worker(self, scheduler: Any, worker: str, **kwargs: Any) -> None:
        self.removed += 1

    def reset(self) -> None:
        self.peak_tasks = len(self.scheduler.tasks) if self.scheduler else 0
        self.removed = 0


class ExecutionLog(WorkerPlugin):
    """Appends the key of every sim task a worker starts executing to one shared file.

    One unbuffered O_APPEND write per task: the line is in the file before the task
    runs, so a worker SIGKILLed mid-task has still logged it."""

    name = "bench-executions"

    def __init__(self, path: str):
        self.path = path
        self.fd: int | None = None

    def setup(self, worker: Any) -> None:
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def teardown(self, worker: Any) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def transition(self, key: Any, start: str, finish: str, **kwargs: Any) -> None:
        if finish == "executing" and isinstance(key, str) and key.startswith("sim-"):
            os.write(self.fd, (key + "\n").encode())


class BenchCluster:
    """A LocalCluster (scheduler in this process, on its own event-loop thread; workers
    in processes with nannies), a synchronous client for the plain-Dask strategies, and
    a second one for the sampler."""

    def __init__(self, shape: Shape, workdir: Path, *, log_executions: bool = False):
        self.shape = shape
        self._config = dask.config.set(NO_SPILL) if shape.no_spill else contextlib.nullcontext()
        self._config.__enter__()
        # As tidegate's embedded cluster does: a minute of memory kills otherwise closed
        # both nannies, and the restart before the next arm found no worker.
        keep_restarting_nannies()
        kwargs: dict[str, Any] = {
            "n_workers": shape.workers,
            "threads_per_worker": shape.threads,
            "processes": True,
            # The scheduler serves HTTP (/health, /metrics) even without a dashboard:
            # any free port, so a busy :8787 on a shared machine costs no warning.
            "dashboard_address": ":0",
        }
        if shape.memory_limit is not None:
            kwargs["memory_limit"] = shape.memory_limit
        self.local = LocalCluster(**kwargs)
        self.client = Client(self.local)
        # Not the default client: distributed.wait and as_completed use the default
        # client's event loop, and futures of one client waited on another's loop
        # complete seconds late (1-4 s per wait, seen here).
        self.monitor = Client(self.local.scheduler_address, set_as_default=False)
        self.client.register_plugin(SchedulerStats(), name=SchedulerStats.name)
        self.stats: SchedulerStats = self.local.scheduler.plugins[SchedulerStats.name]
        self.executions: Path | None = None
        if log_executions:
            self.executions = workdir / "executions.log"
            self.executions.touch()
            self.client.register_plugin(ExecutionLog(str(self.executions)),
                                        name=ExecutionLog.name)

    @property
    def address(self) -> str:
        return self.local.scheduler_address

    @property
    def scheduler_tasks(self) -> int:
        return len(self.local.scheduler.tasks)

    def restart(self) -> None:
        """Fresh worker processes, every worker back (also after a kill or a timeout)."""
        # A restart takes 1-3 s here; Dask's default wait is 120 s.
        self.client.restart(timeout=RESTART_TIMEOUT_S, wait_for_workers=True)
        self.client.wait_for_workers(self.shape.workers, timeout=RESTART_TIMEOUT_S)

    def reset(self) -> None:
        self.stats.reset()

    def drop_tidegate_plugins(self) -> None:
        """Unregister the worker and nanny plugins a tidegate arm registered (each run
        registers its own). The scheduler keeps a plugin for every worker that joins
        later, restarts included: without this a raw arm after a tidegate arm ran with
        tidegate's memory watch (which kills a child process over the limit: child-process's
        dask-window-4 failed 38 of 40 params one run and none the next, after a new
        cluster) and paid its readings each sim."""
        scheduler = self.local.scheduler
        for name, nanny in ((CodePaths.name, False), (IgnoreSigint.name, False),
                            (MemoryWatch.name, False), (ExitCodes.name, True)):
            if name in (scheduler.nanny_plugins if nanny else scheduler.worker_plugins):
                self.client.unregister_worker_plugin(name, nanny=nanny)

    def worker_pids(self) -> dict[str, int]:
        return dict(self.client.run(os.getpid))

    def kill(self, pid: int) -> None:
        os.kill(pid, signal.SIGKILL)

    def executions_of(self, prefix: str) -> tuple[int, int]:
        """(executions, distinct keys) of the sim tasks whose key starts with ``prefix``."""
        if self.executions is None:
            return 0, 0
        keys = [k for k in self.executions.read_text().split() if k.startswith(prefix)]
        return len(keys), len(set(keys))

    def close(self) -> None:
        for closer in (self.monitor.close, self.client.close, self.local.close):
            with contextlib.suppress(Exception):
                closer()
        self._config.__exit__(None, None, None)
