"""Classifying worker ends and judging poison params: pure logic, events in any order."""

from __future__ import annotations

import pytest

from tidegate.losses import Cause, LossTracker, PoisonJudge, classify


@pytest.mark.parametrize(
    ("exitcode", "memory_kill", "planned", "cause"),
    [
        (-9, False, False, Cause.OOM_KILL),
        (137, False, False, Cause.OOM_KILL),
        (-15, False, False, Cause.EVICTED),
        (143, False, False, Cause.EVICTED),
        (-15, True, False, Cause.MEMORY_TERMINATE),
        (-9, True, False, Cause.MEMORY_TERMINATE),
        (3, False, False, Cause.CRASH),
        (-11, False, False, Cause.CRASH),
        (0, False, False, Cause.PLANNED),
        (None, False, True, Cause.PLANNED),
        (None, False, False, Cause.LOST),
    ],
)
def test_classify(exitcode, memory_kill, planned, cause) -> None:
    """Exit code, memory kill and planned-ness map to the documented cause."""
    assert classify(exitcode=exitcode, memory_kill=memory_kill, planned=planned) == cause


def test_removal_waits_for_its_exit_code() -> None:
    """A removal is held until its exit code arrives, in whichever order they come."""
    t = LossTracker(exit_wait_s=2.0)
    t.on_removed("w1", ["sim-a"], expected=False, stimulus_id="handle-worker-cleanup-1", now=0)
    assert t.ready(0.5) == []
    t.on_exit("w1", -9, now=0.6)
    (loss,) = t.ready(0.7)
    assert (loss.worker, loss.cause, loss.processing) == ("w1", Cause.OOM_KILL, ("sim-a",))
    assert t.ready(0.8) == []  # handed out once

    t.on_exit("w2", 3, now=1.0)  # exit first, removal after
    t.on_removed("w2", [], expected=False, stimulus_id="handle-worker-cleanup-2", now=1.1)
    assert [x.cause for x in t.ready(1.1)] == [Cause.CRASH]


def test_removal_without_exit_code_is_lost_after_the_wait() -> None:
    """No exit code within the wait: the host or pod went away."""
    t = LossTracker(exit_wait_s=2.0)
    t.on_removed("w1", [], expected=False, stimulus_id="handle-worker-cleanup-1", now=10)
    assert t.ready(11.9) == []
    assert [x.cause for x in t.ready(12.1)] == [Cause.LOST]


def test_a_memory_kill_waits_for_its_exit_and_a_retirement_does_not() -> None:
    """The nanny's memory kill is classified once its exit arrives (which brings the
    start record), even when a running task was reported; a retirement at once."""
    t = LossTracker(exits_expected=True)
    t.on_memory_kill("w1", 420, now=0)
    t.on_removed("w1", ["k"], expected=False, stimulus_id="handle-worker-cleanup-1", now=0.02,
                 executing=["k"])
    t.on_removed("w2", [], expected=False, stimulus_id="retire-workers-9", now=0.03)
    (retired,) = t.ready(0.03)
    assert retired.worker == "w2" and retired.cause == Cause.PLANNED and not retired.is_oom
    t.on_exit("w1", -15, now=0.05, started=["k"])
    (killed,) = t.ready(0.05)
    assert killed.cause == Cause.MEMORY_TERMINATE and killed.rss == 420
    assert killed.is_oom and killed.executing == ("k",) and killed.recorded


def test_a_memory_kill_with_another_start_reported_still_reads_the_record() -> None:
    """Two threads: an innocent task reported its start long ago; the poison started
    beside it and its report was lost. The removal comes before the nanny's exit: the
    loss waits for the exit, and its record names the poison too."""
    t = LossTracker(exit_wait_s=5.0, exits_expected=True)
    t.on_memory_kill("w1", 900, now=0)
    t.on_removed("w1", ["i", "p", "q"], expected=False,
                 stimulus_id="handle-worker-cleanup-1", now=0.01, executing=["i"])
    assert t.ready(0.02) == []
    t.on_exit("w1", -15, now=0.3, started=["i", "p"])
    (loss,) = t.ready(0.3)
    assert loss.culprits == ("i", "p")


@pytest.mark.parametrize("reported", [None, []], ids=["no-start-ever", "none-of-its-own"])
def test_a_memory_kill_with_no_start_reported_waits_for_the_start_record(reported) -> None:
    """A memory kill whose worker reported no running task waits for its exit, which
    brings the keys its threads started (the start record its nanny read): the loss
    names those still assigned to it, not a task a thread had finished nor those queued.
    Without an exit it is classified after the wait, blaming every task it held."""
    t = LossTracker(exit_wait_s=2.0, exits_expected=True)
    t.on_memory_kill("w1", 900, now=0)
    t.on_removed("w1", ["a", "b", "c"], expected=False, stimulus_id="handle-worker-cleanup-1",
                 now=0.01, executing=reported)
    assert t.ready(0.5) == []
    t.on_exit("w1", -15, now=0.6, started=["b", "done-before"])
    (loss,) = t.ready(0.6)
    assert (loss.cause, loss.executing, loss.culprits) == (Cause.MEMORY_TERMINATE, ("b",), ("b",))

    t.on_memory_kill("w2", 900, now=1)
    t.on_removed("w2", ["a", "c"], expected=False, stimulus_id="handle-worker-cleanup-2",
                 now=1, executing=reported)
    assert t.ready(2.9) == []
    (late,) = t.ready(3.1)
    assert late.executing == (None if reported is None else ())
    assert late.culprits == ("a", "c")


def test_a_start_record_adds_to_the_reported_starts() -> None:
    """Starts reported by event and those in the start record both count; an exit
    without a record (a worker lacking tidegate's plugin) leaves the reports alone."""
    t = LossTracker()
    t.on_removed("w1", ["a", "b", "c"], expected=False, stimulus_id="x", now=0,
                 executing=["a"])
    t.on_exit("w1", -9, now=0, started=["c"])
    t.on_removed("w2", ["a", "b"], expected=False, stimulus_id="y", now=0, executing=["b"])
    t.on_exit("w2", -9, now=0, started=None)
    losses = {x.worker: x for x in t.ready(0)}
    assert losses["w1"].executing == ("a", "c") and losses["w1"].cause is Cause.OOM_KILL
    assert losses["w2"].executing == ("b",)


def test_stray_events_are_forgotten() -> None:
    """An exit whose removal never comes does not stay forever."""
    t = LossTracker(exit_wait_s=2.0, forget_after_s=60)
    t.on_exit("w1", 0, now=0)
    assert t.ready(61) == []
    t.on_removed("w1", [], expected=False, stimulus_id="x", now=62)
    assert [x.exitcode for x in t.ready(64.1)] == [None]


def test_shared_kills_isolate_and_only_a_solo_kill_quarantines() -> None:
    """Two shared kills make a suspect; only a kill while it ran alone convicts it."""
    judge = PoisonJudge()
    first = judge.on_memory_kill(["a", "b"])
    assert first.quarantine == () and first.isolate == ()
    second = judge.on_memory_kill(["a", "c"])
    assert second.isolate == ("a",) and second.quarantine == ()
    assert judge.strikes("a") == 2 and judge.strikes("b") == 1
    solo = judge.on_memory_kill(["a"], alone="a")
    assert solo.quarantine == ("a",)
    # A param merely in flight with the solo one is not convicted by its kill.
    assert judge.on_memory_kill(["d"], alone="a").quarantine == ()
    judge.forget("a")
    assert judge.strikes("a") == 0


@pytest.mark.parametrize("exitcode", [0, -15, 143, -9, None])
def test_a_worker_timed_out_for_heartbeats_is_lost_whatever_exit_follows(exitcode) -> None:
    """The scheduler gave up on w1's heartbeats (a partitioned host) and had its nanny
    restart it once the link came back: the restarted process's exit code (0, SIGTERM,
    even SIGKILL) says nothing of why w1 went, so it is lost, not planned, evicted or
    an OOM kill; and no wait for an exit code is needed."""
    t = LossTracker(exit_wait_s=5.0)
    t.on_unreachable("w1", now=0)
    if exitcode is not None:
        t.on_exit("w1", exitcode, now=20)
    t.on_removed("w1", ["sim-a"], expected=False, stimulus_id="handle-worker-cleanup-2",
                 now=20.1)
    (loss,) = t.ready(20.2)
    assert (loss.worker, loss.cause, loss.is_oom) == ("w1", Cause.LOST, False)


def test_removal_by_the_ttl_check_itself_is_lost() -> None:
    """A worker without a nanny is removed by the TTL check (its stimulus id says so)."""
    t = LossTracker(exit_wait_s=5.0)
    t.on_removed("w1", [], expected=False, stimulus_id="check-worker-ttl-1796276701.2",
                 now=0)
    (loss,) = t.ready(0.1)
    assert loss.cause is Cause.LOST


def test_a_memory_kill_outranks_the_heartbeat_timeout() -> None:
    """A worker its nanny killed for memory (and so stopped heartbeating) is still a
    memory kill: B must back off for it."""
    t = LossTracker(exits_expected=True)
    t.on_unreachable("w1", now=0)
    t.on_memory_kill("w1", 900, now=1)
    t.on_removed("w1", [], expected=False, stimulus_id="handle-worker-cleanup-3", now=1)
    (loss,) = t.ready(1 + t.exit_wait_s)  # no start reported: its exit was waited for
    assert loss.cause is Cause.MEMORY_TERMINATE


def test_worker_watch_reads_the_schedulers_ttl_event() -> None:
    """WorkerWatch turns the scheduler's ``worker-ttl-timed-out`` event (topic
    ``scheduler``, as distributed's Scheduler.check_worker_ttl logs it) into unreachable
    workers; other scheduler events change nothing."""
    from tidegate.cluster import WorkerWatch

    now = [0.0]
    watch = WorkerWatch(lambda: now[0])
    watch.on_scheduler((0.0, {"action": "worker-ttl-timed-out",
                              "workers": ["tcp://10.77.0.12:40000"], "ttl": 5.0}))
    watch.on_scheduler((0.0, {"action": "something-else", "workers": ["tcp://w2:1"]}))
    for worker, code in (("tcp://10.77.0.12:40000", 0), ("tcp://w2:1", 0)):
        watch.on_exit((1.0, {"worker": worker, "exitcode": code}))
        watch.on_all((1.0, {"action": "remove-worker", "worker": worker,
                            "processing-tasks": [], "expected": False,
                            "stimulus_id": "handle-worker-cleanup-4"}))
    now[0] = 1.0
    causes = {loss.worker: loss.cause for loss in watch.losses()}
    assert causes == {"tcp://10.77.0.12:40000": Cause.LOST, "tcp://w2:1": Cause.PLANNED}


def test_a_memory_kill_waits_for_no_exit_where_no_nanny_reports_them() -> None:
    """No nanny said it reports exits (a Dask whose nanny lacks the hook, workers
    without nannies): a memory kill is classified as soon as it is removed, as before
    start records, instead of waiting out exit_wait_s for every kill."""
    t = LossTracker(exit_wait_s=5.0)
    t.on_memory_kill("w1", 900, now=0)
    t.on_removed("w1", ["p"], expected=False, stimulus_id="handle-worker-cleanup-1",
                 now=0.01, executing=["p"])
    (loss,) = t.ready(0.02)
    assert loss.cause is Cause.MEMORY_TERMINATE and loss.culprits == ("p",)
    assert not loss.recorded


def test_worker_watch_learns_that_exits_will_come() -> None:
    """The nanny plugin's `hooked` event makes memory kills wait for their exits; it
    is no exit itself."""
    from tidegate.cluster import WorkerWatch

    watch = WorkerWatch(lambda: 0.0)
    assert not watch.tracker.exits_expected
    watch.on_exit((0.0, {"worker": "tcp://w:1", "hooked": True}))
    assert watch.tracker.exits_expected and watch.losses() == []


def test_embedded_nannies_are_never_closed_for_a_worker_that_is_slow_to_return() -> None:
    """The embedded cluster (and the bench's) keep SpecCluster from closing a nanny
    whose worker is between a memory kill and its restart: lost-worker-timeout is
    longer than any run (15 s closed both nannies of a cluster under repeated kills)."""
    import dask.config
    from dask.utils import parse_timedelta

    from tidegate.cluster import keep_restarting_nannies

    with dask.config.set({"distributed.deploy.lost-worker-timeout": "15s"}):
        keep_restarting_nannies()
        kept = parse_timedelta(dask.config.get("distributed.deploy.lost-worker-timeout"))
    assert kept >= 365 * 86400
