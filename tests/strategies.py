"""Hypothesis strategies shared by the tests."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

from hypothesis import strategies as st

from tidegate.controller import ControllerConfig, WorkerMemory

# Names a spec accepts as parameters: they become Parquet columns param_<name>.
param_names = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}", fullmatch=True).filter(
    lambda name: name != "id"
)

finite_floats = st.floats(allow_nan=False, allow_infinity=False)
int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)


def _distinct(values: st.SearchStrategy) -> st.SearchStrategy:
    # unique=True compares with ==, so 0.0 and -0.0 count as one value, as in the spec.
    return st.lists(values, min_size=1, max_size=4, unique=True)


# One grid axis: distinct values of a single type, as a spec must give them.
grid_axes = st.one_of(
    _distinct(finite_floats),
    _distinct(int64s),
    _distinct(st.text(max_size=8)),
    _distinct(st.booleans()),
)

# Names that differ only in case collide in case-insensitive readers (DuckDB): a spec
# refuses them, so a valid grid has names distinct in lower case.
grids = st.dictionaries(param_names, grid_axes, min_size=1, max_size=3).filter(
    lambda g: len({name.lower() for name in g}) == len(g)
)


# --- the batch-size controller --------------------------------------------------------

MB = 10**6
GB = 10**9


@st.composite
def controller_configs(draw: st.DrawFn, pinned: bool | None = None) -> ControllerConfig:
    """A valid ControllerConfig; ``pinned`` True/False forces a pinned B or an adaptive one."""
    min_size = draw(st.integers(1, 20))
    max_size = draw(st.integers(min_size, 5000))
    sizes = st.integers(min_size, max_size)
    high_water = draw(st.floats(0.05, 1.0))
    pin = {None: st.none() | sizes, True: sizes, False: st.none()}[pinned]
    return ControllerConfig(
        min_size=min_size,
        max_size=max_size,
        memory_fraction=draw(st.floats(0.01, 1.0)),
        high_water=high_water,
        low_water=draw(st.floats(0.01, high_water, exclude_max=True)),
        saturation=draw(st.floats(1.0, 8.0)),
        cooldown_s=draw(st.floats(0.0, 60.0)),
        backoff=draw(st.floats(0.1, 0.9)),
        growth_steps=draw(st.integers(1, 16)),
        quantile=draw(st.floats(0.5, 1.0, exclude_min=True)),
        oom_margin_bytes=draw(st.integers(0, 64 * 2**20)),
        oom_bump=draw(st.floats(1.0, 4.0)),
        initial_size=draw(st.none() | sizes),
        pinned=draw(pin),
    )


@st.composite
def worker_memories(draw: st.DrawFn, address: str, below: float | None = None) -> WorkerMemory:
    """One worker's memory report; ``below`` keeps it calm (used under that fraction)."""
    limit = draw(st.just(0) | st.integers(100 * MB, 64 * GB))
    # Mostly well below high water, so that growth is exercised, sometimes anywhere.
    load = below if below is not None else draw(st.sampled_from([0.5, 0.5, 0.5, 1.0]))
    ceiling = max(0, math.ceil((limit if limit else 64 * GB) * load) - 1)
    used = draw(st.integers(0, ceiling))
    paused = below is None and draw(st.integers(0, 15)) == 0
    return WorkerMemory(
        address=address,
        nthreads=draw(st.integers(1, 16)),
        memory_limit=limit,
        used=used,
        managed=draw(st.integers(0, used)),
        paused=paused,
    )


def worker_sets(below: float | None = None) -> st.SearchStrategy[tuple[WorkerMemory, ...]]:
    """1-8 workers with distinct addresses and consistent used/managed figures."""
    return st.integers(1, 8).flatmap(
        lambda n: st.tuples(
            *(worker_memories(f"tcp://10.0.0.{i}:8786", below) for i in range(n))
        )
    )


# Byte counts spread over orders of magnitude: a few bytes to half a GiB.
byte_counts = st.integers(0, 29).flatmap(lambda k: st.integers(0, 2**k))

# Abstract events; tests/unit/test_controller.py plays them against a Controller, turning
# each time step dt into a monotonic `now`. Branches repeat to weight them: decisions and
# measurements are common, OOM events rare.
_sim = st.tuples(st.just("sim"), byte_counts, st.floats(0.0, 100.0), byte_counts)
_agg = st.tuples(st.just("agg"), byte_counts)
_latency = st.tuples(st.just("latency"), st.floats(-1.0, 30.0))
_decide = st.tuples(
    st.just("decide"),
    st.floats(0.0, 20.0),  # dt
    st.integers(0, 2),  # which worker set of the scenario
    st.integers(0, 20000),  # inflight
    st.integers(0, 5),  # pending
)
_oom = st.tuples(st.just("oom"), st.floats(0.0, 20.0))
_weighted = [_sim] * 3 + [_agg, _latency] + [_decide] * 6 + [_oom]
controller_events = st.lists(
    st.integers(0, len(_weighted) - 1).flatmap(_weighted.__getitem__),
    min_size=10,
    max_size=80,
)


class ControllerScenario(NamedTuple):
    config: ControllerConfig
    worker_sets: tuple[tuple[WorkerMemory, ...], ...]
    replicates: int
    targets: int
    events: list[tuple[Any, ...]]


def controller_scenarios(pinned: bool | None = None) -> st.SearchStrategy[ControllerScenario]:
    """A config, a few cluster states to observe, the job's shape and a run of events."""
    return st.builds(
        ControllerScenario,
        config=controller_configs(pinned),
        worker_sets=st.lists(worker_sets(), min_size=1, max_size=3).map(tuple),
        replicates=st.integers(1, 16),
        targets=st.integers(0, 4),
        events=controller_events,
    )
