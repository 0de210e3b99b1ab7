"""From run records to per-arm medians (with min-max) and the targets the report
checks."""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

# Below this, an RSS growth is allocator noise (psutil sees whole pages and arenas).
RSS_FLOOR_MIB = 1.0

METRICS = (
    "wall_s",
    "params_ok",
    "worker_deaths",
    "peak_worker_mem_frac",
    "utilization",
    "params_per_s",
    "peak_client_rss_delta_mib",
    "peak_scheduler_tasks",
    "window_tasks",
    "recomputed",
    "oom_events",
    "worker_restarts",
    "peak_tree_mem_frac",
)

RACES = ("pile-up", "working-memory", "child-process", "short-sims")


def spread(values: Iterable[float | int | None]) -> dict[str, float] | None:
    """Median, min and max of the values that are not None."""
    vs = [v for v in values if v is not None]
    if not vs:
        return None
    return {"median": statistics.median(vs), "min": min(vs), "max": max(vs), "n": len(vs)}


def summarize(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (scenario, arm), in the order the arms first ran."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in runs:
        groups.setdefault((r["scenario"], r["arm"]), []).append(r)
    out = []
    for (scenario, arm), rs in groups.items():
        statuses: dict[str, int] = {}
        for r in rs:
            statuses[r["status"]] = statuses.get(r["status"], 0) + 1
        out.append({
            "scenario": scenario,
            "arm": arm,
            "strategy": rs[0]["strategy"],
            "runs": len(rs),
            "statuses": statuses,
            "params_total": rs[0]["params_total"],
            **{m: spread(r[m] for r in rs) for m in METRICS},
        })
    return out


@dataclass(frozen=True, slots=True)
class Target:
    scenario: str
    name: str
    measured: str
    wanted: str
    met: bool | None  # None: could not be evaluated (an arm did not run)
    by: str  # how far from the threshold, signed so that a miss reads plainly


def _runs(runs: list[dict[str, Any]], scenario: str, arm: str) -> list[dict[str, Any]]:
    return [r for r in runs if r["scenario"] == scenario and r["arm"] == arm]


def _median(runs: list[dict[str, Any]], metric: str) -> float | None:
    s = spread(r[metric] for r in runs)
    return s["median"] if s else None


def _ratio_target(
    scenario: str, name: str, num: float | None, den: float | None, op: str, limit: float,
    what: str,
) -> Target:
    if num is None or den is None or den == 0:
        return Target(scenario, name, "n/a", f"{op} {limit:g}", None, "an arm did not finish")
    ratio = num / den
    met = ratio <= limit if op == "<=" else ratio >= limit
    by = f"{(ratio / limit - 1) * 100:+.0f}% vs the limit"
    return Target(scenario, name, f"{ratio:.2f} ({what})", f"{op} {limit:g}", met, by)


# The run time of a sim in fast-sims: the physical limit is threads / FAST_SIM_S sims/s.
FAST_SIM_S = 0.005


def _short(runs: list[dict[str, Any]], ran: set[str]) -> list[Target]:
    """Short sims and fusion: the window raw against tidegate, and the physical limit."""
    out: list[Target] = []
    for name, limit in (("fast-sims", 1.45), ("fast-sims-cpu", 1.3)):
        if name not in ran:
            continue
        tg_runs = _runs(runs, name, "tidegate")
        tg = _median(tg_runs, "params_per_s")
        dw = _median(_runs(runs, name, _label(runs, name, "dask-window")), "params_per_s")
        r = tg_runs[0]["replicates"] if tg_runs else 1
        out.append(_ratio_target(name, "tidegate sims/s / dask-window sims/s", tg, dw, ">=",
                                 limit, f"{(tg or 0) * r:.0f} vs {(dw or 0) * r:.0f} sims/s"))
        if name == "fast-sims" and tg_runs:
            physical = tg_runs[0]["threads"] / FAST_SIM_S
            out.append(_ratio_target(name, "tidegate sims/s / the physical limit",
                                     (tg or 0) * r, physical, ">=", 0.85,
                                     f"{(tg or 0) * r:.0f} of {physical:.0f} sims/s"))
    if "long-sims" in ran:
        tg = _median(_runs(runs, "long-sims", "tidegate"), "wall_s")
        dw = _median(_runs(runs, "long-sims", _label(runs, "long-sims", "dask-window")),
                     "wall_s")
        out.append(_ratio_target("long-sims", "tidegate wall / dask-window wall", tg, dw, "<=",
                                 1.02, f"{tg or 0:.1f} s vs {dw or 0:.1f} s"))
    return out


def evaluate(runs: list[dict[str, Any]]) -> list[Target]:
    """The issue's targets, for the scenarios that ran."""
    out: list[Target] = []
    ran = {r["scenario"] for r in runs}
    if "tight-memory" in ran:
        out += _tight(runs)
    if "heavy-tail" in ran:
        out += _heavy(runs)
    if "overhead" in ran:
        tg = _median(_runs(runs, "overhead", "tidegate"), "params_per_s")
        dw = _median(_runs(runs, "overhead", _label(runs, "overhead", "dask-window")),
                     "params_per_s")
        # Trivial sims: only fusing params into tasks beats the raw window's per-task cost.
        out.append(_ratio_target("overhead", "tidegate params/s / dask-window params/s",
                                 tg, dw, ">=", 2.0, f"{tg or 0:.0f} vs {dw or 0:.0f} params/s"))
    out += _short(runs, ran)
    if "scale" in ran:
        out += _scale(runs)
    if "worker-kill" in ran:
        out += _kill(runs)
    for name in RACES:
        if name in ran:
            out += _race(runs, name)
    return out


def survived(rs: list[dict[str, Any]]) -> bool:
    """Every run of an arm finished, wrote every param and lost no worker."""
    return bool(rs) and all(
        r["status"] == "ok" and r["worker_deaths"] == 0 and r["params_ok"] == r["params_total"]
        for r in rs
    )


def best_surviving(
    runs: list[dict[str, Any]], scenario: str, keep: Callable[[dict[str, Any]], bool],
    metric: str = "wall_s",
) -> tuple[str, float] | None:
    """The arm (label, median ``metric``) with the lowest median wall (the highest
    params/s for ``metric="params_per_s"``) among the arms whose first run passes ``keep``
    and whose every run survived; None when none did."""
    arms: dict[str, list[dict[str, Any]]] = {}
    for r in runs:
        if r["scenario"] == scenario:
            arms.setdefault(r["arm"], []).append(r)
    best: tuple[str, float] | None = None
    for label, rs in arms.items():
        if not keep(rs[0]) or not survived(rs):
            continue
        value = _median(rs, metric)
        if value is None:
            continue
        higher_wins = metric == "params_per_s"
        if best is None or (value > best[1] if higher_wins else value < best[1]):
            best = (label, value)
    return best


def is_pinned(r: dict[str, Any]) -> bool:
    return r["strategy"] == "tidegate" and r["arm"] != "tidegate"


def is_fixed_arm(r: dict[str, Any]) -> bool:
    """A pinned tidegate arm or a dask-window arm: a B chosen in advance."""
    return is_pinned(r) or r["strategy"] == "dask-window"


def _race(runs: list[dict[str, Any]], name: str) -> list[Target]:
    tg = _runs(runs, name, "tidegate")
    wall = _median(tg, "wall_s") if survived(tg) else None
    out = []
    if name == "short-sims":
        # The window a user would pick for sims this short: one param per thread.
        threads = tg[0]["threads"] if tg else 0
        label = f"dask-window-{threads}"
        dw = _runs(runs, name, label)
        den = _median(dw, "wall_s") if survived(dw) else None
        out.append(_ratio_target(name, f"tidegate wall / {label} wall", wall, den, "<=", 1.10,
                                 f"{wall or 0:.1f} s vs {den or 0:.1f} s"))
    elif name in ("pile-up", "working-memory"):
        best = best_surviving(runs, name, is_pinned)
        den = best[1] if best else None
        arm = best[0] if best else "none survived"
        out.append(_ratio_target(name, "tidegate wall / best surviving pinned wall", wall, den,
                                 "<=", 1.25, f"{wall or 0:.1f} s vs {den or 0:.1f} s, {arm}"))
    if name == "working-memory":
        ooms = [r["oom_events"] for r in tg]
        worst = max((o for o in ooms if o is not None), default=None)
        out.append(Target(name, "tidegate OOM events", f"{worst} (worst run)"
                          if worst is not None else "n/a", "<= 2",
                          None if worst is None else worst <= 2,
                          "did not finish" if worst is None else f"{worst - 2:+d} vs the limit"))
    if name == "child-process":
        peaks = [r["peak_tree_mem_frac"] for r in tg if r["peak_tree_mem_frac"] is not None]
        ok = min((r["params_ok"] for r in tg), default=0)
        total = tg[0]["params_total"] if tg else 0
        peak = max(peaks, default=None)
        met = None if peak is None else peak <= 0.95 and ok == total
        out.append(Target(name, "tidegate: peak worker process tree / limit, params ok",
                          f"{peak:.0%} (worst worker, worst run), {ok}/{total} params"
                          if peak is not None else "n/a",
                          f"<= 95%, {total}/{total}", met,
                          "not sampled" if peak is None else
                          f"{(peak / 0.95 - 1) * 100:+.0f}% vs the limit"
                          + ("" if ok == total else f", {total - ok} params short")))
    return out


def _label(runs: list[dict[str, Any]], scenario: str, strategy: str) -> str:
    """The first arm of ``strategy`` in ``scenario`` that kills no worker."""
    for r in runs:
        if r["scenario"] == scenario and r["strategy"] == strategy and not r["kill_arm"]:
            return r["arm"]
    return f"<no {strategy} arm>"


def _tight(runs: list[dict[str, Any]]) -> list[Target]:
    tg = _runs(runs, "tight-memory", "tidegate")
    naive = _runs(runs, "tight-memory", "naive")
    out = []
    if tg:
        deaths = max(r["worker_deaths"] for r in tg)
        ok = min(r["params_ok"] for r in tg)
        total = tg[0]["params_total"]
        met = deaths == 0 and ok == total
        out.append(Target("tight-memory", "tidegate: 0 worker deaths and every param",
                          f"{deaths} deaths (worst run), {ok}/{total} params (worst run)",
                          f"0 deaths, {total}/{total}", met,
                          "met" if met else f"{deaths} deaths, {total - ok} params short"))
    if naive:
        failed = [r for r in naive if r["worker_deaths"] > 0 or r["status"] != "ok"]
        met = len(failed) == len(naive)
        what = ", ".join(
            f"{r['status']}, {r['worker_deaths']} deaths, {r['params_ok']} written"
            for r in naive
        )
        out.append(Target("tight-memory", "naive loses workers or fails", what,
                          "every run loses a worker or fails", met,
                          f"{len(failed)}/{len(naive)} runs"))
    if tg:
        rate = _median(tg, "params_per_s") if survived(tg) else None
        best = best_surviving(runs, "tight-memory", lambda r: r["strategy"] == "dask-window",
                              "params_per_s")
        den = best[1] if best else None
        arm = best[0] if best else "no window survived"
        out.append(_ratio_target(
            "tight-memory", "tidegate params/s / fastest surviving dask-window params/s",
            rate, den, ">=", 0.9, f"{rate or 0:.1f} vs {den or 0:.1f} params/s, {arm}"))
    return out


def _heavy(runs: list[dict[str, Any]]) -> list[Target]:
    tg = _median(_runs(runs, "heavy-tail", "tidegate"), "wall_s")
    dw = _median(_runs(runs, "heavy-tail", _label(runs, "heavy-tail", "dask-window")), "wall_s")
    fx = _median(_runs(runs, "heavy-tail", "fixed-200"), "wall_s")
    util = _median(_runs(runs, "heavy-tail", "tidegate"), "utilization")
    out = [
        _ratio_target("heavy-tail", "tidegate wall / dask-window wall", tg, dw, "<=", 1.05,
                      f"{tg or 0:.1f} s vs {dw or 0:.1f} s"),
        _ratio_target("heavy-tail", "fixed-200 wall / tidegate wall", fx, tg, ">=", 1.5,
                      f"{fx or 0:.1f} s vs {tg or 0:.1f} s"),
    ]
    if util is None:
        out.append(Target("heavy-tail", "tidegate utilization", "n/a", ">= 0.85", None,
                          "did not finish"))
    else:
        out.append(Target("heavy-tail", "tidegate utilization", f"{util:.2f}", ">= 0.85",
                          util >= 0.85, f"{(util / 0.85 - 1) * 100:+.0f}% vs the limit"))
    return out


def _scale(runs: list[dict[str, Any]]) -> list[Target]:
    out = []
    small, big = _runs(runs, "scale", "tidegate-1k"), _runs(runs, "scale", "tidegate-100k")
    for label, rs in (("tidegate-1k", small), ("tidegate-100k", big)):
        if not rs:
            continue
        worst = max(rs, key=lambda r: r["peak_scheduler_tasks"] / r["window_tasks"])
        peak, window = worst["peak_scheduler_tasks"], worst["window_tasks"]
        out.append(Target("scale", f"{label}: peak scheduler tasks <= the window's tasks",
                          f"{peak} tasks, window {window} (B max x tasks per param)",
                          f"<= {window}", peak <= window,
                          f"{(peak / window - 1) * 100:+.0f}% vs the window"))
    a = _median(big, "peak_client_rss_delta_mib")
    b = _median(small, "peak_client_rss_delta_mib")
    what = f"{a or 0:.1f} MiB vs {b or 0:.1f} MiB"
    if b is not None and b < RSS_FLOOR_MIB:
        # A run that reuses memory freed by an earlier one grows by ~0: no ratio to take.
        what += f"; the 1k growth is under {RSS_FLOOR_MIB:g} MiB, so the ratio is over that"
        b = RSS_FLOOR_MIB
    out.append(_ratio_target("scale", "RSS growth at 100k / at 1k", a, b, "<=", 1.2, what))
    return out


def _kill(runs: list[dict[str, Any]]) -> list[Target]:
    killed = _runs(runs, "worker-kill", "tidegate-kill")
    clean = _runs(runs, "worker-kill", "tidegate")
    out = []
    if killed:
        # One window of sim tasks: B when the worker was killed x replicates.
        pairs = [(r["recomputed"], (r["kill"] or {}).get("batch", 0) * r["replicates"])
                 for r in killed]
        met = all(rc is not None and rc <= w for rc, w in pairs)
        worst = max(pairs, key=lambda p: (p[0] or 0) - p[1])
        out.append(Target("worker-kill", "tidegate: recomputed sim tasks <= one window",
                          ", ".join(f"{rc} of a {w}-task window" for rc, w in pairs),
                          "<= B x R at the kill", met, f"worst {worst[0]} vs {worst[1]}"))
    a, b = _median(killed, "wall_s"), _median(clean, "wall_s")
    out.append(_ratio_target("worker-kill", "tidegate wall with the kill / without", a, b,
                             "<=", 1.3, f"{a or 0:.1f} s vs {b or 0:.1f} s"))
    return out


def targets_as_dicts(targets: list[Target]) -> list[dict[str, Any]]:
    return [asdict(t) for t in targets]
