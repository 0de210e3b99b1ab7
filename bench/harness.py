"""One run of one arm: a fresh job, the sampler (and, for kill arms, the killer) around
the strategy, and the run's record."""

from __future__ import annotations

import shutil
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.cluster import BenchCluster
from bench.sampler import Probe, Sampler, TreeSampler
from bench.scenarios import Arm, Scenario
from bench.strategies import STRATEGY_CLASSES, Outcome
from bench.workload import build_job, key_tag

MiB = 2**20


class Killer:
    """SIGKILLs one worker once the strategy reports half its params done."""

    def __init__(self, cluster: BenchCluster, probe: Callable[[], Probe | None], at: int):
        self.cluster = cluster
        self.probe = probe
        self.at = at
        self.pids = cluster.worker_pids()
        self.record: dict[str, Any] | None = None
        self._t0 = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="bench-killer", daemon=True)

    def start(self) -> Killer:
        self._t0 = time.monotonic()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _loop(self) -> None:
        while not self._stop.wait(0.01):
            p = self.probe()
            if p is None or p.done < self.at:
                continue
            worker = sorted(self.pids)[0]
            self.cluster.kill(self.pids[worker])
            self.record = {
                "at_s": round(time.monotonic() - self._t0, 3),
                "worker": worker,
                "done": p.done,
                "batch": p.batch,
                "inflight_tasks": p.inflight_tasks,
            }
            return


def run_arm(
    cluster: BenchCluster, scenario: Scenario, arm: Arm, repeat: int, workdir: Path
) -> dict[str, Any]:
    """Run ``arm`` once on ``cluster`` (already restarted if need be) and record it."""
    workload = scenario.workload_for(arm)
    tag = f"{scenario.name}.{arm.label}.r{repeat}"
    output = workdir / key_tag(tag)
    job = build_job(workload, tag, output, fuse=arm.fuse)
    cluster.reset()
    strategy = STRATEGY_CLASSES[arm.strategy](arm, cluster, job, output)
    killer = Killer(cluster, strategy.probe, workload.n_params // 2) if arm.kill else None
    sampler = Sampler(cluster, strategy.probe).start()
    limit = scenario.shape.memory_limit
    trees = TreeSampler(cluster, limit).start() if scenario.sample_trees and limit else None
    if killer:
        killer.start()
    error = None
    start = time.monotonic()
    try:
        outcome = strategy.run(arm.time_limit)
    except Exception as exc:  # a strategy that crashes is a result, not the end of the suite
        outcome = Outcome("failed", time.monotonic() - start, 0, workload.n_params)
        error = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    finally:
        sampler.stop()
        if trees:
            trees.stop()
        if killer:
            killer.stop()
    shutil.rmtree(output, ignore_errors=True)
    # As the run ends: a tidegate arm's own, and none of them for the raw strategies.
    plugins = sorted(cluster.local.scheduler.worker_plugins)
    executions, unique = cluster.executions_of(f"sim-{key_tag(tag)}-")
    wall, finished = outcome.wall_s, outcome.status == "ok"
    batch_max = outcome.detail.get("batch_max") or arm.batch or workload.n_params
    return {
        "scenario": scenario.name,
        "arm": arm.label,
        "strategy": arm.strategy,
        "repeat": repeat,
        "status": outcome.status,
        "error": error,
        "time_limit_s": arm.time_limit,
        "wall_s": round(wall, 3),
        "params_total": workload.n_params,
        "threads": scenario.shape.nthreads,
        "params_ok": outcome.params_ok,
        "params_failed": outcome.params_failed,
        "params_per_s": round(outcome.params_ok / wall, 2) if finished and wall > 0 else None,
        "worker_deaths": cluster.stats.removed,
        "peak_worker_mem_frac": round(sampler.peak_mem_frac, 4),
        # tidegate's own counts (its loss classifier); None for the plain-Dask strategies,
        # whose losses are in worker_deaths only.
        "oom_events": outcome.detail.get("oom_events"),
        "worker_restarts": outcome.detail.get("worker_restarts"),
        "peak_tree_mem_frac": max(trees.peak_frac.values(), default=None) if trees else None,
        "peak_tree_by_worker": trees.peak_frac if trees else None,
        "utilization": (
            round(workload.task_seconds() / (scenario.shape.nthreads * wall), 4)
            if finished and workload.run_seconds > 0 else None
        ),
        "client_rss_before_mib": round(sampler.rss_before / MiB, 1),
        "peak_client_rss_delta_mib": round(sampler.peak_rss_delta / MiB, 1),
        "peak_scheduler_tasks": cluster.stats.peak_tasks,
        "window_tasks": batch_max * workload.tasks_per_param,
        "tasks_per_param": workload.tasks_per_param,
        "replicates": workload.replicates,
        "kill_arm": arm.kill,
        "sim_executions": executions,
        "sim_unique": unique,
        "recomputed": executions - unique if cluster.executions else None,
        "kill": killer.record if killer else None,
        "detail": outcome.detail,
        "worker_plugins": plugins,
        "series": sampler.as_dict(),
    }


def needs_restart(record: dict[str, Any]) -> bool:
    """A run that lost a worker, timed out or failed leaves the cluster dirty."""
    return record["status"] != "ok" or record["worker_deaths"] > 0 or record["kill"] is not None
