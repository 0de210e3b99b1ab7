"""The states of a daemon job, defined once for the queue, the API and the client."""

from __future__ import annotations

from enum import StrEnum


class JobState(StrEnum):
    """Where a job is: ``queued -> running -> succeeded | failed | cancelled``, or
    ``interrupted`` when the daemon stopped mid-job (it resumes first)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    INTERRUPTED = "interrupted"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})
# What a run can end as; the queue records a cancel requested mid-run as cancelled.
FINISH_STATES = TERMINAL | {JobState.INTERRUPTED}
STARTABLE = frozenset({JobState.QUEUED, JobState.INTERRUPTED})
