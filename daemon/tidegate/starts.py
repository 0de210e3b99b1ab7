"""Which task each thread of a worker process is running, in a file its nanny reads
once the process is dead.

A worker reports each start as a ``tidegate-executing`` event, but that report goes out
on the worker's event loop, and a model that holds the GIL while it allocates keeps the
loop from running: the worker can be killed for memory before the report leaves (seen
under load on every worker a poison param reached). Then nothing says which of the tasks
it held was running, and every one of them has to take the blame.

So the task's own thread also writes its key here, before the model runs (a sim's, and
a target's): one fixed-size slot per thread, written at the task's start and zeroed at
its end (a ``pwrite`` of 512 bytes each, no fsync: a killed process's writes are in the
page cache, and only a crash of the whole host loses them, which loses the nanny too).
The nanny (tidegate.worker.ExitCodes) reads the file when the process exits, deletes it,
and sends the keys with the exit code; the reader keeps only the keys the scheduler still
had the worker processing.

A record read as complete clears every task it does not name, so one that may have
missed a start is none at all: a failed write, a thread past MAX_SLOTS or a key too long
for a slot closes and deletes it, and the nanny then finds no file. The file is found
from the worker's address, which the worker and its nanny both know, in a directory of
the user's own under the temporary directory (mode 0700; neither side uses it if it is a
link or anyone else may write it, and the reader opens only a regular file, without
blocking). Anything unexpected leaves no record: losses are then told from the events
alone, blaming every task a worker held when none was reported running.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import stat
import tempfile
import threading
from pathlib import Path

SLOT_BYTES = 512  # a longer key ends the record (tidegate's keys are < 100 bytes)
MAX_SLOTS = 256  # threads recorded per worker process; one more ends the record
MAX_KEYS_SENT = MAX_SLOTS


def record_dir(base: str | None = None) -> Path:
    return Path(base or tempfile.gettempdir()) / f"tidegate-{os.getuid()}-starts"


def record_path(address: str, base: str | None = None) -> Path:
    """The start record of the worker at ``address`` (its name a digest: an address is
    not a file name)."""
    return record_dir(base) / hashlib.sha256(address.encode()).hexdigest()[:32]


def _is_own_dir(path: Path) -> bool:
    """Whether ``path`` is a directory (not a link to one) of this user's that no one
    else may write: another user could otherwise make it first (its name is known)
    and plant what the reader opens."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
            and not st.st_mode & (stat.S_IWGRP | stat.S_IWOTH))


def _own_dir(path: Path) -> bool:
    """Make ``path`` a directory of this user's alone, or say it cannot be one."""
    with contextlib.suppress(OSError):  # there already, or a read-only filesystem
        path.mkdir(mode=0o700)
    return _is_own_dir(path)


class StartRecord:
    """A worker process's record of the task each of its threads is running."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._local = threading.local()
        self._slots = 0
        self._fd: int | None = None
        if not _own_dir(path.parent):
            return
        with contextlib.suppress(OSError):
            # O_TRUNC: slots of a process that had this address before are gone.
            self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                               | os.O_CLOEXEC, 0o600)

    @property
    def active(self) -> bool:
        return self._fd is not None

    def started(self, key: str) -> None:
        """This thread starts ``key`` (called from the task's own thread)."""
        data = key.encode()
        if self._fd is None:
            return
        if len(data) > SLOT_BYTES:
            # Not a key of tidegate's: unrecorded, the record could no longer say
            # what this thread runs.
            self.close()
            return
        self._write(data.ljust(SLOT_BYTES, b"\0"))

    def ended(self) -> None:
        """This thread's task returned: its slot names nothing, so a task that ended
        while its worker could not report it is not blamed with the one after it."""
        if self._fd is not None and getattr(self._local, "slot", None) is not None:
            self._write(bytes(SLOT_BYTES))

    def _write(self, data: bytes) -> None:
        # Under the lock, as close() is: a descriptor closed beside a write could be
        # reused by another file before the write, which would then land there.
        with self._lock:
            if self._fd is None:
                return
            slot = getattr(self._local, "slot", None)
            if slot is None:
                if self._slots >= MAX_SLOTS:
                    slot = None
                else:
                    slot = self._local.slot = self._slots
                    self._slots += 1
            try:
                if slot is None:
                    raise OSError("more threads than slots")
                os.pwrite(self._fd, data, slot * SLOT_BYTES)
                return
            except OSError:
                pass
        # A write lost (a full disk) or a thread without a slot: a record that may miss
        # a running task must not be read as complete, so there is none from here on
        # (the nanny then finds no file, and losses are told from the events).
        self.close()

    def close(self, *, remove: bool = True) -> None:
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is not None:
                os.close(fd)
        if fd is not None and remove:
            with contextlib.suppress(OSError):
                self.path.unlink()


def take_started(path: Path) -> list[str] | None:
    """The keys in the start record at ``path``, which is then deleted; None if there is
    none (a worker without tidegate's plugin) or it cannot be read. Reads at most
    MAX_SLOTS slots, never through a link."""
    if not _is_own_dir(path.parent):
        return None
    try:
        # O_NONBLOCK: a FIFO would otherwise block the nanny's event loop in open().
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            return None
        data = os.pread(fd, SLOT_BYTES * MAX_SLOTS, 0)
    except OSError:
        return None
    finally:
        os.close(fd)
    with contextlib.suppress(OSError):
        path.unlink()
    keys: list[str] = []
    for i in range(0, len(data), SLOT_BYTES):
        raw = data[i:i + SLOT_BYTES].rstrip(b"\0")
        if raw:
            with contextlib.suppress(UnicodeDecodeError):
                keys.append(raw.decode())
    return list(dict.fromkeys(keys))


_active: StartRecord | None = None


def active_record() -> StartRecord | None:
    return _active


def set_active_record(record: StartRecord | None) -> None:
    global _active
    _active = record
