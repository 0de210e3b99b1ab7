"""A large ledger answers "committed?" from SQLite a chunk at a time (real SQLite): the
walk of a resume skips the same params, and finds the same orphans, as with a set."""

from __future__ import annotations

import itertools
from pathlib import Path

from tidegate.params import GridSource, Pending
from tidegate.store import Ledger, LedgerIds
from tidegate.writer import LEDGER


def _grid(n: int) -> GridSource:
    return GridSource(["i"], [list(range(n))])


def _ledger(path: Path, source: GridSource, committed: list[int], gone: list[str]) -> Ledger:
    """A ledger holding the params of ``source`` at positions ``committed``, and the ids
    ``gone`` (params since removed from the spec), in parts of 7."""
    params = list(source)
    ids = [params[i].param_id for i in committed] + gone
    ledger = Ledger(path / LEDGER)
    ledger.bind("j", "f", {"model": "m"})
    for part, start in enumerate(range(0, len(ids), 7)):
        chunk = ids[start:start + 7]
        ledger.commit(part, [f"params/part-{part:06d}.parquet"],
                      [(pid, "ok" if k % 3 else "failed") for k, pid in enumerate(chunk)], 1)
    return ledger


def test_ledger_ids_walk_as_a_set_does(tmp_path: Path) -> None:
    """Every committed param skipped, every other one yielded in order, the orphans
    named once the walk is over: the same from SQLite as from a Python set."""
    source = _grid(2000)
    committed = [*range(0, 2000, 3), 1999]
    gone = ["0123456789abcdef", "fedcba9876543210"]
    with _ledger(tmp_path, source, committed, gone) as ledger:
        ids = ledger.committed_ids(in_memory=10)
        assert isinstance(ids, LedgerIds)
        small = ledger.committed_ids()
        assert isinstance(small, frozenset) and ids == small  # a Set either way
        assert len(ids) == len(committed) + len(gone)
        from_sql, from_set = Pending(source, ids), Pending(source, small)
        assert from_sql.orphans() is None  # not walked yet: unknown
        walked = [p.param_id for p in from_sql]
        assert walked == [p.param_id for p in from_set]
        done = set(committed)
        assert walked == [p.param_id for k, p in enumerate(source) if k not in done]
        assert from_sql.met == len(committed)
        assert from_sql.orphans() == from_set.orphans() == set(gone)


def test_ledger_ids_are_those_before_the_run(tmp_path: Path) -> None:
    """A part committed after the look-up began is not among its ids (a run's own
    commits are not orphans), and a walk that met every committed id has none."""
    source = _grid(100)
    with _ledger(tmp_path, source, list(range(40)), []) as ledger:
        ids = ledger.committed_ids(in_memory=0)
        walk = Pending(source, ids)
        first = list(itertools.islice(walk, 10))
        assert [p.values["i"] for p in first] == list(range(40, 50))
        ledger.commit(99, ["params/part-000099.parquet"],
                      [(p.param_id, "ok") for p in first], 1)
        rest = list(walk)
        assert len(rest) == 50 and len(ids) == 40
        assert first[0].param_id not in ids and next(iter(source)).param_id in ids
        assert walk.orphans() == set()
