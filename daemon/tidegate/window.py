"""The in-flight set: which params are admitted, which task keys belong to which, what
waits to be admitted again.

Pure: no asyncio, no Dask, no clock. One map holds what is in flight; every count is
derived from it or from the queues, so nothing kept by hand can drift. A param is in
exactly one place at a time: not yet taken from its source, queued for a retry, queued
to run alone, in flight, or handed back to the caller (completed, quarantined, dropped).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Generic, Protocol, TypeVar


class Keyed(Protocol):
    @property
    def param_id(self) -> str: ...


P = TypeVar("P", bound=Keyed)


@dataclass(frozen=True, slots=True)
class TaskKeys:
    """The task keys of one param on the cluster.

    ``watch``: the keys whose completion means the param is done; ``gather``: the keys
    whose results tidegate needs (a subset of ``sims + finals``). ``fused``: a task of
    the param runs more than one sim (its replicates, or other params too). ``slot``:
    where several params share one task (its one key), this param's place in that
    task's result list; -1 where the task is the param's own.
    """

    sims: tuple[str, ...]
    finals: tuple[str, ...]
    watch: tuple[str, ...]
    gather: tuple[str, ...]
    fused: bool = False
    slot: int = -1

    @property
    def shared(self) -> bool:
        return self.slot >= 0

    @property
    def all(self) -> tuple[str, ...]:
        return self.sims + self.finals


class Lane(StrEnum):
    RETRY = "retry"  # admitted again before any new param
    SOLO = "solo"  # a suspect: runs alone, once nothing else is in flight


@dataclass(frozen=True, slots=True)
class Admission(Generic[P]):
    param: P
    attempt: int
    solo: bool = False


@dataclass(slots=True)
class Entry(Generic[P]):
    param: P
    attempt: int
    keys: TaskKeys
    solo: bool
    waiting: set[str] = field(default_factory=set)  # watched keys not yet completed

    @property
    def param_id(self) -> str:
        return self.param.param_id


Submit = Callable[[Sequence[Admission[P]]], Sequence[TaskKeys]]


class Window(Generic[P]):
    """Params in flight, by param id, and the queues that feed it."""

    def __init__(self, fresh: Iterator[P], fresh_count: int, *, solo_beside: bool = False,
                 exact: bool = True):
        # solo_beside: a suspect claims a whole worker (the cluster keeps everything else
        # off it), so it is admitted beside the others instead of after a drain.
        self.solo_beside = solo_beside
        self._drained_solo: str | None = None  # the suspect fill_solo admitted last
        self._fresh = fresh
        # exact=False: fresh_count is an estimate (a resumed source skips committed ids
        # it cannot count in advance): the window takes params until the source ends,
        # counting at least one left until then.
        self._exact = exact
        self._fresh_left = fresh_count if exact else max(1, fresh_count)
        self._retry: deque[Admission[P]] = deque()
        self._solo: deque[Admission[P]] = deque()
        self._inflight: dict[str, Entry[P]] = {}
        # Every task key in flight -> the ids of the params it runs (several where params
        # share a task).
        self._owner: dict[str, list[str]] = {}

    # --- derived counts ---------------------------------------------------------------

    @property
    def params(self) -> int:
        return len(self._inflight)

    @property
    def tasks(self) -> int:
        return len(self._owner)

    @property
    def sims(self) -> int:
        """Sim tasks in flight (a task several params share counts once)."""
        return len({k for e in self._inflight.values() for k in e.keys.sims})

    @property
    def to_admit(self) -> int:
        """Params waiting to be admitted: new ones, retries and suspects."""
        return self._fresh_left + len(self._retry) + len(self._solo)

    @property
    def queued(self) -> int:
        """Params waiting to be admitted again (retries and suspects)."""
        return len(self._retry) + len(self._solo)

    @property
    def finished(self) -> bool:
        return self.to_admit == 0 and not self._inflight

    @property
    def solo_active(self) -> str | None:
        """The suspect running alone, if one is: admitted by ``fill_solo`` (once the
        cluster had drained), with nothing admitted beside it since. A suspect admitted
        beside the others is never it, even when the others have left: a cancelled task
        may still run beside it."""
        if len(self._inflight) != 1 or self._drained_solo not in self._inflight:
            return None
        return self._drained_solo

    def is_solo(self, param_id: str) -> bool:
        entry = self._inflight.get(param_id)
        return entry is not None and entry.solo

    @property
    def solo_waiting(self) -> bool:
        return bool(self._solo)

    def __contains__(self, param_id: object) -> bool:
        return param_id in self._inflight

    def get(self, param_id: str) -> Entry[P] | None:
        return self._inflight.get(param_id)

    def owner(self, key: str) -> str | None:
        """The param a task key is of, if it is of one param alone."""
        owners = self._owner.get(key)
        return owners[0] if owners is not None and len(owners) == 1 else None

    def owners(self, key: str) -> tuple[str, ...]:
        """Every param a task key runs."""
        return tuple(self._owner.get(key, ()))

    def entries(self) -> list[Entry[P]]:
        return list(self._inflight.values())

    # --- admission ----------------------------------------------------------------------

    def fill(self, room: int, submit: Submit[P]) -> int:
        """Admit up to ``room`` params (retries first, then new ones) through ``submit``,
        which returns each one's task keys; returns how many were admitted. If ``submit``
        raises, the params go back where they came from."""
        if room <= 0:
            return 0
        if not self.solo_beside and (self._solo or self.solo_active is not None):
            return 0
        batch: list[Admission[P]] = []
        while self.solo_beside and self._solo and len(batch) < room:
            batch.append(self._solo.popleft())
        while self._retry and len(batch) < room:
            batch.append(self._retry.popleft())
        taken_fresh = 0
        while len(batch) < room and self._fresh_left > 0:
            param = next(self._fresh, None)
            if param is None:  # the source had fewer than it said
                self._fresh_left = 0
                break
            if self._exact or self._fresh_left > 1:
                self._fresh_left -= 1
            taken_fresh += 1
            batch.append(Admission(param, 0))
        return self._submit(batch, submit, taken_fresh)

    def fill_solo(self, submit: Submit[P]) -> str | None:
        """Admit the next suspect alone; the caller checks the cluster is calm. Returns
        its param id, or None if nothing could be admitted."""
        if not self._solo or self._inflight:
            return None
        admission = self._solo.popleft()
        if not self._submit([admission], submit, 0):
            return None
        self._drained_solo = admission.param.param_id
        return self._drained_solo

    def _submit(self, batch: list[Admission[P]], submit: Submit[P], taken_fresh: int) -> int:
        if not batch:
            return 0
        try:
            submitted = submit(batch)
            if len(submitted) != len(batch):
                raise ValueError(f"submit returned {len(submitted)} for {len(batch)} params")
        except BaseException:
            fresh = batch[len(batch) - taken_fresh :]
            for a in reversed(batch[: len(batch) - taken_fresh]):
                (self._solo if a.solo else self._retry).appendleft(a)
            # New params go back in front of the source, in order.
            self._fresh = _chain([a.param for a in fresh], self._fresh)
            self._fresh_left += len(fresh)
            raise
        for admission, keys in zip(batch, submitted, strict=True):
            self._add(admission, keys)
        return len(batch)

    def _add(self, a: Admission[P], keys: TaskKeys) -> None:
        pid = a.param.param_id
        if pid in self._inflight:
            raise ValueError(f"param {pid} is already in flight")
        self._inflight[pid] = Entry(a.param, a.attempt, keys, a.solo, set(keys.watch))
        for key in keys.all:
            self._owner.setdefault(key, []).append(pid)

    # --- completion ---------------------------------------------------------------------

    def complete(self, keys: Sequence[str]) -> list[Entry[P]]:
        """Mark watched keys completed; the params all of whose watched keys are now
        complete, in the order their last key completed. Keys of params no longer in
        flight (cancelled, dropped) are ignored. The params stay in flight until
        ``remove``d."""
        ready: list[Entry[P]] = []
        for key in keys:
            for pid in self._owner.get(key, ()):
                entry = self._inflight.get(pid)
                if entry is None or key not in entry.waiting:
                    continue
                entry.waiting.discard(key)
                if not entry.waiting:
                    ready.append(entry)
        return ready

    def remove(self, param_id: str) -> Entry[P]:
        """Take a param out of flight; its task keys are forgotten."""
        entry = self._inflight.pop(param_id)
        if param_id == self._drained_solo:
            self._drained_solo = None
        for key in entry.keys.all:
            owners = self._owner.get(key)
            if owners is None:
                continue
            if param_id in owners:
                owners.remove(param_id)
            if not owners:
                del self._owner[key]
        return entry

    def requeue(self, param: P, attempt: int, lane: Lane = Lane.RETRY) -> None:
        """Queue a param (not in flight) to be admitted again."""
        if param.param_id in self._inflight:
            raise ValueError(f"param {param.param_id} is still in flight")
        queue = self._solo if lane is Lane.SOLO else self._retry
        queue.append(Admission(param, attempt, solo=lane is Lane.SOLO))

    def drop_all(self) -> list[Entry[P]]:
        """Take every param out of flight (the job is stopping)."""
        return [self.remove(pid) for pid in list(self._inflight)]


def _chain(first: list[P], rest: Iterator[P]) -> Iterator[P]:
    yield from first
    yield from rest
