"""Pre-flight through the CLI: a bad output or signature fails before any cluster starts
(exit 2, no traceback); a trial (`validate --try`, `run --limit`) runs the first params on
a real local cluster into a scratch directory and prints what they returned."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import synthetic_spec, tidegate, write_spec

# Nothing listens here: a command that reached for the cluster would exit 3.
NO_SCHEDULER = "tcp://127.0.0.1:9"


def test_an_unwritable_output_fails_before_the_cluster(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    spec = write_spec(tmp_path / "job.yaml",
                      synthetic_spec(2, output=str(tmp_path / "file" / "out")))
    for args in (("validate", spec), ("run", spec, "--scheduler", NO_SCHEDULER)):
        proc = tidegate(*args, "--json")
        assert proc.returncode == 2, proc.stderr
        assert "output: expected a directory tidegate can create and write" in proc.stderr
        assert "is not a directory" in proc.stderr
        assert "Traceback" not in proc.stderr
        assert json.loads(proc.stdout)["exit_code"] == 2


def test_a_model_without_a_seed_fails_validate(tmp_path: Path) -> None:
    (tmp_path / "mymodel.py").write_text("def simulate(params):\n    return {}\n")
    spec = write_spec(tmp_path / "job.yaml", {
        "model": "mymodel:simulate", "code_paths": ["."],
        "parameters": {"values": [{"a": 1}]}, "output": "out"})
    for args in (("validate", spec), ("run", spec, "--scheduler", NO_SCHEDULER)):
        proc = tidegate(*args)
        assert proc.returncode == 2, proc.stderr
        assert "model" in proc.stderr and "(params, seed)" in proc.stderr
        assert "Traceback" not in proc.stderr


def test_validate_try_prints_the_tables_and_touches_no_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(5, output=str(out)))
    proc = tidegate("validate", spec, "--try", "3", "--json", timeout=180)
    assert proc.returncode == 0, proc.stderr
    trial = json.loads(proc.stdout)["trial"]
    assert (trial["params"], trial["ok"], trial["failed"]) == (3, 3, 0)
    columns = {c["name"]: c["type"] for c in trial["datasets"]["model_outputs/data"]}
    assert columns == {"param_id": "string", "replicate": "int32", "seed": "int64",
                       "i": "int64", "x": "double"}
    assert {c["name"] for c in trial["datasets"]["targets/score"]} >= {"param_id", "loss"}
    assert not out.exists()


def test_run_limit_shows_failures_with_their_values(tmp_path: Path) -> None:
    out = tmp_path / "out"
    values = [{"k": i, "output_bytes": 1024, "fail": "bad input" if i % 2 else ""}
              for i in range(4)]
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(
        4, output=str(out), parameters={"values": values}))
    proc = tidegate("run", spec, "--limit", "4", "--no-progress", timeout=180)
    assert proc.returncode == 4, proc.stderr
    assert "4 params on a local cluster: 2 ok, 2 failed" in proc.stdout
    assert "k=1" in proc.stdout and "k=3" in proc.stdout and "bad input" in proc.stdout
    assert "model_outputs/data" in proc.stdout
    assert not out.exists()
