"""The synthetic workload: its output size, determinism, duration, memory and failures."""

from __future__ import annotations

import contextlib
import json
import os
import random
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

import tidegate
from tidegate.simreturn import run_sim, run_target
from tidegate.workloads import SyntheticParams, make_table, synthetic, synthetic_loss

MODEL = "tidegate.workloads:synthetic"
TARGET = "tidegate.workloads:synthetic_loss"
SOURCE_ROOT = Path(tidegate.__file__).resolve().parents[1]
MiB = 1 << 20


def run_child(code: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter that can import tidegate."""
    env = {**os.environ, "PYTHONPATH": str(SOURCE_ROOT)}
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# --- output size and content -----------------------------------------------------------


@pytest.mark.parametrize("output_bytes", [1024, MiB, 10 * MiB])
def test_output_bytes_sets_table_size(output_bytes: int) -> None:
    """The table's Arrow buffers are output_bytes to within one 16-byte row."""
    table = synthetic({"output_bytes": output_bytes}, seed=1)["data"]
    assert output_bytes - 16 < table.nbytes <= output_bytes


@pytest.mark.parametrize("output_bytes", [1024, MiB, 10 * MiB])
def test_output_bytes_sets_simreturn_size(output_bytes: int) -> None:
    """The SimReturn's IPC bytes are output_bytes within 2% plus the schema overhead."""
    ret = run_sim(MODEL, {"output_bytes": output_bytes}, "p", 0, seed=1)
    assert ret.ok, ret.error
    assert abs(ret.nbytes - output_bytes) <= 0.02 * output_bytes + 1024


def test_default_output_is_one_kilobyte() -> None:
    """With no params the model returns one output, 'data', of 1024 bytes."""
    out = synthetic({}, seed=5)
    assert list(out) == ["data"]
    assert out["data"].nbytes == 1024


def test_table_has_row_numbers_and_unit_floats() -> None:
    """Column i is 0..n-1 (int64) and column x is float64 in [0, 1)."""
    table = make_table(16 * 1000, seed=3)
    assert table.schema == pa.schema([("i", pa.int64()), ("x", pa.float64())])
    assert table.column("i").to_pylist() == list(range(1000))
    xs = table.column("x").to_pylist()
    assert all(0.0 <= x < 1.0 for x in xs)
    assert len(set(xs)) == len(xs)


def test_same_seed_gives_same_table() -> None:
    """Two calls with the same params and seed return equal tables."""
    params = {"output_bytes": 64 * 1024}
    assert synthetic(params, 42)["data"].equals(synthetic(params, 42)["data"])


def test_different_seeds_give_different_tables() -> None:
    """Calls with different seeds return different x columns."""
    params = {"output_bytes": 64 * 1024}
    a, b = synthetic(params, 1)["data"], synthetic(params, 2)["data"]
    assert a.column("i").equals(b.column("i"))
    assert not a.column("x").equals(b.column("x"))


def test_unknown_params_are_ignored() -> None:
    """Extra keys (used to make distinct params) do not change the output."""
    plain = synthetic({"output_bytes": 4096}, 9)["data"]
    labelled = synthetic({"output_bytes": 4096, "i": 17, "label": "x"}, 9)["data"]
    assert plain.equals(labelled)


def test_integral_floats_are_accepted_for_ints() -> None:
    """An integral float (YAML's 1.0e+4) is read as an int byte count."""
    assert SyntheticParams.from_mapping({"output_bytes": 1.0e4}).output_bytes == 10_000


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("output_bytes", "1024"),
        ("output_bytes", 10.5),
        ("run_seconds", "1"),
        ("busy", 1),
        ("alloc_bytes", None),
        ("fail", 3),
        ("fail_prob", "0.1"),
        ("exit_code", True),
        ("kill_signal", 9.5),
        ("child_alloc_bytes", "1"),
        ("child_alloc_bytes", 1.5),
        ("child_seconds", "0.1"),
    ],
)
def test_bad_param_type_raises_type_error_naming_it(name: str, value: object) -> None:
    """A param of the wrong type raises TypeError naming the param, expected and got."""
    with pytest.raises(TypeError, match=rf"param '{name}' must be .* \(got .* that is a "):
        synthetic({name: value}, 0)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("output_bytes", -1),
        ("alloc_bytes", -1),
        ("run_seconds", -0.5),
        ("run_seconds", float("inf")),
        ("fail_prob", 1.5),
        ("exit_code", 256),
        ("kill_signal", 1000),
        ("child_alloc_bytes", -1),
        ("child_seconds", -0.1),
        ("child_seconds", float("nan")),
    ],
)
def test_out_of_range_param_raises_value_error_naming_it(name: str, value: object) -> None:
    """A param of the right type but outside its range raises ValueError naming it."""
    with pytest.raises(ValueError, match=rf"param '{name}' must be"):
        synthetic({name: value}, 0)


def test_params_must_be_a_mapping() -> None:
    """A non-mapping params argument raises TypeError."""
    with pytest.raises(TypeError, match="params must be a mapping"):
        synthetic([("output_bytes", 1)], 0)  # type: ignore[arg-type]


# --- failures --------------------------------------------------------------------------


def test_fail_raises_runtime_error_with_its_message() -> None:
    """A non-empty fail param raises RuntimeError carrying that text."""
    with pytest.raises(RuntimeError, match=r"^boom$"):
        synthetic({"fail": "boom"}, 0)


def test_fail_becomes_the_simreturn_error() -> None:
    """Through run_sim, a failure is recorded as the SimReturn's error, not raised."""
    ret = run_sim(MODEL, {"fail": "boom"}, "p", 0, seed=0)
    assert not ret.ok
    assert (ret.error.type, ret.error.message) == ("RuntimeError", "boom")


@pytest.mark.parametrize("fail_prob", [0.0, 0.3, 1.0])
def test_fail_prob_fails_exactly_the_seeds_it_draws(fail_prob: float) -> None:
    """fail_prob fails a seed iff random.Random(seed).random() < fail_prob."""
    failed = set()
    for seed in range(200):
        try:
            synthetic({"fail_prob": fail_prob, "output_bytes": 0}, seed)
        except RuntimeError as exc:
            assert str(exc) == "synthetic failure"
            failed.add(seed)
    assert failed == {s for s in range(200) if random.Random(s).random() < fail_prob}
    assert abs(len(failed) / 200 - fail_prob) < 0.1


def test_exit_code_terminates_the_process_with_that_code() -> None:
    """exit_code makes the process exit at once with that status, without returning."""
    child = run_child(
        """
        from tidegate.workloads import synthetic
        synthetic({"exit_code": 3, "alloc_bytes": 1 << 20}, 0)
        print("returned")
        """
    )
    assert child.returncode == 3, child.stderr
    assert "returned" not in child.stdout


def test_kill_signal_9_kills_the_process_like_an_oom_kill() -> None:
    """kill_signal=9 ends the process by SIGKILL (return code -9), as the OOM killer would."""
    child = run_child(
        """
        from tidegate.workloads import synthetic
        synthetic({"kill_signal": 9, "alloc_bytes": 1 << 20}, 0)
        print("returned")
        """
    )
    assert child.returncode == -9, child.stderr
    assert "returned" not in child.stdout


# --- time and memory -------------------------------------------------------------------


def test_run_seconds_sleeps_without_cpu() -> None:
    """run_seconds sets the wall time; without busy the process barely uses CPU."""
    wall, cpu = time.perf_counter(), time.process_time()
    synthetic({"run_seconds": 0.3}, 0)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert wall >= 0.3
    assert cpu < 0.15


def test_busy_spins_cpu_for_run_seconds() -> None:
    """With busy, the call burns run_seconds of its thread's CPU time (so the wall time
    is at least that, however loaded the machine is)."""
    wall, cpu = time.perf_counter(), time.thread_time()
    synthetic({"run_seconds": 0.3, "busy": True}, 0)
    wall, cpu = time.perf_counter() - wall, time.thread_time() - cpu
    assert cpu >= 0.3
    assert wall >= cpu


def test_allocation_is_held_for_at_least_50_ms() -> None:
    """With alloc_bytes and no run_seconds the call still lasts >= 50 ms."""
    start = time.perf_counter()
    synthetic({"alloc_bytes": MiB}, 0)
    assert time.perf_counter() - start >= 0.05


def test_alloc_bytes_is_resident_during_the_call_and_freed_after() -> None:
    """alloc_bytes raises the process's RSS by that much during the call, and RSS drops
    back after (sampled from a thread in a fresh process while the allocation is held)."""
    alloc = 256 * MiB
    child = run_child(
        f"""
        import json, threading
        import psutil
        from tidegate.workloads import synthetic

        proc = psutil.Process()
        synthetic({{}}, 0)  # warm up imports and Arrow's allocator
        before = proc.memory_info().rss
        peak, done = [before], threading.Event()

        def sample():
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                done.wait(0.005)

        sampler = threading.Thread(target=sample)
        sampler.start()
        synthetic({{"alloc_bytes": {alloc}, "output_bytes": 0, "run_seconds": 0.3}}, 0)
        done.set()
        sampler.join()
        print(json.dumps({{"before": before, "peak": peak[0], "after": proc.memory_info().rss}}))
        """
    )
    assert child.returncode == 0, child.stderr
    m = json.loads(child.stdout)
    assert m["peak"] - m["before"] >= 0.9 * alloc
    assert m["after"] - m["before"] < alloc / 4


def _synthetic_children(me: Any, others: set[int]) -> list[Any]:
    """The child processes synthetic started (``python -I -c ...``), none of the
    processes other tests of this session left running."""
    import psutil

    found = []
    for c in me.children():
        with contextlib.suppress(psutil.Error):
            if c.pid not in others and c.cmdline()[1:3] == ["-I", "-c"]:
                found.append(c)
    return found


def test_child_holds_its_memory_in_a_child_process_for_child_seconds() -> None:
    """child_alloc_bytes is resident in a child process (not this one) for
    child_seconds, and the call waits for the child to exit."""
    import psutil

    me = psutil.Process()
    others = {c.pid for c in me.children()}  # other tests' processes, if any
    seen: list[int] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            for c in _synthetic_children(me, others):
                with contextlib.suppress(psutil.Error):
                    seen.append(c.memory_info().rss)
            done.wait(0.01)

    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    try:
        out = synthetic({"child_alloc_bytes": 100 * MiB, "child_seconds": 0.4}, 0)
    finally:
        done.set()
        sampler.join()
    assert time.perf_counter() - start >= 0.4
    assert max(seen) >= 95 * MiB
    assert _synthetic_children(me, others) == []
    assert list(out) == ["data"]


def test_a_child_killed_by_a_signal_fails_the_call() -> None:
    import psutil

    me = psutil.Process()
    others = {c.pid for c in me.children()}
    errors: list[BaseException] = []

    def call() -> None:
        try:
            synthetic({"child_seconds": 60}, 0)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=call)
    thread.start()
    deadline = time.monotonic() + 30
    while not _synthetic_children(me, others) and time.monotonic() < deadline:
        time.sleep(0.01)
    _synthetic_children(me, others)[0].kill()
    thread.join(timeout=30)
    assert len(errors) == 1 and isinstance(errors[0], RuntimeError)
    assert "killed by SIGKILL" in str(errors[0])


# --- the target ------------------------------------------------------------------------


def test_synthetic_loss_is_the_mean_seed_fraction() -> None:
    """synthetic_loss is the mean of seed % 1000 / 1000, with n and total bytes."""
    returns = [
        run_sim(MODEL, {"output_bytes": 2048}, "p", r, seed)
        for r, seed in enumerate([1250, 7, 3999])
    ]
    result = run_target(TARGET, "t", "p", *returns)
    assert result.error is None
    assert result.loss == pytest.approx((0.25 + 0.007 + 0.999) / 3)
    assert result.diagnostics == {"n": 3, "bytes": sum(r.nbytes for r in returns)}


def test_synthetic_loss_rejects_no_returns() -> None:
    """An empty list of SimReturns is an error, not a division by zero."""
    with pytest.raises(ValueError, match="no SimReturns"):
        synthetic_loss([])
