"""The daemon: a durable job queue run one job at a time on a Dask cluster, the HTTP
API and /metrics around it, and a lifecycle fit for systemd and Kubernetes.

Lifecycle: the config is loaded and checked before anything starts; the job queue
reopens (a job left ``running`` by a dead daemon becomes ``interrupted`` and runs
first); the HTTP server binds; the cluster connects (or starts); READY=1. SIGTERM
drains: stop admitting, let the params in flight finish for up to ``drain_timeout_s``,
commit, mark the job ``interrupted``, exit 0; a second SIGTERM or SIGINT exits at once.
If the scheduler goes away the running job pauses (``interrupted``, not failed), the
daemon reconnects with backoff and resumes it from its ledger.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from tidegate.api import Forbidden, make_server
from tidegate.cluster import (
    Cluster,
    ClusterError,
    ClusterOptions,
    SchedulerLost,
    WorkersLost,
    open_cluster,
)
from tidegate.codepaths import (
    CodeDigest,
    CodePathError,
    hash_code,
    remove_snapshots,
    snapshot_code,
    snapshot_dirs,
)
from tidegate.config import DaemonConfig, TokenFile
from tidegate.errors import TidegateError
from tidegate.exitcodes import ServeExit
from tidegate.jobqueue import JobQueue, JobRecord, OutputInUse
from tidegate.knobs import controller_config
from tidegate.metrics import Metrics
from tidegate.migrations import SchemaError
from tidegate.report import Progress, RunSummary
from tidegate.runner import Runner, RunOptions
from tidegate.sdnotify import Notifier
from tidegate.spec import (
    CallableRefused,
    FieldError,
    Job,
    SpecError,
    check_callables,
    check_path_fields,
    job_from_dict,
)
from tidegate.states import STARTABLE, JobState
from tidegate.views import SHOWN_ERRORS, JobView
from tidegate.writer import NESTED_SEARCH_LIMIT, OutputWriteError, foreign_entries, ledgers_around

log = logging.getLogger(__name__)

QUEUE_DB = "jobs.sqlite"
_RECONNECT_MAX_S = 30.0
_WORKERS_POLL_S = 1.0  # how often the worker count behind /readyz is read


class StartupError(TidegateError):
    """The daemon cannot start (exit code ServeExit.STARTUP)."""


CODE_DIR = "code"  # state_dir/code/<hash>/<index>/: each job's snapshot of its code paths
# The queue's spec of a job names its snapshot under this key (taken out before the spec
# is validated again when the job runs).
SNAPSHOT_KEY = "code_snapshot"


@dataclass(frozen=True, slots=True)
class Prepared:
    job: Job  # its code_paths are the snapshot's
    spec: dict[str, Any]  # as stored in the queue: code paths made absolute, the snapshot
    code: CodeDigest | None = None


class Service:
    """One daemon process: queue, cluster, runner, HTTP server."""

    def __init__(
        self,
        config: DaemonConfig,
        *,
        metrics: Metrics | None = None,
        notifier: Notifier | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.config = config
        self.metrics = metrics or Metrics(process=True)
        self.notifier = notifier or Notifier()
        self.clock = clock
        self._token_file = TokenFile(config.security)
        self._token_file.current()  # an unreadable token file fails here, at start-up
        self.spec_limits = config.limits.spec_limits()
        self.queue: JobQueue | None = None
        self.cluster: Cluster | None = None
        self.runner: Runner | None = None
        self.current: JobRecord | None = None
        self.port: int | None = None
        self._jobs_changed = asyncio.Event()
        self._shutdown = asyncio.Event()
        self._draining = False
        self._server: Any = None
        self._tasks: list[asyncio.Task[Any]] = []
        # The cluster's workers as last read (_watch_workers): /readyz is false without.
        self.has_workers = False
        self._no_workers_since: float | None = None
        self._write_backoff_s = 0.0  # after a failed output write (disk full)
        # Snapshots made for submissions whose jobs are not queued yet: never cleaned up.
        self._snapshot_lock = threading.Lock()
        self._unqueued: list[str] = []  # one entry per submission (the same code twice)

    @property
    def token(self) -> str | None:
        """The API token, re-read when its file changes (rotation without a restart)."""
        return self._token_file.current()

    # --- start and stop ------------------------------------------------------------

    async def start(self) -> None:
        """Everything that can fail at start-up, in order; StartupError on failure."""
        cfg = self.config
        if not cfg.is_loopback() and not self.token:
            raise StartupError(
                f"listen: {cfg.listen} is not a loopback address; set security.token_file "
                "before exposing the API (submitting a job runs its code)"
            )
        if not cfg.security.allowed_modules:
            # Allowed, for a private loopback daemon, but never silently: it voids the
            # allowlist line of the threat model (docs/operations.md).
            log.warning("security.allowed_modules is empty: any importable module can be "
                        "run by whoever can submit a job (model: \"subprocess:Popen\" or "
                        "\"os:system\" runs commands as this user); list your model "
                        "packages there", extra={"action": "allowlist_empty"})
        try:
            cfg.state_dir.mkdir(parents=True, exist_ok=True)
            cfg.output_root.mkdir(parents=True, exist_ok=True)
            self.queue = JobQueue(cfg.state_dir / QUEUE_DB)
        except (OSError, SchemaError) as exc:
            raise StartupError(f"state_dir: cannot use {cfg.state_dir}: {exc}") from None
        for job_id in self.queue.recover():
            log.info("job %s was running when the daemon stopped; it resumes first", job_id,
                     extra={"action": "job_recovered"})
        with contextlib.suppress(OSError):
            self._remove_snapshots(temporary=True)
        self._update_job_gauges()
        try:
            self._server, self.port = make_server(self, cfg.host, cfg.port)
        except OSError as exc:
            raise StartupError(f"listen: cannot listen on {cfg.listen}: {exc}") from None
        await self._connect(first=True)
        await self._count_workers()
        self._tasks = [
            asyncio.create_task(self._job_loop(), name="tidegate-job-loop"),
            asyncio.create_task(self._heartbeat(), name="tidegate-heartbeat"),
            asyncio.create_task(self._watch_workers(), name="tidegate-workers"),
        ]
        for task in self._tasks:
            task.add_done_callback(self._task_done)
        self.notifier.ready(status="serving; no job running")
        log.info("serving on http://%s:%d", cfg.host, self.port, extra={"action": "serving"})

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        # A background task that dies takes the daemon down with it: better a
        # restart by systemd than a daemon that looks alive and does nothing.
        if not task.cancelled() and task.exception() is not None:
            log.error("%s failed: %r", task.get_name(), task.exception(),
                      extra={"action": "task_failed"})
            self._shutdown.set()

    async def serve_forever(self) -> None:
        await self._shutdown.wait()

    def request_drain(self) -> None:
        """First SIGTERM: finish what is in flight (up to drain_timeout_s), then exit."""
        if self._draining:
            return
        self._draining = True
        self.notifier.stopping(status="draining")
        log.warning("draining: no new params; up to %.0f s for those in flight",
                    self.config.drain_timeout_s, extra={"action": "drain_started"})
        if self.runner is not None:
            self.runner.drain(self.config.drain_timeout_s)
        else:
            self._shutdown.set()
        self._jobs_changed.set()

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._server is not None:
            self._server.stop()
        if self.cluster is not None:
            await self.cluster.close()
        if self.queue is not None:
            self.queue.close()

    # --- the cluster -----------------------------------------------------------------

    def _cluster_options(self) -> ClusterOptions:
        c = self.config.cluster
        return ClusterOptions(
            address=c.address or None,
            workers=c.local.workers,
            threads_per_worker=c.local.threads_per_worker,
            memory_limit=c.local.memory_limit,
            tls_ca_file=str(c.tls.ca_file) if c.tls.ca_file else None,
            tls_cert=str(c.tls.cert) if c.tls.cert else None,
            tls_key=str(c.tls.key) if c.tls.key else None,
        )

    async def _connect(self, *, first: bool = False) -> None:
        """Connect (or start the embedded cluster), retrying with backoff; at start-up a
        failure is fatal only for the embedded cluster."""
        delay = 0.5
        while not self._shutdown.is_set():
            try:
                self.cluster = await open_cluster(self._cluster_options())
                self.metrics.scheduler_connected.set(1)
                if not first:
                    log.info("reconnected to the scheduler", extra={"action": "reconnected"})
                return
            except ClusterError as exc:
                self.metrics.scheduler_connected.set(0)
                if first and not self.config.cluster.address:
                    raise StartupError(str(exc)) from None
                log.warning("%s; retrying in %.1f s", exc, delay,
                            extra={"action": "reconnect_wait"})
                first = False
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._shutdown.wait(), delay)
                delay = min(delay * 2, _RECONNECT_MAX_S)

    @property
    def scheduler_ok(self) -> bool:
        return self.cluster is not None and self.cluster.connected

    async def _count_workers(self) -> int | None:
        """The cluster's workers now (None: no cluster, or it could not be read); keeps
        ``has_workers`` and the time since the cluster last had any."""
        cluster = self.cluster
        n: int | None = None
        if cluster is not None and cluster.connected:
            with contextlib.suppress(Exception):
                n = await cluster.worker_count()
        self.has_workers = bool(n)
        if n:
            self._no_workers_since = None
        elif n == 0 and self._no_workers_since is None:
            self._no_workers_since = self.clock()
            log.warning("the cluster has no workers", extra={"action": "no_workers"})
        return n

    def _workers_gone_too_long(self) -> bool:
        since = self._no_workers_since
        return since is not None and (
            self.clock() - since >= self.config.cluster.no_workers_timeout_s)

    async def _watch_workers(self) -> None:
        """Reads the worker count for /readyz; wakes the job loop when an idle embedded
        cluster has been without workers for cluster.no_workers_timeout_s (the job loop
        restarts it: the one place the cluster is replaced)."""
        while True:
            await self._count_workers()
            if self.runner is None and self._workers_gone_too_long():
                self._jobs_changed.set()
            await asyncio.sleep(_WORKERS_POLL_S)

    async def _restart_cluster(self, reason: str) -> None:
        """Replace the embedded LocalCluster by a new one (tidegate owns it)."""
        log.warning("restarting the embedded cluster: %s", reason,
                    extra={"action": "cluster_restarted"})
        self._no_workers_since = None
        await self._reconnect()
        await self._count_workers()

    async def _await_workers(self) -> bool:
        """Before a job starts: workers on the cluster. An embedded cluster without any
        for cluster.no_workers_timeout_s is restarted; on a remote one the job waits
        (``queued`` or ``interrupted``) until workers join. False: shutting down."""
        waiting = False
        while not self._draining and not self._shutdown.is_set():
            if self.cluster is None or not self.cluster.connected:
                await self._reconnect()
                continue
            n = await self._count_workers()
            if n:
                if waiting:
                    log.info("workers joined the cluster", extra={"action": "workers_back"})
                return True
            if self.cluster.embedded and self._workers_gone_too_long():
                await self._restart_cluster("no workers for "
                                            f"{self.config.cluster.no_workers_timeout_s:g} s")
                continue
            if not waiting:
                waiting = True
                log.warning("waiting for workers to join the scheduler at %s",
                            self.cluster.address, extra={"action": "workers_wait"})
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._shutdown.wait(), _WORKERS_POLL_S)
        return False

    # --- jobs ------------------------------------------------------------------------

    def prepare(self, data: Any, snapshot: str | None = None) -> Prepared:
        """Validate a submitted spec under the daemon's rules. SpecError (400) or
        Forbidden (403); nothing is imported before the modules are allowed.

        The job's code paths are snapshotted (copied into state_dir/code, hashed) and
        the model and targets are checked from the snapshot, which every run of the job
        then imports from. A job from the queue passes the ``snapshot`` its spec names
        (SNAPSHOT_KEY), used as it is."""
        if not isinstance(data, dict):
            raise SpecError([FieldError("<top level>", "a mapping of spec fields",
                                        type(data).__name__)], source="request")
        # Before anything resolves them: a NUL byte or an over-long name would raise
        # from inside Path.resolve() (a 500) rather than name the field.
        check_path_fields(data, source="request")
        spec = dict(data)
        self._check_modules(spec)
        spec["code_paths"] = self._code_paths(spec.get("code_paths", []))
        root = self.config.output_root.resolve()
        if isinstance(spec.get("output"), str):
            spec["output"] = str(root / spec["output"])
        # Other relative paths (a parameters file) are relative to the first code root.
        roots = self.config.security.code_roots
        base = roots[0].resolve() if roots else root
        self._check_param_file(spec.get("parameters"))
        job = job_from_dict(spec, base_dir=base, source="request", output_root=root,
                            limits=self.spec_limits)
        out = job.output_dir.resolve()
        if out == root or not out.is_relative_to(root):
            raise SpecError([FieldError("output", f"a directory strictly inside output_root "
                                        f"({root})", repr(data.get("output")))], source="request")
        try:  # the spec's batch section over this daemon's knobs must make a valid config
            controller_config(job, self._run_options())
        except ValueError as exc:
            raise SpecError([FieldError("batch", "knobs that, over this daemon's controller "
                                        "knobs, make a valid controller config", str(exc))],
                            source="request") from None
        code = self._snapshot(job, snapshot)
        spec[SNAPSHOT_KEY] = code.hash
        job = replace(job, code_paths=snapshot_dirs(self.code_dir, code.hash,
                                                   len(job.code_paths)))
        try:
            check_callables(job)
        except CallableRefused as exc:
            raise Forbidden("; ".join(f"{e.field}: {e.got}" for e in exc.errors)) from None
        return Prepared(job, spec, code)

    @property
    def code_dir(self) -> Path:
        return self.config.state_dir.resolve() / CODE_DIR

    def _snapshot(self, job: Job, snapshot: str | None) -> CodeDigest:
        """A new snapshot of the job's code paths, or the digest of the one the queue
        names (checked again: a snapshot changed or removed by hand is refused)."""
        cfg = self.config
        most, largest = cfg.limits.code_max_files, cfg.limits.code_max_bytes
        try:
            if snapshot is None:
                return snapshot_code(job.code_paths, self.code_dir,
                                     exclude=[cfg.state_dir, cfg.output_root],
                                     max_files=most, max_bytes=largest,
                                     lock=self._snapshot_lock, placed=self._unqueued.append)
            digest = hash_code(snapshot_dirs(self.code_dir, snapshot, len(job.code_paths)),
                               max_files=most, max_bytes=largest)
        except CodePathError as exc:
            raise SpecError([FieldError(exc.field, exc.expected, exc.got)],
                            source="request") from None
        if digest.hash != snapshot:
            raise SpecError([FieldError(SNAPSHOT_KEY, f"the snapshot {snapshot} of the job's "
                                        f"code_paths in {self.code_dir}",
                                        f"files hashing to {digest.hash}")], source="request")
        return digest

    def _remove_snapshots(self, *, temporary: bool = False) -> None:
        """Remove the code snapshots no queued, running or interrupted job names."""
        assert self.queue is not None
        with self._snapshot_lock:
            keep = {str(r.spec.get(SNAPSHOT_KEY)) for state in STARTABLE | {JobState.RUNNING}
                    for r in self.queue.list(state, limit=1_000_000)}
            removed = remove_snapshots(self.code_dir, keep | set(self._unqueued),
                                       temporary=temporary)
        if removed:
            log.info("removed %d code snapshots no unfinished job needs", len(removed),
                     extra={"action": "code_snapshots_removed"})

    def _check_param_file(self, parameters: Any) -> None:
        """parameters.file must lie in security.code_roots, checked before it is read."""
        name = parameters.get("file") if isinstance(parameters, dict) else None
        if not isinstance(name, str):
            return  # absent, or the spec's validation reports the type
        roots = [r.resolve() for r in self.config.security.code_roots]
        if not roots:
            raise Forbidden("parameters.file: this daemon has no security.code_roots; "
                            "give the parameters inline (grid or values)")
        path = (roots[0] / name).resolve()
        if not any(path.is_relative_to(r) for r in roots):
            raise Forbidden(f"parameters.file: {path} is outside security.code_roots "
                            f"({', '.join(map(str, roots))})")

    def _check_modules(self, spec: dict[str, Any]) -> None:
        allowed = self.config.security.allowed_modules
        if not allowed:
            return
        refs = [("model", spec.get("model"))] + [
            (f"targets[{i}].function", t.get("function") if isinstance(t, dict) else None)
            for i, t in enumerate(spec.get("targets") or [])
        ]
        for field, ref in refs:
            if not isinstance(ref, str):
                continue  # the spec's own validation names it
            module = ref.partition(":")[0]
            if not any(module == p or module.startswith(p + ".") for p in allowed):
                raise Forbidden(
                    f"{field}: module {module!r} is not in security.allowed_modules "
                    f"({', '.join(allowed)})"
                )

    def _code_paths(self, paths: Any) -> list[str]:
        roots = [r.resolve() for r in self.config.security.code_roots]
        if not isinstance(paths, list):
            return paths  # the spec's validation reports the type
        out = []
        for i, p in enumerate(paths):
            if not isinstance(p, str):
                out.append(p)
                continue
            if not roots:
                raise Forbidden(f"code_paths[{i}]: this daemon has no security.code_roots; "
                                "jobs may use only modules installed beside tidegate")
            path = Path(p) if Path(p).is_absolute() else roots[0] / p
            path = path.resolve()
            if not any(path.is_relative_to(r) for r in roots):
                raise Forbidden(f"code_paths[{i}]: {path} is outside security.code_roots "
                                f"({', '.join(map(str, roots))})")
            out.append(str(path))
        return out

    def submit(self, data: Any, priority: int = 0, retry_failed: bool = False,
               prune: bool = False) -> JobRecord:
        return self.enqueue(self.prepare(data), priority, retry_failed, prune)

    def enqueue(self, prepared: Prepared, priority: int = 0,
                retry_failed: bool = False, prune: bool = False) -> JobRecord:
        """Queue a prepared job (the API prepares it off the event loop); with
        ``retry_failed`` its run first un-commits the params its output records as
        failed, to run them again; with ``prune`` its run ends by dropping from the
        output the committed params the spec no longer has."""
        assert self.queue is not None
        output, root = prepared.job.output_dir, self.config.output_root.resolve()
        try:
            if retry_failed and prepared.job.spec.parameters.search is not None:
                raise SpecError([FieldError(
                    "retry_failed", "a sweep's failed params (a search tells its failed "
                    "trials as failed; raise parameters.search.trials to search on)",
                    "a search")])
            record = self.queue.submit(prepared.job.job_id, prepared.spec, str(output),
                                       priority, guard=lambda: _check_output_dir(output, root),
                                       retry_failed=retry_failed, prune=prune)
        finally:  # queued, its snapshot is the queue's to keep; refused, anyone's to remove
            with self._snapshot_lock, contextlib.suppress(ValueError):
                self._unqueued.remove(str(prepared.spec.get(SNAPSHOT_KEY)))
        log.info("job %s queued (%d params)", record.id, prepared.job.n_params,
                 extra={"action": "job_queued"})
        self._update_job_gauges()
        self._jobs_changed.set()
        return record

    def cancel(self, job_id: str) -> JobRecord:
        assert self.queue is not None
        record = self.queue.request_cancel(job_id)
        if self.current is not None and self.current.id == job_id and self.runner is not None:
            self.runner.stop()
        self._update_job_gauges()
        return record

    def view(self, record: JobRecord) -> JobView:
        """A job as the API shows it: its record, with live numbers if it is running."""
        return JobView.of(record, self.live(record.id))

    def live(self, job_id: str) -> Progress | None:
        """The running job's progress, if ``job_id`` is the one running."""
        if self.runner is None or self.current is None or self.current.id != job_id:
            return None
        p = self.runner.snapshot()
        return replace(p, errors=p.errors[:SHOWN_ERRORS])

    async def _job_loop(self) -> None:
        assert self.queue is not None
        while not self._draining and not self._shutdown.is_set():
            record = self.queue.next_runnable()
            if record is None:
                self._jobs_changed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._jobs_changed.wait(), 5.0)
                await self._idle_check()
                continue
            await self._run(record)
        self._shutdown.set()

    async def _idle_check(self) -> None:
        """Between jobs: restart an embedded cluster that has lost all its workers."""
        cluster = self.cluster
        if cluster is not None and cluster.embedded and self._workers_gone_too_long():
            await self._restart_cluster(
                f"no workers for {self.config.cluster.no_workers_timeout_s:g} s")

    async def _run(self, record: JobRecord) -> None:
        assert self.queue is not None
        if not await self._await_workers():
            return  # shutting down: the job waits for the next start
        # The record's id and output are the job's, whatever a later release would derive
        # from its spec (derived ids have changed between releases).
        spec = {**record.spec, "job_id": record.id, "output": record.output}
        snapshot = spec.pop(SNAPSHOT_KEY, None)
        try:  # importing the model and reading a params file take time: off the event loop
            prepared = await asyncio.get_running_loop().run_in_executor(
                None, self.prepare, spec, snapshot)
        except (SpecError, Forbidden) as exc:  # the config changed since it was queued
            self.queue.finish(record.id, JobState.FAILED, error=str(exc))
            self._update_job_gauges()
            with contextlib.suppress(OSError):
                self._remove_snapshots()
            return
        cluster = self.cluster
        if cluster is None:  # _connect gave up: shutting down; the job waits for a restart
            return
        self.current = self.queue.start(record.id)
        self._update_job_gauges()
        log.info("job %s started", record.id, extra={"action": "job_started"})
        state: JobState = JobState.FAILED
        summary: dict[str, Any] | None = None
        error: str | None = None
        workers_lost = write_failed = False
        try:  # inside: a job that cannot even start must fail, not stop the daemon
            # retry_failed stays with the job: an interrupted retry resumes as one (each
            # param still once; those that failed again are retried again).
            # So does prune: an interrupted run prunes nothing, its resumed run does.
            options = replace(self._run_options(), retry_failed=record.retry_failed,
                              prune=record.prune)
            # A code change since the committed params (a resubmission after an edit)
            # is accepted, and logged: each part records the code hash it ran with.
            options = replace(options, accept_code_change=True)
            self.runner = runner = Runner(
                prepared.job, cluster, options, metrics=self.metrics,
                clock=self.clock, no_workers_timeout_s=self.config.cluster.no_workers_timeout_s,
                code=prepared.code)
            result = await runner.run()
            summary = result.as_dict()
            state = self._final_state(record.id, result)
            # A failed output write (disk full), or why the job stopped early (on_error,
            # a contract error): named in the job.
            error = result.error or result.reason
            write_failed = result.error is not None
        except SchedulerLost as exc:
            state, error = JobState.INTERRUPTED, str(exc)
            workers_lost = isinstance(exc, WorkersLost)
            log.warning("job %s paused: %s", record.id, exc, extra={"action": "job_paused"})
        except OutputWriteError as exc:  # at start: the output's directory, lock or ledger
            error = str(exc)
            if exc.no_space:  # the disk may free up: retried after the back-off, as mid-run
                state, write_failed = JobState.INTERRUPTED, True
                log.warning("job %s could not start: %s", record.id, exc,
                            extra={"action": "output_write_failed"})
            else:
                log.error("job %s failed: %s", record.id, exc, extra={"action": "job_failed"})
        except TidegateError as exc:  # checked and explained (a spec field, a ledger)
            error = str(exc)
            log.error("job %s failed: %s", record.id, exc, extra={"action": "job_failed"})
        except Exception as exc:  # a job's failure must not take the daemon down
            error = f"{type(exc).__name__}: {exc}"
            log.exception("job %s failed", record.id, extra={"action": "job_failed"})
        finally:
            self.runner, self.current = None, None
            self.queue.finish(record.id, state, summary=summary, error=error)
            self._update_job_gauges()
            log.info("job %s %s", record.id, state, extra={"action": "job_finished"})
            with contextlib.suppress(OSError):
                self._remove_snapshots()
        if not write_failed:
            self._write_backoff_s = 0.0
        if state == JobState.INTERRUPTED and not self._draining:
            if write_failed:
                # Disk full (or the like): the cluster is fine; retrying at once would
                # loop hot while the disk stays full. Wait, doubling up to a minute.
                self._write_backoff_s = min(60.0, max(1.0, 2 * self._write_backoff_s))
                log.warning("job %s could not write its output; retrying in %.0f s", record.id,
                            self._write_backoff_s, extra={"action": "write_backoff"})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._shutdown.wait(), self._write_backoff_s)
            elif workers_lost and cluster.embedded:
                await self._restart_cluster(error or "no workers")
            elif not workers_lost:
                await self._reconnect()
            # A remote cluster without workers: the job waits as interrupted in
            # _await_workers until they return.

    def _final_state(self, job_id: str, result: RunSummary) -> JobState:
        assert self.queue is not None
        if result.state != JobState.INTERRUPTED:
            return result.state
        cancelled = self.queue.get(job_id).cancel_requested
        return JobState.CANCELLED if cancelled else JobState.INTERRUPTED

    async def _reconnect(self) -> None:
        if self.cluster is not None:
            await self.cluster.close()
            self.cluster = None
        self.metrics.scheduler_connected.set(0)
        await self._connect()

    def _run_options(self) -> RunOptions:
        c = self.config
        return RunOptions(defaults=c.controller.overrides(), flush_params=c.flush.params,
                          flush_seconds=c.flush.seconds)

    # --- health, metrics, systemd ---------------------------------------------------------

    def ready(self) -> dict[str, bool]:
        store = self.queue is not None and self.queue.writable()
        scheduler = self.scheduler_ok
        return {"scheduler": scheduler, "workers": scheduler and self.has_workers,
                "store": store}

    def _update_job_gauges(self) -> None:
        if self.queue is None:
            return
        for state, n in self.queue.counts().items():
            self.metrics.jobs.labels(state).set(n)

    async def _heartbeat(self) -> None:
        """STATUS= and WATCHDOG=1 for systemd; the connectivity gauge for everyone."""
        interval = self.notifier.watchdog_interval()
        period = min(interval, 5.0) if interval else 5.0
        while True:
            self.metrics.scheduler_connected.set(1 if self.scheduler_ok else 0)
            if self.runner is not None and self.current is not None:
                p = self.runner.snapshot()
                status = (f"job {self.current.id}: {p.done}/{p.total} params, "
                          f"B={p.batch_size}, {p.inflight_params} in flight")
            else:
                status = "serving; no job running"
            if not self.scheduler_ok:
                status += "; scheduler unreachable"
            elif not self.has_workers:
                status += "; no workers"
            self.notifier.status(status)
            if interval:
                self.notifier.watchdog()
            await asyncio.sleep(period)


def _check_output_dir(output: Path, root: Path) -> None:
    """OutputInUse if ``output`` lies inside or contains a directory holding a tidegate
    ledger, or already holds files tidegate did not write."""
    around = ledgers_around(output, root)
    for other in around.found:
        how = "is inside" if output.is_relative_to(other) else "contains"
        raise OutputInUse(str(output), f"another tidegate output ({other})", how)
    if around.gave_up:
        raise OutputInUse(str(output), f"more than {NESTED_SEARCH_LIMIT} entries (the search "
                          "for other tidegate outputs below it stopped there)", "holds")
    foreign = foreign_entries(output)
    if foreign:
        raise OutputInUse(str(output), f"files tidegate did not write ({', '.join(foreign[:3])})",
                          "already holds")


def run_service(config: DaemonConfig) -> int:
    """Run the daemon until SIGTERM/SIGINT; the process exit code."""
    return asyncio.run(_main(config))


async def _main(config: DaemonConfig) -> int:
    from tidegate.logs import quiet_dask_logs

    quiet_dask_logs()
    service = Service(config)
    loop = asyncio.get_running_loop()
    signals = (signal.SIGTERM, signal.SIGINT)

    def on_signal(signum: int) -> None:
        if service._draining:
            log.warning("%s again: exiting now; committed parts are safe",
                        signal.Signals(signum).name, extra={"action": "forced_exit"})
            os._exit(ServeExit.FORCED)
        service.request_drain()

    for s in signals:
        loop.add_signal_handler(s, on_signal, s)
    try:
        try:
            await service.start()
        except StartupError as exc:
            print(f"tidegate: error: {exc}", flush=True, file=sys.stderr)
            return ServeExit.STARTUP
        await service.serve_forever()
        return ServeExit.OK
    finally:
        for s in signals:
            loop.remove_signal_handler(s)
        await service.close()
