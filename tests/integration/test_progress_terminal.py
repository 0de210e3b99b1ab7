"""`tidegate run` on a real terminal: tmux (which `make test` installs) gives it a pseudo-
terminal of a set width, and its screen, scrollback included, is read back afterwards."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, synthetic_spec, write_spec

BAR = "━╸╺"


def _tmux() -> str:
    path = shutil.which("tmux")
    if path is None:
        pytest.fail("tmux not found: `make test` installs it (Debian's tmux package)")
    return path


def _run_in_terminal(tmp_path: Path, width: int, *args: str) -> list[str]:
    """Run `tidegate ARGS` in a detached tmux pane WIDTH columns wide; return the pane's
    lines, wrapped lines joined (-J), so that a line wider than the pane shows as one."""
    tmux = [_tmux(), "-L", f"tidegate-test-{os.getpid()}-{width}", "-f", "/dev/null"]
    command = " ".join([
        "env", "-u", "COLUMNS", "-u", "LINES", f"PYTHONPATH={shlex.quote(str(REPO))}",
        shlex.quote(sys.executable), "-m", "tidegate", *map(shlex.quote, args),
    ])
    # The pane stays open after tidegate exits (cat waits on the terminal), and the
    # wait-for channel says when it did: no polling of the screen.
    script = f"cd {shlex.quote(str(tmp_path))} && {command}; echo EXIT=$?; " \
             f"{shlex.join([*tmux, 'wait-for', '-S', 'done'])}; exec cat"
    subprocess.run([*tmux, "new-session", "-d", "-s", "t", "-x", str(width), "-y", "24",
                    "sh", "-c", script], check=True, timeout=30)
    try:
        subprocess.run([*tmux, "wait-for", "done"], check=True, timeout=240)
        screen = subprocess.run([*tmux, "capture-pane", "-p", "-J", "-S", "-", "-t", "t"],
                                check=True, timeout=30, capture_output=True).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], check=False, timeout=30)
    return [line.rstrip() for line in screen.decode("utf-8").splitlines()]


@pytest.mark.parametrize("width", [80, 60])
def test_bar_fits_the_terminal_and_log_lines_print_above_it(
    tmp_path: Path, width: int
) -> None:
    values = [{"k": i, "run_seconds": 0.2, "fail": "boom" if i == 3 else ""}
              for i in range(12)]
    write_spec(tmp_path / "job.yaml",
               synthetic_spec(12, parameters={"values": values}, replicates=1))
    lines = _run_in_terminal(tmp_path, width, "run", "job.yaml", "--workers", "2",
                             "--threads-per-worker", "1")
    text = "\n".join(lines)
    assert "EXIT=1" in lines, text  # one param failed
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
