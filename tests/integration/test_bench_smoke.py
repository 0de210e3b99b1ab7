"""The benchmark harness (bench/) in smoke mode: tiny sizes, every scenario and strategy."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO

RUN_FIELDS = (
    "scenario", "arm", "strategy", "repeat", "status", "wall_s", "params_total", "params_ok",
    "worker_deaths", "peak_worker_mem_frac", "utilization", "params_per_s",
    "peak_client_rss_delta_mib", "peak_scheduler_tasks", "window_tasks", "recomputed",
    "kill", "worker_plugins", "series",
)
SERIES = ("t", "batch", "inflight_tasks", "worker_mem_frac", "client_rss_mib")


def test_bench_smoke_writes_every_scenario_and_strategy(tmp_path: Path) -> None:
    """`python -m bench --smoke` records every scenario x strategy with the report's fields."""
    out, report = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--no-plots", "--out", str(out),
         "--report", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    planned = {(s["name"], a["label"]) for s in results["meta"]["scenarios"] for a in s["arms"]}
    assert {s["name"] for s in results["meta"]["scenarios"]} == {
        "tight-memory", "pile-up", "heavy-tail", "overhead", "scale", "worker-kill"}
    assert {a["strategy"] for s in results["meta"]["scenarios"] for a in s["arms"]} == {
        "naive", "fixed", "dask-window", "tidegate"}
    assert {(r["scenario"], r["arm"]) for r in results["runs"]} == planned
    for run in results["runs"]:
        assert all(f in run for f in RUN_FIELDS), sorted(set(RUN_FIELDS) - set(run))
        assert run["status"] in ("ok", "did not finish", "failed")
        assert run["series"]["t"] and all(len(run["series"][k]) == len(run["series"]["t"])
                                          for k in SERIES)
        if run["status"] == "ok":
            assert run["params_ok"] == run["params_total"], run["arm"]
        # A raw strategy never runs with the plugins an earlier tidegate arm registered.
        watched = "tidegate-memory-watch" in run["worker_plugins"]
        assert watched == (run["strategy"] == "tidegate"), (run["arm"], run["worker_plugins"])
        if run["scenario"] == "worker-kill":
            assert run["recomputed"] is not None
            assert (run["kill"] is not None) == run["arm"].endswith("kill")
    assert {(s["scenario"], s["arm"]) for s in results["summary"]} == planned
    assert {t["scenario"] for t in results["targets"]} == {s for s, _ in planned}
    text = report.read_text()
    assert all(f"## {name}" in text for name, _ in planned)
    assert "plots skipped (--no-plots)" in text


def test_bench_smoke_pile_up_races_every_arm_and_reports_its_target(tmp_path: Path) -> None:
    """The pile-up race alone, tiny: adaptive, pinned 1-8 and dask-window 1-8 each run,
    and its target is printed with a verdict, in the report and on stdout."""
    out, report = tmp_path / "results.json", tmp_path / "BENCHMARKS.md"
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--smoke", "--scenarios", "pile-up", "--no-plots",
         "--out", str(out), "--report", str(report)],
        cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())
    arms = {r["arm"] for r in results["runs"]}
    assert arms == {"tidegate", *(f"tidegate-b{b}" for b in (2, 4, 8)),
                    *(f"dask-window-{w}" for w in (2, 4, 8))}
    for run in results["runs"]:
        assert run["status"] == "ok" and run["params_ok"] == run["params_total"], run["arm"]
        assert (run["oom_events"] is not None) == (run["strategy"] == "tidegate"), run["arm"]
    (target,) = [t for t in results["targets"] if t["scenario"] == "pile-up"]
    assert target["name"] == "tidegate wall / best surviving pinned wall"
    # Every arm finished, so the ratio is evaluated (met is True or False, not None).
    assert target["met"] in (True, False)
    verdict = "PASS" if target["met"] else "FAIL"
    text = report.read_text()
    assert f"**{verdict}**." in text
    assert "Adaptive against the best arm, pinned or window, that lost no worker" in text
    assert f"{verdict} pile-up: tidegate wall / best surviving pinned wall" in proc.stdout


def test_resume_scale_bench_resumes_from_the_watermark_and_without_it(tmp_path: Path) -> None:
    """bench.resume_scale at a small size: the built output's watermark covers every
    committed param, the run with it skips them, the copy without it walks them, and both
    reach their first admission."""
    out = tmp_path / "resume.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.resume_scale", "--params", "6000", "--committed",
         "4000", "--workers", "1", "--out", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())
    assert got["watermark"] == 4000
    assert got["with_watermark"]["watermark_used"] is True
    assert got["without_watermark"]["watermark_used"] is False
    for run in (got["with_watermark"], got["without_watermark"]):
        assert run["startup_s"] is not None and run["exit"] == 130, proc.stdout


def test_file_scale_bench_loads_each_format_both_ways_and_starts(tmp_path: Path) -> None:
    """bench.file_scale at a small size: each format loads as a FileSource and, row by
    row, as the same number of params, and `tidegate run` reaches its first admission."""
    out = tmp_path / "file.json"
    proc = subprocess.run(
        [sys.executable, "-m", "bench.file_scale", "--rows", "3000", "--workers", "1",
         "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(out.read_text())
    for fmt in ("csv", "parquet", "jsonl"):
        assert got[fmt]["file_source"]["source"] == "FileSource"
        assert got[fmt]["row_by_row"]["source"] == "ListSource"
        assert got[fmt]["file_source"]["params"] == got[fmt]["row_by_row"]["params"] == 3000
        assert got[fmt]["run"]["startup_s"] is not None and got[fmt]["run"]["exit"] == 130


def test_a_baseline_arms_gather_gives_up_at_its_deadline() -> None:
    """The raw strategies' gather is bounded by the run's time limit: a result that does
    not come (here a task still running) makes the arm "did not finish", never a hang."""
    import time

    from bench.strategies import gather
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster, Client(cluster) as client:
        slow = client.submit(time.sleep, 3, pure=False)
        with pytest.raises(TimeoutError):  # the task would answer, None, after 3 s
            gather(client, [slow], time.monotonic() + 0.5)
        with pytest.raises(TimeoutError):
            gather(client, [slow], time.monotonic() - 1)
        assert gather(client, [client.submit(sum, [1, 2])], time.monotonic() + 30) == [3]
        slow.cancel()
