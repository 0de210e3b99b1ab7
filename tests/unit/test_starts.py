"""The start record a worker's threads write and its nanny reads after the worker dies
(tidegate.starts), on real files."""

from __future__ import annotations

import os
import threading
from pathlib import Path

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
    record.started("k" * (SLOT_BYTES + 1))  # not recorded
    assert take_started(path) == []
    record.close()

    slots = [f"sim-{i}".encode().ljust(SLOT_BYTES, b"\0") for i in range(MAX_SLOTS + 10)]
    slots[1] = b"\xff\xfe".ljust(SLOT_BYTES, b"\0")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, b"".join(slots))
    os.close(fd)
    keys = take_started(path) or []
    assert len(keys) == MAX_SLOTS - 1 and "sim-0" in keys and f"sim-{MAX_SLOTS}" not in keys


def test_threads_past_the_slots_are_not_recorded(tmp_path: Path) -> None:
    path = record_path("tcp://127.0.0.1:40005", str(tmp_path))
    record = StartRecord(path)
    for i in range(MAX_SLOTS + 3):
        t = threading.Thread(target=record.started, args=(f"sim-{i}",))
        t.start()
        t.join()
    keys = take_started(path) or []
    assert len(keys) == MAX_SLOTS and f"sim-{MAX_SLOTS}" not in keys
    record.close()


def test_an_unwritable_temporary_directory_turns_the_record_off(tmp_path: Path) -> None:
    """A worker whose temporary directory cannot be written (a read-only filesystem, a
    missing directory) runs on without a record: nothing raises in its plugin's setup."""
    path = record_path("tcp://127.0.0.1:40006", str(tmp_path / "missing" / "tmp"))
    record = StartRecord(path)
    record.started("sim-a")
    assert not record.active and take_started(path) is None
    record.close()
