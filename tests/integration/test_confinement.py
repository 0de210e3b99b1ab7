"""Issue 10's confinement against a real `tidegate serve` (token, allowed_modules,
code_roots, output_root) and a real `tidegate run`: allowlist bypasses, overlapping and
linked outputs, the output lock, param files outside code_roots, bad output names."""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from tests.conftest import read_dataset, synthetic_spec, tidegate, write_spec
from tests.daemon_harness import Daemon, base_config
from tidegate.writer import LEDGER, OutputLock

HELPER = """
from pathlib import Path

def touch_marker(params, seed):
    Path({marker!r}).write_text("ran")
    return {{}}
"""

ALLOWED = """
import os
import pyarrow as pa
import tghelper
from tghelper import touch_marker

def bad_name(params, seed):
    return {"../evil": pa.table({"x": [1]})}
"""


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("confined")
    code = root / "code"
    code.mkdir()
    (code / "tghelper.py").write_text(HELPER.format(marker=str(root / "marker")))
    (code / "tgallowed.py").write_text(ALLOWED)
    (code / "secret.csv").write_text("DB_PASSWORD=hunter2\nx,y\n")
    (root / "outside.csv").write_text("k\n1\n")
    (root / "token").write_text("tok\n")
    d = Daemon(root, base_config(root, security={
        "token_file": str(root / "token"),
        "allowed_modules": ["tidegate.workloads", "tgallowed"],
        "code_roots": [str(code)],
    }), token="tok")
    d.start()
    yield d
    d.stop()


def _submit(daemon: Daemon, spec: dict) -> tuple[int, dict]:
    return daemon.request("POST", "/v1/jobs", yaml.safe_dump(spec))


def _job_ids(daemon: Daemon) -> set[str]:
    return {j["id"] for j in daemon.request("GET", "/v1/jobs")[1]["jobs"]}


@pytest.mark.parametrize(("field", "ref"), [
    ("model", "tidegate.workloads:os.system"),
    ("model", "tidegate.workloads:pa.lib.__builtins__.exec"),
    ("model", "tgallowed:touch_marker"),
    ("model", "tgallowed:tghelper.touch_marker"),
    ("target", "tgallowed:os.system"),
])
def test_allowlist_bypasses_are_403_and_nothing_runs(
    daemon: Daemon, field: str, ref: str
) -> None:
    """Each path out of an allowed module is refused (403) and no job is queued."""
    job_id = f"bypass-{abs(hash(ref)) % 10**8}"
    spec = synthetic_spec(2, job_id=job_id, output=job_id, code_paths=["."])
    if field == "model":
        spec["model"] = ref
    else:
        spec["targets"] = [{"name": "t", "function": ref}]
    status, body = _submit(daemon, spec)
    assert status == 403, body
    assert ref in body["error"] and "not" in body["error"]
    assert job_id not in _job_ids(daemon)
    assert not (daemon.root / "marker").exists()


@pytest.mark.parametrize("output", [".", "", "results/.."])
def test_output_root_itself_is_refused(daemon: Daemon, output: str) -> None:
    """`output: .` or '' would make the output root a job's output: 400 naming output."""
    status, body = _submit(daemon, synthetic_spec(2, job_id="rooted", output=output))
    assert status == 400, body
    assert body["errors"][0]["field"] == "output"


def test_nested_outputs_are_409_naming_the_other_job(daemon: Daemon) -> None:
    """An output inside, or containing, another job's output is refused naming it."""
    status, body = _submit(daemon, synthetic_spec(2, job_id="nest", output="nest"))
    assert status == 201, body
    for job_id, output in (("inner", "nest/params/sub"), ("twin", "nest")):
        status, body = _submit(daemon, synthetic_spec(2, job_id=job_id, output=output))
        assert status == 409, body
        assert "'nest'" in body["error"]
    daemon.wait_job("nest", {"succeeded"})
    status, body = _submit(daemon, synthetic_spec(2, job_id="inner", output="nest/params/sub"))
    assert status == 409, body  # finished jobs keep their outputs


def test_output_inside_a_foreign_ledger_is_409(daemon: Daemon) -> None:
    """A directory holding a tidegate ledger (a `tidegate run` there) is nobody's to nest in."""
    other = daemon.root / "outputs" / "by-hand"
    other.mkdir(parents=True)
    (other / LEDGER).write_text("")
    status, body = _submit(daemon, synthetic_spec(2, job_id="under", output="by-hand/x"))
    assert status == 409, body
    assert str(other) in body["error"]


def test_param_file_outside_code_roots_is_403(daemon: Daemon) -> None:
    """parameters.file is confined to code_roots, checked before the file is read."""
    spec = synthetic_spec(2, job_id="pfile", output="pfile",
                          parameters={"file": str(daemon.root / "outside.csv")})
    status, body = _submit(daemon, spec)
    assert status == 403, body
    assert "code_roots" in body["error"]
    spec["parameters"] = {"file": "../outside.csv"}
    assert _submit(daemon, spec)[0] == 403


def test_param_file_error_never_echoes_the_file(daemon: Daemon) -> None:
    """A 400 about a params file names the file and a position, not its text."""
    spec = synthetic_spec(2, job_id="pfile2", output="pfile2",
                          parameters={"file": "secret.csv"})
    status, body = _submit(daemon, spec)
    assert status == 400, body
    text = str(body)
    assert "secret.csv" in text and "hunter2" not in text and "DB_PASSWORD" not in text


def test_model_output_name_cannot_escape_model_outputs(daemon: Daemon) -> None:
    """A model returning '../evil' fails that param with a clear error; nothing escapes."""
    spec = synthetic_spec(2, job_id="evil", output="evil", model="tgallowed:bad_name",
                          code_paths=["."], targets=[])
    status, body = _submit(daemon, spec)
    assert status == 201, body
    job = daemon.wait_job("evil", {"completed_with_failures"})
    out = daemon.root / "outputs" / "evil"
    assert job["summary"]["params"]["failed"] == 2, job
    rows = read_dataset(out / "params")
    assert all("output names must be" in r["error"] for r in rows)
    assert not (out / "evil").exists() and not (out / "model_outputs").exists()


def test_symlinked_dataset_dir_fails_the_job_and_touches_nothing(daemon: Daemon) -> None:
    """A params/ that links out of the output: the job fails naming it; the target is
    untouched."""
    target = daemon.root / "elsewhere"
    target.mkdir()
    (target / "part-000000.parquet").write_text("not tidegate's")
    out = daemon.root / "outputs" / "linked"
    out.mkdir(parents=True)
    (out / LEDGER).write_text("")  # an output tidegate wrote before, as far as it can tell
    (out / "params").symlink_to(target)
    status, body = _submit(daemon, synthetic_spec(2, job_id="linked", output="linked"))
    assert status == 201, body
    job = daemon.wait_job("linked", {"succeeded", "failed"})
    assert job["state"] == "failed" and "symbolic link" in job["error"], job
    assert (target / "part-000000.parquet").read_text() == "not tidegate's"
    assert [p.name for p in target.iterdir()] == ["part-000000.parquet"]


def test_a_locked_output_fails_the_job_naming_the_holder(daemon: Daemon) -> None:
    """A daemon job on an output another run holds is refused, naming that run."""
    out = daemon.root / "outputs" / "held"
    out.mkdir(parents=True)
    lock = OutputLock(out)
    try:
        status, body = _submit(daemon, synthetic_spec(2, job_id="held", output="held"))
        assert status == 201, body
        job = daemon.wait_job("held", {"succeeded", "failed"})
    finally:
        lock.release()
    assert job["state"] == "failed" and f"pid {os.getpid()}" in job["error"], job


# --- tidegate run ---------------------------------------------------------------------------


def test_run_refuses_a_foreign_directory_unless_forced(tmp_path: Path) -> None:
    """`output: .` beside the spec: exit 2 without --force; a user's params/ survives
    --force --restart, and tidegate's own files are replaced."""
    (tmp_path / "params").mkdir()
    (tmp_path / "params" / "mine.txt").write_text("mine")
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(3, output="."))
    proc = tidegate("run", spec, "--no-progress", "--workers", "1")
    assert proc.returncode == 2, proc.stderr
    assert "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / LEDGER).exists()
    proc = tidegate("run", spec, "--no-progress", "--workers", "1", "--force", "--restart")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "params" / "mine.txt").read_text() == "mine"
    proc = tidegate("run", spec, "--no-progress", "--workers", "1", "--restart")
    assert proc.returncode == 0, proc.stderr  # its own output now: no --force needed
    assert (tmp_path / "params" / "mine.txt").read_text() == "mine"
    assert (tmp_path / "job.yaml").exists()
    parts = sorted((tmp_path / "params").glob("part-*.parquet"))
    assert sum(pq.read_table(p).num_rows for p in parts) == 3


def test_second_run_on_a_held_output_exits_2_naming_the_holder(tmp_path: Path) -> None:
    """`tidegate run` on an output another run holds is refused, naming it."""
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(2, output="out"))
    (tmp_path / "out").mkdir()
    lock = OutputLock(tmp_path / "out")
    try:
        proc = tidegate("run", spec, "--no-progress", "--workers", "1")
    finally:
        lock.release()
    assert proc.returncode == 2, proc.stderr
    assert f"pid {os.getpid()}" in proc.stderr and "Traceback" not in proc.stderr


# Two names in `make test` (the lock, opened without following links, and the ledger,
# which SQLite opens); every name in `make test-all` (check_own_files has unit tests).
_SLOW = pytest.mark.slow
@pytest.mark.parametrize("name", [".tidegate.lock", LEDGER,
                                  pytest.param(f"{LEDGER}-journal", marks=_SLOW),
                                  pytest.param(f"{LEDGER}-wal", marks=_SLOW),
                                  pytest.param(f"{LEDGER}-shm", marks=_SLOW),
                                  pytest.param("manifest.json", marks=_SLOW)])
def test_run_refuses_a_link_at_its_own_files(tmp_path: Path, name: str) -> None:
    """A symbolic link under the name of one of tidegate's own files in the output: exit
    2 naming it, and the link's target is neither written nor removed, with --restart
    or --force too."""
    first = write_spec(tmp_path / "job.yaml", synthetic_spec(3))
    assert tidegate("run", first, "--no-progress").returncode == 0
    out = tmp_path / "out"
    victim = tmp_path / "victim"
    victim.write_bytes(b"someone else's")
    (out / name).unlink(missing_ok=True)
    (out / name).symlink_to(victim)
    for extra in ([], ["--restart"], ["--force"]):
        proc = tidegate("run", first, "--no-progress", *extra)
        assert proc.returncode == 2, proc.stderr
        assert f"{out / name} is a symbolic link" in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr
        assert victim.read_bytes() == b"someone else's"
        assert (out / name).is_symlink()
    verify = tidegate("verify", out, "--repair")
    assert verify.returncode == 2 and f"{out / name} is a symbolic link" in verify.stderr
    assert victim.read_bytes() == b"someone else's"


def test_links_planted_at_staged_temporaries_are_never_followed(tmp_path: Path) -> None:
    """Links under the names the next parts' and manifest's temporaries take: the run
    replaces them with files of its own and succeeds; their targets stay as they were."""
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(6))
    assert tidegate("run", spec, "--no-progress").returncode == 0
    out = tmp_path / "out"
    victims: list[Path] = []
    for d in ("", "params/", "model_outputs/data/", "targets/score/"):
        names = [".manifest.json.tmp"] if not d else [
            f".part-{i:06d}.parquet.tmp" for i in range(6)]
        for name in names:
            victim = tmp_path / f"victim-{len(victims)}"
            victim.write_bytes(b"someone else's")
            (out / d / name).symlink_to(victim)
            victims.append(victim)
    proc = tidegate("run", spec, "--restart", "--flush-params", "1", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    assert all(v.read_bytes() == b"someone else's" for v in victims)
    ids = [r["param_id"] for r in read_dataset(out / "params")]
    assert len(ids) == len(set(ids)) == 6
    # Each name tidegate wrote was replaced, not followed; planted names of part numbers
    # it never reached (a part written in the background may take several params) stay.
    with sqlite3.connect(out / "_ledger.sqlite") as db:
        parts = db.execute("SELECT COUNT(*) FROM parts").fetchone()[0]
    left = [p for p in out.rglob("*.tmp") if p.is_symlink()]
    assert all(p.name.startswith(".part-") and int(p.name[6:12]) >= parts for p in left), left
