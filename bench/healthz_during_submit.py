"""/healthz latency while a 10^6-param grid is submitted to a real `tidegate serve`.

    python -m bench.healthz_during_submit [--params-per-axis 100]

Starts a daemon (embedded cluster, 1 worker) in a temporary directory, polls /healthz
every 20 ms from one thread while another POSTs a grid of N^3 params, then keeps polling
while the job starts (its spec is expanded again, off the event loop, when it runs).
Prints the submit time and the /healthz latencies (median, p99, max) as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import yaml


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _get(url: str, timeout: float = 30) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return int(r.status)
    except urllib.error.HTTPError as err:
        return err.code


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--params-per-axis", type=int, default=100)
    parser.add_argument("--after-s", type=float, default=20.0,
                        help="keep polling this long after the submission returns")
    args = parser.parse_args()
    n = args.params_per_axis
    with tempfile.TemporaryDirectory() as tmp:
        root, port = Path(tmp), _free_port()
        config = {"listen": f"127.0.0.1:{port}", "state_dir": str(root / "state"),
                  "output_root": str(root / "out"),
                  "cluster": {"local": {"workers": 1, "threads_per_worker": 1}},
                  "limits": {"max_params": n**3}}
        (root / "tidegate.yaml").write_text(yaml.safe_dump(config))
        proc = subprocess.Popen([sys.executable, "-m", "tidegate", "serve", "--config",
                                 str(root / "tidegate.yaml")], stderr=subprocess.DEVNULL,
                                start_new_session=True)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                try:
                    if _get(url + "/readyz", timeout=2) == 200:
                        break
                except OSError:
                    pass
                time.sleep(0.1)
            spec = {"model": "tidegate.workloads:synthetic", "job_id": "big",
                    "parameters": {"grid": {a: list(range(n)) for a in ("x", "y", "z")}}}
            body = json.dumps(spec).encode()
            latencies: list[float] = []
            stop = threading.Event()

            def poll() -> None:
                while not stop.is_set():
                    started = time.perf_counter()
                    _get(url + "/healthz")
                    latencies.append(time.perf_counter() - started)
                    stop.wait(0.02)

            poller = threading.Thread(target=poll)
            poller.start()
            time.sleep(1.0)  # a baseline before the submission
            started = time.perf_counter()
            req = urllib.request.Request(url + "/v1/jobs", data=body, method="POST")
            try:
                with urllib.request.urlopen(req, timeout=600) as r:
                    status = r.status
            except urllib.error.HTTPError as err:
                status = err.code
            submit_s = time.perf_counter() - started
            during = len(latencies)
            time.sleep(args.after_s)
            stop.set()
            poller.join()
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    def figures(xs: list[float]) -> dict[str, float]:
        ms = sorted(x * 1000 for x in xs)
        return {"requests": len(ms), "median_ms": round(statistics.median(ms), 1),
                "p99_ms": round(ms[int(0.99 * (len(ms) - 1))], 1), "max_ms": round(ms[-1], 1)}

    print(json.dumps({
        "params": n**3, "body_bytes": len(body), "submit_status": status,
        "submit_s": round(submit_s, 2),
        "healthz_until_201": figures(latencies[:during]),
        "healthz_after_201_job_starting": figures(latencies[during:]),
    }))


if __name__ == "__main__":
    main()
