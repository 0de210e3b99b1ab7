"""One job: admit params up to B, collect completed params, hand them to the writer,
release their futures, feed the controller, and resume from the ledger.

The loop never waits at a barrier: each pass admits params into the free slots of the
window, waits (briefly) for whichever params complete, gathers all of them in one call,
buffers their rows and drops every reference to their futures at once. About once a
second it reads the workers' memory and asks the controller for B; a worker lost to
memory gets an immediate backoff. Parts are flushed every ``flush_params`` params,
``flush_bytes`` buffered bytes or ``flush_seconds`` seconds, whichever comes first.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from tidegate import __version__
from tidegate.cluster import (
    Cluster,
    Completions,
    ParamTasks,
    SchedulerLost,
    WorkerInfo,
    WorkerWatch,
)
from tidegate.controller import Controller, Decision, Observation, WorkerMemory
from tidegate.knobs import controller_config
from tidegate.losses import PoisonJudge, WorkerLoss
from tidegate.metrics import Metrics
from tidegate.report import Progress, ProgressSink, RunSummary
from tidegate.simreturn import ReplicateSummary, SimReturn, TargetResult, TaskError
from tidegate.spec import Job, Param
from tidegate.store import Ledger
from tidegate.writer import LEDGER, PartWriter, discard_output, remove_unrecorded, write_manifest

log = logging.getLogger(__name__)

MAX_ERRORS_KEPT = 20
# Dask's KilledWorker can blame a param that only shared a dying worker (dask#5234):
# such a param is resubmitted this many times before its failure is recorded.
KILLED_WORKER_RETRIES = 2
_MiB = 2**20
# Worker RSS reaches the scheduler on heartbeats (every 0.5-2 s): a snapshot is only
# trusted to show the effect of a cancellation this long after it.
_HEARTBEAT_S = 1.0


@dataclass(frozen=True, slots=True)
class RunOptions:
    batch_size: int | None = None  # pins B; None: the spec's batch.size, else adaptive
    controller: Mapping[str, Any] = field(default_factory=dict)  # ControllerConfig overrides
    flush_params: int = 1000
    flush_seconds: float = 10.0
    flush_bytes: int = 128 * _MiB
    restart: bool = False
    # Cluster memory snapshot and controller decision interval: the scheduler learns
    # workers' RSS from heartbeats every 0.5 s (up to 10 workers), no fresher than this.
    poll_seconds: float = 0.5

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.flush_params < 1:
            raise ValueError(f"flush_params must be >= 1, got {self.flush_params}")
        if not self.flush_seconds > 0:
            raise ValueError(f"flush_seconds must be > 0, got {self.flush_seconds}")
        if self.flush_bytes < 1:
            raise ValueError(f"flush_bytes must be >= 1, got {self.flush_bytes}")
        if not self.poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {self.poll_seconds}")


@dataclass(slots=True)
class _InFlight:
    param: Param
    seeds: list[int]
    tasks: ParamTasks
    remaining: int
    attempt: int


class Runner:
    """Runs one job on a connected cluster until it is done or stopped."""

    def __init__(
        self,
        job: Job,
        cluster: Cluster,
        options: RunOptions | None = None,
        *,
        progress: ProgressSink | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.job = job
        self.cluster = cluster
        self.options = options or RunOptions()
        self.progress = progress
        self.metrics = metrics or Metrics()
        self.clock = clock
        self.controller = Controller(controller_config(job, self.options))
        self.decision: Decision | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # a drain request interrupts the wait for results
        self._drain_deadline: float | None = None
        self._inflight: dict[str, _InFlight] = {}
        self._by_key: dict[str, str] = {}  # watched future key -> param_id
        self._owner: dict[str, str] = {}  # every task key in flight -> param_id
        self._retry: deque[tuple[Param, int]] = deque()
        # Suspects of needing more than a worker's memory, rerun one at a time, alone.
        self._solo: deque[tuple[Param, int]] = deque()
        self._solo_active: str | None = None
        # A cancelled task runs on until it ends; a suspect runs alone only once a
        # snapshot newer than the last cancellation shows every worker calm.
        self._last_cancel_at = float("-inf")
        self._last_calm_at = float("-inf")
        self._to_admit = 0  # params not yet admitted (pending + retries)
        self._poison = PoisonJudge()
        self._limits: dict[str, int] = {}  # worker address -> memory_limit
        self._ok = self._failed = self._resumed = self._quarantined = 0
        self._errors: list[dict[str, str]] = []
        self._batch_size = 1
        self._batch_range = [0, 0]
        self._inflight_tasks = 0
        self._inflight_sims = 0
        self._peak_inflight_tasks = 0
        self._losses: dict[str, int] = {}
        self._started = 0.0
        self._done_this_run = 0
        self._first_sizes = False
        self._rtt = 0.001  # a scheduler round trip; measured by every poll
        self._pass_seconds = 0.0  # one pass of the loop: collect, flush, poll, refill


    # --- control -------------------------------------------------------------------

    def stop(self) -> None:
        """Stop admitting, drop the work in flight, flush what completed."""
        self._stop.set()

    def drain(self, timeout_s: float) -> None:
        """Stop admitting; let the params in flight finish for up to ``timeout_s``, then
        stop. Completed params are flushed either way."""
        deadline = self.clock() + timeout_s
        if self._drain_deadline is None or deadline < self._drain_deadline:
            self._drain_deadline = deadline
        self._wake.set()

    @property
    def quarantined(self) -> int:
        return self._quarantined

    @property
    def worker_restarts(self) -> int:
        return sum(n for cause, n in self._losses.items() if cause != "planned")

    @property
    def errors(self) -> list[dict[str, str]]:
        return list(self._errors)

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

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
            done = self._resume(ledger)
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
                watch = await self.cluster.watch_workers(self.clock)
                self._to_admit = len(job.params) - len(done)
                self._decide(workers)
                pending = (p for p in job.params if p.param_id not in done)
                await self._loop(pending, writer, ledger, watch)
                unfinished = self.stopping or self._to_admit > 0 or bool(self._inflight)
                state = "interrupted" if unfinished else "succeeded"
            except SchedulerLost:
                state = "interrupted"  # the ledger has what completed; a rerun resumes
                raise
            finally:
                await self._drop_inflight()
                if writer.pending_params:
                    self._flush(writer, ledger)
                self._manifest(ledger, state)
                self._update_gauges()
            return self._summary(state, ledger.counts().parts)

    def _resume(self, ledger: Ledger) -> set[str]:
        job = self.job
        resumed = ledger.bind(job.job_id, job.fingerprint, job.identity())
        removed = remove_unrecorded(job.output_dir, ledger.files())
        if removed:
            log.info(
                "removed %d part files not in the ledger", len(removed),
                extra={"action": "debris_removed"},
            )
        counts = ledger.counts()
        self._ok, self._failed = counts.ok, counts.failed
        self._resumed = counts.params
        if resumed:
            log.info(
                "resuming job %s: %d of %d params already committed",
                job.job_id, counts.params, len(job.params), extra={"action": "job_resumed"},
            )
        return ledger.committed_param_ids()

    async def _loop(
        self, pending: Iterator[Param], writer: PartWriter, ledger: Ledger, watch: WorkerWatch
    ) -> None:
        opts = self.options
        completions = self.cluster.completions()
        last_flush = last_poll = self.clock()
        pass_started: float | None = None
        try:
            while not self.stopping:
                # A dropped Future schedules its release on the event loop (Future.release
                # -> loop.add_callback). Yield once so the releases of the params just
                # collected reach the scheduler before the refill does; otherwise the old
                # and the new window coexist there for a moment.
                await asyncio.sleep(0)
                await self._handle_losses(watch.losses(), writer)
                if self._drain_deadline is not None:
                    if not self._inflight or self.clock() >= self._drain_deadline:
                        break
                elif self.decision is None or self.decision.admit:
                    self._admit(pending, completions)
                if self._to_admit == 0 and not self._inflight:
                    break
                now = self.clock()
                # Decide right after a refill, when "is the window full" is meaningful;
                # the first result sizes end the slow start at once, not at the poll.
                if now - last_poll >= opts.poll_seconds or self._first_sizes:
                    last_poll, self._first_sizes = now, False
                    await self._poll()
                self._report()
                timeout = min(
                    opts.flush_seconds - (now - last_flush), opts.poll_seconds - (now - last_poll)
                )
                if pass_started is not None:
                    self._pass_seconds = time.perf_counter() - pass_started
                finished = await self._wait(completions, max(0.01, timeout))
                pass_started = time.perf_counter()
                # _collect empties the list: a batch of futures kept here would stay
                # alive (and on the cluster) for a whole iteration.
                await self._collect(finished, writer)
                now = self.clock()
                if (
                    writer.pending_params >= opts.flush_params
                    or writer.pending_bytes >= opts.flush_bytes
                    or (writer.pending_params and now - last_flush >= opts.flush_seconds)
                ):
                    self._flush(writer, ledger)
                    last_flush = now
        finally:
            completions.clear()
        self._report()

    async def _wait(self, completions: Completions, timeout: float) -> list[Any]:
        self._wake.clear()
        stop = asyncio.ensure_future(self._stop.wait())
        wake = asyncio.ensure_future(self._wake.wait())
        got = asyncio.ensure_future(completions.wait(timeout))
        try:
            await asyncio.wait({stop, wake, got}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            wake.cancel()
        if not got.done():
            got.cancel()
            return []
        return got.result()

    # --- admission -----------------------------------------------------------------

    def _next_params(self, pending: Iterator[Param], room: int) -> list[tuple[Param, int]]:
        """Up to ``room`` params: retries first, then the job's params in order."""
        batch: list[tuple[Param, int]] = []
        while self._retry and len(batch) < room:
            batch.append(self._retry.popleft())
        if len(batch) < room:
            for param in pending:
                batch.append((param, 0))
                if len(batch) >= room:
                    break
        return batch

    def _admit(self, pending: Iterator[Param], completions: Completions) -> None:
        """Fill the window up to B; or, when a suspect waits, drain and run it alone."""
        if self._solo_active is not None or self._to_admit == 0:
            return
        if self._solo:
            if self._inflight or self._last_calm_at <= self._last_cancel_at + _HEARTBEAT_S:
                return
            batch = [self._solo.popleft()]
            self._solo_active = batch[0][0].param_id
        else:
            room = self._batch_size - len(self._inflight)
            if room <= 0:
                return
            batch = self._next_params(pending, room)
            if not batch:
                return
        spec = self.job.spec
        params = [(p.param_id, p.values, self.job.seeds(p.param_id), a) for p, a in batch]
        submitted = self.cluster.submit_params(
            self.job.job_id, params, spec.model,
            [(t.name, t.function) for t in spec.targets], spec.outputs != "none",
        )
        for (param, attempt), (_, _, seeds, _), tasks in zip(
            batch, params, submitted, strict=True
        ):
            pid = param.param_id
            self._inflight[pid] = _InFlight(param, seeds, tasks, len(tasks.watch), attempt)
            for f in tasks.watch:
                self._by_key[f.key] = pid
            for f in (*tasks.sims, *tasks.finals):
                self._owner[f.key] = pid
            self._inflight_tasks += tasks.n_tasks
            self._inflight_sims += len(tasks.sims)
            completions.add(tasks.watch)
        self._to_admit -= len(batch)
        self._peak_inflight_tasks = max(self._peak_inflight_tasks, self._inflight_tasks)

    # --- completion ----------------------------------------------------------------

    async def _collect(self, finished: list[Any], writer: PartWriter) -> None:
        if not finished:
            return
        ready: list[_InFlight] = []
        for key in [f.key for f in finished]:
            pid = self._by_key.pop(key, None)
            entry = self._inflight.get(pid) if pid is not None else None
            if entry is None:
                continue  # a quarantined or dropped param's future
            entry.remaining -= 1
            if entry.remaining == 0:
                ready.append(entry)
        finished.clear()
        if not ready:
            return
        futures = [f for e in ready for f in e.tasks.gather]
        results = await self.cluster.gather(futures)
        # The round trip a refill cannot hide: the completion reaching tidegate, this
        # pass of the loop (gather, buffering, refill) and the replacement reaching a
        # worker, about two scheduler round trips besides the pass. Not a param's time
        # in flight: that includes queueing, grows with B, and would feed back into an
        # ever larger useful ceiling (seen: B 2 -> 10,000 on trivial tasks).
        self.controller.observe_latency(self._pass_seconds + 2 * self._rtt)
        del futures
        i = 0
        for entry in ready:
            n = len(entry.tasks.gather)
            chunk, i = results[i : i + n], i + n
            # Dropping the last references releases the tasks on the cluster.
            self._forget(entry)
            if any(isinstance(r, TaskError) and r.type == "Cancelled" for r in chunk):
                # tidegate forgets what it cancels before cancelling it: a cancelled
                # result here means the scheduler connection broke (Dask cancels every
                # future then). The param is not failed; it runs again.
                if not self.cluster.connected:
                    raise SchedulerLost("lost the connection to the scheduler")
                self._retry.append((entry.param, entry.attempt))
                self._to_admit += 1
                continue
            if self._should_retry(entry, chunk):
                continue
            self._learn(entry, chunk)
            self._complete(entry, chunk, writer)

    def _forget(self, entry: _InFlight) -> None:
        if self._solo_active == entry.param.param_id:
            self._solo_active = None
        del self._inflight[entry.param.param_id]
        for f in (*entry.tasks.sims, *entry.tasks.finals):
            self._owner.pop(f.key, None)
            self._by_key.pop(f.key, None)
        self._inflight_tasks -= entry.tasks.n_tasks
        self._inflight_sims -= len(entry.tasks.sims)

    def _should_retry(self, entry: _InFlight, results: list[Any]) -> bool:
        killed = any(isinstance(r, TaskError) and r.type == "KilledWorker" for r in results)
        pid = entry.param.param_id
        if not killed or entry.attempt >= KILLED_WORKER_RETRIES:
            return False
        if self._poison.strikes(pid) >= self._poison.strikes_to_isolate:
            return False
        log.info(
            "param %s: KilledWorker after its worker died; resubmitting (attempt %d)",
            pid, entry.attempt + 1, extra={"action": "param_retried"},
        )
        self._retry.append((entry.param, entry.attempt + 1))
        self._to_admit += 1
        return True

    def _learn(self, entry: _InFlight, results: list[Any]) -> None:
        """Feed the controller and the metrics what this param's tasks measured."""
        replicates: dict[int, ReplicateSummary] = {}
        for r in results:
            if isinstance(r, SimReturn):
                replicates[r.replicate] = r.summary()
            elif isinstance(r, TargetResult):
                for rep in r.replicates:
                    replicates.setdefault(rep.replicate, rep)
                if r.target is not None:
                    self.controller.observe_agg(r.__sizeof__())
                    self.metrics.tasks.labels("agg", "ok" if r.error is None else "failed").inc()
        self._first_sizes |= bool(replicates) and not self.controller.sample_counts["sim_bytes"]
        for rep in replicates.values():
            self.controller.observe_sim(rep.nbytes, rep.run_seconds, rep.rss_delta_bytes)
            self.metrics.simreturn_bytes.observe(rep.nbytes)
            self.metrics.tasks.labels("sim", "ok" if rep.error is None else "failed").inc()

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
        self._record(entry.param, entry.seeds, error, sims, targets, writer)

    def _record(
        self,
        param: Param,
        seeds: list[int],
        error: TaskError | None,
        sims: list[SimReturn],
        targets: list[TargetResult],
        writer: PartWriter,
    ) -> None:
        pid = param.param_id
        writer.add(pid, param.values, seeds, error, sims, targets)
        self._poison.forget(pid)
        self._done_this_run += 1
        if error is None:
            self._ok += 1
            self.metrics.params.labels("ok").inc()
            return
        self._failed += 1
        self.metrics.params.labels("failed").inc()
        if len(self._errors) < MAX_ERRORS_KEPT:
            self._errors.append({"param_id": pid, "error": str(error)})
        log.warning("param %s failed: %s", pid, error, extra={"action": "param_failed"})

    def _flush(self, writer: PartWriter, ledger: Ledger) -> None:
        part = ledger.next_part()
        t0 = time.perf_counter()
        written = writer.write_part(part)
        ledger.commit(written.part, written.files, written.statuses, written.nbytes)
        seconds = time.perf_counter() - t0
        self.metrics.parts_written.inc()
        self.metrics.parquet_bytes_written.inc(written.nbytes)
        self.metrics.flush_seconds.observe(seconds)
        # No manifest rewrite here: it carries the whole spec (13.5 MB for 100k inline
        # values, 0.5 s fsynced per part); the ledger has the counts, and the manifest is
        # written when the run starts and ends.
        log.debug(
            "part %d: %d params, %d bytes, %.3f s", part, len(written.statuses),
            written.nbytes, seconds, extra={"action": "part_committed"},
        )

    # --- the cluster and the controller --------------------------------------------

    async def _poll(self) -> None:
        if not self.cluster.connected:
            self.metrics.scheduler_connected.set(0)
            raise SchedulerLost(f"lost the connection to the scheduler at {self.cluster.address}")
        try:
            started = time.perf_counter()
            workers = await self.cluster.workers()
            self._rtt = time.perf_counter() - started
        except Exception as exc:  # a scheduler hiccup must not end the job
            self.metrics.scheduler_connected.set(0)
            log.warning("cannot read the cluster: %s", exc, extra={"action": "poll_failed"})
            return
        self._decide(workers)

    def _decide(self, workers: list[WorkerInfo]) -> None:
        self.metrics.scheduler_connected.set(1)
        self._limits = {w.address: w.memory_limit for w in workers}
        spec = self.job.spec
        obs = Observation(
            now=self.clock(),
            workers=tuple(
                WorkerMemory(
                    w.address, w.nthreads, w.memory_limit, w.rss, w.managed,
                    paused=w.status == "paused",
                )
                for w in workers
            ),
            inflight=len(self._inflight),
            pending=self._to_admit,
            replicates=spec.replicates,
            targets=len(spec.targets),
        )
        self._apply(self.controller.decide(obs))
        if all(w.calm(self.controller.config.low_water) for w in obs.workers):
            self._last_calm_at = obs.now
        m = self.metrics.cluster_memory
        m.labels("limit").set(sum(w.memory_limit for w in workers))
        m.labels("used").set(sum(w.rss for w in workers))
        m.labels("managed").set(sum(w.managed for w in workers))

    def _apply(self, decision: Decision) -> None:
        previous, self.decision = self._batch_size, decision
        self._batch_size = decision.batch_size
        lo, hi = self._batch_range
        self._batch_range = [min(lo, decision.batch_size) if lo else decision.batch_size,
                             max(hi, decision.batch_size)]
        m = self.metrics
        m.decisions.labels(decision.action.value).inc()
        m.batch_size.set(decision.batch_size)
        m.batch_size_target.set(decision.target)
        m.cluster_memory.labels("budget").set(decision.budget_bytes)
        for kind, value in (("memory", decision.memory_ceiling),
                            ("useful", decision.useful_ceiling)):
            if value is not None:
                m.batch_size_ceiling.labels(kind).set(value)
        if decision.batch_size != previous:
            log.info(
                "B %d -> %d (%s)", previous, decision.batch_size, decision.reason,
                extra={"action": "batch_resized"},
            )

    async def _handle_losses(self, losses: list[WorkerLoss], writer: PartWriter) -> None:
        for loss in losses:
            self._losses[loss.cause.value] = self._losses.get(loss.cause.value, 0) + 1
            self.metrics.worker_restarts.labels(loss.cause.value).inc()
            log.warning(
                "worker %s lost: %s (exit code %s)", loss.worker, loss.cause.value,
                loss.exitcode, extra={"action": "worker_lost"},
            )
            if loss.is_oom:
                await self._on_oom(loss, writer)

    async def _on_oom(self, loss: WorkerLoss, writer: PartWriter) -> None:
        self.metrics.oom_events.inc()
        # A worker the nanny restarted since the last poll is not in the map yet; its
        # siblings' limit is the best guess.
        limit = self._limits.get(loss.worker) or max(self._limits.values(), default=0)
        log.warning(
            "worker %s was killed for memory (%s%s%s) with %d params in flight; backing off. "
            "To avoid this: give workers more memory (--memory-limit), lower "
            "batch.memory_fraction, or make each simulation return or allocate less",
            loss.worker, loss.cause.value,
            f", RSS {loss.rss / _MiB:.0f} MiB" if loss.rss else "",
            f" of a {limit / _MiB:.0f} MiB limit" if limit else "",
            len(self._inflight), extra={"action": "oom_detected"},
        )
        self._apply(self.controller.observe_oom(self.clock()))
        running = [self._owner[k] for k in loss.processing if k in self._owner]
        alone = self._solo_active if len(self._inflight) == 1 else None
        verdict = self._poison.on_memory_kill(running, alone=alone)
        for pid in verdict.quarantine:
            if (entry := self._inflight.get(pid)) is not None:
                await self._quarantine(entry, loss, limit, writer)
        for pid in verdict.isolate:
            if (entry := self._inflight.get(pid)) is not None:
                await self._isolate(entry)

    async def _isolate(self, entry: _InFlight) -> None:
        pid = entry.param.param_id
        log.warning(
            "param %s was on %d workers killed for memory; rerunning it alone to tell "
            "whether it needs more than a worker's memory", pid, self._poison.strikes(pid),
            extra={"action": "param_isolated"},
        )
        self._forget(entry)
        await self._cancel([*entry.tasks.sims, *entry.tasks.finals])
        self._solo.append((entry.param, entry.attempt + 1))
        self._to_admit += 1

    async def _quarantine(
        self, entry: _InFlight, loss: WorkerLoss, limit: int, writer: PartWriter
    ) -> None:
        pid = entry.param.param_id
        strikes = self._poison.strikes(pid)
        limit_text = f"{limit / _MiB:.0f} MiB" if limit else "unknown"
        rss_text = f"{loss.rss / _MiB:.0f} MiB" if loss.rss else "unknown"
        why = "while it ran alone" + (f" (after {strikes - 1} shared kills)" if strikes > 1 else "")
        error = TaskError(
            "MemoryExceeded",
            f"param {pid} needs more memory than a worker's limit: worker {loss.worker} was "
            f"killed for memory ({loss.cause.value}) {why}; worker memory limit "
            f"{limit_text}, worker RSS at the kill {rss_text}. Give workers more memory or "
            f"make this simulation allocate less.",
        )
        log.error("param %s quarantined: %s", pid, error.message,
                  extra={"action": "param_quarantined"})
        self._forget(entry)
        # Cancelled explicitly (a handful of futures): the completion watcher still holds
        # them, and Dask would otherwise run the poison task on the next worker.
        await self._cancel([*entry.tasks.sims, *entry.tasks.finals])
        self._quarantined += 1
        self._record(entry.param, entry.seeds, error, [], [], writer)

    async def _cancel(self, futures: list[Any]) -> None:
        self._last_cancel_at = self.clock()
        await self.cluster.cancel(futures)

    async def _drop_inflight(self) -> None:
        futures = [f for e in self._inflight.values() for f in (*e.tasks.sims, *e.tasks.finals)]
        self._inflight.clear()
        self._by_key.clear()
        self._owner.clear()
        self._inflight_tasks = self._inflight_sims = 0
        if futures:
            await self.cluster.cancel(futures)

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
            oom_events=self.controller.oom_events,
        )

    def _update_gauges(self) -> None:
        m = self.metrics
        m.inflight_params.set(len(self._inflight))
        m.inflight_tasks.labels("sim").set(self._inflight_sims)
        m.inflight_tasks.labels("agg").set(self._inflight_tasks - self._inflight_sims)
        m.job_params.labels("total").set(len(self.job.params))
        m.job_params.labels("done").set(self._ok + self._failed)

    def _report(self) -> None:
        self._update_gauges()
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
                "controller": dataclasses.asdict(self.controller.config),
                "datasets": {
                    "params": "params",
                    "model_outputs": "model_outputs/<output>",
                    "targets": [f"targets/{t.name}" for t in spec.targets],
                },
                "updated_at": time.time(),
            },
        )

    def _summary(self, state: str, parts: int) -> RunSummary:
        lo, hi = self._batch_range
        return RunSummary(
            job_id=self.job.job_id,
            state=state,
            total=len(self.job.params),
            ok=self._ok,
            failed=self._failed,
            resumed=self._resumed,
            batch_min=lo or self._batch_size,
            batch_max=hi or self._batch_size,
            batch_final=self._batch_size,
            oom_events=self.controller.oom_events,
            worker_restarts=self.worker_restarts,
            wall_seconds=self.clock() - self._started,
            output=str(self.job.output_dir),
            parts=parts,
            errors=self._errors,
            peak_inflight_tasks=self._peak_inflight_tasks,
            worker_losses=dict(self._losses),
            quarantined=self._quarantined,
        )
