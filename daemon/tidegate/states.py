"""The states of a daemon job, defined once for the queue, the API and the client."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Where a job is: ``queued -> running -> succeeded | completed_with_failures |
    failed | cancelled``, or ``interrupted`` when the daemon stopped mid-job (it resumes
    first). ``completed_with_failures``: every param ran and some failed;
    ``failed``: the job stopped early (the on_error circuit breaker, a model's contract
    error, an output that cannot be written)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    COMPLETED_WITH_FAILURES = "completed_with_failures"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.COMPLETED_WITH_FAILURES, JobState.FAILED,
                      JobState.CANCELLED})
# What a run can end as; the queue records a cancel requested mid-run as cancelled.
FINISH_STATES = TERMINAL | {JobState.INTERRUPTED}
STARTABLE = frozenset({JobState.QUEUED, JobState.INTERRUPTED})
