"""Run-time shapes the suite's targets were not tuned on: tidegate adaptive against the
raw dask-window (one Dask task per sim, the window sized by hand for the shape), each
pair on one fresh LocalCluster, in one run.

    python -m bench.distributions [--shapes a,b] [--out FILE]

Writes bench/results/distributions.json (or --out) and prints a Markdown table. About
8 minutes on 2 cores. Not part of `make bench` (which it would push past 30 minutes):
what it checks is that adaptive granularity (batch.fuse) pays, or at least does not
cost, on shapes of run time it was not built around, not a target of its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from bench.cli import machine, run_scenarios
from bench.scenarios import Arm, Scenario, Shape, Workload

RESULTS = Path(__file__).parent / "results"
TIME_LIMIT_S = 240.0


def _pair(window: int) -> tuple[Arm, ...]:
    return (Arm(f"dask-window-{window}", "dask-window", batch=window, time_limit=TIME_LIMIT_S),
            Arm("tidegate", "tidegate", time_limit=TIME_LIMIT_S))


SHAPES = (
    Scenario("lognormal-short", "lognormal run times, median 5 ms, sigma 1; 4 replicates",
             Shape(2, 1), Workload(3000, replicates=4, run_seconds=0.005, run_sigma=1.0),
             _pair(16)),
    Scenario("lognormal-wide", "lognormal, median 10 ms, sigma 2 (1% of params past 1 s); "
             "2 replicates", Shape(2, 1),
             Workload(600, replicates=2, run_seconds=0.010, run_sigma=2.0), _pair(8)),
    Scenario("mid-50ms", "50 ms sleeping, 4 replicates: fusion pays little here",
             Shape(2, 1), Workload(400, replicates=4, run_seconds=0.05), _pair(8)),
    Scenario("cpu-1ms-one-replicate", "1 ms of CPU, 1 replicate: only params can be fused",
             Shape(2, 1), Workload(6000, replicates=1, run_seconds=0.001, busy=True),
             _pair(16)),
    Scenario("four-threads", "2 workers x 4 threads, 5 ms sleeping, 8 replicates",
             Shape(2, 4), Workload(1500, replicates=8, run_seconds=0.005), _pair(32)),
)


def _rate(s: Scenario, r: dict[str, Any]) -> float | None:
    if r["status"] != "ok" or not r["wall_s"]:
        return None
    return round(r["params_ok"] * s.workload.replicates / r["wall_s"], 1)


def rows(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per shape: each arm's wall and sims/s, tidegate's ratio to the window."""
    out = []
    for s in SHAPES:
        mine = {r["arm"]: r for r in runs if r["scenario"] == s.name}
        if len(mine) != 2:
            continue
        window = next(r for a, r in mine.items() if a != "tidegate")
        tide = mine["tidegate"]
        bound = s.workload.in_order_bound(s.shape.nthreads)

        out.append({
            "shape": s.name, "about": s.about, "cluster": s.shape.describe(),
            "window_arm": window["arm"], "window_wall_s": window["wall_s"],
            "window_sims_per_s": _rate(s, window), "tidegate_wall_s": tide["wall_s"],
            "tidegate_sims_per_s": _rate(s, tide), "in_order_bound_s": round(bound, 2),
            "speedup": (round(window["wall_s"] / tide["wall_s"], 2)
                        if _rate(s, window) and _rate(s, tide) else None),
        })
    return out


def table(result_rows: list[dict[str, Any]]) -> str:
    lines = ["| shape | cluster | dask-window | wall s | tidegate wall s | in-order bound s "
             "| tidegate speed-up |", "|---|---|---|---|---|---|---|"]
    for r in result_rows:
        speedup = f"{r['speedup']:.2f}x" if r["speedup"] is not None else "-"
        lines.append(f"| {r['shape']} ({r['about']}) | {r['cluster']} | {r['window_arm']} | "
                     f"{r['window_wall_s']:.1f} | {r['tidegate_wall_s']:.1f} | "
                     f"{r['in_order_bound_s']:.1f} | {speedup} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.distributions", description=__doc__)
    p.add_argument("--shapes", default=None, metavar="a,b",
                   help=f"a subset of {', '.join(s.name for s in SHAPES)}")
    p.add_argument("--out", type=Path, default=RESULTS / "distributions.json")
    args = p.parse_args(argv)
    names = set(args.shapes.split(",")) if args.shapes else None
    unknown = (names or set()) - {s.name for s in SHAPES}
    if unknown:
        print(f"unknown shapes: {', '.join(sorted(unknown))}", file=sys.stderr)
        return 2
    for name in ("distributed", "tidegate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    shapes = [s for s in SHAPES if names is None or s.name in names]
    runs = run_scenarios(shapes, 1, smoke_mode=False)
    result = {"command": " ".join(["python -m bench.distributions", *(argv or sys.argv[1:])]),
              "machine": machine(), "rows": rows(runs), "runs": runs}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1, default=str) + "\n")
    print(table(result["rows"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
