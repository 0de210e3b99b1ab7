"""Progress on a terminal (a bar redrawn in place) or in logs (a line every few seconds)."""

from __future__ import annotations

import logging
import sys
import time
from typing import TextIO

from tidegate.report import Progress

log = logging.getLogger("tidegate.progress")


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def describe(p: Progress) -> str:
    """One line: done/total, B, in flight, rate, ETA."""
    return (
        f"{p.done}/{p.total} params ({p.failed} failed)  B={p.batch_size}  "
        f"in flight {p.inflight_params} params / {p.inflight_tasks} tasks  "
        f"{p.rate:.1f} params/s  ETA {_duration(p.eta_seconds)}"
    )


class TerminalBar:
    """A progress bar redrawn in place on a terminal, at most every ``interval`` s."""

    def __init__(self, stream: TextIO = sys.stderr, width: int = 28, interval: float = 0.2):
        self.stream = stream
        self.width = width
        self.interval = interval
        self._last = 0.0
        self._drawn = False

    def update(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last < self.interval and p.done < p.total:
            return
        self._last = now
        frac = p.done / p.total if p.total else 1.0
        filled = int(frac * self.width)
        bar = "#" * filled + "-" * (self.width - filled)
        self.stream.write(f"\r\x1b[K[{bar}] {frac:6.1%} {describe(p)}")
        self.stream.flush()
        self._drawn = True

    def clear(self) -> None:
        """Move off the bar's line so that what follows starts on a fresh one."""
        if self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


class LogLines:
    """A log line every ``interval`` seconds, for services and redirected output."""

    def __init__(self, interval: float = 5.0):
        self.interval = interval
        self._last = time.monotonic()

    def update(self, p: Progress) -> None:
        now = time.monotonic()
        if now - self._last >= self.interval:
            self._last = now
            log.info("%s", describe(p), extra={"action": "progress"})

    def clear(self) -> None:
        return None
