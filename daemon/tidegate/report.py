"""What a run reports: live progress snapshots and the final summary."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

from tidegate.exitcodes import RunExit
from tidegate.states import JobState


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
    oom_events: int = 0
    quarantined: int = 0
    worker_restarts: int = 0
    retried: int | None = None  # failed params of earlier runs run again; None: no retry
    errors: tuple[Mapping[str, str], ...] = ()  # the first failed params: param_id, error
    error_groups: tuple[Mapping[str, Any], ...] = ()  # failures by kind (failures.Group)
    # A search's objective, trials, told and best so far (SearchSource.view); None: a sweep.
    search: Mapping[str, Any] | None = None

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
    state: JobState  # succeeded | completed_with_failures | failed | interrupted
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
    # Sim tasks and sims submitted: fewer tasks than sims where replicates were fused.
    sim_tasks: int = 0
    sims_submitted: int = 0
    worker_losses: dict[str, int] = field(default_factory=dict)  # cause -> count
    quarantined: int = 0
    retried: int | None = None  # failed params of earlier runs run again; None: no retry
    error: str | None = None  # why the run stopped early (a failed output write)
    # Committed params no longer in the spec (kept in the output, left out of total, ok,
    # failed and resumed); None when the run ended before it walked all the spec's.
    orphaned: int | None = 0
    orphans: list[dict[str, Any]] = field(default_factory=list)  # a few: param_id, values
    # Why the job failed before its end: the on_error circuit breaker or a contract error.
    reason: str | None = None
    # This run's failed params by kind (failures.Group.as_dict), biggest first.
    error_groups: list[dict[str, Any]] = field(default_factory=list)
    tracebacks: str | None = None  # where the failed params' tracebacks are
    # --prune: whether it was asked, and how many orphaned params this run dropped from
    # the output (None: it ended before its walk was over, so it pruned nothing).
    prune: bool = False
    pruned: int | None = None
    search: dict[str, Any] | None = None  # as Progress.search

    def __post_init__(self) -> None:
        self.state = JobState(self.state)

    @property
    def exit_code(self) -> RunExit:
        if self.state == JobState.INTERRUPTED:
            return RunExit.INTERRUPTED
        if self.state == JobState.SUCCEEDED and self.failed == 0:
            return RunExit.OK
        if self.state in (JobState.SUCCEEDED, JobState.COMPLETED_WITH_FAILURES):
            return RunExit.FAILURES
        return RunExit.FAILED

    def as_dict(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "state": self.state,
            "params": {
                "total": self.total,
                "ok": self.ok,
                "failed": self.failed,
                "resumed": self.resumed,
                "quarantined": self.quarantined,
                "orphaned": self.orphaned,
                # Only in a retry's summary (--retry-failed): the shape is otherwise kept.
                **({"retried": self.retried} if self.retried is not None else {}),
                # Only when --prune was asked: null if the run could not prune.
                **({"pruned": self.pruned} if self.prune else {}),
            },
            "batch_size": {
                "min": self.batch_min,
                "max": self.batch_max,
                "final": self.batch_final,
            },
            "oom_events": self.oom_events,
            "worker_restarts": self.worker_restarts,
            "worker_losses": self.worker_losses,
            "wall_seconds": round(self.wall_seconds, 3),
            "output": self.output,
            "parts": self.parts,
            "peak_inflight_tasks": self.peak_inflight_tasks,
            "sim_tasks": {"submitted": self.sim_tasks, "sims": self.sims_submitted},
            "errors": self.errors,
            **({"orphans": self.orphans} if self.orphans else {}),
            "error_groups": self.error_groups,
            **({"tracebacks": self.tracebacks} if self.tracebacks else {}),
            **({"error": self.error} if self.error else {}),
            **({"reason": self.reason} if self.reason else {}),
            "search": self.search,  # null for a sweep
        }
