"""A params file's rows as a ``ParamSource``, never expanded into Python objects.

The file is read once into an Arrow table (columnar: a numeric value costs 8 bytes, a
million rows of three floats 24 MB) and checked there, column by column, in Arrow's
compute kernels: nulls, integers past 64 bits, non-finite floats, repeated rows. A file
that passes is a ``FileSource``, whose params are made a batch of rows at a time as the
run loop asks for them, so only the params in flight are ever Python objects (a
10^6-row CSV expanded row by row took 12.6 s and 1.1 GiB before the first admission). A file
that fails any check is refused: the caller finds the rows at fault here
(``bad_values``, ``first_repeat``) and reads only those one by one to name them.

Its digest is of the file's bytes (read once, then hashed and parsed, so that the params
and the digest come from the same bytes), the Arrow version that parsed them and the columns'
types: the same digest means the same params in the same order, which is what lets a
resume skip the committed prefix (``params.Pending``) without making its ids.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from tidegate.params import Param, param_id_of

BATCH_ROWS = 4096  # rows made into params at a time: ~2 MB of Python objects
_INT64 = 2**63
_FLOAT_EXACT = 2**53  # every int of at most this magnitude is exactly a float64


# Arrow's JSON reader recurses per level of nesting and overflows its stack (a segfault:
# the daemon dies) somewhere between 5,000 and 20,000 levels on this machine. A params
# row is one flat object, so only a line longer than JSONL_MAX_DEPTH bytes can nest past
# it, and only such lines are looked at: their brackets outside strings counted.
JSONL_MAX_DEPTH = 512
_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"')
_STEPS = pa.array([1 if c in b"[{" else -1 if c in b"]}" else 0 for c in range(256)],
                  pa.int32())


def deep_jsonl_line(data: bytes) -> int | None:
    """The first line (1-based) of JSONL ``data`` whose brackets nest deeper than
    JSONL_MAX_DEPTH, or None. Lines are found in Arrow (0.2 s for 10^6 lines), not in a
    Python loop."""
    n = len(data)
    if n <= JSONL_MAX_DEPTH:
        return None
    raw = pa.Array.from_buffers(pa.uint8(), n, [None, pa.py_buffer(data)])
    # A uint8 scalar: an int64 one makes Arrow widen every byte first (10x slower).
    ends = pc.indices_nonzero(pc.equal(raw, pa.scalar(ord("\n"), pa.uint8())))
    bounds = pa.concat_arrays([pa.array([-1], pa.int64()), ends.cast(pa.int64()),
                               pa.array([n], pa.int64())])
    lengths = pc.subtract(bounds[1:], bounds[:-1])
    for i in pc.indices_nonzero(pc.greater(lengths, JSONL_MAX_DEPTH + 1)).to_pylist():
        line = _STRING.sub(b"", data[bounds[i].as_py() + 1:bounds[i + 1].as_py()])
        if not line:
            continue
        steps = pc.take(_STEPS, pa.Array.from_buffers(pa.uint8(), len(line),
                                                      [None, pa.py_buffer(line)]))
        if pc.max(pc.cumulative_sum(steps)).as_py() > JSONL_MAX_DEPTH:
            return int(i) + 1
    return None


def normalised(table: pa.Table) -> pa.Table:
    """``table`` with dictionary columns (pandas categoricals) as their values and
    float16/float32 columns as float64 (exact; the values a row-by-row read gives)."""
    fields = []
    for f in table.schema:
        t = f.type.value_type if pa.types.is_dictionary(f.type) else f.type
        if pa.types.is_floating(t):
            t = pa.float64()
        fields.append(f.with_type(t))
    return table.cast(pa.schema(fields))


def column_types(table: pa.Table) -> tuple[dict[str, str], dict[str, frozenset[str]]] | None:
    """Each column's type and the types its values can be stored as without loss (as
    ``spec`` gives them for values read one by one), when every value is one a param may
    have and no row repeats another; None when something is wrong: the caller then reads
    only the rows at fault to name them. ``table`` is ``normalised`` and has rows."""
    if bad_values(table, 0) is not None:
        return None
    types: dict[str, str] = {}
    fits: dict[str, frozenset[str]] = {}
    for name, col in zip(table.column_names, table.columns, strict=True):
        t = col.type
        if pa.types.is_boolean(t):
            types[name], fits[name] = "bool", frozenset({"bool"})
        elif pa.types.is_string(t) or pa.types.is_large_string(t):
            types[name], fits[name] = "str", frozenset({"str"})
        elif pa.types.is_integer(t):
            lo, hi = _bounds(col)  # within int64: bad_values refused a uint64 past it
            exact = lo >= -_FLOAT_EXACT and hi <= _FLOAT_EXACT
            types[name], fits[name] = "int", frozenset({"int"} | ({"float"} if exact else set()))
        elif pa.types.is_floating(t):
            lo, hi = _bounds(col)
            whole = (pc.all(pc.equal(pc.floor(col), col)).as_py()
                     and lo >= -_INT64 and hi < _INT64)
            types[name], fits[name] = "float", frozenset({"float"} | ({"int"} if whole else set()))
        else:
            return None
    if first_repeat(table) is not None:
        return None
    return types, fits


def bad_values(table: pa.Table, limit: int) -> tuple[list[int], int] | None:
    """The first ``limit`` rows holding a value no param may have (null, non-finite, an
    integer past 64 bits), in file order, and how many such values there are in all;
    None when there is none. Found in Arrow, so that naming them reads those rows only."""
    bad: pa.ChunkedArray | None = None
    total = 0
    for col in table.columns:
        mask = pc.is_null(col)
        if pa.types.is_floating(col.type):
            mask = pc.or_(mask, pc.invert(pc.fill_null(pc.is_finite(col), True)))
        elif col.type == pa.uint64():
            mask = pc.or_(mask, pc.fill_null(pc.greater_equal(col, pa.scalar(_INT64, pa.uint64())),
                                             False))
        total += int(pc.sum(mask).as_py() or 0)
        bad = mask if bad is None else pc.or_(bad, mask)
    if not total or bad is None:
        return None
    rows = pc.indices_nonzero(bad.combine_chunks())[:limit]
    return [int(r) for r in rows.to_pylist()], total


def first_repeat(table: pa.Table) -> tuple[int, int] | None:
    """(i, j): the first row j that repeats an earlier row, and the first such earlier
    row i, as a walk of the rows in order would find them; None when rows are distinct.
    Sorted by every column, equal rows are adjacent (Arrow takes -0.0 and 0.0 as equal,
    as Python does): 0.2 s and 15-23 MB above the table at 10^6 rows of four columns,
    where a group-by over the columns took 200 MB and dictionary-encoding each 71 MB."""
    if table.num_rows < 2:
        return None
    names = [f"c{j}" for j in range(table.num_columns)]
    # Stable: within a run of equal rows the indices ascend.
    order = pc.sort_indices(pa.table(table.columns, names=names),
                            sort_keys=[(name, "ascending") for name in names])
    same: pa.Array | None = None
    for col in table.columns:
        ordered = pc.take(col, order)
        equal = pc.equal(ordered[1:], ordered[:-1])
        same = equal if same is None else pc.and_(same, equal)
    assert same is not None
    later = pc.filter(order[1:], same)  # each row with an equal row before it
    if not len(later):
        return None
    j = pc.min(later).as_py()
    # j is the second of its run (the first repeat of any run): its run's first is just
    # before it in sorted order.
    at = pc.index(order, pa.scalar(j, order.type)).as_py()
    return int(order[at - 1].as_py()), int(j)


def _bounds(col: pa.ChunkedArray) -> tuple[int | float, int | float]:
    mm = pc.min_max(col)
    return mm["min"].as_py(), mm["max"].as_py()


def file_digest(data_sha256: str, table: pa.Table) -> str:
    """The digest of a params file read from bytes whose SHA-256 is ``data_sha256``."""
    h = hashlib.sha256(data_sha256.encode())
    h.update(f"\0pyarrow {pa.__version__}\0{table.schema}".encode())
    return "file-" + h.hexdigest()


class FileSource:
    """A params file's rows, in file order, made into params a batch at a time."""

    def __init__(self, table: pa.Table, digest: str, *, typed: bool = False):
        self._table = table
        self._digest = digest
        self._typed = typed

    @property
    def total(self) -> int:
        return self._table.num_rows

    def __iter__(self) -> Iterator[Param]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[Param]:
        typed = self._typed
        # slice() is zero-copy: a resume skips the committed prefix without reading it.
        for batch in self._table.slice(start).to_batches(max_chunksize=BATCH_ROWS):
            for values in batch.to_pylist():  # each a dict in column order
                yield Param(param_id_of(values, typed=typed), values)

    def typed_ids(self) -> FileSource:
        return FileSource(self._table, self._digest, typed=True)

    @property
    def digest(self) -> str | None:
        return f"{self._digest}-typed" if self._typed else self._digest
