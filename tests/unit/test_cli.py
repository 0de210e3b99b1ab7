"""The command line's own behaviour: exit codes and messages for bad input, validate,
schema. Bad specs go through the real `main()`; two go through a real subprocess."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import SIR_DIR, tidegate
from tests.unit.test_spec import MALFORMED
from tidegate.cli import build_parser, main


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


# --- --json errors, options either side of the command ----------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(("argv", "code", "said"), [
    (["run", "{spec}", "--no-progress", "--json"], 2, "parameters.grid: expected"),
    (["validate", "{spec}", "--json"], 2, "parameters.grid: expected"),
    (["validate", "{missing}", "--json"], 2, "nope.yaml"),
    (["run", "--json", "--workers", "0", "{spec}"], 2, "--workers: expected a whole number"),
    (["verify", "{missing}", "--json"], 2, "OUTPUT_DIR: expected a job output directory"),
    (["status", "--json", "--url", "http://127.0.0.1:{port}"], 3, "cannot reach"),
    (["submit", "{spec}", "--json", "--url", "http://127.0.0.1:{port}"], 3, "cannot reach"),
])
def test_json_errors_are_a_json_object_on_stdout_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, said: str,
) -> None:
    """Under --json a failure prints {"error", "exit_code"} on stdout, and the usual
    message on stderr; without --json stdout stays empty."""
    spec = _write(tmp_path, {"model": "m:f", "parameters": {"grid": {}}})
    fill = {"spec": str(spec), "missing": str(tmp_path / "nope.yaml"), "port": _free_port()}
    argv = [a.format(**fill) for a in argv]
    assert main(argv) == code
    out, err = capsys.readouterr()
    answer = json.loads(out)
    assert answer == {"error": answer["error"], "exit_code": code}
    assert said in answer["error"]
    assert said in err and "tidegate" in err and "Traceback" not in err
    assert main([a for a in argv if a != "--json"]) == code
    out, err = capsys.readouterr()
    assert out == "" and said in err


@pytest.mark.parametrize(("argv", "level"), [
    (["--log-level", "WARNING", "run", "job.yaml"], "WARNING"),
    (["run", "job.yaml", "--log-level", "WARNING"], "WARNING"),
    (["run", "--log-level", "ERROR", "job.yaml"], "ERROR"),
    (["--log-level", "ERROR", "run", "job.yaml", "--log-level", "DEBUG"], "DEBUG"),
    (["--log-level", "ERROR", "schema"], "ERROR"),
    (["--log-level", "ERROR", "status", "--json"], "ERROR"),
    (["jobs", "--log-level", "DEBUG"], "DEBUG"),
    (["serve", "--log-level", "DEBUG"], "DEBUG"),
    (["run", "job.yaml"], None),
])
def test_log_level_before_or_after_the_command(argv: list[str], level: str | None) -> None:
    """--log-level works on either side of the command; given after, it wins, and the
    command's parser never puts a default back over a value given before it."""
    assert getattr(build_parser().parse_args(argv), "log_level", None) == level


def test_log_level_after_the_command_sets_the_log_level(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    try:
        main(["schema", "--log-level", "ERROR"])
        assert root.level == logging.ERROR
        main(["--log-level", "WARNING", "schema"])
        assert root.level == logging.WARNING
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_log_level_environment_is_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    monkeypatch.setenv("TIDEGATE_LOG_LEVEL", "ERROR")
    try:
        main(["schema"])
        assert root.level == logging.ERROR
        main(["schema", "--log-level", "INFO"])
        assert root.level == logging.INFO
        monkeypatch.delenv("TIDEGATE_LOG_LEVEL")
        main(["schema"])
        assert root.level == logging.INFO
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]


def test_bad_log_level_after_the_command_is_a_usage_error(
    capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["validate", "job.yaml", "--log-level", "LOUD", "--json"]) == 2
    out, err = capsys.readouterr()
    assert "invalid choice: 'LOUD'" in json.loads(out)["error"]
    assert "tidegate validate: error: argument --log-level" in err


@pytest.mark.parametrize("argv", [["--log-level", "DEBUG", "serve"],
                                  ["serve", "--log-level", "DEBUG"]])
def test_serve_log_level_flag_overrides_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]
) -> None:
    """For the daemon --log-level is the flag of config key log.level, on either side."""
    config = tmp_path / "tidegate.yaml"
    config.write_text(yaml.safe_dump({"log": {"level": "WARNING"},
                                      "state_dir": str(tmp_path / "state")}))
    seen: list[Any] = []
    monkeypatch.setattr("tidegate.service.run_service", lambda c: seen.append(c) or 0)
    root = logging.getLogger()
    saved = root.level, root.handlers[:]
    try:
        assert main([*argv, "--config", str(config)]) == 0
        assert main(["serve", "--config", str(config)]) == 0
    finally:
        root.setLevel(saved[0])
        root.handlers[:] = saved[1]
    assert [c.log.level for c in seen] == ["DEBUG", "WARNING"]


def test_the_summary_text_says_what_was_pruned(capsys: pytest.CaptureFixture[str]) -> None:
    """--prune: the text summary names the pruned count, or says a run that did not
    finish pruned nothing; without --prune there is no such line, nor a pruned key."""
    from tidegate.cli import _print_summary
    from tidegate.report import RunSummary

    def summary(**kw: Any) -> RunSummary:
        return RunSummary(job_id="j", state=kw.pop("state", "succeeded"), total=5, ok=5,
                          failed=0, resumed=5, batch_min=1, batch_max=1, batch_final=1,
                          oom_events=0, worker_restarts=0, wall_seconds=1.0, output="out",
                          parts=2, **kw)

    _print_summary(summary(prune=True, pruned=3))
    assert "pruned   3 orphaned params (no longer in the spec) dropped" in capsys.readouterr().err
    s = summary(state="interrupted", prune=True, pruned=None, orphaned=None)
    _print_summary(s)
    assert "pruned   none: the run did not finish" in capsys.readouterr().err
    assert s.as_dict()["params"]["pruned"] is None
    plain = summary(orphaned=2)
    _print_summary(plain)
    err = capsys.readouterr().err
    assert "pruned" not in err and "--prune drops them" in err
    assert "pruned" not in plain.as_dict()["params"]


def test_the_summary_of_a_search_shows_its_best_and_no_retry_hint(
    capsys: pytest.CaptureFixture[str]
) -> None:
    """A search's summary: told/trials, failed, the best loss at its values and trial;
    its failed trials get no --retry-failed hint (a retry of a search is refused), a
    sweep's failed params do."""
    from tidegate.cli import _print_summary, _retry_hint
    from tidegate.report import RunSummary

    search = {"objective": "fit", "sampler": "tpe", "trials": 30, "told": 30, "failed": 3,
              "parallel": 10, "best": {"trial": 17, "param_id": "p", "loss": 0.000123456,
                                       "values": {"beta": 0.30012345, "gamma": 0.1}}}

    def summary(**kw: Any) -> RunSummary:
        return RunSummary(job_id="j", state="completed_with_failures", total=30, ok=27,
                          failed=3, resumed=0, batch_min=1, batch_max=4, batch_final=4,
                          oom_events=0, worker_restarts=0, wall_seconds=1.0, output="out",
                          parts=2, **kw)

    s = summary(search=search)
    _print_summary(s)
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert lines[4] == ("  search   told 30/30 (3 failed), best 0.000123456 at "
                        "{beta=0.300123, gamma=0.1} (trial 17)")
    assert lines[3].startswith("  workers  ")
    assert "--retry-failed" not in err
    assert "raise parameters.search.trials" in err
    assert s.as_dict()["search"] == search
    sweep = summary()
    assert "--retry-failed" in (_retry_hint(sweep) or "")
    _print_summary(sweep)
    assert "search" not in capsys.readouterr().err
    assert sweep.as_dict()["search"] is None
