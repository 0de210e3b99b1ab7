"""A param's gathered results judged once into a typed outcome.

The cluster hands back, for each task tidegate gathers, a SimReturn, a TargetResult, or a
``TaskFailure`` saying how Dask failed it (cancelled, KilledWorker, lost, an error). The
run loop acts on the outcome; nothing outside cluster.py compares Dask exception names.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from tidegate.simreturn import ReplicateSummary, SimReturn, TargetResult, TaskError

# Dask's KilledWorker can blame a param that only shared a dying worker
# (dask/distributed#5234): such a param is resubmitted this many times before its failure
# is recorded.
KILLED_WORKER_RETRIES = 2


class FailureKind(StrEnum):
    """How Dask failed a task (the model's own exceptions are caught on the worker and
    arrive inside a SimReturn or TargetResult instead)."""

    CANCELLED = "cancelled"  # by tidegate, or by Dask when the scheduler connection broke
    KILLED_WORKER = "killed_worker"  # on allowed-failures + 1 dying workers
    LOST = "lost"  # finished, but its result could not be fetched
    ERROR = "error"  # any other exception Dask raised for it


@dataclass(frozen=True, slots=True)
class TaskFailure:
    kind: FailureKind
    error: TaskError  # what is recorded if the param fails for it


Result = SimReturn | TargetResult | TaskFailure


class RetryReason(StrEnum):
    CANCELLED = "cancelled"  # the scheduler cancelled it; the connection is still up
    KILLED_WORKER = "killed_worker"


@dataclass(frozen=True, slots=True)
class Ok:
    sims: tuple[SimReturn, ...]
    targets: tuple[TargetResult, ...]


@dataclass(frozen=True, slots=True)
class Failed:
    error: TaskError  # the root cause: a replicate's own error before a target's
    sims: tuple[SimReturn, ...]
    targets: tuple[TargetResult, ...]


@dataclass(frozen=True, slots=True)
class Retry:
    reason: RetryReason
    attempt: int  # the attempt number to run it with


@dataclass(frozen=True, slots=True)
class Disconnected:
    """Dask cancels every future when the scheduler connection breaks: the param is not
    failed; the job pauses and resumes from the ledger."""


Outcome = Ok | Failed | Retry | Disconnected


def judge(
    results: Sequence[Result], *, attempt: int, connected: bool, suspect: bool
) -> Outcome:
    """The outcome of one param from all of its gathered results.

    ``suspect``: the param was on enough memory-killed workers to be isolated; a
    KilledWorker then is not retried here (the memory-loss handling decides its fate).
    """
    kinds = {r.kind for r in results if isinstance(r, TaskFailure)}
    if FailureKind.CANCELLED in kinds:
        # tidegate forgets what it cancels before cancelling it: a cancelled result
        # reaching the judge was cancelled by Dask.
        # A new attempt number gives the rerun fresh task keys: the old ones may still be
        # known to the scheduler while their release is on its way.
        return Retry(RetryReason.CANCELLED, attempt + 1) if connected else Disconnected()
    # A result lost with its worker (finished, then the worker died before the gather
    # and Dask's recomputation failed too) is the cluster's doing, not the model's: it
    # is retried as a KilledWorker is. Seen under load with a fused task on a worker
    # killed for memory: both of its params were recorded failed as "Lost".
    dying = kinds & {FailureKind.KILLED_WORKER, FailureKind.LOST}
    if dying and attempt < KILLED_WORKER_RETRIES and not suspect:
        return Retry(RetryReason.KILLED_WORKER, attempt + 1)
    sims = tuple(r for r in results if isinstance(r, SimReturn))
    targets = tuple(r for r in results if isinstance(r, TargetResult))
    error = first_error(results)
    return Ok(sims, targets) if error is None else Failed(error, sims, targets)


def first_error(results: Sequence[Result]) -> TaskError | None:
    """The error recorded for a param: the first in task order, a replicate's own error
    before the target's "ReplicateFailed", which only repeats it."""
    for r in results:
        if isinstance(r, TaskFailure):
            return r.error
        if isinstance(r, SimReturn):
            if r.error is not None:
                return r.error
            continue
        for rep in r.replicates:
            if rep.error is not None:
                return rep.error
        if r.error is not None:
            return r.error
    return None


@dataclass(frozen=True, slots=True)
class Measured:
    """What a param's results tell the controller: one summary per replicate and the
    size and success of each target's result."""

    replicates: tuple[ReplicateSummary, ...]
    targets: tuple[tuple[int, bool], ...]  # (nbytes, ok) per target result


def measure(results: Sequence[Result]) -> Measured:
    replicates: dict[int, ReplicateSummary] = {}
    targets: list[tuple[int, bool]] = []
    for r in results:
        if isinstance(r, SimReturn):
            replicates[r.replicate] = r.summary()
        elif isinstance(r, TargetResult):
            for rep in r.replicates:
                replicates.setdefault(rep.replicate, rep)
            if r.target is not None:
                targets.append((r.__sizeof__(), r.error is None))
    return Measured(tuple(replicates.values()), tuple(targets))
