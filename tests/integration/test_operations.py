"""Operations with real tools: promtool checks and unit-tests the alert rules, every metric
the dashboard and the rules query is one a running `tidegate serve` exports, a real
Prometheus server scrapes a daemon during a job, and the image's command, environment and
HEALTHCHECK work outside a container.

promtool and prometheus come from Debian's `prometheus` package, which `make test`
installs when they are missing; without them these tests fail, saying so. Nothing here
uses port 9090: each Prometheus gets a free port on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import REPO, synthetic_spec
from tests.daemon_harness import Daemon, base_config, free_port
from tests.unit.test_deploy_files import (
    ALERTS,
    PROMETHEUS,
    Query,
    alert_queries,
    dashboard_queries,
    dockerfile,
    image_env,
    metric_names,
    stages,
)

# Sample names each family type exposes in the text format (prometheus_client's parser
# names a counter's family without its _total).
_SUFFIXES = {
    "counter": ("_total", "_created"),
    "histogram": ("_bucket", "_count", "_sum", "_created"),
    "summary": ("", "_count", "_sum", "_created"),
    "info": ("_info",),
    "gaugehistogram": ("_bucket", "_gcount", "_gsum"),
}
PROMETHEUS_OWN = {"up"}  # recorded by Prometheus for every target, not exported by tidegate


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: `make test` installs it (Debian's prometheus package)")
    return path


def _run(*argv: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=cwd, check=False)


def _get(url: str, timeout: float = 5) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()
    except OSError:
        return 0, ""


# --- promtool -----------------------------------------------------------------------------


def test_promtool_check_rules() -> None:
    """promtool accepts alerts.yml and finds every alert in it."""
    proc = _run(_tool("promtool"), "check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in proc.stdout


def test_promtool_unit_tests_pass() -> None:
    """promtool runs alerts_test.yml: every alert fires and stays quiet where expected."""
    proc = _run(_tool("promtool"), "test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_promtool_check_example_config() -> None:
    """promtool accepts the example prometheus.yml, including the rule file it loads."""
    proc = _run(_tool("promtool"), "check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 rule files found" in proc.stdout


# --- a running daemon ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    root = tmp_path_factory.mktemp("ops-daemon")
    d = Daemon(root, base_config(root))
    d.start()
    yield d
    d.stop()


def _submit(daemon: Daemon, spec: dict[str, Any]) -> str:
    status, body = daemon.request("POST", "/v1/jobs", yaml.safe_dump(spec))
    assert status == 201, body
    return body["id"]


def exported_sample_names(text: str) -> set[str]:
    """Every sample name an exposition can carry: those present, and those each family's
    type defines (a labelled family with no child yet has no sample)."""
    names = set()
    for family in text_string_to_metric_families(text):
        names |= {s.name for s in family.samples}
        names |= {family.name + suffix for suffix in _SUFFIXES.get(family.type, ("",))}
    return names


def unexported(queries: list[Query], exported: set[str]) -> dict[str, set[str]]:
    """The metric names each query reads that are neither exported nor Prometheus' own."""
    out = {}
    for q in queries:
        missing = metric_names(q) - exported - PROMETHEUS_OWN
        if missing:
            out[f"{q.where}: {q.expr}"] = missing
    return out


def test_queried_metrics_are_exported(daemon: Daemon) -> None:
    """Every metric the dashboard and rules select is a sample a running daemon serves."""
    job_id = _submit(daemon, synthetic_spec(6, job_id="names", output="names"))
    job = daemon.wait_job(job_id, {"succeeded", "failed"}, timeout=120)
    assert job["state"] == "succeeded", daemon.log()
    status, text = daemon.request("GET", "/metrics", auth=False)
    assert status == 200
    exported = exported_sample_names(text)
    # Families with labels have children by now, so names come from real samples too.
    assert {
        "tidegate_batch_size_ceiling",
        "tidegate_cluster_memory_bytes",
        "tidegate_inflight_tasks",
        "tidegate_job_params",
        "tidegate_jobs",
    } <= {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    queries = dashboard_queries() + alert_queries()
    assert unexported(queries, exported) == {}
    # The comparison is by full sample name: a family name with a wrong suffix, or a
    # counter without _total, is caught.
    wrong = [
        Query("check", "tidegate_oom_events"),
        Query("check", "tidegate_batch_size_total"),
        Query("check", "rate(tidegate_flush_seconds[5m])"),
    ]
    assert set(unexported(wrong, exported)) == {f"check: {q.expr}" for q in wrong}


# --- a real Prometheus server -------------------------------------------------------------


@pytest.fixture
def prometheus(daemon: Daemon, tmp_path: Path) -> Iterator[str]:
    """A Prometheus on a free port of 127.0.0.1, scraping the daemon every second as job
    `tidegate` and evaluating the shipped rules every second; its base URL."""
    binary = _tool("prometheus")
    port = free_port()
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(PROMETHEUS / "alerts.yml")],
        "scrape_configs": [
            {"job_name": "tidegate", "static_configs": [{"targets": [f"127.0.0.1:{daemon.port}"]}]}
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    log = (tmp_path / "prometheus.log").open("w")
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while _get(f"{url}/-/ready")[0] != 200:
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()
            assert time.monotonic() < deadline, "Prometheus not ready in 60 s"
            time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        log.close()


def _query(url: str, promql: str) -> list[dict[str, Any]]:
    status, body = _get(f"{url}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    assert status == 200, body
    reply = json.loads(body)
    assert reply["status"] == "success", reply
    return reply["data"]["result"]


def _daemon_sample(daemon: Daemon) -> dict[str, float] | None:
    """B and the in-flight tasks by kind, as the daemon serves them now."""
    status, text = daemon.request("GET", "/metrics", auth=False)
    if status != 200:
        return None
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "tidegate_batch_size":
                out["B"] = s.value
            elif s.name == "tidegate_inflight_tasks":
                out[s.labels["kind"]] = s.value
    return out


def test_prometheus_scrapes_the_daemon_during_a_job(daemon: Daemon, prometheus: str) -> None:
    """A real Prometheus scrapes B and tasks in flight as the daemon serves them."""
    values = [{"k": i, "run_seconds": 0.25} for i in range(60)]  # 120 sims on 2 threads
    job_id = _submit(
        daemon,
        synthetic_spec(60, job_id="scraped", output="scraped", parameters={"values": values}),
    )
    instance = f"127.0.0.1:{daemon.port}"
    history: deque[tuple[float, dict[str, float]]] = deque()
    matched: dict[str, float] | None = None
    deadline = time.monotonic() + 120
    while matched is None:
        assert time.monotonic() < deadline, f"no matching scrape in 120 s:\n{daemon.log()}"
        now = time.monotonic()
        sample = _daemon_sample(daemon)
        if sample is not None:
            history.append((now, sample))
        while history and now - history[0][0] > 5:
            history.popleft()
        b = _query(prometheus, 'tidegate_batch_size{job="tidegate"}')
        tasks = _query(prometheus, 'tidegate_inflight_tasks{job="tidegate"}')
        if b and tasks:
            assert {r["metric"]["instance"] for r in b + tasks} == {instance}
            got = {"B": float(b[0]["value"][1])}
            got |= {r["metric"]["kind"]: float(r["value"][1]) for r in tasks}
            recent = [s for _, s in history]
            served = all(any(s.get(k) == v for s in recent) for k, v in got.items())
            if served and got["B"] >= 1 and got.get("sim", 0) + got.get("agg", 0) > 0:
                matched = got
        time.sleep(0.2)
    assert {"sim", "agg"} <= set(matched)
    (up,) = _query(prometheus, 'up{job="tidegate"}')
    assert up["metric"]["instance"] == instance and up["value"][1] == "1"

    deadline = time.monotonic() + 60
    while True:
        status, body = _get(f"{prometheus}/api/v1/rules")
        assert status == 200, body
        rules = [r for g in json.loads(body)["data"]["groups"] for r in g["rules"]]
        if rules and all(r["health"] == "ok" for r in rules):
            break
        assert time.monotonic() < deadline, rules
        time.sleep(0.2)
    assert {r["name"] for r in rules} == set(ALERTS)
    assert all(not r.get("lastError") for r in rules)
    daemon.request("DELETE", f"/v1/jobs/{job_id}")
    daemon.wait_job(job_id, {"succeeded", "failed", "cancelled", "interrupted"}, timeout=120)


# --- the image's command outside a container ----------------------------------------------


def _healthcheck_argv() -> list[str]:
    (check,) = [i for i in dockerfile() if i.name == "HEALTHCHECK"]
    argv = json.loads(check.args.partition("CMD ")[2])
    return [sys.executable, *argv[1:]]  # the image's `python`


def _image_command(config: Path) -> list[str]:
    """ENTRYPOINT + CMD of the image, with the config path pointed at the file the image
    copies there."""
    last = {i.name: i.args for i in stages()[-1]}
    argv = json.loads(last["ENTRYPOINT"]) + json.loads(last["CMD"])
    argv[argv.index("/etc/tidegate/tidegate.yaml")] = str(config)
    assert argv[0] == "tidegate"
    return [sys.executable, "-m", "tidegate", *argv[1:]]


def test_image_command_and_healthcheck_outside_a_container(tmp_path: Path) -> None:
    """The image's command needs a token, then serves; HEALTHCHECK passes, then fails."""
    host = image_env()["TIDEGATE_LISTEN"].rpartition(":")[0]
    port = free_port()
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        TIDEGATE_LISTEN=f"{host}:{port}",
        TIDEGATE_STATE_DIR=str(tmp_path / "state"),
        TIDEGATE_OUTPUT_ROOT=str(tmp_path / "outputs"),
        TIDEGATE_SECURITY__TOKEN_FILE=str(tmp_path / "token"),
        TIDEGATE_CLUSTER__LOCAL__WORKERS="1",
    )
    argv = _image_command(REPO / "config" / "tidegate.yaml")

    missing = subprocess.run(
        argv, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert missing.returncode == 2, missing.stderr
    assert "security.token_file" in missing.stderr

    (tmp_path / "token").write_text("container-test-token\n")
    log_path = tmp_path / "daemon.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True
    )
    check_env = dict(os.environ, TIDEGATE_LISTEN=f"{host}:{port}")
    try:
        deadline = time.monotonic() + 120
        while (
            subprocess.run(
                _healthcheck_argv(), env=check_env, capture_output=True, timeout=30, check=False
            ).returncode
            != 0
        ):
            assert proc.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, "HEALTHCHECK never passed"
            time.sleep(0.2)
        base = f"http://127.0.0.1:{port}"
        assert _get(f"{base}/v1/jobs")[0] == 401  # a token is required off loopback
        assert _get(f"{base}/metrics")[0] == 200  # but not for Prometheus
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=90) == 0, log_path.read_text()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
    stopped = subprocess.run(
        _healthcheck_argv(), env=check_env, capture_output=True, timeout=30, check=False
    )
    assert stopped.returncode != 0
