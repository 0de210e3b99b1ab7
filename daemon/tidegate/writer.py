"""Parquet parts: buffer completed params, write each dataset's part durably, and the
job manifest.

Durability order for a part: write every file under a dot-prefixed temporary name,
fsync it, rename it into place, fsync the directories; only then does the caller record
the part in the ledger. A crash before the ledger commit leaves files the ledger does
not know; :func:`remove_unrecorded` deletes them on resume.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import socket
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from tidegate.errors import TidegateError
from tidegate.schemas import SchemaMismatch, check_writable, fit
from tidegate.simreturn import SimReturn, TargetResult, TaskError

MANIFEST = "manifest.json"
LEDGER = "_ledger.sqlite"
LOCK = ".tidegate.lock"
DATASET_DIRS = ("params", "model_outputs", "targets")
PART_RE = re.compile(r"^part-(\d{6,})\.parquet$")
_TMP_PREFIX = ".part-"

_ARROW_TYPES = {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(), "str": pa.string()}


def part_name(part: int) -> str:
    return f"part-{part:06d}.parquet"


@dataclass(frozen=True, slots=True)
class WrittenPart:
    part: int
    files: list[str]  # relative to the job output
    nbytes: int
    statuses: list[tuple[str, str]]  # (param_id, "ok" | "failed")


@dataclass(slots=True)
class _Buffer:
    param_rows: list[dict[str, Any]] = field(default_factory=list)
    outputs: dict[str, list[pa.Table]] = field(default_factory=dict)
    targets: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    nbytes: int = 0


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
        self._schemas: dict[str, pa.Schema] = {}  # model output -> its dataset's schema

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
        Returns the error recorded for it: ``error``, or why its outputs do not fit their
        datasets (then nothing but its row is buffered, and the rest of the part is
        unharmed)."""
        outputs: list[tuple[str, pa.Table]] = []
        misfit = False
        try:
            outputs = self._fitted(sims)
        except SchemaMismatch as exc:
            misfit = True
            error = error or TaskError("OutputSchemaMismatch", str(exc))
        row: dict[str, Any] = {"param_id": param_id}
        for name in self._param_names:
            row[f"param_{name}"] = values[name]
        row["seeds"] = list(seeds)
        row["status"] = "ok" if error is None else "failed"
        row["error_type"] = error.type if error else None
        row["error"] = str(error) if error else None
        row["traceback"] = (error.traceback or None) if error else None
        self._buf.param_rows.append(row)
        for name, table in outputs:
            self._buf.outputs.setdefault(name, []).append(table)
            self._buf.nbytes += table.nbytes
        if not misfit:  # a param that failed alone leaves no rows in any dataset
            self._add_targets(param_id, targets)
        return error

    def adopt_schema(self, name: str, schema: pa.Schema) -> None:
        """The schema of output ``name`` as its first committed part has it."""
        self._schemas.setdefault(name, schema)

    def _fitted(self, sims: Iterable[SimReturn]) -> list[tuple[str, pa.Table]]:
        """Every wanted output table of ``sims`` with the id columns, fitted to its
        dataset's schema; a dataset's first table fixes it (kept only if the whole param
        fits)."""
        fixed: dict[str, pa.Schema] = {}
        out: list[tuple[str, pa.Table]] = []
        for sim in sims:
            if sim.error is not None:
                continue
            for name in sim.outputs:
                if not self.wants_output(name):
                    continue
                table = _with_ids(sim, sim.table(name))
                schema = self._schemas.get(name) or fixed.get(name)
                if schema is None:
                    check_writable(name, table.schema)
                    fixed[name] = table.schema
                else:
                    table = fit(name, table, schema)
                out.append((name, table))
        self._schemas.update(fixed)
        return out

    def _add_targets(self, param_id: str, targets: Iterable[TargetResult]) -> None:
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

    def write_part(self, part: int) -> WrittenPart:
        """Write every buffered dataset as part ``part`` and clear the buffer."""
        buf, self._buf = self._buf, _Buffer()
        name = part_name(part)
        tables: dict[str, pa.Table] = {
            f"params/{name}": pa.Table.from_pylist(buf.param_rows, schema=self._params_schema)
        }
        for output, chunks in buf.outputs.items():
            # Every chunk was fitted to the dataset's schema when it was added.
            tables[f"model_outputs/{output}/{name}"] = pa.concat_tables(chunks)
        for target, rows in buf.targets.items():
            tables[f"targets/{target}/{name}"] = pa.Table.from_pylist(rows, schema=_TARGET_SCHEMA)
        nbytes = 0
        dirs: set[Path] = set()
        for rel, table in tables.items():
            path = safe_path(self.root, rel)
            nbytes += _write_durably(table, path)
            dirs.add(path.parent)
        for d in dirs:
            _fsync(d, os.O_RDONLY | os.O_DIRECTORY)
        statuses = [(r["param_id"], r["status"]) for r in buf.param_rows]
        return WrittenPart(part, sorted(tables), nbytes, statuses)


def _with_ids(sim: SimReturn, table: pa.Table) -> pa.Table:
    n = table.num_rows
    return (
        table.add_column(0, "seed", pa.array([sim.seed] * n, pa.int64()))
        .add_column(0, "replicate", pa.array([sim.replicate] * n, pa.int32()))
        .add_column(0, "param_id", pa.array([sim.param_id] * n, pa.string()))
    )


_TARGET_SCHEMA = pa.schema(
    [
        pa.field("param_id", pa.string(), nullable=False),
        pa.field("loss", pa.float64()),
        pa.field("n_replicates", pa.int32()),
        pa.field("diagnostics", pa.string()),
    ]
)


def _write_durably(table: pa.Table, path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(_TMP_PREFIX + path.name.removeprefix("part-") + ".tmp")
    pq.write_table(table, tmp, compression="zstd")
    _fsync(tmp)
    os.replace(tmp, path)
    return path.stat().st_size


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


def check_no_links(root: Path) -> None:
    """UnsafeOutput naming the first dataset directory that is a symbolic link."""
    links = linked_dataset_dirs(root)
    if links:
        raise UnsafeOutput(
            f"{links[0]} is a symbolic link; tidegate neither writes nor deletes through "
            f"links in a job output ({len(links)} found; replace them with directories)"
        )


def _walk(top: Path, links: list[Path]) -> Iterator[tuple[str, list[str], list[str]]]:
    """os.walk of ``top`` that never follows a link; a linked ``top`` goes to ``links``."""
    if top.is_symlink():
        links.append(top)
        return iter(())
    return os.walk(top, followlinks=False)


def remove_unrecorded(root: Path, recorded: set[str]) -> list[str]:
    """Delete part files (and temporaries) under ``root`` that the ledger does not name.
    Links are never followed (and a linked file is never counted as a part).

    Returns the relative paths removed.
    """
    removed: list[str] = []
    for top in DATASET_DIRS:
        for dirpath, _, filenames in _walk(root / top, []):
            for name in filenames:
                path = Path(dirpath, name)
                rel = path.relative_to(root).as_posix()
                is_tmp = name.startswith(_TMP_PREFIX) and name.endswith(".tmp")
                if path.is_symlink() or not (is_tmp or PART_RE.match(name)):
                    continue
                if is_tmp or rel not in recorded:
                    path.unlink()
                    removed.append(rel)
    return sorted(removed)


def discard_output(root: Path) -> list[str]:
    """Remove what tidegate writes in a job output (for --restart): part files and their
    temporaries in the dataset directories (then those directories, once empty), the
    ledger and the manifest. Nothing else, and nothing through a link. Returns the
    relative paths removed."""
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
    for name in (MANIFEST, f".{MANIFEST}.tmp", LEDGER, LEDGER + "-wal", LEDGER + "-shm"):
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


def ledgers_around(output: Path, root: Path) -> list[Path]:
    """Directories holding a tidegate ledger that ``output`` lies inside (up to and with
    ``root``) or contains (below it, links not followed); ``output``'s own ledger is not
    one of them."""
    found = [d for d in output.parents if d.is_relative_to(root) and (d / LEDGER).exists()]
    for dirpath, dirnames, filenames in _walk(output, []):
        here = Path(dirpath)
        if here == output:
            dirnames[:] = [d for d in dirnames if d not in DATASET_DIRS]
        elif LEDGER in filenames:
            found.append(here)
            dirnames.clear()
    return found


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
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {since}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor releases the flock
            self._fd = None


def write_manifest(root: Path, manifest: Mapping[str, Any]) -> None:
    """Replace manifest.json atomically."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    _fsync(tmp)
    os.replace(tmp, root / MANIFEST)


def read_manifest(root: Path) -> dict[str, Any] | None:
    try:
        return json.loads((root / MANIFEST).read_text())
    except FileNotFoundError:
        return None
