"""The process-tree watch: child processes' memory, per-sim working memory, the kill of
the largest child near the limit, and the host/cgroup layout parsing. Real processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psutil
import pytest

from tidegate.memwatch import (
    KillReport,
    TreeWatch,
    _created_since_boot,
    _since_boot,
    set_active_watch,
    tree_rss,
)
from tidegate.simreturn import run_sim
from tidegate.worker import (
    cgroup_limit_file,
    host_layout,
    parse_cgroup,
    parse_cgroup_limit,
)

MiB = 1 << 20
MODEL = "tidegate.workloads:synthetic"

# A child that allocates (and touches) what it is told on stdin, answering each line.
_HOG = """
import sys
held = []
print("ready", flush=True)
for line in sys.stdin:
    n = int(line)
    buf = bytearray(n)
    buf[::4096] = b"\\x01" * len(range(0, n, 4096))
    held.append(buf)
    print("ok", flush=True)
"""


class Hog:
    """A child process of this test process that holds memory on request."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _HOG],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        )
        try:
            assert self._line() == "ready"
        except BaseException:
            self.close()  # not left to the garbage collector, whose warning hits a later test
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _line(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def alloc(self, nbytes: int, wait: bool = True) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"{nbytes}\n")
        self.proc.stdin.flush()
        if wait:
            assert self._line() == "ok"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None and not pipe.closed:
                with contextlib.suppress(BrokenPipeError):
                    pipe.close()


@pytest.fixture
def hogs() -> Iterator[Callable[[], Hog]]:
    made: list[Hog] = []

    def make() -> Hog:
        made.append(Hog())
        return made[-1]

    yield make
    for h in made:
        h.close()


@pytest.fixture
def watches() -> Iterator[Callable[..., TreeWatch]]:
    made: list[TreeWatch] = []

    def make(*args: Any, **kwargs: Any) -> TreeWatch:
        made.append(TreeWatch(os.getpid(), *args, **kwargs))
        return made[-1]

    yield make
    for w in made:
        w.stop()
    set_active_watch(None)


def kill_setup(*spare: int) -> tuple[int, int]:
    """A limit 150 MiB above this process's tree now, and a hog size that crosses it as
    the largest child: other tests of the session may have left children running (a
    pool, a server), and the watch rightly kills the largest child, not ours. ``spare``:
    pids of this test's own children, kept out of that count."""
    me = psutil.Process()
    others = [tree_rss(c) for c in me.children() if c.pid not in spare]
    biggest = max(others, default=0)
    return tree_rss(me) + biggest + 150 * MiB, biggest + 400 * MiB


def wait_for(cond: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        time.sleep(0.01)


def test_tree_rss_counts_a_child_process(hogs: Callable[[], Hog]) -> None:
    """A child's 100 MiB shows in the tree's RSS, not in the process's own."""
    me = psutil.Process()
    hog = hogs()
    before = tree_rss(me)
    hog.alloc(100 * MiB)
    after = tree_rss(me)
    assert after - before >= 95 * MiB
    assert me.memory_info().rss < after - 95 * MiB


class ForkedImage:
    """A fork of this test process that maps nothing of its own until told to allocate:
    what any subprocess is between its fork (or vfork) and its exec."""

    def __init__(self) -> None:
        self.go_r, self.go_w = os.pipe()
        self.done_r, self.done_w = os.pipe()
        self.pid = os.fork()
        if self.pid == 0:  # the child: no Python-level work beyond this
            try:
                n = int(os.read(self.go_r, 64) or b"0")
                if n:
                    buf = bytearray(n)
                    buf[::4096] = b"\x01" * len(range(0, n, 4096))
                    os.write(self.done_w, b"1")
                    os.read(self.go_r, 1)
            finally:
                os._exit(0)

    def alloc(self, nbytes: int) -> None:
        os.write(self.go_w, str(nbytes).encode())
        assert os.read(self.done_r, 1) == b"1"

    def close(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 9)
        os.waitpid(self.pid, 0)
        for fd in (self.go_r, self.go_w, self.done_r, self.done_w):
            os.close(fd)


def test_a_child_not_yet_exec_d_counts_nothing_and_is_not_killed(
    watches: Callable[..., TreeWatch]
) -> None:
    """A fresh fork reads the parent's RSS as its own; it holds nothing yet, so the tree
    is not doubled and a limit between one and two copies of this process kills nothing.
    Once the fork allocates, its memory counts and it is the one killed."""
    me = psutil.Process()
    own = me.memory_info().rss
    assert own > 60 * MiB
    # Between one and two copies of this process: counted as before, the fork crosses it.
    limit = tree_rss(me) + own // 2
    watch = watches(int(limit / 0.95) + 1)
    token = watch.begin("a")
    image = ForkedImage()
    try:
        child = psutil.Process(image.pid)
        assert child.memory_info().rss > 20 * MiB  # it reads the parent's pages as its own
        assert tree_rss(me) < limit
        watch.sample()
        assert not watch.kills and child.status() != psutil.STATUS_ZOMBIE
        image.alloc(own // 2 + 100 * MiB)
        wait_for(lambda: bool(watch.sample() and watch.kills))
        assert watch.kills[-1].child_pid == image.pid
        assert watch.end(token).killed is not None
    finally:
        image.close()


def test_descendants_are_found_through_grandchildren() -> None:
    """A grandchild's memory counts too (read through /proc/<pid>/task/*/children)."""
    me = psutil.Process()
    code = (
        "import subprocess, sys\n"
        "g = subprocess.Popen([sys.executable, '-I', '-c', "
        "'import sys; b = bytearray(80 << 20); b[::4096] = b\"\\\\x01\" * (20480); "
        "print(1, flush=True); sys.stdin.read()'], stdout=subprocess.PIPE)\n"
        "g.stdout.readline(); print('ready', flush=True); sys.stdin.read()\n"
    )
    before = tree_rss(me)
    child = subprocess.Popen([sys.executable, "-I", "-c", code], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    proc = psutil.Process(child.pid)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "ready"
        # The child's own tree: processes other tests left beside it are not its.
        assert len(proc.children(recursive=True)) == 1
        assert tree_rss(proc) >= 75 * MiB
        assert tree_rss(me) - before >= 75 * MiB
    finally:
        for k in proc.children(recursive=True):  # the grandchild first, while it is ours
            k.kill()
        proc.kill()
        child.wait(timeout=10)
        assert child.stdin is not None and child.stdout is not None
        child.stdin.close()
        child.stdout.close()


def test_tree_rss_of_a_vanished_process_is_zero(hogs: Callable[[], Hog]) -> None:
    hog = hogs()
    proc = psutil.Process(hog.pid)
    hog.close()
    assert tree_rss(proc) == 0


def test_a_sim_is_charged_its_child_process(watches: Callable[..., TreeWatch]) -> None:
    """A sim whose model runs a 100 MB child gets >= 90 MB of working memory."""
    watch = watches(0)
    watch.start()
    token = watch.begin("sim-1")
    from tidegate.workloads import synthetic

    synthetic({"child_alloc_bytes": 100 * 10**6, "child_seconds": 0.3}, 0)
    used = watch.end(token)
    assert used.work_bytes >= 90 * 10**6
    assert used.killed is None


def test_a_short_sim_without_the_thread_still_gets_a_reading(
    watches: Callable[..., TreeWatch], hogs: Callable[[], Hog]
) -> None:
    """begin and end sample themselves: a child still holding at end is counted."""
    watch = watches(0)  # never started
    hog = hogs()
    token = watch.begin("k")
    hog.alloc(50 * MiB)
    assert watch.end(token).work_bytes >= 45 * MiB
    # Work is never negative, even when the tree shrank during the sim.
    token = watch.begin("k2")
    hog.close()
    assert watch.end(token).work_bytes == 0


def _held_and_freed(nbytes: int) -> None:
    """Allocate and touch ``nbytes`` in this process with the GIL held, then free them:
    no other thread can sample meanwhile, and the memory is gone before anyone can."""
    buf = bytearray(nbytes)
    buf[::4096] = b"\x01" * len(range(0, nbytes, 4096))
    del buf


def test_memory_held_only_between_two_readings_is_charged(
    watches: Callable[..., TreeWatch],
) -> None:
    """A sim that allocates 100 MiB and frees it before the tree is read again (as one
    holding the GIL does: the sampler cannot run) is charged the peak, not the level
    it ended at; the sim that begins after the peak is not charged it."""
    watch = watches(0)  # never started: only begin, end and sample read the tree
    a = watch.begin("a")
    _held_and_freed(100 * MiB)
    b = watch.begin("b")  # after a's peak: that reading is a's and not b's
    assert watch.end(b).work_bytes < 20 * MiB
    assert watch.end(a).work_bytes >= 95 * MiB
    c = watch.begin("c")
    _held_and_freed(60 * MiB)
    watch.sample()  # a sampler reading carries the peak to the sims running
    d = watch.begin("d")
    assert watch.end(c).work_bytes >= 55 * MiB
    assert watch.end(d).work_bytes < 20 * MiB


def _open_children_files() -> int:
    """How many of this process's fds are open on a thread's ``children`` file."""
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            n += os.readlink(f"/proc/self/fd/{fd}").endswith("/children")
    return n


def test_a_process_of_many_threads_keeps_few_files_open_and_sees_every_child(
    watches: Callable[..., TreeWatch],
) -> None:
    """With more threads than MAX_OPEN_TASK_FILES, the watch keeps at most that many
    children files open (the worker's sockets need fds) and still sees a child started
    by a thread beyond them."""
    from tidegate.memwatch import MAX_OPEN_TASK_FILES

    stop = threading.Event()
    idle = [threading.Thread(target=stop.wait, daemon=True)
            for _ in range(MAX_OPEN_TASK_FILES + 16)]
    for t in idle:
        t.start()
    started, hog = threading.Event(), []

    def start_child() -> None:  # the newest thread: past the files kept open
        hog.append(Hog())
        hog[0].alloc(50 * MiB)
        started.set()
        stop.wait()

    spawner = threading.Thread(target=start_child, daemon=True)
    try:
        watch = watches(0)
        token = watch.begin("k")
        spawner.start()
        assert started.wait(30)
        assert watch.end(token).work_bytes >= 45 * MiB
        assert _open_children_files() <= MAX_OPEN_TASK_FILES
    finally:
        stop.set()
        for t in [*idle, spawner]:
            t.join(timeout=10)
        for h in hog:
            h.close()


def test_the_largest_child_is_killed_near_the_limit(
    watches: Callable[..., TreeWatch], hogs: Callable[[], Hog]
) -> None:
    """Over 0.95 x limit the largest child subtree gets SIGKILL, the smaller child and
    this process live on, the sim is charged, and a raising on_kill keeps the watch on."""
    reports: list[KillReport] = []

    def on_kill(report: KillReport) -> None:
        reports.append(report)
        raise RuntimeError("on_kill may fail")

    watch = watches(0, terminate_fraction=0.95, on_kill=on_kill)
    token = watch.begin("sim-big")  # the children below are the sim's
    small, big = hogs(), hogs()
    small.alloc(20 * MiB)
    limit, hog_bytes = kill_setup(small.pid, big.pid)
    watch.memory_limit = limit
    watch.start()
    big.alloc(hog_bytes, wait=False)
    assert big.proc.wait(timeout=30) == -9
    used = watch.end(token)
    assert used.killed is not None
    k = used.killed
    assert (k.key, k.child_pid, k.limit) == ("sim-big", big.pid, limit)
    assert k.child_rss > 100 * MiB
    assert k.tree_rss > 0.95 * limit
    assert small.proc.poll() is None
    wait_for(lambda: len(reports) == 1)
    assert reports[0] == k
    # The thread survived on_kill's exception and goes on sampling (the tree dropped).
    wait_for(lambda: watch.tree_rss < 0.95 * limit)
    assert watch._thread is not None and watch._thread.is_alive()
    assert list(watch.kills) == [k]


def test_no_kill_without_a_limit_or_without_children(
    watches: Callable[..., TreeWatch], hogs: Callable[[], Hog]
) -> None:
    """Limit 0 never kills; a tree over the limit with no child, or whose worker
    process alone is over it, kills nothing (the nanny's business)."""
    unlimited, tiny = watches(0), watches(1 * MiB)
    sims = [unlimited.begin("u"), tiny.begin("t")]  # the hog is a child of these sims
    hog = hogs()
    hog.alloc(100 * MiB)
    assert unlimited.sample() > 100 * MiB
    assert not unlimited.kills and hog.proc.poll() is None
    # This process alone is over the threshold: the nanny's case, no child is killed.
    tiny.sample()
    assert not tiny.kills and hog.proc.poll() is None
    hog.close()
    tiny.sample()
    assert not tiny.kills
    unlimited.end(sims[0])
    tiny.end(sims[1])


def test_a_child_older_than_every_sim_is_never_killed(
    watches: Callable[..., TreeWatch], hogs: Callable[[], Hog]
) -> None:
    """A process the worker started before its first sim (a helper of its own, such as
    multiprocessing's resource tracker) is no sim's to lose: over the limit the watch
    kills the largest child a sim could have started, not that older one."""
    old = hogs()
    old.alloc(200 * MiB)
    created = _created_since_boot(psutil.Process(old.pid))
    wait_for(lambda: _since_boot() > created + 0.05)  # create_time has tick resolution
    watch = watches(0)
    token = watch.begin("sim")
    young = hogs()
    limit, hog_bytes = kill_setup(old.pid, young.pid)
    watch.memory_limit = limit
    young.alloc(60 * MiB)
    watch.start()
    old.alloc(hog_bytes, wait=False)  # the old one is now by far the largest child
    assert young.proc.wait(timeout=30) == -9
    used = watch.end(token)
    assert used.killed is not None and used.killed.child_pid == young.pid
    assert old.proc.poll() is None


def test_with_two_sims_the_kill_goes_to_the_one_that_started_the_child(
    watches: Callable[..., TreeWatch], hogs: Callable[[], Hog]
) -> None:
    """Sim a begins, its child starts, sim b begins; the child's kill is charged to a."""
    limit, hog_bytes = kill_setup()
    watch = watches(limit)
    watch.start()
    a = watch.begin("a")
    hog = hogs()
    # create_time has clock-tick resolution: b must begin visibly after the child.
    created = _created_since_boot(psutil.Process(hog.pid))
    wait_for(lambda: _since_boot() > created + 0.05)
    b = watch.begin("b")
    hog.alloc(hog_bytes, wait=False)
    assert hog.proc.wait(timeout=30) == -9
    used_b, used_a = watch.end(b), watch.end(a)
    assert used_a.killed is not None and used_a.killed.key == "a"
    assert used_b.killed is None
    # Both were running: each is charged the tree's whole rise (conservative).
    assert used_b.work_bytes > 100 * MiB and used_a.work_bytes > 100 * MiB


def test_memory_freed_by_another_sim_does_not_hide_a_rise(
    watches: Callable[..., TreeWatch], hogs: Callable[[], Hog]
) -> None:
    """Sim b begins while sim a's child holds 60 MiB; a's child exits, then b's own takes
    60 MiB: the tree ends where b began, yet b rose 60 MiB above the low it saw."""
    watch = watches(0)
    a = watch.begin("a")
    first = hogs()
    first.alloc(60 * MiB)
    watch.sample()
    b = watch.begin("b")
    first.close()
    watch.sample()
    second = hogs()
    second.alloc(60 * MiB)
    watch.sample()
    assert watch.end(b).work_bytes >= 55 * MiB
    assert watch.end(a).work_bytes >= 55 * MiB


def test_idle_rss_is_the_tree_while_no_sim_runs(
    watches: Callable[..., TreeWatch], hogs: Callable[[], Hog]
) -> None:
    watch = watches(0)
    first = watch.begin("k")  # before any idle sample, the first sample
    assert watch.idle_rss == watch.tree_rss > 0
    watch.end(first)
    watch.start()
    wait_for(lambda: watch.idle_rss > 0 and watch._idle is not None)
    idle = watch.idle_rss
    token = watch.begin("k2")
    hog = hogs()
    hog.alloc(100 * MiB)
    wait_for(lambda: watch.tree_rss > idle + 90 * MiB)
    assert watch.idle_rss < idle + 50 * MiB  # a sample taken during a sim is not idle
    watch.end(token)
    wait_for(lambda: watch.idle_rss > idle + 90 * MiB)  # idle again, child still held


def test_run_sim_fails_a_sim_whose_child_was_killed(
    watches: Callable[..., TreeWatch],
) -> None:
    """With an active watch run_sim reports MemoryExceeded (not the model's own
    error), and the working memory it saw."""
    limit, hog_bytes = kill_setup()
    watch = watches(limit)
    watch.start()
    set_active_watch(watch)
    ret = run_sim(MODEL, {"child_alloc_bytes": hog_bytes, "child_seconds": 20}, "p", 0, 1)
    assert ret.error is not None and ret.error.type == "MemoryExceeded"
    assert "child process" in ret.error.message and "MiB" in ret.error.message
    assert ret.outputs == {}
    assert ret.rss_delta_bytes > 100 * MiB


def swallowing_model(params: dict[str, Any], seed: int) -> dict[str, Any]:
    from tidegate.workloads import synthetic

    with contextlib.suppress(RuntimeError):
        synthetic(params, seed)
    return {"data": {"x": [1.0]}}


def test_run_sim_fails_a_killed_sim_even_when_the_model_swallows_it(
    watches: Callable[..., TreeWatch],
) -> None:
    limit, hog_bytes = kill_setup()
    watch = watches(limit)
    watch.start()
    set_active_watch(watch)
    ret = run_sim(f"{__name__}:swallowing_model",
                  {"child_alloc_bytes": hog_bytes, "child_seconds": 20}, "p", 0, 1)
    assert ret.error is not None and ret.error.type == "MemoryExceeded"
    assert ret.outputs == {}


def test_run_sim_without_a_watch_is_unchanged() -> None:
    set_active_watch(None)
    ret = run_sim(MODEL, {"alloc_bytes": 50 * MiB}, "p", 0, 1)
    assert ret.ok and ret.rss_delta_bytes >= 40 * MiB


def test_concurrent_sims_on_threads_each_get_a_reading(
    watches: Callable[..., TreeWatch],
) -> None:
    watch = watches(0)
    watch.start()
    set_active_watch(watch)
    results: list[int] = []

    def one() -> None:
        r = run_sim(MODEL, {"child_alloc_bytes": 60 * MiB, "child_seconds": 0.3}, "p", 0, 1)
        assert r.ok
        results.append(r.rss_delta_bytes)

    threads = [threading.Thread(target=one) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert len(results) == 2 and min(results) >= 55 * MiB


# --- host and cgroup layout ---------------------------------------------------------

V1 = """12:pids:/user.slice
4:memory:/docker/abc123
1:name=systemd:/init.scope
0::/init.scope
"""
V2 = "0::/system.slice/tidegate.service\n"


def test_parse_cgroup_v1_and_v2() -> None:
    assert parse_cgroup(V1) == ("/docker/abc123", 1)  # the memory controller wins
    assert parse_cgroup(V2) == ("/system.slice/tidegate.service", 2)
    assert parse_cgroup("4:cpu,cpuacct:/x\n") is None
    assert parse_cgroup("") is None
    assert parse_cgroup("5:cpuacct,memory:/a/b\n") == ("/a/b", 1)


def test_parse_cgroup_limit() -> None:
    assert parse_cgroup_limit("max\n") is None
    assert parse_cgroup_limit("9223372036854771712\n") is None  # v1's "no limit"
    assert parse_cgroup_limit("536870912\n") == 512 * MiB
    assert parse_cgroup_limit("") is None
    assert parse_cgroup_limit(None) is None
    assert parse_cgroup_limit("garbage") is None


def test_cgroup_limit_file_paths() -> None:
    assert cgroup_limit_file("/docker/abc", 1, "/r") == "/r/memory/docker/abc/memory.limit_in_bytes"
    assert cgroup_limit_file("/system.slice/t", 2, "/r") == "/r/system.slice/t/memory.max"
    assert cgroup_limit_file("/", 2, "/r") == "/r/memory.max"


def test_host_layout_of_this_process() -> None:
    class Worker:
        class memory_manager:
            memory_limit = 600 * MiB

    layout = host_layout(Worker())
    assert set(layout) == {"hostname", "boot_id", "host_memory", "cgroup", "cgroup_limit",
                           "memory_limit", "pid"}
    assert layout["pid"] == os.getpid()
    assert layout["memory_limit"] == 600 * MiB
    assert layout["host_memory"] == psutil.virtual_memory().total
    assert host_layout()["memory_limit"] is None


# --- the worker plugin ----------------------------------------------------------------


class FakeWorker:
    """What MemoryWatch.setup touches of a distributed.Worker."""

    address = "tcp://127.0.0.1:1"

    def __init__(self, limit: int | None) -> None:
        self.memory_manager = type("MM", (), {"memory_limit": limit})()
        self.metrics: dict[str, Any] = {}
        self.resources: dict[str, float] = {}
        self.events: list[tuple[str, Any]] = []
        # Worker.state.total_resources: what the worker was given at spawn
        self.state = type("State", (), {"total_resources": self.resources})()

    async def set_resources(self, **resources: float) -> None:
        self.resources.update(resources)

    def log_event(self, topic: str, msg: Any) -> None:
        self.events.append((topic, msg))


@pytest.mark.parametrize(("terminate", "fraction"), [(False, 0.95), (None, 0.95), (0.9, 0.9)])
def test_memory_watch_plugin_setup_and_teardown(terminate: object, fraction: float) -> None:
    import asyncio

    import dask.config

    from tidegate.memwatch import active_watch
    from tidegate.worker import (
        IDLE_RSS_METRIC,
        MEMORY_RESOURCE,
        TREE_RSS_METRIC,
        memory_watch_plugin,
    )

    worker = FakeWorker(600 * MiB)
    plugin = memory_watch_plugin()
    with dask.config.set({"distributed.worker.memory.terminate": terminate}):
        asyncio.run(plugin.setup(worker))
    try:
        watch = active_watch()
        assert watch is not None and watch is plugin.watch
        assert watch.terminate_fraction == fraction and watch.memory_limit == 600 * MiB
        assert worker.resources == {MEMORY_RESOURCE: float(600 * MiB)}
        wait_for(lambda: worker.metrics[TREE_RSS_METRIC](worker) > 0)
        assert worker.metrics[IDLE_RSS_METRIC](worker) > 0
        assert watch.on_kill is not None
        report = KillReport("k", 1, 2, 3, 600 * MiB)
        watch.on_kill(report)
        assert worker.events == [("tidegate-memory-kill", {
            "worker": worker.address, "key": "k", "child_pid": 1, "child_rss": 2,
            "tree_rss": 3, "limit": 600 * MiB,
        })]
    finally:
        asyncio.run(plugin.teardown(worker))
    assert active_watch() is None and plugin.watch is None
    assert watch._thread is None


def test_memory_watch_plugin_without_a_limit_offers_no_resource() -> None:
    import asyncio

    from tidegate.memwatch import active_watch
    from tidegate.worker import memory_watch_plugin

    worker = FakeWorker(None)
    plugin = memory_watch_plugin()
    asyncio.run(plugin.setup(worker))
    try:
        assert worker.resources == {}
        assert active_watch() is plugin.watch and plugin.watch is not None
        assert plugin.watch.limit_bytes == 0
    finally:
        asyncio.run(plugin.teardown(worker))


def test_a_resource_given_at_spawn_is_not_set_again() -> None:
    """Setting it again would reset the scheduler's count of what running tasks hold."""
    import asyncio

    from tidegate.worker import MEMORY_RESOURCE, MemoryWatch

    worker = FakeWorker(600 * 2**20)
    worker.resources[MEMORY_RESOURCE] = float(600 * 2**20)
    calls: list[dict[str, float]] = []

    async def record(**resources: float) -> None:
        calls.append(resources)

    worker.set_resources = record  # type: ignore[method-assign]
    plugin = MemoryWatch()
    asyncio.run(plugin.setup(worker))
    try:
        assert calls == []
    finally:
        asyncio.run(plugin.teardown(worker))
