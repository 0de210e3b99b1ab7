"""The in-flight window: admissions, completions by key, retry and solo queues; a
Hypothesis state machine proves no order of operations loses or duplicates a param."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from tidegate.window import Admission, Lane, TaskKeys, Window


@dataclass(frozen=True)
class P:
    param_id: str


def _keys(batch: Sequence[Admission[P]]) -> list[TaskKeys]:
    out = []
    for a in batch:
        pid, r = a.param.param_id, f"-r{a.attempt}"
        sims = (f"sim-{pid}-0{r}", f"sim-{pid}-1{r}")
        agg = (f"agg-{pid}{r}",)
        out.append(TaskKeys(sims, agg, agg, agg + sims))
    return out


def _window(n: int) -> Window[P]:
    return Window(iter([P(f"p{i}") for i in range(n)]), n)


def test_fill_takes_retries_first_then_new_params_in_order() -> None:
    """A retry is admitted before any new param; new params come in source order."""
    w = _window(5)
    assert w.fill(2, _keys) == 2
    entry = w.remove("p0")
    w.requeue(entry.param, 1)
    assert w.fill(2, _keys) == 2
    assert [e.param_id for e in w.entries()] == ["p1", "p0", "p2"]
    assert w.get("p0") is not None and w.get("p0").attempt == 1  # type: ignore[union-attr]
    assert (w.params, w.tasks, w.sims, w.to_admit) == (3, 9, 6, 2)


def test_complete_reports_a_param_once_all_watched_keys_are_done() -> None:
    """Unknown and repeated keys are ignored; the param is ready once."""
    w = _window(1)
    w.fill(1, _keys)
    assert w.complete(["sim-p0-0-r0", "nope"]) == []
    ready = w.complete(["agg-p0-r0", "agg-p0-r0"])
    assert [e.param_id for e in ready] == ["p0"]
    assert w.owner("sim-p0-1-r0") == "p0"
    w.remove("p0")
    assert w.owner("sim-p0-1-r0") is None and w.finished


def _packed(batch: Sequence[Admission[P]]) -> list[TaskKeys]:
    """Every param of the batch in one task, each at its place in its result."""
    key = f"sim-{batch[0].param.param_id}-p{len(batch)}"
    return [TaskKeys((key,), (), (key,), (key,), fused=True, slot=i) for i in range(len(batch))]


def test_params_sharing_a_task_complete_together_and_its_key_outlives_each_one() -> None:
    """One key, three params: its completion readies all three; the key is owned by
    the params still in flight, and forgotten with the last of them."""
    w = _window(4)
    assert w.fill(3, _packed) == 3
    assert (w.params, w.tasks, w.sims) == (3, 1, 1)
    assert w.owners("sim-p0-p3") == ("p0", "p1", "p2")
    assert w.owner("sim-p0-p3") is None  # not one param's alone
    assert sorted(e.param_id for e in w.complete(["sim-p0-p3"])) == ["p0", "p1", "p2"]
    w.remove("p1")
    assert w.owners("sim-p0-p3") == ("p0", "p2") and w.tasks == 1
    w.remove("p0")
    assert w.owner("sim-p0-p3") == "p2"
    w.remove("p2")
    assert w.owners("sim-p0-p3") == () and w.tasks == 0


def test_a_failed_submit_puts_every_param_back() -> None:
    """If submitting raises, retries and new params return to where they were."""
    w = _window(3)
    w.requeue(P("x"), 2)

    def boom(batch: Sequence[Admission[P]]) -> list[TaskKeys]:
        raise ConnectionError("scheduler gone")

    with pytest.raises(ConnectionError):
        w.fill(3, boom)
    assert (w.params, w.to_admit) == (0, 4)
    w.fill(4, _keys)
    assert [(e.param_id, e.attempt) for e in w.entries()] == [
        ("x", 2), ("p0", 0), ("p1", 0), ("p2", 0)]


def test_a_suspect_runs_alone() -> None:
    """While a suspect waits nothing new is admitted; it starts only on an empty window,
    and nothing is admitted beside it."""
    w = _window(4)
    w.fill(2, _keys)
    w.remove("p0")
    w.requeue(P("p0"), 1, Lane.SOLO)
    assert w.fill(3, _keys) == 0
    assert w.fill_solo(_keys) is None  # p1 still in flight
    w.remove("p1")
    assert w.fill_solo(_keys) == "p0" and w.solo_active == "p0"
    assert w.fill(3, _keys) == 0
    w.remove("p0")
    assert w.solo_active is None and w.fill(3, _keys) == 2


def test_a_suspect_admitted_beside_the_others_is_never_alone() -> None:
    """Admitted beside the others (workers with the memory resource), a suspect is not
    solo_active even once it is the only param in flight, also after the window stops
    admitting suspects beside: a cancelled task may still run beside it. Only a suspect
    fill_solo admitted on an empty window is."""
    w = Window(iter([P(f"p{i}") for i in range(3)]), 3, solo_beside=True)
    w.fill(2, _keys)
    w.requeue(w.remove("p0").param, 1, Lane.SOLO)
    assert w.fill(1, _keys) == 1  # the suspect p0, beside p1
    w.remove("p1")
    assert w.params == 1 and w.is_solo("p0") and w.solo_active is None
    w.solo_beside = False
    assert w.solo_active is None
    w.requeue(w.remove("p0").param, 2, Lane.SOLO)
    assert w.fill_solo(_keys) == "p0" and w.solo_active == "p0"


class WindowMachine(RuleBasedStateMachine):
    """Every param of the source is always in exactly one place."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 12
        self.window = _window(self.n)
        self.finished: list[str] = []  # handed back: recorded or quarantined

    @rule(room=st.integers(0, 5))
    def fill(self, room: int) -> None:
        self.window.fill(room, _keys)

    @rule()
    def fill_solo(self) -> None:
        self.window.fill_solo(_keys)

    @rule(data=st.data())
    @precondition(lambda self: self.window.params > 0)
    def complete_some(self, data: st.DataObject) -> None:
        keys = [k for e in self.window.entries() for k in e.keys.watch]
        chosen = data.draw(st.lists(st.sampled_from(keys), max_size=4))
        for entry in self.window.complete(chosen):
            self.finished.append(self.window.remove(entry.param_id).param_id)

    @rule(data=st.data(), lane=st.sampled_from(list(Lane)))
    @precondition(lambda self: self.window.params > 0)
    def requeue(self, data: st.DataObject, lane: Lane) -> None:
        entry = data.draw(st.sampled_from(self.window.entries()))
        self.window.remove(entry.param_id)
        self.window.requeue(entry.param, entry.attempt + 1, lane)

    @rule()
    def drop_all(self) -> None:
        for entry in self.window.drop_all():
            self.window.requeue(entry.param, entry.attempt)

    @invariant()
    def each_param_in_exactly_one_place(self) -> None:
        w = self.window
        inflight = [e.param_id for e in w.entries()]
        queued = [a.param.param_id for a in (*w._retry, *w._solo)]
        places = inflight + queued + self.finished
        assert len(places) == len(set(places)), "a param is in two places"
        untaken = self.n - len(places)
        assert w.to_admit == len(queued) + untaken
        assert w.tasks == 3 * len(inflight) and w.sims == 2 * len(inflight)
        assert w.solo_active is None or inflight == [w.solo_active]


TestWindowMachine = WindowMachine.TestCase
