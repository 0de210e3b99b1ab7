"""The only module that talks to Dask: start an embedded LocalCluster or connect to a
scheduler, submit a param's sim and agg tasks, wait for completions, gather, and read
the workers' threads and memory.

The client is asynchronous, so the run loop, the HTTP API and the metrics server share
one event loop. Follows the measurements in DASK_NOTES.md: results are gathered in
batches, futures are released by dropping references (never a mass ``client.cancel``),
and a failed future's exception is read, never raised (dask#8790).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from distributed import Client, Future, LocalCluster, as_completed
from distributed.diagnostics.plugin import NannyPlugin, WorkerPlugin

from tidegate.errors import TidegateError
from tidegate.losses import LossTracker, WorkerLoss
from tidegate.simreturn import TaskError, add_code_paths, run_sim, run_target

log = logging.getLogger(__name__)


class ClusterError(TidegateError):
    """The Dask cluster could not be started or reached."""


class SchedulerLost(ClusterError):
    """The connection to the scheduler broke mid-job; the work in flight is gone."""


@dataclass(frozen=True, slots=True)
class ClusterOptions:
    address: str | None = None  # None: start an embedded LocalCluster
    workers: int | None = None  # LocalCluster defaults when None
    threads_per_worker: int | None = None
    memory_limit: str | int | None = None  # per worker; "auto" by default
    connect_timeout_s: float = 10.0


@dataclass(frozen=True, slots=True)
class WorkerInfo:
    address: str
    nthreads: int
    memory_limit: int  # 0 when the worker has none
    rss: int
    managed: int
    spilled: int
    status: str


@dataclass(frozen=True, slots=True)
class ParamTasks:
    """The futures of one param in flight.

    ``watch`` are the futures whose completion means the param is done; ``gather``
    those whose results tidegate needs (a subset of ``sims + finals``).
    """

    sims: list[Future]
    finals: list[Future]
    watch: list[Future]
    gather: list[Future]

    @property
    def n_tasks(self) -> int:
        return len(self.sims) + len(self.finals)


class _CodePaths(WorkerPlugin):
    """Puts a job's code paths on sys.path of every worker, present and future."""

    def __init__(self, paths: Sequence[str]):
        self.paths = list(paths)

    def setup(self, worker: Any) -> None:
        add_code_paths(self.paths)


class _IgnoreSigint(WorkerPlugin):
    """Embedded workers share tidegate's terminal: Ctrl-C there signals the whole process
    group, and a worker would die with a KeyboardInterrupt traceback while tidegate is
    still flushing. tidegate stops its workers itself."""

    def setup(self, worker: Any) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.SIG_IGN)


@contextlib.contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while worker processes are spawned: they inherit SIG_IGN across
    exec, and Python then installs no KeyboardInterrupt handler in them."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


EXIT_TOPIC = "tidegate-worker-exit"


class _ExitCodes(NannyPlugin):
    """Reports each worker process's exit code as a ``tidegate-worker-exit`` event.

    The nanny learns the code and drops it (``Nanny._on_worker_exit`` ignores it; the
    scheduler never sees it, dask#2297). This wraps that private hook, looked up on the
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


def _key_part(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._" else "_" for c in text)


class Cluster:
    """A connected asynchronous Dask client, and the LocalCluster it owns if any."""

    def __init__(self, client: Client, local: LocalCluster | None):
        self.client = client
        self.local = local
        self._registered: set[str] = set()
        self._topics: list[str] = []

    @property
    def address(self) -> str:
        return str(self.client.scheduler.address)

    @property
    def connected(self) -> bool:
        return self.client.status == "running"

    @property
    def embedded(self) -> bool:
        return self.local is not None

    async def close(self) -> None:
        # Unsubscribe first: the scheduler would otherwise try to send this client its
        # own remove-client event on the closed comm and log a CRITICAL traceback.
        for topic in self._topics:
            with contextlib.suppress(Exception):
                self.client.unsubscribe_topic(topic)
        self._topics.clear()
        with contextlib.suppress(Exception):
            await self.client.close()
        if self.local is not None:
            with contextlib.suppress(Exception):
                await self.local.close()

    # --- reading the cluster ----------------------------------------------------------

    async def workers(self) -> list[WorkerInfo]:
        # With an asynchronous client the cached scheduler_info() holds no workers.
        ident = await self.client.scheduler.identity(n_workers=-1)
        out = []
        for addr, w in ident.get("workers", {}).items():
            metrics = w.get("metrics", {})
            out.append(
                WorkerInfo(
                    address=addr,
                    nthreads=int(w.get("nthreads", 0)),
                    memory_limit=int(w.get("memory_limit") or 0),
                    rss=int(metrics.get("memory", 0)),
                    managed=int(metrics.get("managed_bytes", 0)),
                    spilled=int(metrics.get("spilled_bytes", {}).get("memory", 0))
                    if isinstance(metrics.get("spilled_bytes"), dict)
                    else int(metrics.get("spilled_bytes", 0) or 0),
                    status=str(w.get("status", "")),
                )
            )
        return out

    async def wait_for_workers(self, timeout_s: float) -> list[WorkerInfo]:
        """The workers, once at least one is up; ClusterError after ``timeout_s``."""
        try:
            await self.client.wait_for_workers(1, timeout=timeout_s)
        except TimeoutError:
            raise ClusterError(
                f"no worker joined the scheduler at {self.address} within {timeout_s:g} s"
            ) from None
        return await self.workers()

    # --- worker losses --------------------------------------------------------------

    async def watch_workers(self, clock: Callable[[], float]) -> WorkerWatch:
        """Start collecting worker removals, memory kills and exit codes."""
        watch = WorkerWatch(clock)
        for topic, handler in (
            ("all", watch.on_all),
            ("worker-restart-memory", watch.on_memory_kill),
            (EXIT_TOPIC, watch.on_exit),
        ):
            self.client.subscribe_topic(topic, handler)
            self._topics.append(topic)
        if "exit-codes" not in self._registered:
            try:
                await self.client.register_plugin(_ExitCodes(), name=_ExitCodes.name)
                self._registered.add("exit-codes")
            except Exception as exc:  # workers without nannies, or a Dask without the hook
                log.info(
                    "worker exit codes unavailable (%s); losses are classified from "
                    "scheduler events", exc, extra={"action": "exit_codes_unavailable"},
                )
        return watch

    # --- code ---------------------------------------------------------------------

    async def add_code_paths(self, paths: Sequence[str]) -> None:
        """Make ``paths`` importable on every worker (and in this process)."""
        paths = [str(p) for p in paths]
        add_code_paths(paths)
        if not paths:
            return
        name = "tidegate-code-paths-" + hashlib.sha256("\0".join(paths).encode()).hexdigest()[:12]
        if name not in self._registered:
            await self.client.register_plugin(_CodePaths(paths), name=name)
            self._registered.add(name)

    # --- tasks --------------------------------------------------------------------

    def submit_params(
        self,
        job_key: str,
        params: Sequence[tuple[str, Mapping[str, Any], Sequence[int], int]],
        model: str,
        targets: Sequence[tuple[str, str]],
        want_outputs: bool,
    ) -> list[ParamTasks]:
        """Submit the sim and agg tasks of ``params`` [(param_id, values, seeds, attempt)].

        Keys are ``sim-<job>-<param_id>-<rep>`` and ``agg-<job>-<param_id>-<target>``
        (hyphen after the prefix so the dashboard groups them), with ``-r<attempt>``
        appended on a retry. One ``map`` call per kind of task keeps the
        client-to-scheduler traffic batched.
        """
        job = _key_part(job_key)
        sim_args: list[tuple[str, int, int, Mapping[str, Any], str]] = [
            (pid, rep, seed, values, f"-r{attempt}" if attempt else "")
            for pid, values, seeds, attempt in params
            for rep, seed in enumerate(seeds)
        ]
        sim_futs = self.client.map(
            run_sim,
            [model] * len(sim_args),
            [a[3] for a in sim_args],
            [a[0] for a in sim_args],
            [a[1] for a in sim_args],
            [a[2] for a in sim_args],
            key=[f"sim-{job}-{a[0]}-{a[1]}{a[4]}" for a in sim_args],
            pure=False,
        )
        by_param: list[list[Future]] = []
        i = 0
        for _, _, seeds, _ in params:
            by_param.append(sim_futs[i : i + len(seeds)])
            i += len(seeds)
        del sim_futs

        # Without targets and without model outputs, one "summary" task per param
        # brings back the replicates' sizes and errors while the tables stay put.
        final_specs = list(targets) if targets else ([] if want_outputs else [(None, None)])
        agg_args = [
            (fn, name, pid, sims, f"-r{attempt}" if attempt else "")
            for (pid, _, _, attempt), sims in zip(params, by_param, strict=True)
            for name, fn in final_specs
        ]
        if agg_args:
            agg_futs = self.client.map(
                _run_target_list,
                [a[0] for a in agg_args],
                [a[1] for a in agg_args],
                [a[2] for a in agg_args],
                [a[3] for a in agg_args],
                key=[
                    f"agg-{job}-{a[2]}-{_key_part(a[1] or 'summary')}{a[4]}" for a in agg_args
                ],
                pure=False,
            )
        else:
            agg_futs = []
        out: list[ParamTasks] = []
        per = len(final_specs)
        for n, sims in enumerate(by_param):
            finals = agg_futs[n * per : (n + 1) * per]
            watch = finals or sims
            gather = finals + (sims if want_outputs else [])
            out.append(ParamTasks(sims, finals, watch, gather))
        return out

    async def cancel(self, futures: Sequence[Future]) -> None:
        """Cancel a few futures. Scheduler-side cancellation is O(n^2) in the number of
        keys (20k futures: 12 s); the run loop releases completed params by dropping
        references instead and cancels only quarantined or abandoned work."""
        if futures and self.connected:
            with contextlib.suppress(Exception):
                await self.client.cancel(list(futures))

    def completions(self) -> Completions:
        return Completions(self.client)

    async def gather(self, futures: Sequence[Future]) -> list[Any | TaskError]:
        """Results of finished futures, in order; a TaskError in place of each failure."""
        ok = [f for f in futures if f.status == "finished"]
        results: dict[str, Any] = {}
        if ok:
            try:
                values = await self.client.gather(ok)
                results = {f.key: v for f, v in zip(ok, values, strict=True)}
            except Exception:
                # A worker holding a result died between completion and gather and
                # the recomputation failed: fall back to one future at a time.
                results = {}
                for f in ok:
                    with contextlib.suppress(Exception):
                        results[f.key] = await self.client.gather(f)
        out: list[Any | TaskError] = []
        for f in futures:
            if f.key in results:
                out.append(results[f.key])
            else:
                out.append(await failure_of(f))
        return out


def _run_target_list(
    function: str | None, target: str | None, param_id: str, returns: list[Any]
) -> Any:
    return run_target(function, target, param_id, *returns)


async def failure_of(future: Future) -> TaskError:
    """What went wrong with a future, without raising its exception (dask#8790)."""
    if future.status == "cancelled":
        return TaskError("Cancelled", f"task {future.key} was cancelled")
    try:
        exc = await future.exception()
    except Exception as err:
        return TaskError(type(err).__name__, f"task {future.key}: {err}")
    if exc is None:
        return TaskError("Lost", f"task {future.key} finished but its result was lost")
    error = TaskError(type(exc).__name__, str(exc))
    # Drop the exception promptly: its traceback pins frames (dask#8790).
    del exc
    return error


class WorkerWatch:
    """Feeds the scheduler's and nannies' events about worker ends to a LossTracker."""

    def __init__(self, clock: Callable[[], float]):
        self.clock = clock
        self.tracker = LossTracker()

    def on_all(self, event: tuple[float, Any]) -> None:
        msg = event[1]
        if isinstance(msg, dict) and msg.get("action") == "remove-worker":
            self.tracker.on_removed(
                str(msg.get("worker")),
                [str(k) for k in msg.get("processing-tasks", ())],
                expected=bool(msg.get("expected")),
                stimulus_id=str(msg.get("stimulus_id", "")),
                now=self.clock(),
            )

    def on_memory_kill(self, event: tuple[float, Any]) -> None:
        msg = event[1]
        if isinstance(msg, dict) and msg.get("worker"):
            self.tracker.on_memory_kill(str(msg["worker"]), msg.get("rss"), self.clock())

    def on_exit(self, event: tuple[float, Any]) -> None:
        msg = event[1]
        if isinstance(msg, dict) and msg.get("worker"):
            self.tracker.on_exit(str(msg["worker"]), msg.get("exitcode"), self.clock())

    def losses(self) -> list[WorkerLoss]:
        return self.tracker.ready(self.clock())


class Completions:
    """Futures in, batches of completed futures out, with a timeout."""

    def __init__(self, client: Client):
        self._ac = as_completed(loop=client.loop)

    def add(self, futures: Sequence[Future]) -> None:
        self._ac.update(futures)

    async def wait(self, timeout: float) -> list[Future]:
        """Every completed future, waiting up to ``timeout`` seconds for the first."""
        if not self._ac.has_ready():
            if self._ac.is_empty():
                return []
            try:
                first = await asyncio.wait_for(self._ac.__anext__(), timeout)
            except (TimeoutError, StopAsyncIteration):
                return []
            return [first, *self._ac.next_batch(block=False)]
        return self._ac.next_batch(block=False)

    def clear(self) -> None:
        self._ac.clear()


async def open_cluster(options: ClusterOptions) -> Cluster:
    """Connect to ``options.address``, or start an embedded LocalCluster."""
    if options.address:
        try:
            client = await Client(
                options.address, asynchronous=True, timeout=options.connect_timeout_s
            )
        except (OSError, TimeoutError) as exc:
            raise ClusterError(
                f"cannot reach the Dask scheduler at {options.address}: {exc}"
            ) from None
        return Cluster(client, None)
    kwargs: dict[str, Any] = {
        "processes": True,
        "asynchronous": True,
        "dashboard_address": None,
    }
    if options.workers is not None:
        kwargs["n_workers"] = options.workers
    if options.threads_per_worker is not None:
        kwargs["threads_per_worker"] = options.threads_per_worker
    if options.memory_limit is not None:
        kwargs["memory_limit"] = options.memory_limit
    try:
        with _sigint_ignored():
            local = await LocalCluster(**kwargs)
        client = await Client(local, asynchronous=True)
        # Workers the nanny restarts later are covered by the plugin.
        await client.register_plugin(_IgnoreSigint(), name="tidegate-ignore-sigint")
    except Exception as exc:
        raise ClusterError(f"cannot start the embedded LocalCluster: {exc}") from None
    return Cluster(client, local)


def parse_memory_limit(text: str, *, field: str) -> int | str:
    """A per-worker memory limit: "auto" or a size such as 2GiB or 500MB."""
    from dask.utils import parse_bytes

    if text == "auto":
        return text
    try:
        value = int(parse_bytes(text))
    except (ValueError, TypeError):
        value = -1
    if value <= 0:
        raise ValueError(f"{field}: expected a size such as 2GiB or 500MB, or auto, got {text!r}")
    return value
