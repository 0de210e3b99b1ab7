"""The named scenarios: a cluster shape, a workload and the arms (strategy + settings)
that run on it. Sizes are set so the full suite takes about 15 minutes on 2 cores;
``smoke`` shrinks scenarios to seconds and keeps every arm; ``light`` runs the memory
races at fewer params, every arm kept."""

from __future__ import annotations

import heapq
import math
import random
from dataclasses import dataclass, replace
from statistics import NormalDist
from typing import Any

MiB = 2**20
STRATEGIES = ("naive", "fixed", "dask-window", "tidegate")
MODEL = "tidegate.workloads:synthetic"
TARGET = ("score", "tidegate.workloads:synthetic_loss")


@dataclass(frozen=True, slots=True)
class Shape:
    """One LocalCluster: every arm of a scenario runs on the same one."""

    workers: int
    threads: int
    memory_limit: int | None = None  # per worker; None: LocalCluster's "auto"
    no_spill: bool = False  # distributed.worker.memory.spill/target: False

    @property
    def nthreads(self) -> int:
        return self.workers * self.threads

    def describe(self) -> str:
        text = f"{self.workers} workers x {self.threads} threads"
        if self.memory_limit:
            text += f", {self.memory_limit // MiB} MiB limit each"
        if self.no_spill:
            text += ", spilling off"
        return text


@dataclass(frozen=True, slots=True)
class Workload:
    """Params of the synthetic model (tidegate.workloads:synthetic), identical for
    every strategy."""

    n_params: int
    replicates: int = 1
    targets: int = 1  # 0 or 1: the synthetic_loss target
    outputs: str = "all"  # "all": model outputs are gathered and written; "none"
    output_bytes: int = 1024
    alloc_bytes: int = 0
    run_seconds: float = 0.0  # the median when run_sigma > 0
    run_sigma: float = 0.0  # lognormal spread of the run times
    busy: bool = False  # spin a CPU for run_seconds instead of sleeping
    # Memory held in a child process of the task (the synthetic model's child_alloc_bytes
    # and child_seconds): invisible to the worker's own RSS, visible to its process tree.
    child_alloc_bytes: int = 0
    child_seconds: float = 0.0
    seed: int = 42

    def __post_init__(self) -> None:
        if self.targets not in (0, 1):
            raise ValueError(f"targets must be 0 or 1, got {self.targets}")
        if self.outputs not in ("all", "none"):
            raise ValueError(f"outputs must be 'all' or 'none', got {self.outputs!r}")
        if self.targets == 0 and self.outputs == "none":
            raise ValueError("a workload without targets must keep its outputs")

    @property
    def tasks_per_param(self) -> int:
        return self.replicates + self.targets

    def run_times(self) -> list[float]:
        """Each param's run time in seconds, the same for every strategy and run.

        A lognormal's exact quantiles, shuffled with a fixed seed: a random draw of 1,000
        would make the suite's result hinge on its luck (seed 42's longest task was
        12.8 s against 8.1 s for the 99.95% quantile)."""
        n = self.n_params
        if self.run_sigma <= 0:
            return [self.run_seconds] * n
        z = NormalDist()
        times = [
            round(self.run_seconds * math.exp(self.run_sigma * z.inv_cdf((i + 0.5) / n)), 4)
            for i in range(n)
        ]
        random.Random(self.seed).shuffle(times)
        return times

    def in_order_bound(self, threads: int) -> float:
        """The shortest wall any runner that starts params in order could reach: each
        task on the first free thread, no overhead (list scheduling)."""
        free = [0.0] * threads
        for t in self.run_times():
            heapq.heappush(free, heapq.heappop(free) + t * self.replicates)
        return max(free)

    def parameters(self) -> dict[str, Any]:
        """The spec's ``parameters`` section."""
        fixed: dict[str, Any] = {"output_bytes": self.output_bytes,
                                 "alloc_bytes": self.alloc_bytes}
        # Only when set: a spec of the other scenarios stays what it was.
        if self.busy:
            fixed["busy"] = True
        if self.child_alloc_bytes or self.child_seconds:
            fixed |= {"child_alloc_bytes": self.child_alloc_bytes,
                      "child_seconds": self.child_seconds}
        if self.run_sigma <= 0:
            # A grid expands 100,000 params far faster than as many inline values.
            grid = {"i": list(range(self.n_params)), "run_seconds": [self.run_seconds]}
            return {"grid": grid | {k: [v] for k, v in fixed.items()}}
        return {
            "values": [{"i": i, "run_seconds": s, **fixed} for i, s in enumerate(self.run_times())]
        }

    def describe(self) -> str:
        """One line for the report: what each param costs."""
        parts = [f"{self.n_params:,} params x {self.replicates} replicate"
                 + ("s" if self.replicates > 1 else "")
                 + (" + 1 target" if self.targets else ", no target")]
        parts.append(f"{_size(self.output_bytes)} output per sim (outputs: {self.outputs})")
        if self.alloc_bytes:
            parts.append(f"{_size(self.alloc_bytes)} working memory per sim")
        if self.child_alloc_bytes:
            parts.append(f"{_size(self.child_alloc_bytes)} held in a child process for "
                         f"{self.child_seconds:g} s")
        if self.run_sigma > 0:
            parts.append(f"run time lognormal, median {self.run_seconds:g} s, "
                         f"sigma {self.run_sigma:g}")
        elif self.run_seconds > 0:
            how = "busy" if self.busy else "sleeping"
            parts.append(f"{self.run_seconds:g} s per sim ({how})")
        else:
            parts.append("no run time")
        return "; ".join(parts)

    def task_seconds(self) -> float:
        """Sum of the sim tasks' run times: the work to spread over the threads."""
        return sum(self.run_times()) * self.replicates


def _size(n: int) -> str:
    return f"{n / MiB:g} MiB" if n >= MiB else f"{n / 1024:g} KiB"


@dataclass(frozen=True, slots=True)
class Arm:
    """One strategy with its settings; a row of the report."""

    label: str
    strategy: str
    batch: int | None = None  # fixed: B; dask-window: window; tidegate: pin (None: adaptive)
    n_params: int | None = None  # overrides the workload's
    kill: bool = False  # SIGKILL a worker once half the params are done
    time_limit: float = 300.0
    max_repeats: int | None = None  # cap on --repeats for the long arms
    fuse: bool = True  # tidegate: batch.fuse (several short replicates in one task)

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    about: str
    shape: Shape
    workload: Workload
    arms: tuple[Arm, ...]
    # Sample each worker's process tree (worker + descendants) every 20 ms from this
    # process: memory held by a task's child process is not in the worker's own RSS.
    sample_trees: bool = False

    def workload_for(self, arm: Arm) -> Workload:
        if arm.n_params is None:
            return self.workload
        return replace(self.workload, n_params=arm.n_params)


# The pinned batch sizes and the dask-window windows of a race. Not 1: every race's
# cluster has 2 or more threads and room for a sim on each, so B = 1 idles a thread by
# construction (at aea0303 it was the slowest arm of every race, 1.35-2.0x the best) and
# its runs cost make bench more than 3 of its 30 minutes.
SWEEP = (2, 4, 8)


def race_arms(time_limit: float) -> tuple[Arm, ...]:
    """tidegate adaptive against tidegate pinned (``--batch-size``) and the dask-window at
    each size of SWEEP, in one run: the best fixed choice in hindsight is what adaptive
    has to come close to without being told."""
    arms = [Arm("tidegate", "tidegate", time_limit=time_limit)]
    arms += [Arm(f"tidegate-b{b}", "tidegate", batch=b, time_limit=time_limit) for b in SWEEP]
    arms += [Arm(f"dask-window-{w}", "dask-window", batch=w, time_limit=time_limit)
             for w in SWEEP]
    return tuple(arms)


def full() -> list[Scenario]:
    tight = Shape(2, 1, 400 * MiB, no_spill=True)
    return [
        Scenario(
            "tight-memory",
            "SimReturns adding up to more than 5x the cluster's memory, spilling off (the "
            "workload of tests/integration/test_memory.py, known to be tight).",
            tight,
            Workload(170, outputs="none", output_bytes=24 * MiB, alloc_bytes=60 * MiB),
            (
                # Both stall or lose workers: one run each, stopped after 30 s (tidegate
                # runs the whole job in about 21).
                Arm("naive", "naive", time_limit=30, max_repeats=1),
                Arm("fixed-200", "fixed", batch=200, time_limit=30, max_repeats=1),
                # B=8 holds 192 MiB of results, under half the cluster's memory, yet
                # with the working memory on top a worker can pause: a stall, hence 60 s.
                Arm("fixed-8", "fixed", batch=8, time_limit=60),
                # The throughput race: the fastest window that loses no worker is the
                # bar, whichever of 2, 4, 8 it is on this machine.
                *(Arm(f"dask-window-{w}", "dask-window", batch=w, time_limit=60)
                  for w in SWEEP),
                Arm("tidegate", "tidegate", time_limit=120),
            ),
        ),
        Scenario(
            "pile-up",
            "Working memory and results together: at B above the thread count, queued "
            "params' 4 MiB results and running params' 120 MiB allocations pile up on a "
            "400 MiB worker.",
            Shape(2, 1, 400 * MiB),
            Workload(300, output_bytes=4 * MiB, alloc_bytes=120 * MiB),
            race_arms(120),
        ),
        Scenario(
            "working-memory",
            "Two sims of 230 MiB working memory together exceed a 450 MiB worker with 2 "
            "threads, and with 3 or more running at once one worker runs two.",
            Shape(2, 2, 450 * MiB),
            Workload(120, alloc_bytes=230 * MiB),
            # Every surviving arm takes 11-18 s; the windows that do not survive lose a
            # worker every 3 s until stopped, so 60 s tells as much as 120 did.
            race_arms(60),
        ),
        Scenario(
            "child-process",
            "Each sim holds 200 MiB in a child process for 0.5 s: memory Dask does not "
            "see in the worker's RSS, only in its process tree.",
            Shape(2, 2, 500 * MiB),
            Workload(40, child_alloc_bytes=200 * MiB, child_seconds=0.5),
            race_arms(120),
            sample_trees=True,
        ),
        Scenario(
            "short-sims",
            "Few, short sims (10 params x 3 replicates of 1 s): the start-up of the "
            "adaptive window against a window that is right from the first task.",
            Shape(2, 1),
            Workload(10, replicates=3, run_seconds=1.0),
            race_arms(60),
        ),
        Scenario(
            "fast-sims",
            "Sims of 5 ms (sleeping: a stand-in for many-thread clusters and I/O-bound "
            "models), 4 replicates: the physical limit is threads / sim time = 400 sims/s, "
            "and one Dask task per sim spends much of it in per-task cost.",
            Shape(2, 1),
            Workload(5000, replicates=4, run_seconds=0.005),
            (
                # The targets are rates (sims/s): the slower arms run part of the job,
                # long enough for a steady rate, so that make bench fits in 30 minutes.
                Arm("dask-window-16", "dask-window", batch=16, n_params=2500, time_limit=240),
                Arm("tidegate", "tidegate", time_limit=240),
                Arm("tidegate-unfused", "tidegate", fuse=False, n_params=1250,
                    time_limit=240, max_repeats=1),
            ),
        ),
        Scenario(
            "fast-sims-cpu",
            "The same with 5 ms of CPU per sim: the scheduler, the client and Parquet "
            "share the 2 cores with the sims.",
            Shape(2, 1),
            Workload(5000, replicates=4, run_seconds=0.005, busy=True),
            (
                Arm("dask-window-16", "dask-window", batch=16, n_params=2500, time_limit=240),
                Arm("tidegate", "tidegate", time_limit=240),
            ),
        ),
        Scenario(
            "long-sims",
            "Sims of 0.5 s, 4 replicates: fusion does not pay and must turn itself off.",
            Shape(2, 1),
            Workload(60, replicates=4, run_seconds=0.5),
            (
                Arm("dask-window-4", "dask-window", batch=4, time_limit=240),
                Arm("tidegate", "tidegate", time_limit=240),
            ),
        ),
        Scenario(
            "heavy-tail",
            "Run times from a lognormal (sigma 1): barriers wait for the slowest task. A "
            "32-thread cluster is emulated by sleeping tasks on 2 cores.",
            Shape(2, 16),
            Workload(1000, run_seconds=0.3, run_sigma=1.0),
            (
                # naive is in no target here, and fixed's ratio is far from its bound.
                Arm("naive", "naive", time_limit=120, max_repeats=1),
                Arm("fixed-200", "fixed", batch=200, time_limit=120, max_repeats=2),
                Arm("dask-window-200", "dask-window", batch=200, time_limit=120),
                Arm("tidegate", "tidegate", time_limit=120),
            ),
        ),
        Scenario(
            "overhead",
            "Trivial tasks: the run loop's own cost per param.",
            Shape(2, 1),
            Workload(20_000, targets=0),
            (
                Arm("dask-window-500", "dask-window", batch=500, n_params=10_000,
                    time_limit=240, max_repeats=2),
                Arm("tidegate", "tidegate", time_limit=240, max_repeats=2),
                Arm("tidegate-unfused", "tidegate", fuse=False, n_params=5000, time_limit=240,
                    max_repeats=1),
            ),
        ),
        Scenario(
            "scale",
            "Trivial tasks, a large job against a small one: tidegate's memory and the "
            "scheduler's task count must not grow with the job.",
            Shape(2, 1),
            Workload(1000, targets=0),
            (
                Arm("tidegate-1k", "tidegate", n_params=1000, time_limit=120),
                Arm("tidegate-100k", "tidegate", n_params=100_000, time_limit=600,
                    max_repeats=1),
            ),
        ),
        Scenario(
            "worker-kill",
            "One worker SIGKILLed once half the params are done, against the same run "
            "without the kill.",
            Shape(2, 2),
            Workload(400, run_seconds=0.1),
            (
                Arm("tidegate", "tidegate", time_limit=120),
                Arm("tidegate-kill", "tidegate", kill=True, time_limit=120),
                # For comparison only (the targets are tidegate's): one run each.
                Arm("dask-window-16", "dask-window", batch=16, time_limit=120, max_repeats=1),
                Arm("dask-window-16-kill", "dask-window", batch=16, kill=True, time_limit=120,
                    max_repeats=1),
            ),
        ),
    ]


def smoke() -> list[Scenario]:
    """Every scenario and arm of the full suite, at sizes that run in seconds."""
    sizes: dict[str, dict[str, Any]] = {
        "tight-memory": {"n_params": 12, "output_bytes": MiB, "alloc_bytes": 0},
        "heavy-tail": {"n_params": 48, "run_seconds": 0.02},
        "overhead": {"n_params": 200},
        "scale": {"n_params": 100},
        "worker-kill": {"n_params": 40, "run_seconds": 0.05},
        # The one race in smoke (its 9 arms on their own cluster): tiny allocations.
        "pile-up": {"n_params": 8, "output_bytes": 64 * 1024, "alloc_bytes": MiB},
    }
    small_n = {"tidegate-100k": 300}
    out = []
    for s in full():
        if s.name not in sizes:
            # working-memory, child-process, short-sims: the same harness paths as
            # pile-up's race (child-process adds tree sampling) at 9 arms each, which
            # would double the smoke run; run them light or full.
            continue
        arms = tuple(
            replace(a, time_limit=30, max_repeats=1,
                    n_params=small_n.get(a.label, a.n_params and 100))
            for a in s.arms
        )
        out.append(replace(s, workload=replace(s.workload, **sizes[s.name]), arms=arms))
    return out


LIGHT_N = {"pile-up": 60, "working-memory": 30, "child-process": 12,
           "fast-sims": 2000, "fast-sims-cpu": 2000, "long-sims": 20}


def light() -> list[Scenario]:
    """The full suite with the memory races at fewer params (LIGHT_N): the same
    clusters, per-sim costs and arms, in a few minutes per scenario. An arm that runs
    part of the job keeps its part of it."""
    out = []
    for s in full():
        n = LIGHT_N.get(s.name)
        if n is None:
            out.append(s)
            continue
        arms = tuple(a if a.n_params is None
                     else replace(a, n_params=max(1, a.n_params * n // s.workload.n_params))
                     for a in s.arms)
        out.append(replace(s, workload=replace(s.workload, n_params=n), arms=arms))
    return out


def select(
    scenarios: list[Scenario], names: list[str] | None, strategies: list[str] | None
) -> list[Scenario]:
    """The scenarios named (all when None), keeping only arms of the strategies named."""
    known = {s.name for s in scenarios}
    for name in names or []:
        if name not in known:
            raise ValueError(f"unknown scenario {name!r}; expected one of {sorted(known)}")
    for strategy in strategies or []:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown strategy {strategy!r}; expected one of {STRATEGIES}")
    out = []
    for s in scenarios:
        if names and s.name not in names:
            continue
        arms = tuple(a for a in s.arms if not strategies or a.strategy in strategies)
        if arms:
            out.append(replace(s, arms=arms))
    return out
