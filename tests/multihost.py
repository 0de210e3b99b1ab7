"""Hosts of their own on one machine: each a Linux network namespace with one address on
a private bridge, for a `dask scheduler`, `dask worker` processes and tidegate that reach
each other only over that bridge (10.77.0.0/24, nothing routed off the machine).

A partition is a host's cable pulled: its port on the bridge set down. Packets to and
from it are then dropped without an error, as across a failed switch or a dead host;
neither side's kernel says anything until its TCP timeouts give up.

Layout (``SUFFIX`` is random per run, so runs never share a name)::

    netns tgmh<pid>-<SUFFIX>-sw      the switch: bridge br0 and one veth port per host
    netns tgmh<pid>-<SUFFIX>-sched   eth0 10.77.0.1   dask scheduler on :8786
    netns tgmh<pid>-<SUFFIX>-w1      eth0 10.77.0.11  dask worker, restarted when it exits
    netns tgmh<pid>-<SUFFIX>-w2      eth0 10.77.0.12  (likewise)
    netns tgmh<pid>-<SUFFIX>-client  eth0 10.77.0.100 tidegate

Needs root and iproute2's ``ip``. ``close`` kills every process started here (by
process group) and deletes the namespaces, which deletes their veths and the bridge;
namespaces left by a test process that died are deleted at the next start.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "tgmh"
SUBNET = "10.77.0"
SCHEDULER_PORT = 8786


class NetnsUnavailable(RuntimeError):
    """This machine cannot build the hosts (not root, no ``ip``, no netns support)."""


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NetnsUnavailable(f"`ip {' '.join(args)}` failed ({proc.returncode}): "
                               f"{proc.stderr.strip()}")


def check_can_build() -> None:
    """Raise NetnsUnavailable naming what is missing."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("building network namespaces needs root (uid 0); "
                               f"running as uid {os.geteuid()}")
    if shutil.which("ip") is None:
        raise NetnsUnavailable("iproute2's `ip` is not on PATH (Debian: apt-get install "
                               "iproute2)")


def remove_stale() -> None:
    """Delete namespaces of this harness whose creating process is gone (a test run that
    was killed before its finalizer ran)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                         check=False).stdout
    for line in out.splitlines():
        name = line.split()[0] if line.split() else ""
        m = re.fullmatch(rf"{PREFIX}(\d+)-\w+-\w+", name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid == os.getpid() or _alive(pid):
            continue
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


def _address_in(sched_file: Path) -> str | None:
    try:
        return str(json.loads(sched_file.read_text())["address"])
    except (OSError, ValueError, KeyError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass
class Host:
    name: str
    netns: str
    address: str  # its IPv4 address on the bridge
    port: str  # its veth end in the switch namespace


class Lines:
    """A process's stderr (or stdout) read on a thread: every line kept, and a wait for
    the first line matching a pattern, so a test acts on what the process reported."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._done = False
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            with self._cond:
                self.lines.append(line)
                self._cond.notify_all()
        stream.close()  # type: ignore[attr-defined]
        with self._cond:
            self._done = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> str | None:
        """The first line matching ``pattern`` (a regex), waiting up to ``timeout`` s;
        None if the stream ended or the time ran out first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        seen = 0
        with self._cond:
            while True:
                for line in self.lines[seen:]:
                    if rx.search(line):
                        return line
                seen = len(self.lines)
                left = deadline - time.monotonic()
                if self._done or left <= 0:
                    return None
                self._cond.wait(left)

    def text(self) -> str:
        self._thread.join(timeout=10)
        return "".join(self.lines)


@dataclass
class Hosts:
    """A scheduler host, ``workers`` worker hosts and a client host (see the module)."""

    root: Path  # logs and the scheduler file
    workers: int = 2
    # Dask settings for the scheduler's and workers' processes, e.g. the worker TTL.
    dask_env: Mapping[str, str] = field(default_factory=dict)
    worker_args: Sequence[str] = ("--nthreads", "2", "--memory-limit", "1GiB")
    tag: str = field(default_factory=lambda: f"{PREFIX}{os.getpid()}-{secrets.token_hex(2)}")
    hosts: dict[str, Host] = field(default_factory=dict)
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    _built: list[str] = field(default_factory=list)

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    @property
    def scheduler_address(self) -> str:
        return f"tcp://{self.hosts['sched'].address}:{SCHEDULER_PORT}"

    def worker_hosts(self) -> list[Host]:
        return [h for n, h in self.hosts.items() if n.startswith("w")]

    # --- network --------------------------------------------------------------------

    def build(self) -> None:
        check_can_build()
        remove_stale()
        self.root.mkdir(parents=True, exist_ok=True)
        self._add_netns(self.switch)
        _ip("-n", self.switch, "link", "set", "lo", "up")
        _ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
        _ip("-n", self.switch, "link", "set", "br0", "up")
        names = [("sched", 1), *((f"w{i}", 10 + i) for i in range(1, self.workers + 1)),
                 ("client", 100)]
        for name, octet in names:
            host = Host(name, f"{self.tag}-{name}", f"{SUBNET}.{octet}", f"port-{name}")
            self._add_netns(host.netns)
            _ip("-n", self.switch, "link", "add", host.port, "type", "veth", "peer", "name",
                "eth0", "netns", host.netns)
            _ip("-n", self.switch, "link", "set", host.port, "master", "br0", "up")
            _ip("-n", host.netns, "link", "set", "lo", "up")
            _ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
            _ip("-n", host.netns, "link", "set", "eth0", "up")
            self.hosts[name] = host

    def _add_netns(self, name: str) -> None:
        _ip("netns", "add", name)
        self._built.append(name)

    def partition(self, name: str) -> None:
        """Pull the host's cable: its port on the bridge goes down."""
        _ip("-n", self.switch, "link", "set", self.hosts[name].port, "down")

    def heal(self, name: str) -> None:
        _ip("-n", self.switch, "link", "set", self.hosts[name].port, "up")

    # --- processes ------------------------------------------------------------------

    def command(self, name: str, argv: Sequence[str | Path]) -> list[str]:
        """``argv`` run on host ``name``."""
        return ["ip", "netns", "exec", self.hosts[name].netns, *map(str, argv)]

    def _env(self) -> dict[str, str]:
        return dict(os.environ, PYTHONUNBUFFERED="1", **self.dask_env)

    def _start(self, key: str, argv: Sequence[str]) -> subprocess.Popen[bytes]:
        log = (self.root / f"{key}.log").open("ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT,
                                env=self._env(), start_new_session=True)
        log.close()
        self._procs[key] = proc
        return proc

    def start_scheduler(self, timeout: float = 60) -> None:
        """Start `dask scheduler` on its host and wait until it listens."""
        sched_file = self.root / "scheduler.json"
        sched_file.unlink(missing_ok=True)
        host = self.hosts["sched"]
        proc = self._start("scheduler", self.command("sched", [
            sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", host.address,
            "--port", str(SCHEDULER_PORT), "--no-dashboard",
            "--scheduler-file", str(sched_file)]))
        deadline = time.monotonic() + timeout
        # The scheduler writes the file once it listens (not atomically: it may be seen
        # empty first).
        while _address_in(sched_file) != self.scheduler_address:
            if proc.poll() is not None:
                raise RuntimeError(f"dask scheduler exited {proc.returncode}: "
                                   f"{self.log('scheduler')[-2000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("dask scheduler did not start")
            time.sleep(0.05)

    def kill_scheduler(self) -> None:
        """SIGKILL the scheduler process: its host going down with it."""
        self._kill("scheduler")

    def start_workers(self) -> None:
        """One `dask worker` a worker host, under a supervisor loop that starts it again
        whenever it exits, as systemd's Restart=always or a Kubernetes pod would: Dask
        has no worker reconnection, a worker whose scheduler comm breaks closes itself
        and its nanny."""
        for host in self.worker_hosts():
            worker = " ".join([
                sys.executable, "-m", "distributed.cli.dask_worker", self.scheduler_address,
                "--host", host.address, "--name", host.name, "--no-dashboard",
                *self.worker_args])
            starts = self.root / f"{host.name}.starts"
            # The 1 s before a restart is the supervisor's restart delay (RestartSec).
            loop = (f"while :; do echo start >> {starts}; {worker}; "
                    f"echo exit $? >> {starts}; sleep 1; done")
            self._start(host.name, self.command(host.name, ["sh", "-c", loop]))

    def starts(self, name: str) -> int:
        """How many times host ``name``'s supervisor started `dask worker`."""
        path = self.root / f"{name}.starts"
        return path.read_text().split().count("start") if path.exists() else 0

    def wait_for_workers(self, n: int, timeout: float = 60) -> None:
        """Wait, from the client host, until the scheduler has ``n`` workers."""
        probe = ("import sys; from distributed import Client; "
                 f"c = Client({self.scheduler_address!r}, timeout=30); "
                 f"c.wait_for_workers({n}, timeout={timeout}); c.close()")
        proc = subprocess.run(self.command("client", [sys.executable, "-c", probe]),
                              capture_output=True, text=True, env=self._env(),
                              timeout=timeout + 30, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{n} workers did not join: {proc.stderr[-2000:]}")

    def log(self, key: str) -> str:
        path = self.root / f"{key}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _kill(self, key: str) -> None:
        proc = self._procs.pop(key, None)
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)

    def close(self) -> None:
        """Kill every process started here, then delete the namespaces (their veths and
        the bridge go with them). Safe to call more than once, and after a failed build."""
        for key in list(self._procs):
            self._kill(key)
        for name in reversed(self._built):
            # A namespace's processes must be gone first, or it lingers unnamed.
            pids = subprocess.run(["ip", "netns", "pids", name], capture_output=True,
                                  text=True, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
        self._built.clear()


@dataclass
class Run:
    """A process started on a host, its stdout and stderr each read into Lines (so a
    test can wait for a log line while it runs)."""

    proc: subprocess.Popen[str]
    out: Lines
    err: Lines

    def wait(self, timeout: float) -> int:
        """Its exit code, killing it (its process group) if it outlives ``timeout``."""
        try:
            return self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=30)


def run_in(hosts: Hosts, name: str, argv: Sequence[str | Path],
           cwd: Path | None = None, env: Mapping[str, str] | None = None) -> Run:
    """Start ``argv`` on host ``name``."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    proc = subprocess.Popen(hosts.command(name, argv), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=cwd, env=full_env,
                            start_new_session=True)
    return Run(proc, Lines(proc.stdout), Lines(proc.stderr))


def until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.1)
