"""The resume watermark: how far a source's leading params are all committed, recorded in
each part's commit (real SQLite, real Parquet), so that a resume starts its walk there
without making the ids of the params it skips, and still yields each other param once
and names the same orphans."""

from __future__ import annotations

import itertools
import random
import sqlite3
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import read_dataset, synthetic_spec, write_spec
from tidegate.commit import Commit, prune_orphans, retry_failed
from tidegate.knobs import FlushPolicy
from tidegate.params import GridSource, ListSource, Pending
from tidegate.simreturn import TaskError
from tidegate.spec import Job, load_job
from tidegate.states import JobState
from tidegate.store import Ledger
from tidegate.writer import LEDGER


def _grid(*sizes: int) -> GridSource:
    return GridSource([f"c{k}" for k in range(len(sizes))],
                      [list(range(n)) for n in sizes])


# --- the source ----------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [(7,), (3, 4), (2, 3, 5), (1, 6, 1)])
def test_a_grid_walked_from_a_position_is_the_rest_of_its_walk(sizes: tuple[int, ...]) -> None:
    grid = _grid(*sizes)
    every = list(grid)
    for start in range(len(every) + 2):
        assert list(grid.iter_from(start)) == every[start:]
    assert list(grid.typed_ids().iter_from(2)) == list(grid.typed_ids())[2:]


def test_a_grids_digest_names_its_order_and_its_values_types() -> None:
    """One digest for the same columns; another for another order, a value's type (1 and
    1.0 are one id but not one column), another value, or the typed ids."""
    base = GridSource(["a", "b"], [[1, 2], ["x", "y"]])
    assert base.digest == GridSource(["a", "b"], [[1, 2], ["x", "y"]]).digest
    others = [
        GridSource(["b", "a"], [["x", "y"], [1, 2]]),
        GridSource(["a", "b"], [[2, 1], ["x", "y"]]),
        GridSource(["a", "b"], [[1.0, 2], ["x", "y"]]),
        GridSource(["a", "b"], [[1, 2, 3], ["x", "y"]]),
        base.typed_ids(),
    ]
    digests = {base.digest, *(o.digest for o in others)}
    assert len(digests) == len(others) + 1 and None not in digests
    assert ListSource([]).digest is None


# --- the walk ------------------------------------------------------------------------------


def _walk(source: GridSource, committed: set[str], start: int, *, chunk: int = 5
          ) -> tuple[list[str], Pending]:
    pending = Pending(source, committed, start=start, chunk=chunk, track=True)
    return [p.param_id for p in pending], pending


def test_a_walk_from_the_watermark_yields_what_a_whole_walk_does() -> None:
    """Skipping a committed prefix changes neither what is yielded nor the orphans; the
    skipped params count as met."""
    source = _grid(40)
    every = [p.param_id for p in source]
    committed = set(every[:12]) | {every[20], every[33]}
    whole, from_zero = _walk(source, committed, 0)
    skipped, from_mark = _walk(source, committed, 12)
    assert skipped == whole == [i for i in every if i not in committed]
    assert from_mark.met == from_zero.met == len(committed)
    assert from_mark.orphans() == from_zero.orphans() == set()
    gone = {"0123456789abcdef"}
    _, from_zero = _walk(source, committed | gone, 0)
    _, from_mark = _walk(source, committed | gone, 12)
    assert from_mark.orphans() == from_zero.orphans() == gone


def test_orphans_are_found_from_sqlite_after_a_skipped_prefix(tmp_path: Path) -> None:
    source = _grid(30)
    every = [p.param_id for p in source]
    with Ledger(tmp_path / LEDGER) as ledger:
        ledger.bind("j", "f", {"model": "m"})
        ledger.commit(0, ["params/part-000000.parquet"],
                      [(i, "ok") for i in [*every[:10], "0123456789abcdef"]], 1)
        ids = ledger.committed_ids(in_memory=0)
        pending = Pending(source, ids, start=10)
        assert [p.param_id for p in pending] == every[10:]
        assert pending.orphans() == {"0123456789abcdef"}


def test_a_walk_cannot_start_inside_a_plain_iterable() -> None:
    with pytest.raises(ValueError, match="cannot start a walk"):
        Pending(iter([]), set(), start=3)


@settings(max_examples=200, deadline=None)
@given(n=st.integers(1, 60), done_before=st.sets(st.integers(0, 59)),
       seed=st.integers(0, 2**32 - 1), chunk=st.integers(1, 9))
def test_done_reports_the_longest_committed_prefix(n: int, done_before: set[int], seed: int,
                                                   chunk: int) -> None:
    """Params committed before the run and the run's own, committed a random few at a
    time in any order, with reads interleaved: after each part, ``done`` is exactly the
    length of the source's prefix whose params are all committed, read or not."""
    rng = random.Random(seed)
    source = _grid(n)
    every = [p.param_id for p in source]
    committed = {every[k] for k in done_before if k < n}
    pending = Pending(source, set(committed), chunk=chunk, track=True)
    out: list[str] = []  # yielded, not yet committed
    while True:
        out += [p.param_id for p in itertools.islice(pending, rng.randint(0, 4))]
        if not out and pending.exhausted:
            break
        rng.shuffle(out)
        k = rng.randint(0, len(out))
        part, out = out[:k], out[k:]
        if out and rng.random() < 0.05:  # dropped at a stop: never committed by this run
            out.pop()
        committed |= set(part)
        got = pending.done(part)
        prefix = next((k for k, i in enumerate(every) if i not in committed), n)
        # Past what the walk has read, nothing is known to be committed.
        assert got == min(prefix, pending.read)


def test_done_without_tracking_is_refused() -> None:
    with pytest.raises(RuntimeError, match="track"):
        Pending(_grid(3), set()).done([])


# --- the ledger ----------------------------------------------------------------------------


def _ledger_with_two_parts(tmp_path: Path) -> Ledger:
    ledger = Ledger(tmp_path / LEDGER)
    ledger.bind("j", "f", {"model": "m"})
    ledger.commit(0, ["params/part-000000.parquet"], [("a", "ok"), ("b", "failed")], 1,
                  watermark=("grid-1", 2))
    ledger.commit(1, ["params/part-000001.parquet"], [("c", "ok")], 1,
                  watermark=("grid-1", 3))
    return ledger


def test_a_watermark_is_committed_with_its_part_and_only_the_last_digest_kept(
        tmp_path: Path) -> None:
    with _ledger_with_two_parts(tmp_path) as ledger:
        assert ledger.watermark("grid-1") == 3 and ledger.watermark("grid-2") == 0
        ledger.commit(2, ["params/part-000002.parquet"], [("d", "ok")], 1,
                      watermark=("grid-2", 1))
        assert ledger.watermark("grid-2") == 1 and ledger.watermark("grid-1") == 0
        ledger.commit(3, ["params/part-000003.parquet"], [("e", "ok")], 1)
        assert ledger.watermark("grid-2") == 1  # a part without one leaves it
        with pytest.raises(sqlite3.IntegrityError):  # "a" again: the transaction rolls back
            ledger.commit(4, ["params/part-000004.parquet"], [("a", "ok")], 1,
                          watermark=("grid-2", 9))
        assert ledger.watermark("grid-2") == 1


@pytest.mark.parametrize("how", ["uncommit", "replace", "delete", "update"])
def test_any_params_row_removed_or_changed_forgets_every_watermark(tmp_path: Path,
                                                                   how: str) -> None:
    """A watermark is never ahead of the committed rows: a repair's un-commit, a retry's or
    prune's rewrite, or a row deleted or changed by hand forgets it."""
    with _ledger_with_two_parts(tmp_path) as ledger:
        if how == "uncommit":
            ledger.uncommit([1])
        elif how == "replace":
            ledger.commit(5, ["params/part-000005.parquet"], [("a", "ok")], 1, replaces=0)
        else:
            with sqlite3.connect(tmp_path / LEDGER) as db:
                db.execute("DELETE FROM params WHERE param_id = 'c'" if how == "delete"
                           else "UPDATE params SET status = 'ok' WHERE param_id = 'b'")
        assert ledger.watermark("grid-1") == 0


# --- a job's commits ---------------------------------------------------------------------


def _job(tmp_path: Path, n: int) -> Job:
    grid = {"k": list(range(n)), "output_bytes": [16]}
    return load_job(write_spec(tmp_path / "job.yaml", synthetic_spec(
        n, targets=[], replicates=1, parameters={"grid": grid})))


def _commit(job: Job) -> Commit:
    return Commit(job, FlushPolicy(params=1000, nbytes=1 << 30, seconds=3600))


def _run(job: Job, order: list[int], parts: list[int]) -> Pending:
    """One run: walk the job's params from its watermark, record those at ``order``'s
    positions (of the walk), flushing after the counts in ``parts``; interrupted."""
    commit = _commit(job)
    resumed = commit.resume(0)
    source = job.params
    pending = Pending(source, resumed.committed, start=commit.watermark(source.digest),
                      track=True)
    assert source.digest is not None
    commit.track_watermark(source.digest, pending.done)
    walked = list(itertools.islice(pending, max(order, default=-1) + 1))
    cuts = set(itertools.accumulate(parts))
    for k, i in enumerate(order, 1):
        p = walked[i]
        commit.record(p.param_id, p.values, job.seeds(p.param_id), None)
        if k in cuts:
            commit.flush()
    commit.close(JobState.INTERRUPTED)
    return pending


def _watermark(job: Job) -> int:
    with Ledger(job.output_dir / LEDGER) as ledger:
        return ledger.watermark(job.params.digest or "")


def test_parts_committed_out_of_order_advance_the_watermark_to_the_first_gap(
        tmp_path: Path) -> None:
    """Params 0-9 read, 0-4 and 6-8 committed: the watermark is 5; the resume starts there
    and yields 5, 9 and the rest, each once, and the output holds every param once."""
    job = _job(tmp_path, 16)
    assert job.params.digest is not None
    _run(job, [3, 0, 8, 1, 2, 7, 4, 6], parts=[2, 3, 3])
    assert _watermark(job) == 5
    every = [p.param_id for p in job.params]
    pending = _run(job, list(range(16 - 8)), parts=[8])
    assert pending.start == 5
    assert _watermark(job) == 16
    rows = [r["param_id"] for r in read_dataset(job.output_dir / "params")]
    assert sorted(rows) == sorted(every) and len(set(rows)) == 16


def test_a_retry_forgets_the_watermark_and_the_resume_walks_from_the_start(
        tmp_path: Path) -> None:
    job = _job(tmp_path, 6)
    commit = _commit(job)
    resumed = commit.resume(0)
    pending = Pending(job.params, resumed.committed, track=True)
    commit.track_watermark(job.params.digest or "", pending.done)
    for k, p in enumerate(itertools.islice(pending, 4)):
        error = TaskError("ValueError", "boom", "tb") if k == 1 else None
        commit.record(p.param_id, p.values, job.seeds(p.param_id), error)
    commit.close(JobState.COMPLETED_WITH_FAILURES)
    assert _watermark(job) == 4
    with Ledger(job.output_dir / LEDGER) as ledger:
        assert retry_failed(job.output_dir, ledger).params == 1
        assert ledger.watermark(job.params.digest or "") == 0
        kept = ledger.committed_param_ids()
    again = Pending(job.params, kept, start=0, track=True)
    assert [p.param_id for p in again] == [p.param_id for k, p in enumerate(job.params)
                                           if p.param_id not in kept]


def test_a_prune_forgets_the_watermark(tmp_path: Path) -> None:
    job = _job(tmp_path, 4)
    _run(job, [0, 1, 2], parts=[3])
    assert _watermark(job) == 3
    first = next(iter(job.params)).param_id
    with Ledger(job.output_dir / LEDGER) as ledger:
        assert prune_orphans(job.output_dir, ledger, {first}).params == 1
        assert ledger.watermark(job.params.digest or "") == 0


