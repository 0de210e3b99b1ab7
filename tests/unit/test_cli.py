"""The command line's own behaviour: exit codes and messages for bad input, validate,
schema. Bad specs go through the real `main()`; two go through a real subprocess."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import SIR_DIR, tidegate
from tests.unit.test_spec import MALFORMED
from tidegate.cli import main


def _write(tmp_path: Path, data: dict[str, Any] | str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.mark.parametrize(("data", "field", "expected", "got"), MALFORMED)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_malformed_spec_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], command: str,
    data: dict[str, Any] | str, field: str, expected: str, got: str,
) -> None:
    """Every malformed spec: exit 2, one message naming field, expected and got; nothing
    written."""
    path = _write(tmp_path, data)
    assert main([command, str(path), "--no-progress"] if command == "run"
                else [command, str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tidegate: error: ")
    assert f"{field}: expected " in err
    assert expected in err and got in err
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]


def test_missing_callable_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A model function that does not exist is reported before any cluster starts."""
    spec = yaml.safe_load((SIR_DIR / "job.yaml").read_text())
    spec["model"] = "sir:simulat"
    spec["code_paths"] = [str(SIR_DIR)]
    assert main(["run", str(_write(tmp_path, spec))]) == 2
    err = capsys.readouterr().err
    assert "model: expected an importable callable" in err
    assert "simulat" in err and "Traceback" not in err


def test_validate_counts_params_and_tasks(capsys: pytest.CaptureFixture[str]) -> None:
    """validate imports the callables and reports params, tasks and the output directory."""
    assert main(["validate", str(SIR_DIR / "job.yaml"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["params"] == 100
    assert info["tasks"] == 100 * (3 + 2)
    assert info["output"] == str(SIR_DIR / "results" / "sir-demo")


def test_schema_is_json_schema_of_the_spec(capsys: pytest.CaptureFixture[str]) -> None:
    """schema prints a JSON Schema naming every top-level spec field."""
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    assert {"job_id", "model", "code_paths", "parameters", "replicates", "seed", "targets",
            "outputs", "output", "batch"} <= set(schema["properties"])


def test_bad_spec_in_a_real_process(tmp_path: Path) -> None:
    """As a process: exit status 2, the field on stderr, no traceback, nothing on stdout."""
    proc = tidegate("run", _write(tmp_path, {"model": "m:f", "parameters": {"grid": {}}}))
    assert proc.returncode == 2
    assert "parameters.grid: expected" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_missing_spec_file_exits_2(tmp_path: Path) -> None:
    """A spec path that does not exist is bad input, not a crash."""
    proc = tidegate("validate", tmp_path / "nope.yaml")
    assert proc.returncode == 2
    assert "nope.yaml" in proc.stderr and "Traceback" not in proc.stderr
