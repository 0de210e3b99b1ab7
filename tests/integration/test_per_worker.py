"""Per-worker admission on a real LocalCluster: sims whose working memory cannot share a
worker never overlap on one, whatever B is; both workers work."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from tests.conftest import read_dataset, tidegate, write_spec

MiB = 2**20

# Each sim records which worker ran it and when: overlaps on one worker are then read
# back from the Parquet output, not from tidegate's own view.
SPANS_MODEL = textwrap.dedent('''
    import time
    import pyarrow as pa
    from distributed import get_worker

    def simulate(params, seed):
        start = time.time()
        held = bytearray(params["alloc_mib"] * 2**20)
        for i in range(0, len(held), 4096):
            held[i] = 1
        time.sleep(params["run_seconds"])
        end = time.time()
        del held
        return {"span": pa.table({"worker": [get_worker().name], "start": [start],
                                  "end": [end]})}
''')


def _spans(out: Path) -> dict[str, list[tuple[float, float]]]:
    by_worker: dict[str, list[tuple[float, float]]] = {}
    for row in read_dataset(out / "model_outputs" / "span"):
        by_worker.setdefault(str(row["worker"]), []).append((row["start"], row["end"]))
    return by_worker


def _overlaps(spans: list[tuple[float, float]]) -> int:
    """Spans that start before an earlier one on the same worker ended."""
    count, latest_end = 0, float("-inf")
    for start, end in sorted(spans):
        count += start < latest_end
        latest_end = max(latest_end, end)
    return count


def _run(tmp_path: Path, alloc_mib: int, n: int, *extra: str) -> tuple[dict, Path]:
    (tmp_path / "spans_model.py").write_text(SPANS_MODEL)
    out = tmp_path / "out"
    values = [{"k": i, "alloc_mib": alloc_mib, "run_seconds": 0.3} for i in range(n)]
    spec = write_spec(tmp_path / "job.yaml", {
        "job_id": "spans", "model": "spans_model:simulate", "replicates": 1, "seed": 1,
        "parameters": {"values": values}, "outputs": "all", "output": str(out),
        "code_paths": ["."],
    })
    proc = tidegate("run", str(spec), "--json", "--no-progress", "--workers", "2",
                    "--threads-per-worker", "2", "--memory-limit", "450MiB", *extra,
                    timeout=300)
    assert proc.stdout.strip(), proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1]), out


def test_heavy_sims_never_share_a_worker_even_with_b_pinned(tmp_path: Path) -> None:
    """230 MiB sims on 2 workers x 2 threads x 450 MiB with B pinned at 8: no two ran
    on one worker at once, both workers ran sims, and no worker was lost."""
    summary, out = _run(tmp_path, 230, 12, "--batch-size", "8")
    assert summary["params"]["ok"] == 12, summary
    assert summary["worker_restarts"] == 0
    spans = _spans(out)
    assert len(spans) == 2
    assert all(_overlaps(s) == 0 for s in spans.values()), spans


def test_light_sims_share_a_workers_threads(tmp_path: Path) -> None:
    """The control: 8 MiB sims do run two at a time on a worker's two threads."""
    summary, out = _run(tmp_path, 8, 24)
    assert summary["params"]["ok"] == 24, summary
    assert sum(_overlaps(s) for s in _spans(out).values()) > 0
