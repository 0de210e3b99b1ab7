"""A 1,000,000-row params file (.csv, .parquet, .jsonl): loading the spec (read, checked,
its source made) and `tidegate run` start-up to the first admission, against the
baseline of expanding the same file row by row into params (what every file was before
``paramfile.FileSource``), in one run. Each load runs in a fresh process, so its peak
RSS (ru_maxrss) is its own.

    python -m bench.file_scale [--rows 1000000] [--formats csv,parquet,jsonl] [--out FILE]

Writes bench/results/file_scale.json (or --out) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pa_parquet
import yaml

from bench.resume_scale import _first_admission
from bench.scale import scratch_cluster

RESULTS = Path(__file__).parent / "results"

# Run in a child: load the spec (the file's way or row by row) and report time and RSS.
_LOAD = r"""
import json, resource, sys, time
from pathlib import Path
from tidegate import paramfile, spec
t0 = time.perf_counter()
if sys.argv[2] == "rows":
    table, _ = spec._read_param_file(sys.argv[3], Path(sys.argv[1]).parent, lambda *_: None)
    rows = paramfile.normalised(table).to_pylist()
    del table
    source = spec._expand_rows(
        [(f"parameters.file[row {i}]", r) for i, r in enumerate(rows)]).source
else:
    source = spec.load_job(Path(sys.argv[1])).params
n = source.total
print(json.dumps({"load_s": round(time.perf_counter() - t0, 2), "params": n,
                  "source": type(source).__name__,
                  "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                                        / 1024, 1)}))
"""


def _write(path: Path, rows: int) -> None:
    table = pa.table({"i": pa.array(range(rows), pa.int64()),
                      "beta": pa.array([0.05 + (k % 997) / 1000 for k in range(rows)]),
                      "kind": pa.array([f"k{k % 7}" for k in range(rows)]),
                      "output_bytes": pa.array([16] * rows, pa.int64())})
    if path.suffix == ".csv":
        pa_csv.write_csv(table, path)
    elif path.suffix == ".parquet":
        pa_parquet.write_table(table, path)
    else:
        with path.open("w") as f:
            for batch in table.to_batches(max_chunksize=65536):
                f.writelines(json.dumps(r) + "\n" for r in batch.to_pylist())


def _load(spec: Path, how: str, name: str) -> dict[str, object]:
    out = subprocess.run([sys.executable, "-c", _LOAD, str(spec), how, name],
                         capture_output=True, text=True, check=True, timeout=1800)
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--formats", default="csv,parquet,jsonl")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=RESULTS / "file_scale.json")
    args = ap.parse_args()
    results: dict[str, object] = {"rows": args.rows, "pyarrow": pa.__version__}
    with scratch_cluster(args.workers, "tidegate-file-") as (address, work):
        for fmt in args.formats.split(","):
            name = f"params.{fmt}"
            _write(work / name, args.rows)
            spec = work / f"{fmt}.yaml"
            spec.write_text(yaml.safe_dump({
                "job_id": f"file-{fmt}", "model": "tidegate.workloads:synthetic",
                "parameters": {"file": name}, "replicates": 1, "seed": 1,
                "outputs": "none", "output": f"out-{fmt}"}))
            got = {"bytes": (work / name).stat().st_size,
                   "file_source": _load(spec, "file", name),
                   "row_by_row": _load(spec, "rows", name),
                   "run": _first_admission(spec, address)}
            results[fmt] = got
            print(fmt, got, flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"| {args.rows:,}-row file | load (s) | peak RSS (MiB) | row by row: load (s) | "
          "peak RSS (MiB) | `tidegate run` to first admission (s), target < 5 |")
    print("|---|---|---|---|---|---|")
    for fmt in args.formats.split(","):
        r = results[fmt]
        assert isinstance(r, dict)
        f, b = r["file_source"], r["row_by_row"]
        print(f"| .{fmt} | {f['load_s']} | {f['peak_rss_mib']} | {b['load_s']} | "
              f"{b['peak_rss_mib']} | {r['run']['startup_s']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
