"""`tidegate run` on a real terminal: tmux (which `make test` installs) gives it a pseudo-
terminal of a set width, and its screen, scrollback included, is read back afterwards."""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, synthetic_spec, write_spec

BAR = "━╸╺"


def _tmux() -> str:
    path = shutil.which("tmux")
    if path is None:
        pytest.fail("tmux not found: `make test` installs it (Debian's tmux package)")
    return path


class _Pane:
    """`tidegate ARGS` in a detached tmux pane WIDTH columns wide, on a tmux server of
    its own. The pane stays open after tidegate exits (cat waits on the terminal), and
    a wait-for channel says when it did."""

    def __init__(self, tmp_path: Path, width: int, *args: str):
        self.tmux = [_tmux(), "-L", f"tidegate-test-{os.getpid()}-{width}", "-f", "/dev/null"]
        command = " ".join([
            "env", "-u", "COLUMNS", "-u", "LINES", f"PYTHONPATH={shlex.quote(str(REPO))}",
            shlex.quote(sys.executable), "-m", "tidegate", *map(shlex.quote, args),
        ])
        script = (f"cd {shlex.quote(str(tmp_path))} && {command}; "
                  f"echo EXIT=$?; {shlex.join([*self.tmux, 'wait-for', '-S', 'done'])}; "
                  "exec cat")
        self._tmux("new-session", "-d", "-s", "t", "-x", str(width), "-y", "24",
                   "sh", "-c", script)

    def _tmux(self, *args: str, timeout: float = 30) -> str:
        return subprocess.run([*self.tmux, *args], check=True, timeout=timeout,
                              capture_output=True).stdout.decode("utf-8")

    def screen(self) -> list[str]:
        """The pane's lines, scrollback included, wrapped lines joined (-J): a line
        wider than the pane shows as one."""
        text = self._tmux("capture-pane", "-p", "-J", "-S", "-", "-t", "t")
        return [line.rstrip() for line in text.splitlines()]

    def wait_done(self) -> list[str]:
        self._tmux("wait-for", "done", timeout=240)
        return self.screen()

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], check=False, timeout=30)


@contextlib.contextmanager
def _pane(tmp_path: Path, width: int, *args: str) -> Iterator[_Pane]:
    pane = _Pane(tmp_path, width, *args)
    try:
        yield pane
    finally:
        pane.close()


@pytest.mark.parametrize("width", [120, 80, 60])
def test_bar_fits_the_terminal_and_log_lines_print_above_it(
    tmp_path: Path, width: int
) -> None:
    values = [{"k": i, "run_seconds": 0.2, "fail": "boom" if i == 3 else ""}
              for i in range(12)]
    write_spec(tmp_path / "job.yaml",
               synthetic_spec(12, parameters={"values": values}, replicates=1))
    with _pane(tmp_path, width, "run", "job.yaml", "--workers", "2",
               "--threads-per-worker", "1") as pane:
        lines = pane.wait_done()
    text = "\n".join(lines)
    assert "EXIT=4" in lines, text  # one param failed: completed with failures
    # Everything up to the summary fits the width: log lines, warnings and the bar. The
    # summary after it is printed as is, so that a long output path stays one line
    # when copied from a terminal that wraps it.
    summary = next(i for i, line in enumerate(lines) if line.startswith("job synthetic: "))
    assert all(len(line) <= width for line in lines[:summary]), text
    # Redrawn in place: only the final bar is left in the scrollback, not one per redraw.
    bars = [line for line in lines if line and line[0] in BAR]
    assert len(bars) == 1, text
    assert "12/12" in bars[0].split() and "B=" in bars[0] and "OOM 0" in bars[0], text
    # The failure's WARNING on a line of its own (rich may wrap it), never on the bar's.
    warned = [i for i, line in enumerate(lines) if "WARNING action=param_failed" in line]
    assert len(warned) == 1, text
    assert not any(c in lines[warned[0]] for c in BAR), text
    assert warned[0] < lines.index(bars[0]), text
    assert "Traceback" not in text, text

