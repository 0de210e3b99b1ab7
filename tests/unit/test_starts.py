"""The start record a worker's threads write and its nanny reads after the worker dies
(tidegate.starts), on real files."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from tidegate import starts
from tidegate.starts import (
    MAX_SLOTS,
    SLOT_BYTES,
    StartRecord,
    record_path,
    take_started,
)


def test_each_thread_keeps_the_key_it_started_last(tmp_path: Path) -> None:
    """Each thread's slot holds its latest start; the reader gets one key per thread,
    deletes the record, and finds nothing the second time."""
    path = record_path("tcp://127.0.0.1:40001", str(tmp_path))
    record = StartRecord(path)
    assert record.active
    record.started("sim-a")
    record.started("sim-b")  # the same thread: overwrites
    go = threading.Barrier(3)

    def run(key: str) -> None:
        go.wait()
        record.started(key)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("sim-c", "sim-d")]
    for t in threads:
        t.start()
    go.wait()
    for t in threads:
        t.join()
    assert sorted(take_started(path) or []) == ["sim-b", "sim-c", "sim-d"]
    assert not path.exists() and take_started(path) is None
    record.close()


def test_a_new_process_at_the_same_address_starts_empty(tmp_path: Path) -> None:
    """A worker that takes the address of one that died leaves none of its keys."""
    path = record_path("tcp://127.0.0.1:40002", str(tmp_path))
    old = StartRecord(path)
    threads = [threading.Thread(target=old.started, args=(f"old-{i}",)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    old.close(remove=False)
    new = StartRecord(path)
    new.started("new")
    assert take_started(path) == ["new"]
    new.close()


def test_addresses_have_records_of_their_own(tmp_path: Path) -> None:
    a = record_path("tcp://10.0.0.2:40000", str(tmp_path))
    b = record_path("tcp://10.0.0.3:40000", str(tmp_path))
    assert a != b and a.parent == b.parent


def test_the_record_directory_is_private_and_never_a_link(tmp_path: Path) -> None:
    """The directory is made 0700; one that is a link, or writable by others, disables
    the record (nothing is written through it) and the reader finds none."""
    path = record_path("tcp://127.0.0.1:40003", str(tmp_path))
    record = StartRecord(path)
    assert record.active and (path.parent.stat().st_mode & 0o777) == 0o700
    record.close()

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    linked = tmp_path / "linked"
    path = record_path("tcp://127.0.0.1:40003", str(linked))
    linked.mkdir()
    path.parent.symlink_to(elsewhere, target_is_directory=True)
    record = StartRecord(path)
    record.started("sim-a")
    assert not record.active and list(elsewhere.iterdir()) == []

    shared = tmp_path / "shared"
    path = record_path("tcp://127.0.0.1:40003", str(shared))
    path.parent.mkdir(parents=True)
    path.parent.chmod(0o777)
    assert not StartRecord(path).active


def test_the_reader_never_follows_a_link_nor_reads_past_the_slots(tmp_path: Path) -> None:
    """A record replaced by a link is not read (None, its target untouched); a record
    longer than every slot is read to MAX_SLOTS slots; bytes that are not UTF-8 and
    keys too long for a slot are skipped."""
    path = record_path("tcp://127.0.0.1:40004", str(tmp_path))
    StartRecord(path).close(remove=False)
    target = tmp_path / "target"
    target.write_bytes(b"sim-x".ljust(SLOT_BYTES, b"\0"))
    path.unlink()
    path.symlink_to(target)
    assert take_started(path) is None and target.exists()
    path.unlink()

    record = StartRecord(path)
    record.started("k" * (SLOT_BYTES + 1))  # cannot be recorded: no record from here on
    assert not record.active and take_started(path) is None

    slots = [f"sim-{i}".encode().ljust(SLOT_BYTES, b"\0") for i in range(MAX_SLOTS + 10)]
    slots[1] = b"\xff\xfe".ljust(SLOT_BYTES, b"\0")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"".join(slots))
    os.close(fd)
    keys = take_started(path) or []
    assert len(keys) == MAX_SLOTS - 1 and "sim-0" in keys and f"sim-{MAX_SLOTS}" not in keys


def test_a_thread_past_the_slots_ends_the_record(tmp_path: Path) -> None:
    """A record that cannot name every thread's task is none: the nanny finds no file
    (read as complete, it would clear a task it never saw)."""
    path = record_path("tcp://127.0.0.1:40005", str(tmp_path))
    record = StartRecord(path)
    for i in range(MAX_SLOTS + 1):
        t = threading.Thread(target=record.started, args=(f"sim-{i}",))
        t.start()
        t.join()
        assert record.active == (i < MAX_SLOTS)
    assert take_started(path) is None


def test_a_task_that_ended_leaves_its_slot_empty(tmp_path: Path) -> None:
    """A thread whose task returned names nothing; the others keep theirs."""
    path = record_path("tcp://127.0.0.1:40007", str(tmp_path))
    record = StartRecord(path)
    record.started("sim-done")
    record.ended()
    t = threading.Thread(target=record.started, args=("sim-running",))
    t.start()
    t.join()
    assert take_started(path) == ["sim-running"]
    record.close()


def test_a_failed_write_ends_the_record(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk: the start could not be written, so the record would miss it; the
    record is closed and deleted, and the nanny finds none (losses then fall back to
    blaming every task held)."""
    path = record_path("tcp://127.0.0.1:40008", str(tmp_path))
    record = StartRecord(path)

    def full(*args: object) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(starts.os, "pwrite", full)
    record.started("sim-poison")
    monkeypatch.undo()
    assert not record.active and take_started(path) is None


def test_the_reader_opens_no_fifo_nor_a_directory_of_someone_elses(tmp_path: Path) -> None:
    """A FIFO where the record should be does not block the nanny (its event loop would
    hang in open()); nor is anything read from a directory another user made first,
    mode 0777, under the record directory's known name."""
    path = record_path("tcp://127.0.0.1:40009", str(tmp_path))
    StartRecord(path).close()  # our own directory, no record
    os.mkfifo(path)
    done: list[object] = []
    reader = threading.Thread(target=lambda: done.append(take_started(path)), daemon=True)
    reader.start()
    reader.join(5)
    if reader.is_alive():  # let it go before failing
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
    assert done == [None]
    path.unlink()

    theirs = tmp_path / "theirs"
    path = record_path("tcp://127.0.0.1:40009", str(theirs))
    path.parent.mkdir(parents=True)
    path.parent.chmod(0o777)
    path.write_bytes(b"sim-planted".ljust(SLOT_BYTES, b"\0"))
    assert take_started(path) is None and path.exists()


def test_an_unwritable_temporary_directory_turns_the_record_off(tmp_path: Path) -> None:
    """A worker whose temporary directory cannot be written (a read-only filesystem, a
    missing directory) runs on without a record: nothing raises in its plugin's setup."""
    path = record_path("tcp://127.0.0.1:40006", str(tmp_path / "missing" / "tmp"))
    record = StartRecord(path)
    record.started("sim-a")
    assert not record.active and take_started(path) is None
    record.close()


def test_the_plugin_registered_again_keeps_the_running_tasks_slots(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each run registers tidegate's worker plugin again (Dask tears the old one down,
    then sets the new one up) while tasks may be running: their slots stay, so the
    worker dying next still names them."""
    import asyncio
    import tempfile
    from types import SimpleNamespace

    from tidegate.worker import MemoryWatch

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    class _Worker:
        address = "tcp://127.0.0.1:40010"

        def __init__(self) -> None:
            self.memory_manager = SimpleNamespace(memory_limit=0)
            self.metrics: dict[str, object] = {}
            self.state = SimpleNamespace(total_resources={})

        def log_event(self, *args: object) -> None:
            pass

    async def register_twice() -> list[str] | None:
        worker, first, second = _Worker(), MemoryWatch(), MemoryWatch()
        await first.setup(worker)
        record = starts.active_record()
        assert record is not None and record.active
        running = threading.Thread(target=record.started, args=("sim-running",))
        running.start()
        running.join()
        await first.teardown(worker)
        await second.setup(worker)
        await second.teardown(worker)
        return take_started(record_path(worker.address))

    try:
        assert asyncio.run(register_twice()) == ["sim-running"]
    finally:
        record = starts.active_record()
        if record is not None:
            record.close()
        starts.set_active_record(None)


# --- the record as the task functions keep it -------------------------------------------

SEEN: list[tuple[str, list[str]]] = []
_RECORD_PATH: list[Path] = []


def _slots() -> list[str]:
    """The keys in the record now, without taking it."""
    data = _RECORD_PATH[0].read_bytes()
    return [data[i:i + SLOT_BYTES].rstrip(b"\0").decode()
            for i in range(0, len(data), SLOT_BYTES) if data[i:i + SLOT_BYTES].strip(b"\0")]


def peeking_model(params: dict, seed: int) -> dict:
    SEEN.append(("model", _slots()))
    return {}


def peeking_target(returns: list) -> dict:
    SEEN.append(("target", _slots()))
    return {"loss": 0.0}


def test_each_task_function_names_its_task_until_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the task functions tidegate submits, with the plugin's record and watch
    in place: an unfused sim, a fused param with its targets and a target task each see
    their own key in the record while the model and the target run, and leave the slot
    empty once they return. Without a watch nothing is recorded."""
    import distributed

    from tidegate import memwatch
    from tidegate.simreturn import run_sim
    from tidegate.worker import run_fused, run_target_list

    path = record_path("tcp://127.0.0.1:40011", str(tmp_path))
    _RECORD_PATH[:] = [path]
    record = StartRecord(path)
    current = ["sim-a"]

    class _Worker:
        address = "tcp://127.0.0.1:40011"

        def get_current_task(self) -> str:
            return current[0]

        def log_event(self, *args: object) -> None:
            pass

    class _Used:
        tree_rss, work_bytes, killed = 0, 0, None

    class _Watch:
        def begin(self, key: str, rss: object) -> int:
            return 0

        def end(self, token: int) -> _Used:
            return _Used()

    monkeypatch.setattr(distributed, "get_worker", lambda: _Worker())
    model, target = f"{__name__}:peeking_model", f"{__name__}:peeking_target"
    SEEN.clear()
    starts.set_active_record(record)
    memwatch.set_active_watch(_Watch())  # type: ignore[arg-type]
    try:
        run_sim(model, {}, "p1", 0, 1)
        assert _slots() == []
        current[0] = "sim-f"
        run_fused(model, {}, "p2", [0, 1], [1, 2], targets=[("t", target)],
                  want_outputs=False)
        assert _slots() == []
        current[0] = "agg-t"
        run_target_list(target, "t", "p3", [])
        assert _slots() == []
        memwatch.set_active_watch(None)
        current[0] = "sim-unwatched"
        run_sim(model, {}, "p4", 0, 1)
    finally:
        memwatch.set_active_watch(None)
        starts.set_active_record(None)
        record.close()
    assert SEEN == [("model", ["sim-a"]), ("model", ["sim-f"]), ("model", ["sim-f"]),
                    ("target", ["sim-f"]), ("target", ["agg-t"]), ("model", [])]
