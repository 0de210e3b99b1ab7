"""Failed params a person can read, and the circuit breaker that stops a hopeless job.

Pure: no I/O, no clock. Errors of one kind are one group: their type and their message
with numbers, hex ids and paths masked, so ``bad input 3`` and ``bad input 7`` read as
one problem with a count and a few example params (their values, not only their ids).

The breaker (the spec's ``on_error``) judges each completed param of this run in order:
it trips when the first ``stop_after_first`` all failed, or once more than
``max_failed`` failed. A contract error (a model that returns something other than a
mapping of tables, or an id column whose values differ from tidegate's) trips it at
once whatever ``on_error`` says: every param would fail the same way.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

# Where a person reads the tracebacks of a group's params.
TRACEBACK_HINT = "the traceback column of {output}/params (tidegate failures {output})"

EXAMPLES_PER_GROUP = 3
MAX_GROUPS = 50  # a model whose every message is unique must not grow the summary forever
_MESSAGE_CHARS = 500

# Masked in order: paths first (they hold digits), then hex ids, then numbers.
_PATH = re.compile(r"(?<![\w.])(?:[A-Za-z]:)?(?:~|\.{1,2})?(?:[/\\][\w.@+\-]+)+[/\\]?")
_HEX = re.compile(r"\b(?:0x[0-9a-fA-F]+|[0-9a-fA-F]*\d[0-9a-fA-F]*[a-fA-F][0-9a-fA-F]*"
                  r"|[0-9a-fA-F]*[a-fA-F][0-9a-fA-F]*\d[0-9a-fA-F]*)\b")
_NUMBER = re.compile(r"(?<![\w>])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")


def mask(message: str) -> str:
    """``message`` with paths, hex ids and numbers replaced by ``<path>``, ``<hex>`` and
    ``<n>``: what stays is the kind of problem."""
    text = _PATH.sub("<path>", message)
    text = _HEX.sub(lambda m: "<hex>" if len(m[0]) >= 6 or m[0].startswith("0x") else m[0],
                    text)
    return _NUMBER.sub("<n>", text)


def group_key(error_type: str, message: str) -> tuple[str, str]:
    return error_type, mask(message[:_MESSAGE_CHARS])


@dataclass(slots=True)
class Example:
    param_id: str
    values: dict[str, Any]
    message: str

    def as_dict(self) -> dict[str, Any]:
        return {"param_id": self.param_id, "values": self.values, "message": self.message}


@dataclass(slots=True)
class Group:
    type: str
    pattern: str  # the masked message
    count: int = 0
    examples: list[Example] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"type": self.type, "message": self.pattern, "count": self.count,
                "examples": [e.as_dict() for e in self.examples]}

    def line(self) -> str:
        """One line for a log or a terminal: count, kind, and the examples' values."""
        shown = "; ".join(f"{e.param_id} {values_text(e.values)}" for e in self.examples)
        head = f"{self.count} x {self.type}: {self.pattern}" if self.pattern else (
            f"{self.count} x {self.type}")
        return f"{head} (e.g. {shown})" if shown else head


def values_text(values: Mapping[str, Any]) -> str:
    text = "{" + ", ".join(f"{k}={v!r}" for k, v in values.items()) + "}"
    return text if len(text) <= 120 else text[:117] + "...}"


@dataclass(slots=True)
class ErrorGroups:
    """Failed params grouped by kind, biggest group first; at most ``MAX_GROUPS`` kinds
    (the rest are counted in ``other``)."""

    groups: dict[tuple[str, str], Group] = field(default_factory=dict)
    other: int = 0

    def add(self, param_id: str, values: Mapping[str, Any], error_type: str,
            message: str) -> Group | None:
        """Count one failed param; its group, or None if it was one kind too many."""
        key = group_key(error_type, message)
        group = self.groups.get(key)
        if group is None:
            if len(self.groups) >= MAX_GROUPS:
                self.other += 1
                return None
            group = self.groups[key] = Group(*key)
        group.count += 1
        if len(group.examples) < EXAMPLES_PER_GROUP:
            group.examples.append(Example(param_id, dict(values), message[:_MESSAGE_CHARS]))
        return group

    @property
    def failed(self) -> int:
        return sum(g.count for g in self.groups.values()) + self.other

    def ordered(self) -> list[Group]:
        return sorted(self.groups.values(), key=lambda g: -g.count)

    def as_list(self) -> list[dict[str, Any]]:
        return [g.as_dict() for g in self.ordered()]


def groups_of(rows: Sequence[Mapping[str, Any]], param_names: Sequence[str]) -> ErrorGroups:
    """The groups of a params dataset's failed rows (``param_<name>`` columns, status,
    error_type, error) as read back from Parquet."""
    out = ErrorGroups()
    for row in rows:
        if row.get("status") != "failed":
            continue
        error_type = str(row.get("error_type") or "Error")
        text = str(row.get("error") or "")
        message = text.removeprefix(f"{error_type}: ") if text != error_type else ""
        values = {n: row.get(f"param_{n}") for n in param_names}
        out.add(str(row["param_id"]), values, error_type, message)
    return out


# --- the circuit breaker ------------------------------------------------------------------


@dataclass(slots=True)
class Breaker:
    """Counts this run's completed params and says when the job must stop.

    ``stop_after_first`` None and ``max_failed`` None: ``on_error: continue`` (only a
    contract error stops the job)."""

    stop_after_first: int | None = 10
    max_failed: int | None = None
    ok: int = 0
    failed: int = 0
    reason: str | None = None  # set once it tripped

    @classmethod
    def of(cls, on_error: Any) -> Breaker:
        """From the spec's ``on_error``: "continue" or a BreakerSpec-like object."""
        if on_error == "continue":
            return cls(None, None)
        return cls(on_error.stop_after_first, on_error.max_failed)

    def record(self, param_id: str, error_type: str | None, message: str = "", *,
               contract: bool = False) -> str | None:
        """One completed param (``error_type`` None: ok); the reason to stop, once."""
        if self.reason is not None:
            return None
        if error_type is None:
            self.ok += 1
            return None
        self.failed += 1
        if contract:
            self.reason = (f"contract error at param {param_id}: {error_type}: {message}"
                           " (every param would fail alike; fix the model and rerun)")
        elif (self.stop_after_first is not None and self.ok == 0
              and self.failed >= self.stop_after_first):
            self.reason = (f"circuit breaker: the first {self.failed} completed params all "
                           f"failed (on_error.stop_after_first = {self.stop_after_first})")
        elif self.max_failed is not None and self.failed > self.max_failed:
            self.reason = (f"circuit breaker: {self.failed} params failed, more than "
                           f"on_error.max_failed = {self.max_failed}")
        return self.reason
