"""User code raising BaseException (SystemExit, KeyboardInterrupt, GeneratorExit) fails
its param and never escapes to the worker; a cluster without workers pauses the job."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import read_dataset, synthetic_spec
from tests.fakes import FakeCluster, after_aggs
from tidegate.cluster import WorkersLost
from tidegate.runner import Runner, RunOptions
from tidegate.simreturn import SimReturn, run_sim, run_target
from tidegate.spec import job_from_dict
from tidegate.workloads import synthetic
from tidegate.writer import read_manifest

RAISED: dict[str, type[BaseException]] = {
    "exit": SystemExit, "interrupt": KeyboardInterrupt, "generator": GeneratorExit}
HERE = "tests.unit.test_user_exits"


def exiting_model(params: dict[str, Any], seed: int) -> Any:
    """The synthetic model, except that param ``raise`` names a BaseException to raise."""
    kind = params.pop("raise", "")
    if kind:
        raise RAISED[kind](f"{kind} from the model")
    return synthetic(params, seed)


def exiting_target(returns: list[SimReturn]) -> float:
    raise SystemExit(3)


@pytest.mark.parametrize("kind", sorted(RAISED))
def test_run_sim_turns_a_base_exception_into_the_params_error(kind: str) -> None:
    """run_sim returns the BaseException as the SimReturn's error, with its traceback."""
    result = run_sim(f"{HERE}:exiting_model", {"raise": kind}, "p1", 0, 7)
    assert result.error is not None
    assert result.error.type == RAISED[kind].__name__
    assert result.error.message == f"{kind} from the model"
    assert "exiting_model" in result.error.traceback
    assert result.outputs == {}


def test_run_target_turns_system_exit_into_the_targets_error() -> None:
    """A target calling sys.exit(3) gives a TargetResult with a SystemExit error."""
    sim = run_sim("tidegate.workloads:synthetic", {"output_bytes": 64}, "p1", 0, 7)
    result = run_target(f"{HERE}:exiting_target", "score", "p1", sim)
    assert result.loss is None and result.error is not None
    assert (result.error.type, result.error.message) == ("SystemExit", "3")
    assert len(result.replicates) == 1 and result.replicates[0].error is None


def test_system_exit_in_a_model_fails_its_param_only(tmp_path: Path) -> None:
    """On the fake cluster (tasks run in this process): the param whose model raises
    SystemExit is failed with that error, the nine others are ok, no worker is lost."""
    values = [{"k": i, "raise": "exit" if i == 4 else ""} for i in range(10)]
    spec = synthetic_spec(0, model=f"{HERE}:exiting_model", parameters={"values": values})
    job = job_from_dict(spec, base_dir=tmp_path)
    fake = FakeCluster()
    summary = asyncio.run(Runner(job, fake, RunOptions(), clock=fake.clock).run())
    assert (summary.ok, summary.failed, summary.worker_restarts) == (9, 1, 0)
    failed = [r for r in read_dataset(job.output_dir / "params") if r["status"] == "failed"]
    assert [r["param_k"] for r in failed] == [4]
    assert failed[0]["error_type"] == "SystemExit"


def test_a_cluster_without_workers_pauses_the_job(tmp_path: Path) -> None:
    """All workers gone mid-job and none back: WorkersLost after no_workers_timeout_s
    (fake clock), the manifest says interrupted, and a rerun with workers finishes it."""
    job = job_from_dict(synthetic_spec(20), base_dir=tmp_path)
    fake = FakeCluster()
    fake.on_run = after_aggs(8, fake.lose_all_workers)
    runner = Runner(job, fake, RunOptions(flush_params=3), clock=fake.clock,
                    no_workers_timeout_s=5.0)
    with pytest.raises(WorkersLost, match="no workers for"):
        asyncio.run(runner.run())
    assert fake.now >= 5.0  # the fake clock: it waited the whole timeout
    manifest = read_manifest(job.output_dir)
    assert manifest is not None and manifest["state"] == "interrupted"
    committed = len(read_dataset(job.output_dir / "params"))
    assert 0 < committed < 20
    rerun = FakeCluster()
    summary = asyncio.run(Runner(job, rerun, RunOptions(), clock=rerun.clock).run())
    assert (summary.state, summary.resumed, summary.ok) == ("succeeded", committed, 20)
