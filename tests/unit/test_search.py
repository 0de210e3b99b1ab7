"""A search's study against its ledger: SearchSource driven by hand over a real Optuna
journal in a temporary directory, the ledger's side played by a dict of committed
outcomes; plus the helpers' rules and parameters.search's validation."""

from __future__ import annotations

import asyncio
import itertools
import json
import math
from pathlib import Path
from typing import Any

import pytest
import yaml
from optuna.trial import TrialState

from tests.conftest import tidegate
from tests.search_journal import finishing_ops, load_study, states, told_once, trials
from tidegate.cli import main
from tidegate.params import Param, Pending, Scalar
from tidegate.search import (
    JOURNAL,
    TPE_PARALLEL_MAX,
    TPE_STARTUP_TRIALS,
    Outcome,
    SearchShrunk,
    SearchSource,
    cut_torn_tail,
    default_parallel,
    sampler_seed,
    trial_numbers,
    trial_param_id,
)
from tidegate.spec import SearchSpec
from tidegate.writer import OWN_FILES, UnsafeOutput, check_own_files, discard_output

NAMES = ["x", "y"]
SPACE: dict[str, Any] = {"x": {"low": 0.0, "high": 1.0}, "y": {"low": -1.0, "high": 1.0}}


def search_spec(**changes: Any) -> SearchSpec:
    data: dict[str, Any] = {"space": SPACE, "objective": "fit", "trials": 10,
                            "sampler": "random", "seed": 3}
    data.update(changes)
    return SearchSpec.model_validate(data)


def quad(values: dict[str, Scalar]) -> float | None:
    """The synthetic truth: a bowl at (0.3, -0.2); the model fails where x > 0.85."""
    x, y = float(values.get("x", 0.0)), float(values.get("y", 0.0))
    return None if x > 0.85 else (x - 0.3) ** 2 + (y + 0.2) ** 2


class Book:
    """The ledger's side: the committed params, as Commit.outcomes reads them."""

    def __init__(self) -> None:
        self.rows: dict[str, Outcome] = {}
        self.asked_for: list[set[str]] = []

    def committed(self) -> frozenset[str]:
        return frozenset(self.rows)

    def outcomes(self, ids: set[str]) -> dict[str, Outcome]:
        self.asked_for.append(set(ids))
        return {pid: self.rows[pid] for pid in ids if pid in self.rows}


def opened(out: Path, book: Book, names: list[str] = NAMES, **changes: Any) -> SearchSource:
    source = SearchSource(search_spec(**changes), names, out, job_id="quad", job_seed=0)
    reopen(source, book)
    return source


def reopen(source: SearchSource, book: Book) -> None:
    asyncio.run(source.open(book.committed(), book.outcomes))


def take(source: SearchSource, book: Book, n: int) -> list[Param]:
    """The next ``n`` params the run loop would admit (committed ones skipped)."""
    return list(itertools.islice(Pending(source, book.committed()), n))


def run(source: SearchSource, book: Book, params: list[Param], *, tell: bool = True) -> None:
    """Judge and commit ``params``; ``tell=False``: killed after the ledger's commit and
    before the tells (Commit's on_commit never came)."""
    for p in params:
        loss = quad(p.values)
        source.completed(p.param_id, loss)
        book.rows[p.param_id] = Outcome(dict(p.values), loss is None, loss)
    if tell:
        source.committed([(p.param_id, "ok") for p in params])


# --- the helpers ------------------------------------------------------------------------


def test_trial_param_id_hashes_the_trial_number_with_the_values() -> None:
    values = {"x": 0.5, "y": 1}
    assert trial_param_id(3, values) == trial_param_id(3, {"y": 1, "x": 0.5})
    assert trial_param_id(3, values) != trial_param_id(4, values)  # a repeated point
    assert trial_param_id(3, values) != trial_param_id(3, {"x": 0.5, "y": 2})
    assert trial_param_id(3, {"x": 1.0}) == trial_param_id(3, {"x": 1})  # canonical
    assert trial_param_id(3, values, 1) not in {trial_param_id(3, values),
                                                trial_param_id(3, values, 2)}
    assert len(trial_param_id(0, values)) == 16


@pytest.mark.parametrize(("sampler", "trials", "dims", "expected"), [
    ("random", 500, 2, 500),  # no trial depends on another
    ("cmaes", 100, 2, 4 + int(3 * math.log(2))),  # a CMA-ES generation
    ("cmaes", 3, 2, 3),
    ("tpe", 5, 2, 5),
    ("tpe", 100, 2, TPE_STARTUP_TRIALS),  # the random start's trials at once
    ("tpe", 400, 2, 400 // 20),  # past it: a 20th of the budget
    ("tpe", 100_000, 2, TPE_PARALLEL_MAX),
])
def test_default_parallel(sampler: str, trials: int, dims: int, expected: int) -> None:
    space = {f"p{i}": {"low": 0.0, "high": 1.0} for i in range(dims)}
    assert default_parallel(search_spec(sampler=sampler, trials=trials, space=space)) == expected


def test_sampler_seed_is_the_spec_seed_first_then_one_per_resume_point() -> None:
    assert sampler_seed(7, 0, 0) == 7
    seeds = {sampler_seed(7, a, t) for a in range(1, 30) for t in range(a + 1)}
    assert len(seeds) == sum(range(2, 31))  # each (asked, told) a seed of its own
    assert sampler_seed(7, 5, 2) == sampler_seed(7, 5, 2) != sampler_seed(8, 5, 2)
    assert all(0 <= s < 2**32 for s in seeds)
    # A spec's seed may be any size; Optuna's samplers take 0 <= seed < 2**32.
    big = sampler_seed(2**70, 0, 0)
    assert 0 <= big < 2**32 and big == sampler_seed(2**70, 0, 0) != sampler_seed(2**71, 0, 0)


def test_cut_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / JOURNAL
    assert cut_torn_tail(path) == 0 and not path.exists()
    whole = b'{"op_code": 0}\n{"op_code": 4}\n'
    path.write_bytes(whole)
    assert cut_torn_tail(path) == 0 and path.read_bytes() == whole
    path.write_bytes(whole + b'{"op_code": 5, "tri')  # a kill mid-append
    assert cut_torn_tail(path) == len(b'{"op_code": 5, "tri')
    assert path.read_bytes() == whole
    # A garbage line (a write torn and then appended to) ends what can be replayed.
    path.write_bytes(whole + b'{"op_co\n{"op_code": 6}\n')
    assert cut_torn_tail(path) == len(b'{"op_co\n{"op_code": 6}\n')
    assert path.read_bytes() == whole
    path.write_bytes(b"[1, 2]\n" + whole)  # JSON, but not an operation
    assert cut_torn_tail(path) == len(whole) + 7 and path.read_bytes() == b""


# --- resume: the journal squared with the ledger -------------------------------------------


def test_a_search_runs_its_trials_and_tells_each_once(tmp_path: Path) -> None:
    book = Book()
    source = opened(tmp_path, book)
    asyncio.run(source.ask_ahead(4))
    assert source.asked == 4
    params = take(source, book, 100)
    assert len(params) == 10 and len({p.param_id for p in params}) == 10
    run(source, book, params[:6])
    run(source, book, params[6:])
    source.close()
    assert source.told == 10 and told_once(tmp_path / JOURNAL) == 10
    study = load_study(tmp_path / JOURNAL)
    by_id = {t.user_attrs["param_id"]: t for t in study.trials}
    for p in params:
        t = by_id[p.param_id]
        assert t.params == p.values
        loss = quad(p.values)
        assert (t.state, t.value) == ((TrialState.FAIL, None) if loss is None
                                      else (TrialState.COMPLETE, loss))
    best = min((t for t in study.trials if t.value is not None), key=lambda t: t.value)
    assert source.best is not None
    assert (source.best.param_id, source.best.loss) == (best.user_attrs["param_id"], best.value)
    assert study.user_attrs["trials"] == 10


def test_asked_but_not_committed_trials_rerun_with_their_values_and_ids(tmp_path: Path) -> None:
    book = Book()
    source = opened(tmp_path, book)
    first = take(source, book, 5)
    run(source, book, first[:2])
    source.close()  # killed: first[2:] were running
    again = opened(tmp_path, book)
    assert (again.told, again.asked) == (2, 5)
    rerun = take(again, book, 3)
    assert rerun == first[2:]  # the same trials: their ids and values
    assert [t.state for t in trials(tmp_path / JOURNAL)].count(TrialState.RUNNING) == 3
    rest = take(again, book, 100)
    assert len(rest) == 5  # the budget: 10 trials in all, the reruns counted once
    run(again, book, rerun + rest)
    again.close()
    assert again.told == 10 and told_once(tmp_path / JOURNAL) == 10
    assert len(trials(tmp_path / JOURNAL)) == 10
    assert len(book.rows) == 10


def test_committed_but_untold_trials_are_told_from_the_output_once(tmp_path: Path) -> None:
    book = Book()
    source = opened(tmp_path, book, space={"x": {"low": 0.8, "high": 0.9},
                                           "y": SPACE["y"]})
    params = take(source, book, 6)
    run(source, book, params[:2])
    run(source, book, params[2:], tell=False)  # killed between the commit and the tells
    source.close()
    assert told_once(tmp_path / JOURNAL) == 2
    failed = {p.param_id for p in params[2:] if quad(p.values) is None}
    assert failed and len(failed) < 4  # some of each: told FAIL and told their loss
    again = opened(tmp_path, book, space={"x": {"low": 0.8, "high": 0.9}, "y": SPACE["y"]})
    assert book.asked_for == [{p.param_id for p in params[2:]}]
    assert again.told == 6 and again.failed_tells == sum(quad(p.values) is None for p in params)
    by_id = {t.user_attrs["param_id"]: t for t in trials(tmp_path / JOURNAL)}
    for p in params[2:]:
        t = by_id[p.param_id]
        if p.param_id in failed:
            assert t.state == TrialState.FAIL
        else:
            assert (t.state, t.value) == (TrialState.COMPLETE, quad(p.values))
    assert told_once(tmp_path / JOURNAL) == 6
    # Told once: neither a third open nor a late commit hook tells them again.
    again.committed([(p.param_id, "ok") for p in params])
    again.close()
    third = opened(tmp_path, book, space={"x": {"low": 0.8, "high": 0.9}, "y": SPACE["y"]})
    third.close()
    assert told_once(tmp_path / JOURNAL) == 6 and third.told == 6
    assert len(book.asked_for) == 1  # nothing left to square


def test_committed_trials_missing_from_a_deleted_journal_are_rebuilt(tmp_path: Path) -> None:
    book = Book()
    source = opened(tmp_path, book)
    first = take(source, book, 6)
    run(source, book, first[:4])
    source.close()
    (tmp_path / JOURNAL).unlink()
    again = opened(tmp_path, book)
    assert again.told == 4 and again.asked == 4  # the uncommitted two are forgotten
    done = {t.user_attrs["param_id"]: t for t in trials(tmp_path / JOURNAL)}
    assert set(done) == {p.param_id for p in first[:4]}
    for p in first[:4]:
        assert done[p.param_id].params == p.values
        assert done[p.param_id].value == quad(p.values)
    assert again.best is not None and again.best.loss == min(
        v for p in first[:4] if (v := quad(p.values)) is not None)
    rest = take(again, book, 100)
    assert len(rest) == 6
    # The sampler moved on: none of the points already asked (committed or not) again.
    assert not {tuple(p.values.values()) for p in rest} & {tuple(p.values.values())
                                                           for p in first}
    run(again, book, rest)
    again.close()
    assert told_once(tmp_path / JOURNAL) == 10 and len(book.rows) == 10


def test_trial_numbers_read_from_the_journal_match_the_studys(tmp_path: Path) -> None:
    """trial_numbers (a line at a time, no Optuna) gives each param id the number Optuna
    gives its trial: trials asked, and trials rebuilt from the output after the journal
    was lost (their id written in their creation); a torn tail is not read."""
    book = Book()
    source = opened(tmp_path, book)
    first = take(source, book, 6)
    run(source, book, first[:4])
    source.close()
    (tmp_path / JOURNAL).unlink()
    again = opened(tmp_path, book)
    rest = take(again, book, 100)
    run(again, book, rest)
    again.close()
    study = {t.user_attrs["param_id"]: t.number for t in trials(tmp_path / JOURNAL)}
    assert len(study) == 10
    ids = set(study) | {"not-a-trial"}
    assert trial_numbers(tmp_path / JOURNAL, ids) == study
    some = set(list(study)[:3])
    assert trial_numbers(tmp_path / JOURNAL, some) == {k: study[k] for k in some}
    assert trial_numbers(tmp_path / JOURNAL, set()) == {}
    with (tmp_path / JOURNAL).open("ab") as f:
        f.write(b'{"op_code": 4, "study_id": 0, "user_attrs": {"param_id": "torn"')
    assert trial_numbers(tmp_path / JOURNAL, ids | {"torn"}) == study


def test_a_repeated_point_never_takes_a_committed_id_after_a_rebuild(tmp_path: Path) -> None:
    """Trials rebuilt from the ledger are numbered anew, so a later trial may have the
    number and values of one committed before: its id must still be new."""
    space = {"c": {"choices": ["only"]}}  # every trial is the same point
    book = Book()
    source = opened(tmp_path, book, names=["c"], space=space, trials=4)
    first = take(source, book, 3)
    run(source, book, [first[0], first[2]])  # trials 0 and 2; trial 1 was running
    source.close()
    (tmp_path / JOURNAL).unlink()
    again = opened(tmp_path, book, names=["c"], space=space, trials=4)
    rest = take(again, book, 100)
    assert len(rest) == 2
    ids = [p.param_id for p in rest]
    assert len(set(ids)) == 2 and not set(ids) & book.committed()
    assert trial_param_id(2, {"c": "only"}) in book.committed()  # would have collided
    run(again, book, rest)
    again.close()
    assert told_once(tmp_path / JOURNAL) == 4 and len(book.rows) == 4
    assert len({t.user_attrs["param_id"] for t in trials(tmp_path / JOURNAL)}) == 4


def test_a_trial_whose_ask_a_kill_cut_short_runs_with_whole_values(tmp_path: Path) -> None:
    """An ask writes a line per value and then the trial's id: a kill between them
    leaves a trial that never ran; resume finishes its ask and runs it."""
    book = Book()
    source = opened(tmp_path, book)
    first = take(source, book, 3)
    run(source, book, first)
    asyncio.run(source.ask_ahead(1))  # asked, never taken: then cut short below
    source.close()
    path = tmp_path / JOURNAL
    lines = path.read_bytes().splitlines(keepends=True)
    # The last trial's lines: its creation, x, y and its id. Keep the creation and x.
    assert [json.loads(ln)["op_code"] for ln in lines[-4:]] == [4, 5, 5, 8]
    path.write_bytes(b"".join(lines[:-2]) + lines[-2][: len(lines[-2]) // 2])
    again = opened(tmp_path, book)
    assert again.asked == 4
    cut = take(again, book, 1)[0]
    assert set(cut.values) == {"x", "y"}
    t = trials(path)[3]
    assert t.params == cut.values and t.user_attrs["param_id"] == cut.param_id
    assert t.state == TrialState.RUNNING
    rest = take(again, book, 100)
    run(again, book, [cut, *rest])
    again.close()
    assert told_once(path) == 10 and states(path)["RUNNING"] == 0
    assert len(book.rows) == 10


def test_a_told_trial_whose_part_was_uncommitted_reruns_without_a_second_tell(
        tmp_path: Path) -> None:
    """verify --repair un-commits a damaged part: its trials, already told, run again
    (the output needs their rows) and are not told again."""
    book = Book()
    source = opened(tmp_path, book)
    params = take(source, book, 4)
    run(source, book, params)
    source.close()
    lost = params[1]
    del book.rows[lost.param_id]
    again = opened(tmp_path, book)
    assert again.told == 4
    assert take(again, book, 1) == [lost]
    run(again, book, [lost])
    again.close()
    assert told_once(tmp_path / JOURNAL) == 4
    assert len(trials(tmp_path / JOURNAL)) == 4


def test_lowering_trials_is_refused_by_check_budget_and_by_open(tmp_path: Path) -> None:
    book = Book()
    source = opened(tmp_path, book, trials=6)
    run(source, book, take(source, book, 6))
    source.close()
    before = (tmp_path / JOURNAL).read_bytes()
    lower = SearchSource(search_spec(trials=5), NAMES, tmp_path, job_id="quad", job_seed=0)
    with pytest.raises(SearchShrunk) as caught:
        lower.check_budget()
    assert caught.value.field == "parameters.search.trials"
    assert caught.value.got == "5" and "at least 6" in caught.value.expected
    assert "6 told" in caught.value.expected
    with pytest.raises(SearchShrunk):
        reopen(lower, book)
    lower.close()
    assert (tmp_path / JOURNAL).read_bytes() == before
    # Unchanged and raised budgets pass.
    SearchSource(search_spec(trials=6), NAMES, tmp_path, job_id="quad", job_seed=0
                 ).check_budget()
    SearchSource(search_spec(trials=9), NAMES, tmp_path, job_id="quad", job_seed=0
                 ).check_budget()


def test_check_budget_reads_a_torn_journal_without_writing(tmp_path: Path) -> None:
    book = Book()
    source = opened(tmp_path, book, trials=6)
    run(source, book, take(source, book, 6))
    source.close()
    path = tmp_path / JOURNAL
    torn = path.read_bytes() + b'{"op_code": 6, "trial_id'
    path.write_bytes(torn)
    lower = SearchSource(search_spec(trials=2), NAMES, tmp_path, job_id="quad", job_seed=0)
    with pytest.raises(SearchShrunk):
        lower.check_budget()
    assert path.read_bytes() == torn  # no lock is held yet: nothing cut
    absent = SearchSource(search_spec(), NAMES, tmp_path / "none", job_id="quad", job_seed=0)
    absent.check_budget()
    assert not (tmp_path / "none").exists()


def test_raising_trials_asks_only_the_new_ones(tmp_path: Path) -> None:
    book = Book()
    source = opened(tmp_path, book, trials=5)
    first = take(source, book, 100)
    assert len(first) == 5
    run(source, book, first)
    source.close()
    grown = opened(tmp_path, book, trials=8)
    assert (grown.told, grown.asked) == (5, 5)
    more = take(grown, book, 100)
    assert len(more) == 3 and not {p.param_id for p in more} & book.committed()
    run(grown, book, more)
    grown.close()
    assert told_once(tmp_path / JOURNAL) == 8
    assert load_study(tmp_path / JOURNAL).user_attrs["trials"] == 8


@pytest.mark.parametrize("sampler", ["random", "tpe"])
def test_a_resumed_sampler_does_not_replay_the_points_it_asked(tmp_path: Path,
                                                               sampler: str) -> None:
    book = Book()
    source = opened(tmp_path, book, sampler=sampler, trials=24)
    first = take(source, book, 8)
    run(source, book, first[:5])  # three still running at the kill
    source.close()
    again = opened(tmp_path, book, sampler=sampler, trials=24)
    assert take(again, book, 3) == first[5:]
    new = take(again, book, 8)
    points = {tuple(p.values.values()) for p in first}
    assert not {tuple(p.values.values()) for p in new} & points
    # The same resume point draws the same points: a run is reproducible from its seed.
    again.close()
    twin = tmp_path / "twin"
    twin.mkdir()
    book2 = Book()
    source2 = opened(twin, book2, sampler=sampler, trials=24)
    first2 = take(source2, book2, 8)
    assert [p.values for p in first2] == [p.values for p in first]
    run(source2, book2, first2[:5])
    source2.close()
    again2 = opened(twin, book2, sampler=sampler, trials=24)
    take(again2, book2, 3)
    assert [p.values for p in take(again2, book2, 8)] == [p.values for p in new]
    again2.close()


def test_a_source_opened_again_starts_from_the_journal_and_ledger(tmp_path: Path) -> None:
    """`tidegate run` opens the same source again after restarting its embedded
    cluster: what the first run held in memory must not be yielded twice."""
    book = Book()
    source = opened(tmp_path, book)
    asyncio.run(source.ask_ahead(4))
    first = take(source, book, 2)
    run(source, book, first)
    source.close()  # the cluster was lost: two asked ahead, never taken
    reopen(source, book)
    assert (source.told, source.asked) == (2, 4)
    rest = take(source, book, 100)
    assert len(rest) == 8 and len({p.param_id for p in rest}) == 8
    assert not {p.param_id for p in rest} & book.committed()
    run(source, book, rest)
    source.close()
    assert told_once(tmp_path / JOURNAL) == 10 and source.told == 10
    assert source.failed_tells == sum(quad(r.values) is None for r in book.rows.values())


def test_a_torn_tail_is_cut_and_what_it_held_restored(tmp_path: Path) -> None:
    book = Book()
    source = opened(tmp_path, book)
    params = take(source, book, 4)
    run(source, book, params)
    source.close()
    path = tmp_path / JOURNAL
    data = path.read_bytes()
    path.write_bytes(data[:-10])  # the last tell torn
    again = opened(tmp_path, book)
    assert again.told == 4
    assert finishing_ops(path)[3] == 1  # told again from the output, once
    again.close()
    assert told_once(path) == 4


# --- the journal is one of tidegate's own files -----------------------------------------------


def test_the_journal_is_discarded_by_restart_and_refused_as_a_link(tmp_path: Path) -> None:
    assert JOURNAL in OWN_FILES
    (tmp_path / JOURNAL).write_text("{}\n")
    assert JOURNAL in discard_output(tmp_path)
    assert not (tmp_path / JOURNAL).exists()
    elsewhere = tmp_path / "elsewhere.journal"
    elsewhere.write_text("theirs\n")
    (tmp_path / JOURNAL).symlink_to(elsewhere)
    with pytest.raises(UnsafeOutput, match=JOURNAL):
        check_own_files(tmp_path)
    assert JOURNAL not in discard_output(tmp_path)
    assert elsewhere.read_text() == "theirs\n"


# --- parameters.search's validation ---------------------------------------------------------

BASE: dict[str, Any] = {
    "model": "quad:model",
    "parameters": {"search": {"space": SPACE, "objective": "fit", "trials": 20}},
    "targets": [{"name": "fit", "function": "quad:loss"}],
}


def _with_search(**changes: Any) -> dict[str, Any]:
    data = json.loads(json.dumps(BASE))
    data["parameters"]["search"].update(changes)
    return data


BAD_SEARCHES = [
    pytest.param(_with_search(trials=0), "parameters.search.trials", ">= 1", "0",
                 id="trials-zero"),
    pytest.param(_with_search(trials=2.5), "parameters.search.trials", "an integer", "2.5",
                 id="trials-float"),
    pytest.param(_with_search(sampler="grid"), "parameters.search.sampler", "'tpe'",
                 "'grid'", id="sampler-unknown"),
    pytest.param(_with_search(objective="nope"), "parameters.search.objective",
                 "one of the targets ('fit')", "'nope'", id="objective-not-a-target"),
    pytest.param(_with_search(space={}), "parameters.search.space", "non-empty", "{}",
                 id="space-empty"),
    pytest.param(_with_search(space={"x": {"low": 1.0, "high": 0.5}}),
                 "parameters.search.space.x.high", "above low (1.0)", "0.5",
                 id="range-reversed"),
    pytest.param(_with_search(space={"x": {"low": 0.0, "high": 1.0, "log": True}}),
                 "parameters.search.space.x.low", "above 0 (log: true)", "0.0",
                 id="log-from-zero"),
    pytest.param(_with_search(space={"x": {"low": 0, "high": 1.5, "type": "int"}}),
                 "parameters.search.space.x.high", "a whole number", "1.5",
                 id="int-range-fraction"),
    pytest.param(_with_search(space={"x": {"low": -1e308, "high": 1e308}}),
                 "parameters.search.space.x.high", "high - low to be a finite float",
                 "1e+308", id="range-wider-than-a-float"),
    pytest.param(_with_search(space={"x": {"low": "x", "high": 1}}),
                 "parameters.search.space.x.low", "a number", "'x' (str)",
                 id="bound-a-string"),
    pytest.param(_with_search(space={"x": {"low": True, "high": 1}}),
                 "parameters.search.space.x.low", "a number", "true (bool)",
                 id="bound-a-bool"),
    pytest.param(_with_search(space={"x": {"low": 0, "hi": 1}}),
                 "parameters.search.space.x.hi", "known fields (low, high, type, log, step)",
                 "did you mean 'high'?", id="range-unknown-key"),
    pytest.param(_with_search(space={"x": 3}), "parameters.search.space.x",
                 "{low, high}", "3", id="dimension-not-a-mapping"),
    pytest.param(_with_search(space={"c": {"choices": ["a", "a"]}}),
                 "parameters.search.space.c.choices[1]", "unique choices",
                 "choices[0]", id="choices-duplicate"),
    pytest.param(_with_search(space={"c": {"choices": ["a"]}}, sampler="cmaes"),
                 "parameters.search.space.c", "a float range", "choices",
                 id="cmaes-choices"),
    pytest.param(_with_search(parallel=0), "parameters.search.parallel", ">= 1", "0",
                 id="parallel-zero"),
    pytest.param(_with_search(seed=-1), "parameters.search.seed", ">= 0", "-1",
                 id="seed-negative"),
]


@pytest.mark.parametrize(("data", "field", "expected", "got"), BAD_SEARCHES)
def test_a_bad_search_exits_2_naming_the_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
    data: dict[str, Any], field: str, expected: str, got: str,
) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("tidegate: error: ") and "Traceback" not in err
    assert f"{field}: expected " in err, err
    assert expected in err and got in err, err
    assert ".float:" not in err and ".int:" not in err, err  # no union branch named


def test_a_bad_search_in_a_real_run_process(tmp_path: Path) -> None:
    """Exit 2 before any cluster starts, the field named, no traceback, nothing written."""
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_with_search(trials=-3, sampler="annealing")))
    proc = tidegate("run", path, "--no-progress", timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert "parameters.search.trials: expected" in proc.stderr
    assert "parameters.search.sampler: expected" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.yaml"]
