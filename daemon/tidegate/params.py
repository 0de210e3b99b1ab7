"""A job's params, and where the run loop takes them from: a ``ParamSource``.

The loop never needs the whole list: it asks a source for the params not yet committed,
one at a time, as slots free up. A grid is never expanded: ``GridSource`` walks the
product of its columns lazily and knows its size from their lengths, so a 10^6-param grid
costs nothing until it runs (and only the params in flight are ever held). Params given
one by one in the spec (inline values) are a ``ListSource``, a params file's rows a
``paramfile.FileSource``. A search that is asked for its next point as a slot frees up
is another implementation of the same members.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import math
from collections import deque
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

Scalar = bool | int | float | str


@dataclass(frozen=True, slots=True)
class Param:
    param_id: str
    values: dict[str, Scalar]  # in Job.param_names order


def canonical(value: Scalar) -> Scalar:
    """The one spelling of a value in its param's id: a whole-number float is its int
    (1.0 is 1, -0.0 is 0), so a value keeps its id whether its column is read as int or
    float; bools and strings are themselves (True is not 1)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def param_id_of(values: Mapping[str, Scalar], *, typed: bool = False) -> str:
    """Stable id of a parameter set: key order does not matter, nor int vs float for a
    whole number (1 and 1.0 are one param). ``typed``: the id releases before canonical
    ids gave (1 and 1.0 differ), kept for their outputs (see Ledger.typed_ids)."""
    if not typed:  # inline, not canonical(): a file's 10^6 rows each pass here
        values = {k: int(v) if type(v) is float and v.is_integer() else v
                  for k, v in values.items()}
    # json writes floats with repr, the shortest spelling that round-trips; for ints,
    # strings, bools and fractional floats the canonical text is the typed one, so
    # their ids did not change when ids became canonical.
    text = json.dumps(dict(values), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


_CASTS: dict[str, Callable[[Scalar], Scalar]] = {"int": int, "float": float}


def typed_as(types: Mapping[str, str]) -> Callable[[Param], Param]:
    """A Param with each value cast to ``types`` (name -> "int" or "float"): the type its
    column has in the committed parts. The id is kept (it is canonical, so the cast
    does not change it); the caller checked that the casts are exact."""
    casts = {n: _CASTS[t] for n, t in types.items()}

    def cast(p: Param) -> Param:
        return Param(p.param_id, {n: casts[n](v) if n in casts else v
                                  for n, v in p.values.items()})
    return cast


class ParamSource(Protocol):
    """Params of one job, in a stable order."""

    @property
    def total(self) -> int:
        """How many params the job has (committed ones included), known without
        expanding them."""
        ...

    def __iter__(self) -> Iterator[Param]:
        """Every param, in order, lazily."""
        ...

    def typed_ids(self) -> ParamSource:
        """The same params with the ids of releases before canonical ids (an output
        written by one keeps its ids)."""
        ...

    @property
    def digest(self) -> str | None:
        """A digest of the params and their order (two sources with one digest yield the
        same params in the same order), or None. A resume skips the leading params the
        ledger's watermark for this digest counts as committed without computing their
        ids (``Pending``); a source without a digest is walked from its first param."""
        ...

    def iter_from(self, start: int) -> Iterator[Param]:
        """The params from position ``start`` on (0 is the first), the ones before it
        skipped without computing their ids."""
        ...


@runtime_checkable
class CommittedIds(Protocol):
    """The ids committed when a run started, asked about a chunk of ids at a time: an
    in-memory set for a small ledger (``InMemoryIds``), SQLite for a large one
    (``store.LedgerIds``), so that a 10^6-param resume never holds every id."""

    def __len__(self) -> int: ...

    def which(self, ids: Sequence[str]) -> AbstractSet[str]:
        """The committed ones among ``ids``, noted as met by the walk."""
        ...

    def unmet(self, source: Iterable[Param], *, walked: bool = True) -> set[str]:
        """The committed ids not in ``source``, asked once its walk is over and met fewer
        than ``len`` of them. ``walked``: the walk asked about every param of the source
        (else it skipped a prefix, whose ids only another walk of it names)."""
        ...


class InMemoryIds:
    """Committed ids held as a set: a small ledger's, or a test's."""

    def __init__(self, ids: Collection[str]):
        self._ids = ids
        self._met: set[str] = set()

    def __len__(self) -> int:
        return len(self._ids)

    def which(self, ids: Sequence[str]) -> set[str]:
        hits = {i for i in ids if i in self._ids}
        self._met |= hits
        return hits

    def unmet(self, source: Iterable[Param], *, walked: bool = True) -> set[str]:
        left = {i for i in self._ids if i not in self._met}
        if not walked:
            for p in source:
                if not left:
                    break
                left.discard(p.param_id)
        return left


class Pending:
    """The params of a source that are not committed, walked lazily, once.

    The source is read ``chunk`` params at a time and the committed ones among each
    chunk are asked for in one look-up (one SQL query against a large ledger). It counts
    the committed ids it meets on the way, so that once the walk is over it knows
    whether any committed id was never yielded (``orphans``: params removed from the
    spec) without a pass of its own before the first admission; only then are they
    named. A source whose ``read_ahead`` is False is read one param at a time: a search
    asks its sampler for each point as a slot frees up, never a chunk ahead.

    ``start``: the source's first ``start`` params are known to be committed (the
    ledger's watermark for its digest), so the walk begins there, their ids never made;
    they count as met. With ``track``, ``done`` says how far that prefix reaches once
    given params are committed: the position of the first param read from the source and
    not committed.
    """

    def __init__(self, source: ParamSource | Iterable[Param],
                 committed: Collection[str] | CommittedIds, *, chunk: int = 256,
                 start: int = 0, track: bool = False):
        if not getattr(source, "read_ahead", True):
            chunk = 1
        if start < 0 or (start and not hasattr(source, "iter_from")):
            raise ValueError(f"cannot start a walk of {type(source).__name__} at {start}")
        self._walked = source  # walked again only to name a large ledger's orphans
        self._source = source.iter_from(start) if start else iter(source)  # type: ignore[union-attr]
        self._committed: CommittedIds = (
            committed if isinstance(committed, CommittedIds) else InMemoryIds(committed))
        self._chunk = chunk
        self._ready: deque[Param] = deque()
        self.start = start
        self.met = start  # committed ids the walk has passed (the prefix's among them)
        self.exhausted = False
        self._read = start  # the source position of the next param read
        # With ``track``: the params read from the source and not yet committed, id ->
        # position, and their positions as a heap (an entry whose id is done is dropped
        # once it reaches the top). Bounded by the window and the buffered part.
        self._track = track
        self._open: dict[str, int] = {}
        self._heap: list[tuple[int, str]] = []

    def __iter__(self) -> Iterator[Param]:
        return self

    def __next__(self) -> Param:
        while not self._ready:
            batch = list(itertools.islice(self._source, self._chunk))
            if not batch:
                self.exhausted = True
                raise StopIteration
            first, self._read = self._read, self._read + len(batch)
            hits: AbstractSet[str] = (self._committed.which([p.param_id for p in batch])
                                      if len(self._committed) else frozenset())
            self.met += len(hits)
            for k, p in enumerate(batch, first):
                if p.param_id in hits:
                    continue
                self._ready.append(p)
                if self._track:
                    self._open[p.param_id] = k
                    heapq.heappush(self._heap, (k, p.param_id))
        return self._ready.popleft()

    @property
    def read(self) -> int:
        """The source position the walk has read to (read ahead of what it yielded)."""
        return self._read

    def done(self, ids: Iterable[str]) -> int:
        """Note ``ids`` as committed (a part's, in the order parts commit); returns how
        many of the source's leading params are then all committed."""
        if not self._track:
            raise RuntimeError("Pending(track=False) does not know what is committed")
        for i in ids:
            self._open.pop(i, None)
        heap, open_ = self._heap, self._open
        while heap and open_.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else self._read

    def orphans(self) -> set[str] | None:
        """Committed ids not in the source, once the walk is over (else None)."""
        if not len(self._committed):
            return set()
        if not self.exhausted:
            return None
        if self.met == len(self._committed):  # every committed id is still in the spec
            return set()
        return self._committed.unmet(self._walked, walked=not self.start)


class ListSource:
    """Params already expanded in memory (the spec's inline values)."""

    def __init__(self, params: Sequence[Param]):
        self._params = params

    @property
    def total(self) -> int:
        return len(self._params)

    def __iter__(self) -> Iterator[Param]:
        return iter(self._params)

    def typed_ids(self) -> ListSource:
        return ListSource([Param(param_id_of(p.values, typed=True), p.values)
                           for p in self._params])

    @property
    def digest(self) -> str | None:
        return None  # inline values: few enough to walk, and their ids are already made

    def iter_from(self, start: int) -> Iterator[Param]:
        return itertools.islice(self._params, start, None)


class GridSource:
    """The product of a grid's columns (the last name varies fastest), never expanded."""

    def __init__(self, names: Sequence[str], columns: Sequence[Sequence[Scalar]],
                 *, typed: bool = False):
        if len(names) != len(columns):
            raise ValueError(f"{len(names)} names for {len(columns)} columns")
        self._names = list(names)
        self._columns = [list(c) for c in columns]
        self._typed = typed

    @property
    def total(self) -> int:
        return math.prod(len(c) for c in self._columns)

    def __iter__(self) -> Iterator[Param]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[Param]:
        names, typed = self._names, self._typed
        # islice skips in C, before any id is made: 900,000 combinations in about 40 ms.
        for combo in itertools.islice(itertools.product(*self._columns), start, None):
            values = dict(zip(names, combo, strict=True))
            yield Param(param_id_of(values, typed=typed), values)

    def typed_ids(self) -> GridSource:
        return GridSource(self._names, self._columns, typed=True)

    @property
    def digest(self) -> str | None:
        # Types kept (1 and 1.0 are one id but two columns' values), and the id scheme:
        # a typed source yields other ids in the same order.
        body = {"grid": [[n, [[type(v).__name__, v] for v in c]]
                         for n, c in zip(self._names, self._columns, strict=True)],
                "typed": self._typed}
        text = json.dumps(body, separators=(",", ":"), allow_nan=False)
        return "grid-" + hashlib.sha256(text.encode()).hexdigest()
