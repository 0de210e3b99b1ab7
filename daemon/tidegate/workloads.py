"""A synthetic model with a controllable footprint, for testing and benchmarking tidegate.

``tidegate.workloads:synthetic`` is a model like any other (``simulate(params, seed)``),
but what it costs is set by its params, so a job spec can make a sweep that is large,
slow, memory-hungry or crash-prone on purpose. It imports the standard library and
pyarrow only, so it runs on any worker, with or without NumPy.

| param          | type  | default | effect                                                      |
|----------------|-------|---------|-------------------------------------------------------------|
| output_bytes   | int   | 1024    | size of the returned table's Arrow buffers, to within 16 B  |
| run_seconds    | float | 0       | wall time of the call                                       |
| busy           | bool  | false   | spin for run_seconds of this thread's CPU time, not sleep   |
| alloc_bytes    | int   | 0       | resident working memory held during the call, then freed;   |
|                |       |         | held for run_seconds, or 50 ms when run_seconds is 0         |
| fail           | str   | ""      | when non-empty, raise RuntimeError(fail) at the end         |
| fail_prob      | float | 0       | raise RuntimeError("synthetic failure") when                |
|                |       |         | ``random.Random(seed).random() < fail_prob``               |
| exit_code      | int   | 0       | when non-zero, ``os._exit(exit_code)`` while the allocation |
|                |       |         | is held: a hard crash of the worker process                 |
| kill_signal    | int   | 0       | when non-zero, send this signal to the own process while    |
|                |       |         | the allocation is held (9 looks like an OOM kill)           |
| child_alloc_bytes | int | 0      | when non-zero (or child_seconds is), run a child Python     |
|                |       |         | process holding this much resident memory, wait for it; a   |
|                |       |         | child killed by a signal (or failing) fails the call        |
| child_seconds  | float | 0       | how long the child holds it (50 ms when 0)                  |

The call runs in that order: allocate, run the child, build the table, wait out
``run_seconds``, crash (``exit_code``, then ``kill_signal``), free, fail (``fail``, then
``fail_prob``), return.

Integer params also accept integral floats (YAML's ``1.0e+7``). Any other key is
ignored, so a sweep can add one (say ``i: [0, 1, ..., 999]``) to make many distinct
params with the same settings.

The single output ``data`` has an int64 column ``i`` (the row number) and a float64
column ``x`` of uniform [0, 1) values drawn from ``random.Random(seed)``: the same
(params, seed) always gives the same table.
"""

from __future__ import annotations

import math
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from tidegate.simreturn import SimReturn

__all__ = ["SyntheticParams", "make_table", "synthetic", "synthetic_loss"]

ROW_BYTES = 16  # one int64 plus one float64
PAGE_BYTES = 4096
# Long enough for a psutil sample taken during the call to see the allocation. Dask's
# own monitor samples every 100 ms (distributed.worker.memory.monitor-interval), so a
# spec that needs the worker to notice sets run_seconds >= 0.2.
MIN_HOLD_SECONDS = 0.05


@dataclass(frozen=True, slots=True)
class SyntheticParams:
    """The validated params of one ``synthetic`` call."""

    output_bytes: int = 1024
    run_seconds: float = 0.0
    busy: bool = False
    alloc_bytes: int = 0
    fail: str = ""
    fail_prob: float = 0.0
    exit_code: int = 0
    kill_signal: int = 0
    child_alloc_bytes: int = 0
    child_seconds: float = 0.0

    @classmethod
    def from_mapping(cls, params: Mapping[str, Any]) -> SyntheticParams:
        if not isinstance(params, Mapping):
            raise TypeError(f"synthetic: params must be a mapping, got {type(params).__name__}")
        # Field annotations are strings here (postponed evaluation): "int", "float", ...
        return cls(**{f.name: _parser(f.type)(params, f.name, f.default) for f in fields(cls)})

    def __post_init__(self) -> None:
        for name in (
            "output_bytes", "alloc_bytes", "run_seconds", "child_alloc_bytes", "child_seconds"
        ):
            value = getattr(self, name)
            if value < 0 or not math.isfinite(value):
                raise ValueError(f"synthetic: param {name!r} must be >= 0, got {value!r}")
        if not 0.0 <= self.fail_prob <= 1.0:
            raise ValueError(
                f"synthetic: param 'fail_prob' must be in [0, 1], got {self.fail_prob!r}"
            )
        if not 0 <= self.exit_code <= 255:
            raise ValueError(
                f"synthetic: param 'exit_code' must be in [0, 255], got {self.exit_code!r}"
            )
        if self.kill_signal and self.kill_signal not in {int(s) for s in signal.valid_signals()}:
            raise ValueError(
                f"synthetic: param 'kill_signal' must be 0 or a signal number, "
                f"got {self.kill_signal!r}"
            )


def _expected(params: Mapping[str, Any], name: str, expected: str) -> TypeError:
    value = params[name]
    return TypeError(
        f"synthetic: param {name!r} must be {expected} "
        f"(got {value!r} that is a {type(value).__name__})"
    )


def _int(params: Mapping[str, Any], name: str, default: int) -> int:
    value = params.get(name, default)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise _expected(params, name, "an int")


def _float(params: Mapping[str, Any], name: str, default: float) -> float:
    value = params.get(name, default)
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    raise _expected(params, name, "a number")


def _bool(params: Mapping[str, Any], name: str, default: bool) -> bool:
    value = params.get(name, default)
    if isinstance(value, bool):
        return value
    raise _expected(params, name, "a bool")


def _str(params: Mapping[str, Any], name: str, default: str) -> str:
    value = params.get(name, default)
    if isinstance(value, str):
        return value
    raise _expected(params, name, "a str")


_PARSERS: dict[str, Callable[[Mapping[str, Any], str, Any], Any]] = {
    "int": _int,
    "float": _float,
    "bool": _bool,
    "str": _str,
}


def _parser(annotation: str | type) -> Callable[[Mapping[str, Any], str, Any], Any]:
    """The parser of a field annotated ``annotation`` (a string, or a type)."""
    return _PARSERS[annotation if isinstance(annotation, str) else annotation.__name__]


# --- the model -----------------------------------------------------------------------


def synthetic(params: Mapping[str, Any], seed: int) -> dict[str, pa.Table]:
    """A model whose size, duration, memory and failures are set by ``params``."""
    settings = SyntheticParams.from_mapping(params)
    start, cpu_start = time.perf_counter(), time.thread_time()
    held = _allocate(settings.alloc_bytes)
    if settings.child_alloc_bytes or settings.child_seconds:
        _run_child(settings.child_alloc_bytes, settings.child_seconds)
    table = make_table(settings.output_bytes, seed)
    hold = settings.run_seconds
    if settings.alloc_bytes and hold == 0:
        hold = MIN_HOLD_SECONDS
    if settings.busy:
        _spin(cpu_start + hold)
    else:
        _wait_until(start + hold)
    if settings.exit_code:
        os._exit(settings.exit_code)
    if settings.kill_signal:
        os.kill(os.getpid(), settings.kill_signal)
    del held
    if settings.fail:
        raise RuntimeError(settings.fail)
    if random.Random(seed).random() < settings.fail_prob:
        raise RuntimeError("synthetic failure")
    return {"data": table}


def make_table(output_bytes: int, seed: int) -> pa.Table:
    """A table of ``output_bytes // 16`` rows: ``i`` (int64 row number) and ``x``
    (float64, uniform in [0, 1), from ``random.Random(seed)``)."""
    n = output_bytes // ROW_BYTES
    raw = random.Random(seed).randbytes(8 * n)
    bits = pa.Array.from_buffers(pa.uint64(), n, [None, pa.py_buffer(raw)])
    # The top 53 bits of each word, scaled to [0, 1): how random.random() does it.
    # Reading the raw bytes as float64 instead would give NaNs, and NaN != NaN.
    mantissa = pc.shift_right(bits, pa.scalar(11, pa.uint64()))
    x = pc.multiply(pc.cast(mantissa, pa.float64()), 2.0**-53)
    # Building the row numbers in Arrow avoids n Python ints (4x faster at 1M rows).
    i = pc.cumulative_sum(pa.repeat(pa.scalar(1, pa.int64()), n), start=-1)
    return pa.table({"i": i, "x": x})


def _allocate(nbytes: int) -> bytearray:
    buf = bytearray(nbytes)
    # bytearray(n) zero-fills today, but an allocator may hand back untouched zero pages
    # (calloc / fresh mmap); writing one byte per page makes every page resident.
    if nbytes:
        buf[::PAGE_BYTES] = b"\x01" * len(range(0, nbytes, PAGE_BYTES))
    return buf


# Allocates and touches argv[1] bytes, holds them argv[2] seconds. Standard library only,
# and -I: the child must not import the worker's site or sys.path (it needs neither).
_CHILD_CODE = """
import sys, time
n, hold = int(sys.argv[1]), float(sys.argv[2])
buf = bytearray(n)
if n:
    buf[::4096] = b"\\x01" * len(range(0, n, 4096))
time.sleep(hold)
"""


def _run_child(nbytes: int, seconds: float) -> None:
    """A child process holding ``nbytes`` for ``seconds``: what a model's solver binary
    or worker pool looks like to the worker (memory outside the worker process)."""
    hold = seconds if seconds > 0 else MIN_HOLD_SECONDS
    child = subprocess.Popen(
        [sys.executable, "-I", "-c", _CHILD_CODE, str(nbytes), repr(hold)],
        stdin=subprocess.DEVNULL,
    )
    code = child.wait()
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        raise RuntimeError(f"synthetic: child process {child.pid} was killed by {name}")
    if code:
        raise RuntimeError(f"synthetic: child process {child.pid} exited with code {code}")


def _spin(cpu_deadline: float) -> None:
    # CPU time of this thread, not wall time: on a loaded machine a wall-clock spin
    # burns less CPU than asked (and a CPU-bound model's cost is its CPU time).
    while time.thread_time() < cpu_deadline:
        pass


def _wait_until(deadline: float) -> None:
    remaining = deadline - time.perf_counter()
    if remaining > 0:
        time.sleep(remaining)


# --- the target ----------------------------------------------------------------------


def synthetic_loss(returns: Sequence[SimReturn]) -> dict[str, Any]:
    """A deterministic loss: the mean over replicates of ``seed % 1000 / 1000``."""
    if not returns:
        raise ValueError("synthetic_loss: no SimReturns to score")
    loss = sum(r.seed % 1000 / 1000 for r in returns) / len(returns)
    return {
        "loss": loss,
        "diagnostics": {"n": len(returns), "bytes": sum(r.nbytes for r in returns)},
    }
