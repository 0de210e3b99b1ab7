"""The daemon's durable job queue: one SQLite (WAL) database in its state_dir.

A job moves ``queued -> running -> succeeded | failed | cancelled``, or to
``interrupted`` when the daemon stops mid-job; an interrupted job is resumed before
anything queued (tidegate picks it up from its ledger). The queue records and orders;
the service decides when to run and enforces one job at a time, and the queue refuses
a second ``running`` job as a backstop.
"""

from __future__ import annotations

import builtins
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path, PurePath
from typing import Any

from tidegate.errors import TidegateError
from tidegate.migrations import Migration, Schema, check_current, migrate
from tidegate.states import FINISH_STATES, STARTABLE, TERMINAL, JobState

STATES = tuple(JobState)

# Version 1 is the schema of the releases that recorded no user_version; never edit it,
# add a migration (a new state needs one: the CHECK below lists the states of version 1).
_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,  -- submission order, never reused
    id               TEXT    NOT NULL UNIQUE,
    state            TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'succeeded',
                                                  'failed', 'cancelled', 'interrupted')),
    priority         INTEGER NOT NULL,
    spec             TEXT    NOT NULL,   -- JSON
    output           TEXT    NOT NULL,
    submitted_at     REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    summary          TEXT,               -- JSON
    error            TEXT
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, priority, seq);
-- At most one running job, whatever the service does.
CREATE UNIQUE INDEX IF NOT EXISTS one_running ON jobs (state) WHERE state = 'running';
"""

# Version 2: whether a job's run first un-commits its failed params (retry_failed).
_V2 = """
ALTER TABLE jobs ADD COLUMN retry_failed INTEGER NOT NULL DEFAULT 0;
"""

# Version 3: the state completed_with_failures. SQLite cannot change a CHECK in place, so
# the table is rebuilt under its own name, rows, sequence and indexes kept.
_V3 = """
CREATE TABLE jobs_v3 (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    id               TEXT    NOT NULL UNIQUE,
    state            TEXT    NOT NULL CHECK (state IN ('queued', 'running', 'succeeded',
                                                  'completed_with_failures', 'failed',
                                                  'cancelled', 'interrupted')),
    priority         INTEGER NOT NULL,
    spec             TEXT    NOT NULL,
    output           TEXT    NOT NULL,
    submitted_at     REAL    NOT NULL,
    started_at       REAL,
    finished_at      REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    retry_failed     INTEGER NOT NULL DEFAULT 0,
    summary          TEXT,
    error            TEXT
);
INSERT INTO jobs_v3 (seq, id, state, priority, spec, output, submitted_at, started_at,
                     finished_at, cancel_requested, retry_failed, summary, error)
    SELECT seq, id, state, priority, spec, output, submitted_at, started_at, finished_at,
           cancel_requested, retry_failed, summary, error FROM jobs;
DROP TABLE jobs;
ALTER TABLE jobs_v3 RENAME TO jobs;
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, priority, seq);
CREATE UNIQUE INDEX IF NOT EXISTS one_running ON jobs (state) WHERE state = 'running';
"""

# Version 4: whether a job's run ends by pruning its orphaned params (prune).
_V4 = """
ALTER TABLE jobs ADD COLUMN prune INTEGER NOT NULL DEFAULT 0;
"""

QUEUE_SCHEMA = Schema(
    what="tidegate job queue",
    migrations=(
        Migration(1, "meta and jobs tables, one running job at most", _V1),
        Migration(2, "a job's retry_failed option", _V2),
        Migration(3, "the job state completed_with_failures", _V3),
        Migration(4, "a job's prune option", _V4),
    ),
    legacy={
        "meta": frozenset({"key", "value"}),
        "jobs": frozenset({
            "seq", "id", "state", "priority", "spec", "output", "submitted_at", "started_at",
            "finished_at", "cancel_requested", "summary", "error",
        }),
    },
    remedy="move it aside to start with an empty queue",
)
SCHEMA_VERSION = QUEUE_SCHEMA.newest

_COLUMNS = (
    "id, state, priority, spec, output, submitted_at, started_at, finished_at, "
    "cancel_requested, summary, error, retry_failed, prune"
)


@dataclass(frozen=True, slots=True)
class JobRecord:
    id: str
    state: JobState
    priority: int
    spec: dict[str, Any]  # as submitted, already validated by the caller
    output: str  # absolute output directory
    submitted_at: float
    started_at: float | None
    finished_at: float | None
    cancel_requested: bool
    summary: dict[str, Any] | None  # RunSummary.as_dict() of the last run, when done
    error: str | None  # job-level error text (param errors live in the summary)
    retry_failed: bool = False  # its runs first un-commit its failed params, to rerun them
    prune: bool = False  # its runs end by dropping the orphaned params from the output

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if not self.retry_failed:  # the shape of jobs submitted without it is kept
            del data["retry_failed"]
        if not self.prune:
            del data["prune"]
        return data

    @classmethod
    def _from_row(cls, row: tuple[Any, ...]) -> JobRecord:
        (job_id, state, priority, spec, output, submitted, started, finished, cancel,
         summary, error, retry_failed, prune) = row
        return cls(
            id=job_id, state=JobState(state), priority=int(priority), spec=json.loads(spec),
            output=output, submitted_at=submitted, started_at=started, finished_at=finished,
            cancel_requested=bool(cancel),
            summary=None if summary is None else json.loads(summary), error=error,
            retry_failed=bool(retry_failed), prune=bool(prune),
        )


class JobExists(TidegateError):
    """A job with this id is already queued, running or interrupted."""

    def __init__(self, job_id: str, state: JobState):
        self.job_id = job_id
        self.state = state
        super().__init__(
            f"job {job_id!r} is already {state}; cancel it first or submit with another job_id"
        )


class OutputInUse(TidegateError):
    """A job's output directory is, contains or lies inside another job's output."""

    def __init__(self, output: str, other: str, how: str):
        self.output = output
        self.other = other
        super().__init__(f"output {output} {how} {other}; give the job an output of its own")


def outputs_overlap(a: str | PurePath, b: str | PurePath) -> bool:
    """Whether two absolute output directories are the same or one is inside the other."""
    a, b = PurePath(a), PurePath(b)
    return a == b or a.is_relative_to(b) or b.is_relative_to(a)


def _overlap_text(output: PurePath, other: PurePath) -> str:
    if output == other:
        return "is the output of"
    return "is inside the output of" if output.is_relative_to(other) else "contains the output of"


class UnknownJob(TidegateError, KeyError):
    """No job with this id."""

    def __init__(self, job_id: str):
        self.job_id = job_id
        super().__init__(job_id)

    def __str__(self) -> str:
        return f"no job {self.job_id!r}"


class JobQueue:
    """The job queue stored at ``path``; safe to share between threads.

    ``readonly`` opens the database with ``mode=ro`` (reads work, writes raise
    sqlite3.OperationalError and :meth:`writable` is False).
    """

    def __init__(
        self,
        path: Path,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout_s: float = 5.0,
        readonly: bool = False,
    ):
        if busy_timeout_s < 0:
            raise ValueError(f"busy_timeout_s: expected a number >= 0, got {busy_timeout_s!r}")
        self.path = Path(path)
        self._clock = clock
        # One connection shared by threads: the lock keeps one thread's statements out of
        # another's transaction, which check_same_thread=False alone does not.
        self._lock = threading.RLock()
        if readonly:
            self._db = sqlite3.connect(
                f"{self.path.resolve().as_uri()}?mode=ro", uri=True,
                isolation_level=None, check_same_thread=False,
            )
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        try:
            self._setup(busy_timeout_s, readonly)
        except BaseException:
            self._db.close()
            raise

    def _setup(self, busy_timeout_s: float, readonly: bool) -> None:
        self._db.execute(f"PRAGMA busy_timeout={int(busy_timeout_s * 1000)}")
        # Versions first: a file that is not a job queue is refused before anything,
        # even the switch to WAL, writes to it.
        if readonly:
            self.schema_version = check_current(self._db, QUEUE_SCHEMA, self.path)
        else:
            self.schema_version = migrate(self._db, QUEUE_SCHEMA, self.path)
        self._db.execute("PRAGMA journal_mode=WAL")
        # FULL: an accepted submission survives power loss, not just a crash.
        self._db.execute("PRAGMA synchronous=FULL")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> JobQueue:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- reading --------------------------------------------------------------------

    def get(self, job_id: str) -> JobRecord:
        with self._lock:
            return self._get(job_id)

    def list(self, state: JobState | str | None = None, limit: int = 200) -> list[JobRecord]:
        """Jobs, newest submission first, optionally only those in ``state``."""
        if state is not None:
            _check_state(state, STATES, "state")
        if limit < 1:
            raise ValueError(f"limit: expected a whole number >= 1, got {limit!r}")
        where, args = ("WHERE state = ?", (state,)) if state is not None else ("", ())
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs {where} ORDER BY seq DESC LIMIT ?", (*args, limit)
            ).fetchall()
        return [JobRecord._from_row(r) for r in rows]

    def next_runnable(self) -> JobRecord | None:
        """The job that should run now: a job to resume first, then the queued one of
        highest priority, earliest submitted among equals.

        A job recorded as running comes before everything: it is the one running (the
        service's own), or one a crash cut off, before :meth:`recover` marks it
        interrupted. Interrupted jobs follow, by priority and submission order.
        """
        with self._lock:
            row = self._db.execute(
                f"SELECT {_COLUMNS} FROM jobs "
                "WHERE state IN ('running', 'interrupted', 'queued') "
                "ORDER BY CASE state WHEN 'running' THEN 0 WHEN 'interrupted' THEN 1 ELSE 2 END, "
                "priority DESC, seq LIMIT 1"
            ).fetchone()
        return None if row is None else JobRecord._from_row(row)

    def counts(self) -> dict[JobState, int]:
        """Jobs per state; every state present, zeros included."""
        out = dict.fromkeys(STATES, 0)
        with self._lock:
            for state, n in self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state"):
                out[JobState(state)] = int(n)
        return out

    def writable(self) -> bool:
        """Whether a write transaction commits now (for /readyz): a heartbeat upsert."""
        try:
            with self._lock, self._transaction():
                self._db.execute(
                    "INSERT OR REPLACE INTO meta VALUES ('heartbeat', ?)", (repr(self._clock()),)
                )
        except sqlite3.Error:
            return False
        return True

    # --- writing --------------------------------------------------------------------

    def submit(
        self, job_id: str, spec: dict[str, Any], output: str, priority: int = 0,
        guard: Callable[[], None] | None = None, retry_failed: bool = False,
        prune: bool = False,
    ) -> JobRecord:
        """Queue a job. A finished job with the same id is replaced (a rerun, which
        tidegate resumes from its ledger; with ``retry_failed`` its failed params run
        again); an unfinished one raises JobExists. An output that overlaps another
        job's (any state) raises OutputInUse. ``guard`` runs inside the same transaction
        (the caller's check of the file system)."""
        if isinstance(priority, bool) or not isinstance(priority, int):
            raise ValueError(f"priority: expected a whole number, got {priority!r}")
        spec_json = json.dumps(spec)
        with self._lock, self._transaction():
            old = self._state(job_id)
            if old is not None and old not in TERMINAL:
                raise JobExists(job_id, old)
            self._check_output_free(job_id, output)
            if guard is not None:
                guard()
            self._db.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
            self._db.execute(
                "INSERT INTO jobs (id, state, priority, spec, output, submitted_at, "
                "retry_failed, prune) VALUES (?, 'queued', ?, ?, ?, ?, ?, ?)",
                (job_id, priority, spec_json, output, self._clock(), int(retry_failed),
                 int(prune)),
            )
            return self._get(job_id)

    def _check_output_free(self, job_id: str, output: str) -> None:
        mine = PurePath(output)
        rows = self._db.execute("SELECT id, output FROM jobs WHERE id != ?", (job_id,))
        for other_id, other in rows:
            if outputs_overlap(mine, other):
                how = _overlap_text(mine, PurePath(other))
                raise OutputInUse(output, f"job {other_id!r} ({other})", how)

    def start(self, job_id: str) -> JobRecord:
        """queued | interrupted -> running. Refused while another job is running."""
        with self._lock, self._transaction():
            state = self._require(job_id)
            if state not in STARTABLE:
                raise _invalid(job_id, state, "start", STARTABLE)
            running = self._db.execute("SELECT id FROM jobs WHERE state = 'running'").fetchone()
            if running is not None:
                raise ValueError(
                    f"cannot start job {job_id!r} ({state}): job {running[0]!r} is running"
                )
            self._db.execute(
                "UPDATE jobs SET state = 'running', started_at = ?, finished_at = NULL, "
                "summary = NULL, error = NULL WHERE id = ?",
                (self._clock(), job_id),
            )
            return self._get(job_id)

    def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        summary: dict[str, Any] | None = None,
        error: str | None = None,
    ) -> JobRecord:
        """running -> succeeded | failed | cancelled | interrupted; also queued |
        interrupted -> failed, for a job that cannot even start (its spec no longer
        passes the daemon's checks).

        A job whose cancel was requested and that stops as ``interrupted`` (the daemon
        shut down before it stopped) is recorded as cancelled: it is not to be resumed.
        """
        _check_state(state, FINISH_STATES, "state")
        summary_json = None if summary is None else json.dumps(summary)
        with self._lock, self._transaction():
            current = self._require(job_id)
            allowed = ({JobState.RUNNING, *STARTABLE} if state == JobState.FAILED
                       else {JobState.RUNNING})
            if current not in allowed:
                raise _invalid(job_id, current, f"finish as {state}", allowed)
            (cancel,) = self._db.execute(
                "SELECT cancel_requested FROM jobs WHERE id = ?", (job_id,)
            ).fetchone()
            if state == JobState.INTERRUPTED and cancel:
                state = JobState.CANCELLED
            self._db.execute(
                "UPDATE jobs SET state = ?, finished_at = ?, summary = ?, error = ? WHERE id = ?",
                (state, self._clock() if state in TERMINAL else None, summary_json, error,
                 job_id),
            )
            return self._get(job_id)

    def request_cancel(self, job_id: str) -> JobRecord:
        """queued | interrupted -> cancelled now; running -> cancel_requested (the service
        stops it and finishes it as cancelled); a finished job is left as it is."""
        with self._lock, self._transaction():
            state = self._require(job_id)
            if state in STARTABLE:
                self._db.execute(
                    "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, "
                    "finished_at = ? WHERE id = ?",
                    (self._clock(), job_id),
                )
            elif state == JobState.RUNNING:
                self._db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            return self._get(job_id)

    def recover(self) -> builtins.list[str]:  # `list` here is the method above
        """At daemon start: a job still marked running was cut off by a crash; mark it
        interrupted so that it resumes first (cancelled, if its cancel was requested).
        Returns the ids marked interrupted."""
        with self._lock, self._transaction():
            rows = self._db.execute(
                "SELECT id, cancel_requested FROM jobs WHERE state = 'running'"
            ).fetchall()
            self._db.execute(
                "UPDATE jobs SET state = 'cancelled', finished_at = ? "
                "WHERE state = 'running' AND cancel_requested",
                (self._clock(),),
            )
            self._db.execute("UPDATE jobs SET state = 'interrupted' WHERE state = 'running'")
        return [job_id for job_id, cancel in rows if not cancel]

    # --- helpers --------------------------------------------------------------------

    def _get(self, job_id: str) -> JobRecord:
        row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UnknownJob(job_id)
        return JobRecord._from_row(row)

    def _state(self, job_id: str) -> JobState | None:
        row = self._db.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return None if row is None else JobState(row[0])

    def _require(self, job_id: str) -> JobState:
        state = self._state(job_id)
        if state is None:
            raise UnknownJob(job_id)
        return state

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield
            self._db.execute("COMMIT")
        except BaseException:
            # A failed COMMIT (disk full, read-only) leaves the transaction open.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise


def _check_state(state: str, allowed: frozenset[str] | tuple[str, ...], field: str) -> None:
    if state not in allowed:
        expected = " | ".join(s for s in STATES if s in allowed)
        raise ValueError(f"{field}: expected {expected}, got {state!r}")


def _invalid(
    job_id: str, state: str, transition: str, allowed: AbstractSet[str]
) -> ValueError:
    names = [s for s in STATES if s in allowed]
    need = " or ".join([", ".join(names[:-1]), names[-1]] if len(names) > 1 else names)
    return ValueError(f"cannot {transition} job {job_id!r}: it is {state} (needs {need})")
