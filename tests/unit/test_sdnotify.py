"""sd_notify over a real AF_UNIX datagram socket, and the shipped systemd unit."""

from __future__ import annotations

import configparser
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidegate.config import DaemonConfig
from tidegate.sdnotify import Notifier

UNIT = Path(__file__).resolve().parents[2] / "config" / "systemd" / "tidegate.service"


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket standing in for systemd's, and its path for NOTIFY_SOCKET."""
    path = str(tmp_path / "notify.sock")
    assert len(path) < 100, "AF_UNIX paths are limited to 108 bytes"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.settimeout(5)
        yield sock, path


def received(sock: socket.socket) -> bytes:
    return sock.recv(4096)


def test_ready_sends_ready_and_status(receiver: tuple[socket.socket, str]) -> None:
    """ready("...") is one datagram: READY=1 then STATUS=."""
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.enabled
    assert notifier.ready("serving on 127.0.0.1:8790")
    assert received(sock) == b"READY=1\nSTATUS=serving on 127.0.0.1:8790\n"
    assert notifier.ready()
    assert received(sock) == b"READY=1\n"


def test_each_message_exactly(receiver: tuple[socket.socket, str]) -> None:
    """status, watchdog, stopping and send put exactly their fields on the wire."""
    sock, path = receiver
    notifier = Notifier({"NOTIFY_SOCKET": path})
    assert notifier.status("2 jobs running")
    assert received(sock) == b"STATUS=2 jobs running\n"
    assert notifier.watchdog()
    assert received(sock) == b"WATCHDOG=1\n"
    assert notifier.stopping("draining 12 params")
    assert received(sock) == b"STOPPING=1\nSTATUS=draining 12 params\n"
    assert notifier.stopping()
    assert received(sock) == b"STOPPING=1\n"
    assert notifier.send(EXTEND_TIMEOUT_USEC=30_000_000, STATUS="still draining")
    assert received(sock) == b"EXTEND_TIMEOUT_USEC=30000000\nSTATUS=still draining\n"


def test_newline_in_a_value_cannot_add_a_field(receiver: tuple[socket.socket, str]) -> None:
    """A newline in STATUS text is flattened, so it cannot smuggle in READY=1."""
    sock, path = receiver
    assert Notifier({"NOTIFY_SOCKET": path}).status("job failed\nREADY=1")
    assert received(sock) == b"STATUS=job failed READY=1\n"


@pytest.mark.skipif(sys.platform != "linux", reason="the abstract namespace is Linux's")
def test_abstract_socket() -> None:
    """NOTIFY_SOCKET=@name addresses the abstract namespace (a leading NUL byte)."""
    name = f"tidegate-test-{uuid.uuid4()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(b"\0" + name.encode())
        sock.settimeout(5)
        assert Notifier({"NOTIFY_SOCKET": f"@{name}"}).ready("up")
        assert sock.recv(4096) == b"READY=1\nSTATUS=up\n"


@pytest.mark.parametrize("env", [{}, {"NOTIFY_SOCKET": ""}, {"NOTIFY_SOCKET": "vsock:2:1"}])
def test_disabled_without_a_usable_socket(env: dict[str, str]) -> None:
    """Without NOTIFY_SOCKET (or with a kind not spoken) every call is a False no-op."""
    notifier = Notifier(env)
    assert not notifier.enabled
    assert not notifier.ready("x")
    assert not notifier.status("x")
    assert not notifier.watchdog()
    assert not notifier.stopping()
    assert not notifier.send(READY=1)


def test_missing_socket_returns_false(tmp_path: Path) -> None:
    """A socket path nobody listens on gives False, never an exception."""
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_reads_os_environ_by_default(
    receiver: tuple[socket.socket, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Notifier() takes NOTIFY_SOCKET from the process environment."""
    sock, path = receiver
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    assert Notifier().watchdog()
    assert received(sock) == b"WATCHDOG=1\n"


@pytest.mark.parametrize(
    ("env", "interval"),
    [
        pytest.param({}, None, id="unset"),
        pytest.param({"WATCHDOG_USEC": "30000000"}, 15.0, id="half-of-30s"),
        pytest.param({"WATCHDOG_USEC": "1000"}, 0.0005, id="microseconds"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<self>"}, 15.0,
                     id="pid-is-ours"),
        pytest.param({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "<other>"}, None,
                     id="pid-is-another"),
        pytest.param({"WATCHDOG_USEC": "0"}, None, id="zero"),
        pytest.param({"WATCHDOG_USEC": "soon"}, None, id="garbage"),
    ],
)
def test_watchdog_interval(env: dict[str, str], interval: float | None) -> None:
    """Half of WATCHDOG_USEC in seconds, unless it is unset or meant for another process."""
    pid = {"<self>": str(os.getpid()), "<other>": str(os.getpid() + 1)}
    env = {k: pid.get(v, v) for k, v in env.items()}
    assert Notifier(env).watchdog_interval() == interval


# --- the systemd unit -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]  # keys are CamelCase
    parser.read_string(UNIT.read_text())
    return parser


def test_unit_runs_serve_as_notify_service(unit: configparser.ConfigParser) -> None:
    """The unit starts `tidegate serve` as Type=notify under a watchdog, as user tidegate."""
    service = unit["Service"]
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["ExecStart"] == (
        "/usr/local/bin/tidegate serve --config /etc/tidegate/tidegate.yaml"
    )
    assert service["WatchdogSec"] == "30"
    assert (service["Restart"], service["RestartSec"]) == ("on-failure", "5")
    assert (service["User"], service["Group"]) == ("tidegate", "tidegate")
    assert service["StateDirectory"] == "tidegate"
    assert service["ConfigurationDirectory"] == "tidegate"
    assert "/var/lib/tidegate" in service["ReadWritePaths"].split()
    assert int(service["LimitNOFILE"]) >= 4096
    assert unit["Install"]["WantedBy"] == "multi-user.target"


def test_unit_stop_outlasts_the_drain(unit: configparser.ConfigParser) -> None:
    """SIGTERM to the main process first, and TimeoutStopSec above drain_timeout_s."""
    service = unit["Service"]
    assert service["KillSignal"] == "SIGTERM"
    assert service["KillMode"] == "mixed"
    assert int(service["TimeoutStopSec"]) > DaemonConfig().drain_timeout_s + 30


def test_unit_is_hardened(unit: configparser.ConfigParser) -> None:
    """The sandbox settings are present with their strict values."""
    service = unit["Service"]
    expected = {
        "NoNewPrivileges": "true",
        "ProtectSystem": "strict",
        "ProtectHome": "true",
        "PrivateTmp": "true",
        "PrivateDevices": "true",
        "ProtectKernelTunables": "true",
        "ProtectKernelModules": "true",
        "ProtectKernelLogs": "true",
        "ProtectControlGroups": "true",
        "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6",
        "RestrictNamespaces": "true",
        "LockPersonality": "true",
        "RestrictRealtime": "true",
        "RestrictSUIDSGID": "true",
        "SystemCallArchitectures": "native",
        "CapabilityBoundingSet": "",
    }
    assert {k: service.get(k) for k in expected} == expected
