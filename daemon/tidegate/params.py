"""Where the run loop takes params from: a ``ParamSource``, iterated as slots free up.

The loop never needs the whole list: it asks a source for the params not yet committed,
one at a time. Today's sources are the spec's expansions (grid, values, file); a search
that is asked for its next point as a slot frees up, or a lazily expanded grid, is
another implementation of the same two members.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Protocol

from tidegate.spec import Param


class ParamSource(Protocol):
    """Params of one job, in a stable order."""

    @property
    def total(self) -> int:
        """How many params the job has (committed ones included)."""
        ...

    def pending(self, committed: Callable[[str], bool]) -> Iterator[Param]:
        """The params for which ``committed(param_id)`` is false, in order, lazily."""
        ...


class ListSource:
    """A source over params already expanded in memory (the spec's grid, values, file)."""

    def __init__(self, params: Sequence[Param]):
        self._params = params

    @property
    def total(self) -> int:
        return len(self._params)

    def pending(self, committed: Callable[[str], bool]) -> Iterator[Param]:
        return (p for p in self._params if not committed(p.param_id))
