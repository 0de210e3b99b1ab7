"""The daemon without workers, on the in-memory FakeCluster: /readyz says so, a job on a
remote cluster waits as interrupted and resumes when workers return, and an embedded
cluster that lost its workers is restarted."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import synthetic_spec
from tests.fakes import FakeCluster, FakeTask
from tidegate import service as service_module
from tidegate.config import load_config
from tidegate.losses import Cause
from tidegate.metrics import Metrics
from tidegate.service import Service

TIMEOUT_S = 0.3  # cluster.no_workers_timeout_s


async def _until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def _service(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, made: list[FakeCluster],
             make: Callable[[], FakeCluster], **overrides: Any) -> Service:
    async def open_fake(options: Any) -> FakeCluster:
        made.append(make())
        return made[-1]

    monkeypatch.setattr(service_module, "open_cluster", open_fake)
    config = load_config(None, {}, {
        "state_dir": str(tmp_path / "state"), "output_root": str(tmp_path / "out"),
        "listen": "127.0.0.1:0", "cluster.no_workers_timeout_s": TIMEOUT_S, **overrides})
    return Service(config, metrics=Metrics())


def _losing_after(n: int, made: list[FakeCluster]) -> Callable[[FakeTask], Cause | None]:
    """An on_run hook: the first cluster loses every worker after ``n`` params."""
    done = 0

    def hook(task: FakeTask) -> Cause | None:
        nonlocal done
        if task.key.startswith("agg-") and made and made[0].workers_:
            done += 1
            if done == n:
                made[0].lose_all_workers()
        return None
    return hook


def _state(svc: Service, job_id: str) -> str:
    assert svc.queue is not None
    return str(svc.queue.get(job_id).state)


def test_remote_cluster_without_workers_pauses_the_job_until_they_return(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers gone mid-job on a remote cluster: the job becomes interrupted, /readyz is
    false; once workers join it resumes and succeeds, on the same connection."""
    made: list[FakeCluster] = []
    svc = _service(tmp_path, monkeypatch, made,
                   lambda: FakeCluster(on_run=_losing_after(5, made)),
                   **{"cluster.address": "tcp://scheduler.example:8786"})

    async def scenario() -> None:
        await svc.start()
        try:
            svc.submit(synthetic_spec(20))
            await _until(lambda: _state(svc, "synthetic") == "interrupted", "interrupted")
            await _until(lambda: not svc.ready()["workers"], "readiness false")
            assert svc.ready()["scheduler"] is True
            made[0].add_workers(2)
            await _until(lambda: _state(svc, "synthetic") == "succeeded", "succeeded")
            assert svc.ready()["workers"] is True
            assert len(made) == 1  # no reconnect, no restart
        finally:
            await svc.close()

    asyncio.run(scenario())


def test_embedded_cluster_without_workers_is_restarted_and_the_job_resumes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """Workers gone mid-job on the embedded cluster: tidegate closes it, starts a new
    one (action=cluster_restarted) and the job resumes from its ledger and succeeds."""
    made: list[FakeCluster] = []
    svc = _service(tmp_path, monkeypatch, made,
                   lambda: FakeCluster(embedded=True, on_run=_losing_after(5, made)))

    async def scenario() -> None:
        await svc.start()
        try:
            svc.submit(synthetic_spec(20))
            await _until(lambda: _state(svc, "synthetic") == "succeeded", "succeeded")
            assert svc.queue is not None
            summary = svc.queue.get("synthetic").summary
            assert summary is not None
            assert summary["params"]["resumed"] > 0 and summary["params"]["ok"] == 20
        finally:
            await svc.close()

    with caplog.at_level(logging.WARNING, logger="tidegate.service"):
        asyncio.run(scenario())
    assert len(made) == 2 and made[0].closed
    restarts = [r for r in caplog.records if getattr(r, "action", "") == "cluster_restarted"]
    assert len(restarts) == 1


def test_idle_embedded_cluster_without_workers_is_restarted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No job running and the embedded cluster's workers gone: /readyz turns false, then
    a new cluster is started and /readyz is true again."""
    made: list[FakeCluster] = []
    svc = _service(tmp_path, monkeypatch, made, lambda: FakeCluster(embedded=True))

    async def scenario() -> None:
        await svc.start()
        try:
            assert svc.ready()["workers"] is True
            made[0].lose_all_workers()
            await _until(lambda: not svc.ready()["workers"] or len(made) > 1,
                         "readiness false")
            await _until(lambda: len(made) == 2 and svc.ready()["workers"], "a restart")
            assert made[0].closed
        finally:
            await svc.close()

    asyncio.run(scenario())


def test_a_full_disk_backs_off_instead_of_looping_or_reconnecting(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every part write fails with ENOSPC: the job is interrupted with the path named, the
    daemon keeps its cluster (no reconnect) and retries after a growing wait, not at once;
    once writes work again the job succeeds."""
    import errno

    from tidegate import writer

    made: list[FakeCluster] = []
    svc = _service(tmp_path, monkeypatch, made, FakeCluster)
    real = writer._write_durably
    full = True
    attempts = 0

    def write(*args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        if full:
            attempts += 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "_write_durably", write)

    async def scenario() -> None:
        nonlocal full
        await svc.start()
        try:
            svc.submit(synthetic_spec(6))
            await _until(lambda: svc._write_backoff_s >= 2.0, "a second, longer back-off")
            record = svc.queue.get("synthetic")  # type: ignore[union-attr]
            assert "no space left on device" in (record.error or "")
            assert attempts in (2, 3) and len(made) == 1  # no hot loop; the same cluster
            full = False
            await _until(lambda: _state(svc, "synthetic") == "succeeded", "success", 30)
            assert len(made) == 1
        finally:
            await svc.close()

    asyncio.run(scenario())


def test_a_queued_job_keeps_its_recorded_id_and_output(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A job queued under an id its spec would not derive today (ids derived by another
    release) runs as that id, into its recorded output, not into a newly derived one."""
    made: list[FakeCluster] = []
    svc = _service(tmp_path, monkeypatch, made, lambda: FakeCluster())
    spec = synthetic_spec(4)
    del spec["job_id"]
    output = tmp_path / "out" / "synthetic-0ld1d000"

    async def scenario() -> None:
        await svc.start()
        try:
            assert svc.queue is not None
            svc.queue.submit("synthetic-0ld1d000", spec, str(output))
            svc._jobs_changed.set()
            await _until(lambda: _state(svc, "synthetic-0ld1d000") == "succeeded", "succeeded")
        finally:
            await svc.close()

    asyncio.run(scenario())
    manifest = json.loads((output / "manifest.json").read_text())
    assert manifest["job_id"] == "synthetic-0ld1d000"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [output.name]
