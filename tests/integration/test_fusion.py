"""Task fusion through real `tidegate run`: short replicates of a param share one Dask
task, with the same rows and seeds as one task per sim; a fused task whose worker dies
with it runs again split, and every param is written once."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path
from typing import Any

import pyarrow.dataset as ds
import pytest

from tests.conftest import synthetic_spec, tidegate, write_spec

RUN = ["--workers", "2", "--threads-per-worker", "1", "--json", "--no-progress"]
# Columns that say when or how fast a run went, not what it computed.
TIMING = {"run_seconds", "wall_seconds", "started_at", "finished_at", "committed_at",
          "attempt", "worker", "part", "duration_s", "run_s"}


def _summary(proc: Any) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rows(path: Path) -> list[dict[str, Any]]:
    table = ds.dataset(path, format="parquet").to_table()
    keep = [c for c in table.column_names if c not in TIMING and "time" not in c
            and "seconds" not in c]
    rows = table.select(keep).to_pylist()
    return sorted(rows, key=lambda r: json.dumps(r, sort_keys=True, default=str))


# Four replicates fuse a param's sims into its task; one replicate packs several params
# into a task (the only fusion a single replicate has).
@pytest.mark.parametrize(("n", "r"), [(120, 4), (300, 1)])
def test_short_sims_fuse_with_the_rows_and_seeds_of_one_task_per_sim(tmp_path: Path, n: int,
                                                                    r: int) -> None:
    values = [{"k": i, "output_bytes": 256, "run_seconds": 0.002} for i in range(n)]
    runs = {}
    for fuse in (True, False):
        d = tmp_path / ("fused" if fuse else "unfused")
        d.mkdir()
        spec = synthetic_spec(n, replicates=r, parameters={"values": values},
                              batch={"fuse": fuse})
        runs[fuse] = (d, _summary(tidegate("run", write_spec(d / "job.yaml", spec), *RUN,
                                           cwd=d)))
    (fused_dir, fused), (plain_dir, plain) = runs[True], runs[False]
    for s in (fused, plain):
        assert s["params"]["ok"] == n and s["params"]["failed"] == 0
        assert s["sim_tasks"]["sims"] == n * r
    # One task per sim without fusion; once run times are measured, far fewer with it.
    assert plain["sim_tasks"]["submitted"] == n * r
    assert fused["sim_tasks"]["submitted"] < n * r / 2, fused["sim_tasks"]
    for sub in ("model_outputs/data", "targets/score"):
        a, b = _rows(fused_dir / "out" / sub), _rows(plain_dir / "out" / sub)
        assert len(a) == len(b) > 0
        assert a == b, sub
    seeds = {(x["param_id"], x["replicate"], x["seed"])
             for x in _rows(fused_dir / "out" / "model_outputs/data")}
    assert len(seeds) == n * r  # every replicate once, each with its own seed
    a, b = _rows(fused_dir / "out" / "params"), _rows(plain_dir / "out" / "params")
    assert [x["param_id"] for x in a] == [x["param_id"] for x in b]


KILLER = textwrap.dedent('''
    """Kills its worker process once, in a sim of param k = kill_at (by then the
    replicates are fused: its task dies with the worker). Its sims then last 1 s, so
    Dask's own rerun of the fused task is still running when tidegate learns of the
    loss (an 8 ms rerun may end before: it is then the one run that counts)."""
    import os
    import signal
    from pathlib import Path

    from tidegate.workloads import synthetic

    MARK = Path(__file__).with_name("killed.mark")


    def model(params, seed):
        if params["k"] == params["kill_at"] and not MARK.exists():
            MARK.write_text("x")
            os.kill(os.getpid(), signal.SIGKILL)
        slow = params["k"] == params["kill_at"]
        return synthetic({"output_bytes": 256, "run_seconds": 1.0 if slow else 0.002}, seed)
''')


@pytest.mark.parametrize(("n", "r", "kill_at"), [(80, 4, 60), (300, 1, 250)])
def test_a_fused_task_on_a_killed_worker_runs_again_split(tmp_path: Path, n: int, r: int,
                                                          kill_at: int) -> None:
    (tmp_path / "killer.py").write_text(KILLER)
    spec = synthetic_spec(n, replicates=r, model="killer:model",
                          parameters={"values": [{"k": i, "kill_at": kill_at}
                                                 for i in range(n)]})
    spec["code_paths"] = ["."]
    proc = tidegate("run", write_spec(tmp_path / "job.yaml", spec), *RUN, cwd=tmp_path)
    s = _summary(proc)
    assert (tmp_path / "killed.mark").exists(), "the worker was never killed"
    assert s["params"]["ok"] == n and s["params"]["failed"] == 0, s["errors"]
    assert s["worker_losses"], s
    assert "action=param_split" in proc.stderr, proc.stderr[-3000:]
    # The killer's fused task (one) and its four sims split after it, the others fused.
    assert s["sim_tasks"]["submitted"] < n * r / 2, s["sim_tasks"]
    ids = [x["param_id"] for x in _rows(tmp_path / "out" / "params")]
    assert len(ids) == len(set(ids)) == n
    rows = _rows(tmp_path / "out" / "model_outputs" / "data")
    assert len({(x["param_id"], x["replicate"]) for x in rows}) == n * r
