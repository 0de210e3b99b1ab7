"""The batch-size controller: its invariants under arbitrary events, and worked examples."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.strategies import (
    ControllerScenario,
    controller_configs,
    controller_scenarios,
    worker_sets,
)
from tidegate.controller import (
    UNMANAGED_WINDOW,
    Action,
    Controller,
    ControllerConfig,
    Decision,
    Observation,
    WorkerMemory,
    memory_ceiling,
    params_fitting,
    sim_request,
    useful_ceiling,
    worker_slots,
)

MiB = 2**20


@dataclass(frozen=True)
class Step:
    kind: str
    before: int  # controller.batch_size just before the call
    after: int  # controller.batch_size just after it
    now: float
    decision: Decision | None
    obs: Observation | None


def play(scenario: ControllerScenario) -> list[Step]:
    """Run a scenario's events against a fresh Controller, recording every call."""
    controller = Controller(scenario.config)
    steps, now = [], 0.0
    for kind, *args in scenario.events:
        before, decision, obs = controller.batch_size, None, None
        if kind == "sim":
            controller.observe_sim(*args)
        elif kind == "agg":
            controller.observe_agg(*args)
        elif kind == "latency":
            controller.observe_latency(*args)
        elif kind == "oom":
            now += args[0]
            decision = controller.observe_oom(now)
        else:
            dt, which, inflight, pending = args
            now += dt
            workers = scenario.worker_sets[which % len(scenario.worker_sets)]
            obs = Observation(now, workers, inflight, pending, scenario.replicates,
                              scenario.targets)
            decision = controller.decide(obs)
        steps.append(Step(kind, before, controller.batch_size, now, decision, obs))
    return steps


def pressed(obs: Observation, config: ControllerConfig) -> bool:
    return any(
        w.paused or (w.memory_limit > 0 and w.used / w.memory_limit >= config.high_water)
        for w in obs.workers
    )


def worker(address: str = "a", *, threads: int = 1, limit: int = 400 * MiB, used: int = 0,
           managed: int = 0, paused: bool = False) -> WorkerMemory:
    return WorkerMemory(address, threads, limit, used, managed, paused)


def observe(workers: tuple[WorkerMemory, ...], now: float = 0.0, *, inflight: int = 10**6,
            pending: int = 1, replicates: int = 1, targets: int = 0) -> Observation:
    return Observation(now, workers, inflight, pending, replicates, targets)


# --- invariants under arbitrary events -------------------------------------------------


@given(controller_scenarios())
def test_batch_size_stays_within_bounds(scenario: ControllerScenario) -> None:
    """B lies in [min_size, max_size] after every call and in every decision."""
    cfg = scenario.config
    for step in play(scenario):
        assert cfg.min_size <= step.after <= cfg.max_size
        if step.decision is not None:
            assert cfg.min_size <= step.decision.batch_size <= cfg.max_size
            assert cfg.min_size <= step.decision.target <= cfg.max_size


@given(controller_scenarios(pinned=False))
def test_oom_backs_off_multiplicatively(scenario: ControllerScenario) -> None:
    """Each OOM event leaves B <= max(min_size, floor(previous B * backoff))."""
    cfg = scenario.config
    for step in play(scenario):
        if step.kind == "oom":
            assert step.decision is not None and step.decision.action is Action.BACKOFF
            assert step.after <= max(cfg.min_size, math.floor(step.before * cfg.backoff))


@given(controller_scenarios(pinned=False))
def test_no_growth_in_cooldown_or_under_pressure(scenario: ControllerScenario) -> None:
    """No growth in the OOM cooldown or under pressure, and no admission under pressure."""
    cfg = scenario.config
    last_oom, previous = None, None
    for step in play(scenario):
        if step.kind == "oom":
            last_oom = step.now
        if step.kind == "decide" and step.obs is not None and step.decision is not None:
            # The first decide sets the slow-start B; growth is measured from a decision.
            if previous is not None:
                if last_oom is not None and step.now < last_oom + cfg.cooldown_s:
                    assert step.decision.batch_size <= previous
                if pressed(step.obs, cfg):
                    assert step.decision.batch_size <= previous
            if pressed(step.obs, cfg):
                assert not step.decision.admit
        if step.decision is not None:
            previous = step.decision.batch_size


@given(controller_scenarios(pinned=False))
def test_batch_size_respects_known_ceilings(scenario: ControllerScenario) -> None:
    """Once a ceiling is known, no decision puts B above max(min_size, that ceiling)."""
    cfg = scenario.config
    for step in play(scenario):
        d = step.decision
        if d is None:
            continue
        if d.useful_ceiling is not None:
            assert d.batch_size <= max(cfg.min_size, d.useful_ceiling)
        if d.memory_ceiling is not None:
            assert d.batch_size <= max(cfg.min_size, d.memory_ceiling)


@given(controller_scenarios())
def test_same_calls_give_same_decisions(scenario: ControllerScenario) -> None:
    """Two fresh controllers fed the same calls make identical decisions."""
    assert play(scenario) == play(scenario)


@given(controller_scenarios(pinned=True))
def test_pinned_batch_size_never_moves(scenario: ControllerScenario) -> None:
    """A pinned B is every decision's batch size, OOM events included."""
    pin = scenario.config.pinned
    for step in play(scenario):
        assert step.after == pin
        if step.decision is not None:
            assert step.decision.batch_size == pin
            assert step.decision.action is Action.HOLD and step.decision.admit


@given(
    st.integers(1, 64),
    st.integers(-(2**20), 1 << 40),
    st.data(),
)
def test_sample_buffers_stay_bounded(window: int, nbytes: int, data: st.DataObject) -> None:
    """Ring buffers never hold more than ``window`` samples, whatever is observed."""
    controller = Controller(window=window)
    for _ in range(data.draw(st.integers(0, 3 * window))):
        controller.observe_sim(nbytes, 0.5, nbytes)
        controller.observe_agg(nbytes)
        controller.observe_latency(0.1)
    assert all(n <= window for n in controller.sample_counts.values())


@pytest.mark.parametrize("window", [1, 256])
def test_buffers_bounded_after_100k_observations(window: int) -> None:
    """After 100,000 observe_sim calls each buffer holds at most ``window`` samples."""
    controller = Controller(window=window)
    for i in range(100_000):
        controller.observe_sim(i, i / 1000, i)
    counts = controller.sample_counts
    assert counts["sim_bytes"] == counts["run_seconds"] == counts["work_bytes"] == window


@given(controller_configs(pinned=False), worker_sets())
def test_unmanaged_history_is_bounded(config: ControllerConfig, workers: tuple) -> None:
    """Per-worker unmanaged history is capped and forgets workers no longer reported."""
    controller = Controller(config)
    gone = (worker("tcp://gone:1"),)
    controller.decide(observe(gone))
    for i in range(UNMANAGED_WINDOW + 5):
        controller.decide(observe(workers, float(i)))
    history = controller._unmanaged
    assert set(history) == {w.address for w in workers}
    assert all(len(h) <= UNMANAGED_WINDOW for h in history.values())


# --- monotone ceilings ------------------------------------------------------------------

budgets_threads = st.lists(
    st.tuples(st.integers(0, 64 * 2**30), st.integers(1, 16)), min_size=1, max_size=8
)
sizes = st.integers(0, 2**30)


@given(budgets_threads, sizes, sizes, sizes, st.integers(1, 64))
def test_memory_ceiling_falls_with_cost(
    pairs: list[tuple[int, int]], cost: int, extra: int, work: int, replicates: int
) -> None:
    """A larger cost per param never gives a larger memory ceiling."""
    cheap = memory_ceiling(pairs, cost, work, replicates)
    dear = memory_ceiling(pairs, cost + extra, work, replicates)
    assert at_most(dear, cheap)


@given(budgets_threads, st.data(), sizes, sizes, st.integers(1, 64))
def test_memory_ceiling_rises_with_budget(
    pairs: list[tuple[int, int]], data: st.DataObject, cost: int, work: int, replicates: int
) -> None:
    """Larger budgets (same threads) never give a smaller memory ceiling."""
    extras = data.draw(st.lists(sizes, min_size=len(pairs), max_size=len(pairs)))
    richer = [(b + e, t) for (b, t), e in zip(pairs, extras, strict=True)]
    assert at_most(memory_ceiling(pairs, cost, work, replicates),
                   memory_ceiling(richer, cost, work, replicates))


@given(st.integers(0, 1 << 36), st.integers(1, 16), st.integers(1, 1 << 30), sizes,
       st.integers(1, 64))
def test_params_fitting_is_the_largest_that_fits(
    budget: int, threads: int, cost: int, work: int, replicates: int
) -> None:
    """params_fitting is the largest n whose results and running tasks fit the budget."""
    n = params_fitting(budget, threads, cost, work, replicates)
    assert n is not None

    def need(k: int) -> int:
        return min(threads, k * replicates) * work + k * cost

    assert need(n) <= budget < need(n + 1)


@given(st.integers(1, 1024), st.floats(0, 1000), st.floats(0, 100), st.floats(0, 100),
       st.floats(1, 8), st.integers(1, 64))
def test_useful_ceiling_rises_with_latency(
    threads: int, run: float, latency: float, extra: float, saturation: float, replicates: int
) -> None:
    """A longer round trip never gives a smaller useful ceiling."""
    short = useful_ceiling(threads, run, latency, saturation, replicates)
    assert short <= useful_ceiling(threads, run, latency + extra, saturation, replicates)


def at_most(a: int | None, b: int | None) -> bool:
    """a <= b where None is an unbounded ceiling."""
    return b is None or (a is not None and a <= b)


# --- steady state -------------------------------------------------------------------------


@given(st.data())
def test_steady_state_reaches_target_and_stays(data: st.DataObject) -> None:
    """Calm and full, B reaches the target within growth_steps + 1 decisions and stays."""
    config = data.draw(controller_configs(pinned=False))
    workers = data.draw(worker_sets(below=config.low_water))
    controller = Controller(config)
    for _ in range(data.draw(st.integers(1, 5))):
        controller.observe_sim(data.draw(st.integers(0, 256 * MiB)), data.draw(st.floats(0, 60)),
                               data.draw(st.integers(0, 1024 * MiB)))
    controller.observe_latency(data.draw(st.floats(0, 5)))
    decisions = [controller.decide(observe(workers, float(i), replicates=2, targets=1))
                 for i in range(config.growth_steps + 1)]
    target = decisions[-1].target
    assert decisions[-1].batch_size == target
    for i in range(5):
        d = controller.decide(observe(workers, 100.0 + i, replicates=2, targets=1))
        assert (d.batch_size, d.target, d.action) == (target, target, Action.HOLD)


# --- validation -----------------------------------------------------------------------------

BAD_FIELDS = [
    ("min_size", 0, "an int >= 1"),
    ("min_size", True, "an int >= 1"),
    ("max_size", 0, "an int >= min_size (1)"),
    ("memory_fraction", 1.5, "in (0, 1]"),
    ("memory_fraction", 0.0, "in (0, 1]"),
    ("high_water", 0, "in (0, 1]"),
    ("low_water", 0.75, "in (0, high_water=0.75)"),
    ("low_water", float("nan"), "in (0, high_water=0.75)"),
    ("saturation", 0.5, ">= 1"),
    ("saturation", float("inf"), ">= 1"),
    ("cooldown_s", -1.0, ">= 0"),
    ("backoff", 0.95, "in [0.1, 0.9]"),
    ("backoff", "0.5", "in [0.1, 0.9]"),
    ("growth_steps", 0, "an int >= 1"),
    ("growth_steps", 2.0, "an int >= 1"),
    ("quantile", 0.5, "in (0.5, 1]"),
    ("oom_margin_bytes", -1, "an int >= 0"),
    ("oom_bump", 4.5, "in [1, 4]"),
    ("initial_size", 0, "None or an int in [1, 10000]"),
    ("initial_size", 10001, "None or an int in [1, 10000]"),
    ("pinned", False, "None or an int in [1, 10000]"),
]


@pytest.mark.parametrize(("field", "value", "allowed"), BAD_FIELDS)
def test_config_rejects_out_of_range(field: str, value: Any, allowed: str) -> None:
    """A bad config field raises ValueError naming the field, its range and the value."""
    with pytest.raises(ValueError) as err:
        ControllerConfig(**{field: value})
    assert str(err.value) == f"{field} must be {allowed}, got {value!r}"


def test_observations_reject_impossible_counts() -> None:
    """Worker and observation counts are checked at construction, naming the field."""
    with pytest.raises(ValueError, match=r"^nthreads must be an int >= 1, got 0$"):
        worker(threads=0)
    with pytest.raises(ValueError, match=r"^replicates must be an int >= 1, got 0$"):
        observe((worker(),), replicates=0)
    with pytest.raises(ValueError, match=r"^window must be an int >= 1, got 0$"):
        Controller(window=0)


# --- worked examples ----------------------------------------------------------------------


def test_memory_ceiling_example() -> None:
    """2 workers x 400 MiB, 1 thread each, 4 MiB results, R=1, T=0: 100 params fit."""
    controller = Controller()
    controller.observe_sim(4 * MiB, 1.0, 0)
    d = controller.decide(observe((worker("a"), worker("b"))))
    assert d.budget_bytes == 400 * MiB  # 2 x 0.5 x 400 MiB
    assert d.cost_bytes == 4 * MiB
    assert d.memory_ceiling == 100  # 200 MiB / 4 MiB = 50 per worker, half the params each
    assert d.useful_ceiling == 4  # 2 threads x (1 + 0) / 1 x saturation 2 / R 1
    assert d.target == 4


def test_working_memory_lowers_the_ceiling_below_the_threads() -> None:
    """2 workers x 2 threads, 150 MiB working memory per task, 400 MiB limit: 2 params."""
    controller = Controller()
    controller.observe_sim(4 * MiB, 1.0, 150 * MiB)
    d = controller.decide(observe((worker("a", threads=2), worker("b", threads=2))))
    # 200 MiB cannot hold 2 running tasks (300 MiB): 1 param of 154 MiB per worker.
    assert d.memory_ceiling == 2 < 4
    assert d.batch_size <= 2


def test_one_full_worker_is_not_hidden_by_empty_ones() -> None:
    """A worker with no budget left sets the cluster's memory ceiling to 0 (so min_size)."""
    controller = Controller()
    controller.observe_sim(4 * MiB, 1.0, 0)
    full = worker("full", used=300 * MiB, managed=100 * MiB)  # 200 MiB unmanaged: budget 0
    d = controller.decide(observe((full, worker("b"), worker("c"))))
    assert d.memory_ceiling == 0
    assert d.batch_size == 1


def test_unlimited_workers_impose_no_memory_ceiling() -> None:
    """Workers without a memory limit leave the memory ceiling unknown and the budget 0."""
    controller = Controller()
    controller.observe_sim(4 * MiB, 1.0, 0)
    d = controller.decide(observe((worker("a", limit=0),)))
    assert (d.memory_ceiling, d.budget_bytes, d.useful_ceiling) == (None, 0, 2)


def test_params_fitting_counts_only_the_tasks_that_run() -> None:
    """One param's single task fits beside its result even when 2 busy threads would not."""
    # 200 bytes, 2 threads, work 100, cost 10, R=1: 1 param needs 110; 2 need 220.
    assert params_fitting(200, 2, 10, 100, 1) == 1
    assert params_fitting(199, 2, 10, 100, 1) == 1
    assert params_fitting(0, 2, 0, 0, 1) is None


def test_useful_ceiling_by_littles_law() -> None:
    """Short tasks need a deep window; long ones about saturation x threads."""
    assert useful_ceiling(4, 0.01, 0.09, 2.0, 1) == 80
    assert useful_ceiling(4, 0.01, 0.09, 2.0, 2) == 40
    assert useful_ceiling(4, 10.0, 0.0, 2.0, 1) == 8
    assert useful_ceiling(4, 0.0, 0.0, 2.0, 1) == 8  # run floored at MIN_RUN_S


def test_latency_is_a_windowed_minimum() -> None:
    """Queueing does not inflate latency: the smallest recent round trip is used."""
    controller = Controller()
    controller.observe_sim(0, 0.1, 0)
    for seconds in (0.5, 0.1, 0.3):
        controller.observe_latency(seconds)
    d = controller.decide(observe((worker("a", limit=0, threads=2),)))
    assert d.useful_ceiling == useful_ceiling(2, 0.1, 0.1, 2.0, 1) == 8


def test_fused_params_count_as_tasks_of_k_sims_in_littles_law() -> None:
    """A param of 4 replicates fused into one task holds one thread for 4 sims' time:
    the useful ceiling is over such tasks, deeper than over 4 parallel sims."""
    def ceiling(fuse: int) -> int | None:
        controller = Controller()
        controller.observe_sim(0, 0.005, 0)
        controller.observe_latency(0.01)
        ws = (worker("a", limit=0, threads=2),)
        obs = Observation(0.0, ws, 10**6, 1, 4, 0, fuse=fuse)
        return controller.decide(obs).useful_ceiling

    assert ceiling(1) == useful_ceiling(2, 0.005, 0.01, 2.0, 4) == 3
    assert ceiling(4) == useful_ceiling(2, 0.02, 0.01, 2.0, 1) == 6


def test_slow_start_holds_until_sizes_are_known() -> None:
    """B starts at threads // R and does not grow before any result size is known."""
    controller = Controller()
    workers = (worker("a", threads=8), worker("b", threads=8))
    d = controller.decide(observe(workers, replicates=4))
    assert (d.batch_size, d.action, d.memory_ceiling, d.cost_bytes) == (4, Action.HOLD, None, 0)
    assert d.reason == "slow start: growth waits for result sizes"


def test_headroom_grows_additively_toward_target() -> None:
    """With room to grow B adds ceil(target / growth_steps) per decision."""
    controller = Controller(ControllerConfig(initial_size=2))
    controller.observe_sim(MiB, 1.0, 0)
    d = controller.decide(observe((worker("a", threads=20, limit=0),)))
    assert (d.target, d.batch_size, d.action) == (40, 7, Action.GROW)
    assert d.reason == "headroom: 2 -> 7 toward target 40"


def test_no_growth_unless_the_window_is_full() -> None:
    """B holds while fewer than B params are in flight or none are pending."""
    controller = Controller(ControllerConfig(initial_size=2))
    controller.observe_sim(MiB, 1.0, 0)
    workers = (worker("a", threads=20, limit=0),)
    assert controller.decide(observe(workers, inflight=1)).action is Action.HOLD
    assert controller.decide(observe(workers, pending=0)).action is Action.HOLD
    assert controller.batch_size == 2


def test_oom_backs_off_bumps_cost_and_cools_down() -> None:
    """An OOM halves B, bumps the cost and blocks growth until the cooldown has passed."""
    controller = Controller(ControllerConfig(initial_size=16))
    controller.observe_sim(4 * MiB, 1.0, 0)
    workers = (worker("a", threads=20, limit=0),)
    d = controller.observe_oom(10.0)
    assert (d.batch_size, d.action, controller.oom_events) == (8, Action.BACKOFF, 1)
    assert d.cost_bytes == 20 * MiB  # max(4 MiB + 16 MiB, 1.2 x 4 MiB)
    assert controller.decide(observe(workers, 39.9)).batch_size == 8
    assert controller.decide(observe(workers, 40.0)).action is Action.GROW


def test_oom_bump_does_not_compound() -> None:
    """The cost after 1 and after 3 OOM events (no new sizes) is the same."""
    controller = Controller()
    controller.observe_sim(100 * MiB, 1.0, 50 * MiB)
    controller.decide(observe((worker("a", limit=64 * 2**30),)))
    once = controller.observe_oom(1.0)
    controller.observe_oom(2.0)
    thrice = controller.observe_oom(3.0)
    assert once.cost_bytes == thrice.cost_bytes == 120 * MiB
    assert once.memory_ceiling == thrice.memory_ceiling


def test_pressure_shrinks_gently_and_stops_admission() -> None:
    """A worker at high water, or paused, shrinks B by B // 8 and stops admission."""
    controller = Controller(ControllerConfig(initial_size=16))
    hot = worker("a", used=300 * MiB)  # 75% of 400 MiB: at high water
    d = controller.decide(observe((hot,)))
    assert (d.batch_size, d.action, d.admit) == (14, Action.SHRINK, False)
    assert d.reason == "pressure: a at 75% of its limit: 16 -> 14"
    d = controller.decide(observe((worker("a", paused=True),)))
    assert (d.batch_size, d.admit) == (13, False)


def test_unmanaged_memory_uses_a_windowed_minimum() -> None:
    """A transient rise in unmanaged memory leaves the budget alone until it persists."""
    controller = Controller()
    controller.decide(observe((worker("a", used=100 * MiB),)))
    spiking = (worker("a", used=150 * MiB),)
    assert controller.decide(observe(spiking)).budget_bytes == 100 * MiB  # 200 - min(100, 150)
    for _ in range(UNMANAGED_WINDOW):
        d = controller.decide(observe(spiking))
    assert d.budget_bytes == 50 * MiB


def test_ceiling_drop_shrinks_at_once() -> None:
    """When the memory ceiling falls below B, B drops to it in one decision."""
    controller = Controller(ControllerConfig(initial_size=50))
    controller.observe_sim(4 * MiB, 1.0, 0)
    workers = (worker("a", threads=100), worker("b", threads=100))
    controller.decide(observe(workers))  # memory ceiling 100, useful 400: target 100
    controller.observe_sim(40 * MiB, 1.0, 0)
    controller.observe_sim(40 * MiB, 1.0, 0)
    d = controller.decide(observe(workers))
    assert (d.memory_ceiling, d.batch_size, d.action) == (10, 10, Action.SHRINK)


# --- per-worker admission (workers carrying the tidegate-memory resource) ---------------


def capped(address: str = "a", *, threads: int = 1, limit: int = 400 * MiB, used: int = 0,
           idle: int | None = 100 * MiB) -> WorkerMemory:
    """A worker whose memory limit is registered as its tidegate-memory capacity."""
    return WorkerMemory(address, threads, limit, used, 0, capacity=limit, idle=idle)


def test_sim_request_before_measurement_is_the_smallest_whole_worker() -> None:
    assert sim_request([400 * MiB, 800 * MiB], None, 0.5) == 400 * MiB
    assert sim_request([0, 0], None, 0.5) == 0
    assert sim_request([], 100, 0.5) == 0


def test_sim_request_is_work_over_fraction_in_whole_mib_capped_at_the_largest_worker() -> None:
    assert sim_request([400 * MiB], 120 * MiB, 0.5) == 240 * MiB
    assert sim_request([400 * MiB], 120 * MiB + 1, 0.5) == 241 * MiB
    assert sim_request([400 * MiB], 0, 0.5) == MiB
    # 230 MiB / 0.5 is more than any worker holds: the largest whole worker, never more.
    assert sim_request([450 * MiB, 300 * MiB], 230 * MiB, 0.5) == 450 * MiB


def test_worker_slots_are_threads_bounded_by_capacity() -> None:
    w = capped(threads=4, limit=1000 * MiB)
    assert worker_slots(w, 300 * MiB) == 3
    assert worker_slots(w, 100 * MiB) == 4
    assert worker_slots(w, 1001 * MiB) == 0
    assert worker_slots(worker(threads=4), 300 * MiB) == 4  # no capacity: admission is off


def _measured(c: Controller, *, nbytes: int, run: float, work: int, n: int = 5) -> None:
    for _ in range(n):
        c.observe_sim(nbytes, run, work)
    c.observe_latency(0.01)


def test_first_window_is_one_sim_per_worker() -> None:
    c = Controller()
    d = c.decide(observe((capped("a", threads=2), capped("b", threads=2)), inflight=0))
    assert d.sim_request == 400 * MiB
    assert d.slots == (("a", 1), ("b", 1))
    assert d.batch_size == 2


def test_pile_up_keeps_both_workers_busy_and_bounds_results_per_worker() -> None:
    """2 workers x 1 thread x 400 MB, 120 MB working memory, 4 MB results: a sim per
    worker always, B bounded by the results the fullest worker holds, not by the
    working memory of every thread (the cluster-wide model gave B 1)."""
    c = Controller()
    workers = (capped("a"), capped("b"))
    c.decide(observe(workers, 0.0, inflight=0))
    _measured(c, nbytes=4 * MiB, run=1.0, work=120 * MiB)
    d = c.decide(observe(workers, 1.0, inflight=2))
    assert d.sim_request == 240 * MiB
    assert d.total_slots == 2
    # Results per worker: up to high water above idle (0.75 * 400 - 100), and short of
    # the terminate fraction with the running sim (0.95 * 400 - 100 - 120); 4 MiB a
    # param, half the params each.
    assert d.memory_ceiling == min(300 - 100, 380 - 100 - 120) // 4 * 2
    assert d.batch_size >= 2


def test_a_rising_idle_memory_lowers_the_results_ceiling_within_a_few_decisions() -> None:
    """The run that lost workers under load, in numbers: 2 workers x 1 thread x 400 MiB,
    24 MiB results, 140 MiB working memory. Idle RSS read 90 MiB at the first sim and
    then 258 MiB (Arrow's allocator keeps the pages of freed results). The ceiling must
    follow the new baseline (no room for results above one sim per worker), not keep the
    first reading's 12 until it leaves a long window."""
    c = Controller()
    fresh = (capped("a", idle=90 * MiB), capped("b", idle=90 * MiB))
    c.decide(observe(fresh, 0.0, inflight=0))
    _measured(c, nbytes=24 * MiB, run=0.2, work=140 * MiB)
    d = c.decide(observe(fresh, 0.5, inflight=2))
    # min(300 - 90, 380 - 90 - 140) // 24 per worker, half the params each.
    assert d.memory_ceiling == 12
    warm = (capped("a", idle=258 * MiB), capped("b", idle=258 * MiB))
    # One high reading (a sim's memory not yet freed) is passed over...
    assert c.decide(observe(warm, 1.0, inflight=12)).memory_ceiling == 12
    # ...a baseline that stays up is followed within 4 decisions (2 s), not 30 (15 s,
    # which a worker holding 6 results did not survive).
    for i in range(4):
        d = c.decide(observe(warm, 1.5 + i / 2, inflight=12))
    assert d.memory_ceiling == 2  # 380 - 258 - 140 < 0: one sim per worker, the floor
    assert d.batch_size == 2


def test_sims_that_cannot_share_a_worker_get_one_each() -> None:
    """2 workers x 2 threads x 450 MB, 230 MB of working memory: one sim per worker."""
    c = Controller()
    workers = (capped("a", threads=2, limit=450 * MiB), capped("b", threads=2, limit=450 * MiB))
    c.decide(observe(workers, 0.0, inflight=0))
    _measured(c, nbytes=MiB, run=1.0, work=230 * MiB)
    d = c.decide(observe(workers, 1.0, inflight=2))
    assert d.sim_request == 450 * MiB
    assert d.slots == (("a", 1), ("b", 1))


def test_every_thread_gets_a_sim_once_measurements_say_they_fit() -> None:
    c = Controller()
    workers = (capped("a", threads=2, limit=1000 * MiB), capped("b", threads=2, limit=1000 * MiB))
    d0 = c.decide(observe(workers, 0.0, inflight=0))
    assert d0.batch_size == 2
    _measured(c, nbytes=MiB, run=1.0, work=100 * MiB)
    d = c.decide(observe(workers, 1.0, inflight=2))
    assert d.total_slots == 4
    assert d.batch_size >= 4  # at once, not over growth steps


def test_an_oom_never_leaves_a_slot_without_a_sim() -> None:
    c = Controller()
    workers = (capped("a"), capped("b"))
    c.decide(observe(workers, 0.0, inflight=0))
    _measured(c, nbytes=4 * MiB, run=1.0, work=120 * MiB)
    c.decide(observe(workers, 1.0, inflight=2))
    for i in range(3):
        d = c.observe_oom(2.0 + i)
        assert d.batch_size >= 2
        assert d.total_slots == 2


@given(st.lists(st.tuples(st.integers(1, 8), st.integers(50, 4000)), min_size=1, max_size=6),
       st.integers(0, 5000), st.integers(1, 4))
def test_requests_never_oversubscribe_a_worker(
    shapes: list[tuple[int, int]], work_mib: int, replicates: int
) -> None:
    """Whatever was measured: slots x request fit each worker's capacity, every worker able
    to hold a sim has one, and B gives every slot a sim."""
    workers = tuple(capped(f"w{i}", threads=t, limit=m * MiB, idle=0)
                    for i, (t, m) in enumerate(shapes))
    c = Controller()
    c.decide(observe(workers, 0.0, inflight=0, replicates=replicates))
    _measured(c, nbytes=MiB, run=1.0, work=work_mib * MiB)
    d = c.decide(observe(workers, 1.0, inflight=10**6, replicates=replicates))
    largest = max(w.capacity for w in workers)
    assert 0 < d.sim_request <= largest
    for w, (_, n) in zip(workers, d.slots, strict=True):
        assert n * d.sim_request <= w.capacity
        assert n <= w.nthreads
    assert any(n > 0 for _, n in d.slots)  # the largest worker always runs one
    assert d.batch_size >= min(c.config.max_size, math.ceil(d.total_slots / replicates))


def test_a_worker_back_at_its_idle_memory_is_settled_though_above_low_water() -> None:
    """settled: calm, or not paused and within SETTLED_SLACK of the limit above idle."""
    from tidegate.controller import SETTLED_SLACK, WorkerMemory

    limit = 1000 * MiB
    cached = WorkerMemory("w", 1, limit, used=600 * MiB, managed=0, idle=590 * MiB)
    assert not cached.calm(0.55) and cached.settled(0.55)
    above = WorkerMemory("w", 1, limit, used=590 * MiB + int(SETTLED_SLACK * limit) + 1,
                         managed=0, idle=590 * MiB)
    assert not above.settled(0.55)
    assert not WorkerMemory("w", 1, limit, used=600 * MiB, managed=0).settled(0.55)
    paused = WorkerMemory("w", 1, limit, used=600 * MiB, managed=0, paused=True,
                          idle=600 * MiB)
    assert not paused.settled(0.55)
    assert WorkerMemory("w", 1, limit, used=100 * MiB, managed=0).settled(0.55)
