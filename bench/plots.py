"""PNG plots, one per scenario: batch size, in-flight tasks, worker memory and this
process's RSS over time, one line per arm (its median-wall run). matplotlib is a
bench-only extra (``pip install -e '.[bench]'``); without it the plots are skipped."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench.report import machine_line

# Dask's worker memory thresholds with spilling off, and tidegate's admission stop.
THRESHOLDS = ((0.75, "tidegate high water"), (0.8, "Dask pause"), (0.95, "nanny kill"))


def draw(results: dict[str, Any], outdir: Path, relative_to: Path) -> tuple[dict[str, str], str]:
    """Draw every scenario's figure into ``outdir``; returns {scenario: path relative to
    ``relative_to``} and a note for the report ('' when all went well)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return {}, "plots skipped: matplotlib is not installed (pip install -e '.[bench]')"
    outdir.mkdir(parents=True, exist_ok=True)
    figures = {}
    for scenario in results["meta"]["scenarios"]:
        runs = [r for r in results["runs"] if r["scenario"] == scenario["name"]]
        if not runs:
            continue
        path = outdir / f"{scenario['name']}.png"
        fig = _figure(plt, scenario, runs, results["meta"])
        fig.savefig(path, dpi=100)
        plt.close(fig)
        figures[scenario["name"]] = path.resolve().relative_to(relative_to.resolve()).as_posix() \
            if path.resolve().is_relative_to(relative_to.resolve()) else str(path)
    return figures, ""


def representative(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per arm, the run whose wall time is the median (the lower one of two)."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        arms.setdefault(r["arm"], []).append(r)
    out = []
    for rs in arms.values():
        walls = sorted(r["wall_s"] for r in rs)
        median = statistics.median_low(walls)
        out.append(next(r for r in rs if r["wall_s"] == median))
    return out


def _figure(plt: Any, scenario: dict[str, Any], runs: list[dict[str, Any]],
            meta: dict[str, Any]) -> Any:
    fig, axes = plt.subplots(4, 1, figsize=(10, 11), sharex=True)
    # Worker memory as a fraction of the limit where the scenario sets one; in MiB where
    # the limit is LocalCluster's "auto" share of the machine (a fraction near 0).
    memory = (("worker_mem_frac", "largest worker RSS / its memory limit", False)
              if scenario.get("memory_limit") else
              ("worker_rss_mib", "worker RSS, sum over workers (MiB)", False))
    panels = (
        ("batch", "B (params allowed in flight)", True),
        ("inflight_tasks", "in-flight tasks (client futures)", True),
        memory,
        ("client_rss_mib", "bench process RSS growth (MiB)", False),
    )
    for run in representative(runs):
        s = run["series"]
        label = f"{run['arm']} ({run['status']}, {run['wall_s']:.1f} s)"
        for ax, (key, _, _) in zip(axes, panels, strict=True):
            ys = [float("nan") if v is None else v for v in s[key]]
            (line,) = ax.plot(s["t"], ys, label=label, linewidth=1.2)
        if run["kill"]:
            for ax in axes:
                ax.axvline(run["kill"]["at_s"], color=line.get_color(), linestyle=":",
                           linewidth=1)
    for ax, (_, title, log) in zip(axes, panels, strict=True):
        ax.set_ylabel(title, fontsize=8)
        ax.grid(True, alpha=0.3)
        if log:  # linear up to 1, so that 0 (nothing in flight) still has a place
            ax.set_yscale("symlog", linthresh=1)
            ax.set_ylim(bottom=0)
    if scenario.get("memory_limit"):
        for (y, text), va in zip(THRESHOLDS, ("top", "bottom", "bottom"), strict=True):
            axes[2].axhline(y, color="grey", linestyle="--", linewidth=0.8)
            axes[2].text(1.0, y, f"{text} ", fontsize=7, va=va, ha="right", color="grey",
                         transform=axes[2].get_yaxis_transform())
    axes[0].legend(fontsize=8, loc="upper right")
    axes[-1].set_xlabel("seconds since the run started")
    fig.suptitle(f"{scenario['name']}: {scenario['shape']}", fontsize=11)
    fig.text(0.01, 0.004,
             f"Command: {meta['command']}   Run: {meta['started']}\n"
             f"Machine: {machine_line(meta)}\n"
             "Each line: the median-wall run of that strategy; dotted vertical line: a worker "
             "SIGKILLed.", fontsize=7, color="dimgrey", va="bottom")
    fig.tight_layout(rect=(0, 0.04, 1, 0.98))
    return fig
