"""Resume far into a 1,000,000-param grid: `tidegate run` start-up to the first admission
when 900,000 params are already committed, with the ledger's watermark and without it
(the same output copied, its watermark deleted), in one run. The scheduler and workers
are out of process (`dask scheduler`, `dask worker` on 127.0.0.1), as in bench.scale.

    python -m bench.resume_scale [--params 1000000] [--committed 900000] [--out FILE]

The committed state is built through the same Commit API a run uses (parts of 1,000
params, each committing the watermark), without running the sims. Writes
bench/results/resume_scale.json (or --out) and prints a Markdown table for docs/BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

from bench.scale import FIRST, _spec, scratch_cluster
from tidegate.commit import Commit
from tidegate.knobs import FlushPolicy
from tidegate.params import Pending
from tidegate.spec import load_job
from tidegate.states import JobState

RESULTS = Path(__file__).parent / "results"
PART = 1000


def _build(spec: Path, committed: int) -> float:
    """Commit the first ``committed`` params of the spec's grid, as a run would."""
    t0 = time.perf_counter()
    job = load_job(spec)
    commit = Commit(job, FlushPolicy(params=PART, nbytes=1 << 40, seconds=1e9))
    resumed = commit.resume(time.monotonic())
    digest = job.params.digest
    assert digest is not None
    pending = Pending(job.params, resumed.committed, track=True)
    commit.track_watermark(digest, pending.done)
    for p in itertools.islice(pending, committed):
        commit.record(p.param_id, p.values, job.seeds(p.param_id), None)
        commit.maybe_flush(time.monotonic())
    commit.close(JobState.INTERRUPTED)
    return time.perf_counter() - t0


def _first_admission(spec: Path, address: str) -> dict[str, object]:
    """Start `tidegate run`, stop it (SIGINT) once it logs its first admission."""
    err_path = spec.with_suffix(".err")
    t0 = time.monotonic()
    with err_path.open("w") as err_f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "tidegate", "run", str(spec), "--scheduler", address,
             "--no-progress"], stdout=subprocess.DEVNULL, stderr=err_f,
            env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        try:
            while proc.poll() is None and not FIRST.search(err_path.read_text()):
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=0.1)
                if time.monotonic() - t0 > 600:
                    raise RuntimeError(f"no admission within 600 s: {err_path}")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGINT)
                proc.wait(timeout=300)
    err = err_path.read_text()
    first = FIRST.search(err)
    return {"startup_s": float(first[1]) if first else None, "exit": proc.returncode,
            "watermark_used": "without a look-up: all committed" in err}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--params", type=int, default=1_000_000)
    ap.add_argument("--committed", type=int, default=900_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "resume_scale.json")
    args = ap.parse_args()
    results: dict[str, object] = {"params": args.params, "committed": args.committed}
    with scratch_cluster(args.workers, "tidegate-resume-") as (address, work):
        marked = _spec(work / "marked.yaml", args.params)
        results["build_s"] = round(_build(marked, args.committed), 1)
        out = work / f"out-{args.params}"
        # The baseline: the same output, its watermark forgotten (as a retry would).
        bare = work / "bare"
        bare.mkdir()
        shutil.copy(marked, bare / "marked.yaml")
        shutil.copytree(out, bare / out.name)
        with sqlite3.connect(bare / out.name / "_ledger.sqlite") as db:
            (results["watermark"],) = db.execute("SELECT position FROM watermarks").fetchone()
            db.execute("DELETE FROM watermarks")
        results["with_watermark"] = _first_admission(marked, address)
        print("with", results["with_watermark"], flush=True)
        results["without_watermark"] = _first_admission(bare / "marked.yaml", address)
        print("without", results["without_watermark"], flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    w, wo = results["with_watermark"], results["without_watermark"]
    assert isinstance(w, dict) and isinstance(wo, dict)
    print(f"| resume with {args.committed:,} of {args.params:,} committed | start-up to first "
          "admission (s) | target |")
    print("|---|---|---|")
    print(f"| with the watermark ({results['watermark']:,}) | {w['startup_s']} | < 5 |")
    print(f"| without it (every committed id walked) | {wo['startup_s']} | |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
