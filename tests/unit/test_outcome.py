"""A param's gathered results judged into typed outcomes."""

from __future__ import annotations

from tidegate.outcome import (
    KILLED_WORKER_RETRIES,
    Disconnected,
    Failed,
    FailureKind,
    Ok,
    Retry,
    RetryReason,
    TaskFailure,
    judge,
    measure,
)
from tidegate.simreturn import ReplicateSummary, SimReturn, TargetResult, TaskError

BOOM = TaskError("RuntimeError", "boom")


def _sim(rep: int, error: TaskError | None = None) -> SimReturn:
    return SimReturn("p", rep, 10 + rep, {}, error)


def _target(
    error: TaskError | None = None, reps: tuple[ReplicateSummary, ...] = ()
) -> TargetResult:
    return TargetResult("p", "t", None if error else 1.5, {}, error, reps)


def _failure(kind: FailureKind) -> TaskFailure:
    return TaskFailure(kind, TaskError(kind.value, "dask said so"))


def test_all_ok() -> None:
    """Sims and targets without errors: Ok with both."""
    outcome = judge([_target(), _sim(0)], attempt=0, connected=True, suspect=False)
    assert isinstance(outcome, Ok) and len(outcome.sims) == 1 and len(outcome.targets) == 1


def test_replicate_error_is_the_root_cause() -> None:
    """A target's ReplicateFailed only repeats a replicate's error: the replicate's wins."""
    rep = ReplicateSummary(0, 10, 0, 0.0, 0, BOOM)
    target = _target(TaskError("ReplicateFailed", "replicate 0 failed"), (rep,))
    outcome = judge([target], attempt=0, connected=True, suspect=False)
    assert isinstance(outcome, Failed) and outcome.error == BOOM


def test_cancelled_while_connected_retries_as_a_new_attempt() -> None:
    """Dask cancelled it, the connection is up: run again, as a new attempt (new keys)."""
    outcome = judge([_failure(FailureKind.CANCELLED)], attempt=1, connected=True, suspect=False)
    assert outcome == Retry(RetryReason.CANCELLED, 2)


def test_cancelled_after_disconnect() -> None:
    """Every future cancelled by a broken connection: Disconnected, not failed."""
    outcome = judge([_failure(FailureKind.CANCELLED), _sim(0)], attempt=0, connected=False,
                    suspect=False)
    assert isinstance(outcome, Disconnected)


def test_killed_worker_retried_until_the_limit() -> None:
    """KilledWorker may blame an innocent param: retried, then recorded as its failure."""
    killed = [_failure(FailureKind.KILLED_WORKER)]
    for attempt in range(KILLED_WORKER_RETRIES):
        assert judge(killed, attempt=attempt, connected=True, suspect=False) == Retry(
            RetryReason.KILLED_WORKER, attempt + 1)
    last = judge(killed, attempt=KILLED_WORKER_RETRIES, connected=True, suspect=False)
    assert isinstance(last, Failed) and last.error.type == "killed_worker"


def test_a_result_lost_with_its_worker_is_retried_like_a_killed_worker() -> None:
    """Finished, then lost with its worker: the cluster's doing, so retried up to the same
    limit, then recorded as lost."""
    lost = [_sim(0), _failure(FailureKind.LOST)]
    for attempt in range(KILLED_WORKER_RETRIES):
        assert judge(lost, attempt=attempt, connected=True, suspect=False) == Retry(
            RetryReason.KILLED_WORKER, attempt + 1)
    last = judge(lost, attempt=KILLED_WORKER_RETRIES, connected=True, suspect=False)
    assert isinstance(last, Failed) and last.error.type == "lost"


def test_a_suspect_is_not_retried_on_killed_worker() -> None:
    """The isolation rules decide a suspect's fate, not the KilledWorker retry."""
    outcome = judge([_failure(FailureKind.KILLED_WORKER)], attempt=0, connected=True,
                    suspect=True)
    assert isinstance(outcome, Failed)


def test_measure_takes_replicates_from_targets_once() -> None:
    """Replicate summaries come from sims or targets, one per replicate; targets' sizes."""
    rep = ReplicateSummary(0, 10, 5, 0.1, 7, None)
    m = measure([_target(reps=(rep,)), _target(reps=(rep,)), _sim(1)])
    assert sorted(r.replicate for r in m.replicates) == [0, 1]
    assert len(m.targets) == 2 and all(ok for _, ok in m.targets)
