"""A 10^6-param grid through `tidegate run` (real LocalCluster, SQLite, Parquet): start-up
never passes over every param, memory stays that of the window, and an interrupted run
resumes with each param once. The whole run is `make bench-scale`."""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import time
from pathlib import Path

from tests.conftest import committed_parts, read_dataset, start_tidegate, write_spec

N = 1000
# Every param expanded at once would be ~10^6 Param objects (several hundred MiB) and
# ~10 s of hashing before the first admission; the window's few params are far below.
MAX_RSS_MIB = 400


def _spec(path: Path) -> Path:
    return write_spec(path, {
        "job_id": "million",
        "model": "tidegate.workloads:synthetic",
        "parameters": {"grid": {"i": list(range(N)), "j": list(range(N)),
                                "output_bytes": [16]}},
        "replicates": 1,
        "seed": 3,
        "outputs": "none",
        "output": "out",
    })


def _peak_rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status)[1]) / 1024  # type: ignore[index]


def _run_until_parts(spec: Path, out: Path, parts: int) -> tuple[int, str, float]:
    """Start `tidegate run`, wait until the ledger holds ``parts`` parts, note the peak
    RSS of the tidegate process, stop it with SIGINT: (exit code, stderr, RSS MiB)."""
    proc = start_tidegate("run", spec, "--flush-params", "20", "--no-progress")
    try:
        deadline = time.monotonic() + 120
        while committed_parts(out) < parts:
            assert time.monotonic() < deadline, "no part committed within 120 s"
            try:
                proc.wait(timeout=0.05)
                raise AssertionError(proc.communicate()[1])
            except subprocess.TimeoutExpired:
                continue
        rss = _peak_rss_mib(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    return proc.returncode, err, rss


def _ledger_ids(out: Path) -> list[str]:
    with sqlite3.connect(out / "_ledger.sqlite") as db:
        return [r[0] for r in db.execute("SELECT param_id FROM params")]


def test_million_params_start_fast_stay_small_and_resume(tmp_path: Path) -> None:
    spec, out = _spec(tmp_path / "job.yaml"), tmp_path / "out"
    code, err, rss = _run_until_parts(spec, out, 1)
    assert code == 130, err
    assert "Traceback" not in err, err
    started = re.search(r"first params admitted, ([\d.]+) s after the process started", err)
    assert started, err
    # The target is 5 s on an idle machine; the embedded cluster's start is in it too,
    # and the test suite runs two files at a time.
    assert float(started[1]) < 30, err
    assert rss < MAX_RSS_MIB, f"peak RSS {rss:.0f} MiB"
    first = len(_ledger_ids(out))
    assert first > 0

    # The first run's parts recorded how far its leading params are all committed (the
    # window's params admitted in order, completing out of order): the resume starts there.
    with sqlite3.connect(out / "_ledger.sqlite") as db:
        (mark,) = db.execute("SELECT position FROM watermarks").fetchone()
    assert 0 < mark <= first

    code, err, rss = _run_until_parts(spec, out, committed_parts(out) + 1)
    assert code == 130, err
    assert f"{first} of {N * N} params already committed" in err, err
    assert f"skipping the first {mark} params without a look-up" in err, err
    assert rss < MAX_RSS_MIB, f"peak RSS {rss:.0f} MiB"
    ids = _ledger_ids(out)
    assert len(ids) > first
    rows = [r["param_id"] for r in read_dataset(out / "params")]
    assert sorted(rows) == sorted(ids) and len(set(rows)) == len(rows)  # each once
