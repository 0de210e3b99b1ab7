"""The prune behind --prune (commit.prune_orphans, Commit.prune): the committed params a
shrunk spec no longer has are dropped from every dataset by part rewrites; real Parquet,
real SQLite, and a real crash (the process exits at once) at each step of a rewrite,
then a resume, plain or pruning again."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import synthetic_spec, write_spec
from tests.unit.test_rewrite import (
    FAILED,
    OK,
    POLICY,
    N,
    _build,
    _check_once,
    _ids,
    _job,
    _ok_only,
    _record,
)
from tidegate.commit import Commit
from tidegate.spec import Job, load_job
from tidegate.states import JobState

# The params the shrunk spec drops: 1 shares part 0 with two kept ones (rewritten), 3 and
# 4 are the whole of part 1 (only forgotten).
GONE = FAILED
KEPT = OK


def _shrunk(tmp_path: Path) -> Job:
    """The same job with params 1, 3 and 4 removed from its values."""
    spec = synthetic_spec(N, replicates=2)
    spec["parameters"]["values"] = [v for i, v in enumerate(spec["parameters"]["values"])
                                    if i not in GONE]
    return load_job(write_spec(tmp_path / "shrunk.yaml", spec))


def _orphans(job: Job, committed: frozenset[str]) -> set[str]:
    return set(committed) - {p.param_id for p in job.params}


def test_prune_drops_the_orphans_everywhere_and_keeps_the_rest(tmp_path: Path) -> None:
    """Commit.prune of the shrunk job's orphans: they are in no dataset and no longer in
    the ledger, the kept params' rows are as they were, part 0 is rewritten and part 1
    only forgotten; ids not committed are ignored, so a second prune does nothing."""
    full = _job(tmp_path)
    _build(full)
    before = _check_once(full)
    job = _shrunk(tmp_path)
    c = Commit(job, POLICY)
    resumed = c.resume(0)
    orphans = _orphans(job, resumed.committed)
    assert orphans == _ids(full, GONE)
    seen: list[int] = []
    pruned = c.prune(orphans, done=lambda r: seen.append(r.dropped))
    assert pruned.params == 3 and seen == [1, 2]
    assert [(r.old, r.new, r.kept) for r in pruned.parts] == [(0, 3, 2), (1, None, 0)]
    assert c.prune(orphans).params == 0
    closed = c.close(JobState.SUCCEEDED)
    assert (closed.ok, closed.failed, closed.parts) == (len(KEPT), 0, 2)
    after = _check_once(full)
    assert {r["param_id"] for r in after["params"]} == _ids(full, KEPT)
    assert after == _ok_only(before, _ids(full, KEPT))


def test_prune_commits_the_buffered_params_first(tmp_path: Path) -> None:
    """A param recorded (buffered, not yet written) before the prune is committed first,
    under its own part number, and kept: the rewrite takes the next number."""
    full = _job(tmp_path)
    c = Commit(full, POLICY)
    c.resume(0)
    for i in range(N):
        _record(c, full, i)
        if i in (2, 4):
            c.flush()
    assert c.pending_params == 1  # param 5 is only buffered
    pruned = c.prune(_ids(full, (0, 4)))
    assert pruned.params == 2
    assert [(r.old, r.new) for r in pruned.parts] == [(0, 3), (1, 4)]
    c.close(JobState.SUCCEEDED)
    data = _check_once(full)
    assert {r["param_id"] for r in data["params"]} == _ids(full, (1, 2, 3, 5))


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
    real = commit.prune_orphans
    commit.prune_orphans = lambda root, ledger, ids, done=None: real(
        root, ledger, ids, done=done, step=step)
    job = load_job(spec)
    c = commit.Commit(job, FlushPolicy(1000, 1 << 30, 3600))
    resumed = c.resume(0)
    c.prune(set(resumed.committed) - {p.param_id for p in job.params})
    c.close(JobState.SUCCEEDED)
    sys.exit(3)  # the step was never reached
''')


@pytest.mark.parametrize(("step", "nth"), [
    ("staged", 1),      # part 0's new files under hidden names, no intent: debris
    ("intent", 1),      # intent recorded, nothing renamed: rolled back
    ("published", 1),   # renamed into place, before the transaction: rolled forward
    ("committed", 1),   # after the transaction, before the old files' removal
    ("removing", 1),    # one old file removed, the others not yet
    ("removed", 1),     # part 0 done, part 1 not begun
    ("committed", 2),   # part 1 (no param left) forgotten, its files still there
])
@pytest.mark.parametrize("then", ["resume", "prune"])
def test_a_crash_at_each_step_leaves_each_param_at_most_once(tmp_path: Path, step: str,
                                                            nth: int, then: str) -> None:
    """The prune's process dies at a step of a part's rewrite; a resume leaves every
    param once in every dataset (nothing damaged, no temporary), the kept params' rows
    exactly as they were and the orphans either still there or gone; a resume that
    prunes again leaves none of them."""
    full = _job(tmp_path)
    _build(full)
    before = _check_once(full)
    job = _shrunk(tmp_path)
    crash = subprocess.run([sys.executable, "-c", _CRASHER, str(tmp_path / "shrunk.yaml"),
                            step, str(nth)], capture_output=True, text=True, timeout=120,
                           check=False)
    assert crash.returncode == 9, crash.stderr
    c = Commit(job, POLICY)
    resumed = c.resume(0)
    if then == "prune":
        c.prune(_orphans(job, resumed.committed))
    c.close(JobState.SUCCEEDED)
    after = _check_once(full)
    kept, gone = _ids(full, KEPT), _ids(full, GONE)
    assert _ok_only(after, kept) == _ok_only(before, kept)
    left = {r["param_id"] for r in after["params"]} - kept
    if then == "prune" or (step, nth) == ("committed", 2):
        assert left == set()
    elif step in ("published", "committed", "removing", "removed"):
        assert left == _ids(full, (3, 4))  # part 0's swap done (forward), part 1 untouched
    else:
        assert left == gone  # rolled back: as before the prune
