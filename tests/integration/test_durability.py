"""Disk full on a real (tmpfs) filesystem, and one param's unstorable output, through the
real `tidegate run`: a LocalCluster, Parquet and SQLite."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.conftest import read_dataset, synthetic_spec, tidegate, write_spec
from tidegate.store import Ledger
from tidegate.writer import LEDGER as LEDGER_NAME
from tidegate.writer import LOCK


def _summary(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


@contextlib.contextmanager
def _mount_tmpfs(mnt: Path, options: str) -> Iterator[Path]:
    """A tmpfs at ``mnt`` (needs root, as in CI); skipped where it cannot be mounted."""
    mnt.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mnt)],
                          capture_output=True, text=True, check=False)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs."""
    with _mount_tmpfs(tmp_path / "small", "size=2m") as mnt:
        yield mnt


def _fill(fs: Path) -> Path:
    """Fill ``fs``'s blocks (a file) and inodes (empty files) until it says ENOSPC.
    Only a small tmpfs mounted at ``fs``: on any other filesystem this would fill the
    machine's disk."""
    assert os.path.ismount(fs), f"{fs} is not a mount point"
    assert shutil.disk_usage(fs).total <= 64 * 2**20, f"{fs} is larger than 64 MiB"
    filler = fs / "filler"
    filler.mkdir()
    with contextlib.suppress(OSError), (filler / "blocks").open("wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    with contextlib.suppress(OSError):
        for i in itertools.count():
            (filler / f"inode-{i}").touch()
    with pytest.raises(OSError):
        (fs / "probe").write_bytes(b"x")
    return filler


def test_disk_full_interrupts_cleanly_and_resumes_exactly_once(tmp_path: Path,
                                                               small_fs: Path) -> None:
    """On a full disk `run` exits 130 with a message naming the path and no traceback,
    the job `interrupted` with the counts the ledger holds, no temporary file left; once
    the filesystem is grown, a rerun completes every param exactly once."""
    n = 40
    spec = synthetic_spec(n, parameters={"values": [{"k": i, "output_bytes": 64 * 1024}
                                                    for i in range(n)]})
    path = write_spec(tmp_path / "job.yaml", spec)
    out = small_fs / "out"
    args = ("run", path, "--output", out, "--workers", "1", "--flush-params", "2",
            "--json", "--no-progress")
    proc = tidegate(*args)
    assert proc.returncode == 130, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"cannot write {out}" in proc.stderr and "no space left on device" in proc.stderr
    summary = _summary(proc)
    assert summary["state"] == "interrupted"
    with Ledger(out / "_ledger.sqlite") as ledger:
        committed = ledger.counts()
    assert 0 < committed.params < n
    assert summary["params"]["ok"] == committed.ok
    assert [p.name for p in out.rglob(".*")] == [LOCK]  # no temporaries; the lock stays
    ids = [r["param_id"] for r in read_dataset(out / "params")]
    assert len(ids) == len(set(ids)) == committed.params
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    again = tidegate(*args)
    assert again.returncode == 0, again.stderr
    s = _summary(again)
    assert s["state"] == "succeeded" and s["params"]["resumed"] == committed.params
    ids = [r["param_id"] for r in read_dataset(out / "params")]
    assert len(ids) == len(set(ids)) == n
    data = read_dataset(out / "model_outputs" / "data")
    assert len({(r["param_id"], r["replicate"]) for r in data}) == 2 * n
    assert tidegate("verify", out).returncode == 0


MODEL = '''
import pyarrow as pa

def model(params, seed):
    if params["k"] == 1:  # a column Parquet cannot store
        x = pa.UnionArray.from_sparse(pa.array([0, 1], pa.int8()),
                                      [pa.array([1, 2]), pa.array(["a", "b"])])
    else:
        x = pa.array([1.0, 2.0])
    return {"data": pa.table({"x": x})}
'''


def test_one_unstorable_output_fails_only_its_param(tmp_path: Path) -> None:
    """A param returning a union column fails alone (exit 1, its message names the
    column); the other params of the same part are written, and a rerun has nothing to
    redo."""
    (tmp_path / "badmodel.py").write_text(MODEL)
    n = 6
    spec = synthetic_spec(n, model="badmodel:model", code_paths=["."], targets=[],
                          parameters={"values": [{"k": i} for i in range(n)]})
    path = write_spec(tmp_path / "job.yaml", spec)
    args = ("run", path, "--workers", "1", "--json", "--no-progress")
    proc = tidegate(*args)
    assert proc.returncode == 4, proc.stderr
    assert "Traceback" not in proc.stderr
    s = _summary(proc)
    assert s["state"] == "completed_with_failures"
    assert (s["params"]["ok"], s["params"]["failed"]) == (n - 1, 1)
    # Unstorable if it came first, else not the first part's type: either way named.
    assert s["errors"][0]["error"].startswith("OutputSchemaError: output 'data'")
    assert "'x'" in s["errors"][0]["error"] and "sparse_union" in s["errors"][0]["error"]
    params = read_dataset(tmp_path / "out" / "params")
    assert len(params) == n
    assert [r["error_type"] for r in params if r["status"] == "failed"] == ["OutputSchemaError"]
    assert len(read_dataset(tmp_path / "out" / "model_outputs" / "data")) == 2 * 2 * (n - 1)
    again = _summary(tidegate(*args))
    assert again["params"]["resumed"] == n


@pytest.mark.parametrize("where", ["directory", "lock", "ledger", "migration"])
def test_disk_full_at_start_interrupts_cleanly(tmp_path: Path, where: str) -> None:
    """No room to create the output directory, its lock or its ledger: `run` exits 130
    naming the path, no traceback; once there is room a rerun completes the job."""
    with _mount_tmpfs(tmp_path / "fs", "size=1m,nr_inodes=64") as fs:
        out = fs / "out"
        if where == "ledger":  # as after an earlier attempt: the lock file exists
            out.mkdir()
            (out / LOCK).write_text("pid 1 on elsewhere since then\n")
        filler = _fill(fs)
        if where == "lock":  # blocks full, one inode free: the directory is made
            (filler / "inode-0").unlink()
        if where == "migration":  # one page and a few inodes free: the lock is written and
            for i in range(4):   # the ledger file made, its schema's pages do not fit
                (filler / f"inode-{i}").unlink()
            blocks = filler / "blocks"
            os.truncate(blocks, max(0, blocks.stat().st_size - 4096))
        path = write_spec(tmp_path / "job.yaml", synthetic_spec(4))
        args = ("run", path, "--output", out, "--workers", "1", "--json", "--no-progress")
        proc = tidegate(*args)
        assert proc.returncode == 130, proc.stderr
        assert "Traceback" not in proc.stderr, proc.stderr
        named = {"directory": out, "lock": out / LOCK, "ledger": out / "_ledger.sqlite",
                 "migration": out / "_ledger.sqlite"}
        assert (f"cannot write {named[where]}: no space left on device; free space and "
                "rerun") in proc.stderr, proc.stderr
        shutil.rmtree(filler)
        again = tidegate(*args)
        assert again.returncode == 0, again.stderr
        ids = [r["param_id"] for r in read_dataset(out / "params")]
        assert len(ids) == len(set(ids)) == 4


# 90 s of back-off; test_disk_full_at_start_interrupts_cleanly is its light variant.
@pytest.mark.slow
def test_daemon_job_starting_on_a_full_disk_is_interrupted_and_retried(
        tmp_path: Path) -> None:
    """The daemon's output_root is full when a job starts: the job is `interrupted` with
    the path and "no space left" in its error, retried after a back-off, and succeeds
    once there is room."""
    from tests.daemon_harness import Daemon, base_config

    stack = contextlib.ExitStack()
    fs = stack.enter_context(_mount_tmpfs(tmp_path / "outputs", "size=1m"))
    d = Daemon(tmp_path, base_config(tmp_path, cluster={
        "local": {"workers": 1, "threads_per_worker": 1}}))
    try:
        d.start()
        filler = _fill(fs)
        spec = synthetic_spec(4, job_id="full", output="full")
        assert d.request("POST", "/v1/jobs", yaml.safe_dump(spec))[0] == 201
        job = d.wait_job("full", {"interrupted", "failed", "succeeded"}, timeout=120)
        assert job["state"] == "interrupted", job
        assert f"cannot write {fs / 'full'}" in job["error"], job
        assert "no space left on device" in job["error"]
        assert "retrying in" in d.log()
        shutil.rmtree(filler)
        job = d.wait_job("full", {"succeeded", "failed"}, timeout=120)
        assert job["state"] == "succeeded", d.log()
        ids = [r["param_id"] for r in read_dataset(fs / "full" / "params")]
        assert len(ids) == len(set(ids)) == 4
        assert "Traceback" not in d.log()
    finally:
        d.stop()
        stack.close()


def test_verify_repair_refuses_an_output_a_run_holds(tmp_path: Path) -> None:
    """While a real `tidegate run` holds the output, `verify --repair` exits 2 naming the
    run's pid and changes nothing (it would un-commit a part under the run); a plain
    `verify` still reports, with a warning that a run holds the output. Once the run is
    done, the run's own result is intact."""
    from tests.conftest import start_tidegate, wait_for_part

    n = 12
    spec = synthetic_spec(n, parameters={"values": [{"k": i, "run_seconds": 0.3}
                                                    for i in range(n)]})
    path = write_spec(tmp_path / "job.yaml", spec)
    out = tmp_path / "out"
    proc = start_tidegate("run", path, "--workers", "1", "--threads-per-worker", "1",
                          "--flush-params", "1", "--json", "--no-progress", cwd=tmp_path)
    try:
        assert wait_for_part(proc, out), proc.communicate()
        repair = tidegate("verify", out, "--repair")
        plain = tidegate("verify", out)
    finally:
        stdout, stderr = proc.communicate(timeout=300)
    assert repair.returncode == 2, repair.stdout + repair.stderr
    assert f"pid {proc.pid} " in repair.stderr and "--repair refused" in repair.stderr
    assert "Traceback" not in repair.stderr and repair.stdout == ""
    assert plain.returncode in (0, 1), plain.stderr  # 1 only if it caught a part mid-write
    assert f"in use by a run (pid {proc.pid} " in plain.stderr
    assert proc.returncode == 0, stderr
    assert json.loads(stdout.strip().splitlines()[-1])["state"] == "succeeded"
    assert len(read_dataset(out / "params")) == n
    after = tidegate("verify", out, "--repair")
    assert after.returncode == 0 and "in use" not in after.stderr, after.stderr


def _finished(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.returncode == 0, proc.stderr
    return _summary(proc)


def _several_parts(tmp_path: Path, n: int) -> tuple[tuple[str | Path, ...], Path, list[int]]:
    """A finished run of ``n`` params committed in at least two parts; its arguments, its
    output and how many params each part holds. B is pinned to 1 and a part is due at
    every param, yet two params may still share a part: a param that ends while the part
    before it is written waits in the buffer, and the one after it joins it there (a
    loaded machine writes slowly). The first param always has a part of its own."""
    path = write_spec(tmp_path / "job.yaml", synthetic_spec(n))
    run = ("run", path, "--workers", "1", "--threads-per-worker", "1", "--flush-params", "1",
           "--batch-size", "1", "--json", "--no-progress")
    _finished(tidegate(*run, cwd=tmp_path))
    out = tmp_path / "out"
    with Ledger(out / LEDGER_NAME) as ledger:
        sizes = [p.n_params for p in sorted(ledger.parts(), key=lambda p: p.part)]
    assert len(sizes) >= 2 and sizes[0] == 1 and sum(sizes) == n, sizes
    return run, out, sizes


def test_params_rows_of_a_deleted_parts_row_are_damage(tmp_path: Path) -> None:
    """A ledger `parts` row (and its `part_files` rows) deleted by hand leaves params rows
    naming a part the ledger does not record: `verify` reports it (exit 1), a rerun
    refuses (exit 2) and keeps the part's files, `verify --repair` un-commits those
    params, and the next rerun recomputes them: every param once, none without data."""
    n = 3
    run, out, sizes = _several_parts(tmp_path, n)
    with contextlib.closing(sqlite3.connect(out / LEDGER_NAME)) as db, db:
        db.execute("PRAGMA foreign_keys=OFF")
        db.execute("DELETE FROM part_files WHERE part = 1")
        db.execute("DELETE FROM parts WHERE part = 1")
    files = sorted(out.rglob("part-*.parquet"))
    check = tidegate("verify", out)
    assert check.returncode == 1, check.stdout + check.stderr
    assert f"part 1: (ledger): {sizes[1]} params rows name this part" in check.stdout
    rerun = tidegate(*run, cwd=tmp_path)
    assert rerun.returncode == 2, rerun.stdout + rerun.stderr
    assert "part 1:" in rerun.stderr and "Traceback" not in rerun.stderr
    assert sorted(out.rglob("part-*.parquet")) == files
    repair = tidegate("verify", out, "--repair")
    assert repair.returncode == 0, repair.stdout + repair.stderr
    assert "part 1: its params un-committed" in repair.stdout
    summary = _finished(tidegate(*run, cwd=tmp_path))
    assert summary["state"] == "succeeded"
    assert summary["params"]["resumed"] == n - sizes[1]
    ids = [r["param_id"] for r in read_dataset(out / "params")]
    assert len(ids) == len(set(ids)) == n
    assert {r["param_id"] for r in read_dataset(out / "targets" / "score")} == set(ids)
    assert tidegate("verify", out).returncode == 0


def _tree(out: Path) -> dict[str, bytes]:
    """Every entry under ``out`` (links as their target's name), with file contents."""
    tree: dict[str, bytes] = {}
    for p in sorted(out.rglob("*")):
        rel = p.relative_to(out).as_posix()
        if p.is_symlink():
            tree[rel] = b"-> " + os.readlink(p).encode()
        elif p.is_file() and p.name != LOCK:
            tree[rel] = p.read_bytes()
    return tree


# A linked part file in `make test`; a linked dataset directory too in `make test-all`
# (both go through the same check of what a name resolves to).
@pytest.mark.parametrize("what", ["part file", pytest.param("dataset dir", marks=pytest.mark.slow)])
def test_a_linked_part_is_refused_and_restart_changes_nothing(tmp_path: Path,
                                                              what: str) -> None:
    """A committed part (or its dataset directory) replaced by a symbolic link to a copy
    elsewhere: `verify` reports it (exit 1), a rerun refuses (exit 2), `--restart` refuses
    too and changes nothing (the ledger, manifest and other parts stay), and `verify
    --repair` refuses naming the link."""
    n = 3
    run, out, sizes = _several_parts(tmp_path, n)
    (part,) = out.glob("model_outputs/*/part-000001.parquet")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    if what == "part file":
        shutil.move(part, elsewhere / part.name)
        part.symlink_to(elsewhere / part.name)
        link = part
    else:
        link = part.parent
        shutil.move(link, elsewhere / link.name)
        link.symlink_to(elsewhere / link.name, target_is_directory=True)
    before = _tree(out)
    check = tidegate("verify", out)
    assert check.returncode == 1, check.stdout + check.stderr
    assert f"{link.relative_to(out)}" in check.stdout and "symbolic link" in check.stdout
    for args in (run, (*run, "--restart")):
        rerun = tidegate(*args, cwd=tmp_path)
        assert rerun.returncode == 2, rerun.stdout + rerun.stderr
        assert f"{link} is a symbolic link" in rerun.stderr, rerun.stderr
        assert "Traceback" not in rerun.stderr
        assert _tree(out) == before
    repair = tidegate("verify", out, "--repair")
    assert repair.returncode == 2 and f"{link} is a symbolic link" in repair.stderr
    assert _tree(out) == before
    moved = 1 if what == "part file" else len(sizes)
    assert len(list(elsewhere.rglob("part-*.parquet"))) == moved
