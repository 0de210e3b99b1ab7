"""--prune end to end: a sweep shrunk, then rerun with --prune on a real LocalCluster,
drops the committed params the spec no longer has from every dataset (real Parquet read
back with pyarrow, real SQLite); an interrupted run prunes nothing; a kill -9 of the run
and its cluster midway through the prune, then a rerun, finish it; the daemon's prune
submission option does the same."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import read_dataset, start_tidegate, synthetic_spec, tidegate, write_spec
from tests.daemon_harness import Daemon, base_config

N = 9
GONE = (2, 4, 7)  # the values the shrunk spec drops
DATASETS = ("params", "model_outputs/data", "targets/score")


def _spec(tmp_path: Path, ks: list[int], slow: tuple[int, ...] = ()) -> Path:
    values = [{"k": k, "output_bytes": 512, "run_seconds": 1.0 if k in slow else 0.0}
              for k in ks]
    return write_spec(tmp_path / "job.yaml", synthetic_spec(0, parameters={"values": values}))


def _summary(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _read(out: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: read_dataset(out / name) for name in DATASETS}


def _ks(out: Path) -> dict[str, int]:
    """param id -> k, of the params dataset."""
    return {r["param_id"]: r["param_k"] for r in read_dataset(out / "params")}


def _check(out: Path, before: dict[str, list[dict[str, Any]]], kept: set[int]) -> None:
    """Exactly the params ``kept`` (by k) in every dataset, each once (each replicate's
    rows once), with the rows they had in ``before``; the ledger agrees."""
    by_k = {r["param_id"]: r["param_k"] for r in before["params"]}
    ids = {pid for pid, k in by_k.items() if k in kept}
    after = _read(out)
    assert sorted(r["param_id"] for r in after["params"]) == sorted(ids)
    rows = Counter((r["param_id"], r["replicate"]) for r in after["model_outputs/data"])
    assert {pid for pid, _ in rows} == ids and len(rows) == 2 * len(ids)
    assert sorted(r["param_id"] for r in after["targets/score"]) == sorted(ids)
    for name in DATASETS:
        assert after[name] == [r for r in before[name] if r["param_id"] in ids], name
    with sqlite3.connect(out / "_ledger.sqlite") as db:
        assert {r[0] for r in db.execute("SELECT param_id FROM params")} == ids
        assert db.execute("SELECT COUNT(*) FROM intents").fetchone() == (0,)
    assert not list(out.rglob(".part-*"))
    assert tidegate("verify", out).returncode == 0


def test_prune_drops_the_orphans_from_every_dataset(tmp_path: Path) -> None:
    """9 params in 3 parts; the spec shrunk by 3 (one from each part): a plain rerun
    keeps them (orphaned 3); --prune with --restart is refused; --prune drops them from
    every dataset and the rest keep their rows; a second --prune has nothing to do."""
    args = ("run", "--workers", "1", "--flush-params", "3", "--no-progress")
    first = tidegate(*args, _spec(tmp_path, list(range(N))), "--json")
    assert first.returncode == 0, first.stderr
    out = Path(_summary(first)["output"])
    before = _read(out)
    spec = _spec(tmp_path, [k for k in range(N) if k not in GONE])
    plain = tidegate(*args, spec, "--json")
    assert plain.returncode == 0 and _summary(plain)["params"]["orphaned"] == 3
    assert "pruned" not in _summary(plain)["params"]
    assert _read(out) == before

    refused = tidegate(*args, spec, "--prune", "--restart")
    assert refused.returncode == 2
    assert "--prune and --restart cannot be combined" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert _read(out) == before

    pruned = tidegate(*args, spec, "--prune", "--json")
    assert pruned.returncode == 0, pruned.stderr
    s = _summary(pruned)
    assert s["params"] == {"total": N - 3, "ok": N - 3, "failed": 0, "resumed": N - 3,
                           "quarantined": 0, "orphaned": 0, "pruned": 3}
    assert "orphans" not in s
    assert "pruned 3 orphaned params (no longer in the spec)" in pruned.stderr
    assert "action=params_pruned" in pruned.stderr
    _check(out, before, set(range(N)) - set(GONE))
    manifest = json.loads((out / "manifest.json").read_text())
    assert (manifest["state"], manifest["counts"]["ok"]) == ("succeeded", N - 3)

    again = tidegate(*args, spec, "--prune")
    assert again.returncode == 0, again.stderr
    assert "orphaned" not in again.stderr and "pruned   " not in again.stderr
    _check(out, before, set(range(N)) - set(GONE))


def _ledger_count(out: Path) -> int:
    try:
        with sqlite3.connect(f"file:{out / '_ledger.sqlite'}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM params").fetchone()[0]
    except sqlite3.Error:  # mid-write
        return 0


def test_an_interrupted_run_prunes_nothing_and_a_rerun_does(tmp_path: Path) -> None:
    """The spec shrunk by 3 and grown by 4 slow params, run with --prune and B pinned to
    1, is interrupted (SIGINT) once a new param is committed: its walk is not over, so it
    prunes nothing and says so (pruned null); a rerun with --prune finishes the sweep and
    prunes the 3 orphans."""
    args = ("run", "--workers", "1", "--flush-params", "1", "--no-progress", "--json")
    first = tidegate(*args, _spec(tmp_path, list(range(N))))
    assert first.returncode == 0, first.stderr
    out = Path(_summary(first)["output"])
    new = tuple(range(N, N + 4))
    spec = _spec(tmp_path, [k for k in range(N) if k not in GONE] + list(new), slow=new)
    proc = start_tidegate(*args, spec, "--prune", "--batch-size", "1")
    try:
        deadline = time.monotonic() + 120
        while _ledger_count(out) <= N and proc.poll() is None:
            assert time.monotonic() < deadline, "no new param was committed"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)  # as Ctrl-C, to tidegate alone
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
    assert proc.returncode == 130, stderr
    s = json.loads(stdout.strip().splitlines()[-1])
    assert s["state"] == "interrupted"
    assert (s["params"]["orphaned"], s["params"]["pruned"]) == (None, None)
    assert "not pruning: the run did not finish" in stderr
    assert set(GONE) <= set(_ks(out).values())  # the orphans are all still there

    rerun = tidegate(*args, spec, "--prune")
    assert rerun.returncode == 0, rerun.stderr
    s = _summary(rerun)
    assert (s["params"]["total"], s["params"]["ok"]) == (N - 3 + 4, N - 3 + 4)
    assert (s["params"]["orphaned"], s["params"]["pruned"]) == (0, 3)
    assert sorted(_ks(out).values()) == sorted(set(range(N + 4)) - set(GONE))
    data = _read(out)
    assert len(data["params"]) == len({r["param_id"] for r in data["params"]}) == N - 3 + 4
    assert len({(r["param_id"], r["replicate"]) for r in data["model_outputs/data"]}) == (
        2 * (N - 3 + 4))


# `tidegate run` whose prune kills its own process group (itself and its LocalCluster's
# workers, as a kill -9 of the run and its cluster) at a step of a part's rewrite.
_KILLER = textwrap.dedent('''
    import os, signal, sys
    import tidegate.commit as commit
    at, nth = sys.argv[1], int(sys.argv[2])
    seen = []
    def step(name):
        if name == at:
            seen.append(name)
            if len(seen) == nth:
                os.killpg(0, signal.SIGKILL)
    real = commit.prune_orphans
    commit.prune_orphans = lambda root, ledger, ids, done=None: real(
        root, ledger, ids, done=done, step=step)
    from tidegate.cli import main
    sys.exit(main(sys.argv[3:]))
''')


@pytest.mark.slow  # tests/unit/test_prune.py injects a crash at every step of the prune
def test_kill_9_during_the_prune_then_a_rerun_finishes_it(tmp_path: Path) -> None:
    """The run and its cluster are killed (SIGKILL to their process group) mid-prune:
    once the first part rewritten with params left in it is renamed into place, before
    its ledger commit. The ledger then has each param once, less the orphans of the parts
    done before; a rerun with --prune rolls that swap forward and prunes the rest: the
    kept params once, with their rows, the orphans gone."""
    args = ("run", "--workers", "1", "--flush-params", "3", "--no-progress", "--json")
    first = tidegate(*args, _spec(tmp_path, list(range(N))))
    assert first.returncode == 0, first.stderr
    out = Path(_summary(first)["output"])
    before = _read(out)
    ks = _ks(out)
    with sqlite3.connect(out / "_ledger.sqlite") as db:
        part_of = {ks[pid]: part for pid, part in db.execute("SELECT param_id, part FROM params")}
    # The parts the prune rewrites, in order; the first that keeps a param is the one
    # whose rewrite is renamed into place ("published") and killed; those before it hold
    # only orphans and are forgotten.
    parts = sorted({part_of[k] for k in GONE})
    swapped = next(p for p in parts if any(part_of[k] == p for k in part_of if k not in GONE))
    done_before = sum(part_of[k] < swapped for k in GONE)
    in_swapped = sum(part_of[k] == swapped for k in GONE)
    spec = _spec(tmp_path, [k for k in range(N) if k not in GONE])
    killed = subprocess.run(
        [sys.executable, "-c", _KILLER, "published", "1", *args, str(spec), "--prune"],
        capture_output=True, text=True, timeout=300, check=False, start_new_session=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "pruned" not in killed.stdout  # no summary: killed mid-prune
    with sqlite3.connect(out / "_ledger.sqlite") as db:
        ids = [r[0] for r in db.execute("SELECT param_id FROM params")]
        assert len(ids) == len(set(ids)) == N - done_before
        assert db.execute("SELECT COUNT(*) FROM intents").fetchone() == (1,)

    rerun = tidegate(*args, spec, "--prune")
    assert rerun.returncode == 0, rerun.stderr
    s = _summary(rerun)
    assert (s["params"]["ok"], s["params"]["orphaned"]) == (N - 3, 0)
    # The killed swap was rolled forward by the resume: its orphans were gone already.
    assert s["params"]["pruned"] == 3 - done_before - in_swapped
    assert "action=intent_resolved" in rerun.stderr
    _check(out, before, set(range(N)) - set(GONE))


def test_the_daemon_prunes_a_resubmitted_shrunk_spec(tmp_path: Path) -> None:
    """Through the daemon: a job of 6, resubmitted shrunk to 4 with `tidegate submit
    --prune` (?prune=true): the 2 orphans are dropped from every dataset and the job's
    view says prune and pruned; a bad ?prune= value is refused (400)."""
    daemon = Daemon(tmp_path, base_config(tmp_path)).start()
    try:
        def spec(n: int) -> dict[str, Any]:
            s = synthetic_spec(n, output=None)
            del s["output"]
            return s

        status, created = daemon.request("POST", "/v1/jobs", json.dumps(spec(6)),
                                         headers={"Content-Type": "application/json"})
        assert status == 201, created
        first = daemon.wait_job(created["id"], {"succeeded", "failed"})
        assert first["state"] == "succeeded" and "prune" not in first
        out = Path(first["output"])
        before = _read(out)
        status, body = daemon.request("POST", "/v1/jobs?prune=maybe", json.dumps(spec(4)),
                                      headers={"Content-Type": "application/json"})
        assert status == 400 and "prune: expected true or false" in body["error"]

        path = write_spec(tmp_path / "shrunk.yaml", spec(4))
        proc = tidegate("submit", path, "--prune", "--wait", "--json", "--url", daemon.url)
        assert proc.returncode == 0, proc.stderr + daemon.log()
        job = json.loads(proc.stdout)
        assert job["state"] == "succeeded" and job["prune"] is True
        assert (job["params"]["total"], job["params"]["pruned"]) == (4, 2)
        assert job["summary"]["params"]["orphaned"] == 0
        assert "action=params_pruned" in daemon.log()
        _check(out, before, {0, 1, 2, 3})
    finally:
        daemon.stop()
