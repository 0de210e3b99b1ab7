"""``python -m bench``: run the scenarios, write the results JSON, the Markdown report
and the plots."""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import dask
import distributed
import psutil

from bench import plots, report
from bench.cluster import RESTART_TIMEOUT_S, BenchCluster
from bench.harness import needs_restart, run_arm
from bench.scenarios import LIGHT_N, STRATEGIES, Arm, Scenario, full, light, select, smoke
from bench.summary import evaluate, summarize, targets_as_dicts
from tidegate import __version__

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--smoke", action="store_true",
                   help="tiny sizes, every scenario and strategy once (CI)")
    p.add_argument("--light", action="store_true",
                   help="the full suite with fewer params in the memory races ("
                        + ", ".join(f"{k} {v}" for k, v in LIGHT_N.items()) + ")")
    p.add_argument("--scenarios", type=_names, default=None, metavar="a,b",
                   help="run only these scenarios (default: all)")
    p.add_argument("--strategies", type=_names, default=None, metavar="x,y",
                   help=f"run only these strategies, of {', '.join(STRATEGIES)}")
    p.add_argument("--repeats", type=int, default=None, metavar="N",
                   help="runs of each arm, alternating (default 1, so that the full "
                        "suite fits in 30 minutes; 3 for medians); long arms are capped "
                        "lower")
    p.add_argument("--out", type=Path, default=None,
                   help="results JSON (default bench/results/<timestamp>.json)")
    p.add_argument("--report", type=Path, default=None,
                   help="Markdown report (default docs/BENCHMARKS.md; with --smoke or "
                        "--light bench/results/<timestamp>-smoke.md or -light.md)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--tls", action="store_true",
                   help="mutual TLS on every cluster, as tidegate's embedded one uses")
    p.add_argument("--render", type=Path, default=None, metavar="RESULTS_JSON",
                   help="run nothing: write the report (and plots) from a results file")
    args = p.parse_args(argv)
    if args.light and args.smoke:
        p.error("--light and --smoke are different sizes: pick one")
    if args.repeats is not None and args.repeats < 1:
        p.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def _names(text: str) -> list[str]:
    return [n.strip() for n in text.split(",") if n.strip()]


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu": cpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "dask": dask.__version__,
        "distributed": distributed.__version__,
        "tidegate": __version__,
        "tidegate_commit": _commit(),
        "load_avg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _commit() -> str:
    """The commit tidegate ran at, with '+dirty' if its source differed from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True,
                              check=False).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    return head + ("+dirty" if git("status", "--porcelain", "daemon/") else "")


def schedule(arms: tuple[Arm, ...], repeats: int) -> list[tuple[Arm, int]]:
    """Arms alternate within each repeat, in reverse order every other repeat so that a
    drift in the machine's load does not always favour the same arm."""
    plan = []
    for r in range(repeats):
        order = arms if r % 2 == 0 else tuple(reversed(arms))
        plan += [(a, r + 1) for a in order if r < (a.max_repeats or repeats)]
    return plan


def run_scenarios(scenarios: list[Scenario], repeats: int, *, smoke_mode: bool) -> list[dict]:
    runs: list[dict[str, Any]] = []
    workdir = Path(tempfile.mkdtemp(prefix="tidegate-bench-"))
    cluster: BenchCluster | None = None
    try:
        for scenario in scenarios:
            kills = any(a.kill for a in scenario.arms)
            if cluster is None or cluster.shape != scenario.shape or kills:
                if cluster is not None:
                    cluster.close()
                _say(f"{scenario.name}: starting {scenario.shape.describe()}")
                cluster = BenchCluster(scenario.shape, workdir, log_executions=kills)
                dirty = False
            else:
                dirty = True
            for arm, repeat in schedule(scenario.arms, repeats):
                # Full runs start every run on fresh worker processes; smoke runs only
                # after a run that left the cluster dirty.
                replaced = False
                cluster.drop_tidegate_plugins()  # before the restart: fresh workers lack them
                if dirty:
                    try:
                        cluster.restart()
                    except TimeoutError as exc:
                        # Seen after dask-window runs on pile-up's cluster: the nannies'
                        # new workers never registered. A new cluster costs seconds;
                        # ending the suite here would lose every run so far.
                        _say(f"{scenario.name}: restart failed ({exc}); new cluster")
                        cluster.close()
                        cluster = BenchCluster(scenario.shape, workdir, log_executions=kills)
                        replaced = True
                record = run_arm(cluster, scenario, arm, repeat, workdir)
                record["restart_failed"] = replaced
                runs.append(record)
                _say(progress_line(record, repeats if arm.max_repeats is None
                                   else min(repeats, arm.max_repeats)))
                dirty = needs_restart(record) or not smoke_mode
    finally:
        if cluster is not None:
            cluster.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return runs


def progress_line(r: dict[str, Any], repeats: int) -> str:
    parts = [
        f"{r['scenario']:<14} {r['arm']:<20} run {r['repeat']}/{repeats}",
        f"{r['status']:<14}",
        f"wall {r['wall_s']:7.2f} s",
        f"params {r['params_ok']}/{r['params_total']}",
        f"deaths {r['worker_deaths']}",
        f"peak mem {r['peak_worker_mem_frac']:.0%}",
    ]
    if r["oom_events"]:
        parts.append(f"OOM events {r['oom_events']}")
    if r["peak_tree_mem_frac"] is not None:
        parts.append(f"peak tree {r['peak_tree_mem_frac']:.0%}")
    if r["utilization"] is not None:
        parts.append(f"util {r['utilization']:.2f}")
    if r["params_per_s"] is not None:
        parts.append(f"{r['params_per_s']:.0f} params/s")
    if r["scenario"] == "scale":
        parts.append(f"RSS +{r['peak_client_rss_delta_mib']:.0f} MiB")
        parts.append(f"sched tasks {r['peak_scheduler_tasks']}")
    if r["recomputed"] is not None:
        parts.append(f"recomputed {r['recomputed']}")
    if r["error"]:
        parts.append(f"error: {r['error']}")
    return "  ".join(parts)


def _say(text: str) -> None:
    print(f"[{datetime.now():%H:%M:%S}] {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render is not None:
        results = json.loads(args.render.read_text())
        # The report's own logic may have changed since the run: recompute from the runs.
        runs = results["runs"]
        results |= {"summary": summarize(runs), "targets": targets_as_dicts(evaluate(runs)),
                    "rendered_from": str(args.render)}
        write_report(results, args.report or REPO / "docs" / "BENCHMARKS.md", args.no_plots)
        return 0
    # Worker losses and restarts are what several scenarios provoke: keep their log
    # lines (distributed's and tidegate's) out of the progress output.
    for name in ("distributed", "tidegate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    suite = smoke() if args.smoke else light() if args.light else full()
    scenarios = select(suite, args.scenarios, args.strategies)
    if not scenarios:
        print("nothing to run: no arm matches --scenarios/--strategies", file=sys.stderr)
        return 2
    repeats = args.repeats or 1
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    # Only a full run replaces docs/BENCHMARKS.md.
    kind = "-smoke" if args.smoke else "-light" if args.light else ""
    out = args.out or REPO / "bench" / "results" / f"{stamp}{kind}.json"
    report_path = args.report or (
        REPO / "bench" / "results" / f"{stamp}{kind}.md" if kind
        else REPO / "docs" / "BENCHMARKS.md"
    )
    command = " ".join(["python -m bench", *(argv if argv is not None else sys.argv[1:])])
    meta = {"command": command, "machine": machine(), "started": stamp, "smoke": args.smoke,
            "light": args.light, "restart_timeout_s": RESTART_TIMEOUT_S,
            "repeats": repeats, "scenarios": [_describe(s) for s in scenarios]}
    m = meta["machine"]
    _say(f"{command}: {len(scenarios)} scenarios on {m['cores']} cores / "
         f"{m['memory_gib']} GiB (load {m['load_avg_at_start']})")
    if args.tls:
        import dask

        from bench.cluster import tls_everywhere

        dask.config.set(tls_everywhere())
    t0 = time.monotonic()
    runs = run_scenarios(scenarios, repeats, smoke_mode=args.smoke)
    meta["duration_s"] = round(time.monotonic() - t0, 1)
    results = {"meta": meta, "runs": runs, "summary": summarize(runs),
               "targets": targets_as_dicts(evaluate(runs))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1, allow_nan=False))
    _say(f"results: {out}")
    for t in results["targets"]:
        verdict = {True: "PASS", False: "FAIL", None: "n/a"}[t["met"]]
        _say(f"{verdict:<4} {t['scenario']}: {t['name']} {t['wanted']}: {t['measured']}")
    write_report(results, report_path, args.no_plots)
    return 0


def write_report(results: dict[str, Any], path: Path, no_plots: bool) -> None:
    """The Markdown report at ``path``, its plots in ``benchmarks/`` beside it."""
    figures: dict[str, str] = {}
    if no_plots:
        note = "plots skipped (--no-plots)"
    else:
        figures, note = plots.draw(results, path.parent / "benchmarks", path.parent)
    if note:
        _say(note)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(report.render(results, figures, note))
    _say(f"report: {path} (the run took {results['meta']['duration_s']:.0f} s)")


def _describe(s: Scenario) -> dict[str, Any]:
    w = s.workload
    timing = {}
    if w.run_seconds > 0:
        threads = s.shape.nthreads
        timing = {
            "task_seconds": round(w.task_seconds(), 2),
            "ideal_s": round(w.task_seconds() / threads, 2),
            "in_order_bound_s": round(w.in_order_bound(threads), 2),
        }
    return {
        **timing,
        "name": s.name,
        "about": s.about,
        "shape": s.shape.describe(),
        "threads": s.shape.nthreads,
        "memory_limit": s.shape.memory_limit,
        "workload_text": w.describe(),
        "workload": {
            "n_params": w.n_params, "replicates": w.replicates, "targets": w.targets,
            "outputs": w.outputs, "output_bytes": w.output_bytes, "alloc_bytes": w.alloc_bytes,
            "run_seconds": w.run_seconds, "run_sigma": w.run_sigma, "busy": w.busy,
            "child_alloc_bytes": w.child_alloc_bytes, "child_seconds": w.child_seconds,
        },
        "sample_trees": s.sample_trees,
        "arms": [
            {"label": a.label, "strategy": a.strategy, "batch": a.batch,
             "n_params": a.n_params or w.n_params, "kill": a.kill,
             "time_limit_s": a.time_limit, "max_repeats": a.max_repeats}
            for a in s.arms
        ],
    }
