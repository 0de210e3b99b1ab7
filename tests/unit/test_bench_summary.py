"""bench.summary's races: which arms count as surviving and what each target compares."""

from __future__ import annotations

from typing import Any

from bench.summary import best_surviving, evaluate, is_fixed_arm, is_pinned


def run(scenario: str, arm: str, wall: float, *, strategy: str | None = None,
        deaths: int = 0, ok: int = 10, status: str = "ok", **extra: Any) -> dict[str, Any]:
    strategy = strategy or ("dask-window" if arm.startswith("dask-window") else "tidegate")
    return {"scenario": scenario, "arm": arm, "strategy": strategy, "status": status,
            "wall_s": wall, "params_ok": ok, "params_total": 10, "worker_deaths": deaths,
            "params_per_s": ok / wall if status == "ok" else None, "threads": 2,
            "oom_events": 0 if strategy == "tidegate" else None, "kill_arm": False,
            "peak_tree_mem_frac": None, **extra}


def target(runs: list[dict[str, Any]], scenario: str, name: str) -> Any:
    (t,) = [t for t in evaluate(runs) if t.scenario == scenario and t.name == name]
    return t


def test_the_fastest_arm_that_lost_a_worker_is_not_the_bar() -> None:
    runs = [run("pile-up", "tidegate", 12.0), run("pile-up", "tidegate-b8", 5.0, deaths=1),
            run("pile-up", "tidegate-b2", 10.0), run("pile-up", "dask-window-4", 8.0)]
    assert best_surviving(runs, "pile-up", is_pinned) == ("tidegate-b2", 10.0)
    assert best_surviving(runs, "pile-up", is_fixed_arm) == ("dask-window-4", 8.0)
    t = target(runs, "pile-up", "tidegate wall / best surviving pinned wall")
    assert t.met is True and t.measured.startswith("1.20")


def test_an_arm_short_of_params_or_stopped_does_not_survive_in_any_run() -> None:
    runs = [run("pile-up", "tidegate", 30.0), run("pile-up", "tidegate-b1", 10.0, ok=9),
            run("pile-up", "tidegate-b2", 12.0), run("pile-up", "tidegate-b2", 60.0,
                                                     status="did not finish", ok=4),
            run("pile-up", "tidegate-b4", 20.0)]
    t = target(runs, "pile-up", "tidegate wall / best surviving pinned wall")
    assert "tidegate-b4" in t.measured and t.met is False


def test_working_memory_counts_tidegate_oom_events() -> None:
    runs = [run("working-memory", "tidegate", 10.0, oom_events=3),
            run("working-memory", "tidegate-b1", 10.0)]
    assert target(runs, "working-memory", "tidegate OOM events").met is False


def test_child_process_fails_past_95_percent_of_the_limit() -> None:
    name = "tidegate: peak worker process tree / limit, params ok"
    ok = [run("child-process", "tidegate", 5.0, peak_tree_mem_frac=0.9)]
    over = [run("child-process", "tidegate", 5.0, peak_tree_mem_frac=0.96)]
    short = [run("child-process", "tidegate", 5.0, peak_tree_mem_frac=0.5, ok=9)]
    assert target(ok, "child-process", name).met is True
    assert target(over, "child-process", name).met is False
    assert target(short, "child-process", name).met is False


def test_short_sims_compares_with_the_window_of_one_param_per_thread() -> None:
    runs = [run("short-sims", "tidegate", 16.0), run("short-sims", "dask-window-1", 30.0),
            run("short-sims", "dask-window-2", 15.0), run("short-sims", "dask-window-8", 14.0)]
    t = target(runs, "short-sims", "tidegate wall / dask-window-2 wall")
    assert t.met is True and t.measured.startswith("1.07")


def test_tight_memory_races_the_fastest_window_that_lost_no_worker() -> None:
    runs = [run("tight-memory", "tidegate", 10.0), run("tight-memory", "dask-window-8", 5.0,
                                                       deaths=2),
            run("tight-memory", "dask-window-4", 8.0), run("tight-memory", "dask-window-1", 20.0)]
    t = target(runs, "tight-memory",
               "tidegate params/s / fastest surviving dask-window params/s")
    assert t.met is False and "dask-window-4" in t.measured and t.measured.startswith("0.80")


def test_short_sims_targets_compare_sims_per_second_and_the_physical_limit() -> None:
    """fast-sims: sims/s against the raw window (>= 1.45x) and against threads / 5 ms
    (>= 0.85 of 400 sims/s); fast-sims-cpu >= 1.3x; long-sims within 2% of the window's
    wall; overhead (trivial sims) >= 2x the window's params/s."""
    runs = [run("fast-sims", "dask-window-16", 10.0, replicates=4, ok=500),
            run("fast-sims", "tidegate", 6.0, replicates=4, ok=500),
            run("fast-sims-cpu", "dask-window-16", 10.0, replicates=4),
            run("fast-sims-cpu", "tidegate", 8.0, replicates=4),
            run("long-sims", "dask-window-4", 20.0), run("long-sims", "tidegate", 20.5),
            run("overhead", "dask-window-500", 10.0), run("overhead", "tidegate", 4.0)]
    window = target(runs, "fast-sims", "tidegate sims/s / dask-window sims/s")
    assert window.met is True and window.measured.startswith("1.67")
    limit = target(runs, "fast-sims", "tidegate sims/s / the physical limit")
    # 500 params x 4 sims in 6 s: 333 of 400 sims/s, 0.83.
    assert limit.met is False and limit.measured.startswith("0.83")
    assert target(runs, "fast-sims-cpu", "tidegate sims/s / dask-window sims/s").met is False
    wall = target(runs, "long-sims", "tidegate wall / dask-window wall")
    assert wall.met is False and wall.measured.startswith("1.02")  # 1.025 > 1.02
    assert target(runs, "overhead", "tidegate params/s / dask-window params/s").met is True


def test_distribution_rows_compare_each_shape_with_its_window() -> None:
    """bench.distributions: a row per shape with both arms, its speed-up the window's
    wall over tidegate's; a shape whose tidegate run failed has no speed-up."""
    from bench.distributions import SHAPES, rows, table

    a, b = SHAPES[0], SHAPES[1]
    runs = [
        {"scenario": a.name, "arm": "dask-window-16", "status": "ok", "wall_s": 60.0,
         "params_ok": a.workload.n_params},
        {"scenario": a.name, "arm": "tidegate", "status": "ok", "wall_s": 40.0,
         "params_ok": a.workload.n_params},
        {"scenario": b.name, "arm": "dask-window-8", "status": "ok", "wall_s": 30.0,
         "params_ok": b.workload.n_params},
        {"scenario": b.name, "arm": "tidegate", "status": "timeout", "wall_s": 240.0,
         "params_ok": 10},
    ]
    first, second = rows(runs)
    assert first["speedup"] == 1.5 and first["window_arm"] == "dask-window-16"
    assert first["tidegate_sims_per_s"] == round(a.workload.n_params * 4 / 40.0, 1)
    assert second["speedup"] is None and second["tidegate_sims_per_s"] is None
    text = table([first, second])
    assert "| 1.50x |" in text and text.count("\n") == 3
