"""The embedded cluster under attack and under user code that exits: mutual TLS keeps
other local processes out, SystemExit in a model fails a param and not the cluster, and a
cluster that lost its workers makes /readyz false until tidegate restarts it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from distributed import Client
from distributed.core import Status
from distributed.security import Security
from tornado.httpclient import AsyncHTTPClient, HTTPClientError

from tests.conftest import read_dataset, synthetic_spec
from tests.daemon_harness import Daemon, base_config
from tidegate.cluster import ClusterOptions, open_cluster
from tidegate.config import load_config
from tidegate.metrics import Metrics
from tidegate.service import Service


def _whoami() -> str:
    return "ran"


def test_embedded_cluster_refuses_clients_without_its_credential() -> None:
    """A plain tcp:// client, a tls:// client without certificates and one with another
    generated credential all fail against the embedded scheduler; tidegate's own client
    runs tasks and registers its nanny plugin."""

    async def scenario() -> None:
        cluster = await open_cluster(ClusterOptions(workers=1, threads_per_worker=1))
        try:
            assert cluster.address.startswith("tls://")
            assert await cluster.client.submit(_whoami, pure=False) == "ran"
            await cluster.watch_workers(time.monotonic)
            assert "exit-codes" in cluster._registered
            attempts: list[tuple[str, Security | None]] = [
                (cluster.address.replace("tls://", "tcp://"), None),
                (cluster.address, None),
                (cluster.address, Security.temporary()),
            ]
            for address, security in attempts:
                # Made first and closed in any case: a half-made Client left to the garbage
                # collector tries to close itself on a loop that may be gone by then.
                other = Client(address, asynchronous=True, timeout=3, security=security)
                try:
                    with pytest.raises(Exception):  # noqa: B017 (each transport fails its own way)
                        await other
                        await asyncio.wait_for(other.submit(_whoami, pure=False), 5)
                finally:
                    with contextlib.suppress(Exception):
                        await other.close()
        finally:
            await cluster.close()

    asyncio.run(scenario())


EXITING = textwrap.dedent('''
    import sys

    def model(params, seed):
        if params["k"] == 3:
            sys.exit(3)
        return {"data": {"x": [params["k"]]}}
''')


def test_system_exit_in_a_model_fails_that_param_and_keeps_the_workers(
        tmp_path: Path) -> None:
    """A daemon job whose model calls sys.exit(3) for one param: that param is failed
    (SystemExit), the others ok, the cluster keeps its workers (/readyz 200, no worker
    restart) and the next job runs."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "exiting.py").write_text(EXITING)
    d = Daemon(tmp_path, base_config(tmp_path, security={"code_roots": [str(code)]}))
    try:
        d.start()
        spec = {"job_id": "exits", "model": "exiting:model", "code_paths": [str(code)],
                "parameters": {"values": [{"k": i} for i in range(8)]}, "output": "exits"}
        assert d.request("POST", "/v1/jobs", yaml.safe_dump(spec))[0] == 201
        job = d.wait_job("exits", {"completed_with_failures"}, timeout=120)
        rows = read_dataset(tmp_path / "outputs" / "exits" / "params")
        assert sorted((r["param_k"], r["status"]) for r in rows) == [
            (i, "failed" if i == 3 else "ok") for i in range(8)], d.log()
        assert [r["error_type"] for r in rows if r["status"] == "failed"] == ["SystemExit"]
        assert job["summary"]["worker_restarts"] == 0, job
        status, ready = d.request("GET", "/readyz", auth=False)
        assert status == 200 and ready["workers"] is True
        after = synthetic_spec(4, job_id="after", output="after")
        assert d.request("POST", "/v1/jobs", yaml.safe_dump(after))[0] == 201
        assert d.wait_job("after", {"succeeded", "failed"}, timeout=120)["state"] == "succeeded"
    finally:
        d.stop()


async def _readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        r = await AsyncHTTPClient().fetch(f"http://127.0.0.1:{port}/readyz")
    except HTTPClientError as exc:
        assert exc.response is not None
        r = exc.response
    return r.code, json.loads(r.body)


def test_embedded_cluster_whose_workers_die_for_good_is_not_ready_then_restarted(
        tmp_path: Path) -> None:
    """A real LocalCluster whose workers are SIGKILLed and whose nannies then close (as
    after a worker closed itself) instead of restarting them: /readyz is 503 with workers
    false; after cluster.no_workers_timeout_s tidegate starts a new cluster and /readyz
    is 200 again."""
    config = load_config(None, {}, {
        "state_dir": str(tmp_path / "state"), "output_root": str(tmp_path / "out"),
        "listen": "127.0.0.1:0", "cluster.local.workers": 2,
        "cluster.local.threads_per_worker": 1, "cluster.no_workers_timeout_s": 2.0})

    async def until(condition: Any, what: str) -> Any:
        deadline = time.monotonic() + 60
        while True:
            got = await condition()
            if got:
                return got
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.1)

    async def scenario() -> None:
        svc = Service(config, metrics=Metrics())
        await svc.start()
        try:
            assert svc.port is not None and svc.cluster is not None
            assert (await _readyz(svc.port))[0] == 200
            first = svc.cluster
            assert first.local is not None
            pids = [n.process.pid for n in first.local.workers.values()]  # type: ignore[attr-defined]
            for nanny in first.local.workers.values():
                # As after a worker closed itself: the nanny closes instead of restarting.
                nanny.status = Status.closing_gracefully  # type: ignore[attr-defined]
            for pid in pids:
                os.kill(pid, signal.SIGKILL)

            async def not_ready() -> Any:
                code, body = await _readyz(svc.port)  # type: ignore[arg-type]
                return (code, body) if code == 503 else None

            _, body = await until(not_ready, "/readyz 503")
            assert body["workers"] is False and body["ready"] is False

            async def restarted() -> bool:
                return svc.cluster is not first and (await _readyz(svc.port))[0] == 200  # type: ignore[arg-type]

            await until(restarted, "a restarted cluster")
            assert svc.cluster is not None and await svc.cluster.worker_count() == 2
        finally:
            await svc.close()

    asyncio.run(scenario())
