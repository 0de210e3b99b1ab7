"""Failed params a person can read (masking, grouping) and the on_error circuit breaker:
the pure parts, then the run loop on the FakeCluster."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import read_dataset, synthetic_spec
from tests.fakes import FakeCluster
from tidegate.failures import Breaker, ErrorGroups, groups_of, mask
from tidegate.runner import Runner, RunOptions
from tidegate.simreturn import ContractError, outputs_to_ipc, run_sim
from tidegate.spec import Job, job_from_dict
from tidegate.writer import read_manifest


@pytest.mark.parametrize(("a", "b"), [
    ("bad input 3", "bad input 7"),
    ("x = -1.5e-3 out of range", "x = 2.25 out of range"),
    ("no file /data/run-1/x.csv", "no file /tmp/other/y.csv"),
    ("param 3fa2c9d1e0b4a7f6 failed", "param 0011aabbccddeeff failed"),
    ("object at 0x7f3a2b", "object at 0xdeadbeef"),
])
def test_messages_differing_in_numbers_ids_or_paths_mask_alike(a: str, b: str) -> None:
    assert mask(a) == mask(b)


def test_masking_keeps_the_words() -> None:
    assert mask("bad input 3") == "bad input <n>"
    assert mask("KeyError 'beta' in step 12") == "KeyError 'beta' in step <n>"
    assert mask("bad input 3") != mask("bad output 3")
    assert mask("model v2 of run3") == "model v2 of run3"  # digits inside words stay


def test_groups_count_and_keep_three_examples_with_values() -> None:
    groups = ErrorGroups()
    for k in range(7):
        groups.add(f"p{k}", {"k": k}, "ValueError", f"bad input {k}")
    groups.add("q", {"k": 99}, "KeyError", "'beta'")
    (big, small) = groups.ordered()
    assert (big.type, big.pattern, big.count) == ("ValueError", "bad input <n>", 7)
    assert [e.values for e in big.examples] == [{"k": 0}, {"k": 1}, {"k": 2}]
    assert big.examples[0].message == "bad input 0"
    assert (small.count, small.examples[0].param_id) == (1, "q")
    assert "7 x ValueError: bad input <n> (e.g. p0 {k=0}" in big.line()
    assert groups.failed == 8


def test_groups_of_parquet_rows_skip_ok_rows_and_strip_the_type() -> None:
    rows = [
        {"param_id": "a", "param_k": 1, "status": "failed", "error_type": "ValueError",
         "error": "ValueError: bad input 1"},
        {"param_id": "b", "param_k": 2, "status": "ok", "error_type": None, "error": None},
        {"param_id": "c", "param_k": 3, "status": "failed", "error_type": "ValueError",
         "error": "ValueError: bad input 3"},
    ]
    (group,) = groups_of(rows, ["k"]).ordered()
    assert (group.count, group.pattern) == (2, "bad input <n>")
    assert [e.values for e in group.examples] == [{"k": 1}, {"k": 3}]


def test_breaker_trips_when_the_first_n_all_fail() -> None:
    b = Breaker(stop_after_first=3)
    assert b.record("a", "E") is None
    assert b.record("b", "E") is None
    reason = b.record("c", "E")
    assert reason is not None and "first 3 completed params all failed" in reason
    assert b.record("d", "E") is None  # tripped once


def test_breaker_first_n_rule_is_off_once_one_param_succeeded() -> None:
    b = Breaker(stop_after_first=2)
    assert b.record("a", None) is None
    assert all(b.record(f"p{i}", "E") is None for i in range(10))


def test_breaker_max_failed_is_more_than_n() -> None:
    b = Breaker(stop_after_first=None, max_failed=2)
    assert [b.record(p, e) for p, e in [("a", "E"), ("b", None), ("c", "E")]] == [None] * 3
    reason = b.record("d", "E")
    assert reason is not None and "3 params failed, more than on_error.max_failed = 2" in reason


def test_continue_never_trips_but_a_contract_error_does() -> None:
    b = Breaker.of("continue")
    assert all(b.record(f"p{i}", "E") is None for i in range(100))
    reason = b.record("x", "ContractError", "a list", contract=True)
    assert reason is not None and reason.startswith("contract error at param x")


# --- the model's contract, on the worker's side --------------------------------------


def test_a_model_returning_a_list_is_a_contract_error() -> None:
    sim = run_sim("tests.loopmodels:returns_list", {"k": 1}, "p", 0, 5)
    assert sim.error is not None and sim.error.contract
    assert sim.error.type == "ContractError"
    with pytest.raises(ContractError, match="mapping of output name"):
        outputs_to_ipc([1])


def test_an_echoed_seed_is_accepted_and_a_wrong_one_names_the_column() -> None:
    ok = run_sim("tests.loopmodels:echoes_seed", {"k": 1}, "p", 0, 5)
    assert ok.error is None and ok.table("data").column_names == ["x"]  # tidegate adds seed
    bad = run_sim("tests.loopmodels:wrong_seed", {"k": 1}, "p", 0, 5)
    assert bad.error is not None and bad.error.contract
    assert "column 'seed'" in bad.error.message and "seed = 5" in bad.error.message


def test_a_sim_past_its_timeout_fails_as_timeout() -> None:
    sim = run_sim("tests.loopmodels:hangs", {"k": 1, "sleep": 5}, "p", 0, 5, timeout_s=0.2)
    assert sim.error is not None and sim.error.type == "Timeout"
    assert "sim_timeout_s = 0.2 s" in sim.error.message
    quick = run_sim("tests.loopmodels:hangs", {"k": 1, "sleep": 0}, "p", 0, 5, timeout_s=5)
    assert quick.error is None


# --- the run loop on the FakeCluster ----------------------------------------------------


def _job(tmp_path: Path, model: str, n: int, **overrides: Any) -> Job:
    spec = synthetic_spec(n, model=model, targets=[],
                          parameters={"values": [{"k": i} for i in range(n)]}, **overrides)
    return job_from_dict(spec, base_dir=tmp_path)


def _run(job: Job, fake: FakeCluster) -> Any:
    runner = Runner(job, fake, RunOptions(flush_params=5), clock=fake.clock)
    return asyncio.run(runner.run())


def test_a_model_that_always_fails_stops_after_the_first_10(tmp_path: Path) -> None:
    job = _job(tmp_path, "tests.loopmodels:fails", 100)
    summary = _run(job, FakeCluster())
    assert summary.state == "failed" and int(summary.exit_code) == 1
    assert summary.reason is not None and "first 10 completed params all failed" in summary.reason
    rows = read_dataset(job.output_dir / "params")
    # What completed is committed: the 10, and any gathered in the same pass.
    assert 10 <= len(rows) < 100 and {r["status"] for r in rows} == {"failed"}
    manifest = read_manifest(job.output_dir)
    assert manifest["state"] == "failed" and manifest["reason"] == summary.reason
    (group,) = summary.error_groups
    assert (group["type"], group["message"]) == ("ValueError", "bad input <n>")
    assert group["count"] == len(rows) and len(group["examples"]) == 3
    assert summary.tracebacks and "params" in summary.tracebacks


def test_on_error_continue_finishes_the_sweep_completed_with_failures(tmp_path: Path) -> None:
    job = _job(tmp_path, "tests.loopmodels:fails", 30, on_error="continue")
    summary = _run(job, FakeCluster())
    assert (summary.state, summary.failed, int(summary.exit_code)) == (
        "completed_with_failures", 30, 4)
    assert read_manifest(job.output_dir)["state"] == "completed_with_failures"


def test_max_failed_stops_a_job_failing_now_and_then(tmp_path: Path) -> None:
    job = _job(tmp_path, "tests.loopmodels:some_fail", 80, on_error={"max_failed": 5})
    summary = _run(job, FakeCluster())
    assert summary.state == "failed" and "more than on_error.max_failed = 5" in summary.reason
    assert summary.ok + summary.failed < 80
    kinds = {g["type"] for g in summary.error_groups}
    assert kinds == {"ValueError", "KeyError"}


def test_some_failures_end_completed_with_failures_grouped_by_kind(tmp_path: Path) -> None:
    job = _job(tmp_path, "tests.loopmodels:some_fail", 20)
    summary = _run(job, FakeCluster())
    assert (summary.state, summary.ok, summary.failed) == ("completed_with_failures", 10, 10)
    groups = {g["type"]: g for g in summary.error_groups}
    assert groups["ValueError"]["count"] == 5 and groups["KeyError"]["count"] == 5
    assert groups["KeyError"]["message"] == "'missing column at <path>'"
    assert groups["ValueError"]["examples"][0]["values"] == {"k": 1}


def test_a_contract_error_stops_at_the_first_param_whatever_on_error(tmp_path: Path) -> None:
    job = _job(tmp_path, "tests.loopmodels:returns_list", 50, on_error="continue")
    summary = _run(job, FakeCluster(n_workers=1))
    assert summary.state == "failed" and summary.reason.startswith("contract error at param")
    assert summary.failed < 50


def test_a_seed_echoing_model_runs_and_a_wrong_seed_stops_the_job(tmp_path: Path) -> None:
    job = _job(tmp_path, "tests.loopmodels:echoes_seed", 6)
    summary = _run(job, FakeCluster())
    assert summary.state == "succeeded"
    rows = read_dataset(job.output_dir / "model_outputs" / "data")
    params = {r["param_id"]: r["seeds"] for r in read_dataset(job.output_dir / "params")}
    assert all(r["seed"] == params[r["param_id"]][r["replicate"]] for r in rows)
    bad = _job(tmp_path / "bad", "tests.loopmodels:wrong_seed", 6)
    summary = _run(bad, FakeCluster(n_workers=1))
    assert summary.state == "failed" and "column 'seed'" in summary.reason
