"""`tidegate run --metrics-port`: every metric of the contract served during a real run,
parsed with prometheus_client's own parser, agreeing with the run's summary."""

from __future__ import annotations

import json
import math
import socket
import urllib.request
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import start_tidegate, synthetic_spec, wait_quietly, write_spec
from tidegate.fusion import MAX_PACK

CONTRACT = {
    "tidegate_batch_size", "tidegate_batch_size_target", "tidegate_inflight_params",
    "tidegate_inflight_tasks", "tidegate_worker_restarts", "tidegate_oom_events",
    "tidegate_simreturn_bytes", "tidegate_cluster_memory_bytes",
    "tidegate_controller_decisions", "tidegate_params", "tidegate_tasks",
    "tidegate_parts_written", "tidegate_parquet_bytes_written", "tidegate_flush_seconds",
    "tidegate_scheduler_connected", "tidegate_build_info",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _scrape(port: int) -> dict[str, list] | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
            text = r.read().decode()
    except OSError:
        return None
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def _value(samples: list, name: str, default: float | None = None, **labels: str) -> float:
    for s in samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    if default is not None:
        return default
    raise KeyError((name, labels))


def test_metrics_served_during_a_run(tmp_path: Path) -> None:
    """While a job runs, /metrics carries every contract metric; B and in-flight values
    stay within what the run reports."""
    values = [{"k": i, "run_seconds": 0.02, "output_bytes": 4096} for i in range(300)]
    spec = write_spec(tmp_path / "job.yaml", synthetic_spec(300, parameters={"values": values}))
    port = _free_port()
    proc = start_tidegate("run", spec, "--metrics-port", str(port), "--json", "--no-progress",
                          "--flush-params", "20")
    scrapes = []
    while proc.poll() is None:
        got = _scrape(port)
        # Count scrapes once the job has started (before that, B is not yet chosen).
        if got is not None and _value(got["tidegate_job_params"], "tidegate_job_params",
                                      default=0, kind="total") > 0:
            scrapes.append(got)
        wait_quietly(proc, 0.2)
    stdout, stderr = proc.communicate()
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout.strip().splitlines()[-1])
    assert len(scrapes) >= 3, "too few scrapes during the run"
    running = [s for s in scrapes if _value(s["tidegate_inflight_params"],
                                            "tidegate_inflight_params") > 0]
    assert running, "no scrape saw params in flight"
    for s in scrapes:
        assert set(s) >= CONTRACT, CONTRACT - set(s)
        b = _value(s["tidegate_batch_size"], "tidegate_batch_size")
        assert summary["batch_size"]["min"] <= b <= summary["batch_size"]["max"]
        inflight = _value(s["tidegate_inflight_params"], "tidegate_inflight_params")
        assert inflight <= summary["batch_size"]["max"]
        tasks = (_value(s["tidegate_inflight_tasks"], "tidegate_inflight_tasks", kind="sim")
                 + _value(s["tidegate_inflight_tasks"], "tidegate_inflight_tasks", kind="agg"))
        # R=2 sims + 1 agg per param unfused; fused (batch.fuse, on for sims this short)
        # one task carries a param's sims and target, or up to MAX_PACK whole params.
        assert math.ceil(inflight / MAX_PACK) <= tasks <= inflight * 3
        assert _value(s["tidegate_scheduler_connected"], "tidegate_scheduler_connected") == 1
    last = scrapes[-1]
    ok = _value(last["tidegate_params"], "tidegate_params_total", outcome="ok")
    assert 0 < ok <= 300
    assert _value(last["tidegate_tasks"], "tidegate_tasks_total", kind="sim",
                  outcome="ok") == 2 * ok
    assert _value(last["tidegate_simreturn_bytes"], "tidegate_simreturn_bytes_count") == 2 * ok
    assert _value(last["tidegate_cluster_memory_bytes"], "tidegate_cluster_memory_bytes",
                  kind="limit") > 0
