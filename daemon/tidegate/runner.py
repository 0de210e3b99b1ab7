"""One job: admit params up to B, collect completed params, hand them to the writer,
release their futures, and resume from the ledger.

The loop never waits at a barrier: each pass admits params into the free slots of the
window, waits (briefly) for whichever params complete, gathers all of them in one call,
buffers their rows and drops every reference to their futures at once. Parts are
flushed every ``flush_params`` params, ``flush_bytes`` buffered bytes or
``flush_seconds`` seconds, whichever comes first.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from tidegate import __version__
from tidegate.cluster import Cluster, ParamTasks
from tidegate.simreturn import SimReturn, TargetResult, TaskError
from tidegate.spec import Job, Param
from tidegate.store import Ledger
from tidegate.writer import (
    LEDGER,
    PartWriter,
    discard_output,
    remove_unrecorded,
    write_manifest,
)

log = logging.getLogger(__name__)

MAX_ERRORS_KEPT = 20


@dataclass(frozen=True, slots=True)
class RunOptions:
    batch_size: int | None = None  # pins B; None: the spec's batch.size, else automatic
    flush_params: int = 1000
    flush_seconds: float = 10.0
    flush_bytes: int = 128 * 2**20
    restart: bool = False
    poll_seconds: float = 1.0  # cluster snapshot interval

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.flush_params < 1:
            raise ValueError(f"flush_params must be >= 1, got {self.flush_params}")
        if not self.flush_seconds > 0:
            raise ValueError(f"flush_seconds must be > 0, got {self.flush_seconds}")
        if self.flush_bytes < 1:
            raise ValueError(f"flush_bytes must be >= 1, got {self.flush_bytes}")


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of a running job, for progress bars, logs and the API."""

    job_id: str
    total: int
    done: int  # committed or buffered, this run and earlier ones
    ok: int
    failed: int
    resumed: int
    batch_size: int
    inflight_params: int
    inflight_tasks: int
    rate: float  # params per second over this run
    elapsed: float

    @property
    def eta_seconds(self) -> float | None:
        left = self.total - self.done
        if left <= 0:
            return 0.0
        return left / self.rate if self.rate > 0 else None


class ProgressSink(Protocol):
    def update(self, progress: Progress) -> None: ...


@dataclass(slots=True)
class RunSummary:
    job_id: str
    state: str  # succeeded | failed | interrupted
    total: int
    ok: int
    failed: int
    resumed: int
    batch_min: int
    batch_max: int
    batch_final: int
    oom_events: int
    worker_restarts: int
    wall_seconds: float
    output: str
    parts: int
    errors: list[dict[str, str]] = field(default_factory=list)
    peak_inflight_tasks: int = 0

    @property
    def exit_code(self) -> int:
        if self.state == "interrupted":
            return 130
        return 0 if self.state == "succeeded" and self.failed == 0 else 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "state": self.state,
            "params": {
                "total": self.total,
                "ok": self.ok,
                "failed": self.failed,
                "resumed": self.resumed,
            },
            "batch_size": {
                "min": self.batch_min,
                "max": self.batch_max,
                "final": self.batch_final,
            },
            "oom_events": self.oom_events,
            "worker_restarts": self.worker_restarts,
            "wall_seconds": round(self.wall_seconds, 3),
            "output": self.output,
            "parts": self.parts,
            "peak_inflight_tasks": self.peak_inflight_tasks,
            "errors": self.errors,
        }


@dataclass(slots=True)
class _InFlight:
    param: Param
    seeds: list[int]
    tasks: ParamTasks
    remaining: int


class Runner:
    """Runs one job on a connected cluster until it is done or stopped."""

    def __init__(
        self,
        job: Job,
        cluster: Cluster,
        options: RunOptions | None = None,
        *,
        progress: ProgressSink | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.job = job
        self.cluster = cluster
        self.options = options or RunOptions()
        self.progress = progress
        self.clock = clock
        self._stop = asyncio.Event()
        self._inflight: dict[str, _InFlight] = {}
        self._by_key: dict[str, str] = {}  # watched future key -> param_id
        self._ok = self._failed = self._resumed = 0
        self._errors: list[dict[str, str]] = []
        self._batch_size = 1
        self._batch_seen: list[int] = []
        self._inflight_tasks = 0
        self._peak_inflight_tasks = 0
        self._worker_restarts = 0
        self._known_workers: set[str] = set()
        self._started = 0.0
        self._done_this_run = 0

    # --- control -------------------------------------------------------------------

    def stop(self) -> None:
        """Stop admitting, drop the work in flight, flush what completed."""
        self._stop.set()

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def batch_size(self) -> int:
        return self._batch_size

    # --- the run -------------------------------------------------------------------

    async def run(self) -> RunSummary:
        job, opts = self.job, self.options
        out = job.output_dir
        if opts.restart:
            discard_output(out)
        out.mkdir(parents=True, exist_ok=True)
        with Ledger(out / LEDGER) as ledger:
            resumed = ledger.bind(job.job_id, job.fingerprint, job.identity())
            removed = remove_unrecorded(out, ledger.files())
            if removed:
                log.info(
                    "removed %d part files not in the ledger", len(removed),
                    extra={"action": "debris_removed"},
                )
            done = ledger.committed_param_ids()
            counts = ledger.counts()
            self._ok, self._failed = counts.ok, counts.failed
            self._resumed = counts.params
            if resumed:
                log.info(
                    "resuming job %s: %d of %d params already committed",
                    job.job_id, counts.params, len(job.params), extra={"action": "job_resumed"},
                )
            writer = PartWriter(
                out, job.param_names, job.param_types, job.spec.outputs,
                [t.name for t in job.spec.targets],
            )
            self._started = self.clock()
            state = "failed"
            self._manifest(ledger, "running")
            try:
                await self.cluster.add_code_paths([str(p) for p in job.code_paths])
                workers = await self.cluster.wait_for_workers(timeout_s=60)
                self._known_workers = {w.address for w in workers}
                self._batch_size = self._initial_batch_size(sum(w.nthreads for w in workers))
                pending = (p for p in job.params if p.param_id not in done)
                await self._loop(pending, writer, ledger)
                state = "interrupted" if self.stopping else "succeeded"
            finally:
                self._drop_inflight()
                if writer.pending_params:
                    self._flush(writer, ledger)
                self._manifest(ledger, state)
            return self._summary(state, ledger.counts().parts)

    def _initial_batch_size(self, threads: int) -> int:
        b = self.job.spec.batch
        pinned = self.options.batch_size or b.size
        if pinned is not None:
            return pinned
        # Until the adaptive controller sizes B: about two params per thread.
        size = math.ceil(2 * max(threads, 1) / self.job.spec.replicates)
        return max(b.min, min(b.max, size))

    async def _loop(self, pending: Iterator[Param], writer: PartWriter, ledger: Ledger) -> None:
        opts = self.options
        completions = self.cluster.completions()
        last_flush = last_poll = self.clock()
        exhausted = False
        try:
            while not self.stopping:
                # A dropped Future schedules its release on the event loop (Future.release
                # -> loop.add_callback). Yield once so the releases of the params just
                # collected reach the scheduler before the refill does; otherwise the old
                # and the new window coexist there for a moment.
                await asyncio.sleep(0)
                if not exhausted:
                    exhausted = self._admit(pending, completions)
                if exhausted and not self._inflight:
                    break
                self._report()
                now = self.clock()
                timeout = max(0.01, min(opts.flush_seconds - (now - last_flush), opts.poll_seconds))
                # The completed futures go straight to _collect: a local name here would
                # keep the last batch alive (and on the cluster) for a whole iteration.
                await self._collect(await self._wait(completions, timeout), writer)
                now = self.clock()
                if (
                    writer.pending_params >= opts.flush_params
                    or writer.pending_bytes >= opts.flush_bytes
                    or (writer.pending_params and now - last_flush >= opts.flush_seconds)
                ):
                    self._flush(writer, ledger)
                    last_flush = now
                if now - last_poll >= opts.poll_seconds:
                    await self._poll()
                    last_poll = now
        finally:
            completions.clear()
        self._report()

    async def _wait(self, completions: Any, timeout: float) -> list[Any]:
        stop = asyncio.ensure_future(self._stop.wait())
        got = asyncio.ensure_future(completions.wait(timeout))
        try:
            await asyncio.wait({stop, got}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if not got.done():
            got.cancel()
            return []
        return got.result()

    def _admit(self, pending: Iterator[Param], completions: Any) -> bool:
        """Fill the window; True once every param has been admitted."""
        room = self._batch_size - len(self._inflight)
        if room <= 0:
            return False
        batch: list[tuple[Param, list[int]]] = []
        for param in pending:
            batch.append((param, self.job.seeds(param.param_id)))
            if len(batch) >= room:
                break
        if not batch:
            return True
        spec = self.job.spec
        submitted = self.cluster.submit_params(
            self.job.job_id,
            [(p.param_id, p.values, seeds) for p, seeds in batch],
            spec.model,
            [(t.name, t.function) for t in spec.targets],
            spec.outputs != "none",
        )
        for (param, seeds), tasks in zip(batch, submitted, strict=True):
            self._inflight[param.param_id] = _InFlight(param, seeds, tasks, len(tasks.watch))
            for f in tasks.watch:
                self._by_key[f.key] = param.param_id
            self._inflight_tasks += tasks.n_tasks
            completions.add(tasks.watch)
        self._peak_inflight_tasks = max(self._peak_inflight_tasks, self._inflight_tasks)
        return len(batch) < room

    async def _collect(self, finished: list[Any], writer: PartWriter) -> None:
        if not finished:
            return
        ready: list[_InFlight] = []
        for key in [f.key for f in finished]:
            pid = self._by_key.pop(key, None)
            entry = self._inflight.get(pid) if pid is not None else None
            if entry is None:
                continue
            entry.remaining -= 1
            if entry.remaining == 0:
                ready.append(entry)
        finished.clear()
        if not ready:
            return
        futures = [f for e in ready for f in e.tasks.gather]
        results = await self.cluster.gather(futures)
        del futures
        i = 0
        for entry in ready:
            n = len(entry.tasks.gather)
            self._complete(entry, results[i : i + n], writer)
            i += n
            # Dropping the last references releases the tasks on the cluster.
            del self._inflight[entry.param.param_id]
            self._inflight_tasks -= entry.tasks.n_tasks

    def _complete(self, entry: _InFlight, results: list[Any], writer: PartWriter) -> None:
        sims: list[SimReturn] = []
        targets: list[TargetResult] = []
        error: TaskError | None = None
        for r in results:
            if isinstance(r, TaskError):
                error = error or r
            elif isinstance(r, SimReturn):
                sims.append(r)
                error = error or r.error
            else:
                targets.append(r)
                # A replicate's own error is the root cause; the target's
                # "ReplicateFailed" only repeats it.
                for rep in r.replicates:
                    error = error or rep.error
                error = error or r.error
        pid = entry.param.param_id
        writer.add(pid, entry.param.values, entry.seeds, error, sims, targets)
        self._done_this_run += 1
        if error is None:
            self._ok += 1
        else:
            self._failed += 1
            if len(self._errors) < MAX_ERRORS_KEPT:
                self._errors.append({"param_id": pid, "error": str(error)})
            log.warning(
                "param %s failed: %s", pid, error, extra={"action": "param_failed"}
            )

    def _flush(self, writer: PartWriter, ledger: Ledger) -> None:
        part = ledger.next_part()
        t0 = time.perf_counter()
        written = writer.write_part(part)
        ledger.commit(written.part, written.files, written.statuses, written.nbytes)
        self._manifest(ledger, "running")
        log.debug(
            "part %d: %d params, %d bytes, %.3f s", part, len(written.statuses),
            written.nbytes, time.perf_counter() - t0, extra={"action": "part_committed"},
        )

    async def _poll(self) -> None:
        try:
            workers = await self.cluster.workers()
        except Exception as exc:  # a scheduler hiccup must not end the job
            log.warning("cannot read the cluster: %s", exc, extra={"action": "poll_failed"})
            return
        now = {w.address for w in workers}
        lost = self._known_workers - now
        if lost:
            self._worker_restarts += len(lost)
            log.warning(
                "lost %d worker(s): %s", len(lost), ", ".join(sorted(lost)),
                extra={"action": "worker_lost"},
            )
        self._known_workers = now

    def _drop_inflight(self) -> None:
        self._inflight.clear()
        self._by_key.clear()
        self._inflight_tasks = 0

    # --- reporting -----------------------------------------------------------------

    def snapshot(self) -> Progress:
        elapsed = max(self.clock() - self._started, 1e-9) if self._started else 0.0
        return Progress(
            job_id=self.job.job_id,
            total=len(self.job.params),
            done=self._ok + self._failed,
            ok=self._ok,
            failed=self._failed,
            resumed=self._resumed,
            batch_size=self._batch_size,
            inflight_params=len(self._inflight),
            inflight_tasks=self._inflight_tasks,
            rate=self._done_this_run / elapsed if elapsed else 0.0,
            elapsed=elapsed,
        )

    def _report(self) -> None:
        if not self._batch_seen or self._batch_seen[-1] != self._batch_size:
            self._batch_seen.append(self._batch_size)
        if self.progress is not None:
            self.progress.update(self.snapshot())

    def _manifest(self, ledger: Ledger, state: str) -> None:
        counts = ledger.counts()
        spec = self.job.spec
        write_manifest(
            self.job.output_dir,
            {
                "schema_version": 1,
                "tidegate_version": __version__,
                "job_id": self.job.job_id,
                "state": state,
                "fingerprint": self.job.fingerprint,
                "spec": spec.model_dump(mode="json"),
                "source": self.job.source,
                "counts": {
                    "total": len(self.job.params),
                    "ok": counts.ok,
                    "failed": counts.failed,
                    "parts": counts.parts,
                },
                "datasets": {
                    "params": "params",
                    "model_outputs": "model_outputs/<output>",
                    "targets": [f"targets/{t.name}" for t in spec.targets],
                },
                "updated_at": time.time(),
            },
        )

    def _summary(self, state: str, parts: int) -> RunSummary:
        seen = self._batch_seen or [self._batch_size]
        return RunSummary(
            job_id=self.job.job_id,
            state=state,
            total=len(self.job.params),
            ok=self._ok,
            failed=self._failed,
            resumed=self._resumed,
            batch_min=min(seen),
            batch_max=max(seen),
            batch_final=self._batch_size,
            oom_events=0,
            worker_restarts=self._worker_restarts,
            wall_seconds=self.clock() - self._started,
            output=str(Path(self.job.output_dir)),
            parts=parts,
            errors=self._errors,
            peak_inflight_tasks=self._peak_inflight_tasks,
        )
