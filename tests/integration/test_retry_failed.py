"""--retry-failed end to end: a model with a bug fails some params, the bug is fixed (a
flag file the model reads at each call, so that workers that imported it see the fix),
and a rerun with --retry-failed recomputes those params alone: real LocalCluster worker
processes, real Parquet read back with pyarrow, real SQLite, real kills."""

from __future__ import annotations

import json
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import read_dataset, start_tidegate, tidegate, wait_quietly, write_spec
from tests.daemon_harness import Daemon, base_config
from tidegate.spec import load_job

MODEL = '''
import time
from pathlib import Path

import pyarrow as pa

HERE = Path(__file__).parent
BAD_SEED = {bad_seed}  # one replicate of param k=1: it fails with the other's rows written


def simulate(params, seed):
    broken = (HERE / "BROKEN").exists()
    if not broken:  # the fixed model is the slow one: a retry lasts long enough to kill
        time.sleep(params["sleep"])
    if broken and (params["k"] % 3 == 0 or seed == BAD_SEED):
        raise RuntimeError(f"model bug at k={{params['k']}}")
    if (HERE / "STRINGS").exists():  # the fix changed the output's column type
        return {{"data": pa.table({{"x": [str(params["k"])] * 2, "version": [2, 2]}})}}
    version = 1 if broken else 2
    return {{"data": pa.table({{"x": [float(params["k"]), seed / 7.0],
                              "version": [version, version]}})}}


def score(returns):
    return float(sum(r.table("data").num_rows for r in returns))
'''


def _setup(tmp_path: Path, n: int = 12, sleep: float = 0.0, job_id: str = "retry",
           output: str = "out") -> tuple[Path, dict[str, Any]]:
    """The spec (``n`` params, 2 replicates, a target), and the model, broken."""
    models = tmp_path / "models"
    models.mkdir(exist_ok=True)
    spec = {
        "job_id": job_id, "model": "flaky:simulate", "code_paths": [str(models)],
        "parameters": {"values": [{"k": i, "sleep": sleep} for i in range(n)]},
        "replicates": 2, "seed": 11,
        "targets": [{"name": "score", "function": "flaky:score"}],
        "output": output,
    }
    path = write_spec(tmp_path / "job.yaml", spec)
    job = load_job(path)
    k1 = next(p for p in job.params if p.values["k"] == 1)
    (models / "flaky.py").write_text(MODEL.format(bad_seed=job.seeds(k1.param_id)[0]))
    (models / "BROKEN").touch()
    return path, spec


def _summary(proc: subprocess.CompletedProcess[str]) -> dict:
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _failing(n: int) -> set[int]:
    return {k for k in range(n) if k % 3 == 0} | {1}


def _read(out: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: read_dataset(out / name)
            for name in ("params", "model_outputs/data", "targets/score")}


def _assert_each_once(out: Path, n: int) -> dict[str, list[dict[str, Any]]]:
    """Every param once in params/ and in the ledger, each (param, replicate) once in
    model_outputs/ (2 rows), each param at most once in targets/, nothing of a param
    that params/ lacks, and no row of a failed param's ok replicate beside a result."""
    data = _read(out)
    ids = [r["param_id"] for r in data["params"]]
    assert len(ids) == len(set(ids)) == n
    with sqlite3.connect(out / "_ledger.sqlite") as db:
        assert sorted(r[0] for r in db.execute("SELECT param_id FROM params")) == sorted(ids)
    rows = Counter((r["param_id"], r["replicate"]) for r in data["model_outputs/data"])
    assert set(rows.values()) <= {2}
    ok = {r["param_id"] for r in data["params"] if r["status"] == "ok"}
    assert {pid for pid, _ in rows} <= set(ids)
    assert {pid for pid, _ in rows} >= ok and all(rows[(pid, 0)] and rows[(pid, 1)]
                                                  for pid in ok)
    scored = [r["param_id"] for r in data["targets/score"]]
    assert len(scored) == len(set(scored)) and set(scored) == ok
    return data


def test_retry_failed_reruns_exactly_the_failed_params(tmp_path: Path) -> None:
    """A plain rerun after the fix has nothing to do; --retry-failed reruns the failed
    params alone (the ok ones keep their first run's rows) and every dataset then holds
    each param once, the failed param's old ok-replicate rows gone."""
    n = 12
    path, _ = _setup(tmp_path)
    out = tmp_path / "out"
    args = ("run", path, "--workers", "2", "--flush-params", "4", "--json", "--no-progress")
    first = tidegate(*args)
    assert first.returncode == 4, first.stderr
    assert "rerun with --retry-failed" in first.stderr
    failing = _failing(n)
    s = _summary(first)
    assert (s["params"]["ok"], s["params"]["failed"]) == (n - len(failing), len(failing))
    assert "retried" not in s["params"]
    before = _assert_each_once(out, n)
    by_id = {r["param_id"]: r["param_k"] for r in before["params"]}
    assert {by_id[r["param_id"]] for r in before["params"] if r["status"] == "failed"} == failing
    k1 = next(pid for pid, k in by_id.items() if k == 1)
    assert [r["replicate"] for r in before["model_outputs/data"] if r["param_id"] == k1] == [1, 1]

    (tmp_path / "models" / "BROKEN").unlink()  # the bug is fixed
    plain = tidegate(*args, "--accept-code-change")  # the fix changed the model code
    assert plain.returncode == 4 and _summary(plain)["params"]["failed"] == len(failing)

    retry = tidegate(*args, "--retry-failed", "--accept-code-change")
    assert retry.returncode == 0, retry.stderr
    s = _summary(retry)
    assert s["state"] == "succeeded"
    assert s["params"] == {"total": n, "ok": n, "failed": 0, "resumed": n - len(failing),
                           "quarantined": 0, "orphaned": 0, "retried": len(failing)}
    assert f"retrying {len(failing)} failed params" in retry.stderr
    after = _assert_each_once(out, n)
    assert all(r["status"] == "ok" for r in after["params"])
    versions = {(by_id[r["param_id"]], r["version"]) for r in after["model_outputs/data"]}
    assert versions == {(k, 2 if k in failing else 1) for k in range(n)}
    # The ok params' rows are those of the first run, unchanged.
    ok_ids = {pid for pid, k in by_id.items() if k not in failing}
    for name in before:
        assert ([r for r in after[name] if r["param_id"] in ok_ids]
                == [r for r in before[name] if r["param_id"] in ok_ids])
    assert tidegate("verify", out).returncode == 0


def test_a_retried_param_whose_output_changed_type_fails_naming_the_columns(
        tmp_path: Path) -> None:
    """The fix returns strings where the dataset holds doubles: each retried param fails
    alone, with the output, the column, both types and --restart in its message."""
    n = 6
    path, _ = _setup(tmp_path, n=n)
    out = tmp_path / "out"
    args = ("run", path, "--workers", "1", "--json", "--no-progress")
    assert tidegate(*args).returncode == 4
    (tmp_path / "models" / "BROKEN").unlink()
    (tmp_path / "models" / "STRINGS").touch()
    retry = tidegate(*args, "--retry-failed")
    assert retry.returncode == 4, retry.stderr
    assert "Traceback" not in retry.stderr
    failing = _failing(n)
    s = _summary(retry)
    assert (s["params"]["failed"], s["params"]["retried"]) == (len(failing), len(failing))
    data = _assert_each_once(out, n)
    failed = [r for r in data["params"] if r["status"] == "failed"]
    assert {r["param_k"] for r in failed} == failing
    for r in failed:
        assert r["error_type"] == "OutputSchemaError"
        assert "output 'data'" in r["error"] and "'x': expected double, got string" in r["error"]
        assert "--restart" in r["error"]


def _ledger_ok(out: Path) -> int:
    try:
        with sqlite3.connect(f"file:{out / '_ledger.sqlite'}?mode=ro", uri=True) as db:
            return db.execute("SELECT COUNT(*) FROM params WHERE status = 'ok'").fetchone()[0]
    except sqlite3.Error:  # mid-write
        return 0


@pytest.mark.slow  # tests/unit/test_rewrite.py injects a crash at every step of the rewrite
def test_kill_9_during_a_retry_then_a_rerun_has_each_param_once(tmp_path: Path) -> None:
    """kill -9 of `tidegate run --retry-failed` and its cluster once the retried params
    are being committed; a rerun without the flag, then one with it, finish with every
    param once and ok."""
    n = 24
    path, _ = _setup(tmp_path, n=n, sleep=0.2)
    out = tmp_path / "out"
    args = ("run", path, "--workers", "2", "--flush-params", "2", "--no-progress")
    assert tidegate(*args, "--json").returncode == 4
    ok_before = _ledger_ok(out)
    (tmp_path / "models" / "BROKEN").unlink()
    proc = start_tidegate(*args, "--retry-failed")
    try:
        deadline = time.monotonic() + 120
        while _ledger_ok(out) <= ok_before and proc.poll() is None:
            assert time.monotonic() < deadline, "no retried param was committed"
            time.sleep(0.02)
        wait_quietly(proc, random.uniform(0.0, 0.4))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    assert proc.returncode == -signal.SIGKILL, err  # killed mid-retry, not finished
    assert "action=params_retried" in err
    _assert_each_once_or_missing(out, n)
    rerun = tidegate(*args, "--json")
    assert rerun.returncode == 0, rerun.stderr
    data = _assert_each_once(out, n)
    assert all(r["status"] == "ok" for r in data["params"])
    again = tidegate(*args, "--json", "--retry-failed")
    assert again.returncode == 0 and _summary(again)["params"]["retried"] == 0
    assert _read(out) == data


def _assert_each_once_or_missing(out: Path, n: int) -> None:
    """Right after the kill (before any resume): no param twice in any dataset."""
    for name, rows in _read(out).items():
        keys = Counter((r["param_id"], r.get("replicate")) for r in rows)
        limit = 2 if name == "model_outputs/data" else 1
        assert max(keys.values(), default=0) <= limit, name
    assert len({r["param_id"] for r in _read(out)["params"]}) <= n


def test_daemon_resubmission_with_retry_failed(tmp_path: Path) -> None:
    """Through the daemon: a job with failed params, the model fixed, the same spec
    resubmitted with ?retry_failed=true (and `tidegate submit --retry-failed`): the
    failed params alone are rerun and each param is once in every dataset."""
    n = 9
    _, spec = _setup(tmp_path, n=n)
    d = Daemon(tmp_path, base_config(tmp_path, security={"code_roots": [str(tmp_path / "models")]}))
    d.start()
    try:
        status, _ = d.request("POST", "/v1/jobs", yaml.safe_dump(spec))
        assert status == 201
        first = d.wait_job("retry", {"completed_with_failures"})
        failing = _failing(n)
        assert (first["params"]["ok"], first["params"]["failed"]) == (n - len(failing),
                                                                     len(failing))
        assert "retry_failed" not in first and "retried" not in first["params"]
        (tmp_path / "models" / "BROKEN").unlink()
        status, body = d.request("POST", "/v1/jobs?retry_failed=maybe", yaml.safe_dump(spec))
        assert status == 400 and "retry_failed: expected true or false" in body["error"]
        proc = tidegate("submit", tmp_path / "job.yaml", "--retry-failed", "--wait", "--json",
                        "--url", d.url)
        assert proc.returncode == 0, proc.stderr + d.log()
        job = json.loads(proc.stdout)
        assert job["state"] == "succeeded" and job["retry_failed"] is True
        assert job["params"]["retried"] == len(failing)
        assert (job["params"]["ok"], job["params"]["resumed"]) == (n, n - len(failing))
        out = Path(job["output"])
        data = _assert_each_once(out, n)
        assert all(r["status"] == "ok" for r in data["params"])
        assert "action=params_retried" in d.log()
    finally:
        d.stop()
