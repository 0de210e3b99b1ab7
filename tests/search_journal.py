"""A search's journal read back with Optuna's public API (and its lines read as JSON),
independently of tidegate's code: the tests' view of what the study holds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend, JournalFileOpenLock
from optuna.trial import FrozenTrial, TrialState

# Optuna's journal operation codes (optuna.storages.journal._storage.JournalOperation).
CREATE_TRIAL = 4
SET_TRIAL_STATE_VALUES = 6
FINISHED = {int(s) for s in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)}


def load_study(path: Path) -> optuna.Study:
    """The one study in the journal at ``path`` (reading takes no lock)."""
    storage = JournalStorage(JournalFileBackend(str(path),
                                                lock_obj=JournalFileOpenLock(str(path))))
    names = optuna.get_all_study_names(storage)
    assert len(names) == 1, names
    return optuna.load_study(study_name=names[0], storage=storage)


def trials(path: Path) -> list[FrozenTrial]:
    return load_study(path).get_trials(deepcopy=False)


def states(path: Path) -> Counter[str]:
    return Counter(t.state.name for t in trials(path))


def finishing_ops(path: Path) -> Counter[int]:
    """Trial id -> how many journal operations set it to a finished state (a trial
    created finished, rebuilt from the output, counts one)."""
    ops: Counter[int] = Counter()
    created = 0
    for line in path.read_bytes().splitlines():
        op = json.loads(line)
        if op["op_code"] == CREATE_TRIAL:
            if op.get("state", int(TrialState.RUNNING)) in FINISHED:
                ops[created] += 1
            created += 1
        elif op["op_code"] == SET_TRIAL_STATE_VALUES and op["state"] in FINISHED:
            ops[op["trial_id"]] += 1
    return ops


def told_once(path: Path) -> int:
    """The trials told, after checking that none was told twice."""
    ops = finishing_ops(path)
    twice = {t: n for t, n in ops.items() if n > 1}
    assert not twice, f"trials told more than once: {twice}"
    return len(ops)
