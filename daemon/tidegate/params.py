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
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

Scalar = bool | int | float | str


@dataclass(frozen=True, slots=True)
class Param:
    param_id: str
    values: dict[str, Scalar]  # in Job.param_names order


def param_id_of(values: Mapping[str, Scalar]) -> str:
    """Stable id of a parameter set: 1 and 1.0 differ, key order does not matter."""
    # json writes floats with repr, the shortest spelling that round-trips.
    text = json.dumps(dict(values), sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


class ParamSource(Protocol):
    """Params of one job, in a stable order."""

    @property
    def total(self) -> int:
        """How many params the job has (committed ones included), known without
        expanding them."""
        ...

    @property
    def digest(self) -> str:
        """What identifies this set of params, computed without expanding a grid: two
        sources with one digest yield the same params in the same order."""
        ...

    def __iter__(self) -> Iterator[Param]:
        """Every param, in order, lazily."""
        ...

    def pending(self, committed: Callable[[str], bool]) -> Iterator[Param]:
        """The params for which ``committed(param_id)`` is false, in order, lazily."""
        ...


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class ListSource:
    """Params already expanded in memory (the spec's inline values, a file's rows)."""

    def __init__(self, params: Sequence[Param]):
        self._params = params

    @property
    def total(self) -> int:
        return len(self._params)

    @property
    def digest(self) -> str:
        return "ids:" + _sha256(",".join(p.param_id for p in self._params))

    def __iter__(self) -> Iterator[Param]:
        return iter(self._params)

    def pending(self, committed: Callable[[str], bool]) -> Iterator[Param]:
        return (p for p in self._params if not committed(p.param_id))


class GridSource:
    """The product of a grid's columns (the last name varies fastest), never expanded."""

    def __init__(self, names: Sequence[str], columns: Sequence[Sequence[Scalar]]):
        if len(names) != len(columns):
            raise ValueError(f"{len(names)} names for {len(columns)} columns")
        self._names = list(names)
        self._columns = [list(c) for c in columns]

    @property
    def total(self) -> int:
        return math.prod(len(c) for c in self._columns)

    @property
    def digest(self) -> str:
        # json keeps 1 and 1.0 apart, as param ids do; the order of names is the order
        # of the product, so it is part of what identifies the params' order.
        shape = json.dumps([[n, c] for n, c in zip(self._names, self._columns, strict=True)],
                           separators=(",", ":"), allow_nan=False)
        return "grid:" + _sha256(shape)

    def __iter__(self) -> Iterator[Param]:
        names = self._names
        for combo in itertools.product(*self._columns):
            values = dict(zip(names, combo, strict=True))
            yield Param(param_id_of(values), values)

    def pending(self, committed: Callable[[str], bool]) -> Iterator[Param]:
        return (p for p in self if not committed(p.param_id))
