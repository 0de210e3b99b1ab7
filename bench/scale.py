"""`make bench-scale`: a 1,000,000-param grid of trivial sims through `tidegate run`, with
the scheduler and workers out of process (`dask scheduler`, `dask worker` on 127.0.0.1),
against the same job at 10,000 params. Measures start-up to the first admission (the
run's own log line), tidegate's peak RSS (VmHWM of the process) and the wall time.

    python -m bench.scale [--params 1000000] [--small 10000] [--workers 2]

Writes bench/results/scale.json and prints a Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import yaml

RESULTS = Path(__file__).parent / "results"
FIRST = re.compile(r"first params admitted, ([\d.]+) s after the process started")


def _spec(path: Path, n: int) -> Path:
    a = min(n, 1000)
    path.write_text(yaml.safe_dump({
        "job_id": f"scale-{n}", "model": "tidegate.workloads:synthetic",
        "parameters": {"grid": {"i": list(range(a)), "j": list(range(n // a)),
                                "output_bytes": [16]}},
        "replicates": 1, "seed": 1, "outputs": "none", "output": f"out-{n}",
    }, sort_keys=False))
    return path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_cluster(workers: int) -> tuple[str, tuple[subprocess.Popen[bytes], ...]]:
    """A `dask scheduler` and `dask worker --nworkers N --nthreads 1` on 127.0.0.1: its
    address, and the two processes (scheduler first)."""
    port = _free_port()
    address = f"tcp://127.0.0.1:{port}"
    sched = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler",
                              "--host", "127.0.0.1", "--port", str(port), "--no-dashboard"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    worker = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_worker", address,
                               "--nworkers", str(workers), "--nthreads", "1",
                               "--no-dashboard"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return address, (sched, worker)


@contextlib.contextmanager
def scratch_cluster(workers: int, prefix: str) -> Iterator[tuple[str, Path]]:
    """A cluster (``start_cluster``) and a scratch directory for one bench run: the
    address and the directory; the processes stopped and the directory removed after."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    address, (sched, worker) = start_cluster(workers)
    try:
        yield address, work
    finally:
        for p in (worker, sched):
            p.send_signal(signal.SIGINT)
            p.wait(timeout=60)
        shutil.rmtree(work, ignore_errors=True)


def _peak_rss_mib(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    m = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(m[1]) / 1024 if m else float("nan")


def _run(spec: Path, address: str) -> dict[str, object]:
    start = time.monotonic()
    # Files, not pipes: a pipe read only at the end fills (64 KiB of log lines, a few
    # minutes into a 10^6 run) and the run blocks writing its log.
    out_path, err_path = spec.with_suffix(".out"), spec.with_suffix(".err")
    with out_path.open("w") as out_f, err_path.open("w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidegate", "run", str(spec), "--scheduler", address,
             "--no-progress", "--json"], stdout=out_f, stderr=err_f,
            env=dict(os.environ, PYTHONUNBUFFERED="1"))
        rss = 0.0
        while proc.poll() is None:  # sampled: VmHWM is gone once the process has exited
            rss = max(rss, _peak_rss_mib(proc.pid))
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=1.0)
    out, err = out_path.read_text(), err_path.read_text()
    first = FIRST.search(err)
    summary = json.loads(out.strip().splitlines()[-1]) if out.strip() else {}
    return {"params": summary.get("params"), "state": summary.get("state"),
            "peak_inflight_tasks": summary.get("peak_inflight_tasks"),
            "startup_s": float(first[1]) if first else None,
            "peak_rss_mib": round(rss, 1), "wall_s": round(time.monotonic() - start, 1),
            "exit": proc.returncode}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=10_000)
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    results: dict[str, object] = {}
    with scratch_cluster(args.workers, "tidegate-scale-") as (address, work):
        for n in (args.small, args.params):
            results[str(n)] = _run(_spec(work / f"s{n}.yaml", n), address)
            print(n, results[str(n)], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scale.json").write_text(json.dumps(results, indent=2))
    small, big = results[str(args.small)], results[str(args.params)]
    assert isinstance(small, dict) and isinstance(big, dict)
    ratio = big["peak_rss_mib"] / small["peak_rss_mib"]
    print(f"| measure | at {args.small} | at {args.params} | target |")
    print("|---|---|---|---|")
    print(f"| start-up to first admission (s) | {small['startup_s']} | {big['startup_s']} | < 5 |")
    print(f"| tidegate peak RSS (MiB) | {small['peak_rss_mib']} | {big['peak_rss_mib']} | "
          f"ratio {ratio:.2f} <= 1.3 |")
    print(f"| peak scheduler tasks | {small['peak_inflight_tasks']} | "
          f"{big['peak_inflight_tasks']} | the window |")
    print(f"| wall (s) | {small['wall_s']} | {big['wall_s']} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
