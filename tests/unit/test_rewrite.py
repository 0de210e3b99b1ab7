"""The part rewrite behind --retry-failed (commit.rewrite_part): real Parquet and real
SQLite, and a real crash (the process exits at once, mid-protocol) at each of its steps,
then a resume: every param once in every dataset."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from tests.conftest import synthetic_spec, write_spec
from tidegate.commit import Commit, rewrite_part
from tidegate.knobs import FlushPolicy
from tidegate.simreturn import SimReturn, TargetResult, TaskError, table_to_ipc
from tidegate.spec import Job, load_job
from tidegate.states import JobState
from tidegate.store import Ledger
from tidegate.verify import check_parts
from tidegate.writer import LEDGER

POLICY = FlushPolicy(params=1000, nbytes=1 << 30, seconds=3600)
N = 6
OK = (0, 2, 5)  # the others fail: 1 with one ok replicate (its rows are written), 3 and 4
FAILED = (1, 3, 4)


def _sim(pid: str, rep: int, error: TaskError | None = None) -> SimReturn:
    if error is not None:
        return SimReturn(pid, rep, 100 + rep, {}, error)
    table = pa.table({"x": pa.array([float(rep), 10.0 + rep])})
    return SimReturn(pid, rep, 100 + rep, {"data": table_to_ipc(table)})


def _job(tmp_path: Path) -> Job:
    spec = synthetic_spec(N, replicates=2)
    return load_job(write_spec(tmp_path / "job.yaml", spec))


def _record(c: Commit, job: Job, i: int) -> None:
    p = list(job.params)[i]
    pid = p.param_id
    boom = TaskError("RuntimeError", "model bug")
    if i == 1:  # replicate 0 ran, replicate 1 raised: the param failed, rep 0's rows kept
        sims, error, targets = [_sim(pid, 0), _sim(pid, 1, boom)], boom, []
    elif i in FAILED:
        sims, error, targets = [_sim(pid, 0, boom), _sim(pid, 1, boom)], boom, []
    else:
        sims, error = [_sim(pid, 0), _sim(pid, 1)], None
        targets = [TargetResult(pid, "score", float(i), {"i": i}, None, ())]
    c.record(pid, p.values, job.seeds(pid), error, sims, targets)


def _build(job: Job) -> None:
    """Three parts: part 0 holds ok, failed (with rows), ok; part 1 only failed params;
    part 2 one ok param."""
    c = Commit(job, POLICY)
    c.resume(0)
    for group in ((0, 1, 2), (3, 4), (5,)):
        for i in group:
            _record(c, job, i)
        c.flush()
    c.close(JobState.SUCCEEDED)


def _ids(job: Job, which: tuple[int, ...]) -> set[str]:
    params = list(job.params)
    return {params[i].param_id for i in which}


def _rows(out: Path, dataset: str) -> list[dict[str, Any]]:
    return ds.dataset(out / dataset, format="parquet").to_table().to_pylist()


def _dump(out: Path) -> dict[str, list[dict[str, Any]]]:
    return {name: sorted(_rows(out, name), key=repr)
            for name in ("params", "model_outputs/data", "targets/score")}


def _check_once(job: Job) -> dict[str, list[dict[str, Any]]]:
    """Every param once in params/ (as the ledger has them), every (param, replicate)
    once in model_outputs/, every param at most once in targets/, nothing of a param
    params/ lacks, no damage, no temporaries; returns the datasets' rows."""
    out = job.output_dir
    data = _dump(out)
    ids = [r["param_id"] for r in data["params"]]
    assert len(ids) == len(set(ids))
    with Ledger(out / LEDGER) as ledger:
        assert set(ids) == ledger.committed_param_ids()
        assert check_parts(out, ledger, full=True) == []
        assert ledger.intents() == []
        recorded = ledger.files()
    pairs = Counter((r["param_id"], r["replicate"]) for r in data["model_outputs/data"])
    assert all(n == 2 for n in pairs.values())  # two rows per replicate, no more
    assert {pid for pid, _ in pairs} <= set(ids)
    scored = [r["param_id"] for r in data["targets/score"]]
    assert len(scored) == len(set(scored)) and set(scored) <= set(ids)
    on_disk = {p.relative_to(out).as_posix() for p in out.rglob("part-*.parquet")}
    assert on_disk == recorded
    assert not list(out.rglob(".part-*"))
    return data


def _ok_only(data: dict[str, list[dict[str, Any]]], ok: set[str]) -> dict[str, list[Any]]:
    return {name: [r for r in rows if r["param_id"] in ok] for name, rows in data.items()}


def test_rewrite_drops_the_params_everywhere_and_keeps_the_rest(tmp_path: Path) -> None:
    """A part rewritten without one param: under a new part number, the old files gone,
    the param in no dataset (its ok replicate's rows neither), every other row as it was;
    a part left with no param is only forgotten."""
    job = _job(tmp_path)
    _build(job)
    out = job.output_dir
    before = _check_once(job)
    with Ledger(out / LEDGER) as ledger:
        one = rewrite_part(out, ledger, 0, _ids(job, (1,)))
        assert (one.old, one.new, one.kept, one.dropped) == (0, 3, 2, 1)
        gone = rewrite_part(out, ledger, 1, _ids(job, (3, 4)))
        assert (gone.new, gone.kept, gone.dropped) == (None, 0, 2)
        assert [cp.part for cp in ledger.parts()] == [2, 3]
    assert not list(out.rglob("part-000000.parquet"))
    assert not list(out.rglob("part-000001.parquet"))
    after = _check_once(job)
    assert {r["param_id"] for r in after["params"]} == _ids(job, OK)
    assert after == _ok_only(before, _ids(job, OK))
    # Nothing of part 0's target file was dropped, but the schema stays with an empty file
    # too: the model output's new version of a part whose only rows are dropped.
    assert ds.dataset(out / "model_outputs" / "data").schema.field("x").type == pa.float64()


def test_retry_with_commit_reruns_exactly_the_failed(tmp_path: Path) -> None:
    """Commit(retry_failed=True): the failed params are no longer committed (the run
    computes them), the ok ones are; recording them again writes each once."""
    job = _job(tmp_path)
    _build(job)
    c = Commit(job, POLICY, retry_failed=True)
    resumed = c.resume(0)
    assert resumed.retried == 3
    assert resumed.committed == _ids(job, OK)
    assert (resumed.ok, resumed.failed) == (3, 0)
    params = list(job.params)
    for i in FAILED:  # the fixed model: every replicate ok
        p = params[i]
        c.record(p.param_id, p.values, job.seeds(p.param_id), None,
                 [_sim(p.param_id, 0), _sim(p.param_id, 1)],
                 [TargetResult(p.param_id, "score", float(i), {}, None, ())])
    closed = c.close(JobState.SUCCEEDED)
    assert (closed.ok, closed.failed) == (N, 0)
    data = _check_once(job)
    assert len(data["params"]) == N and len(data["targets/score"]) == N
    assert len(data["model_outputs/data"]) == N * 2 * 2


_CRASHER = textwrap.dedent('''
    import os, sys
    from pathlib import Path
    import tidegate.commit as commit
    from tidegate.knobs import FlushPolicy
    from tidegate.spec import load_job
    from tidegate.states import JobState

    spec, at, nth = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    seen = []
    def step(name):
        if name == at:
            seen.append(name)
            if len(seen) == nth:
                os._exit(9)  # no cleanup, no flush: as a kill -9
    real = commit.retry_failed
    commit.retry_failed = lambda root, ledger: real(root, ledger, step=step)
    c = commit.Commit(load_job(spec), FlushPolicy(1000, 1 << 30, 3600), retry_failed=True)
    c.resume(0)
    c.close(JobState.INTERRUPTED)
    sys.exit(3)  # the step was never reached
''')


@pytest.mark.parametrize(("step", "nth"), [
    ("staged", 1),      # new files under hidden names, no intent: debris
    ("intent", 1),      # intent recorded, nothing renamed: rolled back
    ("published", 1),   # renamed into place, before the transaction: rolled forward
    ("committed", 1),   # after the transaction, before the old files' removal
    ("removing", 1),    # one old file removed, the others not yet
    ("removed", 1),     # part 0 done, part 1 not begun
    ("committed", 2),   # part 1 (no param left) forgotten, its files still there
])
@pytest.mark.parametrize("then", ["resume", "retry"])
def test_a_crash_at_each_step_resumes_each_param_once(tmp_path: Path, step: str, nth: int,
                                                      then: str) -> None:
    """The retry's process dies at a step of a part's rewrite; a resume (plain, or
    retrying again) leaves every param exactly once in every dataset, the ok params' rows
    exactly as they were, and each failed param either still failed or gone (retried)."""
    job = _job(tmp_path)
    _build(job)
    before = _check_once(job)
    crash = subprocess.run([sys.executable, "-c", _CRASHER, str(tmp_path / "job.yaml"), step,
                            str(nth)], capture_output=True, text=True, timeout=120, check=False)
    assert crash.returncode == 9, crash.stderr
    c = Commit(job, POLICY, retry_failed=then == "retry")
    resumed = c.resume(0)
    c.close(JobState.INTERRUPTED)
    after = _check_once(job)
    ok, failed = _ids(job, OK), _ids(job, FAILED)
    assert _ok_only(after, ok) == _ok_only(before, ok)
    left = {r["param_id"] for r in after["params"]} - ok
    assert left <= failed
    if then == "retry":
        assert left == set() and resumed.committed == ok
    elif step == "removed" or (step, nth) == ("committed", 2):
        assert left == _ids(job, (3, 4)) if step == "removed" else left == set()
    elif step in ("committed", "removing", "published"):
        assert left == _ids(job, (3, 4))  # part 0's swap done (forward), part 1 untouched
    else:
        assert left == failed  # rolled back: as before the retry
