"""The Markdown report (docs/BENCHMARKS.md) from a results dict."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.summary import RACES, best_surviving, is_fixed_arm

ANALYSIS = Path(__file__).with_name("analysis.md")

# Per scenario: (column header, metric in the summary, format of one value).
COLUMNS: dict[str, list[tuple[str, str, str]]] = {
    "tight-memory": [
        ("wall s", "wall_s", "{:.1f}"),
        ("params written", "params_ok", "{:.0f}"),
        ("worker deaths", "worker_deaths", "{:.0f}"),
        ("peak worker memory / limit", "peak_worker_mem_frac", "{:.0%}"),
    ],
    "heavy-tail": [
        ("wall s", "wall_s", "{:.1f}"),
        ("utilization", "utilization", "{:.2f}"),
        ("params written", "params_ok", "{:.0f}"),
    ],
    "overhead": [
        ("wall s", "wall_s", "{:.1f}"),
        ("params/s", "params_per_s", "{:.0f}"),
    ],
    "scale": [
        ("wall s", "wall_s", "{:.1f}"),
        ("params/s", "params_per_s", "{:.0f}"),
        ("peak RSS growth MiB", "peak_client_rss_delta_mib", "{:.1f}"),
        ("peak scheduler tasks", "peak_scheduler_tasks", "{:.0f}"),
        ("window tasks (B max x tasks/param)", "window_tasks", "{:.0f}"),
    ],
    # Short sims: throughput against the physical limit (threads / sim time).
    **{name: [
        ("wall s", "wall_s", "{:.1f}"),
        ("params/s", "params_per_s", "{:.1f}"),
        ("utilization", "utilization", "{:.2f}"),
    ] for name in ("fast-sims", "fast-sims-cpu", "long-sims")},
    "worker-kill": [
        ("wall s", "wall_s", "{:.2f}"),
        ("worker deaths", "worker_deaths", "{:.0f}"),
        ("recomputed sim tasks", "recomputed", "{:.0f}"),
        ("params written", "params_ok", "{:.0f}"),
    ],
}
# The races: wall, params, losses (tidegate's OOM events: its own classifier; the
# plain-Dask arms have worker deaths only).
RACE_COLUMNS = [
    ("wall s", "wall_s", "{:.1f}"),
    ("params ok", "params_ok", "{:.0f}"),
    ("worker deaths", "worker_deaths", "{:.0f}"),
    ("OOM events (tidegate)", "oom_events", "{:.0f}"),
    ("peak worker memory / limit", "peak_worker_mem_frac", "{:.0%}"),
]
for _name in RACES:
    COLUMNS[_name] = list(RACE_COLUMNS)
COLUMNS["child-process"].append(
    ("peak process tree / limit", "peak_tree_mem_frac", "{:.0%}"))
COLUMNS["tight-memory"].insert(1, ("params/s", "params_per_s", "{:.1f}"))

VERDICT = {True: "PASS", False: "**FAIL**", None: "n/a"}


def cell(stat: dict[str, float] | None, fmt: str) -> str:
    if stat is None:
        return "-"
    median, lo, hi = (fmt.format(stat[k]) for k in ("median", "min", "max"))
    return median if lo == hi else f"{median} ({lo}-{hi})"


def machine_line(meta: dict[str, Any]) -> str:
    m = meta["machine"]
    return (f"{m['cores']} cores, {m['memory_gib']} GiB RAM ({m['cpu']}; {m['os']}; "
            f"Python {m['python']}, dask/distributed {m['distributed']}, "
            f"tidegate {m['tidegate']} at {m.get('tidegate_commit', '?')})")


def render(results: dict[str, Any], figures: dict[str, str], plot_note: str) -> str:
    meta = results["meta"]
    lines = [
        "# Benchmarks",
        "",
        "tidegate against three other ways of running the same sweep on the same Dask "
        "cluster: `naive` (submit every sim and agg task at once, gather the aggs at the "
        "end, then every sim again for the model outputs), `fixed` (submit B params, "
        "gather them, write Parquet, release, repeat: a barrier per batch) and "
        "`dask-window` (the raw Dask idiom: an `as_completed` window, `next_batch`, one "
        "gather, a `map` refill; Parquet every 1,000 params; no tidegate code). Every "
        "strategy runs the same tasks (`tidegate.simreturn.run_sim` of the synthetic "
        "model, `run_target` of its loss) on one LocalCluster per scenario, alternating.",
        "",
        f"**Command:** `{meta['command']}` (`make bench` runs `python -m bench`)"
        + (f"; this page rendered from its results file `{Path(results['rendered_from']).name}` "
           f"with `python -m bench --render`" if results.get("rendered_from") else "") + ".  ",
        f"**Machine:** {machine_line(meta)}.  ",
        f"**Run:** {meta['started']}, {meta['duration_s'] / 60:.1f} minutes in all, "
        f"load average {meta['machine']['load_avg_at_start']} at the start. "
        "The machine was shared with other work during the run: absolute times are "
        "noisy; the ratios between strategies, run alternately on fresh worker processes, "
        "are what to read. Each cell is the median over the runs, with (min-max) when they "
        "differ.",
        "",
        "## Targets",
        "",
        "| scenario | target | measured | wanted | result | margin |",
        "|---|---|---|---|---|---|",
    ]
    for t in results["targets"]:
        met = VERDICT[t["met"]]
        lines.append(f"| {t['scenario']} | {t['name']} | {t['measured']} | {t['wanted']} "
                     f"| {met} | {t['by']} |")
    lines.append("")
    for scenario in meta["scenarios"]:
        lines += _scenario(scenario, results, figures, meta)
    lines += _method(meta)
    if plot_note:
        lines += ["", f"_{plot_note}_"]
    if ANALYSIS.exists():
        lines += ["", ANALYSIS.read_text().rstrip()]
    return "\n".join(lines) + "\n"


def _scenario(
    scenario: dict[str, Any], results: dict[str, Any], figures: dict[str, str],
    meta: dict[str, Any],
) -> list[str]:
    name = scenario["name"]
    rows = [s for s in results["summary"] if s["scenario"] == name]
    if not rows:
        return []
    columns = COLUMNS[name]
    out = [
        f"## {name}",
        "",
        f"{scenario['about']} Cluster: {scenario['shape']}. Workload: "
        f"{scenario['workload_text']}{_per_arm_sizes(scenario)}.",
        "",
        "| strategy | B | runs | finished | " + " | ".join(c[0] for c in columns) + " |",
        "|---|---|---|---|" + "---|" * len(columns),
    ]
    runs = results["runs"]
    for row in rows:
        finished = row["statuses"].get("ok", 0)
        status = f"{finished}/{row['runs']}"
        other = {k: v for k, v in row["statuses"].items() if k != "ok"}
        if other:
            status += " (" + ", ".join(f"{v} {k}" for k, v in other.items()) + ")"
        cells = [cell(row[metric], fmt) for _, metric, fmt in columns]
        out.append(f"| {row['arm']} | {_batch(row, scenario, runs)} | {row['runs']} | {status} | "
                   + " | ".join(cells) + " |")
    out.append("")
    targets = [t for t in results["targets"] if t["scenario"] == name]
    if targets:
        out += [f"Target: {t['name']} {t['wanted']}: measured {t['measured']}, "
                f"**{VERDICT[t['met']].strip('*')}**." for t in targets]
        out.append("")
    out += _extra(name, scenario, results)
    if name in figures:
        out += [f"![{name}: batch size, in-flight tasks and worker memory over time]"
                f"({figures[name]})", ""]
    out += [f"_Produced by `{meta['command']}` on {machine_line(meta)}._", ""]
    return out


def _per_arm_sizes(scenario: dict[str, Any]) -> str:
    sizes = {a["label"]: a["n_params"] for a in scenario["arms"]}
    if len(set(sizes.values())) <= 1:
        return ""
    return " (" + ", ".join(f"{label}: {n:,} params" for label, n in sizes.items()) + ")"


def _batch(row: dict[str, Any], scenario: dict[str, Any], runs: list[dict[str, Any]]) -> str:
    arm = next(a for a in scenario["arms"] if a["label"] == row["arm"])
    if row["strategy"] == "tidegate" and arm["batch"]:
        return f"pinned {arm['batch']}"
    if row["strategy"] == "tidegate":
        rs = [r for r in runs if r["scenario"] == row["scenario"] and r["arm"] == row["arm"]]
        lo = min(r["detail"].get("batch_min", 0) for r in rs)
        hi = max(r["detail"].get("batch_max", 0) for r in rs)
        return f"adaptive {lo}-{hi}"
    if row["strategy"] == "naive":
        return f"all {row['params_total']}"
    return str(arm["batch"])


def _extra(name: str, scenario: dict[str, Any], results: dict[str, Any]) -> list[str]:
    runs = [r for r in results["runs"] if r["scenario"] == name]
    out = []
    failed = [r for r in runs if r.get("restart_failed")]
    if failed:
        out.append("The restart before these runs timed out; they ran on a new cluster: "
                   + ", ".join(f"{r['arm']} run {r['repeat']}" for r in failed) + ".")
    if name in RACES:
        tg = [r for r in runs if r["arm"] == "tidegate"]
        best = best_surviving(results["runs"], name, is_fixed_arm)
        if tg and best:
            wall = statistics.median(r["wall_s"] for r in tg)
            out.append(f"Adaptive against the best arm, pinned or window, that lost no "
                       f"worker ({best[0]}, {best[1]:.1f} s): {wall / best[1]:.2f}x.")
        elif tg:
            out.append("No pinned or window arm finished every run without losing a worker.")
    if name == "child-process":
        peaks = [f"{r['arm']} run {r['repeat']}: " + ", ".join(
                    f"{w.rsplit(':', 1)[-1]} {f:.0%}" for w, f in r["peak_tree_by_worker"].items())
                 for r in runs if r.get("peak_tree_by_worker")]
        if peaks:
            out.append("Peak process-tree RSS / limit, per worker (by port): "
                       + "; ".join(peaks) + ".")
    if name == "heavy-tail" and scenario.get("ideal_s"):
        work, threads, bound = (scenario[k] for k in ("task_seconds", "threads",
                                                      "in_order_bound_s"))
        out.append(
            f"Sum of the sim run times {work:.0f} s over {threads} threads: "
            f"{scenario['ideal_s']:.1f} s if perfectly packed; {bound:.1f} s is the best any "
            "runner that starts params in order can do (each on the first free thread, zero "
            f"overhead), a utilization of {work / (threads * bound):.2f}."
        )
    if name == "worker-kill":
        kills = [r for r in runs if r["kill"]]
        if kills:
            out.append("Kills: " + "; ".join(
                f"{r['arm']} run {r['repeat']}: at {r['kill']['at_s']:.1f} s, "
                f"{r['kill']['done']} params done, B {r['kill']['batch']}, "
                f"{r['kill']['inflight_tasks']} tasks in flight, "
                f"{r['recomputed']} sim tasks ran twice"
                for r in kills
            ) + ".")
    if name == "tight-memory":
        dnf = [r for r in runs if r["status"] != "ok"]
        if dnf:
            out.append("Not finished: " + "; ".join(
                f"{r['arm']} run {r['repeat']}: {r['status']} within {r['time_limit_s']:.0f} s, "
                f"{r['worker_deaths']} worker deaths, peak worker memory "
                f"{r['peak_worker_mem_frac']:.0%} of the limit"
                for r in dnf
            ) + ".")
    return out + ([""] if out else [])


def _method(meta: dict[str, Any]) -> list[str]:
    restart_s = meta.get("restart_timeout_s", 30)  # results from before it was recorded: 30
    return [
        "## How it is measured",
        "",
        "- **Cluster**: one `LocalCluster` per scenario shape, worker processes with "
        "nannies, the scheduler in the benchmark process on its own event-loop thread. "
        "Every run starts on fresh worker processes (`client.restart()`; on a new "
        f"LocalCluster when that restart times out after {restart_s:g} s, which the run "
        "records as "
        "`restart_failed`). tidegate runs "
        "`tidegate.runner.Runner` with its defaults (adaptive B, parts every 1,000 params "
        "or 10 s, fsynced, with the SQLite ledger) on a `tidegate.cluster.Cluster` wrapping "
        "an asynchronous client of that scheduler; the other strategies share one "
        "synchronous client and write Parquet with `pyarrow.parquet.write_table` (no "
        "fsync, no ledger).",
        "- **wall**: from a strategy's first submission (tidegate: the call to "
        "`Runner.run`) to its last Parquet write; a run stopped at its time limit reports "
        "the limit.",
        "- **worker memory**: every 0.5 s from the scheduler (`Cluster.workers()`: RSS "
        "as of each worker's last heartbeat, so a spike between heartbeats can be missed), "
        "as the largest worker's RSS over its memory limit.",
        "- **in-flight tasks**: the client's own futures, `len(client.futures)`; **B**: "
        "the runner's batch size for tidegate, the fixed B or window for the others, every "
        "param for naive.",
        "- **process tree** (child-process): each worker's RSS plus its descendants' (psutil, "
        "every 20 ms from the benchmark process; worker pids from `client.run(os.getpid)`), "
        "as a fraction of its memory limit.",
        "- **OOM events**: tidegate's own count of workers lost for memory, as its loss "
        "classifier sees them (a SIGKILL counts); the plain-Dask arms report worker deaths "
        "only.",
        "- **races** (pile-up, working-memory, child-process, short-sims, tight-memory's "
        "windows): an arm *survives* when every run finished, wrote every param and lost no "
        "worker; the best surviving arm is the one with the lowest median wall (highest "
        "params/s for tight-memory).",
        "- **worker deaths**: workers removed from the scheduler during the run (a "
        "SchedulerPlugin's `remove_worker`), the deliberate kill included.",
        "- **utilization**: sum of the sim tasks' run times / (threads x wall).",
        "- **peak RSS growth**: this process's RSS (psutil, every 0.1 s) above its value "
        "just before the run. The scheduler lives in this process too, so its memory is "
        "included.",
        "- **peak scheduler tasks**: the most tasks the scheduler held, `len(scheduler"
        ".tasks)` on every transition (a SchedulerPlugin).",
        "- **recomputed sim tasks**: sim task executions (a WorkerPlugin logs each key as "
        "it starts executing, one O_APPEND write) minus distinct sim keys.",
        f"- **repeats**: {meta['repeats']} per arm, alternating arms (reversed every "
        "other repeat); arms that are slow or fail by design run fewer times, as the "
        "runs column says.",
        "",
    ]
