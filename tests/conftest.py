"""Shared helpers: run the real CLI in a subprocess, write job specs, read outputs back."""

from __future__ import annotations

import contextlib
import importlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest
import yaml
from hypothesis import settings

# No deadline per example: Hypothesis' default of 200 ms is a timing assertion, and on a
# loaded 2-core machine running two test files at once an example of the controller's
# properties took 778 ms. A property's examples still have to pass; how fast is bench's.
settings.register_profile("tidegate", deadline=None)
settings.load_profile("tidegate")

REPO = Path(__file__).resolve().parents[1]
SIR_DIR = REPO / "examples" / "sir"


@contextlib.contextmanager
def temp_module(folder: Path, source: str, prefix: str) -> Iterator[str]:
    """A uniquely named module of ``source`` in ``folder``, importable inside the block;
    sys.path and sys.modules restored after."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    (folder / f"{name}.py").write_text(source)
    saved_path, saved_modules = list(sys.path), set(sys.modules)
    sys.path.insert(0, str(folder))
    importlib.invalidate_caches()
    try:
        yield name
    finally:
        sys.path[:] = saved_path
        for m in set(sys.modules) - saved_modules:
            del sys.modules[m]


def tidegate(
    *args: str | Path, timeout: float = 300, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tidegate ARGS`` to completion, capturing its output. One still
    running after ``timeout`` seconds is sent SIGABRT, on which Python's faulthandler
    writes every thread's stack to stderr, and the test fails with the tail of it: a
    hang says where it hangs."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    command = [sys.executable, "-m", "tidegate", *map(str, args)]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, cwd=cwd, env=env) as proc:
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            try:
                out, err = proc.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                out, err = proc.communicate()
            tail = "\n".join((err or "").splitlines()[-200:])
            raise AssertionError(
                f"`tidegate {' '.join(map(str, args))}` still running after {timeout} s; "
                f"its stderr ends:\n{tail}") from None
    return subprocess.CompletedProcess(command, proc.returncode, out, err)


def start_tidegate(*args: str | Path, cwd: Path | None = None) -> subprocess.Popen[str]:
    """Start ``python -m tidegate ARGS`` in its own session (so a test can kill the
    whole process group: tidegate and its LocalCluster's worker processes)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "tidegate", *map(str, args)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=cwd, env=env,
        start_new_session=True,
    )


def write_spec(path: Path, spec: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(spec), sort_keys=False))
    return path


def synthetic_spec(n: int, **overrides: Any) -> dict[str, Any]:
    """A spec over the packaged synthetic workload: ``n`` params, 2 replicates, 1 target."""
    spec: dict[str, Any] = {
        "job_id": "synthetic",
        "model": "tidegate.workloads:synthetic",
        "parameters": {"values": [{"k": i, "output_bytes": 1024} for i in range(n)]},
        "replicates": 2,
        "seed": 7,
        "targets": [{"name": "score", "function": "tidegate.workloads:synthetic_loss"}],
        "output": "out",
    }
    spec.update(overrides)
    return spec


def read_dataset(path: Path) -> list[dict[str, Any]]:
    """A dataset's rows, sorted, read with pyarrow alone (no tidegate code)."""
    table = ds.dataset(path, format="parquet").to_table()
    keys = [c for c in ("param_id", "replicate", "day") if c in table.column_names]
    return sorted(table.to_pylist(), key=lambda r: (*tuple(str(r[k]) for k in keys), str(r)))


@pytest.fixture
def sir_dir() -> Path:
    return SIR_DIR


def committed_parts(out: Path) -> int:
    """Parts the ledger has committed (a part file on disk may not be committed yet)."""
    ledger = out / "_ledger.sqlite"
    if not ledger.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as db:
            return db.execute("SELECT COUNT(*) FROM parts").fetchone()[0]
    except sqlite3.Error:  # the schema is still being created
        return 0


def wait_for_part(proc: subprocess.Popen[str], out: Path, timeout: float = 120) -> bool:
    """Wait until ``out`` has a committed part, or the process ends first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if committed_parts(out):
            return True
        try:
            proc.wait(timeout=0.05)
            return False
        except subprocess.TimeoutExpired:
            continue
    raise TimeoutError(f"no part appeared in {out} within {timeout} s")


def wait_quietly(proc: subprocess.Popen[str], seconds: float) -> None:
    """Let ``proc`` run for up to ``seconds`` (returns early if it ends)."""
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=seconds)
