"""One job's loop: admit params up to B, wait for completions, collect and judge them,
commit them, and poll the controller.

The loop never waits at a barrier: each pass fills the free slots of the window, waits
(briefly) for whichever params complete, gathers all of them in one call and releases
their tasks at once. About every ``poll_seconds`` it reads the workers' memory and asks
the controller for B; a worker lost to memory gets an immediate backoff. The policies
live elsewhere, as pure objects: the window (window.py), the judge of results
(outcome.py), the poison-param rules (losses.py), B (controller.py); durability is
commit.py's and every counter stats.py's.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tidegate.cluster import ClusterPort, LossSource, SchedulerLost, WorkerInfo
from tidegate.commit import Commit, FlushPolicy
from tidegate.controller import Controller, Decision, Observation
from tidegate.knobs import controller_config
from tidegate.losses import Isolate, Isolation, Quarantine, WorkerLoss
from tidegate.metrics import Metrics
from tidegate.outcome import Disconnected, Failed, Retry, RetryReason, judge, measure
from tidegate.params import ListSource, ParamSource
from tidegate.report import Progress, ProgressSink, RunSummary
from tidegate.simreturn import SimReturn, TargetResult, TaskError
from tidegate.spec import Job, Param
from tidegate.states import JobState
from tidegate.stats import InFlightCounts, RunStats
from tidegate.window import Admission, Entry, Lane, TaskKeys, Window

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunOptions:
    batch_size: int | None = None  # pins B; None: the spec's batch.size, else adaptive
    # ControllerConfig fields: ``defaults`` under the spec's batch section (the daemon's
    # knobs), ``controller`` over it (`run`'s variables and flags).
    defaults: Mapping[str, Any] = field(default_factory=dict)
    controller: Mapping[str, Any] = field(default_factory=dict)
    flush_params: int = 1000
    flush_seconds: float = 10.0
    flush_bytes: int = 128 * 2**20
    restart: bool = False
    # Cluster memory snapshot and controller decision interval: the scheduler learns
    # workers' RSS from heartbeats every 0.5 s (up to 10 workers), no fresher than this.
    poll_seconds: float = 0.5

    def __post_init__(self) -> None:
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not self.poll_seconds > 0:
            raise ValueError(f"poll_seconds must be > 0, got {self.poll_seconds}")
        self.flush  # noqa: B018 (checks the flush knobs now)

    @property
    def flush(self) -> FlushPolicy:
        return FlushPolicy(self.flush_params, self.flush_seconds, self.flush_bytes)


class Runner:
    """Runs one job on a connected cluster until it is done or stopped."""

    def __init__(
        self,
        job: Job,
        cluster: ClusterPort,
        options: RunOptions | None = None,
        *,
        progress: ProgressSink | None = None,
        metrics: Metrics | None = None,
        clock: Callable[[], float] = time.monotonic,
        source: ParamSource | None = None,
    ):
        self.job, self.cluster, self.clock = job, cluster, clock
        self.options = options or RunOptions()
        self.progress = progress
        self.source = source or ListSource(job.params)
        self.controller = Controller(controller_config(job, self.options))
        self.stats = RunStats(job.job_id, self.source.total, metrics or Metrics(), clock)
        self.isolation = Isolation()
        self.window: Window[Param] = Window(iter(()), 0)
        self.decision: Decision | None = None
        self._stop = asyncio.Event()
        self._wake = asyncio.Event()  # a drain request interrupts the wait for results
        self._drain_deadline: float | None = None
        self._limits: dict[str, int] = {}  # worker address -> memory_limit
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
    def stopping(self) -> bool:
        return self._stop.is_set()

    @property
    def draining(self) -> bool:
        return self._drain_deadline is not None

    @property
    def batch_size(self) -> int:
        return self.stats.batch_size

    @property
    def quarantined(self) -> int:
        return self.stats.quarantined

    @property
    def worker_restarts(self) -> int:
        return self.stats.worker_restarts

    @property
    def errors(self) -> list[dict[str, str]]:
        return list(self.stats.errors)

    def snapshot(self) -> Progress:
        return self.stats.snapshot(self._inflight())

    # --- the run -------------------------------------------------------------------

    async def run(self) -> RunSummary:
        commit = Commit(self.job, self.options.flush, restart=self.options.restart,
                        manifest_extra={"controller": dataclasses.asdict(self.controller.config)})
        resumed = commit.resume(self.clock())
        self.stats.start(resumed.ok, resumed.failed)
        state = JobState.FAILED
        try:
            await self.cluster.add_code_paths([str(p) for p in self.job.code_paths])
            workers = await self.cluster.wait_for_workers(timeout_s=60)
            watch = await self.cluster.watch_workers(self.clock)
            pending = self.source.pending(resumed.committed.__contains__)
            self.window = Window(pending, self.source.total - len(resumed.committed))
            self._decide(workers)
            await self._loop(commit, watch)
            unfinished = self.stopping or not self.window.finished
            state = JobState.INTERRUPTED if unfinished else JobState.SUCCEEDED
        except SchedulerLost:
            state = JobState.INTERRUPTED  # the ledger has what completed; a rerun resumes
            raise
        finally:
            self.window.drop_all()
            await self.cluster.cancel_all()
            flushed, parts = commit.close(state)
            if flushed is not None:
                self.stats.part_written(flushed.part, flushed.params, flushed.nbytes,
                                        flushed.seconds)
            self._report()
        return self.stats.summary(state, str(self.job.output_dir), parts)

    async def _loop(self, commit: Commit, watch: LossSource) -> None:
        poll_s = self.options.poll_seconds
        last_poll = self.clock()
        pass_started: float | None = None
        while not self.stopping:
            # Releasing a task schedules its release message on the event loop. Yield
            # once so the releases of the params just collected reach the scheduler
            # before the refill does; otherwise old and new window coexist there.
            await asyncio.sleep(0)
            await self._handle_losses(watch.losses(), commit)
            if self._drain_deadline is not None:
                if not self.window.params or self.clock() >= self._drain_deadline:
                    break
            elif self.decision is None or self.decision.admit:
                self._admit()
            if self.window.finished:
                break
            now = self.clock()
            # Decide right after a refill, when "is the window full" is meaningful; the
            # first result sizes end the slow start at once, not at the next poll.
            if now - last_poll >= poll_s or self._first_sizes:
                last_poll, self._first_sizes = now, False
                await self._poll()
            self._report()
            timeout = min(commit.seconds_to_flush(now), poll_s - (now - last_poll))
            if pass_started is not None:
                self._pass_seconds = time.perf_counter() - pass_started
            finished = await self._wait(max(0.01, timeout))
            pass_started = time.perf_counter()
            await self._collect(finished, commit)
            if (flushed := commit.maybe_flush(self.clock())) is not None:
                self.stats.part_written(flushed.part, flushed.params, flushed.nbytes,
                                        flushed.seconds)
        self._report()

    async def _wait(self, timeout: float) -> list[str]:
        self._wake.clear()
        stop = asyncio.ensure_future(self._stop.wait())
        wake = asyncio.ensure_future(self._wake.wait())
        got = asyncio.ensure_future(self.cluster.completed(timeout))
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

    def _admit(self) -> None:
        """Fill the window up to B; or, when a suspect waits, drain and run it alone."""
        w = self.window
        if w.solo_waiting:
            if not w.params and self.isolation.solo_may_start:
                w.fill_solo(self._submit)
        else:
            w.fill(self.batch_size - w.params, self._submit)
        self.stats.admitted(w.tasks)

    def _submit(self, batch: Sequence[Admission[Param]]) -> Sequence[TaskKeys]:
        job, spec = self.job, self.job.spec
        return self.cluster.submit_params(
            job.job_id,
            [(a.param.param_id, a.param.values, job.seeds(a.param.param_id), a.attempt)
             for a in batch],
            spec.model, [(t.name, t.function) for t in spec.targets], spec.outputs != "none",
        )

    # --- completion ----------------------------------------------------------------

    async def _collect(self, finished: list[str], commit: Commit) -> None:
        ready = self.window.complete(finished)
        if not ready:
            return
        results = await self.cluster.gather([k for e in ready for k in e.keys.gather])
        # The round trip a refill cannot hide: the completion reaching tidegate, this
        # pass of the loop and the replacement reaching a worker, about two scheduler
        # round trips besides the pass. Not a param's time in flight: that includes
        # queueing, grows with B and would feed back into an ever larger useful ceiling
        # (seen: B 2 -> 10,000 on trivial tasks).
        self.controller.observe_latency(self._pass_seconds + 2 * self._rtt)
        i = 0
        for entry in ready:
            chunk, i = results[i : i + len(entry.keys.gather)], i + len(entry.keys.gather)
            self._release(entry)
            pid = entry.param_id
            outcome = judge(chunk, attempt=entry.attempt, connected=self.cluster.connected,
                            suspect=self.isolation.suspect(pid))
            if isinstance(outcome, Disconnected):
                raise SchedulerLost("lost the connection to the scheduler")
            if isinstance(outcome, Retry):
                if outcome.reason is RetryReason.KILLED_WORKER:
                    log.info("param %s: KilledWorker after its worker died; resubmitting "
                             "(attempt %d)", pid, outcome.attempt,
                             extra={"action": "param_retried"})
                self.window.requeue(entry.param, outcome.attempt)
                continue
            self._learn(chunk)
            error = outcome.error if isinstance(outcome, Failed) else None
            self._record(entry.param, error, outcome.sims, outcome.targets, commit)

    def _release(self, entry: Entry[Param]) -> None:
        self.window.remove(entry.param_id)
        self.cluster.release(entry.keys.all)

    def _learn(self, results: Sequence[Any]) -> None:
        """Feed the controller and the metrics what a param's tasks measured."""
        m = measure(results)
        self._first_sizes |= bool(m.replicates) and not self.controller.sample_counts["sim_bytes"]
        for nbytes, _ in m.targets:
            self.controller.observe_agg(nbytes)
        for rep in m.replicates:
            self.controller.observe_sim(rep.nbytes, rep.run_seconds, rep.rss_delta_bytes)
        self.stats.measured(m)

    def _record(self, param: Param, error: TaskError | None, sims: Sequence[SimReturn],
                targets: Sequence[TargetResult], commit: Commit) -> None:
        pid = param.param_id
        commit.record(pid, param.values, self.job.seeds(pid), error, sims, targets)
        self.isolation.forget(pid)
        self.stats.param_done(pid, error)

    # --- the cluster and the controller --------------------------------------------

    async def _poll(self) -> None:
        if not self.cluster.connected:
            self.stats.cluster_unreadable()
            raise SchedulerLost(f"lost the connection to the scheduler at {self.cluster.address}")
        try:
            started = time.perf_counter()
            workers = await self.cluster.workers()
            self._rtt = time.perf_counter() - started
        except Exception as exc:  # a scheduler hiccup must not end the job
            self.stats.cluster_unreadable(exc)
            return
        self._decide(workers)

    def _decide(self, workers: Sequence[WorkerInfo]) -> None:
        self.stats.cluster_read(workers)
        self._limits = {w.address: w.memory_limit for w in workers}
        spec = self.job.spec
        obs = Observation(
            now=self.clock(), workers=tuple(w.memory() for w in workers),
            inflight=self.window.params, pending=self.window.to_admit,
            replicates=spec.replicates, targets=len(spec.targets),
        )
        self._apply(self.controller.decide(obs))
        if all(w.calm(self.controller.config.low_water) for w in obs.workers):
            self.isolation.calm(obs.now)

    def _apply(self, decision: Decision) -> None:
        self.decision = decision
        self.stats.decided(decision)

    async def _handle_losses(self, losses: list[WorkerLoss], commit: Commit) -> None:
        for loss in losses:
            self.stats.worker_lost(loss)
            if loss.is_oom:
                await self._on_oom(loss, commit)

    async def _on_oom(self, loss: WorkerLoss, commit: Commit) -> None:
        # A worker the nanny restarted since the last poll is not in the map yet; its
        # siblings' limit is the best guess.
        limit = self._limits.get(loss.worker) or max(self._limits.values(), default=0)
        self.stats.oom_backoff(loss, limit, self.window.params)
        self._apply(self.controller.observe_oom(self.clock()))
        w = self.window
        running = [pid for key in loss.processing if (pid := w.owner(key)) is not None]
        for action in self.isolation.on_memory_kill(loss, running, alone=w.solo_active,
                                                    limit=limit):
            entry = w.get(action.param_id)
            if entry is None:
                continue
            # Cancelled explicitly (a handful of tasks): Dask would otherwise run the
            # suspect again on the next worker.
            w.remove(entry.param_id)
            self.isolation.cancelled(self.clock())
            await self.cluster.cancel(entry.keys.all)
            if isinstance(action, Quarantine):
                log.error("param %s quarantined: %s", action.param_id, action.message,
                          extra={"action": "param_quarantined"})
                self.stats.quarantined += 1
                self._record(entry.param, TaskError("MemoryExceeded", action.message), (), (),
                             commit)
            elif isinstance(action, Isolate):
                log.warning("param %s was on %d workers killed for memory; rerunning it alone "
                            "to tell whether it needs more than a worker's memory",
                            action.param_id, action.strikes, extra={"action": "param_isolated"})
                w.requeue(entry.param, entry.attempt + 1, Lane.SOLO)

    # --- reporting -----------------------------------------------------------------

    def _inflight(self) -> InFlightCounts:
        w = self.window
        return InFlightCounts(w.params, w.tasks, w.sims)

    def _report(self) -> None:
        counts = self._inflight()
        self.stats.gauges(counts)
        if self.progress is not None:
            self.progress.update(self.stats.snapshot(counts))
