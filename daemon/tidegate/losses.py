"""Why a worker went away: join the scheduler's removal, the nanny's memory kill and the
worker process's exit code into one classified WorkerLoss.

Pure: events and the time are arguments. The scheduler never learns a worker's exit
code (dask/distributed#2297), so cluster.py has each nanny report it as a ``tidegate-worker-exit``
event; where that cannot run, a removal with no exit code is classified from what the
scheduler's events say, and as ``lost`` after ``exit_wait_s``.

A worker the scheduler gave up on for missing its heartbeats (``worker-ttl``: a host
partitioned, or a process hung) is ``lost`` whatever exit code follows: the scheduler
then asks its nanny to restart it, and if the nanny can be reached again (the link came
back) the killed process exits 0 or by SIGTERM, which would otherwise read as planned
or evicted.
"""

from __future__ import annotations

import signal
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import StrEnum


class Cause(StrEnum):
    OOM_KILL = "oom_kill"  # SIGKILL (-9, or 137 from a shell): the kernel's OOM killer
    MEMORY_TERMINATE = "memory_terminate"  # Dask's nanny killed it at its memory limit
    EVICTED = "evicted"  # SIGTERM without a memory kill: eviction, preemption, scale-down
    CRASH = "crash"  # any other non-zero exit
    LOST = "lost"  # unreachable: no exit code at all, or heartbeats missed past the TTL
    PLANNED = "planned"  # retired or closed on purpose


MEMORY_CAUSES = frozenset({Cause.OOM_KILL, Cause.MEMORY_TERMINATE})


@dataclass(frozen=True, slots=True)
class WorkerLoss:
    worker: str
    cause: Cause
    exitcode: int | None
    rss: int | None  # at the nanny's memory kill
    processing: tuple[str, ...]  # task keys assigned to the worker when it went
    at: float
    # Of those, the keys it had started executing (tidegate's workers report each start);
    # None where no start was ever reported (workers without tidegate's plugin): then
    # ``processing`` is all there is, queued tasks included.
    executing: tuple[str, ...] | None = None
    # Its nanny read the start record its threads wrote (tidegate.starts): ``executing``
    # then holds every task it was running that it still held (sims and targets), even
    # if none.
    recorded: bool = False

    @property
    def culprits(self) -> tuple[str, ...]:
        """The keys that may have used the memory it was killed for: those running, not
        those queued behind them (which hold nothing). When none was reported running,
        every key it held: a worker killed within a moment of a task's start never sent
        that start (the report waits on the worker's event loop, which a model holding
        the GIL as it allocates keeps from running; seen under load: a poison param's
        start never arrived on four workers in a row, so it struck none of them and ended
        as Dask's KilledWorker instead of quarantined). Not so with a start record: its
        threads' last starts are known, and none of them held (a cancelled task running
        on, a finished one) leaves nothing to blame."""
        if self.recorded:
            return self.executing or ()
        return self.executing or self.processing

    @property
    def is_oom(self) -> bool:
        return self.cause in MEMORY_CAUSES


@dataclass(frozen=True, slots=True)
class MemoryKill:
    """tidegate's worker plugin killed a sim's child process tree: the worker's whole
    tree had passed the terminate fraction of its limit (the worker itself lives on)."""

    worker: str
    key: str  # the sim charged with the child
    child_pid: int
    child_rss: int
    tree_rss: int
    limit: int
    at: float

    def text(self) -> str:
        mib = 2**20
        return (f"child process {self.child_pid} ({self.child_rss / mib:.0f} MiB) killed: "
                f"worker {self.worker}'s process tree reached {self.tree_rss / mib:.0f} MiB "
                f"of its {self.limit / mib:.0f} MiB limit")


def classify(*, exitcode: int | None, memory_kill: bool, planned: bool,
             unreachable: bool = False) -> Cause:
    """The cause of a worker's end from what is known of it. ``unreachable``: the
    scheduler dropped it for missed heartbeats (its exit code, if one comes, is that of
    the restart the scheduler asked for, not of what ended it)."""
    if memory_kill:
        return Cause.MEMORY_TERMINATE
    if unreachable:
        return Cause.LOST
    if planned or exitcode == 0:
        return Cause.PLANNED
    if exitcode is None:
        return Cause.LOST
    if exitcode in (-signal.SIGKILL, 128 + signal.SIGKILL):
        return Cause.OOM_KILL
    if exitcode in (-signal.SIGTERM, 128 + signal.SIGTERM):
        return Cause.EVICTED
    return Cause.CRASH


@dataclass(slots=True)
class _Pending:
    removed_at: float | None = None
    processing: tuple[str, ...] = ()
    executing: tuple[str, ...] | None = None
    planned: bool = False
    exitcode: int | None = None
    exited: bool = False
    # The keys its threads started last, from the start record the nanny read at its
    # exit (tidegate.starts); None without one.
    started: tuple[str, ...] | None = None
    memory_kill: bool = False
    unreachable: bool = False
    rss: int | None = None
    first_seen: float = 0.0


@dataclass(slots=True)
class LossTracker:
    """Collects the events about each worker's end and hands out classified losses once
    the removal and its exit code have both arrived, or the wait for the code is over."""

    # Normally the exit code arrives within milliseconds of the removal, so this only
    # delays calling a worker "lost"; on a loaded machine the nanny's report took over
    # 2 s (seen with 32 busy threads on 2 cores).
    exit_wait_s: float = 5.0
    forget_after_s: float = 120.0
    # A nanny said it reports its worker's exits (tidegate.worker.ExitCodes): a memory
    # kill then waits for its exit, which brings the worker's start record.
    exits_expected: bool = False
    _pending: dict[str, _Pending] = field(default_factory=dict)

    def _entry(self, worker: str, now: float) -> _Pending:
        entry = self._pending.get(worker)
        if entry is None:
            entry = self._pending[worker] = _Pending(first_seen=now)
        return entry

    def expect_restart(self, worker: str, now: float) -> None:
        """tidegate restarts ``worker`` on purpose: its removal is planned, whatever exit
        code the killed process reports."""
        self._entry(worker, now).planned = True

    def on_memory_kill(self, worker: str, rss: int | None, now: float) -> None:
        entry = self._entry(worker, now)
        entry.memory_kill, entry.rss = True, rss

    def on_unreachable(self, worker: str, now: float) -> None:
        """The scheduler timed ``worker`` out for missed heartbeats (its
        ``worker-ttl-timed-out`` event): its removal follows, once the nanny's restart
        is done or has failed."""
        self._entry(worker, now).unreachable = True

    def on_exit(self, worker: str, exitcode: int | None, now: float,
                started: Sequence[str] | None = None) -> None:
        entry = self._entry(worker, now)
        entry.exitcode, entry.exited = exitcode, True
        entry.started = None if started is None else tuple(started)

    def on_removed(
        self,
        worker: str,
        processing: Sequence[str],
        *,
        expected: bool,
        stimulus_id: str,
        now: float,
        executing: Sequence[str] | None = None,
    ) -> None:
        entry = self._entry(worker, now)
        entry.removed_at = now
        entry.processing = tuple(processing)
        entry.executing = None if executing is None else tuple(executing)
        entry.planned = (entry.planned or bool(expected)
                         or stimulus_id.startswith("retire-workers"))
        # A worker without a nanny is removed by the TTL check itself.
        entry.unreachable = entry.unreachable or stimulus_id.startswith("check-worker-ttl")

    def ready(self, now: float) -> list[WorkerLoss]:
        """Losses that can be classified now; each is handed out once."""
        out: list[WorkerLoss] = []
        for worker, e in list(self._pending.items()):
            if e.removed_at is None:
                # An exit or memory kill whose removal never came (or is still coming).
                if now - e.first_seen > self.forget_after_s:
                    del self._pending[worker]
                continue
            # Unreachable: lost whatever exit code may still come.
            waiting = now - e.removed_at < self.exit_wait_s
            if not (e.exited or e.planned or e.memory_kill or e.unreachable) and waiting:
                continue
            if e.memory_kill and not e.exited and waiting and self.exits_expected:
                # Its exit brings what its threads had started (tidegate.starts): the
                # task that ran it past its limit may be one whose report never left,
                # beside others that were reported.
                continue
            cause = classify(exitcode=e.exitcode, memory_kill=e.memory_kill, planned=e.planned,
                             unreachable=e.unreachable)
            out.append(WorkerLoss(worker, cause, e.exitcode, e.rss, e.processing, e.removed_at,
                                  _executing(e), recorded=e.started is not None))
            del self._pending[worker]
        return out


def _executing(e: _Pending) -> tuple[str, ...] | None:
    """The keys the worker was running as it went: of those still assigned to it, the
    ones whose start it reported or its start record names (a record's slot may name a
    task its thread finished: no longer assigned, so left out)."""
    if e.started is None:
        return e.executing
    seen = set(e.started).union(e.executing or ())
    return tuple(k for k in e.processing if k in seen)


@dataclass(frozen=True, slots=True)
class Verdict:
    quarantine: tuple[str, ...]  # poison: killed a worker while running alone
    isolate: tuple[str, ...]  # suspects: rerun alone to tell poison from bad company


@dataclass(slots=True)
class PoisonJudge:
    """Tells poison params (one simulation needs more than a worker's memory) from
    innocent ones that merely shared a worker killed for memory.

    A param run alone when a worker is killed for memory is poison. A param whose tasks
    were on ``strikes_to_isolate`` memory-killed workers is a suspect: the runner reruns
    it alone, where it either completes (innocent) or is caught alone (poison). Being
    the only param in flight is not enough: a cancelled task keeps running on its
    worker (a thread cannot be interrupted) and may be what kills it.
    Dask's KilledWorker is no verdict: it counts every task queued on the dying workers,
    not only the one running (dask/distributed#5234).
    """

    strikes_to_isolate: int = 2
    _strikes: dict[str, int] = field(default_factory=dict)

    def on_memory_kill(self, params: Sequence[str], *, alone: str | None = None) -> Verdict:
        """Record a memory kill of a worker that was running ``params``.

        ``alone`` is the param the runner ran alone on purpose (nothing else admitted,
        the workers calm since anything was cancelled), if any: killed while running
        alone, it is poison. Otherwise nothing is proved of any one param.
        """
        quarantine, isolate = [], []
        for pid in dict.fromkeys(params):
            n = self._strikes.get(pid, 0) + 1
            self._strikes[pid] = n
            if pid == alone:
                quarantine.append(pid)
            elif n >= self.strikes_to_isolate:
                isolate.append(pid)
        return Verdict(tuple(quarantine), tuple(isolate))

    def strikes(self, param_id: str) -> int:
        return self._strikes.get(param_id, 0)

    def forget(self, param_id: str) -> None:
        self._strikes.pop(param_id, None)


# --- what the run loop does about a memory kill -----------------------------------------

_MiB = 2**20


@dataclass(frozen=True, slots=True)
class Quarantine:
    """Record the param as failed with ``message``: it needs more than a worker holds."""

    param_id: str
    message: str


@dataclass(frozen=True, slots=True)
class Isolate:
    """Cancel the param and rerun it alone, to tell poison from bad company."""

    param_id: str
    strikes: int


MemoryAction = Quarantine | Isolate


@dataclass(slots=True)
class Isolation:
    """The poison-param policy around memory kills, as typed actions for the run loop.

    A cancelled task runs on until it ends (a thread cannot be interrupted), so a
    suspect runs alone only once no task of the job is executing on any worker and a
    memory snapshot since the last cancellation shows every worker calm: settled, below
    low water or back at its idle memory (``WorkerMemory.settled``; worker RSS reaches
    the scheduler on heartbeats, every 0.5-2 s).
    """

    judge: PoisonJudge = field(default_factory=PoisonJudge)
    heartbeat_s: float = 1.0
    _last_cancel_at: float = float("-inf")
    _last_calm_at: float = float("-inf")

    def cancelled(self, now: float) -> None:
        self._last_cancel_at = now

    def calm(self, now: float) -> None:
        """Every worker was settled (WorkerMemory.settled) in the snapshot taken at
        ``now``."""
        self._last_calm_at = now

    @property
    def calm_since_cancel(self) -> bool:
        """A memory snapshot since the last cancellation showed every worker calm."""
        return self._last_calm_at > self._last_cancel_at

    def solo_may_start(self, executing: int | None) -> bool:
        """Whether a suspect may run alone now. ``executing``: how many of the job's
        tasks the workers still execute (cancelled ones run on until their function
        returns), None if unknown. Known: none may run, and a memory snapshot taken since
        the last cancellation must show every worker calm. Unknown: the snapshot must be
        ``heartbeat_s`` younger than the cancellation, a guess that a loaded machine can
        defeat (a cancelled poison task still allocating killed the innocent suspect
        running "alone" beside it)."""
        if executing is None:
            return self._last_calm_at > self._last_cancel_at + self.heartbeat_s
        return executing == 0 and self.calm_since_cancel

    def suspect(self, param_id: str) -> bool:
        """On enough memory-killed workers to be isolated rather than retried."""
        return self.judge.strikes(param_id) >= self.judge.strikes_to_isolate

    def forget(self, param_id: str) -> None:
        self.judge.forget(param_id)

    def on_memory_kill(
        self, loss: WorkerLoss, running: Sequence[str], *, alone: str | None, limit: int
    ) -> list[MemoryAction]:
        """The actions for a worker killed for memory while running ``running`` (param
        ids); ``alone``: the suspect that ran alone on purpose, if any; ``limit``: the
        worker's memory limit (0 if unknown)."""
        verdict = self.judge.on_memory_kill(running, alone=alone)
        actions: list[MemoryAction] = [
            Quarantine(pid, self._poison_message(pid, loss, limit)) for pid in verdict.quarantine
        ]
        actions += [Isolate(pid, self.judge.strikes(pid)) for pid in verdict.isolate]
        return actions

    def _poison_message(self, pid: str, loss: WorkerLoss, limit: int) -> str:
        strikes = self.judge.strikes(pid)
        limit_text = f"{limit / _MiB:.0f} MiB" if limit else "unknown"
        rss_text = f"{loss.rss / _MiB:.0f} MiB" if loss.rss else "unknown"
        why = "while it ran alone" + (f" (after {strikes - 1} shared kills)" if strikes > 1 else "")
        return (
            f"param {pid} needs more memory than a worker's limit: worker {loss.worker} was "
            f"killed for memory ({loss.cause.value}) {why}; worker memory limit "
            f"{limit_text}, worker RSS at the kill {rss_text}. Give workers more memory or "
            f"make this simulation allocate less."
        )
