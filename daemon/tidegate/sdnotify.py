"""systemd's sd_notify protocol, without libsystemd: "KEY=value" lines in one datagram to
the AF_UNIX socket named by $NOTIFY_SOCKET (see sd_notify(3)).

Outside systemd (no NOTIFY_SOCKET) every call is a no-op returning False, so the service
calls it unconditionally. A failed send never raises: a lost READY=1 makes systemd time
the start out, which is the right outcome, and the daemon must not die of it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping


class Notifier:
    def __init__(self, env: Mapping[str, str] | None = None) -> None:
        env = os.environ if env is None else env
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self._watchdog_usec = env.get("WATCHDOG_USEC", "")
        self._watchdog_pid = env.get("WATCHDOG_PID", "")
        self.enabled = self._address is not None

    def send(self, **fields: str | int) -> bool:
        """Send ``KEY=value`` lines in one datagram; True when it went out."""
        if self._address is None or not fields:
            return False
        text = "".join(f"{key}={_one_line(value)}\n" for key, value in fields.items())
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.sendto(text.encode(), self._address)
        except OSError:
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send(READY=1, **_status(status))

    def status(self, text: str) -> bool:
        return self.send(STATUS=text)

    def watchdog(self) -> bool:
        return self.send(WATCHDOG=1)

    def stopping(self, status: str | None = None) -> bool:
        return self.send(STOPPING=1, **_status(status))

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings: half of WatchdogSec=, as sd_watchdog_enabled(3)
        advises; None when systemd expects none from this process."""
        if self._watchdog_pid and self._watchdog_pid != str(os.getpid()):
            return None  # the variables were inherited; the watchdog is another process's
        try:
            usec = int(self._watchdog_usec)
        except ValueError:
            return None
        return usec / 2 / 1e6 if usec > 0 else None


def _one_line(value: str | int) -> str:
    # A newline in a value would start a field of its own (STATUS text may hold one).
    return str(value).replace("\n", " ")


def _status(status: str | None) -> dict[str, str]:
    return {} if status is None else {"STATUS": status}


def _socket_address(name: str) -> bytes | None:
    """$NOTIFY_SOCKET as a sendto address: a path, or "@name" for the abstract namespace
    (a leading NUL byte). None when unset or of a kind we do not speak (vsock:...)."""
    if name.startswith("@"):
        return b"\0" + os.fsencode(name[1:])
    if name.startswith("/"):
        return os.fsencode(name)
    return None
