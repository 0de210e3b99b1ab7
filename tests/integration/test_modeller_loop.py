"""The modeller's loop on real clusters: a model that always fails stops early, one that
fails now and then completes with failures, a hung sim times out, a model echoing its
seed is accepted; `tidegate failures` reads the groups back from Parquet, and the daemon
shows the state and the groups."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from tests.conftest import read_dataset, tidegate, write_spec
from tests.daemon_harness import Daemon, base_config

MODELS = Path(__file__).resolve().parents[1] / "loopmodels.py"


def _spec(tmp_path: Path, model: str, n: int, **extra: Any) -> Path:
    shutil.copy(MODELS, tmp_path / "loopmodels.py")
    spec = {"job_id": "loop", "model": f"loopmodels:{model}", "code_paths": ["."],
            "parameters": {"values": [{"k": i} for i in range(n)]}, "replicates": 1,
            "seed": 3, "output": "out", **extra}
    return write_spec(tmp_path / "job.yaml", spec)


def _run(spec: Path, *flags: str) -> tuple[int, dict[str, Any], str]:
    proc = tidegate("run", spec, "--workers", "2", "--threads-per-worker", "1", "--json",
                    "--no-progress", *flags)
    assert proc.stdout.strip(), proc.stderr
    return proc.returncode, json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def test_a_model_that_always_fails_stops_after_10_failed(tmp_path: Path) -> None:
    code, summary, err = _run(_spec(tmp_path, "fails", 200))
    assert code == 1, err
    assert summary["state"] == "failed"
    assert "first 10 completed params all failed" in summary["reason"]
    failed = summary["params"]["failed"]
    assert 10 <= failed < 200 and summary["params"]["ok"] == 0
    (group,) = summary["error_groups"]
    assert (group["type"], group["message"], group["count"]) == (
        "ValueError", "bad input <n>", failed)
    assert all("k" in e["values"] for e in group["examples"])
    out = tmp_path / "out"
    assert len(read_dataset(out / "params")) == failed  # what completed is committed
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["state"] == "failed" and manifest["reason"] == summary["reason"]
    # The log: a line per failure for the first few, then one per group.
    assert err.count("failed: ValueError: bad input") == 5
    assert f"failures: {failed} x ValueError: bad input <n>" in err

    listed = tidegate("failures", out, "--json")
    assert listed.returncode == 0, listed.stderr
    report = json.loads(listed.stdout)
    (group,) = report["groups"]
    assert group["count"] == report["failed"] == failed
    assert "ValueError: bad input" in group["examples"][0]["traceback"]
    text = tidegate("failures", out)
    assert f"{failed} x ValueError: bad input <n>" in text.stdout
    assert "traceback of the first:" in text.stdout and "loopmodels.py" in text.stdout


def test_some_failures_complete_with_failures_exit_4(tmp_path: Path) -> None:
    code, summary, err = _run(_spec(tmp_path, "some_fail", 12, on_error="continue"))
    assert code == 4, err
    assert summary["state"] == "completed_with_failures"
    assert (summary["params"]["ok"], summary["params"]["failed"]) == (6, 6)
    kinds = {g["type"]: g["count"] for g in summary["error_groups"]}
    assert kinds == {"ValueError": 3, "KeyError": 3}
    text = tidegate("run", tmp_path / "job.yaml", "--no-progress")  # resumes: all committed
    assert text.returncode == 4
    assert "completed_with_failures" in text.stderr


def test_a_sim_past_sim_timeout_s_fails_as_timeout_without_an_oom_event(
    tmp_path: Path,
) -> None:
    spec = _spec(tmp_path, "hangs", 6, sim_timeout_s=1, on_error="continue")
    values = [{"k": i, "sleep": 60 if i == 0 else 0} for i in range(6)]
    write_spec(spec, {**_load(spec), "parameters": {"values": values}})
    started = time.monotonic()
    code, summary, err = _run(spec)
    assert time.monotonic() - started < 50  # not the 60 s the hung sim sleeps
    assert code == 4, err
    assert (summary["params"]["ok"], summary["params"]["failed"]) == (5, 1)
    (group,) = summary["error_groups"]
    assert group["type"] == "Timeout" and group["examples"][0]["values"]["k"] == 0
    assert "restarting worker" in err
    # The planned restart is no OOM event and no worker loss that backs B off.
    assert summary["oom_events"] == 0 and summary["worker_restarts"] == 0
    assert set(summary["worker_losses"]) <= {"planned"}
    (row,) = [r for r in read_dataset(tmp_path / "out" / "params") if r["status"] == "failed"]
    assert row["error_type"] == "Timeout"


def _load(path: Path) -> dict[str, Any]:
    import yaml

    return dict(yaml.safe_load(path.read_text()))


def test_a_model_echoing_its_seed_is_accepted(tmp_path: Path) -> None:
    code, _, err = _run(_spec(tmp_path, "echoes_seed", 4))
    assert code == 0, err
    out = tmp_path / "out"
    seeds = {r["param_id"]: r["seeds"][0] for r in read_dataset(out / "params")}
    table = ds.dataset(out / "model_outputs" / "data", format="parquet").to_table()
    assert table.column_names == ["param_id", "replicate", "seed", "x"]
    assert all(r["seed"] == seeds[r["param_id"]] for r in table.to_pylist())


def test_a_wrong_seed_column_stops_the_job_at_the_first_param(tmp_path: Path) -> None:
    code, summary, err = _run(_spec(tmp_path, "wrong_seed", 40, on_error="continue"))
    assert code == 1, err
    assert summary["state"] == "failed"
    assert "contract error" in summary["reason"] and "column 'seed'" in summary["reason"]
    assert summary["params"]["failed"] < 40


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, base_config(tmp_path))
    yield d
    d.stop()


def test_the_daemon_shows_completed_with_failures_and_the_groups(daemon: Daemon) -> None:
    daemon.start()
    values = [{"k": i, "fail": f"bad input {i}" if i % 2 else ""} for i in range(8)]
    spec = {"job_id": "partly", "model": "tidegate.workloads:synthetic",
            "parameters": {"values": values}, "output": "partly"}
    status, created = daemon.request("POST", "/v1/jobs", json.dumps(spec),
                                     headers={"Content-Type": "application/json"})
    assert status == 201, created
    job = daemon.wait_job("partly", {"succeeded", "completed_with_failures", "failed"})
    assert job["state"] == "completed_with_failures", daemon.log()
    assert (job["params"]["ok"], job["params"]["failed"]) == (4, 4)
    (group,) = job["error_groups"]
    assert (group["type"], group["message"], group["count"]) == (
        "RuntimeError", "bad input <n>", 4)
    assert group["examples"][0]["values"]["fail"].startswith("bad input")
    status, listing = daemon.request("GET", "/metrics")
    assert 'tidegate_jobs{state="completed_with_failures"} 1.0' in listing
    waited = tidegate("submit", "--help")
    assert "4  submit --wait: the job completed with failures" in waited.stdout
