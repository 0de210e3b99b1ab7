"""Every counter of one run, its progress snapshot and its summary; the run loop's only
caller of Metrics."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from tidegate.cluster import WorkerInfo
from tidegate.commit import Flushed
from tidegate.controller import Decision
from tidegate.failures import ErrorGroups, values_text
from tidegate.losses import MEMORY_CAUSES, Cause, MemoryKill, WorkerLoss
from tidegate.metrics import Metrics
from tidegate.outcome import Measured
from tidegate.report import Progress, RunSummary
from tidegate.simreturn import TaskError
from tidegate.states import JobState

log = logging.getLogger(__name__)

MAX_ERRORS_KEPT = 20
# Failures logged one line each; after these, one line per kind when the run ends.
MAX_FAILURES_LOGGED = 5
_MiB = 2**20


class InFlight(Protocol):
    """The window's derived counts (window.Window)."""

    @property
    def params(self) -> int: ...
    @property
    def tasks(self) -> int: ...
    @property
    def sims(self) -> int: ...


@dataclass(slots=True)
class RunStats:
    job_id: str
    total: int
    metrics: Metrics
    clock: Callable[[], float]
    ok: int = 0
    failed: int = 0
    resumed: int = 0
    quarantined: int = 0
    retried: int | None = None  # failed params of earlier runs run again; None: no retry
    errors: list[dict[str, str]] = field(default_factory=list)
    groups: ErrorGroups = field(default_factory=ErrorGroups)
    losses: dict[str, int] = field(default_factory=dict)  # cause -> count
    batch_size: int = 1
    batch_min: int = 0
    batch_max: int = 0
    peak_inflight_tasks: int = 0
    sim_tasks: int = 0  # sim tasks submitted (a fused one runs several sims)
    sims_submitted: int = 0
    started: float = 0.0
    resumed_failed: int = 0
    child_kills: int = 0  # child process trees tidegate's workers killed for memory
    orphan_count: int | None = None  # committed params not in the spec, once known
    orphan_sample: list[dict[str, Any]] = field(default_factory=list)
    prune: bool = False  # --prune was asked
    pruned: int | None = None  # orphaned params dropped from the output by this run
    # Admission held back, by reason: seconds, and since when the current hold lasts.
    _blocked_reason: str | None = None
    _blocked_since: float = 0.0
    _slot_labels: set[str] = field(default_factory=set)

    def start(self, ok: int, failed: int, retried: int | None = None) -> None:
        """The run starts with ``ok + failed`` params already committed, and ``retried``
        failed ones un-committed to run again."""
        self.ok, self.failed, self.resumed = ok, failed, ok + failed
        self.retried = retried
        self.resumed_failed = failed
        self.started = self.clock()

    def orphaned(self, count: int, ok: int, failed: int, sample: list[dict[str, Any]]) -> None:
        """``count`` committed params (``ok`` + ``failed``) are not in the spec: they stay
        in the output but leave the counts, which are the spec's."""
        self.ok, self.failed = self.ok - ok, self.failed - failed
        self.resumed -= ok + failed
        self.orphan_count, self.orphan_sample = count, sample
        if count:
            shown = ", ".join(f"{o['param_id']} {o['values']}" for o in sample)
            log.info("%d committed params are no longer in the spec (orphaned; kept in the "
                     "output), e.g. %s", count, shown, extra={"action": "params_orphaned"})

    def prune_started(self) -> None:
        self.pruned = 0

    def pruned_part(self, dropped: int) -> None:
        """A part was rewritten without ``dropped`` orphans: they leave the output, so
        they count as pruned, no longer as orphaned."""
        self.pruned = (self.pruned or 0) + dropped
        if self.orphan_count is not None:
            self.orphan_count = max(0, self.orphan_count - dropped)
            if not self.orphan_count:
                self.orphan_sample = []

    def committed_only(self, ok: int, failed: int) -> None:
        """A part could not be written: the counts fall back to what the ledger holds
        (the lost part's params are recomputed by the next run)."""
        self.ok, self.failed = ok, failed

    @property
    def worker_restarts(self) -> int:
        return sum(n for cause, n in self.losses.items() if cause != Cause.PLANNED)

    @property
    def oom_events(self) -> int:
        """Memory kills: workers lost to memory, and child trees tidegate killed."""
        return sum(self.losses.get(cause, 0) for cause in MEMORY_CAUSES) + self.child_kills

    @property
    def done_this_run(self) -> int:
        return self.ok + self.failed - self.resumed

    # --- events ---------------------------------------------------------------------

    def param_done(self, param_id: str, error: TaskError | None,
                   values: Mapping[str, Any] | None = None) -> None:
        if error is None:
            self.ok += 1
            self.metrics.params.labels("ok").inc()
            return
        self.failed += 1
        self.metrics.params.labels("failed").inc()
        if len(self.errors) < MAX_ERRORS_KEPT:
            self.errors.append({"param_id": param_id, "error": str(error)})
        self.groups.add(param_id, values or {}, error.type, error.message)
        failed_here = self.failed - self.resumed_failed
        if failed_here <= MAX_FAILURES_LOGGED:
            shown = values_text(values) if values else ""
            log.warning("param %s %s failed: %s", param_id, shown, error,
                        extra={"action": "param_failed"})
            if failed_here == MAX_FAILURES_LOGGED:
                log.warning("further failures are counted by kind, shown when the run ends "
                            "(tidegate failures OUTPUT_DIR lists them all)",
                            extra={"action": "param_failed"})

    def log_groups(self, where: str) -> None:
        """One line per kind of failure of this run, biggest first."""
        for group in self.groups.ordered():
            log.warning("failures: %s; tracebacks: %s", group.line(), where,
                        extra={"action": "failure_group"})
        if self.groups.other:
            log.warning("failures: %d more of other kinds", self.groups.other,
                        extra={"action": "failure_group"})

    def measured(self, m: Measured) -> None:
        for _, ok in m.targets:
            self.metrics.tasks.labels("agg", "ok" if ok else "failed").inc()
        for rep in m.replicates:
            self.metrics.simreturn_bytes.observe(rep.nbytes)
            self.metrics.tasks.labels("sim", "ok" if rep.error is None else "failed").inc()

    def submitted(self, sim_tasks: int, sims: int) -> None:
        self.sim_tasks += sim_tasks
        self.sims_submitted += sims

    def admitted(self, inflight_tasks: int) -> None:
        self.peak_inflight_tasks = max(self.peak_inflight_tasks, inflight_tasks)

    def decided(self, decision: Decision) -> None:
        previous, self.batch_size = self.batch_size, decision.batch_size
        b = decision.batch_size
        self.batch_min = min(self.batch_min, b) if self.batch_min else b
        self.batch_max = max(self.batch_max, b)
        m = self.metrics
        m.decisions.labels(decision.action.value).inc()
        m.batch_size.set(b)
        m.batch_size_target.set(decision.target)
        m.cluster_memory.labels("budget").set(decision.budget_bytes)
        for kind, value in (("memory", decision.memory_ceiling),
                            ("useful", decision.useful_ceiling)):
            if value is not None:
                m.batch_size_ceiling.labels(kind).set(value)
        if b != previous:
            log.info("B %d -> %d (%s)", previous, b, decision.reason,
                     extra={"action": "batch_resized"})

    def cluster_read(self, workers: Sequence[WorkerInfo]) -> None:
        self.metrics.scheduler_connected.set(1)
        m = self.metrics.cluster_memory
        m.labels("limit").set(sum(w.memory_limit for w in workers))
        m.labels("used").set(sum(w.rss for w in workers))
        m.labels("managed").set(sum(w.managed for w in workers))

    def cluster_unreadable(self, exc: BaseException | None = None) -> None:
        self.metrics.scheduler_connected.set(0)
        if exc is not None:
            log.warning("cannot read the cluster: %s", exc, extra={"action": "poll_failed"})

    def worker_lost(self, loss: WorkerLoss) -> None:
        self.losses[loss.cause.value] = self.losses.get(loss.cause.value, 0) + 1
        self.metrics.worker_restarts.labels(loss.cause.value).inc()
        log.warning("worker %s lost: %s (exit code %s)", loss.worker, loss.cause.value,
                    loss.exitcode, extra={"action": "worker_lost"})
        if loss.is_oom:
            self.metrics.oom_events.inc()

    def oom_backoff(self, loss: WorkerLoss, limit: int, inflight_params: int) -> None:
        log.warning(
            "worker %s was killed for memory (%s%s%s) with %d params in flight; backing off. "
            "To avoid this: give workers more memory (--memory-limit), lower "
            "batch.memory_fraction, or make each simulation return or allocate less",
            loss.worker, loss.cause.value,
            f", RSS {loss.rss / _MiB:.0f} MiB" if loss.rss else "",
            f" of a {limit / _MiB:.0f} MiB limit" if limit else "",
            inflight_params, extra={"action": "oom_detected"},
        )

    def part_written(self, part: Flushed | None) -> None:
        if part is None:
            return
        self.metrics.parts_written.inc()
        self.metrics.parquet_bytes_written.inc(part.nbytes)
        self.metrics.flush_seconds.observe(part.seconds)
        log.debug("part %d: %d params, %d bytes, %.3f s", part.part, part.params, part.nbytes,
                  part.seconds, extra={"action": "part_committed"})

    def child_killed(self, kill: MemoryKill, param_id: str | None) -> None:
        self.child_kills += 1
        self.metrics.oom_events.inc()
        self.metrics.child_kills.inc()
        log.warning("param %s: %s; backing off", param_id or "?", kill.text(),
                    extra={"action": "child_killed"})

    def blocked(self, reason: str | None) -> None:
        """Admission is held back for ``reason`` (memory, threads, pinned, draining,
        solo) from now on, or flows (None); counts the seconds of the hold that ends."""
        now = self.clock()
        if self._blocked_reason is not None:
            self.metrics.admission_blocked.labels(self._blocked_reason).inc(
                max(0.0, now - self._blocked_since))
        self._blocked_reason, self._blocked_since = reason, now

    def slots(self, decision: Decision, names: dict[str, str]) -> None:
        """Per-worker slots under the sim request, labelled by worker name (a restarted
        worker keeps its name; a gone worker's label is removed), at most 256 labels."""
        m = self.metrics
        m.sim_request.set(decision.sim_request)
        m.slots_total.set(decision.total_slots)
        seen = set()
        for address, n in decision.slots:
            label = names.get(address) or address
            if label not in self._slot_labels and len(self._slot_labels) >= 256:
                continue
            seen.add(label)
            m.worker_slots.labels(label).set(n)
        for gone in self._slot_labels - seen:
            with contextlib.suppress(KeyError):
                m.worker_slots.remove(gone)
        self._slot_labels = seen

    def quarantine(self, param_id: str, message: str) -> None:
        self.quarantined += 1
        log.error("param %s quarantined: %s", param_id, message,
                  extra={"action": "param_quarantined"})

    def isolate(self, param_id: str, strikes: int) -> None:
        log.warning("param %s was on %d workers killed for memory; rerunning it alone to "
                    "tell whether it needs more than a worker's memory", param_id, strikes,
                    extra={"action": "param_isolated"})

    # --- reporting ------------------------------------------------------------------

    def gauges(self, inflight: InFlight) -> None:
        m = self.metrics
        m.inflight_params.set(inflight.params)
        m.inflight_tasks.labels("sim").set(inflight.sims)
        m.inflight_tasks.labels("agg").set(inflight.tasks - inflight.sims)
        m.job_params.labels("total").set(self.total)
        m.job_params.labels("done").set(self.ok + self.failed)

    def search_progress(self, view: Mapping[str, Any]) -> None:
        """A search's trials and best loss (SearchSource.view), as gauges."""
        m = self.metrics
        m.search_trials.labels("budget").set(view["trials"])
        m.search_trials.labels("told").set(view["told"])
        m.search_trials.labels("failed").set(view["failed"])
        if view["best"] is not None:
            m.search_best_loss.set(view["best"]["loss"])

    def _counters(self) -> dict[str, Any]:
        """What the snapshot and the summary both report, under the same names."""
        names = ("job_id", "total", "ok", "failed", "resumed", "quarantined", "oom_events",
                 "worker_restarts", "retried")
        return {name: getattr(self, name) for name in names}

    def snapshot(self, inflight: InFlight) -> Progress:
        elapsed = max(self.clock() - self.started, 1e-9) if self.started else 0.0
        return Progress(
            **self._counters(),
            done=self.ok + self.failed,
            batch_size=self.batch_size,
            inflight_params=inflight.params,
            inflight_tasks=inflight.tasks,
            rate=self.done_this_run / elapsed if elapsed else 0.0,
            elapsed=elapsed,
            errors=tuple(self.errors),
            error_groups=tuple(self.groups.as_list()),
        )

    def summary(self, state: JobState, output: str, parts: int) -> RunSummary:
        return RunSummary(
            **self._counters(),
            state=state,
            batch_min=self.batch_min or self.batch_size,
            batch_max=self.batch_max or self.batch_size,
            batch_final=self.batch_size,
            wall_seconds=self.clock() - self.started,
            output=output,
            parts=parts,
            errors=list(self.errors),
            error_groups=self.groups.as_list(),
            peak_inflight_tasks=self.peak_inflight_tasks,
            sim_tasks=self.sim_tasks,
            sims_submitted=self.sims_submitted,
            worker_losses=dict(self.losses),
            orphaned=self.orphan_count,
            orphans=list(self.orphan_sample),
            prune=self.prune,
            pruned=self.pruned,
        )
