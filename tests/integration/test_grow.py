"""Growing and shrinking a sweep: `tidegate run` (and the daemon) on a real LocalCluster
rerun with more, fewer or retyped parameter values resumes the same job, runs only the
new params and keeps every column's type across parts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from tests.conftest import synthetic_spec, tidegate, write_spec
from tests.daemon_harness import Daemon, base_config


def _run(spec: Path, *extra: str) -> dict[str, Any]:
    proc = tidegate("run", spec, "--workers", "1", "--json", "--no-progress", *extra)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _ran(summary: dict[str, Any]) -> int:
    """Params this run computed: the spec's committed ones less those from earlier runs."""
    p = summary["params"]
    return p["ok"] + p["failed"] - p["resumed"]


def _csv(path: Path, rows: list[str]) -> None:
    path.write_text("k,x,output_bytes\n" + "".join(r + "\n" for r in rows))


def _file_spec(tmp_path: Path) -> Path:
    return write_spec(tmp_path / "job.yaml", synthetic_spec(
        0, job_id=None, parameters={"file": "params.csv"}))


def _param_types(out: Path) -> set[tuple[str, pa.DataType, pa.DataType]]:
    """(part, param_k type, param_x type) of every committed params part."""
    return {(p.name, (s := pq.read_schema(p)).field("param_k").type, s.field("param_x").type)
            for p in sorted((out / "params").glob("part-*.parquet"))}


def test_a_grown_params_file_runs_only_its_new_rows(tmp_path: Path) -> None:
    """5 rows run; 3 rows appended, spelled 5.0 so that the CSV reader makes the whole k
    column float: the rerun is the same job (the derived id too), runs only the 3, and
    writes them as int64 like the first part; all 8 read back once. Removing 2 rows
    leaves them in the output, reported as orphaned; a new column is refused."""
    _csv(tmp_path / "params.csv", [f"{i},{i / 4},256" for i in range(5)])
    spec = _file_spec(tmp_path)
    first = _run(spec)
    assert first["params"] == {"total": 5, "ok": 5, "failed": 0, "resumed": 0,
                               "quarantined": 0, "orphaned": 0}
    out = Path(first["output"])
    _csv(tmp_path / "params.csv", [f"{i},{i / 4},256" for i in range(5)]
         + [f"{i}.0,{i / 4},256" for i in range(5, 8)])
    grown = _run(spec)
    assert grown["job_id"] == first["job_id"] and grown["output"] == first["output"]
    assert (grown["params"]["total"], grown["params"]["resumed"], _ran(grown)) == (8, 5, 3)
    params = ds.dataset(out / "params").to_table()
    assert params.num_rows == 8 == len(set(params.column("param_id").to_pylist()))
    assert sorted(params.column("param_k").to_pylist()) == list(range(8))
    assert {(k, x) for _, k, x in _param_types(out)} == {(pa.int64(), pa.float64())}
    scores = pq.read_table(out / "targets" / "score")
    assert sorted(scores.column("param_id").to_pylist()) == sorted(
        params.column("param_id").to_pylist())
    outputs = ds.dataset(out / "model_outputs").to_table(columns=["param_id", "replicate"])
    assert len(set(zip(*outputs.to_pydict().values(), strict=True))) == 8 * 2

    _csv(tmp_path / "params.csv", [f"{i},{i / 4},256" for i in (0, 1, 3, 5, 6, 7)])
    shrunk = _run(spec)
    assert shrunk["params"] == {"total": 6, "ok": 6, "failed": 0, "resumed": 6,
                                "quarantined": 0, "orphaned": 2}
    assert sorted(o["values"]["k"] for o in shrunk["orphans"]) == [2, 4]
    assert ds.dataset(out / "params").count_rows() == 8  # kept
    text = tidegate("run", spec, "--workers", "1", "--no-progress")
    assert text.returncode == 0, text.stderr
    assert "orphaned 2 committed params no longer in the spec" in text.stderr
    assert "no longer in the spec (orphaned; kept in the output)" in text.stderr

    (tmp_path / "params.csv").write_text("k,x,output_bytes,extra\n0,0.0,256,1\n")
    refused = tidegate("run", spec, "--workers", "1", "--no-progress")
    assert refused.returncode == 2
    assert "param_names" in refused.stderr and "--restart" in refused.stderr
    assert "Traceback" not in refused.stderr


def test_a_grown_grid_runs_only_its_new_values(tmp_path: Path) -> None:
    """A grid of 5 grown by 3 values of k reruns only the 3; a float k that is not whole
    (0.5 where the parts hold int64) is refused naming the column, and --restart then
    recomputes the sweep with float k."""
    def grid(ks: list[Any]) -> Path:
        return write_spec(tmp_path / "job.yaml", synthetic_spec(
            0, job_id=None, parameters={"grid": {"k": ks, "x": [0.5], "output_bytes": [256]}}))

    first = _run(grid(list(range(5))))
    grown = _run(grid([*range(5), 5.0, 6, 7]))
    assert grown["job_id"] == first["job_id"]
    assert (grown["params"]["total"], grown["params"]["resumed"], _ran(grown)) == (8, 5, 3)
    out = Path(grown["output"])
    assert ds.dataset(out / "params").count_rows() == 8
    assert {k for _, k, _ in _param_types(out)} == {pa.int64()}

    spec = grid([*range(8), 0.5])
    refused = tidegate("run", spec, "--workers", "1", "--no-progress")
    assert refused.returncode == 2
    assert "param_k is int64" in refused.stderr and "--restart" in refused.stderr
    assert "Traceback" not in refused.stderr
    again = _run(spec, "--restart")
    assert (again["params"]["resumed"], _ran(again)) == (0, 9)
    assert {k for _, k, _ in _param_types(out)} == {pa.float64()}


def test_the_daemon_resumes_a_resubmitted_grown_spec(tmp_path: Path) -> None:
    """Through the API: a job of 4 params, then the same job grown to 6: the second run
    resumes the 4 and computes 2; then shrunk to 3: 1 orphaned."""
    daemon = Daemon(tmp_path, base_config(tmp_path)).start()
    try:
        def submit(n: int) -> dict[str, Any]:
            spec = synthetic_spec(n, job_id=None, output=None)
            del spec["job_id"], spec["output"]
            status, created = daemon.request("POST", "/v1/jobs", json.dumps(spec),
                                             headers={"Content-Type": "application/json"})
            assert status == 201, created
            job = daemon.wait_job(created["id"], {"succeeded", "failed"})
            assert job["state"] == "succeeded", job
            return job

        first, grown = submit(4), submit(6)
        assert grown["id"] == first["id"]
        assert (grown["params"]["total"], grown["params"]["resumed"]) == (6, 4)
        assert grown["summary"]["params"]["orphaned"] == 0
        shrunk = submit(3)
        assert shrunk["summary"]["params"]["orphaned"] == 3
        assert (shrunk["params"]["total"], shrunk["params"]["resumed"]) == (3, 3)
        assert "no longer in the spec" in daemon.log()
    finally:
        daemon.stop()
