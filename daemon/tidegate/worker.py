"""What runs on the workers and their nannies: the task functions' wrappers and the
plugins tidegate registers (code paths, SIGINT, exit codes).

Everything a task pickles by reference must be importable on the scheduler too (it
deserializes submitted graphs itself since 2025), which this module is, beside tidegate.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Sequence
from typing import Any

from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin

from tidegate.simreturn import add_code_paths, run_target

EXIT_TOPIC = "tidegate-worker-exit"
MEMORY_RESOURCE = "tidegate-memory"
MEMORY_KILL_TOPIC = "tidegate-memory-kill"
EXECUTING_TOPIC = "tidegate-executing"
TREE_RSS_METRIC = "tidegate_tree_rss"
IDLE_RSS_METRIC = "tidegate_idle_rss"


class CodePaths(WorkerPlugin):
    """Puts a job's code paths on sys.path of every worker, present and future."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def setup(self, worker: Any) -> None:
        add_code_paths(self.paths)


class IgnoreSigint(WorkerPlugin):
    """Embedded workers share tidegate's terminal: Ctrl-C there signals the whole process
    group, and a worker would die with a KeyboardInterrupt traceback while tidegate is
    still flushing. tidegate stops its workers itself."""

    def setup(self, worker: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class ExitCodes(NannyPlugin):
    """Reports each worker process's exit code as a ``tidegate-worker-exit`` event.

    The nanny learns the code and drops it (``Nanny._on_worker_exit`` ignores it; the
    scheduler never sees it, dask/distributed#2297). This wraps that private hook, looked up on the
    instance at call time; if a future Dask renames it, setup does nothing and tidegate
    falls back to classifying losses from the scheduler's events alone.
    """

    name = "tidegate-exit-codes"

    def setup(self, nanny: Any) -> None:
        original = getattr(nanny, "_on_worker_exit", None)
        if original is None or getattr(original, "_tidegate", False):
            return

        async def on_worker_exit(exitcode: int) -> Any:
            # A closing nanny's scheduler comm may already be gone; its workers' ends
            # are planned anyway.
            if getattr(nanny.status, "name", "") == "running":
                with contextlib.suppress(Exception):
                    nanny.log_event(
                        EXIT_TOPIC, {"worker": nanny.worker_address, "exitcode": exitcode}
                    )
            return await original(exitcode)

        on_worker_exit._tidegate = True  # type: ignore[attr-defined]
        nanny._on_worker_exit = on_worker_exit


def run_target_list(
    function: str | None, target: str | None, param_id: str, returns: list[Any]
) -> Any:
    return run_target(function, target, param_id, *returns)


def executing_keys(prefixes: Sequence[str], dask_worker: Any = None) -> list[str]:
    """Keys starting with one of ``prefixes`` that this worker is executing, cancelled ones
    included: a cancelled task runs on until its function returns (a thread cannot be
    interrupted), and Dask's worker state keeps it in ``executing`` until then. Run with
    ``client.run``, which passes the worker as ``dask_worker``."""
    state = getattr(dask_worker, "state", None)
    running = getattr(state, "executing", set()) | getattr(state, "long_running", set())
    return [str(ts.key) for ts in running if str(ts.key).startswith(tuple(prefixes))]


class MemoryWatch(WorkerPlugin):  # placeholder until the worker-side watch lands
    name = "tidegate-memory-watch"

    async def setup(self, worker: Any) -> None:
        limit = int(getattr(worker.memory_manager, "memory_limit", 0) or 0)
        # Given at spawn already (the embedded cluster): setting it again would reset
        # the scheduler's count of what the worker's running tasks hold.
        if limit and worker.state.total_resources.get(MEMORY_RESOURCE) != float(limit):
            await worker.set_resources(**{MEMORY_RESOURCE: float(limit)})


def memory_watch_plugin() -> MemoryWatch:
    return MemoryWatch()


def host_layout(dask_worker: Any = None) -> dict[str, Any]:
    return {}


def place_waiting(dask_scheduler: Any = None) -> int:
    """Run on the scheduler (``client.run_on_scheduler``): place the tasks waiting in
    no-worker on the running workers that can now run them. The scheduler does so when a
    worker joins or resumes, but not when a joined worker's resources are set afterwards
    (tidegate's plugin on a remote cluster), so after every worker died at once the
    tasks restricted to tidegate-memory would wait until some other event. Returns how
    many tasks it recommended; 0 where this Dask lacks the hook."""
    s = dask_scheduler
    bulk = getattr(s, "bulk_schedule_unrunnable_after_adding_worker", None)
    if bulk is None or not getattr(s, "unrunnable", None):
        return 0
    placed = 0
    for ws in list(getattr(s, "running", ())):
        recs = bulk(ws)
        if recs:
            placed += len(recs)
            s.transitions(recs, stimulus_id="tidegate-place-waiting")
    return placed
