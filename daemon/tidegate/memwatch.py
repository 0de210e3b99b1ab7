"""Process-tree memory of a worker: what its sims hold, child processes included.

Dask's memory monitor and its nanny read the worker process's own RSS only; a model that
runs a child process (a solver binary, a multiprocessing pool) holds memory Dask never
sees, and the kernel's OOM killer ends up choosing the victim. A TreeWatch samples the
whole tree (the worker plus every descendant) on a thread, charges each sim the rise it
saw, and kills the largest child subtree before the tree reaches the worker's limit, so
one sim fails with a clear error instead of the worker (and every sim on it) dying.

This module imports psutil and the standard library only: it runs inside workers and is
imported by tidegate.simreturn on the sim's own path.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil

logger = logging.getLogger(__name__)

_GONE = (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess)


def _mem(proc: psutil.Process) -> tuple[int, int]:
    """(RSS, virtual size) of one process, (0, 0) if it vanished (or became a zombie)
    meanwhile."""
    try:
        info = proc.memory_info()
    except _GONE:
        return 0, 0
    return int(info.rss), int(info.vms)


def _rss(proc: psutil.Process) -> int:
    return _mem(proc)[0]


def _is_image(child: tuple[int, int], parent: tuple[int, int]) -> bool:
    """Whether a child's memory is still its parent's: forked or vforked, not yet
    exec'd, nothing mapped of its own. Its RSS then reads the parent's pages (all of
    them after a vfork, which shares the parent's memory; the anonymous, copy-on-write
    ones after a fork), which it does not add to the tree. Counted, a worker of 250 MiB
    starting any subprocess reads as up to 500 MiB until the exec, long enough on a
    loaded machine for the watch to kill the child (seen: a tree "of 521 MiB" under a
    410 MiB limit, the child not yet started). The test: the parent's virtual size and
    no more than its RSS (2% slack). A fork that never execs and rewrites the parent's
    pages without mapping any is undercounted by at most the parent's RSS."""
    rss, vms = child
    parent_rss, parent_vms = parent
    return 0 < rss <= parent_rss + max(parent_rss // 50, 1 << 20) and vms == parent_vms


def _below(proc: psutil.Process, mem: tuple[int, int]) -> int:
    """The RSS of every descendant of ``proc`` (whose own is ``mem``), a descendant that
    is still an image of its parent counting 0."""
    total = 0
    seen = {proc.pid}
    frontier = [(proc, mem)]
    while frontier:
        nxt = []
        for p, pmem in frontier:
            for c in _children(p):
                if c.pid in seen:  # pid reuse cannot make a loop
                    continue
                seen.add(c.pid)
                cmem = _mem(c)
                total += 0 if _is_image(cmem, pmem) else cmem[0]
                nxt.append((c, cmem))
        frontier = nxt
    return total


def _child_pids(pid: int) -> list[int] | None:
    """The direct children of ``pid`` from /proc/<pid>/task/<tid>/children (Linux 3.5+),
    None where that is unavailable. psutil finds children by reading every process's
    /proc/<pid>/stat: on a node with hundreds of processes, sampled every 25 ms, that
    is a good part of a core; this reads one small file per thread of the tree."""
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return []  # the process is gone
    except OSError:
        return None
    pids: list[int] = []
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                pids.extend(int(p) for p in f.read().split())
        except FileNotFoundError:
            if not os.path.exists(f"/proc/{pid}/task"):
                return []
            if not os.path.exists(f"/proc/{pid}/task/{tid}"):
                continue  # that thread ended meanwhile
            return None  # no children files in this kernel
        except (OSError, ValueError):
            return None
    return pids


def _children(proc: psutil.Process) -> list[psutil.Process]:
    pids = _child_pids(proc.pid)
    if pids is None:
        try:
            return list(proc.children(recursive=False))
        except _GONE:
            return []
    kids = []
    for pid in pids:
        with contextlib.suppress(*_GONE):
            kids.append(psutil.Process(pid))
    return kids


def _descendants(proc: psutil.Process) -> list[psutil.Process]:
    """Every descendant of ``proc``, children before grandchildren."""
    found: list[psutil.Process] = []
    seen = {proc.pid}
    frontier = [proc]
    while frontier:
        nxt = []
        for p in frontier:
            for c in _children(p):
                if c.pid not in seen:  # pid reuse cannot make a loop
                    seen.add(c.pid)
                    nxt.append(c)
        found.extend(nxt)
        frontier = nxt
    return found


def tree_rss(proc: psutil.Process) -> int:
    """RSS of ``proc`` plus every descendant; processes that end mid-read count 0.

    A child not yet exec'd that has mapped nothing of its own counts 0 (``_is_image``).
    Otherwise shared pages (a forked child's copy-on-write pages) count once per
    process: the sum can exceed what the tree really holds, an overestimate on the safe
    side."""
    mem = _mem(proc)
    return mem[0] + _below(proc, mem)


@dataclass(frozen=True, slots=True)
class _Own:
    """One reading of the watched process itself."""

    rss: int
    vms: int
    peak: int  # the highest RSS since the previous reading (rss where Linux cannot tell)
    children: list[int] | None  # its direct children's pids; None: read them another way


# A model with a large thread pool must not take the worker's file descriptors (its
# sockets need them; the soft limit is often 1024): beyond this many threads their
# children files are opened and closed at each reading, as before.
MAX_OPEN_TASK_FILES = 64


class _ProcFiles:
    """The /proc files of the watched process, opened once and read with pread.

    A reading of the tree is taken at every sim's end, so its cost is per sim: opened,
    read and closed each time, the status and one ``children`` file per thread of a Dask
    worker (eleven) took 110 us; kept open, 13 us. Each reading also resets the
    process's peak RSS (VmHWM, through ``clear_refs``; Linux >= 4.0), so the next one
    reports the highest RSS between the two. That is what a sim allocating with the GIL
    held needs: the sampler thread cannot run until it lets go, by when the memory may be
    freed (seen under load: sims of 170 MiB read as a few MiB, four admitted where two
    fit, two workers killed). The watch is then the only thing resetting it.

    Every method is called with the watch's reading lock held: an fd is closed only
    then, so no other thread can read a number the kernel has given to another file.

    What it cannot do: the read and the reset are two system calls, and a peak between
    them (microseconds) is lost; a sim that begins from its predecessor's reading (one
    task of several sims) is charged any peak since then, another thread's included (an
    overestimate). The resets are the process's: a model on a watched worker that reads
    its own peak (VmHWM, ``getrusage().ru_maxrss``) sees the peak since the last reading.
    """

    def __init__(self, pid: int):
        self.pid = pid
        self._status = _open(f"/proc/{pid}/status", os.O_RDONLY)
        self._clear = _open(f"/proc/{pid}/clear_refs", os.O_WRONLY)
        self._tasks: dict[str, int] = {}  # thread id -> fd of its children file
        self._no_children_files = False
        if self._clear is not None:
            try:
                os.write(self._clear, b"5")
            except OSError:  # the kernel predates it, or a sandbox refuses it
                os.close(self._clear)
                self._clear = None

    def read(self) -> _Own | None:
        """The process's memory and children, the peak reset; None if it cannot be read
        this way (the caller falls back to psutil)."""
        if self._status is None:
            return None
        try:
            data = os.pread(self._status, 8192, 0)
            if self._clear is not None:
                os.write(self._clear, b"5")
        except OSError:
            return None
        rss, vms, hwm = (_status_kib(data, f) for f in (b"VmRSS:", b"VmSize:", b"VmHWM:"))
        if rss is None or vms is None:
            return None  # a kernel thread, or a zombie: nothing mapped to read
        peak = max(rss, hwm) if hwm is not None and self._clear is not None else rss
        return _Own(rss << 10, vms << 10, peak << 10, self._children())

    def _children(self) -> list[int] | None:
        if self._no_children_files:
            return None
        try:
            tids = os.listdir(f"/proc/{self.pid}/task")
        except OSError:
            return None
        for tid in self._tasks.keys() - set(tids):  # threads that ended
            os.close(self._tasks.pop(tid))
        pids: list[int] = []
        for tid in tids:
            fd = self._tasks.get(tid)
            keep = fd is None and len(self._tasks) < MAX_OPEN_TASK_FILES
            if fd is None:
                try:
                    fd = os.open(f"/proc/{self.pid}/task/{tid}/children", os.O_RDONLY)
                except FileNotFoundError:
                    if os.path.exists(f"/proc/{self.pid}/task/{tid}"):
                        self._no_children_files = True  # Linux < 3.5
                        return None
                    continue  # that thread ended meanwhile
                except OSError:
                    return None
                if keep:
                    self._tasks[tid] = fd
            try:
                pids.extend(int(p) for p in os.pread(fd, 65536, 0).split())
            except (OSError, ValueError):
                return None
            finally:
                if tid not in self._tasks:  # beyond the files kept open
                    os.close(fd)
        return pids

    def close(self) -> None:
        for fd in [self._status, self._clear, *self._tasks.values()]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._status = self._clear = None
        self._tasks.clear()


def _open(path: str, flags: int) -> int | None:
    try:
        return os.open(path, flags)
    except OSError:
        return None


def _status_kib(data: bytes, field: bytes) -> int | None:
    """A ``VmRSS:``-style field of /proc/<pid>/status, in KiB; None if absent."""
    at = data.find(field)
    if at < 0:
        return None
    end = data.find(b"\n", at)
    try:
        return int(data[at + len(field):end if end >= 0 else len(data)].split()[0])
    except (ValueError, IndexError):
        return None


@dataclass(frozen=True, slots=True)
class KillReport:
    """A child subtree the watch killed because the tree neared the memory limit."""

    key: str  # the sim charged with it ("" if no sim was running)
    child_pid: int
    child_rss: int  # of the child's whole subtree, in bytes
    tree_rss: int  # of the worker's whole tree at that sample
    limit: int


@dataclass(frozen=True, slots=True)
class SimMemory:
    """What one sim cost: its working memory, and the kill charged to it if any."""

    work_bytes: int
    killed: KillReport | None = None
    tree_rss: int = 0  # the tree's RSS when it ended: the next sim's begin in one task


@dataclass(slots=True)
class _Sim:
    key: str
    began: float  # _since_boot(): comparable with a child's _created_since_boot
    start_rss: int
    peak_rss: int
    killed: KillReport | None = field(default=None)
    # The lowest tree RSS since it began, and the largest rise above that low: another
    # sim's memory freed during this one's run must not hide this one's own rise.
    low_rss: int = 0
    rise: int = 0


@dataclass(frozen=True, slots=True)
class _Sample:
    own: int  # the worker process alone
    total: int
    peak: int  # the tree's highest since the previous reading: ``total`` with own's peak
    # (direct child, RSS of its subtree), the child's create_time
    subtrees: tuple[tuple[psutil.Process, int, float], ...]


class TreeWatch:
    """Samples one worker process's tree every ``interval_s`` on a daemon thread.

    ``begin(key)`` / ``end(token)`` bracket a sim on the thread that runs it. A sim's
    ``work_bytes`` is the largest rise of the tree RSS seen while it ran above the lowest
    reading since it began (the tree RSS at its start, unless memory was freed meanwhile);
    begin and end take a sample themselves, so a sim shorter than the interval still
    gets a reading. Each reading carries the worker process's peak RSS since the one
    before (``_ProcFiles``): memory held only between two readings is charged too.
    With exactly one active sim the attribution is exact. With several at once each sim is
    charged the tree's whole rise during its run, whoever caused it: conservative, an
    overestimate of each. Measured from the low, not from the start: a sim that began while
    another's child held memory, which was freed before its own child took as much, saw no
    rise above its start (read as 0 under load).

    When a sample exceeds ``terminate_fraction * memory_limit`` (a limit > 0) and the
    worker has children, the largest child subtree (the child and its descendants, by
    their summed RSS) among those created since the first sim began gets SIGKILL; the
    worker process itself never does (with no child, or when the worker process alone
    is over the threshold, nothing happens here: Dask's nanny terminates the worker).
    The kill is charged to the one active sim, or with several to the most recently
    begun one that began before the child was created (else the most recent), and
    ``end()`` returns it in ``killed`` even when the model caught the child's death and
    returned normally.
    ``on_kill`` is called from the sampler thread. After a kill the watch does not kill
    again until the killed child has left the tree (its memory freed), so a stale read
    of the same child cannot cost a second victim.
    """

    def __init__(
        self,
        pid: int,
        memory_limit: int,
        terminate_fraction: float = 0.95,
        interval_s: float = 0.025,
        on_kill: Callable[[KillReport], None] | None = None,
    ):
        self.pid = pid
        self.memory_limit = int(memory_limit or 0)
        self.terminate_fraction = float(terminate_fraction)
        self.interval_s = float(interval_s)
        self.on_kill = on_kill
        self._proc = psutil.Process(pid)
        self._files = _ProcFiles(pid)
        # Held while reading the tree, so that the peak between two readings is charged
        # to the sims that ran between them, and no other.
        self._lock = threading.Lock()
        self._sims: dict[int, _Sim] = {}
        self._tokens = itertools.count()
        self._latest = 0
        self._idle: int | None = None
        self._first: int | None = None
        self._killed_pid: int | None = None  # no new kill while this child holds memory
        self._first_begin: float | None = None  # _since_boot() of the first sim's begin
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        # The latest kills, newest last; bounded: a worker may live for weeks.
        self.kills: collections.deque[KillReport] = collections.deque(maxlen=64)

    # --- lifecycle -------------------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"tidegate-treewatch-{self.pid}", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5)
        with self._lock:
            self._files.close()

    # --- readings --------------------------------------------------------------------

    @property
    def tree_rss(self) -> int:
        """The latest sample of the tree's RSS (0 before the first)."""
        return self._latest

    @property
    def idle_rss(self) -> int:
        """The latest sample taken while no sim ran; before any, the first sample."""
        if self._idle is not None:
            return self._idle
        return self._first or 0

    @property
    def limit_bytes(self) -> int:
        """The tree RSS above which a child is killed (0: never)."""
        return int(self.terminate_fraction * self.memory_limit) if self.memory_limit > 0 else 0

    # --- sims ------------------------------------------------------------------------

    def begin(self, key: str, rss: int | None = None) -> object:
        """``rss``: a reading of the tree just taken (the previous sim's end, in a
        task that runs sims one after another), so the tree is not read again."""
        token = next(self._tokens)
        with self._lock:
            if rss is None:
                reading = self._take()
                self._note(reading.total, reading.peak)  # the others' peak before this sim
                rss = reading.total
            else:
                self._note(rss, rss)
            began = _since_boot()
            if self._first_begin is None:
                self._first_begin = began
            self._sims[token] = _Sim(key, began, rss, rss, low_rss=rss)
        return token

    def end(self, token: object) -> SimMemory:
        with self._lock:
            reading = self._take()
            self._note(reading.total, reading.peak)
            rss = reading.total
            sim = self._sims.pop(token, None)  # type: ignore[call-overload]
        if sim is None:
            return SimMemory(0, None, rss)
        return SimMemory(max(0, sim.rise), sim.killed, rss)

    def _note(self, total: int, peak: int) -> None:
        """Record a reading (lock held): the latest, and every active sim's peak. The
        peak came after every earlier reading, so it rises above their low."""
        self._latest = total
        if self._first is None:
            self._first = total
        for sim in self._sims.values():
            sim.peak_rss = max(sim.peak_rss, peak)
            sim.rise = max(sim.rise, peak - sim.low_rss)
            sim.low_rss = min(sim.low_rss, total)

    # --- the sampler -----------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception:  # never let one odd read end the watch
                logger.exception("tidegate tree watch: sample failed")
            self._stop.wait(self.interval_s)

    def _take(self, created: bool = False) -> _Sample:
        """Read the tree (lock held); ``created``: each child's start time too."""
        own = self._files.read()
        if own is None:  # no /proc files to keep open: psutil, no peak
            rss, vms = _mem(self._proc)
            own = _Own(rss, vms, rss, None)
        mem = (own.rss, own.vms)
        if own.children is None:
            children = _children(self._proc)
        else:
            children = []
            for pid in own.children:
                with contextlib.suppress(*_GONE):
                    children.append(psutil.Process(pid))
        subtrees = []
        for child in children:
            cmem = _mem(child)
            # An image of the worker (not yet exec'd) has size 0: it holds nothing of
            # its own, so it is never the one killed.
            size = (0 if _is_image(cmem, mem) else cmem[0]) + _below(child, cmem)
            subtrees.append((child, size, _created_since_boot(child) if created else 0.0))
        below = sum(s for _, s, _ in subtrees)
        return _Sample(own.rss, own.rss + below, own.peak + below, tuple(subtrees))

    def sample(self) -> int:
        """Take one sample now (the thread calls this); kill if over the limit."""
        report: KillReport | None = None
        with self._lock:
            reading = self._take(created=True)
            self._note(reading.total, reading.peak)
            if not self._sims:
                self._idle = reading.total
            if self._killed_pid is not None and not any(
                c.pid == self._killed_pid and size > 0 for c, size, _ in reading.subtrees
            ):
                self._killed_pid = None
            threshold = self.limit_bytes
            # Only a child a sim could have started: one that predates the first sim is
            # the worker's own (a resource tracker, a forkserver) and no sim's to lose.
            first = self._first_begin
            live = [s for s in reading.subtrees
                    if s[1] > 0 and first is not None and s[2] >= first - _TICK_S]
            # A worker over the threshold on its own is the nanny's to terminate (it reads
            # the same fraction of the same limit off the worker process's RSS): killing
            # a child then would only add a victim.
            if (
                threshold
                and reading.total > threshold >= reading.own
                and live
                and self._killed_pid is None
            ):
                child, size, created = max(live, key=lambda s: s[1])
                if self._kill_subtree(child):
                    self._killed_pid = child.pid
                    sim = self._charged(created)
                    report = KillReport(
                        sim.key if sim else "", child.pid, size, reading.total,
                        self.memory_limit,
                    )
                    if sim is not None:
                        sim.killed = report
                    self.kills.append(report)
        if report is not None:
            logger.warning(
                "tidegate: killed child process %d (%d MiB) of sim %r: the worker's "
                "process tree held %d MiB of its %d MiB limit", report.child_pid,
                report.child_rss >> 20, report.key, report.tree_rss >> 20,
                report.limit >> 20,
            )
            if self.on_kill is not None:
                try:
                    self.on_kill(report)
                except Exception:
                    logger.exception("tidegate tree watch: on_kill failed")
        return reading.total

    def _charged(self, child_created: float) -> _Sim | None:
        """The sim a child's kill is charged to (lock held)."""
        sims = sorted(self._sims.values(), key=lambda s: s.began)
        if not sims:
            return None
        if len(sims) == 1:
            return sims[0]
        # A start time is truncated to a clock tick: a sim that began within one tick
        # before it counts as begun before.
        before = [s for s in sims if s.began <= child_created + _TICK_S]
        return before[-1] if before else sims[-1]

    def _kill_subtree(self, child: psutil.Process) -> bool:
        """SIGKILL ``child`` and its descendants (listed before the child dies, since
        they are reparented away from it after). False if it was already gone."""
        if child.pid == self.pid or child.pid == os.getpid():
            return False  # a worker never kills itself from here
        victims = [*_descendants(child)]
        try:
            child.send_signal(signal.SIGKILL)
        except _GONE:
            return False
        for p in victims:
            with contextlib.suppress(*_GONE):
                p.send_signal(signal.SIGKILL)
        return True


try:
    _TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")
except (AttributeError, ValueError, OSError):
    _TICK_S = 0.01


def _since_boot() -> float:
    """Now, on the clock a process's start time is kept in (Linux: CLOCK_BOOTTIME)."""
    if hasattr(time, "CLOCK_BOOTTIME"):
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    return time.time()


def _created_since_boot(proc: psutil.Process) -> float:
    """When ``proc`` started, on _since_boot's clock (0 if gone). psutil's create_time
    adds the boot time, which Linux gives in whole seconds: compared with time.time()
    it could be a second off, which would charge a kill to the wrong sim."""
    try:
        created = proc.create_time()
    except _GONE:
        return 0.0
    if hasattr(time, "CLOCK_BOOTTIME"):
        return created - psutil.boot_time()
    return created


# The watch of this worker process, set by tidegate.worker.MemoryWatch: run_sim finds it
# here without importing Dask.
_active_watch: TreeWatch | None = None


def active_watch() -> TreeWatch | None:
    return _active_watch


def set_active_watch(watch: TreeWatch | None) -> None:
    global _active_watch
    _active_watch = watch
