"""Progress on a terminal (a rich live bar, log lines printed above it) or in logs (a
line every few seconds)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping
from typing import Any

from rich import progress as rp
from rich.console import Console, ConsoleOptions, RenderResult
from rich.progress_bar import ProgressBar
from rich.segment import Segment
from rich.table import Column
from rich.text import Text

from tidegate.logs import stderr_console
from tidegate.report import Progress

log = logging.getLogger("tidegate.progress")

# The bar is kept at least this wide while any of its text can be dropped instead: a
# bar of two cells says nothing.
MIN_BAR = 8


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    seconds = round(seconds)
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def value_text(value: Any) -> str:
    """A parameter value or a loss, short: six significant digits for a float."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def best_loss(search: Mapping[str, Any] | None) -> str | None:
    """``best 1.234`` for a search with a told loss, else None: the compact form the
    bar and the progress lines show."""
    best = (search or {}).get("best")
    if not isinstance(best, Mapping) or not isinstance(best.get("loss"), int | float):
        return None
    return f"best {best['loss']:.4g}"


def search_text(search: Mapping[str, Any]) -> str:
    """A search's standing, one line: told T/N (F failed), best LOSS at {values}
    (trial K), for the run's summary and `tidegate status`."""
    text = f"told {search.get('told', 0)}/{search.get('trials', '?')}"
    if search.get("failed"):
        text += f" ({search['failed']} failed)"
    best = search.get("best")
    if not isinstance(best, Mapping) or best.get("loss") is None:
        return text + ", no loss told yet"
    values = ", ".join(f"{k}={value_text(v)}" for k, v in (best.get("values") or {}).items())
    text += f", best {value_text(float(best['loss']))} at {{{values}}}"
    if best.get("trial") is not None:
        text += f" (trial {best['trial']})"
    return text


def describe(p: Progress) -> str:
    """One line: done/total, B, in flight, rate, ETA (and a search's best loss)."""
    best = best_loss(p.search)
    return (
        f"{p.done}/{p.total} params ({p.failed} failed)  B={p.batch_size}  "
        f"in flight {p.inflight_params} params / {p.inflight_tasks} tasks  "
        f"{p.rate:.1f} params/s  ETA {_duration(p.eta_seconds)}"
        + (f"  {best}" if best else "")
    )


def bar_parts(p: Progress, since: float = 0.0) -> list[str]:
    """The bar's text, most important first: what is dropped on a narrow terminal goes
    from the end. ``since``: seconds since the snapshot, so that elapsed and ETA move
    between the runner's snapshots (a long param may hold the next one for minutes)."""
    running = p.done < p.total
    elapsed = p.elapsed + (since if running else 0.0)
    eta = p.eta_seconds
    if eta is not None and running:
        eta = max(eta - since, 0.0)
    parts = [f"{p.done}/{p.total}", f"ETA {_duration(eta)}", f"B={p.batch_size}",
             f"OOM {p.oom_events}", f"{p.rate:.1f}/s", _duration(elapsed)]
    if (best := best_loss(p.search)) is not None:  # what a search is for: kept before B
        parts.insert(2, best)
    if p.failed:  # also in the summary, and each failure is logged as it comes
        parts.append(f"{p.failed} failed")
    return parts


class BarLine:
    """One line no wider than it is given: a rich bar and as much of the text
    (:func:`bar_parts`) as fits beside a bar of at least :data:`MIN_BAR` cells."""

    def __init__(self, p: Progress, since: float = 0.0):
        self.p = p
        self.since = since

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        parts = bar_parts(self.p, self.since)
        text = "  ".join(parts)
        while len(parts) > 1 and width - len(text) - 1 < MIN_BAR:
            if "  " in text:  # tighter first, then drop from the end
                text = " ".join(parts)
                continue
            parts.pop()
            text = "  ".join(parts)
        bar_width = width - len(text) - 1
        if bar_width < MIN_BAR:  # not even done/total beside a bar: the text alone
            line = Text(text, no_wrap=True, overflow="crop")
            line.truncate(width)
            yield line
            return
        total = self.p.total or 1
        done = self.p.done if self.p.total else 1
        drawn = list(_inline(console, options.update_width(bar_width),
                             ProgressBar(total=total, completed=done, width=bar_width)))
        yield from drawn
        # Without colour rich leaves the bar's remainder undrawn: pad it, so that the
        # text stays put as the bar grows.
        yield Segment(" " * (bar_width - Segment.get_line_length(drawn)))
        yield Text(" " + text, no_wrap=True, overflow="crop", end="\n")


def _inline(console: Console, options: ConsoleOptions, renderable: Any) -> Iterator[Segment]:
    """A one-line renderable without its line break, to be followed on the same line."""
    for segment in console.render(renderable, options):
        if segment.text != "\n":
            yield segment


class _LineColumn(rp.ProgressColumn):
    """The whole bar line, as one column that takes the terminal's full width."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(ratio=1, no_wrap=True))

    def render(self, task: rp.Task) -> BarLine:
        snap: Progress = task.fields["snap"]
        return BarLine(snap, time.monotonic() - task.fields["at"])


class TerminalBar:
    """A live progress bar on a terminal, as wide as the terminal (re-read at every
    redraw, so that a resized window is followed). It is drawn on the console that log
    lines go through (tidegate.logs), so that they print above it on lines of their own,
    and so does anything else written to stderr while it shows."""

    def __init__(self, console: Console | None = None, refresh_per_second: float = 4):
        self.console = console if console is not None else stderr_console()
        self.bar = rp.Progress(_LineColumn(), console=self.console, expand=True,
                               refresh_per_second=refresh_per_second,
                               redirect_stdout=False, redirect_stderr=True)
        self._task: rp.TaskID | None = None
        self._live = False

    def update(self, p: Progress) -> None:
        now = time.monotonic()
        if self._task is None:
            self._task = self.bar.add_task("", total=None, snap=p, at=now)
        else:
            self.bar.update(self._task, snap=p, at=now)
        if not self._live:
            self.bar.start()
            self._live = True

    def clear(self) -> None:
        """Leave the last bar on screen and stop redrawing it; what follows is printed
        below it."""
        if self._live:
            self.bar.stop()
            self._live = False


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
