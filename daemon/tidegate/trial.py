"""A trial run: the first N params of a job on a small embedded cluster, written to a
scratch directory (never the job's output) and read back, so that a modeller sees the
tables the model returns, and its failures, before a sweep starts.

``tidegate validate SPEC --try N`` and ``tidegate run SPEC --limit N`` both run one.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds

from tidegate.cluster import ClusterOptions, open_cluster
from tidegate.knobs import RunOptions
from tidegate.metrics import Metrics
from tidegate.params import ListSource, Param
from tidegate.runner import Runner
from tidegate.spec import Job, SearchSpec

log = logging.getLogger(__name__)

# Enough to see a model's tables and first failures; a trial is not a sweep.
MAX_TRIAL_PARAMS = 100
SHOWN_FAILURES = 5


@dataclass(frozen=True, slots=True)
class TrialFailure:
    values: dict[str, Any]
    error_type: str
    error: str  # as in the params dataset's error column: "Type: message"


@dataclass(slots=True)
class TrialReport:
    params: int
    ok: int
    failed: int
    seconds: float
    # dataset (model_outputs/NAME, targets/NAME) -> its columns and their types
    datasets: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    failures: list[TrialFailure] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "params": self.params, "ok": self.ok, "failed": self.failed,
            "seconds": round(self.seconds, 3),
            "datasets": {name: [{"name": c, "type": t} for c, t in cols]
                         for name, cols in self.datasets.items()},
            "failures": [dataclasses.asdict(f) for f in self.failures],
        }

    def text(self) -> str:
        lines = [f"trial: {self.params} params on a local cluster: {self.ok} ok, "
                 f"{self.failed} failed, {self.seconds:.1f} s (scratch output, removed)"]
        for name, cols in self.datasets.items():
            lines.append(f"  {name}")
            lines += [f"    {c}: {t}" for c, t in cols]
        if self.failures:
            lines.append(f"  failed params (first {len(self.failures)}):")
            for f in self.failures:
                values = ", ".join(f"{k}={v!r}" for k, v in f.values.items())
                lines.append(f"    {values}: {f.error}")
        return "\n".join(lines)


async def run_trial(job: Job, n: int, *, threads: int = 2,
                    memory_limit: str | int | None = None) -> TrialReport:
    """Run the job's first ``n`` params on one embedded worker of ``threads`` threads into
    a scratch directory, read the datasets back and remove it."""
    count = min(n, MAX_TRIAL_PARAMS)
    search = job.spec.parameters.search
    # A search's first trials depend on a study in the output, which a trial never
    # touches: it runs points drawn at random from the space instead.
    first = (random_points(search, job.param_names, count, job.spec.seed) if search is not None
             else list(itertools.islice(iter(job.params), count)))
    scratch = Path(tempfile.mkdtemp(prefix="tidegate-trial-"))
    try:
        trial = dataclasses.replace(job, output_dir=scratch / "output")
        started = time.perf_counter()
        cluster = await open_cluster(ClusterOptions(
            workers=1, threads_per_worker=max(1, min(threads, len(first))),
            memory_limit=memory_limit))
        try:
            runner = Runner(trial, cluster, RunOptions(), metrics=Metrics(),
                            source=ListSource(first))
            summary = await runner.run()
        finally:
            await cluster.close()
        report = TrialReport(len(first), summary.ok, summary.failed,
                             time.perf_counter() - started)
        out = trial.output_dir
        for name, path in _datasets(out):
            schema = ds.dataset(path, format="parquet").schema
            report.datasets[name] = [(f.name, str(f.type)) for f in schema]
        report.failures = _failures(out / "params", job.param_names)
        return report
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _datasets(out: Path) -> Iterator[tuple[str, Path]]:
    # Not params/: its columns are tidegate's own, the same for every job.
    for kind in ("model_outputs", "targets"):
        for path in sorted((out / kind).glob("*")) if (out / kind).is_dir() else []:
            if path.is_dir() and any(path.glob("*.parquet")):
                yield f"{kind}/{path.name}", path


def _failures(params_dir: Path, names: list[str]) -> list[TrialFailure]:
    if not params_dir.is_dir():
        return []
    table = ds.dataset(params_dir, format="parquet").to_table(
        filter=ds.field("status") == "failed")
    rows = table.slice(0, SHOWN_FAILURES).to_pylist() if isinstance(table, pa.Table) else []
    return [TrialFailure({n: r.get(f"param_{n}") for n in names},
                         str(r.get("error_type") or ""), str(r.get("error") or ""))
            for r in rows]


def random_points(search: SearchSpec, names: list[str], n: int, seed: int) -> list[Param]:
    """``n`` points of the search's space drawn by Optuna's random sampler, in memory,
    with the param ids the search would give trials 0..n-1."""
    import optuna

    from tidegate.search import distributions, trial_param_id

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=search.seed or seed))
    dists = distributions(search)
    points = []
    for _ in range(n):
        t = study.ask(dists)
        values = {name: t.params[name] for name in names}
        points.append(Param(trial_param_id(t.number, values), values))
    return points
