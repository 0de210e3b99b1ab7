"""A real `tidegate serve`: a rotated token file works without a restart, unauthenticated
bodies are never held in memory, and oversized specs are 400 while /healthz answers."""

from __future__ import annotations

import contextlib
import http.client
import json
import selectors
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.daemon_harness import Daemon, base_config

MIB = 2**20


def _rss(pid: int) -> int:
    """The process's resident set size in bytes (Linux)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("limits")
    (root / "token").write_text("first-token\n")
    d = Daemon(root, base_config(root, security={"token_file": str(root / "token")},
                                 limits={"max_params": 1000}), token="first-token")
    d.start()
    yield d
    d.stop()


def _post_unauthenticated(port: int, size: int) -> int:
    """POST a ``size``-byte body without a token, headers first: the status line that
    comes back before any of the body is sent, then the body pushed at the socket as a
    naive client would (the daemon may close the connection instead of reading it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=60) as sock:
        sock.sendall(f"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n"
                     "Expect: 100-continue\r\n\r\n".encode())
        status = int(sock.makefile("rb").readline().split()[1])
        with contextlib.suppress(OSError):  # reset once the daemon closes: expected
            sock.sendall(b"x" * size)
        return status


def test_unauthenticated_bodies_are_not_buffered(daemon: Daemon) -> None:
    """Twenty 15 MiB bodies without a token: each 401 before the body is sent, and the
    daemon's RSS grows by far less than one body (none was buffered)."""
    assert daemon.proc is not None
    _post_unauthenticated(daemon.port, 15 * MIB)  # warm up: the first request allocates
    before = _rss(daemon.proc.pid)
    statuses = [_post_unauthenticated(daemon.port, 15 * MIB) for _ in range(20)]
    grown = _rss(daemon.proc.pid) - before
    assert statuses == [401] * 20
    assert grown < 10 * MIB, f"RSS grew {grown / MIB:.1f} MiB"


def test_oversized_grid_is_400_naming_the_key(daemon: Daemon) -> None:
    """A grid over limits.max_params is refused with 400 from its shape alone."""
    grid = {n: list(range(100)) for n in "abcd"}
    spec = {"model": "tidegate.workloads:synthetic", "parameters": {"grid": grid}}
    status, body = daemon.request("POST", "/v1/jobs", json.dumps(spec))
    assert status == 400, body
    assert "limits.max_params" in body["error"] and "100,000,000" in body["error"]


def test_rotated_token_works_without_a_restart(daemon: Daemon) -> None:
    """The token file replaced (a new inode, as `mv` does): the old token is refused and
    the new one accepted by the same daemon process."""
    assert daemon.proc is not None
    pid = daemon.proc.pid
    assert daemon.request("GET", "/v1/jobs")[0] == 200
    new = daemon.root / "token.new"
    new.write_text("second-token\n")
    new.replace(daemon.root / "token")
    try:
        assert daemon.request("GET", "/v1/jobs")[0] == 401
        daemon.token = "second-token"
        assert daemon.request("GET", "/v1/jobs")[0] == 200
        # Rewritten in place (same inode, another size) works too.
        (daemon.root / "token").write_text("third-token-longer\n")
        daemon.token = "third-token-longer"
        assert daemon.request("GET", "/v1/jobs")[0] == 200
    finally:
        (daemon.root / "token").write_text("first-token\n")
        daemon.token = "first-token"
    assert daemon.proc.pid == pid and daemon.proc.poll() is None


# --- slow clients (slowloris) ------------------------------------------------------------

HEADER_TIMEOUT_S = 5.0
CAP = 60


@pytest.fixture(scope="module")
def guarded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("slow-clients")
    d = Daemon(root, base_config(root, security={"header_timeout_s": HEADER_TIMEOUT_S,
                                                 "max_connections": CAP}))
    d.start()
    yield d
    d.stop()


def _half_sent(port: int) -> socket.socket:
    """A connection that sent part of a request's headers and then nothing more."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.sendall(b"GET /healthz HTTP/1.1\r\nHost: tidegate\r\nX-Slow: ")
    return s


def _closed_within(socks: list[socket.socket], seconds: float,
                   enough: int | None = None) -> list[socket.socket]:
    """The sockets the server closed (EOF or reset) within ``seconds`` from now, or
    as soon as ``enough`` of them are."""
    closed: list[socket.socket] = []
    enough = len(socks) if enough is None else enough
    deadline = time.monotonic() + seconds
    with selectors.DefaultSelector() as sel:
        for s in socks:
            sel.register(s, selectors.EVENT_READ)
        while len(closed) < enough and (left := deadline - time.monotonic()) > 0:
            for key, _ in sel.select(left):
                s = key.fileobj
                assert isinstance(s, socket.socket)
                try:
                    data = s.recv(1024)
                except ConnectionResetError:
                    data = b""
                assert data == b"", f"the server answered a half-sent request: {data!r}"
                sel.unregister(s)
                closed.append(s)
    return closed


def test_half_sent_requests_are_closed_after_the_header_timeout(guarded: Daemon) -> None:
    """50 connections that never finish their headers are all closed by the daemon once
    security.header_timeout_s has passed; /healthz answers meanwhile and after."""
    socks = [_half_sent(guarded.port) for _ in range(50)]
    try:
        assert guarded.request("GET", "/healthz")[0] == 200
        closed = _closed_within(socks, HEADER_TIMEOUT_S + 25)
        assert len(closed) == len(socks), f"{len(socks) - len(closed)} still open"
        assert guarded.request("GET", "/healthz")[0] == 200
    finally:
        for s in socks:
            s.close()


def test_connections_beyond_the_cap_are_closed_at_once(guarded: Daemon) -> None:
    """With security.max_connections open, a new connection is closed straight away (not
    after the header timeout) and logged with a count; a keep-alive connection opened
    before keeps working."""
    keep = http.client.HTTPConnection("127.0.0.1", guarded.port, timeout=10)
    socks: list[socket.socket] = []
    try:
        keep.request("GET", "/healthz")
        first = keep.getresponse()
        assert first.status == 200
        first.read()
        socks = [_half_sent(guarded.port) for _ in range(CAP + 5)]
        promptly = _closed_within(socks, HEADER_TIMEOUT_S / 2)
        # keep plus CAP - 1 held fill the cap: at least the last 5 were refused (a
        # connection of the fixture's probes still closing may make it a few more).
        assert 5 <= len(promptly) <= 10, len(promptly)
        keep.request("GET", "/healthz")
        again = keep.getresponse()
        assert again.status == 200
        again.read()
        assert "over security.max_connections" in guarded.log()
    finally:
        keep.close()
        for s in socks:
            s.close()


def test_a_cap_above_the_fd_limit_is_lowered_so_fds_never_run_out(tmp_path: Path) -> None:
    """With a 512-fd limit, max_connections 5000 is lowered to 256: 400 half-sent
    requests are refused past it instead of exhausting the daemon's fds (no EMFILE, no
    traceback), and once they are gone /healthz answers."""
    d = Daemon(tmp_path, base_config(tmp_path, security={"header_timeout_s": 60,
                                                         "max_connections": 5000}),
               nofile=512)
    d.start()
    socks: list[socket.socket] = []
    try:
        assert "at most 256 connections" in d.log()
        socks = [_half_sent(d.port) for _ in range(400)]
        closed = _closed_within(socks, 30, enough=400 - 256)
        assert len(closed) >= 400 - 256, len(closed)
        for s in socks:
            s.close()
        socks = []
        deadline = time.monotonic() + 60
        while d.request("GET", "/healthz")[0] != 200:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
        log = d.log()
        assert "over security.max_connections" in log
        assert "Too many open files" not in log and "Traceback" not in log
    finally:
        for s in socks:
            s.close()
        d.stop()
