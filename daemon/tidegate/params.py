"""A job's params, and where the run loop takes them from: a ``ParamSource``.

The loop never needs the whole list: it asks a source for the params not yet committed,
one at a time, as slots free up. A grid is never expanded: ``GridSource`` walks the
product of its columns lazily and knows its size from their lengths, so a 10^6-param grid
costs nothing until it runs (and only the params in flight are ever held). Params given
one by one (inline values, a file's rows) are a ``ListSource``. A search that is asked for
its next point as a slot frees up is another implementation of the same members.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

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


class Pending:
    """The params of a source that are not committed, walked lazily, once.

    It counts the committed ids it meets on the way, so that once the walk is over the
    committed ids the source never yielded (``orphans``: params removed from the spec)
    are known without a pass of their own before the first admission.
    """

    def __init__(self, source: Iterable[Param], committed: Collection[str]):
        self._source = iter(source)
        self._committed = committed
        self.met: set[str] = set()  # committed ids the walk has passed
        self.exhausted = False

    def __iter__(self) -> Iterator[Param]:
        return self

    def __next__(self) -> Param:
        for p in self._source:
            if p.param_id in self._committed:
                self.met.add(p.param_id)
                continue
            return p
        self.exhausted = True
        raise StopIteration

    def orphans(self) -> set[str] | None:
        """Committed ids not in the source, once the walk is over (else None)."""
        if not self._committed:
            return set()
        if not self.exhausted:
            return None
        return {pid for pid in self._committed if pid not in self.met}


class ListSource:
    """Params already expanded in memory (the spec's inline values, a file's rows)."""

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
        names, typed = self._names, self._typed
        for combo in itertools.product(*self._columns):
            values = dict(zip(names, combo, strict=True))
            yield Param(param_id_of(values, typed=typed), values)

    def typed_ids(self) -> GridSource:
        return GridSource(self._names, self._columns, typed=True)
