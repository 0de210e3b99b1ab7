"""The batch-size policy: how many params to keep in flight, chosen from measurements.

Pure on purpose: stdlib only, no clock (``now`` is an argument), no I/O and
no randomness, so the same calls give the same decisions and every rule is testable
without Dask. The runner carries out each ``Decision``; metrics record it.
"""

from __future__ import annotations

import math
import statistics
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, cast

# decide() calls (about two a second) over which a worker's unmanaged memory keeps its
# minimum: long enough to see past the working memory of the tasks running right now.
UNMANAGED_WINDOW = 30
# decide() calls over which a worker's idle memory keeps its minimum: enough to pass over
# a reading taken as a sim ended (its memory not yet freed), short enough to follow a
# baseline that rises. It does rise: Arrow's allocator (mimalloc) keeps the pages of freed
# results, so a worker's idle RSS grows with the most it ever held, 90 -> 330 MiB within
# 15 s on a 400 MiB worker; a 30-reading minimum kept the first reading and budgeted
# results on memory that was no longer there (6 results on a worker whose budget held 1,
# then Dask's nanny terminated it under load).
IDLE_WINDOW = 4
# Shortest run time Little's law uses, so a 0 s measurement cannot divide by zero.
MIN_RUN_S = 1e-4
# Dask's defaults for distributed.worker.memory.pause and .terminate: a worker stops
# starting tasks at the first, its nanny kills it at the second.
PAUSE_FRACTION = 0.80
TERMINATE_FRACTION = 0.95
# A sim's memory request is rounded up to whole MiB: requests that differ by a few bytes
# of measurement noise pack the same way, and the log stays readable.
REQUEST_STEP = 2**20


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _check_counts(obj: object, **minimums: int) -> None:
    for name, lowest in minimums.items():
        value = getattr(obj, name)
        if not (_is_int(value) and value >= lowest):
            raise ValueError(f"{name} must be an int >= {lowest}, got {value!r}")


def _both(first: Callable[[Any], bool], then: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: first(v) and then(v)


@dataclass(frozen=True, slots=True)
class Bounds:
    """The numbers a config field allows: an int or any finite number, between ``lo`` and
    ``hi`` (None: no limit), each end open or closed. tidegate.knobs builds the user-facing
    ranges from these, so the policy's rules are written once."""

    integer: bool
    lo: int | float | None = None
    hi: int | float | None = None
    lo_open: bool = False
    hi_open: bool = False

    def allows(self, value: object) -> bool:
        if not (_is_int(value) if self.integer else _is_real(value)):
            return False
        v = cast(float, value)
        above = self.lo is None or (v > self.lo if self.lo_open else v >= self.lo)
        below = self.hi is None or (v < self.hi if self.hi_open else v <= self.hi)
        return above and below

    def text(self) -> str:
        """As a message says it: "an int >= 1", ">= 0", "in (0, 1]"."""
        if self.lo is not None and self.hi is not None:
            left = "(" if self.lo_open else "["
            right = ")" if self.hi_open else "]"
            return f"in {left}{self.lo}, {self.hi}{right}"
        if self.lo is not None:
            side = f"{'>' if self.lo_open else '>='} {self.lo}"
        else:
            side = f"{'<' if self.hi_open else '<='} {self.hi}"
        return f"an int {side}" if self.integer else side


_SIZE = Bounds(integer=True, lo=1)
_FRACTION = Bounds(integer=False, lo=0, hi=1, lo_open=True)
# The rules each field's value must meet, relations between fields aside.
BOUNDS: dict[str, Bounds] = {
    "min_size": _SIZE,
    "max_size": _SIZE,  # and >= min_size
    "memory_fraction": _FRACTION,
    "high_water": _FRACTION,
    "low_water": Bounds(integer=False, lo=0, lo_open=True),  # and < high_water
    "saturation": Bounds(integer=False, lo=1),
    "cooldown_s": Bounds(integer=False, lo=0),
    "backoff": Bounds(integer=False, lo=0.1, hi=0.9),
    "growth_steps": _SIZE,
    "quantile": Bounds(integer=False, lo=0.5, hi=1, lo_open=True),
    "oom_margin_bytes": Bounds(integer=True, lo=0),
    "oom_bump": Bounds(integer=False, lo=1, hi=4),
}


@dataclass(frozen=True, slots=True)
class ControllerConfig:
    min_size: int = 1
    max_size: int = 10000
    memory_fraction: float = 0.5
    high_water: float = 0.75
    low_water: float = 0.55
    saturation: float = 2.0
    cooldown_s: float = 30.0
    backoff: float = 0.5
    growth_steps: int = 8
    quantile: float = 0.95
    oom_margin_bytes: int = 16 * 2**20
    oom_bump: float = 1.2
    initial_size: int | None = None
    pinned: int | None = None

    def __post_init__(self) -> None:
        # In field order, so a rule may rely on the fields checked before it.
        for name, allowed, ok in self._rules():
            value = getattr(self, name)
            if not ok(value):
                raise ValueError(f"{name} must be {allowed}, got {value!r}")

    def _rules(self) -> Iterator[tuple[str, str, Callable[[Any], bool]]]:
        lo, hi, high = self.min_size, self.max_size, self.high_water
        low = BOUNDS["low_water"]
        relations: dict[str, tuple[str, Callable[[Any], bool]]] = {
            "max_size": (f"an int >= min_size ({lo})", lambda v: v >= lo),
            "low_water": (f"in ({low.lo}, high_water={high})", lambda v: v < high),
        }
        for name, bounds in BOUNDS.items():
            allowed, related = relations.get(name, (bounds.text(), None))
            yield name, allowed, bounds.allows if related is None else _both(bounds.allows, related)

        def size(v: Any) -> bool:
            return v is None or (_SIZE.allows(v) and lo <= v <= hi)

        for name in ("initial_size", "pinned"):
            yield name, f"None or an int in [{lo}, {hi}]", size


@dataclass(frozen=True, slots=True)
class WorkerMemory:
    address: str
    nthreads: int
    memory_limit: int  # bytes; 0 = no limit, so this worker imposes no memory ceiling
    used: int  # RSS of the worker's process tree where it reports one, else of its process
    managed: int  # bytes of results Dask holds on it
    paused: bool = False
    # The worker's tidegate-memory resource: bytes of its memory limit, registered by
    # tidegate's worker plugin. 0: not registered (per-worker admission is off for it).
    capacity: int = 0
    # Its process tree's RSS the last time it ran nothing; None while unknown.
    idle: int | None = None

    def __post_init__(self) -> None:
        _check_counts(self, nthreads=1, memory_limit=0, used=0, managed=0, capacity=0)
        if self.idle is not None:
            _check_counts(self, idle=0)

    def pressed(self, high_water: float, allowance: int = 0) -> bool:
        """Paused, or at high water: ``allowance`` bytes (the working memory the sims
        running on it are allowed) not counted. A pause the allowance explains is no
        pressure: a sim whose working memory takes the worker past Dask's pause fraction
        pauses it while it runs whatever B is, and the sims queued there behind the
        requests hold no memory until they start."""
        limited = self.memory_limit > 0
        used = max(0, self.used - allowance)
        over = limited and used / self.memory_limit >= high_water
        return over or (self.paused and not self._pause_explained(allowance))

    def calm(self, low_water: float, allowance: int = 0) -> bool:
        used = max(0, self.used - allowance)
        if self.paused and not self._pause_explained(allowance):
            return False
        return self.memory_limit == 0 or used / self.memory_limit < low_water

    def settled(self, low_water: float) -> bool:
        """Holding nothing a task left behind: calm, or within SETTLED_SLACK of its
        limit above its idle memory (a worker whose idle memory is above low water, a
        model's cache say, is never calm, and a suspect waiting for a calm cluster would
        wait for ever)."""
        if self.calm(low_water):
            return True
        return (not self.paused and self.idle is not None and self.memory_limit > 0
                and self.used <= self.idle + SETTLED_SLACK * self.memory_limit)

    def _pause_explained(self, allowance: int) -> bool:
        # Without what is allowed, the worker would be far from its pause fraction.
        return allowance > 0 and self.memory_limit > 0 and (
            max(0, self.used - allowance) / self.memory_limit < PAUSE_FRACTION)


# How far above its idle memory a worker may be and still count as settled.
SETTLED_SLACK = 0.05


@dataclass(frozen=True, slots=True)
class Observation:
    now: float  # seconds, monotonic, supplied by the caller
    workers: tuple[WorkerMemory, ...]
    inflight: int
    pending: int  # params not yet admitted (0 at the tail of a job)
    replicates: int
    targets: int
    # The fraction of each worker's limit the budget counts on: below 1 where the limits
    # of workers sharing a host or cgroup add up to more than it holds.
    memory_scale: float = 1.0
    # Replicates one sim task runs (tidegate.fusion): a param's R sims then occupy
    # ceil(R / fuse) threads, each for fuse sims' time.
    fuse: int = 1
    # Params one task runs (whole params, fuse >= R): pack params take one thread for
    # pack x R sims' time.
    pack: int = 1

    def __post_init__(self) -> None:
        _check_counts(self, inflight=0, pending=0, replicates=1, targets=0, fuse=1, pack=1)
        if not (_is_real(self.memory_scale) and 0 < self.memory_scale <= 1):
            raise ValueError(f"memory_scale must be in (0, 1], got {self.memory_scale!r}")


class Action(StrEnum):
    GROW = "grow"
    SHRINK = "shrink"
    HOLD = "hold"
    BACKOFF = "backoff"


@dataclass(frozen=True, slots=True)
class Decision:
    batch_size: int
    target: int
    # None while unknown (no sizes yet) or unbounded (no worker has a limit, nothing costs)
    memory_ceiling: int | None
    useful_ceiling: int | None  # None while unknown (no run times yet)
    budget_bytes: int
    cost_bytes: int  # effective bytes of one param in flight (after any OOM bump); 0 unknown
    admit: bool  # False under memory pressure: the runner stops admitting
    action: Action
    reason: str
    # Per-worker admission: bytes of tidegate-memory each sim requests (0: off) and the
    # sims each worker may run at once under it, (address, slots) in the workers' order.
    sim_request: int = 0
    slots: tuple[tuple[str, int], ...] = ()

    @property
    def total_slots(self) -> int:
        return sum(n for _, n in self.slots)


def params_fitting(
    budget: int, threads: int, cost: int, work_mem: int, replicates: int
) -> int | None:
    """How many params fit one worker's budget; None if unbounded (nothing costs memory).

    n params in flight hold n * cost of results plus min(threads, n * R) running tasks of
    work_mem each. That grows with n, so the answer is the largest n that fits, and it
    never falls as the budget rises (the two-case formula, "all threads busy" when the
    budget covers threads * work_mem, undercounts when n * R < threads).
    """
    if budget >= threads * work_mem:
        if cost == 0:
            return None
        saturated = (budget - threads * work_mem) // cost
        if saturated * replicates >= threads:
            return saturated
    # Fewer tasks than threads run: each param's R tasks at once, each with its work_mem.
    return min(budget // (replicates * work_mem + cost), threads // replicates)


def memory_ceiling(
    budgets_threads: Sequence[tuple[int, int]],
    cost: int,
    work_mem: int,
    replicates: int,
    *,
    total_threads: int | None = None,
) -> int | None:
    """The params the cluster holds in its memory budget; None if no worker bounds it.

    A worker with t_w threads receives t_w / total_threads of the params, so the fullest
    worker sets the ceiling: one full worker is not hidden by empty ones. total_threads
    defaults to the threads listed; pass it to count workers that have no limit.
    """
    total = sum(t for _, t in budgets_threads) if total_threads is None else total_threads
    ceilings = []
    for budget, threads in budgets_threads:
        fits = params_fitting(budget, threads, cost, work_mem, replicates)
        if fits is not None:
            ceilings.append(fits * total // threads)
    return min(ceilings, default=None)


def useful_ceiling(
    threads: int, run: float, latency: float, saturation: float, replicates: int
) -> int:
    """Params that keep every thread busy with some queue (Little's law)."""
    run = max(run, MIN_RUN_S)
    return math.ceil(threads * (run + latency) / run * saturation / replicates)


def sim_request(capacities: Iterable[int], work: int | None, fraction: float) -> int:
    """Bytes of the tidegate-memory resource one sim requests; 0 when no worker has it.

    Dask starts a restricted task on a worker only while the requests of the tasks it
    runs fit the worker's total, so requesting ``work / fraction`` keeps the working
    memory of the sims running on one worker within ``fraction`` of its limit. Before any
    sim was measured (``work`` None) a sim requests the smallest worker's whole capacity:
    one sim per worker, since one could need all of it. Never more than the largest
    worker's capacity, so a sim always has a worker to wait for (Dask would leave a larger
    request in ``no-worker`` forever); one that then needs more is killed alone there and
    quarantined.
    """
    caps = [c for c in capacities if c > 0]
    if not caps:
        return 0
    if work is None:
        return min(caps)
    need = max(1, math.ceil(max(0, work) / fraction))
    need = -(-need // REQUEST_STEP) * REQUEST_STEP
    return min(need, max(caps))


def worker_slots(w: WorkerMemory, request: int) -> int:
    """Sims the worker runs at once: its threads, fewer where its capacity holds fewer
    requests (0 on a worker too small for one: Dask places none there)."""
    if request <= 0 or w.capacity <= 0:
        return w.nthreads
    return min(w.nthreads, w.capacity // request)


def results_ceiling(
    budgets_slots: Sequence[tuple[int, int]], cost: int, total_slots: int
) -> int | None:
    """The params whose results the workers hold: each worker's budget for results
    (its limit at high water less its idle memory and its running sims' working memory)
    over what one param's results cost, scaled by the share of the params it runs
    (its slots of all). The fullest worker sets the ceiling; None if none bounds it."""
    if cost <= 0 or total_slots <= 0:
        return None
    ceilings = [max(0, budget) * total_slots // (cost * slots)
                for budget, slots in budgets_slots if slots > 0]
    return min(ceilings, default=None)


def _quantile(values: Iterable[int], q: float) -> int:
    ordered = sorted(values)  # nearest rank: a sample that was seen, no interpolation
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


@dataclass(frozen=True, slots=True)
class _Estimate:
    target: int
    memory_ceiling: int | None
    useful_ceiling: int | None
    budget_bytes: int
    cost_bytes: int
    sim_request: int = 0
    slots: tuple[tuple[str, int], ...] = ()
    floor: int = 1  # params that give every slot a sim: B never goes below it
    work_bytes: int | None = None  # one sim's working memory as budgeted; None unknown

    @property
    def total_slots(self) -> int:
        return sum(n for _, n in self.slots)


class Controller:
    """Chooses B, the number of params in flight, from the runner's measurements."""

    def __init__(self, config: ControllerConfig | None = None, *, window: int = 256) -> None:
        if not (_is_int(window) and window >= 1):
            raise ValueError(f"window must be an int >= 1, got {window!r}")
        self.config = config or ControllerConfig()
        self._sim_bytes: deque[int] = deque(maxlen=window)
        self._run_s: deque[float] = deque(maxlen=window)
        self._work_bytes: deque[int] = deque(maxlen=window)
        self._agg_bytes: deque[int] = deque(maxlen=window)
        self._latency_s: deque[float] = deque(maxlen=window)
        self._unmanaged: dict[str, deque[int]] = {}
        # Each worker's last IDLE_WINDOW idle readings: one taken as a sim ended, before
        # the sim's memory was freed, would read a sim's working memory as idle (seen: 392
        # of 162 MiB); a longer window would hide a baseline that has risen.
        self._idle: dict[str, deque[int]] = {}
        self._last: Observation | None = None
        self._batch: int | None = None
        self._oom_events = 0
        self._last_oom: float | None = None

    # --- learning ---------------------------------------------------------------------

    def observe_sim(self, nbytes: int, run_seconds: float, rss_delta_bytes: int) -> None:
        self._sim_bytes.append(max(0, nbytes))
        if math.isfinite(run_seconds) and run_seconds >= 0:
            self._run_s.append(run_seconds)
        # RSS can fall during a task (the allocator returns memory): that is no working memory.
        self._work_bytes.append(max(0, rss_delta_bytes))

    def observe_agg(self, nbytes: int) -> None:
        self._agg_bytes.append(max(0, nbytes))

    def observe_latency(self, seconds: float) -> None:
        # Scheduler and worker clocks differ a little, so the difference can dip below 0.
        if math.isfinite(seconds):
            self._latency_s.append(max(0.0, seconds))

    # --- state ------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        if self.config.pinned is not None:
            return self.config.pinned
        return self._start_size(self._last) if self._batch is None else self._batch

    @property
    def oom_events(self) -> int:
        return self._oom_events

    @property
    def sample_counts(self) -> dict[str, int]:
        """Samples held per ring buffer; each is at most ``window``."""
        return {
            "sim_bytes": len(self._sim_bytes),
            "run_seconds": len(self._run_s),
            "work_bytes": len(self._work_bytes),
            "agg_bytes": len(self._agg_bytes),
            "latency_seconds": len(self._latency_s),
        }

    def round_trip(self) -> float | None:
        """The round trip a refill cannot hide, its least over the recent window
        (queueing excluded), or None before any was measured."""
        return min(self._latency_s) if self._latency_s else None

    def sim_profile(self) -> tuple[float | None, int, int]:
        """A sim as measured: its median run time (None before any), and the quantile of
        its output bytes and of its working memory that the budget uses (0 unknown)."""
        run = statistics.median(self._run_s) if self._run_s else None
        q = self.config.quantile
        out = self._bumped(_quantile(self._sim_bytes, q)) if self._sim_bytes else 0
        work = self._bumped(_quantile(self._work_bytes, q)) if self._work_bytes else 0
        return run, out, work

    # --- decisions --------------------------------------------------------------------

    def observe_oom(self, now: float) -> Decision:
        """Back off at once: repeated kills keep shrinking; growth waits out the cooldown."""
        b = self._started(self._last)
        self._oom_events += 1
        # A late-reported event must not shorten the cooldown of a newer one.
        self._last_oom = now if self._last_oom is None else max(self._last_oom, now)
        est = self._estimate()
        if self.config.pinned is not None:
            return self._emit(self.config.pinned, est, Action.HOLD, "pinned")
        # Not below the floor: per-worker requests already keep sims that cannot share a
        # worker apart, and the bumped estimate has just raised them; halving B further
        # would only idle workers.
        new = self._clamp(max(est.floor, min(est.target, math.floor(b * self.config.backoff))))
        admit = not any(w.pressed(self.config.high_water, self._allowance(w, est))
                        for w in self._workers())
        reason = f"OOM event #{self._oom_events}: {b} -> {new}"
        return self._emit(new, est, Action.BACKOFF, reason, admit=admit)

    def decide(self, obs: Observation) -> Decision:
        self._remember(obs)
        b = self._started(obs)
        est = self._estimate()
        if self.config.pinned is not None:
            return self._emit(self.config.pinned, est, Action.HOLD, "pinned")
        return self._choose(b, obs, est)

    def _choose(self, b: int, obs: Observation, est: _Estimate) -> Decision:
        cfg, target = self.config, est.target
        hot = next((w for w in obs.workers
                    if w.pressed(cfg.high_water, self._allowance(w, est))), None)
        if hot is not None:
            new = self._clamp(max(est.floor, min(target, b - max(1, b // 8))))
            why = "paused" if hot.paused else f"at {hot.used / hot.memory_limit:.0%} of its limit"
            reason = f"pressure: {hot.address} {why}: {b} -> {new}"
            return self._emit(new, est, Action.SHRINK, reason, admit=False)
        if target < b:
            return self._emit(target, est, Action.SHRINK, f"ceiling: {b} -> {target}")
        if b < est.floor and obs.pending > 0:
            # Every slot a sim, at once: the requests keep each worker within its memory.
            reason = f"slots: {b} -> {est.floor} ({est.total_slots} sims fit at once)"
            return self._emit(est.floor, est, Action.GROW, reason)
        if not self._sim_bytes:
            return self._emit(b, est, Action.HOLD, "slow start: growth waits for result sizes")
        if self._last_oom is not None and obs.now < self._last_oom + cfg.cooldown_s:
            left = self._last_oom + cfg.cooldown_s - obs.now
            return self._emit(b, est, Action.HOLD, f"cooldown: {left:.1f} s left after OOM")
        warm = next((w for w in obs.workers
                     if not w.calm(cfg.low_water, self._allowance(w, est))), None)
        if warm is not None:
            return self._emit(b, est, Action.HOLD, f"memory: {warm.address} above low water")
        if obs.inflight < b or obs.pending == 0:
            return self._emit(b, est, Action.HOLD, f"window not full: {obs.inflight} of {b}")
        if target > b:
            new = min(target, b + math.ceil(target / cfg.growth_steps))
            reason = f"headroom: {b} -> {new} toward target {target}"
            return self._emit(new, est, Action.GROW, reason)
        return self._emit(b, est, Action.HOLD, f"at target {target}")

    def _clamp(self, size: int) -> int:
        return max(self.config.min_size, min(self.config.max_size, size))

    def _emit(
        self, size: int, est: _Estimate, action: Action, reason: str, *, admit: bool = True
    ) -> Decision:
        size = self._clamp(size)  # knobs are checked at construction; clamp once, at output
        if self.config.pinned is None:
            self._batch = size
        return Decision(size, est.target, est.memory_ceiling, est.useful_ceiling,
                        est.budget_bytes, est.cost_bytes, admit, action, reason,
                        est.sim_request, est.slots)

    # --- estimates --------------------------------------------------------------------

    def _workers(self) -> tuple[WorkerMemory, ...]:
        return self._last.workers if self._last is not None else ()

    def _started(self, obs: Observation | None) -> int:
        # Slow start: B is fixed from the first observation (or OOM) on, never reset.
        if self._batch is None:
            self._batch = self._start_size(obs)
        return self._batch

    def _start_size(self, obs: Observation | None) -> int:
        cfg = self.config
        if cfg.initial_size is not None:
            return cfg.initial_size
        if obs is None:
            return self._clamp(1)
        # One sim per slot, a slot per worker until working memory is measured.
        request = sim_request((w.capacity for w in obs.workers), None, cfg.memory_fraction)
        slots = sum(worker_slots(w, request) for w in obs.workers)
        return self._clamp(max(1, slots // obs.replicates))

    def _remember(self, obs: Observation) -> None:
        seen = {w.address for w in obs.workers}
        for address in self._unmanaged.keys() - seen:  # a lost worker's history is stale
            del self._unmanaged[address]
        for address in self._idle.keys() - seen:
            del self._idle[address]
        for w in obs.workers:
            history = self._unmanaged.setdefault(w.address, deque(maxlen=UNMANAGED_WINDOW))
            history.append(max(0, w.used - w.managed))
            if w.idle is not None:
                self._idle.setdefault(w.address, deque(maxlen=IDLE_WINDOW)).append(w.idle)
        self._last = obs

    def _budget(self, w: WorkerMemory) -> int:
        # The windowed minimum: running tasks' transient memory must not swing the budget.
        unmanaged = min(self._unmanaged[w.address])
        return max(0, math.floor(self.config.memory_fraction * w.memory_limit) - unmanaged)

    def _bumped(self, measured: int) -> int:
        # Recomputed from the measurement each time, so a second OOM does not compound.
        if not self._oom_events:
            return measured
        cfg = self.config
        return max(measured + cfg.oom_margin_bytes, math.ceil(measured * cfg.oom_bump))

    def _estimate(self) -> _Estimate:
        cfg, workers = self.config, self._workers()
        r, t = (self._last.replicates, self._last.targets) if self._last is not None else (1, 0)
        work = cost = None
        if self._sim_bytes:
            q = cfg.quantile
            agg = _quantile(self._agg_bytes, q) if self._agg_bytes else 0
            cost = self._bumped(r * _quantile(self._sim_bytes, q) + t * agg)
            work = self._bumped(_quantile(self._work_bytes, q))
        scale = self._last.memory_scale if self._last is not None else 1.0
        request = sim_request((w.capacity for w in workers), work, cfg.memory_fraction * scale)
        if request:
            return self._per_worker(workers, r, cost, work, request)
        # No worker carries the resource: the cluster-wide model, from worker threads.
        threads = sum(w.nthreads for w in workers)
        budgets = [(self._budget(w), w.nthreads) for w in workers if w.memory_limit > 0]
        mem = useful = None
        if cost is not None and work is not None:
            mem = memory_ceiling(budgets, cost, work, r, total_threads=threads)
        useful = self._useful(threads, r)
        known = [c for c in (mem, useful) if c is not None]
        target = self._clamp(min(known) if known else self.batch_size)
        slots = tuple((w.address, w.nthreads) for w in workers)
        return _Estimate(target, mem, useful, sum(b for b, _ in budgets), cost or 0,
                         0, slots, 1)

    def _per_worker(self, workers: Sequence[WorkerMemory], r: int, cost: int | None,
                    work: int | None, request: int) -> _Estimate:
        """Dask keeps each worker's running sims within its capacity (the requests); B
        bounds the results the workers hold, and never leaves a slot without a sim."""
        slots = tuple((w.address, worker_slots(w, request)) for w in workers)
        total = sum(n for _, n in slots)
        floor = self._clamp(max(1, math.ceil(total / self._width(r))))
        budgets = []
        for w, (_, n) in zip(workers, slots, strict=True):
            if w.memory_limit > 0:
                budgets.append((self._results_budget(w, n, work or 0), n))
        mem = None
        if cost is not None:
            fits = results_ceiling(budgets, cost, total)
            mem = None if fits is None else max(floor, fits)
        useful = self._useful(total, r)
        known = [c for c in (mem, useful) if c is not None]
        target = self._clamp(max(floor, min(known)) if known else max(floor, self.batch_size))
        return _Estimate(target, mem, useful, sum(max(0, b) for b, _ in budgets), cost or 0,
                         request, slots, floor, work)

    def _idle_of(self, w: WorkerMemory) -> int | None:
        """The worker's idle memory: the windowed minimum of its idle readings."""
        history = self._idle.get(w.address)
        return min(history) if history else w.idle

    def _allowance(self, w: WorkerMemory, est: _Estimate) -> int:
        """Working memory the requests already allow the sims running on ``w``: memory
        pressure is what comes on top (results, leaks, a wrong estimate). Before any sim
        was measured, whatever the worker holds above idle (one sim runs there)."""
        if not est.sim_request or w.capacity <= 0:
            return 0
        if est.work_bytes is None:
            idle = self._idle_of(w)
            return max(0, w.used - idle) if idle is not None else 0
        slots = dict(est.slots).get(w.address, 0)
        return slots * est.work_bytes

    def _results_budget(self, w: WorkerMemory, slots: int, work: int) -> int:
        """Bytes of results the worker may hold: up to high water above its idle memory,
        and never so many that with its running sims' working memory it would reach
        Dask's terminate fraction. Not high water less the working memory: where one
        sim's working memory alone takes a worker past high water (it then runs one sim
        at a time, by the requests), that left no room for even a 1 KiB result, and B
        stayed at one sim per worker, each refill a round trip behind."""
        # The idle tree RSS where the worker reports it: the windowed minimum of RSS less
        # results also holds the working memory of sims that never stop running.
        base = self._idle_of(w)
        if base is None:
            base = min(self._unmanaged[w.address])
        scale = self._last.memory_scale if self._last is not None else 1.0
        high = math.floor(self.config.high_water * scale * w.memory_limit) - base
        death = math.floor(TERMINATE_FRACTION * scale * w.memory_limit) - base - slots * work
        return min(high, death)

    def _fuse(self, r: int) -> int:
        k = self._last.fuse if self._last is not None else 1
        return max(1, min(k, r))

    def _pack(self, r: int) -> int:
        g = self._last.pack if self._last is not None else 1
        return g if self._fuse(r) >= r else 1

    def _width(self, r: int) -> float:
        """The threads one param's sim tasks occupy at once: R, fewer when its
        replicates are fused, a fraction of one when params share a task."""
        return math.ceil(r / self._fuse(r)) / self._pack(r)

    def _useful(self, threads: int, r: int) -> int | None:
        if not self._run_s or threads <= 0:
            return None
        # A fused task runs k sims (or g whole params, g x R): Little's law over tasks,
        # that many sims' time each.
        sims = self._fuse(r) * self._pack(r)
        run = statistics.median(self._run_s) * sims
        latency = min(self._latency_s, default=0.0)  # BBR-style min: queueing excluded
        tasks = useful_ceiling(threads, run, latency, self.config.saturation, 1)
        return math.ceil(tasks / self._width(r))
