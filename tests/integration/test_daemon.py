"""`tidegate serve` as a real process with a real cluster: jobs through the CLI and
HTTP, SIGTERM drain and SIGKILL with resume, scheduler restart, security, /metrics,
sd_notify."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import SIR_DIR, committed_parts, read_dataset, synthetic_spec, tidegate
from tests.daemon_harness import Daemon, base_config, free_port

SLOW_JOB = [{"k": i, "run_seconds": 0.1} for i in range(60)]


def _slow_spec(job_id: str = "slow", n: int = 60) -> dict:
    return synthetic_spec(n, job_id=job_id, output=job_id, parameters={"values": SLOW_JOB[:n]})


def _exactly_once(out: Path, n: int) -> None:
    ids = [r["param_id"] for r in read_dataset(out / "params")]
    assert len(ids) == len(set(ids)) == n


def _wait_for_first_part(daemon: Daemon, out: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not committed_parts(out):
        assert time.monotonic() < deadline, daemon.log()
        time.sleep(0.05)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Daemon]:
    d = Daemon(tmp_path, base_config(tmp_path, security={"code_roots": [str(SIR_DIR)]}))
    yield d
    d.stop()


def test_sir_through_cli_and_http(daemon: Daemon, tmp_path: Path) -> None:
    """The SIR example submitted with `tidegate submit --wait`, and a synthetic job by
    HTTP: both complete with the right status and outputs."""
    daemon.start()
    proc = tidegate("submit", SIR_DIR / "job.yaml", "--wait", "--json", "--url", daemon.url)
    assert proc.returncode == 0, proc.stderr + daemon.log()
    job = json.loads(proc.stdout)
    assert job["state"] == "succeeded"
    assert job["params"]["ok"] == job["params"]["total"] == 100
    out = Path(job["output"])
    assert out == tmp_path / "outputs" / "results" / "sir-demo"
    _exactly_once(out, 100)
    assert len(read_dataset(out / "targets" / "incidence")) == 100

    status, created = daemon.request("POST", "/v1/jobs", json.dumps(synthetic_spec(
        8, job_id="by-http", output="by-http")), headers={"Content-Type": "application/json"})
    assert status == 201, created
    assert created["url"] == "/v1/jobs/by-http"
    done = daemon.wait_job("by-http", {"succeeded", "failed"})
    assert done["state"] == "succeeded" and done["params"]["ok"] == 8
    status, listing = daemon.request("GET", "/v1/jobs")
    assert {j["id"] for j in listing["jobs"]} == {"sir-demo", "by-http"}
    listed = tidegate("jobs", "--json", "--url", daemon.url)
    assert {j["id"] for j in json.loads(listed.stdout)["jobs"]} == {"sir-demo", "by-http"}


@pytest.mark.parametrize("how", ["sigterm", "sigkill"])
def test_interrupted_daemon_resumes_the_job(daemon: Daemon, tmp_path: Path, how: str) -> None:
    """SIGTERM drains and exits 0 within the drain timeout; SIGKILL just dies. Either
    way a restarted daemon resumes the job and every param is written exactly once."""
    daemon.start()
    status, _ = daemon.request("POST", "/v1/jobs", yaml.safe_dump(_slow_spec()))
    assert status == 201
    out = tmp_path / "outputs" / "slow"
    _wait_for_first_part(daemon, out)
    if how == "sigterm":
        started = time.monotonic()
        daemon.signal(signal.SIGTERM)
        assert daemon.wait_exit(timeout=60) == 0, daemon.log()
        assert time.monotonic() - started < 30 + 10
        assert "action=drain_started" in daemon.log()
        daemon.kill_all()  # the embedded cluster's processes, if any linger
    else:
        daemon.kill_all()
    daemon.start()
    job = daemon.wait_job("slow", {"succeeded", "failed"})
    assert job["state"] == "succeeded", daemon.log()
    assert job["params"]["resumed"] > 0
    _exactly_once(out, 60)


def test_cancel_stops_the_job_and_keeps_committed_parts(daemon: Daemon, tmp_path: Path
                                                         ) -> None:
    """DELETE on a running job: it ends cancelled, the parts committed so far stay, and
    a queued job behind it then runs; `tidegate cancel` on a queued one cancels it."""
    daemon.start()
    assert daemon.request("POST", "/v1/jobs", yaml.safe_dump(_slow_spec()))[0] == 201
    queued = synthetic_spec(4, job_id="after", output="after")
    assert daemon.request("POST", "/v1/jobs", yaml.safe_dump(queued))[0] == 201
    never = synthetic_spec(4, job_id="never", output="never")
    assert daemon.request("POST", "/v1/jobs?priority=-1", yaml.safe_dump(never))[0] == 201
    cancelled = tidegate("cancel", "never", "--url", daemon.url)
    assert cancelled.returncode == 0, cancelled.stderr
    out = tmp_path / "outputs" / "slow"
    _wait_for_first_part(daemon, out)
    status, reply = daemon.request("DELETE", "/v1/jobs/slow")
    assert status == 202 and reply["state"] == "cancelling"
    job = daemon.wait_job("slow", {"cancelled", "succeeded", "failed"})
    assert job["state"] == "cancelled", daemon.log()
    committed = read_dataset(out / "params")
    assert 0 < len(committed) < 60
    assert daemon.wait_job("after", {"succeeded", "failed"})["state"] == "succeeded"
    assert daemon.request("GET", "/v1/jobs/never")[1]["state"] == "cancelled"
    assert not (tmp_path / "outputs" / "never").exists()


def test_scheduler_restart_mid_job(tmp_path: Path) -> None:
    """The scheduler and its workers killed and restarted mid-job: /readyz turns false,
    the daemon reconnects and the job completes exactly once."""
    port = free_port()
    address = f"tcp://127.0.0.1:{port}"

    def start_cluster() -> list[subprocess.Popen]:
        procs = [subprocess.Popen(
            [sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
             "--port", str(port), "--no-dashboard"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
        for _ in range(2):
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads",
                 "1", "--no-dashboard", "--host", "127.0.0.1"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return procs

    def kill(procs: list[subprocess.Popen]) -> None:
        for p in procs:
            p.kill()
        for p in procs:
            p.wait(timeout=30)

    cluster = start_cluster()
    d = Daemon(tmp_path, base_config(tmp_path, cluster={"address": address}))
    try:
        d.start()
        status, _ = d.request("POST", "/v1/jobs", yaml.safe_dump(_slow_spec()))
        assert status == 201
        out = tmp_path / "outputs" / "slow"
        _wait_for_first_part(d, out)
        kill(cluster)
        deadline = time.monotonic() + 60
        while d.request("GET", "/readyz", auth=False)[0] != 503:
            assert time.monotonic() < deadline, d.log()
            time.sleep(0.1)
        cluster = start_cluster()
        job = d.wait_job("slow", {"succeeded", "failed"})
        assert job["state"] == "succeeded", d.log()
        assert "action=job_paused" in d.log()
        _exactly_once(out, 60)
        assert d.request("GET", "/readyz", auth=False)[0] == 200
    finally:
        d.stop()
        kill(cluster)


# --- security and bad input ------------------------------------------------------------

@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("secured")
    (root / "token").write_text("s3cret-token\n")
    d = Daemon(root, base_config(root, security={
        "token_file": str(root / "token"),
        "allowed_modules": ["tidegate.workloads"],
        "max_body_bytes": 64 * 1024,
    }), token="s3cret-token")
    d.start()
    yield d
    d.stop()


def test_token_required(secured: Daemon) -> None:
    """Without the token: 401; with it: 200; a wrong one: 401."""
    assert secured.request("GET", "/v1/jobs", auth=False)[0] == 401
    assert secured.request("GET", "/v1/jobs")[0] == 200
    status, _ = secured.request("GET", "/v1/jobs", auth=False,
                                headers={"Authorization": "Bearer nope"})
    assert status == 401
    assert secured.request("GET", "/healthz", auth=False)[0] == 200


def test_answers_validate_against_the_openapi_document(secured: Daemon) -> None:
    """A real job's answers (while queued or running, and finished) validate against the
    JobView schema of the daemon's own /v1/openapi.json."""
    from jsonschema import Draft202012Validator

    status, doc = secured.request("GET", "/v1/openapi.json")
    assert status == 200 and doc["openapi"] == "3.1.0"

    def check(model: str, answer: dict) -> None:
        schema = {"$ref": f"#/components/schemas/{model}", "components": doc["components"]}
        Draft202012Validator(schema).validate(answer)

    status, created = secured.request("POST", "/v1/jobs", yaml.safe_dump(
        synthetic_spec(4, job_id="described", output="described")))
    assert status == 201, created
    check("Submitted", created)
    check("JobView", secured.request("GET", "/v1/jobs/described")[1])
    done = secured.wait_job("described", {"succeeded", "failed"})
    check("JobView", done)
    assert done["state"] == "succeeded" and done["summary"]["params"]["ok"] == 4
    check("JobList", secured.request("GET", "/v1/jobs")[1])


def test_module_outside_allowed_modules_is_403(secured: Daemon) -> None:
    """A model outside security.allowed_modules is refused before anything is imported."""
    spec = synthetic_spec(2, model="os:system")
    status, body = secured.request("POST", "/v1/jobs", yaml.safe_dump(spec))
    assert status == 403
    assert "os" in body["error"] and "allowed_modules" in body["error"]


def test_output_escaping_output_root_is_400(secured: Daemon) -> None:
    """An output that leaves output_root is refused, naming the field."""
    status, body = secured.request("POST", "/v1/jobs", yaml.safe_dump(
        synthetic_spec(2, output="../../etc")))
    assert status == 400
    assert body["errors"][0]["field"] == "output"


def test_oversized_body_is_413(secured: Daemon) -> None:
    """A body over security.max_body_bytes gets 413."""
    status, _ = secured.request("POST", "/v1/jobs", "x" * (65 * 1024))
    assert status == 413


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ("model: [", "<yaml>"),
        ("- 1\n- 2\n", "<top level>"),
        (yaml.safe_dump({**synthetic_spec(2), "replicas": 3}), "replicas"),
        (yaml.safe_dump({**synthetic_spec(2), "replicates": 0}), "replicates"),
        (yaml.safe_dump({**synthetic_spec(2), "seed": "x"}), "seed"),
        (yaml.safe_dump({**synthetic_spec(2), "job_id": "bad id"}), "job_id"),
        (yaml.safe_dump({**synthetic_spec(2), "parameters": {}}), "parameters"),
        (yaml.safe_dump({**synthetic_spec(2), "parameters": {"grid": {"a": []}}}),
         "parameters.grid.a"),
        (yaml.safe_dump({**synthetic_spec(2), "outputs": "some"}), "outputs"),
        (yaml.safe_dump({**synthetic_spec(2), "batch": {"min": 5, "max": 2}}), "batch.max"),
        (yaml.safe_dump({**synthetic_spec(2), "targets": [{"name": "t"}]}),
         "targets[0].function"),
        (yaml.safe_dump({k: v for k, v in synthetic_spec(2).items() if k != "model"}), "model"),
        (yaml.safe_dump({**synthetic_spec(2), "model": "tidegate.workloads:nope"}), "model"),
    ],
)
def test_malformed_bodies_are_400_naming_the_field(secured: Daemon, body: str, field: str
                                                   ) -> None:
    """Each malformed spec: 400 with the field named in the first error."""
    status, reply = secured.request("POST", "/v1/jobs", body)
    assert status == 400, reply
    assert reply["errors"][0]["field"] == field
    assert reply["errors"][0]["expected"]


def test_metrics_have_every_family(secured: Daemon) -> None:
    """/metrics parses with prometheus_client and carries every documented family."""
    status, text = secured.request("GET", "/metrics", auth=False)
    assert status == 200
    names = {f.name for f in text_string_to_metric_families(text)}
    expected = {
        "tidegate_batch_size", "tidegate_batch_size_target", "tidegate_inflight_params",
        "tidegate_inflight_tasks", "tidegate_worker_restarts", "tidegate_oom_events",
        "tidegate_simreturn_bytes", "tidegate_cluster_memory_bytes",
        "tidegate_controller_decisions", "tidegate_params", "tidegate_tasks", "tidegate_jobs",
        "tidegate_parts_written", "tidegate_parquet_bytes_written", "tidegate_flush_seconds",
        "tidegate_scheduler_connected", "tidegate_build_info", "process_cpu_seconds",
    }
    assert expected <= names, expected - names


def test_non_loopback_without_token_refuses_to_start(tmp_path: Path) -> None:
    """Listening beyond loopback without a token: exit 3 and a message."""
    d = Daemon(tmp_path, base_config(tmp_path, listen=f"0.0.0.0:{free_port()}"))
    try:
        d.start(wait_ready=False)
        assert d.wait_exit(timeout=60) == 3
        assert "token" in d.log() and "Traceback" not in d.log()
    finally:
        d.stop()


def test_bad_config_exits_2(tmp_path: Path) -> None:
    """A config error names the key and exits 2 before anything starts."""
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("drain_timeout_s: soon\n")
    proc = tidegate("serve", "--config", cfg)
    assert proc.returncode == 2
    assert "drain_timeout_s" in proc.stderr and "Traceback" not in proc.stderr


# --- systemd ------------------------------------------------------------------------------

def test_sd_notify_messages(tmp_path: Path) -> None:
    """READY=1 once serving, STATUS= lines, WATCHDOG=1 and STOPPING=1 on SIGTERM, on a
    datagram socket the test owns."""
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    d = Daemon(tmp_path, base_config(tmp_path), env={
        "NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "2000000"})
    try:
        d.start(wait_ready=False)
        seen: list[str] = []
        while not any(m.startswith("READY=1") for m in seen):
            seen.append(sock.recv(4096).decode())
        while not any("WATCHDOG=1" in m for m in seen):
            seen.append(sock.recv(4096).decode())
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in seen)
        d.signal(signal.SIGTERM)
        while not any("STOPPING=1" in m for m in seen):
            seen.append(sock.recv(4096).decode())
        assert d.wait_exit(timeout=60) == 0
    finally:
        d.stop()
        sock.close()
    os.unlink(sock_path)


def _kill_at_random_points(daemon: Daemon, tmp_path: Path, seed: int, kills: int) -> None:
    """kill -9 the daemon (and its embedded cluster) at ``kills`` random moments, each
    after a random number of parts has been committed (0: before the first), restarting
    it each time; the job then ends succeeded with every param exactly once."""
    rng = random.Random(seed)
    out = tmp_path / "outputs" / "slow"
    daemon.start()
    assert daemon.request("POST", "/v1/jobs", yaml.safe_dump(_slow_spec()))[0] == 201
    for _ in range(kills):
        target = committed_parts(out) + rng.randint(0, 2)
        deadline = time.monotonic() + 120
        while committed_parts(out) < target:
            status, job = daemon.request("GET", "/v1/jobs/slow")
            if status == 200 and job["state"] in {"succeeded", "failed"}:
                break
            assert time.monotonic() < deadline, daemon.log()
            time.sleep(0.05)
        daemon.kill_all()
        daemon.start()
    job = daemon.wait_job("slow", {"succeeded", "failed"})
    assert job["state"] == "succeeded", daemon.log()
    _exactly_once(out, 60)


def test_kill_9_at_random_points_resumes_exactly_once(daemon: Daemon, tmp_path: Path) -> None:
    _kill_at_random_points(daemon, tmp_path, seed=17, kills=3)


@pytest.mark.slow
@pytest.mark.parametrize("seed", range(4))
def test_kill_9_at_random_points_many(daemon: Daemon, tmp_path: Path, seed: int) -> None:
    """The whole variant: 4 seeds x 3 kills (12 kill points)."""
    _kill_at_random_points(daemon, tmp_path, seed=seed, kills=3)
