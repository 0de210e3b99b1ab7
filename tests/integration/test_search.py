"""Calibration through the real `tidegate run`: a model of the test's own against a
synthetic truth on the embedded LocalCluster, kill -9 mid-search and resume, failed
trials, a budget raised and lowered, repeated points, --restart and verify --repair;
and kill -9 of a real `tidegate serve` mid-search.
The output is read back with pyarrow and the study with Optuna, no tidegate code.

The invariants after every run that finished: exactly ``trials`` trials in the study,
each told once (one finishing operation in the journal), each one param once in the
output, and the loss in targets/ the value the study holds."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import read_dataset, tidegate, write_spec
from tests.daemon_harness import FINISHED, Daemon, base_config
from tests.search_journal import told_once, trials

JOURNAL = "search.journal"

# The synthetic truth: a noisy bowl with its minimum at (0.3, -0.2); the model raises
# where x > 0.85 (an unstable region), and sleeps SLEEP s a replicate so that a kill
# lands mid-search.
MODEL = '''
import random
import time

SLEEP = {sleep}


def model(params, seed):
    time.sleep(SLEEP)
    x = float(params["x"])
    y = float(params.get("y", 0.0))
    if x > 0.85:
        raise ValueError("unstable region")
    noise = random.Random(seed).gauss(0.0, 0.01)
    return {{"obs": {{"v": [(x - 0.3) ** 2 + (y + 0.2) ** 2 + noise]}}}}


def fit(returns):
    values = [r.table("obs").column("v")[0].as_py() for r in returns]
    return {{"loss": sum(values) / len(values), "diagnostics": {{"n": len(values)}}}}
'''

RUN = ("--workers", "2", "--threads-per-worker", "1", "--json", "--no-progress")


def search_job(tmp_path: Path, *, trials: int, sleep: float = 0.0, flush_params: int = 2,
               **search: Any) -> Path:
    """A spec of a search over the bowl (its model in tmp_path), output in tmp_path/out."""
    # A code path of its own: the run's log and the spec beside it are no code.
    (tmp_path / "model").mkdir(exist_ok=True)
    (tmp_path / "model" / "bowl.py").write_text(MODEL.format(sleep=sleep))
    spec = {
        "job_id": "bowl",
        "model": "bowl:model",
        "code_paths": ["model"],
        "parameters": {"search": {
            "space": {"x": {"low": 0.0, "high": 1.0}, "y": {"low": -1.0, "high": 1.0}},
            "objective": "fit", "trials": trials, "sampler": "tpe", "seed": 5, **search}},
        "replicates": 2,
        "seed": 11,
        "targets": [{"name": "fit", "function": "bowl:fit"}],
        "outputs": "none",
        "on_error": "continue",
        "output": "out",
    }
    path = write_spec(tmp_path / "job.yaml", spec)
    # The part size is a run option: kept with the spec for the reruns.
    (tmp_path / "flush").write_text(str(flush_params))
    return path


def run_args(spec: Path, *extra: str) -> tuple[str | Path, ...]:
    flush = (spec.parent / "flush").read_text()
    return ("run", spec, *RUN, "--flush-params", flush, *extra)


def summary_of(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def finished(spec: Path, *extra: str) -> dict[str, Any]:
    """Run the search to its end (exit 0, or 4 when some trials failed)."""
    proc = tidegate(*run_args(spec, *extra), cwd=spec.parent, timeout=180)
    assert proc.returncode in (0, 4), proc.stderr
    assert "Traceback" not in proc.stderr
    return summary_of(proc)


def check_search(out: Path, n: int) -> list[dict[str, Any]]:
    """The invariants of a finished search of ``n`` trials; returns the params rows."""
    journal = out / JOURNAL
    assert told_once(journal) == n
    study = trials(journal)
    assert len(study) == n
    assert all(t.state.is_finished() for t in study)
    rows = read_dataset(out / "params")
    ids = [r["param_id"] for r in rows]
    assert len(ids) == len(set(ids)) == n
    by_id = {t.user_attrs["param_id"]: t for t in study}
    assert set(by_id) == set(ids)
    losses = {r["param_id"]: r["loss"] for r in read_dataset(out / "targets" / "fit")}
    for r in rows:
        t = by_id[r["param_id"]]
        assert t.params == {k.removeprefix("param_"): v for k, v in r.items()
                            if k.startswith("param_") and k != "param_id"}
        if r["status"] == "ok":
            assert t.state == TrialState.COMPLETE
            assert t.value == losses[r["param_id"]]
        else:
            assert t.state == TrialState.FAIL
    return rows


def committed_params(out: Path) -> int:
    ledger = out / "_ledger.sqlite"
    if not ledger.exists():
        return 0
    try:
        with contextlib.closing(sqlite3.connect(f"file:{ledger}?mode=ro", uri=True)) as db:
            return db.execute("SELECT COUNT(*) FROM params").fetchone()[0]
    except sqlite3.Error:  # the schema is still being created
        return 0


def journal_lines(out: Path) -> int:
    try:
        return (out / JOURNAL).read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


@contextlib.contextmanager
def started(spec: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`tidegate run` in a session of its own (its cluster's processes with it), its
    stderr to a file (a pipe nobody reads could fill and stall it)."""
    with (spec.parent / "run.log").open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "tidegate", *map(str, run_args(spec))],
                                cwd=spec.parent, stdout=subprocess.DEVNULL, stderr=log,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"),
                                start_new_session=True)
        try:
            yield proc
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


def kill_when(spec: Path, reached: Callable[[], bool], timeout: float = 120) -> None:
    """Start the run and kill -9 it (and its cluster) once ``reached()`` holds: an
    observable event in its output. The run must not have finished first."""
    with started(spec) as proc:
        deadline = time.monotonic() + timeout
        while not reached():
            assert proc.poll() is None, (spec.parent / "run.log").read_text()
            assert time.monotonic() < deadline, "the event never came"
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=0.02)
        os.killpg(proc.pid, signal.SIGKILL)


def snapshot(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_a_search_calibrates_the_bowl_telling_each_trial_once(tmp_path: Path) -> None:
    """36 trials of TPE: each told once, each one param, failed trials (the unstable
    region) told as failed without stopping the search, the best near the truth."""
    spec = search_job(tmp_path, trials=36)
    s = finished(spec)
    assert s["state"] in ("succeeded", "completed_with_failures")
    assert s["params"]["ok"] + s["params"]["failed"] == 36
    assert s["search"]["told"] == 36 and s["search"]["trials"] == 36
    rows = check_search(tmp_path / "out", 36)
    failed = [r for r in rows if r["status"] == "failed"]
    assert s["search"]["failed"] == len(failed) == s["params"]["failed"]
    assert all(r["param_x"] > 0.85 and "unstable region" in r["error"] for r in failed)
    best = s["search"]["best"]
    ok = [t for t in trials(tmp_path / "out" / JOURNAL) if t.value is not None]
    assert best["loss"] == min(t.value for t in ok)
    assert abs(best["values"]["x"] - 0.3) < 0.25 and abs(best["values"]["y"] + 0.2) < 0.5


def test_failed_trials_are_told_failed_and_the_search_goes_on(tmp_path: Path) -> None:
    """Half the space raises: those trials are told FAIL (on_error: continue) and the
    search still runs its whole budget."""
    spec = search_job(tmp_path, trials=16, sampler="random",
                      space={"x": {"low": 0.7, "high": 1.0}})
    s = finished(spec)
    assert s["state"] == "completed_with_failures"
    rows = check_search(tmp_path / "out", 16)
    failed = sum(r["status"] == "failed" for r in rows)
    assert 0 < failed < 16 and s["search"]["failed"] == failed
    assert sum(t.state == TrialState.FAIL for t in trials(tmp_path / "out" / JOURNAL)) == failed


def test_kill_9_mid_search_then_a_rerun_tells_exactly_the_budget(tmp_path: Path) -> None:
    """kill -9 once a third of the trials are committed, then again right after the
    rerun's first ask; the third run ends the search: exactly 36 told, none twice, each
    trial one param, every committed loss kept."""
    n = 36
    spec = search_job(tmp_path, trials=n, sleep=0.08)
    out = tmp_path / "out"
    kill_when(spec, lambda: committed_params(out) >= n // 3)
    first = committed_params(out)
    assert n // 3 <= first < n
    kept = {t.user_attrs["param_id"]: t.value for t in trials(out / JOURNAL)
            if t.state == TrialState.COMPLETE}
    # The second run: killed as soon as its journal grows (it asked, nothing more).
    lines = journal_lines(out)
    kill_when(spec, lambda: journal_lines(out) > lines)
    assert committed_params(out) < n
    s = finished(spec)
    assert s["params"]["resumed"] >= first
    assert s["search"]["told"] == n
    check_search(out, n)
    after = {t.user_attrs["param_id"]: t.value for t in trials(out / JOURNAL)}
    assert all(after[pid] == value for pid, value in kept.items())  # none told anew


def test_kill_9_right_after_the_start_then_a_rerun(tmp_path: Path) -> None:
    """Killed once the study exists and its first trial is asked, before any part: the
    rerun runs those trials again (the same values and ids) and ends the search."""
    n = 12
    spec = search_job(tmp_path, trials=n, sleep=0.08)
    out = tmp_path / "out"
    kill_when(spec, lambda: journal_lines(out) >= 6)
    assert committed_params(out) == 0
    asked = {t.user_attrs.get("param_id"): t.params for t in trials(out / JOURNAL)
             if "param_id" in t.user_attrs}
    finished(spec)
    check_search(out, n)
    study = {t.user_attrs["param_id"]: t.params for t in trials(out / JOURNAL)}
    assert all(study[pid] == values for pid, values in asked.items())


@pytest.mark.slow
@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_kill_9_at_many_points(tmp_path: Path, fraction: float) -> None:
    """The heavier variant: 40 trials killed at a tenth, half and nine tenths."""
    n = 40
    spec = search_job(tmp_path, trials=n, sleep=0.08, flush_params=1)
    out = tmp_path / "out"
    kill_when(spec, lambda: committed_params(out) >= int(n * fraction))
    kill_when(spec, lambda: committed_params(out) >= int(n * fraction) + 3)
    s = finished(spec)
    assert s["search"]["told"] == n
    check_search(out, n)


def test_raising_trials_on_a_finished_search_runs_only_the_new_ones(tmp_path: Path) -> None:
    spec = search_job(tmp_path, trials=10)
    out = tmp_path / "out"
    finished(spec)
    first = {r["param_id"] for r in check_search(out, 10)}
    raised = search_job(tmp_path, trials=15)
    s = finished(raised)
    assert s["params"]["resumed"] == 10
    assert s["params"]["ok"] + s["params"]["failed"] == 15
    assert s["search"]["told"] == 15
    assert first <= {r["param_id"] for r in check_search(out, 15)}


def test_lowering_trials_is_refused_and_restart_starts_a_new_search(tmp_path: Path) -> None:
    out = tmp_path / "out"
    finished(search_job(tmp_path, trials=15))
    check_search(out, 15)
    before = snapshot(out)
    lowered = search_job(tmp_path, trials=12)
    proc = tidegate(*run_args(lowered), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "parameters.search.trials: expected at least 15" in proc.stderr
    assert "got 12" in proc.stderr and "Traceback" not in proc.stderr
    assert snapshot(out) == before
    # --restart starts a new search, of 12 trials, on the output discarded.
    s = finished(lowered, "--restart")
    assert s["params"]["resumed"] == 0 and s["search"]["told"] == 12
    check_search(out, 12)


def test_repeated_points_of_a_small_space_are_distinct_params(tmp_path: Path) -> None:
    """2 x 2 choices, 12 trials: points repeat, and each trial is a param of its own."""
    spec = search_job(tmp_path, trials=12, space={"x": {"choices": [0.1, 0.9]},
                                                  "y": {"choices": [-0.2, 0.4]}})
    s = finished(spec)
    assert s["search"]["told"] == 12
    rows = check_search(tmp_path / "out", 12)
    points = {(r["param_x"], r["param_y"]) for r in rows}
    assert len(points) <= 4 < len(rows) == 12
    # Repeats share their values but not their seeds: each its own replicates.
    seeds = [tuple(r["seeds"]) for r in rows]
    assert len(set(seeds)) == 12
    assert s["params"]["ok"] + s["params"]["failed"] == 12


def test_verify_repair_reruns_the_trials_of_a_damaged_part_without_telling_them_again(
        tmp_path: Path) -> None:
    spec = search_job(tmp_path, trials=10, flush_params=3)
    out = tmp_path / "out"
    finished(spec)
    check_search(out, 10)
    part = sorted((out / "targets" / "fit").glob("part-*.parquet"))[0]
    # A part holds flush_params or more: one written in the background takes what
    # arrived meanwhile. Its params file has a row for each, failed ones too.
    in_part = pq.ParquetFile(out / "params" / part.name).metadata.num_rows
    part.write_bytes(part.read_bytes()[:-20])  # damaged
    refused = tidegate(*run_args(spec), cwd=tmp_path, timeout=120)
    assert refused.returncode == 2 and "verify" in refused.stderr, refused.stderr
    repaired = tidegate("verify", out, "--repair")
    assert repaired.returncode == 0, repaired.stderr
    s = finished(spec)
    assert s["params"]["ok"] + s["params"]["failed"] - s["params"]["resumed"] == in_part > 0
    assert s["search"]["told"] == 10
    check_search(out, 10)


def test_a_linked_journal_is_refused(tmp_path: Path) -> None:
    spec = search_job(tmp_path, trials=4)
    out = tmp_path / "out"
    finished(spec)
    theirs = tmp_path / "theirs.journal"
    theirs.write_bytes((out / JOURNAL).read_bytes())
    (out / JOURNAL).unlink()
    (out / JOURNAL).symlink_to(theirs)
    before = theirs.read_bytes()
    proc = tidegate(*run_args(search_job(tmp_path, trials=6)), cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert f"{out / JOURNAL} is a symbolic link" in proc.stderr
    assert theirs.read_bytes() == before
    restart = tidegate(*run_args(spec, "--restart"), cwd=tmp_path, timeout=120)
    assert restart.returncode == 2 and "symbolic link" in restart.stderr
    assert theirs.read_bytes() == before and (out / JOURNAL).is_symlink()


def test_kill_9_of_the_daemon_mid_search_resumes_to_exactly_the_budget(
        tmp_path: Path) -> None:
    """A search submitted to a real `tidegate serve`: the daemon (and its embedded
    cluster) killed -9 once a third of the trials are committed, restarted, killed again
    as soon as the resumed run asks, restarted; the job ends with exactly its trials
    told, none twice, each one param."""
    n = 30
    models = tmp_path / "models"
    models.mkdir()
    (models / "bowl.py").write_text(MODEL.format(sleep=0.08))
    spec = {
        "job_id": "bowl", "model": "bowl:model", "code_paths": ["."],
        "parameters": {"search": {
            "space": {"x": {"low": 0.0, "high": 1.0}, "y": {"low": -1.0, "high": 1.0}},
            "objective": "fit", "trials": n, "seed": 5}},
        "replicates": 2, "seed": 11, "outputs": "none", "on_error": "continue",
        "targets": [{"name": "fit", "function": "bowl:fit"}], "output": "bowl",
    }
    daemon = Daemon(tmp_path, base_config(tmp_path, security={"code_roots": [str(models)]},
                                          flush={"params": 2, "seconds": 1}))
    out = tmp_path / "outputs" / "bowl"

    def kill_when(reached: Callable[[], bool]) -> None:
        deadline = time.monotonic() + 120
        while not reached():
            status, job = daemon.request("GET", "/v1/jobs/bowl")
            assert not (status == 200 and job["state"] in FINISHED), job
            assert time.monotonic() < deadline, daemon.log()
            with contextlib.suppress(subprocess.TimeoutExpired):
                assert daemon.proc is not None
                daemon.proc.wait(timeout=0.02)
        daemon.kill_all()

    try:
        daemon.start()
        status, body = daemon.request("POST", "/v1/jobs", yaml.safe_dump(spec))
        assert status == 201, body
        kill_when(lambda: committed_params(out) >= n // 3)
        first = committed_params(out)
        assert n // 3 <= first < n
        lines = journal_lines(out)
        daemon.start()
        kill_when(lambda: journal_lines(out) > lines)
        daemon.start()
        job = daemon.wait_job("bowl", {"succeeded", "completed_with_failures"})
        assert job["params"]["ok"] + job["params"]["failed"] == n, job
        assert job["params"]["resumed"] >= first
        # The job's view carries the search: every trial told, the best loss the
        # lowest in the output.
        assert (job["search"]["told"], job["search"]["trials"]) == (n, n), job
        losses = [r["loss"] for r in read_dataset(out / "targets" / "fit")]
        assert job["search"]["best"]["loss"] == min(losses)
    finally:
        daemon.stop()
    check_search(out, n)
