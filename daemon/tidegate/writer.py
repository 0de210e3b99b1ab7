"""Parquet parts: buffer completed params, write each dataset's part durably, and the
job manifest.

Durability order for a part (commit.py drives it): :meth:`PartWriter.stage_part` writes
every file under a hidden temporary name (``.part-000001.parquet.tmp``: ignored by
pyarrow.dataset discovery and by ``*.parquet`` globs) and fsyncs it; the ledger records
the intent (the part, its files, sizes and sha256); :func:`publish` renames the files
into place and fsyncs the directories; the ledger commits the part. Resume rolls an
intent forward or back (verify.py).

Each model output dataset has one schema, fixed by its first part: a param whose tables
do not fit it (lossless widening casts aside) fails alone, when it is recorded
(:meth:`PartWriter.add`), so that writing a part never fails because of one param.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import socket
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any, NoReturn

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from tidegate.errors import TidegateError
from tidegate.simreturn import SimReturn, TargetResult, TaskError

MANIFEST = "manifest.json"
LEDGER = "_ledger.sqlite"
LOCK = ".tidegate.lock"
# A search's study (Optuna's journal; search.py): part of the job's state like the ledger.
SEARCH_JOURNAL = "search.journal"
DATASET_DIRS = ("params", "model_outputs", "targets")
PART_RE = re.compile(r"^part-(\d{6,})\.parquet$")
_TMP_PREFIX = ".part-"

_ARROW_TYPES = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string()}


def part_name(part: int) -> str:
    return f"part-{part:06d}.parquet"


# errnos that mean "no room": the disk (or a quota, or RLIMIT_FSIZE) is full.
_NO_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class OutputWriteError(TidegateError):
    """Writing the job output failed (disk full, permissions, ...); nothing half-written
    is left under a final name, and what the ledger committed before stays."""

    def __init__(self, path: Path, exc: BaseException):
        self.path = path
        self.no_space = is_no_space(exc)
        reason = "no space left on device" if self.no_space else _reason(exc)
        super().__init__(f"cannot write {path}: {reason}")


def is_no_space(exc: BaseException) -> bool:
    if getattr(exc, "no_space", False) is True:  # a SchemaError of a migration
        return True
    if isinstance(exc, OSError) and exc.errno in _NO_SPACE:
        return True
    if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == 13:
        return True  # SQLITE_FULL
    text = str(exc).lower()
    return "no space left" in text or "disk is full" in text or "file too large" in text


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno:
        return os.strerror(exc.errno).lower()
    return str(exc) or type(exc).__name__


@dataclass(frozen=True, slots=True)
class FileInfo:
    tmp: str  # the hidden temporary name, relative to the job output
    nbytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class WrittenPart:
    part: int
    files: list[str]  # relative to the job output
    nbytes: int
    statuses: list[tuple[str, str]]  # (param_id, "ok" | "failed")
    info: dict[str, FileInfo] = field(default_factory=dict)  # final name -> temporary


@dataclass(slots=True)
class _Buffer:
    param_rows: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, list[pa.Table]] = field(default_factory=dict)
    targets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    nbytes: int = 0


class SchemaMismatch(TidegateError):
    """A param's output table does not fit its dataset's schema."""


def tmp_name(path: str) -> str:
    """The hidden temporary name a part file is written under before its rename."""
    head, _, name = path.rpartition("/")
    tmp = _TMP_PREFIX + name.removeprefix("part-") + ".tmp"
    return f"{head}/{tmp}" if head else tmp


def _widens(got: pa.DataType, want: pa.DataType) -> bool:
    """True if every value of type ``got`` is kept exactly as type ``want``: the same type,
    null to anything, int to float, int to a wider int, float32 to float64, string and
    binary to their large forms."""
    if got == want or pa.types.is_null(got):
        return True
    t = pa.types
    if t.is_integer(got):
        if t.is_float32(want) or t.is_float64(want):
            return True
        if t.is_integer(want):
            if t.is_signed_integer(got) == t.is_signed_integer(want):
                return bool(want.bit_width >= got.bit_width)
            return t.is_unsigned_integer(got) and bool(want.bit_width > got.bit_width)
        return False
    if t.is_floating(got) and t.is_floating(want):
        return bool(want.bit_width >= got.bit_width)
    return (got, want) in ((pa.string(), pa.large_string()), (pa.binary(), pa.large_binary()))


def fit(table: pa.Table, schema: pa.Schema, output: str) -> pa.Table:
    """``table`` as ``schema`` (columns in its order); SchemaMismatch naming every column
    that does not fit, with the expected and the actual type."""
    got = {f.name: f.type for f in table.schema}
    problems: list[str] = []
    for f in schema:
        if f.name not in got:
            problems.append(f"{f.name!r}: expected {f.type}, got no such column")
        elif not _widens(got[f.name], f.type):
            problems.append(f"{f.name!r}: expected {f.type}, got {got[f.name]}")
    extra = [n for n in got if schema.get_field_index(n) < 0]
    problems += [f"{n!r}: not in the dataset (got {got[n]})" for n in extra]
    if problems:
        raise SchemaMismatch(
            f"output {output!r} does not fit the schema its dataset got from its first "
            f"part: {'; '.join(problems)} (if the model's outputs changed on purpose, rerun "
            "with --restart: it recomputes every param under the new schema)"
        )
    if table.schema.remove_metadata() == schema:
        return table
    return table.select(schema.names).cast(schema)


def storable_schema(table: pa.Table, output: str) -> pa.Schema:
    """The schema ``table`` has once written to and read back from Parquet (what a
    dataset's first part fixes); SchemaMismatch if Parquet cannot store it."""
    sink = pa.BufferOutputStream()
    try:
        pq.write_table(table.schema.empty_table(), sink)
    except (pa.ArrowException, ValueError, TypeError) as exc:
        types = ", ".join(f"{f.name!r} {f.type}" for f in table.schema)
        raise SchemaMismatch(
            f"output {output!r} cannot be stored in Parquet (columns {types}): {exc}"
        ) from None
    return pq.read_schema(pa.BufferReader(sink.getvalue())).remove_metadata()


@dataclass(frozen=True, slots=True)
class TakenPart:
    """A part's buffered rows and tables, detached from the writer, not yet written."""

    part: int
    buf: _Buffer

    @property
    def params(self) -> int:
        return len(self.buf.param_rows)


class PartWriter:
    """Collects completed params and writes them as one part per flush."""

    def __init__(
        self,
        root: Path,
        param_names: Sequence[str],
        param_types: Mapping[str, str],
        outputs: str | Sequence[str],
        targets: Sequence[str],
    ):
        self.root = root
        self._param_names = list(param_names)
        self._outputs = outputs
        self._targets = list(targets)
        self._params_schema = pa.schema(
            [pa.field("param_id", pa.string(), nullable=False)]
            + [pa.field(f"param_{n}", _ARROW_TYPES[param_types[n]]) for n in self._param_names]
            + [
                pa.field("seeds", pa.list_(pa.int64())),
                pa.field("status", pa.string(), nullable=False),
                pa.field("error_type", pa.string()),
                pa.field("error", pa.string()),
                pa.field("traceback", pa.string()),
            ]
        )
        self._buf = _Buffer()
        # Each model output's schema, fixed by its first part (read back on resume) or,
        # before any, by the first param that produced it.
        self.schemas: dict[str, pa.Schema] = {}

    @property
    def pending_params(self) -> int:
        return len(self._buf.param_rows)

    @property
    def pending_bytes(self) -> int:
        return self._buf.nbytes

    def wants_output(self, name: str) -> bool:
        return self._outputs == "all" or (self._outputs != "none" and name in self._outputs)

    @property
    def wants_outputs(self) -> bool:
        return self._outputs != "none"

    def add(
        self,
        param_id: str,
        values: Mapping[str, Any],
        seeds: Sequence[int],
        error: TaskError | None,
        sims: Iterable[SimReturn],
        targets: Iterable[TargetResult],
    ) -> TaskError | None:
        """Buffer one completed param: its row, its model outputs and its target rows.

        Returns the error recorded for it: ``error``, or, when its outputs do not fit
        their datasets' schemas, an ``OutputSchemaError`` (the param then fails alone and
        none of its tables or target rows is written)."""
        sims, targets = list(sims), list(targets)
        tables: dict[str, list[pa.Table]] = {}
        try:
            tables = self._fitted(sims)
        except SchemaMismatch as exc:
            error = TaskError("OutputSchemaError", str(exc))
            tables, targets = {}, []
        row: dict[str, Any] = {"param_id": param_id}
        for name in self._param_names:
            row[f"param_{name}"] = values[name]
        row["seeds"] = list(seeds)
        row["status"] = "ok" if error is None else "failed"
        row["error_type"] = error.type if error else None
        row["error"] = str(error) if error else None
        row["traceback"] = (error.traceback or None) if error else None
        self._buf.param_rows.append(row)
        for name, chunks in tables.items():
            self._buf.outputs.setdefault(name, []).extend(chunks)
            # get_total_buffer_size, not nbytes: nbytes walks every buffer to count a
            # shared one once, a cost per param the loop pays for short sims.
            self._buf.nbytes += sum(t.get_total_buffer_size() for t in chunks)
        for result in targets:
            if result.error is None and result.target is not None:
                self._buf.targets.setdefault(result.target, []).append(
                    {
                        "param_id": param_id,
                        "loss": result.loss,
                        "n_replicates": len(result.replicates),
                        "diagnostics": json.dumps(result.diagnostics, sort_keys=True, default=str),
                    }
                )
        return error

    def _fitted(self, sims: Sequence[SimReturn]) -> dict[str, list[pa.Table]]:
        """The param's tables per output, each cast to its dataset's schema; a schema
        seen first here is fixed only once the whole param fits."""
        new: dict[str, pa.Schema] = {}
        out: dict[str, list[pa.Table]] = {}
        for sim in sims:
            if sim.error is not None:
                continue
            for name in sim.outputs:
                if not self.wants_output(name):
                    continue
                table = sim.table(name)
                n = table.num_rows
                table = (
                    table.add_column(0, "seed", pa.array([sim.seed] * n, pa.int64()))
                    .add_column(0, "replicate", pa.array([sim.replicate] * n, pa.int32()))
                    .add_column(0, "param_id", pa.array([sim.param_id] * n, pa.string()))
                )
                schema = self.schemas.get(name) or new.get(name)
                if schema is None:
                    schema = new[name] = storable_schema(table, name)
                out.setdefault(name, []).append(fit(table, schema, name))
        self.schemas.update(new)
        return out

    def write_part(self, part: int) -> WrittenPart:
        """Write every buffered dataset as part ``part`` (staged, then published) and
        clear the buffer; without a ledger in between (tests, tools)."""
        staged = self.stage_part(part)
        publish(self.root, staged)
        return staged

    def stage_part(self, part: int) -> WrittenPart:
        """Write every buffered dataset as part ``part`` under hidden temporary names,
        fsynced, and clear the buffer; OutputWriteError (temporaries removed) if a write
        fails. Nothing is visible to readers until :func:`publish`."""
        return self.write_taken(self.take(part))

    def take(self, part: int) -> TakenPart:
        """Detach what is buffered as part ``part``, to be written by :meth:`write_taken`
        (in another thread if need be: it touches nothing of the writer's)."""
        buf, self._buf = self._buf, _Buffer()
        return TakenPart(part, buf)

    def write_taken(self, taken: TakenPart) -> WrittenPart:
        """Write a detached part under hidden temporary names, fsynced; OutputWriteError
        (temporaries removed) if a write fails."""
        part, buf = taken.part, taken.buf
        name = part_name(part)
        tables: dict[str, pa.Table] = {
            f"params/{name}": pa.Table.from_pylist(buf.param_rows, schema=self._params_schema)
        }
        for output, chunks in buf.outputs.items():
            # Every chunk already has the dataset's schema (add() cast it).
            tables[f"model_outputs/{output}/{name}"] = pa.concat_tables(chunks)
        for target, rows in buf.targets.items():
            tables[f"targets/{target}/{name}"] = pa.Table.from_pylist(rows, schema=_TARGET_SCHEMA)
        info: dict[str, FileInfo] = {}
        try:
            for rel, table in tables.items():
                info[rel] = _write_durably(table, self.root, rel)
        except BaseException as exc:
            for rel in tables:
                (self.root / tmp_name(rel)).unlink(missing_ok=True)
            if isinstance(exc, OSError | pa.ArrowException):
                raise OutputWriteError(self.root / tmp_name(rel), exc) from exc
            raise
        statuses = [(r["param_id"], r["status"]) for r in buf.param_rows]
        nbytes = sum(i.nbytes for i in info.values())
        return WrittenPart(part, sorted(tables), nbytes, statuses, info)


def publish(root: Path, part: WrittenPart) -> None:
    """Rename a staged part's files into place and fsync their directories."""
    dirs: set[Path] = set()
    for rel, info in part.info.items():
        path = root / rel
        try:
            os.replace(root / info.tmp, path)
        except OSError as exc:
            raise OutputWriteError(path, exc) from exc
        dirs.add(path.parent)
    for d in dirs:
        _fsync(d, os.O_RDONLY | os.O_DIRECTORY)


def unpublish(root: Path, part: WrittenPart) -> None:
    """Remove a part's files, final and temporary (a part the ledger could not commit)."""
    for rel, info in part.info.items():
        (root / rel).unlink(missing_ok=True)
        (root / info.tmp).unlink(missing_ok=True)


def remove_files(root: Path, files: Iterable[str]) -> None:
    """Remove part files the ledger no longer names (a replaced part's) and fsync their
    directories; a file already gone is no error (a resume finishing the removal)."""
    dirs: set[Path] = set()
    for rel in files:
        path = root / rel
        path.unlink(missing_ok=True)
        dirs.add(path.parent)
    for d in dirs:
        if d.is_dir():
            _fsync(d, os.O_RDONLY | os.O_DIRECTORY)


def sha256_of(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


_TARGET_SCHEMA = pa.schema(
    [
        pa.field("param_id", pa.string(), nullable=False),
        pa.field("loss", pa.float64()),
        pa.field("n_replicates", pa.int32()),
        pa.field("diagnostics", pa.string()),
    ]
)


def _write_durably(table: pa.Table, root: Path, rel: str) -> FileInfo:
    tmp_rel = tmp_name(rel)
    tmp = safe_path(root, tmp_rel)  # no directory on the way is a link out of the output
    with os.fdopen(_create_new(tmp), "wb") as f:
        pq.write_table(table, f, compression="zstd")
        f.flush()
        os.fsync(f.fileno())
    # The checksum is read back from the page cache right after the write.
    return FileInfo(tmp_rel, tmp.stat().st_size, sha256_of(tmp))


def write_without(root: Path, src: str, dst: str, drop: AbstractSet[str]) -> FileInfo:
    """Write part file ``src``'s rows whose param_id is not in ``drop`` as ``dst``, under
    its hidden temporary name, fsynced (as a staged part's files are); the schema is
    ``src``'s, so a file left with no rows still carries its dataset's schema. Read and
    written a row group at a time: a part is never held whole."""
    tmp_rel = tmp_name(dst)
    tmp = safe_path(root, tmp_rel)
    source = pq.ParquetFile(root / src)
    schema = source.schema_arrow
    unwanted = pa.array(sorted(drop), pa.string())
    try:
        with os.fdopen(_create_new(tmp), "wb") as f:
            with pq.ParquetWriter(f, schema, compression="zstd") as out:
                for batch in source.iter_batches():
                    keep = pc.invert(pc.is_in(batch.column("param_id"), value_set=unwanted))
                    kept = batch.filter(keep)
                    if kept.num_rows:
                        out.write_batch(kept)
            f.flush()
            os.fsync(f.fileno())
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError | pa.ArrowException):
            raise OutputWriteError(tmp, exc) from exc
        raise
    finally:
        source.close()
    return FileInfo(tmp_rel, tmp.stat().st_size, sha256_of(tmp))


def _create_new(path: Path) -> int:
    """A descriptor on a new file at ``path``, for writing: a stale temporary is removed
    first, and the file is created exclusively without following links, so that a link
    planted under a temporary's name is never written through."""
    path.unlink(missing_ok=True)  # unlinks a link itself, never its target
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                   0o644)


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class OutputError(TidegateError):
    """A job output tidegate must not write to as it is."""


class UnsafeOutput(OutputError):
    """A dataset directory in a job output is a symbolic link (or a path leaves it)."""


class OutputLocked(OutputError):
    """Another run holds the job output's lock."""


def _is_part_file(name: str) -> bool:
    return bool(PART_RE.match(name)) or (name.startswith(_TMP_PREFIX) and name.endswith(".tmp"))


def safe_path(root: Path, rel: str) -> Path:
    """``root / rel`` with its parent directories created, none of them a symbolic link,
    so that no part is ever written through a link out of the output."""
    parts = PurePosixPath(rel).parts
    if not parts or PurePosixPath(rel).is_absolute() or any(p in ("", ".", "..") for p in parts):
        raise UnsafeOutput(f"{rel!r} is not a path inside the job output {root}")
    d = root
    for part in parts[:-1]:
        d = d / part
        if d.is_symlink():
            raise UnsafeOutput(f"{d} is a symbolic link; tidegate does not write through "
                               "links in a job output (replace it with a directory)")
        d.mkdir(exist_ok=True)
    return d / parts[-1]


def linked_dataset_dirs(root: Path) -> list[Path]:
    """The dataset directories under ``root`` that are symbolic links (never followed)."""
    links: list[Path] = []
    for top in DATASET_DIRS:
        for dirpath, dirnames, _ in _walk(root / top, links):
            links += [Path(dirpath, d) for d in dirnames if Path(dirpath, d).is_symlink()]
    return links


# tidegate's own files at the top of a job output: SQLite, the manifest and a search's
# journal would write through a link planted under one of these names (the lock opens
# with O_NOFOLLOW).
OWN_FILES = (LOCK, LEDGER, LEDGER + "-journal", LEDGER + "-wal", LEDGER + "-shm", MANIFEST,
             SEARCH_JOURNAL)


def check_own_files(root: Path) -> None:
    """UnsafeOutput naming the first of tidegate's own files in ``root`` that is a
    symbolic link."""
    for name in OWN_FILES:
        if (root / name).is_symlink():
            raise UnsafeOutput(
                f"{root / name} is a symbolic link; tidegate neither writes nor deletes "
                "through links in a job output (remove the link; tidegate recreates its "
                "own files)")


def linked_part_files(root: Path) -> list[Path]:
    """Entries named like parts in the dataset directories that are symbolic links;
    linked directories are not entered. (A link at a temporary's name is harmless: the
    write unlinks it first, and no reader takes a temporary for data.)"""
    links: list[Path] = []
    for top in DATASET_DIRS:
        for dirpath, dirnames, filenames in _walk(root / top, []):
            links += [Path(dirpath, n) for n in dirnames + filenames
                      if PART_RE.match(n) and Path(dirpath, n).is_symlink()]
    return sorted(links)


def check_no_links(root: Path) -> None:
    """UnsafeOutput naming the first dataset directory, or else the first part file, that
    is a symbolic link. Checked before anything is deleted (``--restart`` too): a part
    that is a link is neither read, counted nor removed, and a restart that deleted the
    rest and then refused the link would leave nothing to resume."""
    links = linked_dataset_dirs(root)
    if links:
        raise UnsafeOutput(
            f"{links[0]} is a symbolic link; tidegate neither writes nor deletes through "
            f"links in a job output ({len(links)} found; replace them with directories)"
        )
    parts = linked_part_files(root)
    if parts:
        raise UnsafeOutput(
            f"{parts[0]} is a symbolic link; tidegate neither reads, writes nor deletes "
            f"parts through links ({len(parts)} found; replace each with the file it "
            "points to, or remove it, and rerun); nothing was changed"
        )


def _walk(top: Path, links: list[Path]) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk of ``top`` that never follows a link; a linked ``top`` goes to ``links``."""
    if top.is_symlink():
        links.append(top)
        return iter(())
    return os.walk(top, followlinks=False)


def remove_unrecorded(root: Path, recorded: set[str],
                      referenced: Iterable[int] = ()) -> list[str]:
    """Delete part files (and temporaries) under ``root`` that the ledger does not name.
    Links are never followed (and a linked file is never counted as a part). A part file
    whose number a params row still names (``referenced``) is kept even so: it may hold
    the only copy of those params' data.

    Returns the relative paths removed.
    """
    removed: list[str] = []
    keep = set(referenced)
    for top in DATASET_DIRS:
        for dirpath, _, filenames in _walk(root / top, []):
            for name in filenames:
                path = Path(dirpath, name)
                rel = path.relative_to(root).as_posix()
                is_tmp = name.startswith(_TMP_PREFIX) and name.endswith(".tmp")
                if path.is_symlink() or not (is_tmp or PART_RE.match(name)):
                    continue
                m = PART_RE.match(name)
                if m and rel not in recorded and int(m.group(1)) in keep:
                    continue
                if is_tmp or rel not in recorded:
                    path.unlink()
                    removed.append(rel)
    return sorted(removed)


def discard_output(root: Path) -> list[str]:
    """Remove what tidegate writes in a job output (for --restart): part files and their
    temporaries in the dataset directories (then those directories, once empty), the
    ledger, the manifest and a search's journal (its told trials are the discarded
    params' results). Nothing else, and nothing through a link. Returns the relative
    paths removed."""
    removed: list[str] = []
    for top in DATASET_DIRS:
        for dirpath, _, filenames in sorted(_walk(root / top, []), reverse=True):
            for name in filenames:
                path = Path(dirpath, name)
                if _is_part_file(name) and not path.is_symlink():
                    path.unlink()
                    removed.append(path.relative_to(root).as_posix())
            with contextlib.suppress(OSError):  # not empty: it holds someone else's files
                Path(dirpath).rmdir()
    for name in (MANIFEST, f".{MANIFEST}.tmp", LEDGER, LEDGER + "-journal", LEDGER + "-wal",
                 LEDGER + "-shm", SEARCH_JOURNAL):
        path = root / name
        if path.is_file() and not path.is_symlink():
            path.unlink()
            removed.append(name)
    return sorted(removed)


def foreign_entries(root: Path) -> list[str]:
    """What makes ``root`` a directory tidegate did not write: its entries, if it is not
    empty and holds neither a manifest nor a ledger ([] otherwise)."""
    try:
        names = sorted(os.listdir(root))
    except (FileNotFoundError, NotADirectoryError):
        return []
    if MANIFEST in names or LEDGER in names:
        return []
    return [n for n in names if n not in (LOCK, f".{MANIFEST}.tmp")]


# Entries the search below an output reads before it gives up: a directory that large
# is not a job output, and walking a whole home directory would stall the start.
NESTED_SEARCH_LIMIT = 10_000


@dataclass(frozen=True, slots=True)
class Around:
    """Other jobs' outputs around an output (:func:`ledgers_around`)."""

    found: list[Path]  # directories holding a tidegate ledger, outer ones first
    gave_up: bool  # the search below stopped after NESTED_SEARCH_LIMIT entries


def ledgers_around(output: Path, root: Path, *,
                   limit: int = NESTED_SEARCH_LIMIT) -> Around:
    """Directories holding a tidegate ledger that ``output`` lies inside (up to and with
    ``root``) or contains (below it, links not followed, at most ``limit`` entries
    read); ``output``'s own ledger is not one of them."""
    output = Path(os.path.abspath(output))
    found = [d for d in reversed(output.parents)
             if d.is_relative_to(root) and (d / LEDGER).exists()]
    seen = 0
    for dirpath, dirnames, filenames in _walk(output, []):
        here = Path(dirpath)
        if here == output:
            dirnames[:] = [d for d in dirnames if d not in DATASET_DIRS]
        elif LEDGER in filenames:
            found.append(here)
            dirnames.clear()
        seen += len(dirnames) + len(filenames)
        if seen > limit:
            return Around(found, gave_up=True)
    return Around(found, gave_up=False)


class NestedOutput(OutputError):
    """An output lies inside, or contains, another job's output."""


def check_not_nested(output: Path, root: Path = Path("/")) -> None:
    """NestedOutput naming the other job's output around ``output``, or saying that the
    search below ``output`` gave up."""
    output = Path(os.path.abspath(output))
    around = ledgers_around(output, root)
    for other in around.found:
        how = "is inside" if output.is_relative_to(other) else "contains"
        raise NestedOutput(
            f"output: {output} {how} another job's output {other} (it holds a tidegate "
            f"ledger, {LEDGER}); give the job an output of its own (--force and "
            "--restart do not change this)")
    if around.gave_up:
        raise NestedOutput(
            f"output: {output} holds more than {NESTED_SEARCH_LIMIT} entries besides "
            "tidegate's own; the search for other jobs' outputs below it stopped there, "
            "so tidegate cannot tell that it would not write into one; give the job an "
            "output of its own")


class OutputNotWritable(OutputError):
    """A job output that cannot be created or written."""


def check_writable(output: Path, *, create: bool) -> None:
    """OutputNotWritable naming ``output`` and why tidegate could not write there: the
    check before any cluster starts. With ``create`` the directory is made (as the run
    would) and a probe file written and removed in it; without (``validate``), the
    nearest existing directory on its way must be writable."""
    output = Path(os.path.abspath(output))
    existing = output
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent

    def refuse(reason: str) -> NoReturn:
        raise OutputNotWritable(
            f"output: expected a directory tidegate can create and write, got {output} "
            f"({reason})")

    if not existing.is_dir():
        refuse(f"{existing} is not a directory")
    if not create:
        if not os.access(existing, os.W_OK | os.X_OK):
            what = "write in" if existing == output else f"create {output} under"
            refuse(f"cannot {what} {existing}: "
                   f"{os.strerror(errno.EROFS) if _read_only(existing) else 'permission denied'}")
        return
    try:
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".tidegate-probe-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        try:
            os.write(fd, b"probe")
        finally:
            os.close(fd)
            probe.unlink(missing_ok=True)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            # A full disk is no bad input: space may be freed. The run goes on to the
            # writes it needs and reports it there (interrupted, exit 130, a rerun resumes).
            return
        refuse(f"{exc.filename or output}: {exc.strerror or exc}")


def _read_only(path: Path) -> bool:
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


class OutputLock:
    """An exclusive lock on a job output (``flock`` on its lock file), held for a run, so
    that one output is written by one run at a time. The holder's pid and host are in
    the file, for the refusal's message."""

    def __init__(self, root: Path):
        self.path = root / LOCK
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
            os.close(fd)
            raise OutputLocked(f"{root} is in use by another run ({holder or 'holder unknown'})"
                               "; wait for it to finish or stop it") from None
        except BaseException:
            os.close(fd)
            raise
        since = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n"
                      .encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def lock_holder(root: Path) -> str | None:
    """The holder line of a run holding ``root``'s lock, or None if none holds it. Read
    only: the lock file is never created. The probe takes a shared lock for an instant
    (flock cannot test without taking), so a run starting in that instant is refused as
    if the output were in use; it is told to wait, and a retry succeeds."""
    try:
        fd = os.open(root / LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # no lock file (no run ever held it) or a link (refused elsewhere)
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "holder unknown"
        return None
    finally:
        os.close(fd)  # releases the shared lock if it was taken


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    """Replace manifest.json atomically."""
    tmp = root / f".{MANIFEST}.tmp"
    try:
        root.mkdir(parents=True, exist_ok=True)
        with os.fdopen(_create_new(tmp), "w", encoding="utf-8") as f:
            f.write(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, root / MANIFEST)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise OutputWriteError(root / MANIFEST, exc) from exc


def read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        return None
