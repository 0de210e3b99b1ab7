"""Fresh code per job: a daemon runs each job's model as it was when the job was
submitted (its snapshot), never a module imported for an earlier job, and a failed
import is not remembered; `tidegate run` refuses to resume with changed code unless
told (--accept-code-change or --restart). Real daemon, LocalCluster worker processes,
SQLite and Parquet."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import read_dataset, tidegate, write_spec
from tests.daemon_harness import Daemon, base_config

MODEL = """\
def simulate(params, seed):
    return {{"out": {{"k": [params["k"]], "{column}": [params["k"] * {factor}]}}}}
"""


def _write_model(models: Path, column: str, name: str = "edited", factor: int = 10) -> None:
    (models / f"{name}.py").write_text(MODEL.format(column=column, factor=factor))


def _spec(job_id: str, model: str = "edited:simulate", n: int = 3) -> dict[str, Any]:
    return {"job_id": job_id, "model": model, "code_paths": ["."],
            "parameters": {"values": [{"k": i} for i in range(n)]}, "replicates": 1,
            "seed": 1, "output": job_id}


def _columns(out: Path) -> set[str]:
    rows = read_dataset(out / "model_outputs" / "out")
    assert rows, f"no model output rows in {out}"
    return set(rows[0]) - {"param_id", "replicate", "seed"}


def _part_hashes(out: Path) -> set[str | None]:
    with sqlite3.connect(out / "_ledger.sqlite") as db:
        return {h for (h,) in db.execute("SELECT code_hash FROM parts")}


def _daemon(tmp_path: Path) -> tuple[Daemon, Path]:
    models = tmp_path / "models"
    models.mkdir()
    return Daemon(tmp_path, base_config(tmp_path, security={"code_roots": [str(models)]})), models


def test_each_daemon_job_runs_the_code_it_was_submitted_with(tmp_path: Path) -> None:
    """One running daemon, three jobs of one model: the second job, submitted after an
    edit, has the edit's new column on every worker (no module of the first job is
    reused), and an edit made once it is submitted does not reach it; the third has
    that edit. Each part records the code hash its manifest names; the snapshots are
    removed once their jobs are finished."""
    d, models = _daemon(tmp_path)
    _write_model(models, "first")
    d.start()
    try:
        outputs = {}
        for job_id, column, then in (("v1", "first", "second"), ("v2", "second", "third"),
                                     ("v3", "third", None)):
            status, body = d.request("POST", "/v1/jobs", yaml.safe_dump(_spec(job_id)))
            assert status == 201, body
            if then is not None:  # the next version, while this job is queued or running
                _write_model(models, then)
            job = d.wait_job(job_id, {"succeeded"})
            out = outputs[job_id] = Path(job["output"])
            assert _columns(out) == {"k", column}, d.log()
        hashes = [json.loads((out / "manifest.json").read_text())["code"]["hash"]
                  for out in outputs.values()]
        assert len(set(hashes)) == 3
        assert [_part_hashes(out) for out in outputs.values()] == [{h} for h in hashes]
    finally:
        d.stop()
    assert list((tmp_path / "state" / "code").iterdir()) == []


def test_a_failed_import_is_not_remembered_by_the_daemon(tmp_path: Path) -> None:
    """A model with a syntax error is refused at submission (400, naming it); the fixed
    file is then accepted by the same daemon and its job succeeds. A model whose import
    fails in a helper module it imported (left in sys.modules, partly right) is
    accepted once the helper is fixed, and runs the fixed helper."""
    d, models = _daemon(tmp_path)
    (models / "broken.py").write_text("def simulate(params, seed:\n    return {}\n")
    (models / "uses.py").write_text(
        "import helper\nCOLUMN = helper.COLUMN\n\n"
        "def simulate(params, seed):\n    return {'out': {'k': [params['k']], COLUMN: [1]}}\n")
    (models / "helper.py").write_text("OTHER = 1\n")
    d.start()
    try:
        for job_id, model, error, fix in (
                ("fixed", "broken:simulate", "SyntaxError",
                 lambda: _write_model(models, "fixed", name="broken")),
                ("helped", "uses:simulate", "AttributeError",
                 lambda: (models / "helper.py").write_text("COLUMN = 'helped'\n"))):
            spec = yaml.safe_dump(_spec(job_id, model=model))
            status, body = d.request("POST", "/v1/jobs", spec)
            assert status == 400 and error in body["error"], body
            fix()
            status, body = d.request("POST", "/v1/jobs", spec)
            assert status == 201, body
            job = d.wait_job(job_id, {"succeeded"})
            assert _columns(Path(job["output"])) == {"k", job_id}
    finally:
        d.stop()


def _run(spec: Path, *flags: str) -> tuple[int, dict[str, Any], str]:
    proc = tidegate("run", spec, "--workers", "1", "--threads-per-worker", "1", "--json",
                    "--no-progress", *flags)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, json.loads(lines[-1]) if lines else {}, proc.stderr


def test_run_refuses_to_resume_with_changed_code_unless_accepted(tmp_path: Path) -> None:
    """A finished job, its model edited and its sweep grown: the rerun refuses (exit 2,
    naming the changed file and both flags) and writes nothing; with
    --accept-code-change the new params run with the new code, the committed ones are
    kept, and the parts record both code hashes. Editing the spec alone (its params) is
    no code change."""
    _write_model(tmp_path, "v", factor=10)
    spec = write_spec(tmp_path / "job.yaml", _spec("cli", n=2))
    code, summary, err = _run(spec)
    assert code == 0, err
    out = tmp_path / "cli"
    first = _part_hashes(out)

    write_spec(spec, _spec("cli", n=3))  # the spec grows: the same code
    _write_model(tmp_path, "v", factor=100)
    code, summary, err = _run(spec)
    assert code == 2, err
    assert summary["exit_code"] == 2 and "~0/edited.py" in summary["error"]
    assert "--restart" in err and "--accept-code-change" in err and "Traceback" not in err
    assert len(read_dataset(out / "params")) == 2 and _part_hashes(out) == first

    code, summary, err = _run(spec, "--accept-code-change")
    assert code == 0, err
    assert summary["params"]["ok"] == 3 and summary["params"]["resumed"] == 2
    assert "action=code_changed" in err
    hashes = _part_hashes(out)
    assert len(hashes) == 2 and first < hashes
    rows = read_dataset(out / "model_outputs" / "out")
    assert sorted((r["k"], r["v"]) for r in rows) == [(0, 0), (1, 10), (2, 200)]
    # Accepted once, the output's code is the new one: a plain rerun resumes.
    code, summary, err = _run(spec)
    assert code == 0, err
    _write_model(tmp_path, "v", factor=1000)
    code, summary, err = _run(spec, "--restart")
    assert code == 0, err
    rows = read_dataset(out / "model_outputs" / "out")
    assert sorted((r["k"], r["v"]) for r in rows) == [(0, 0), (1, 1000), (2, 2000)]
    assert len(_part_hashes(out)) == 1
