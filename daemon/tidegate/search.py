"""A calibration as a param source: an Optuna study asked for one trial as each slot of
the window frees up, and told each trial's loss once its part is committed.

Each trial is a param like any other (its replicates, targets and Parquet rows, exactly
once). Its param id hashes its trial number with its values, so a point asked twice
(small int or choice spaces repeat) is two params that never collide in the ledger, and
gets its own replicate seeds.

The study lives in the job's output, in Optuna's journal file (``search.journal``), and
the ledger is the truth about what ran:

- a trial is told only after its part is committed; one committed but not told at a
  crash is told on resume from the committed loss, so no trial is told twice;
- a trial asked but not committed at a crash is run again with the same values (the same
  trial, counted once); one whose ask the crash cut short (a value or its param id not
  written: it never ran) has its ask finished first;
- committed trials the journal lacks (a journal removed or cut short) are added to it
  from the output, numbered anew: a later trial's id is salted past the committed ids,
  lest it repeat the number and values of one of them;
- the sampler is seeded anew on each run from the spec's seed and the trials already
  asked and told (those added from the output too), so a restarted search does not
  replay the points it has.

``--restart`` discards the journal with the ledger (writer.discard_output).

The journal is written under the output's lock (held for the whole run), so no lock file
of Optuna's is used: its default lock, left behind by a kill -9, would stall the next run
for its 30 s grace period. A torn last line (a kill or power loss mid-append) is cut off
before the study is opened; what it held is rebuilt from the ledger as above.

Every study operation runs on one thread of its own: an ask of TPE over thousands of
trials takes tens of milliseconds, which the event loop must not spend.
"""

from __future__ import annotations

import asyncio
import hashlib
import importlib
import json
import logging
import math
import os
import warnings
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tidegate.errors import TidegateError
from tidegate.params import Param, Scalar, canonical
from tidegate.writer import SEARCH_JOURNAL

if TYPE_CHECKING:
    import optuna

    from tidegate.spec import SearchSpec

log = logging.getLogger(__name__)

JOURNAL = SEARCH_JOURNAL
# TPE's random start: its first trials are independent draws, so they may all run at once.
TPE_STARTUP_TRIALS = 10
# Past its start, a trial asked with P others in flight misses their results: P of at
# most a 20th of the budget keeps parallel TPE close to its sequential quality (the
# in-flight points count as bad, constant_liar, so the asks spread out meanwhile).
TPE_PARALLEL_SHARE = 20
TPE_PARALLEL_MAX = 32


class SearchUnavailable(TidegateError):
    """A package the search needs is not installed: (field, expected, got)."""

    def __init__(self, field: str, expected: str, got: str):
        super().__init__(f"{field}: expected {expected}, got {got}")
        self.field, self.expected, self.got = field, expected, got


class SearchShrunk(TidegateError):
    """``trials`` lowered below the budget the search was given: its told trials cannot
    be untold."""

    def __init__(self, trials: int, budget: int, told: int):
        self.field = "parameters.search.trials"
        self.expected = (f"at least {budget}, the trials this search was given ({told} "
                         "told): a budget can be raised to search on, never lowered; "
                         "--restart starts a new search")
        self.got = str(trials)
        super().__init__(f"{self.field}: expected {self.expected}, got {self.got}")


def require(sampler: str) -> None:
    """SearchUnavailable unless Optuna (and for cmaes, the cmaes package) imports."""
    try:
        import optuna  # noqa: F401
    except ImportError as exc:
        raise SearchUnavailable("parameters.search",
                                "Optuna installed (pip install 'tidegate[search]')",
                                f"{type(exc).__name__}: {exc}") from None
    if sampler == "cmaes":
        try:
            importlib.import_module("cmaes")
        except ImportError as exc:
            raise SearchUnavailable("parameters.search.sampler",
                                    "the cmaes package installed for sampler cmaes "
                                    "(pip install cmaes)",
                                    f"{type(exc).__name__}: {exc}") from None


def trial_param_id(number: int, values: Mapping[str, Scalar], salt: int = 0) -> str:
    """The param id of trial ``number``: its values alone would collide for a repeat.
    ``salt`` (0 but for a collision: see SearchSource._unique_id) makes another."""
    key: dict[str, Any] = {"trial": number,
                           "values": {k: canonical(v) for k, v in values.items()}}
    if salt:
        key["salt"] = salt
    text = json.dumps(key, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def default_parallel(spec: SearchSpec) -> int:
    """Trials in flight when the spec does not say (B caps them too)."""
    if spec.sampler == "random":  # no trial depends on another
        return spec.trials
    if spec.sampler == "cmaes":  # one generation of CMA-ES's default population
        return min(spec.trials, 4 + int(3 * math.log(len(spec.space))))
    return max(min(spec.trials, TPE_STARTUP_TRIALS),
               min(TPE_PARALLEL_MAX, spec.trials // TPE_PARALLEL_SHARE))


def sampler_seed(seed: int, asked: int, told: int) -> int:
    """A seed of its own for each resume point: a restart draws new points. Always
    below 2**32, which Optuna's samplers require (a spec's seed may be any size)."""
    if asked == 0 and seed < 2**32:
        return seed
    digest = hashlib.sha256(f"{seed}:{asked}:{told}".encode()).digest()
    return int.from_bytes(digest[:4], "big")


@dataclass(frozen=True, slots=True)
class Best:
    trial: int
    param_id: str
    loss: float
    values: dict[str, Scalar]

    def as_dict(self) -> dict[str, Any]:
        return {"trial": self.trial, "param_id": self.param_id, "loss": self.loss,
                "values": self.values}


@dataclass(frozen=True, slots=True)
class Outcome:
    """A committed param as the output holds it: its values, whether it failed, and the
    objective's loss (None when it has none)."""

    values: dict[str, Scalar]
    failed: bool
    loss: float | None


def _journal(path: Path) -> optuna.storages.JournalStorage:
    """Optuna's journal storage at ``path``, without a lock of Optuna's: the output's
    lock is held for the whole run."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    from optuna.storages.journal._file import BaseJournalFileLock

    class NoLock(BaseJournalFileLock):
        def acquire(self) -> bool:
            return True

        def release(self) -> None:
            return None

    return JournalStorage(JournalFileBackend(str(path), lock_obj=NoLock()))


def _whole_lines(data: bytes) -> tuple[int, list[dict[str, Any]]]:
    """The bytes of ``data`` up to its first line that is not whole (one that lacks its
    newline or does not parse as a JSON object), and the logs of the lines before it."""
    keep, logs = 0, []
    for line in data.splitlines(keepends=True):
        if not line.endswith(b"\n"):
            break
        try:
            log_entry = json.loads(line)
        except ValueError:
            break
        if not isinstance(log_entry, dict):
            break
        logs.append(log_entry)
        keep += len(line)
    return keep, logs


def cut_torn_tail(path: Path) -> int:
    """Cut ``path`` after its last whole JSON line; returns the bytes cut. A line is
    whole when it ends with a newline and parses. A bad line amid good ones cuts the
    rest too: the operations after it name trials by their order in the file."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return 0
    keep, _ = _whole_lines(data)
    if keep < len(data):
        with open(path, "r+b") as f:
            f.truncate(keep)
            f.flush()
            os.fsync(f.fileno())
    return len(data) - keep


def _read_only_journal(path: Path) -> optuna.storages.JournalStorage:
    """The study in ``path`` as its whole lines hold it, read without writing anything
    (no lock is held yet: the torn tail is only cut once the output's lock is)."""
    from optuna.storages import JournalStorage
    from optuna.storages.journal import BaseJournalBackend

    _, logs = _whole_lines(path.read_bytes())

    class Lines(BaseJournalBackend):
        def read_logs(self, log_number_from: int) -> Iterator[dict[str, Any]]:
            yield from logs[log_number_from:]

        def append_logs(self, logs: list[dict[str, Any]]) -> None:
            raise RuntimeError("a read-only journal")

    return JournalStorage(Lines())


# Optuna's journal operations read by trial_numbers (optuna.storages.journal).
_CREATE_TRIAL, _SET_TRIAL_USER_ATTR = 4, 8


def trial_numbers(path: Path, ids: AbstractSet[str]) -> dict[str, int]:
    """The trial numbers of the param ids ``ids`` in the journal at ``path`` (those it
    names), read a line at a time without Optuna: what ``tidegate best`` shows beside a
    trial. A trial's number is its place among its study's trials (as Optuna numbers
    them on replay); its param id is a user attribute, set at the ask or, for a trial
    rebuilt from the output, in the trial's creation. Reading stops at the first line
    that is not whole (a torn tail: what follows it is not the study's)."""
    if not ids:
        return {}
    numbers: list[int] = []  # trial id (its creation's order in the journal) -> number
    per_study: dict[Any, int] = {}
    found: dict[str, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if not line.endswith(b"\n"):
                break
            try:
                op = json.loads(line)
            except ValueError:
                break
            if not isinstance(op, dict):
                break
            code = op.get("op_code")
            trial: Any
            if code == _CREATE_TRIAL:
                study = op.get("study_id")
                numbers.append(per_study.get(study, 0))
                per_study[study] = numbers[-1] + 1
                attrs, trial = op.get("user_attrs"), len(numbers) - 1
            elif code == _SET_TRIAL_USER_ATTR:
                attrs, trial = op.get("user_attr"), op.get("trial_id")
            else:
                continue
            pid = attrs.get("param_id") if isinstance(attrs, dict) else None
            if (isinstance(pid, str) and pid in ids and isinstance(trial, int)
                    and 0 <= trial < len(numbers)):
                found[pid] = numbers[trial]
    return found


class SearchSource:
    """The trials of one search, as a ParamSource: ``open`` it once the output's ledger
    is bound, ``ask_ahead`` before the window fills, ``completed`` as params are judged,
    ``committed`` as parts commit, ``close`` at the end. A source may be opened again
    for another run of its job (the embedded cluster restarted): each ``open`` starts
    from the journal and the ledger alone."""

    # Asked a point at a time as slots free up: a walk never reads it a chunk ahead.
    read_ahead = False

    def __init__(self, spec: SearchSpec, names: list[str], output_dir: Path, *,
                 job_id: str, job_seed: int):
        self.spec = spec
        self.names = names
        self.path = output_dir / JOURNAL
        self.job_id = job_id
        self.seed = spec.seed if spec.seed is not None else job_seed
        self.parallel = spec.parallel or default_parallel(spec)
        self._ops: ThreadPoolExecutor | None = None
        self._reset()

    def _reset(self) -> None:
        self._study: optuna.Study | None = None
        self._dists: dict[str, Any] = {}
        self._committed: frozenset[str] = frozenset()  # committed when the run opened
        self._known: list[Param] = []  # committed trials, yielded for Pending to skip
        self._rerun: deque[Param] = deque()  # asked, not committed: same values again
        self._ready: deque[Param] = deque()  # asked ahead, not yet taken by the window
        self._numbers: dict[str, int] = {}  # param id -> trial number
        self._told: set[str] = set()
        self._outcomes: dict[str, float | None] = {}  # judged, awaiting their commit
        self._asked = 0  # trials in the study
        self.best: Best | None = None
        self.failed_tells = 0

    # --- ParamSource ------------------------------------------------------------------

    @property
    def total(self) -> int:
        return self.spec.trials

    def typed_ids(self) -> SearchSource:
        return self  # searches came after canonical ids: there are no older ids

    @property
    def digest(self) -> str | None:
        return None  # its points come from the sampler: no order to resume within

    def iter_from(self, start: int) -> Iterator[Param]:
        if start:
            raise ValueError("a search is walked from its first trial")
        return iter(self)

    def __iter__(self) -> Iterator[Param]:
        yield from self._known
        while True:
            if self._rerun:
                yield self._rerun.popleft()
            elif self._ready:
                yield self._ready.popleft()
            elif self._asked < self.spec.trials:
                # Not asked ahead (a retry took the slot meant for it): ask now.
                self._call(self._ask, 1).result()
            else:
                return

    # --- the run ----------------------------------------------------------------------

    @property
    def told(self) -> int:
        return len(self._told)

    @property
    def asked(self) -> int:
        return self._asked

    def view(self) -> dict[str, Any]:
        """For progress, the summary and the API."""
        return {"objective": self.spec.objective, "sampler": self.spec.sampler,
                "trials": self.spec.trials, "told": self.told, "failed": self.failed_tells,
                "parallel": self.parallel,
                "best": self.best.as_dict() if self.best else None}

    def _call(self, fn: Callable[..., Any], *args: Any) -> Future[Any]:
        if self._ops is None:
            self._ops = ThreadPoolExecutor(1, thread_name_prefix="tidegate-search")
        return self._ops.submit(fn, *args)

    def check_budget(self) -> None:
        """SearchShrunk if ``trials`` is below the budget recorded in the journal, read
        before the run touches the output (a refused run changes nothing). A journal
        that is a link is not read: resume refuses it (check_own_files)."""
        if self.path.is_symlink() or not self.path.is_file():
            return
        storage = _read_only_journal(self.path)
        for study in storage.get_all_studies():
            budget = study.user_attrs.get("trials")
            if isinstance(budget, int) and self.spec.trials < budget:
                told = sum(t.state.is_finished()
                           for t in storage.get_all_trials(study._study_id, deepcopy=False))
                raise SearchShrunk(self.spec.trials, budget, told)

    async def open(self, committed: frozenset[str],
                   outcomes: Callable[[set[str]], dict[str, Outcome]]) -> None:
        """Open (or create) the study and square it with the committed params."""
        await asyncio.wrap_future(self._call(self._open, committed, outcomes))

    async def ask_ahead(self, n: int) -> None:
        """Ask up to ``n`` new trials, one at a time, for the window to take."""
        n = min(n - len(self._rerun) - len(self._ready), self.spec.trials - self._asked)
        if n > 0:
            await asyncio.wrap_future(self._call(self._ask, n))

    def completed(self, param_id: str, loss: float | None) -> None:
        """A trial's param was judged: its loss (None: failed) is told once committed."""
        if param_id in self._numbers:
            self._outcomes[param_id] = loss

    def committed(self, statuses: Sequence[tuple[str, str]]) -> None:
        """A part committed these params, (param id, status) each, on any thread: tell
        their trials (on the study's thread, in the order their parts committed)."""
        tells = []
        for pid, _ in statuses:
            if pid in self._numbers and pid in self._outcomes:
                tells.append((pid, self._outcomes.pop(pid)))
        if tells:
            self._call(self._tell_all, tells).add_done_callback(_log_failed_tells)

    def close(self) -> None:
        """Wait for the tells queued (the last part's), then stop the study's thread."""
        if self._ops is not None:
            self._ops.shutdown(wait=True)
            self._ops = None

    # --- on the study's thread ------------------------------------------------------

    def _open(self, committed: frozenset[str],
              outcomes: Callable[[set[str]], dict[str, Outcome]]) -> None:
        import optuna
        from optuna.trial import TrialState

        self._reset()
        self._committed = committed
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self._dists = distributions(self.spec)
        cut = cut_torn_tail(self.path)
        if cut:
            log.warning("search journal %s: cut %d bytes of a torn last write (a kill "
                        "mid-append); the ledger restores what they held", self.path, cut,
                        extra={"action": "search_journal_repaired"})
        storage = _journal(self.path)
        studies = storage.get_all_studies()
        # One study per output; its name is the job id it was created under.
        name = studies[0].study_name if len(studies) == 1 else self.job_id
        probe = optuna.load_study(study_name=name, storage=storage) if studies else None
        trials = probe.get_trials(deepcopy=False) if probe else []
        told = sum(t.state.is_finished() for t in trials)
        # Committed trials the journal lacks are added to it below: they count as asked
        # and told, so that the sampler's seed moves on past the points they hold.
        ids = {pid for t in trials if isinstance(pid := t.user_attrs.get("param_id"), str)}
        missing = set(committed) - ids
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # experimental-feature notices of Optuna's
            sampler = self._sampler(sampler_seed(self.seed, len(trials) + len(missing),
                                                 told + len(missing)))
            # Loaded, not created with load_if_exists: that appends a creation line the
            # replay then ignores, and a refused run is to write nothing.
            study = (optuna.load_study(study_name=name, storage=storage, sampler=sampler)
                     if probe is not None else
                     optuna.create_study(storage=storage, sampler=sampler, study_name=name,
                                         direction="minimize"))
        self._study = study
        budget = study.user_attrs.get("trials")
        if isinstance(budget, int) and self.spec.trials < budget:
            raise SearchShrunk(self.spec.trials, budget, told)
        if budget != self.spec.trials:  # a new search, or one grown: trials raised
            study.set_user_attr("trials", self.spec.trials)
        untold: dict[str, int] = {}
        for t in trials:
            pid, values = self._trial_of(t)
            self._numbers[pid] = t.number
            if t.state.is_finished():
                self._told.add(pid)
                if t.state == TrialState.COMPLETE and t.value is not None:
                    self._consider(t.number, pid, float(t.value), values)
                else:
                    self.failed_tells += 1
                if pid not in committed:  # a part un-committed since (verify --repair)
                    self._rerun.append(Param(pid, values))
            elif pid in committed:
                untold[pid] = t.number
            else:
                self._rerun.append(Param(pid, values))
        missing -= set(self._numbers)
        found = outcomes(set(untold) | missing) if untold or missing else {}
        for pid, number in untold.items():
            o = found.get(pid)
            self._tell(pid, number, None if o is None or o.failed else o.loss)
        if missing:
            self._rebuild(missing, found, len(trials))
        self._asked = len(study.get_trials(deepcopy=False))
        # Their values are not needed: the walk only skips them as committed.
        self._known = [Param(pid, {}) for pid in committed if pid in self._numbers]
        log.info("search %s: %d of %d trials told, %d to run again, best loss %s",
                 name, self.told, self.spec.trials, len(self._rerun),
                 f"{self.best.loss:.6g}" if self.best else "none yet",
                 extra={"action": "search_opened"})

    def _trial_of(self, t: optuna.trial.FrozenTrial) -> tuple[str, dict[str, Scalar]]:
        """A trial's param id and values, as the journal holds them. A trial whose ask
        a kill cut short (some of its values or its id not written) never ran: the ask
        is finished now, and the trial runs with the values it then has."""
        pid = t.user_attrs.get("param_id")
        if isinstance(pid, str) and all(n in t.params for n in self.names):
            return pid, {n: t.params[n] for n in self.names}
        assert self._study is not None
        import optuna

        if t.state.is_finished():  # told: its values are what they are
            values = {n: t.params[n] for n in self.names if n in t.params}
            return trial_param_id(t.number, values), values
        trial = optuna.Trial(self._study, t._trial_id)
        for n in self.names:
            trial._suggest(n, self._dists[n])  # the values it lacks, drawn as ask does
        values = {n: trial.params[n] for n in self.names}
        pid = self._unique_id(t.number, values)
        trial.set_user_attr("param_id", pid)
        log.info("search trial %d: its ask was cut short by a kill; finished now",
                 t.number, extra={"action": "search_trial_completed"})
        return pid, values

    def _unique_id(self, number: int, values: Mapping[str, Scalar]) -> str:
        """trial_param_id, salted past the ids already taken. Numbers are unique in a
        study, but trials rebuilt from the ledger (a journal lost) are numbered anew,
        and a later trial may repeat the number and values one of them ran with."""
        salt = 0
        while True:
            pid = trial_param_id(number, values, salt)
            if pid not in self._numbers and pid not in self._committed:
                return pid
            salt += 1

    def _sampler(self, seed: int) -> optuna.samplers.BaseSampler:
        import optuna

        if self.spec.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        if self.spec.sampler == "cmaes":
            return optuna.samplers.CmaEsSampler(seed=seed)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constant_liar=True,
                                          n_startup_trials=TPE_STARTUP_TRIALS)

    def _rebuild(self, missing: set[str], found: Mapping[str, Outcome], number: int) -> None:
        """Add committed params the journal lacks to the study as told trials;
        ``number``: the study's trial count, the number the first one gets."""
        import optuna
        from optuna.trial import TrialState

        assert self._study is not None
        added = 0
        for pid in sorted(missing):
            o = found.get(pid)
            if o is None:
                continue
            state = TrialState.FAIL if o.failed or o.loss is None else TrialState.COMPLETE
            try:
                trial = optuna.trial.create_trial(
                    params=o.values, distributions={n: self._dists[n] for n in o.values},
                    value=o.loss if state == TrialState.COMPLETE else None, state=state,
                    user_attrs={"param_id": pid})
                self._study.add_trial(trial)  # one journal line: whole, or cut as torn
            except (ValueError, KeyError) as exc:  # outside the space as it is now
                log.warning("search: committed param %s not added to the study: %s", pid,
                            exc, extra={"action": "search_trial_skipped"})
                continue
            self._numbers[pid] = number
            self._told.add(pid)
            if state == TrialState.COMPLETE:
                self._consider(number, pid, float(o.loss or 0.0), o.values)
            else:
                self.failed_tells += 1
            number += 1
            added += 1
        log.warning("search journal %s lacked %d committed trials: added from the output",
                    self.path, added, extra={"action": "search_journal_rebuilt"})

    def _ask(self, n: int) -> None:
        assert self._study is not None
        for _ in range(n):
            if self._asked >= self.spec.trials:
                return
            trial = self._study.ask(self._dists)
            values: dict[str, Scalar] = {name: trial.params[name] for name in self.names}
            pid = self._unique_id(trial.number, values)
            # Written before the trial can run: a trial with no id in the journal never ran.
            trial.set_user_attr("param_id", pid)
            self._numbers[pid] = trial.number
            self._asked += 1
            self._ready.append(Param(pid, values))

    def _tell_all(self, tells: list[tuple[str, float | None]]) -> None:
        for pid, loss in tells:
            self._tell(pid, self._numbers[pid], loss)

    def _tell(self, pid: str, number: int, loss: float | None) -> None:
        from optuna.trial import TrialState

        assert self._study is not None
        if pid in self._told:
            return
        if loss is not None and math.isfinite(loss):
            frozen = self._study.tell(number, loss, skip_if_finished=True)
            self._consider(number, pid, loss, dict(frozen.params))
        else:
            self._study.tell(number, state=TrialState.FAIL, skip_if_finished=True)
            self.failed_tells += 1
        self._told.add(pid)

    def _consider(self, number: int, pid: str, loss: float,
                  values: Mapping[str, Scalar]) -> None:
        if self.best is None or loss < self.best.loss:
            self.best = Best(number, pid, loss, {n: values[n] for n in self.names
                                                 if n in values})


def _log_failed_tells(done: Future[Any]) -> None:
    """A tell that raised is logged (its trial is told on the next run's open, from the
    ledger): the future's exception would otherwise go unseen."""
    if not done.cancelled() and (exc := done.exception()) is not None:
        log.error("search: telling trials failed: %s: %s; they are told from the output "
                  "on the next run", type(exc).__name__, exc,
                  extra={"action": "search_tell_failed"})


def distributions(spec: SearchSpec) -> dict[str, Any]:
    """The Optuna distribution of each dimension of the space."""
    from optuna.distributions import (
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
    )

    from tidegate.spec import ChoicesSpec

    out: dict[str, Any] = {}
    for name, dim in spec.space.items():
        if isinstance(dim, ChoicesSpec):
            out[name] = CategoricalDistribution(dim.choices)
        elif dim.type == "int":
            out[name] = IntDistribution(int(dim.low), int(dim.high), log=dim.log,
                                        step=int(dim.step or 1))
        else:
            out[name] = FloatDistribution(float(dim.low), float(dim.high), log=dim.log,
                                          step=float(dim.step) if dim.step else None)
    return out
