"""The terminal progress bar: one line of the terminal's width, whatever the width, with
done/total first and the rest dropped from the end when the terminal is narrow."""

from __future__ import annotations

import io
import logging

import pytest
from rich.console import Console
from rich.file_proxy import FileProxy
from rich.text import Text

from tidegate.progress import BarLine, TerminalBar, bar_parts, describe, search_text
from tidegate.report import Progress


def _snap(**kw: object) -> Progress:
    base: dict[str, object] = dict(
        job_id="j", total=100000, done=12345, ok=12342, failed=3, resumed=0, batch_size=128,
        inflight_params=10, inflight_tasks=30, rate=12.3, elapsed=3723.0, oom_events=2)
    base.update(kw)
    return Progress(**base)  # type: ignore[arg-type]


def _render(p: Progress, width: int, color: bool) -> list[str]:
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=color,
                      color_system="truecolor" if color else None)
    console.print(BarLine(p))
    return [Text.from_ansi(line).plain for line in buf.getvalue().splitlines()]


@pytest.mark.parametrize("color", [True, False])
@pytest.mark.parametrize("width", [*range(8, 130), 200, 400])
def test_bar_is_one_line_no_wider_than_the_terminal(width: int, color: bool) -> None:
    for p in (_snap(), _snap(total=10, done=0, failed=0, rate=0.0, elapsed=0.0),
              _snap(done=100000)):
        lines = _render(p, width, color)
        assert len(lines) == 1, lines
        assert len(lines[0]) <= width, lines
        assert lines[0].lstrip("━╸╺ ").startswith(f"{p.done}/{p.total}"[:width]), lines


def test_everything_fits_at_60_columns_for_a_usual_sweep() -> None:
    """done/total, ETA, B, OOM events, rate and elapsed, beside a bar, at 60 columns."""
    p = _snap(total=5000, done=1234, failed=0, rate=8.5, elapsed=145.0, batch_size=32)
    (line,) = _render(p, 60, color=True)
    assert line.startswith("━")
    for part in ("1234/5000", "ETA 7:23", "B=32", "OOM 2", "8.5/s", "2:25"):
        assert part in line, line


def test_narrow_terminal_drops_from_the_end() -> None:
    p = _snap()
    wide = " ".join(_render(p, 200, color=False)[0].split())
    assert wide.endswith(" ".join(bar_parts(p)))
    narrow = _render(p, 40, color=False)[0]
    assert "12345/100000" in narrow and "ETA" in narrow and "failed" not in narrow


def test_log_lines_print_above_the_bar_on_their_own_line() -> None:
    """While the bar shows, a log record that goes through its console (as tidegate's
    handler on a terminal does) comes out as a line of its own."""
    stream = io.StringIO()
    console = Console(file=stream, width=60, force_terminal=True)
    handler = logging.StreamHandler(FileProxy(console, stream))
    root = logging.getLogger()
    saved = root.handlers[:]
    root.handlers[:] = [handler]
    try:
        bar = TerminalBar(console)
        bar.update(_snap(total=10, done=3))
        logging.getLogger("tidegate.test").warning("param p3 failed: boom")
        bar.update(_snap(total=10, done=10))
        bar.clear()
    finally:
        root.handlers[:] = saved
    lines = [Text.from_ansi(line).plain.strip() for line in stream.getvalue().splitlines()]
    assert "param p3 failed: boom" in lines, lines
    assert any(line.startswith("━") and "10/10" in line for line in lines), lines


SEARCH = {"objective": "fit", "sampler": "tpe", "trials": 40, "told": 12, "failed": 0,
          "parallel": 4, "best": {"trial": 7, "param_id": "ab12cd34ef56ab78",
                                  "loss": 1.23456789, "values": {"beta": 0.3, "gamma": 0.1}}}


def test_a_search_shows_its_best_loss_compactly_in_the_bar_and_the_lines() -> None:
    """The bar keeps `best LOSS` right after the ETA, and the progress line ends with it;
    before a loss is told (or for a sweep) neither says best."""
    p = _snap(total=40, done=12, failed=0, search=SEARCH)
    assert bar_parts(p)[:3] == ["12/40", bar_parts(p)[1], "best 1.235"]
    assert describe(p).endswith("  best 1.235")
    (line,) = _render(p, 60, color=False)
    assert "best 1.235" in line
    for search in (None, {**SEARCH, "told": 0, "best": None}):
        q = _snap(search=search)
        assert not any(part.startswith("best") for part in bar_parts(q))
        assert "best" not in describe(q)


def test_a_searchs_standing_in_one_line() -> None:
    assert search_text(SEARCH) == ("told 12/40, best 1.23457 at {beta=0.3, gamma=0.1} "
                                   "(trial 7)")
    assert search_text({**SEARCH, "failed": 3, "best": None}) == (
        "told 12/40 (3 failed), no loss told yet")
