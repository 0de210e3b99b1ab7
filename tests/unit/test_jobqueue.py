"""The daemon's job queue on real SQLite files: ordering, transitions, durability,
recovery after a crash, readiness, and a state machine against a model."""

from __future__ import annotations

import shutil
import sqlite3
import tempfile
import threading
from pathlib import Path

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tidegate.cli import main
from tidegate.jobqueue import (
    QUEUE_SCHEMA,
    SCHEMA_VERSION,
    STATES,
    TERMINAL,
    JobExists,
    JobQueue,
    UnknownJob,
)
from tidegate.migrations import SchemaError, SchemaTooNew, migrate
from tidegate.states import JobState

# A queue the release before schema versions wrote (user_version 0): see its README.
JOBS_V1 = Path(__file__).parent.parent / "fixtures" / "jobs_v1.sqlite"
SPEC = {"model": "tidegate.workloads:synthetic", "parameters": {"grid": {"k": [1, 2]}}}


class Clock:
    """A clock the test advances by one second per reading."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


@pytest.fixture
def queue(tmp_path: Path):
    with JobQueue(tmp_path / "state" / "jobs.db", clock=Clock()) as q:
        yield q


def _submit(q: JobQueue, job_id: str, priority: int = 0):
    return q.submit(job_id, {**SPEC, "job_id": job_id}, f"/out/{job_id}", priority)


def _drain_order(q: JobQueue) -> list[str]:
    order = []
    while (job := q.next_runnable()) is not None:
        if job.state != "running":
            q.start(job.id)
        q.finish(job.id, "succeeded")
        order.append(job.id)
    return order


# --- ordering -------------------------------------------------------------------------


def test_queued_jobs_run_by_priority_then_submission_order(queue: JobQueue) -> None:
    """Higher priority first; among equal priorities, first submitted first."""
    for job_id, priority in [("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1)]:
        _submit(queue, job_id, priority)
    assert _drain_order(queue) == ["b", "d", "a", "c", "e"]


def test_jobs_to_resume_come_before_any_queued_job(queue: JobQueue) -> None:
    """An interrupted job resumes before a queued one of higher priority."""
    _submit(queue, "low", priority=0)
    queue.start("low")
    queue.finish("low", "interrupted")
    _submit(queue, "urgent", priority=100)
    assert queue.next_runnable().id == "low"
    assert _drain_order(queue) == ["low", "urgent"]


def test_a_running_job_is_the_next_runnable(queue: JobQueue) -> None:
    """A job recorded as running comes first of all, before an earlier interrupted one
    and a queued one of higher priority."""
    _submit(queue, "a")
    queue.start("a")
    queue.finish("a", "interrupted")
    _submit(queue, "b", priority=9)
    _submit(queue, "c")
    queue.start("c")
    job = queue.next_runnable()
    assert (job.id, job.state) == ("c", "running")


def test_resubmitted_job_goes_to_the_back(queue: JobQueue) -> None:
    """A rerun of a finished job is ordered by its new submission, not its first one."""
    _submit(queue, "a")
    queue.start("a")
    queue.finish("a", "failed", error="boom")
    _submit(queue, "b")
    _submit(queue, "a")
    assert _drain_order(queue) == ["b", "a"]


def test_empty_queue_has_nothing_runnable(queue: JobQueue) -> None:
    """No jobs, or only finished ones: next_runnable is None."""
    assert queue.next_runnable() is None
    _submit(queue, "a")
    queue.request_cancel("a")
    assert queue.next_runnable() is None


# --- transitions ----------------------------------------------------------------------


def test_submit_records_everything_as_given(queue: JobQueue) -> None:
    """A submission is queued with its spec, output, priority and submission time."""
    job = _submit(queue, "a", priority=3)
    assert job.as_dict() == {
        "id": "a", "state": "queued", "priority": 3, "spec": {**SPEC, "job_id": "a"},
        "output": "/out/a", "submitted_at": 1001.0, "started_at": None,
        "finished_at": None, "cancel_requested": False, "summary": None, "error": None,
    }
    assert queue.get("a") == job


def test_run_to_success_sets_times_and_summary(queue: JobQueue) -> None:
    """queued -> running -> succeeded stamps started_at and finished_at and keeps the
    summary."""
    _submit(queue, "a")
    started = queue.start("a")
    assert (started.state, started.started_at, started.finished_at) == ("running", 1002.0, None)
    done = queue.finish("a", "succeeded", summary={"params": {"ok": 2, "failed": 0}})
    assert (done.state, done.started_at, done.finished_at) == ("succeeded", 1002.0, 1003.0)
    assert done.summary == {"params": {"ok": 2, "failed": 0}}


@pytest.mark.parametrize("state", ["succeeded", "failed", "cancelled"])
def test_every_terminal_finish_sets_finished_at(queue: JobQueue, state: str) -> None:
    """running -> each terminal state records the finish time and the error text."""
    _submit(queue, "a")
    queue.start("a")
    job = queue.finish("a", state, error="why")
    assert (job.state, job.finished_at, job.error) == (state, 1003.0, "why")


def test_interrupted_job_restarts_with_a_clean_slate(queue: JobQueue) -> None:
    """running -> interrupted leaves finished_at unset; starting it again clears the last
    run's summary and error."""
    _submit(queue, "a")
    queue.start("a")
    cut = queue.finish("a", "interrupted", summary={"state": "interrupted"}, error="stopped")
    assert (cut.state, cut.finished_at) == ("interrupted", None)
    again = queue.start("a")
    assert (again.state, again.started_at, again.summary, again.error) == (
        "running", 1003.0, None, None)


@pytest.mark.parametrize("state", ["succeeded", "failed", "cancelled", "running"])
def test_start_needs_a_queued_or_interrupted_job(queue: JobQueue, state: str) -> None:
    """Starting a running or finished job is refused, naming the job, its state and the
    transition."""
    _submit(queue, "a")
    queue.start("a")
    if state != "running":
        queue.finish("a", state)
    with pytest.raises(ValueError, match=rf"cannot start job 'a': it is {state} "
                       r"\(needs queued or interrupted\)"):
        queue.start("a")


@pytest.mark.parametrize("end", ["succeeded", "cancelled", "interrupted"])
@pytest.mark.parametrize("state", ["queued", "interrupted", "succeeded", "failed"])
def test_finish_needs_a_running_job(queue: JobQueue, state: str, end: str) -> None:
    """Finishing a job that is not running is refused with the job, state and transition."""
    _submit(queue, "a")
    if state != "queued":
        queue.start("a")
        queue.finish("a", state)
    with pytest.raises(ValueError, match=rf"cannot finish as {end} job 'a': it is {state} "
                       r"\(needs running\)"):
        queue.finish("a", end)


@pytest.mark.parametrize("state", ["queued", "interrupted"])
def test_a_job_that_cannot_start_can_fail(queue: JobQueue, state: str) -> None:
    """queued | interrupted -> failed, for a job whose spec no longer passes the daemon's
    checks; a finished job cannot fail again."""
    _submit(queue, "a")
    if state == "interrupted":
        queue.start("a")
        queue.finish("a", "interrupted")
    job = queue.finish("a", "failed", error="code_paths[0]: outside security.code_roots")
    assert (job.state, job.error, job.finished_at is not None) == (
        "failed", "code_paths[0]: outside security.code_roots", True)
    with pytest.raises(ValueError, match=r"it is failed \(needs queued, running or interrupted\)"):
        queue.finish("a", "failed")


def test_finish_rejects_a_state_that_is_not_an_end(queue: JobQueue) -> None:
    """finish(..., 'queued') is refused naming what was expected."""
    _submit(queue, "a")
    queue.start("a")
    with pytest.raises(ValueError,
                       match=r"state: expected succeeded \| completed_with_failures \| failed"):
        queue.finish("a", "queued")
    assert queue.get("a").state == "running"


def test_only_one_job_runs_at_a_time(queue: JobQueue) -> None:
    """Starting a second job while one runs is refused, naming the running one."""
    _submit(queue, "a")
    _submit(queue, "b")
    queue.start("a")
    with pytest.raises(ValueError, match="job 'a' is running"):
        queue.start("b")
    assert queue.get("b").state == "queued"


def test_unknown_job_raises_unknown_job(queue: JobQueue) -> None:
    """Every operation on an id never submitted raises UnknownJob (a KeyError)."""
    for call in (queue.get, queue.start, queue.request_cancel,
                 lambda j: queue.finish(j, "failed")):
        with pytest.raises(UnknownJob, match="no job 'ghost'"):
            call("ghost")
    assert issubclass(UnknownJob, KeyError)


# --- cancel ---------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["queued", "interrupted"])
def test_cancel_of_a_waiting_job_is_immediate(queue: JobQueue, state: str) -> None:
    """A queued or interrupted job is cancelled at once and never runs."""
    _submit(queue, "a")
    if state == "interrupted":
        queue.start("a")
        queue.finish("a", "interrupted")
    job = queue.request_cancel("a")
    finished_at = 1003.0 if state == "interrupted" else 1002.0
    assert (job.state, job.cancel_requested, job.finished_at) == ("cancelled", True, finished_at)
    assert queue.next_runnable() is None


def test_cancel_of_a_running_job_is_a_request(queue: JobQueue) -> None:
    """A running job stays running with cancel_requested until the service finishes it."""
    _submit(queue, "a")
    queue.start("a")
    job = queue.request_cancel("a")
    assert (job.state, job.cancel_requested) == ("running", True)
    assert queue.finish("a", "cancelled").state == "cancelled"


def test_cancel_requested_job_cut_off_by_shutdown_is_not_resumed(queue: JobQueue) -> None:
    """A running job whose cancel was requested ends cancelled even if the daemon stops it
    as interrupted: the user's cancel wins over a resume."""
    _submit(queue, "a")
    queue.start("a")
    queue.request_cancel("a")
    assert queue.finish("a", "interrupted").state == "cancelled"
    assert queue.next_runnable() is None


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_cancel_of_a_finished_job_changes_nothing(queue: JobQueue, state: str) -> None:
    """Cancelling a finished job returns it unchanged."""
    _submit(queue, "a")
    queue.start("a")
    before = queue.finish("a", state)
    assert queue.request_cancel("a") == before


# --- submit and resubmit ----------------------------------------------------------------


@pytest.mark.parametrize("state", ["queued", "running", "interrupted"])
def test_duplicate_submit_of_an_unfinished_job_raises(queue: JobQueue, state: str) -> None:
    """Submitting an id that is queued, running or interrupted raises JobExists and
    leaves the job as it was."""
    _submit(queue, "a", priority=1)
    if state != "queued":
        queue.start("a")
    if state == "interrupted":
        queue.finish("a", "interrupted")
    before = queue.get("a")
    with pytest.raises(JobExists, match=f"job 'a' is already {state}"):
        _submit(queue, "a", priority=7)
    assert queue.get("a") == before


@pytest.mark.parametrize("state", sorted(TERMINAL))
def test_resubmit_of_a_finished_job_replaces_it(queue: JobQueue, state: str) -> None:
    """A finished job's id can be submitted again: the new record replaces the old one."""
    _submit(queue, "a")
    queue.start("a")
    queue.request_cancel("a")
    queue.finish("a", state, summary={"old": True}, error="old")
    job = queue.submit("a", {"new": True}, "/elsewhere", priority=4)
    assert (job.state, job.spec, job.output, job.priority) == (
        "queued", {"new": True}, "/elsewhere", 4)
    assert (job.started_at, job.finished_at, job.summary, job.error, job.cancel_requested) == (
        None, None, None, None, False)
    assert [j.id for j in queue.list()] == ["a"]


def test_submit_rejects_a_priority_that_is_not_an_int(queue: JobQueue) -> None:
    """priority must be a whole number; True is not one."""
    for bad in (True, 1.5, "3"):
        with pytest.raises(ValueError, match="priority: expected a whole number"):
            queue.submit("a", SPEC, "/out", priority=bad)  # type: ignore[arg-type]


# --- listing and counts ---------------------------------------------------------------


def test_list_is_newest_first_and_filters_by_state(queue: JobQueue) -> None:
    """list() returns the newest submission first, filtered by state and limited."""
    for job_id in "abcd":
        _submit(queue, job_id)
    queue.start("b")
    assert [j.id for j in queue.list()] == ["d", "c", "b", "a"]
    assert [j.id for j in queue.list(state="queued")] == ["d", "c", "a"]
    assert [j.id for j in queue.list(limit=2)] == ["d", "c"]
    assert queue.list(state="failed") == []
    with pytest.raises(ValueError, match=r"state: expected queued \| running"):
        queue.list(state="done")


def test_counts_include_every_state_with_zeros(queue: JobQueue) -> None:
    """counts() names every state, zeros included."""
    assert queue.counts() == dict.fromkeys(STATES, 0)
    _submit(queue, "a")
    _submit(queue, "b")
    _submit(queue, "c")
    queue.start("a")
    queue.request_cancel("c")
    assert queue.counts() == {"queued": 1, "running": 1, "succeeded": 0,
                              "completed_with_failures": 0, "failed": 0,
                              "cancelled": 1, "interrupted": 0}


# --- durability and recovery ----------------------------------------------------------


def test_jobs_survive_close_and_reopen(tmp_path: Path) -> None:
    """Everything recorded is there after the queue is closed and opened again."""
    path = tmp_path / "jobs.db"
    with JobQueue(path, clock=Clock()) as q:
        _submit(q, "a", priority=2)
        _submit(q, "b")
        q.start("b")
        q.finish("b", "succeeded", summary={"x": [1, 2.5, None]})
        before = q.list()
    with JobQueue(path) as q:
        assert q.list() == before
        assert q.next_runnable().id == "a"
    assert sqlite3.connect(path).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_recover_marks_running_jobs_interrupted(tmp_path: Path) -> None:
    """A job left running by a crashed daemon is interrupted after recover() and resumes
    first; recover() returns its id."""
    path = tmp_path / "jobs.db"
    crashed = JobQueue(path, clock=Clock())
    _submit(crashed, "a")
    _submit(crashed, "b", priority=10)
    crashed.start("a")
    crashed.close()  # the daemon died; nothing else is recorded
    with JobQueue(path) as q:
        assert q.recover() == ["a"]
        assert q.get("a").state == "interrupted"
        assert q.recover() == []
        assert _drain_order(q) == ["a", "b"]


def test_recover_cancels_a_job_whose_cancel_was_pending(queue: JobQueue) -> None:
    """A running job with a cancel requested when the daemon died ends cancelled."""
    _submit(queue, "a")
    queue.start("a")
    queue.request_cancel("a")
    assert queue.recover() == []
    job = queue.get("a")
    assert (job.state, job.finished_at) == ("cancelled", 1003.0)


def test_schema_version_is_recorded_and_checked(tmp_path: Path) -> None:
    """The database records its schema version; a newer version refuses to open."""
    path = tmp_path / "jobs.db"
    JobQueue(path).close()
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    meta = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    assert meta == (str(SCHEMA_VERSION),)
    db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 98}")
    db.close()
    for readonly in (False, True):
        with pytest.raises(SchemaTooNew, match=f"job queue schema version {SCHEMA_VERSION + 98} "
                                               f"is newer .* \\(newest {SCHEMA_VERSION}\\)"):
            JobQueue(path, readonly=readonly)


def test_unversioned_queue_with_a_newer_meta_row_is_refused(tmp_path: Path) -> None:
    """Before user_version, meta.schema_version was the version: 99 there is refused."""
    path = shutil.copy(JOBS_V1, tmp_path / "jobs.sqlite")
    with sqlite3.connect(path) as db:
        db.execute("UPDATE meta SET value='99' WHERE key='schema_version'")
    with pytest.raises(SchemaTooNew, match="schema version 99 is newer"):
        JobQueue(path)


def test_queue_of_the_unversioned_release_opens_and_works(tmp_path: Path) -> None:
    """The fixture's jobs.sqlite (user_version 0) is version 1: a read-only open asks for
    its migration and leaves it alone; a writable one migrates it (version 3, each job
    without retry_failed or prune, the state completed_with_failures allowed), its
    jobs read, new ones queue."""
    path = Path(shutil.copy(JOBS_V1, tmp_path / "jobs.sqlite"))
    before = path.read_bytes()
    with pytest.raises(SchemaError, match="schema version 1 needs migrating to 4"):
        JobQueue(path, readonly=True)
    assert path.read_bytes() == before
    with JobQueue(path, clock=Clock()) as q:
        # Opened writable it is migrated to the newest version.
        assert q.schema_version == SCHEMA_VERSION == 4
        done = q.get("done")
        assert (done.summary, done.finished_at) == ({"state": "succeeded"}, 102.0)
        assert not done.retry_failed and not done.prune
        nxt = q.next_runnable()
        assert nxt is not None and (nxt.id, nxt.priority) == ("waiting", 5)
        _submit(q, "new")
        assert q.counts()["queued"] == 2
        q.start("waiting")
        q.finish("waiting", JobState.COMPLETED_WITH_FAILURES, summary={"failed": 1})
        assert q.get("waiting").state == "completed_with_failures"
        assert q.counts()["completed_with_failures"] == 1
        # The submission order survived the table's rebuild: new jobs come after.
        assert [j.id for j in q.list()] == ["new", "waiting", "done"]
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (4,)
        assert db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone() == (
            "4",)
        indexes = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='index'")}
        assert {"jobs_by_state", "one_running"} <= indexes
    with JobQueue(path, readonly=True) as ro:
        assert ro.schema_version == 4
        jobs = [(j.id, j.state) for j in ro.list()]
        assert jobs == [("new", "queued"), ("waiting", "completed_with_failures"),
                        ("done", "succeeded")]


@pytest.mark.parametrize("readonly", [False, True])
def test_queue_file_that_is_not_sqlite_is_refused(tmp_path: Path, readonly: bool) -> None:
    """Garbage at the queue's path raises SchemaError naming the file; it is left alone."""
    path = tmp_path / "jobs.sqlite"
    path.write_bytes(b"\x7fELF not a database" * 100)
    with pytest.raises(SchemaError) as err:
        JobQueue(path, readonly=readonly)
    assert str(err.value).startswith(f"{path}: not a SQLite database")
    assert "expected a tidegate job queue" in str(err.value)
    assert path.read_bytes() == b"\x7fELF not a database" * 100
    assert [p.name for p in tmp_path.iterdir()] == ["jobs.sqlite"]


def test_sqlite_file_without_queue_tables_is_refused(tmp_path: Path) -> None:
    """A SQLite file of another program at the queue's path is not taken for a queue."""
    path = tmp_path / "jobs.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE jobs (name TEXT)")
    with pytest.raises(SchemaError, match="not a tidegate job queue: expected tables jobs, meta, "
                                          "found jobs"):
        JobQueue(path)


def test_version_1_schema_allows_exactly_the_states(queue: JobQueue) -> None:
    """The CHECK frozen in version 1 lists STATES: a new state needs a migration."""
    db = sqlite3.connect(queue.path)
    insert = ("INSERT INTO jobs (id, state, priority, spec, output, submitted_at) "
              "VALUES (?, ?, 0, '{}', '/o', 0)")
    with db:
        for state in STATES:
            db.execute(insert, (state, state))
    with pytest.raises(sqlite3.IntegrityError, match="CHECK"), db:
        db.execute(insert, ("x", "paused"))
    db.close()


def test_serve_with_a_garbage_queue_exits_3(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`tidegate serve` whose jobs.sqlite is garbage fails start-up (exit 3), naming it."""
    state = tmp_path / "state"
    state.mkdir()
    (state / "jobs.sqlite").write_text("hello\n" * 100)
    code = main(["serve", "--state-dir", str(state), "--output-root", str(tmp_path / "out"),
                 "--listen", "127.0.0.1:0"])
    err = capsys.readouterr().err
    assert code == 3, err
    assert f"{state / 'jobs.sqlite'}: not a SQLite database" in err
    assert "expected a tidegate job queue" in err


def test_threads_share_one_queue(queue: JobQueue) -> None:
    """Submissions from several threads at once are all recorded (one connection, locked)."""
    def submit_many(prefix: str) -> None:
        for i in range(20):
            _submit(queue, f"{prefix}{i}")

    threads = [threading.Thread(target=submit_many, args=(f"t{n}-",)) for n in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert queue.counts()["queued"] == 120


# --- readiness ------------------------------------------------------------------------


def test_writable_is_true_on_a_healthy_database(queue: JobQueue) -> None:
    """writable() commits a heartbeat on a normal database."""
    assert queue.writable() is True
    assert queue.writable() is True


def test_writable_is_false_on_a_read_only_database(tmp_path: Path) -> None:
    """Opened read-only (mode=ro: unlike chmod, this holds for root too), the queue still
    reads but writable() is False and writes fail."""
    path = tmp_path / "jobs.db"
    with JobQueue(path) as rw:
        _submit(rw, "a")
        with JobQueue(path, readonly=True) as ro:
            assert ro.get("a").state == "queued"
            assert ro.writable() is False
            with pytest.raises(sqlite3.OperationalError, match="readonly"):
                _submit(ro, "b")
            assert ro.writable() is False
            assert rw.writable() is True


def test_writable_is_false_while_another_connection_holds_the_write_lock(
    tmp_path: Path,
) -> None:
    """A database locked by another writer past busy_timeout is not writable; it is again
    once the lock is released."""
    path = tmp_path / "jobs.db"
    with JobQueue(path, busy_timeout_s=0.05) as q:
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")
        try:
            assert q.writable() is False
            assert q.counts()["queued"] == 0  # reads go on beside a writer in WAL mode
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert q.writable() is True


def test_writable_is_false_once_closed(tmp_path: Path) -> None:
    """A closed queue reports not writable instead of raising."""
    q = JobQueue(tmp_path / "jobs.db")
    q.close()
    assert q.writable() is False


# --- random sequences -----------------------------------------------------------------

IDS = st.sampled_from(["a", "b", "c", "d"])


class QueueMachine(RuleBasedStateMachine):
    """Random submit/start/finish/cancel/recover/reopen against a model of the states."""

    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="tidegate-queue-"))
        self.path = self.dir / "jobs.db"
        self.q = JobQueue(self.path)
        self.model: dict[str, str] = {}

    def teardown(self) -> None:
        self.q.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(job_id=IDS, priority=st.integers(-2, 2))
    def submit(self, job_id: str, priority: int) -> None:
        if self.model.get(job_id, "succeeded") not in TERMINAL:
            with pytest.raises(JobExists):
                self.q.submit(job_id, SPEC, f"/out/{job_id}", priority)
            return
        assert self.q.submit(job_id, SPEC, f"/out/{job_id}", priority).state == "queued"
        self.model[job_id] = "queued"

    @rule(job_id=IDS)
    def start(self, job_id: str) -> None:
        ok = self.model.get(job_id) in ("queued", "interrupted") and (
            "running" not in self.model.values())
        if job_id not in self.model:
            with pytest.raises(UnknownJob):
                self.q.start(job_id)
        elif not ok:
            with pytest.raises(ValueError):
                self.q.start(job_id)
        else:
            self.q.start(job_id)
            self.model[job_id] = "running"

    @rule()
    def start_next(self) -> None:
        job = self.q.next_runnable()
        if job is not None and job.state != "running":
            self.q.start(job.id)
            self.model[job.id] = "running"

    @rule(job_id=IDS, state=st.sampled_from(["succeeded", "failed", "cancelled",
                                               "interrupted"]))
    def finish(self, job_id: str, state: str) -> None:
        allowed = ("running", "queued", "interrupted") if state == "failed" else ("running",)
        if self.model.get(job_id) not in allowed:
            with pytest.raises((ValueError, UnknownJob)):
                self.q.finish(job_id, state)
            return
        self.model[job_id] = self.q.finish(job_id, state).state

    @rule(job_id=IDS)
    def cancel(self, job_id: str) -> None:
        if job_id not in self.model:
            return
        job = self.q.request_cancel(job_id)
        if self.model[job_id] in ("queued", "interrupted"):
            self.model[job_id] = "cancelled"
        assert job.state == self.model[job_id]

    @rule()
    def crash_and_recover(self) -> None:
        self.q.close()
        self.q = JobQueue(self.path)
        recovered = set(self.q.recover())
        for job_id, state in self.model.items():
            if state == "running":
                self.model[job_id] = self.q.get(job_id).state
                assert (job_id in recovered) == (self.model[job_id] == "interrupted")

    @invariant()
    def at_most_one_running(self) -> None:
        assert self.q.counts()["running"] <= 1

    @invariant()
    def next_runnable_is_never_finished(self) -> None:
        job = self.q.next_runnable()
        assert job is None or job.state not in TERMINAL
        assert (job is None) == all(s in TERMINAL for s in self.model.values())

    @invariant()
    def states_match_the_model(self) -> None:
        assert {j.id: j.state for j in self.q.list()} == self.model


QueueMachine.TestCase.settings = settings(
    max_examples=60, stateful_step_count=25, deadline=None
)
test_random_sequences_keep_the_queue_consistent = QueueMachine.TestCase


def test_a_version_2_queue_keeps_retry_failed_and_gains_prune(tmp_path: Path) -> None:
    """A queue at version 2 (retry_failed, no prune column) is migrated to the newest: its jobs
    keep their retry_failed, none prunes; a job queued with prune reads back with it, in
    its record and its dict, and one queued without has no prune key."""
    path = Path(shutil.copy(JOBS_V1, tmp_path / "jobs.sqlite"))
    db = sqlite3.connect(path, isolation_level=None)
    assert migrate(db, QUEUE_SCHEMA, path, target=2) == 2
    db.execute("UPDATE jobs SET retry_failed = 1 WHERE id = 'done'")
    db.close()
    with JobQueue(path, clock=Clock()) as q:
        assert q.schema_version == SCHEMA_VERSION == 4
        done = q.get("done")
        assert done.retry_failed and not done.prune
        pruned = q.submit("p", {**SPEC, "job_id": "p"}, "/out/p", prune=True)
        assert pruned.prune and not pruned.retry_failed
        assert pruned.as_dict()["prune"] is True and "retry_failed" not in pruned.as_dict()
        assert "prune" not in _submit(q, "plain").as_dict()
    with JobQueue(path, readonly=True) as ro:
        assert ro.get("p").prune and not ro.get("plain").prune
