"""The same tasks for every strategy: a tidegate Job for the runner, and the equivalent
sim and agg submissions (tidegate.simreturn.run_sim / run_target) for the plain-Dask
strategies, plus the Parquet sink those strategies write to."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from distributed import Client, Future

from bench.scenarios import MODEL, TARGET, Workload
from tidegate.simreturn import SimReturn, TargetResult, run_sim, run_target
from tidegate.spec import Job, job_from_dict


def key_tag(tag: str) -> str:
    """``tag`` as tidegate spells a job id inside task keys."""
    return re.sub(r"[^A-Za-z0-9._]", "_", tag)


def build_job(workload: Workload, tag: str, output: Path, *, fuse: bool = True) -> Job:
    spec = {
        "job_id": tag,
        "model": MODEL,
        "code_paths": [],
        "parameters": workload.parameters(),
        "replicates": workload.replicates,
        "seed": workload.seed,
        "targets": [{"name": TARGET[0], "function": TARGET[1]}] if workload.targets else [],
        "outputs": workload.outputs,
        "batch": {"fuse": fuse},
    }
    return job_from_dict(spec, base_dir=output, output=output)


@dataclass(slots=True)
class Submitted:
    """One param's futures, as a plain-Dask runner holds them."""

    index: int
    sims: list[Future]
    aggs: list[Future]

    @property
    def watch(self) -> list[Future]:
        return self.aggs or self.sims

    def to_gather(self, outputs: bool) -> list[Future]:
        return self.aggs + (self.sims if outputs else [])


class Tasks:
    """Submits a job's params to a Client with plain ``Client.map`` calls."""

    def __init__(self, client: Client, job: Job):
        self.client = client
        self.job = job
        self.all_params = list(job.params)  # a benchmark's jobs are small; indexed by position
        self.tag = key_tag(job.job_id)
        self.outputs = job.spec.outputs != "none"
        self.targets = bool(job.spec.targets)

    def submit(self, indices: list[int]) -> list[Submitted]:
        job, reps = self.job, self.job.spec.replicates
        params = [self.all_params[i] for i in indices]
        seeds = [job.seeds(p.param_id) for p in params]
        sims = self.client.map(
            run_sim,
            [MODEL] * len(params) * reps,
            [p.values for p in params for _ in range(reps)],
            [p.param_id for p in params for _ in range(reps)],
            [r for _ in params for r in range(reps)],
            [s for ss in seeds for s in ss],
            key=[f"sim-{self.tag}-{p.param_id}-{r}" for p in params for r in range(reps)],
            pure=False,
        )
        by_param = [sims[n * reps : (n + 1) * reps] for n in range(len(params))]
        del sims
        aggs: list[Future] = []
        if self.targets:
            name, function = TARGET
            # One iterable per replicate: map calls run_target(fn, name, pid, *sims).
            aggs = self.client.map(
                run_target,
                [function] * len(params),
                [name] * len(params),
                [p.param_id for p in params],
                *[[s[r] for s in by_param] for r in range(reps)],
                key=[f"agg-{self.tag}-{p.param_id}-{name}" for p in params],
                pure=False,
            )
        return [
            Submitted(i, s, aggs[n : n + 1]) for n, (i, s) in enumerate(zip(indices, by_param,
                                                                             strict=True))
        ]


class ParquetSink:
    """Buffers gathered results and writes them as Parquet parts, the way tidegate lays
    them out (params, model_outputs/<name>, targets/<name>), without its durability
    steps (no fsync, no ledger)."""

    def __init__(self, root: Path):
        self.root = root
        self.part = 0
        self._params: list[tuple[str, str]] = []
        self._outputs: dict[str, list[pa.Table]] = {}
        self._targets: list[tuple[str, float | None]] = []
        self.ok = 0
        self.failed = 0

    @property
    def pending(self) -> int:
        return len(self._params)

    def add(self, results: list[Any]) -> None:
        """The gathered results of whole params (sims and/or target results)."""
        by_param: dict[str, bool] = {}
        for r in results:
            if isinstance(r, SimReturn):
                by_param[r.param_id] = by_param.get(r.param_id, True) and r.error is None
                for name, data in r.outputs.items():
                    self._outputs.setdefault(name, []).append(_with_ids(data, r))
            elif isinstance(r, TargetResult):
                by_param[r.param_id] = by_param.get(r.param_id, True) and r.error is None
                self._targets.append((r.param_id, r.loss))
        for pid, ok in by_param.items():
            self._params.append((pid, "ok" if ok else "failed"))
            self.ok += ok
            self.failed += not ok

    def flush(self) -> None:
        if not self._params:
            return
        name = f"part-{self.part:06d}.parquet"
        ids, status = zip(*self._params, strict=True)
        _write(pa.table({"param_id": list(ids), "status": list(status)}),
               self.root / "params" / name)
        for out, tables in self._outputs.items():
            _write(pa.concat_tables(tables), self.root / "model_outputs" / out / name)
        if self._targets:
            pids, losses = zip(*self._targets, strict=True)
            _write(pa.table({"param_id": list(pids), "loss": pa.array(losses, pa.float64())}),
                   self.root / "targets" / TARGET[0] / name)
        self._params, self._outputs, self._targets = [], {}, []
        self.part += 1


def _with_ids(data: bytes, sim: SimReturn) -> pa.Table:
    with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
        table = reader.read_all()
    n = table.num_rows
    return (
        table.append_column("param_id", pa.array([sim.param_id] * n, pa.string()))
        .append_column("replicate", pa.array([sim.replicate] * n, pa.int64()))
        .append_column("seed", pa.array([sim.seed] * n, pa.int64()))
    )


def _write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path)
