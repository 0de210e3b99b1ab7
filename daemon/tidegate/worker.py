"""What runs on the workers and their nannies: the task functions' wrappers and the
plugins tidegate registers (code paths, SIGINT, exit codes).

Everything a task pickles by reference must be importable on the scheduler too (it
deserializes submitted graphs itself since 2025), which this module is, beside tidegate.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
from collections.abc import Sequence
from typing import Any

import dask.config
import psutil
from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin

from tidegate.memwatch import KillReport, TreeWatch, active_watch, set_active_watch
from tidegate.simreturn import EXECUTING_TOPIC as EXECUTING_TOPIC  # run_sim logs it
from tidegate.simreturn import (
    SimReturn,
    TargetResult,
    one_task,
    record_task_start,
    run_sim,
    run_target,
    task_ended,
    use_code,
)
from tidegate.starts import (
    StartRecord,
    active_record,
    record_path,
    set_active_record,
    take_started,
)

EXIT_TOPIC = "tidegate-worker-exit"
MEMORY_RESOURCE = "tidegate-memory"
MEMORY_KILL_TOPIC = "tidegate-memory-kill"
TREE_RSS_METRIC = "tidegate_tree_rss"
IDLE_RSS_METRIC = "tidegate_idle_rss"


class CodePaths(WorkerPlugin):
    """Makes a job's code paths the code of every worker, present and future, under the
    job's key (simreturn.use_code: the modules of the job before are evicted). Registered
    under one name, so each job's replaces the one before on the scheduler too."""

    name = "tidegate-code-paths"

    def __init__(self, paths: Sequence[str], key: str = ""):
        self.paths = list(paths)
        self.key = key

    def setup(self, worker: Any) -> None:
        use_code(self.paths, self.key)


def switch_code(paths: Sequence[str], key: str, dask_worker: Any = None) -> list[str]:
    """Run with ``client.run``: switch this worker to a job's code now; the extension
    modules of the code before that stay loaded (the worker must restart to drop them)."""
    return use_code(paths, key)


class IgnoreSigint(WorkerPlugin):
    """Embedded workers share tidegate's terminal: Ctrl-C there signals the whole process
    group, and a worker would die with a KeyboardInterrupt traceback while tidegate is
    still flushing. tidegate stops its workers itself."""

    name = "tidegate-ignore-sigint"

    def setup(self, worker: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


class ExitCodes(NannyPlugin):
    """Reports each worker process's exit code as a ``tidegate-worker-exit`` event, with
    the keys its threads started last (its start record, tidegate.starts).

    The nanny learns the code and drops it (``Nanny._on_worker_exit`` ignores it; the
    scheduler never sees it, dask/distributed#2297). This wraps that private hook, looked up on the
    instance at call time; if a future Dask renames it, setup does nothing and tidegate
    falls back to classifying losses from the scheduler's events alone.
    """

    name = "tidegate-exit-codes"

    def setup(self, nanny: Any) -> None:
        original = getattr(nanny, "_on_worker_exit", None)
        if original is None:
            return
        # Said on every registration (each run registers the plugin, a hooked nanny
        # included): the run loop then waits for the exit that carries a memory-killed
        # worker's start record, knowing one will come.
        with contextlib.suppress(Exception):
            nanny.log_event(EXIT_TOPIC, {"worker": nanny.worker_address, "hooked": True})
        if getattr(original, "_tidegate", False):
            return

        async def on_worker_exit(exitcode: int) -> Any:
            address = nanny.worker_address
            # The tasks its threads started last (tidegate.starts): what it was running
            # when it died, where its own reports of the starts may never have left.
            started = _started_of(address)
            # A closing nanny's scheduler comm may already be gone; its workers' ends
            # are planned anyway.
            if getattr(nanny.status, "name", "") == "running":
                with contextlib.suppress(Exception):
                    nanny.log_event(EXIT_TOPIC, {"worker": address, "exitcode": exitcode,
                                                 "started": started})
            return await original(exitcode)

        on_worker_exit._tidegate = True  # type: ignore[attr-defined]
        nanny._on_worker_exit = on_worker_exit


def _started_of(address: str | None) -> list[str] | None:
    """What the start record of the worker at ``address`` names; None without one. Never
    raises: the nanny's own handling of the exit (its restart of the worker) follows."""
    if not address:
        return None
    try:
        return take_started(record_path(str(address)))  # at most MAX_SLOTS keys
    except Exception:
        return None


def run_target_list(
    function: str | None, target: str | None, param_id: str, returns: list[Any],
    code: tuple[Sequence[str], str] | None = None,
) -> Any:
    """A target on a param's replicates: ``returns`` holds SimReturns, or the lists of
    SimReturns of fused sim tasks (run_fused), in replicate order."""
    record_task_start()
    try:
        if code is not None:
            use_code(*code)
        flat = [s for r in returns for s in (r if isinstance(r, list) else [r])]
        return run_target(function, target, param_id, *flat)
    finally:
        task_ended()


def run_fused(
    model: str, params: Any, param_id: str, replicates: Sequence[int], seeds: Sequence[int],
    timeout_s: float | None = None, code: tuple[Sequence[str], str] | None = None,
    targets: Sequence[tuple[str | None, str | None]] | None = None,
    want_outputs: bool = True,
) -> list[SimReturn | TargetResult]:
    """Several replicates of one param in one Dask task, one after the other, each with
    its own seed and its own SimReturn (so its own output rows, error and measurements).

    ``targets`` None: the SimReturns are the result (some of a param's replicates; agg
    tasks take them). Otherwise the task runs all of the param's replicates and then its
    targets ((name, "module:function"), or (None, None) for the summary): the result is
    the TargetResults, followed by the SimReturns when the outputs are wanted, the order
    of the unfused tasks' results.
    """
    # The targets inside too: the task's start record names it until they are done.
    with one_task():
        sims = [run_sim(model, params, param_id, rep, seed, timeout_s, code)
                for rep, seed in zip(replicates, seeds, strict=True)]
        if targets is None:
            return list(sims)
        out: list[SimReturn | TargetResult] = [
            run_target(fn, name, param_id, *sims) for name, fn in targets]
    if want_outputs:
        out.extend(sims)
    return out


def run_params(
    model: str, params: Sequence[tuple[str, Any, Sequence[int]]],
    timeout_s: float | None = None, code: tuple[Sequence[str], str] | None = None,
    targets: Sequence[tuple[str | None, str | None]] = (),
    want_outputs: bool = True,
) -> list[list[SimReturn | TargetResult]]:
    """Several whole params in one Dask task: for each (param_id, values, seeds), in
    order, what run_fused returns for all its replicates and targets. A user error stays
    in its own sim's SimReturn, so one param's failure is not its neighbours'."""
    with one_task():
        return [run_fused(model, values, param_id, range(len(seeds)), seeds, timeout_s,
                          code, targets, want_outputs)
                for param_id, values, seeds in params]


def executing_keys(prefixes: Sequence[str], dask_worker: Any = None) -> list[str]:
    """Keys starting with one of ``prefixes`` that this worker is executing, cancelled ones
    included: a cancelled task runs on until its function returns (a thread cannot be
    interrupted), and Dask's worker state keeps it in ``executing`` until then. Run with
    ``client.run``, which passes the worker as ``dask_worker``."""
    state = getattr(dask_worker, "state", None)
    running = getattr(state, "executing", set()) | getattr(state, "long_running", set())
    return [str(ts.key) for ts in running if str(ts.key).startswith(tuple(prefixes))]


class MemoryWatch(WorkerPlugin):
    """Watches the worker's whole process tree (tidegate.memwatch.TreeWatch) and offers
    the worker's memory limit as the ``tidegate-memory`` resource.

    The resource is how tidegate admits sims per worker: each sim asks for its expected
    working memory, and the scheduler places it only where that much of the resource is
    free. Dask's own memory accounting reads the worker process alone, so a child
    process's memory would otherwise go unseen until the kernel's OOM killer picks a
    victim; the watch kills the largest child subtree first and logs it as a
    ``tidegate-memory-kill`` event. A restarted worker runs setup again, so the resource
    and the watch come back with it.
    """

    name = "tidegate-memory-watch"

    def __init__(self) -> None:
        self.watch: TreeWatch | None = None
        self.starts: StartRecord | None = None

    async def setup(self, worker: Any) -> None:
        # The record outlives the plugin (teardown leaves it): registered again, as
        # each run does, the plugin keeps the slots of the tasks running now.
        path = record_path(worker.address)
        record = active_record()
        if record is None or not record.active or record.path != path:
            if record is not None:
                record.close()
            record = StartRecord(path)
            set_active_record(record)
        self.starts = record
        limit = int(getattr(worker.memory_manager, "memory_limit", 0) or 0)
        fraction = dask.config.get("distributed.worker.memory.terminate", None)
        fraction = float(fraction) if fraction not in (None, False) else 0.95
        address = worker.address

        def on_kill(report: KillReport) -> None:
            # From the sampler thread: log_event is thread-safe.
            worker.log_event(MEMORY_KILL_TOPIC, {
                "worker": address, "key": report.key, "child_pid": report.child_pid,
                "child_rss": report.child_rss, "tree_rss": report.tree_rss,
                "limit": report.limit,
            })

        previous = active_watch()
        if previous is not None:  # the plugin registered again in the same process
            previous.stop()
        self.watch = TreeWatch(os.getpid(), limit, fraction, on_kill=on_kill)
        self.watch.start()
        set_active_watch(self.watch)
        watch = self.watch
        worker.metrics[TREE_RSS_METRIC] = lambda _worker: watch.tree_rss
        worker.metrics[IDLE_RSS_METRIC] = lambda _worker: watch.idle_rss
        # Given at spawn already (the embedded cluster) it is left alone: setting it again
        # resets the scheduler's count of what the worker's running tasks hold.
        if limit > 0 and worker.state.total_resources.get(MEMORY_RESOURCE) != float(limit):
            await worker.set_resources(**{MEMORY_RESOURCE: float(limit)})

    async def teardown(self, worker: Any) -> None:
        # The plugin removed from a running worker (each run registers it again): the
        # start record stays open, as tasks running now may still be what this process
        # dies of, and its nanny deletes the file when the process exits. Nothing writes
        # to it without a watch (simreturn._start_record). A worker closing deletes it
        # itself: one without a nanny would leave it behind.
        if self.starts is not None and getattr(getattr(worker, "status", None), "name", "") in (
                "closing", "closing_gracefully", "closed"):
            if active_record() is self.starts:
                set_active_record(None)
            self.starts.close()
        self.starts = None
        if self.watch is not None:
            self.watch.stop()
            if active_watch() is self.watch:
                set_active_watch(None)
            self.watch = None


def memory_watch_plugin() -> MemoryWatch:
    return MemoryWatch()


# --- host layout -------------------------------------------------------------------

CGROUP_ROOT = "/sys/fs/cgroup"
# cgroup v1 reports "no limit" as a page-rounded LONG_MAX; anything this large is none.
UNLIMITED_BYTES = 2**60


def parse_cgroup(text: str) -> tuple[str, int] | None:
    """The memory cgroup in a /proc/<pid>/cgroup text: (path, version 1 or 2).

    A v1 ``memory`` controller line wins over the v2 ``0::`` line: on a hybrid host
    the v1 hierarchy is the one that holds the memory controller."""
    unified = None
    for line in text.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if not path:
            continue
        if "memory" in controllers.split(","):
            return path, 1
        if hid == "0" and controllers == "":
            unified = path
    return (unified, 2) if unified is not None else None


def parse_cgroup_limit(text: str | None) -> int | None:
    """A memory.max / memory.limit_in_bytes value in bytes; None when unlimited
    ("max", or >= 2**60) or unreadable."""
    if text is None:
        return None
    value = text.strip()
    if value == "max":
        return None
    try:
        limit = int(value)
    except ValueError:
        return None
    return limit if 0 < limit < UNLIMITED_BYTES else None


def cgroup_limit_file(path: str, version: int, root: str = CGROUP_ROOT) -> str:
    rel = path.lstrip("/")
    if version == 1:
        return os.path.join(root, "memory", rel, "memory.limit_in_bytes")
    return os.path.join(root, rel, "memory.max")


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def host_layout(dask_worker: Any = None) -> dict[str, Any]:
    """Where this worker runs, for ``client.run``: the host (hostname and boot id tell
    workers on one machine apart from lookalikes), its memory, the memory cgroup and its
    limit (workers sharing one cgroup share its limit), and the worker's own limit."""
    boot_id = (_read("/proc/sys/kernel/random/boot_id") or "").strip()
    found = parse_cgroup(_read("/proc/self/cgroup") or "")
    cgroup, limit = "", None
    if found is not None:
        cgroup, version = found
        limit = parse_cgroup_limit(_read(cgroup_limit_file(cgroup, version)))
    memory_manager = getattr(dask_worker, "memory_manager", None)
    memory_limit = getattr(memory_manager, "memory_limit", None)
    return {
        "hostname": socket.gethostname(),
        "boot_id": boot_id,
        "host_memory": int(psutil.virtual_memory().total),
        "cgroup": cgroup,
        "cgroup_limit": limit,
        "memory_limit": int(memory_limit) if memory_limit else None,
        "pid": os.getpid(),
    }


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
