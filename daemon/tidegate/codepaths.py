"""A job's code: the hash of its code paths and the daemon's snapshot of them.

The hash is over every file's path (relative to its code path, with the code path's
index) and bytes, so it does not depend on the order a directory lists its entries
in, nor on timestamps. Left out, since they are not code a job brings: hidden entries
(``.git``, ``.venv``, tidegate's lock), ``__pycache__`` and ``*.pyc`` (Python writes
them while it imports), the directories named in ``exclude`` (the job's output) and any
directory holding a tidegate ledger (another output), job specs (YAML or JSON files
naming ``model`` and ``parameters``: jobs' input); ``exclude`` may name files too
(the CLI leaves out the job's spec and params file, which are its input, not its
code). A link to a file inside its code path counts as that file's bytes; a link
leading out of the code path, or to a directory, is refused, as is a tree over the size
or file-count bounds.

Standard library only: the CLI hashes the live tree, the daemon copies it into its
state_dir while hashing (one read of each file, so the copy is exactly what was hashed).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import uuid
from collections.abc import Callable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tidegate.errors import TidegateError

MAX_FILES = 10_000
MAX_BYTES = 256 * 2**20
LEDGER_NAME = "_ledger.sqlite"  # writer.LEDGER; not imported: writer pulls in pyarrow
SKIPPED_DIRS = frozenset({"__pycache__"})
SKIPPED_SUFFIXES = (".pyc", ".pyo")
# Job specs beside the model are jobs' input, not code: a new spec in the directory
# must not make every other job's output look computed by other code.
SPEC_SUFFIXES = (".yaml", ".yml", ".json")
_SPEC_KEYS = [re.compile(rf'^[\s{{]*"?{key}"?\s*:', re.MULTILINE)
              for key in ("model", "parameters")]
_SPEC_MAX_BYTES = 1 << 20
_CHUNK = 1 << 20


class CodePathError(TidegateError):
    """A code path that cannot be hashed or snapshotted: missing, too large, or holding
    a link out of its tree. Names the field as the spec does (``code_paths[i]``)."""

    def __init__(self, field: str, expected: str, got: str):
        self.field, self.expected, self.got = field, expected, got
        super().__init__(f"{field}: expected {expected}, got {got}")


@dataclass(frozen=True, slots=True)
class CodeDigest:
    """The hash of a job's code paths and each file's sha256, keyed ``<index>/<path>``."""

    hash: str
    files: dict[str, str] = field(default_factory=dict)
    nbytes: int = 0

    def changes(self, old: dict[str, str]) -> list[str]:
        """What differs from an earlier digest's files: ``+added``, ``-removed``,
        ``~changed``, sorted by path."""
        out = [f"~{k}" for k in self.files if k in old and old[k] != self.files[k]]
        out += [f"+{k}" for k in self.files if k not in old]
        out += [f"-{k}" for k in old if k not in self.files]
        return sorted(out, key=lambda s: s[1:])


def _digest(files: dict[str, str], nbytes: int) -> CodeDigest:
    h = hashlib.sha256()
    for key in sorted(files):
        h.update(f"{key}\0{files[key]}\n".encode())
    return CodeDigest(h.hexdigest(), files, nbytes)


def _bounds_text(max_files: int, max_bytes: int) -> str:
    return (f"code_paths of at most {max_files} files and {max_bytes} bytes together (hidden "
            "entries, __pycache__ and tidegate outputs left out)")


def is_job_spec(path: Path) -> bool:
    """Whether ``path`` looks like a tidegate job spec: a YAML or JSON file of at most
    1 MiB naming both ``model`` and ``parameters`` at the start of a line."""
    if not path.name.lower().endswith(SPEC_SUFFIXES):
        return False
    try:
        with open(path, "rb") as f:
            data = f.read(_SPEC_MAX_BYTES + 1)
    except OSError:
        return False
    if len(data) > _SPEC_MAX_BYTES:
        return False
    text = data.decode("utf-8", errors="replace")
    return all(key.search(text) for key in _SPEC_KEYS)


def _walk(root: Path, field_name: str, exclude: Sequence[Path],
          missing_ok: bool = False) -> Iterator[tuple[str, Path]]:
    """(relative path, path) of every file that counts, in a fixed order."""
    if missing_ok and not root.exists():
        return
    if not root.is_dir():
        got = f"{root} (no such path)" if not root.exists() else f"{root} (not a directory)"
        raise CodePathError(field_name, "an existing directory", got)
    real = root.resolve()
    excluded = {p.resolve() for p in exclude}
    stack = [root]
    while stack:
        here = stack.pop()
        with os.scandir(here) as it:
            entries = sorted(it, key=lambda e: e.name)
        subdirs = []
        for entry in entries:
            name = entry.name
            if name.startswith(".") or name in SKIPPED_DIRS or name.endswith(SKIPPED_SUFFIXES):
                continue
            path = Path(entry.path)
            rel = path.relative_to(root).as_posix()
            if entry.is_symlink():
                target = path.resolve()
                if not target.is_relative_to(real):
                    raise CodePathError(field_name, "files and links inside the code path",
                                        f"{rel}, a link to {target}, outside {root}")
                if target.is_dir():
                    # A link to a directory can loop, or bring a tree in twice.
                    raise CodePathError(field_name, "files and links to files",
                                        f"{rel}, a link to the directory {target}")
                if target.is_file() and target not in excluded and not is_job_spec(target):
                    yield rel, path
                continue
            if entry.is_dir(follow_symlinks=False):
                if path.resolve() in excluded or (path / LEDGER_NAME).exists():
                    continue
                subdirs.append(path)
            elif (entry.is_file(follow_symlinks=False) and path.resolve() not in excluded
                  and not is_job_spec(path)):
                yield rel, path
            # Sockets, FIFOs, devices: not code, and a FIFO would block the read.
        stack.extend(reversed(subdirs))


def _copy_tree(
    paths: Sequence[Path], exclude: Sequence[Path], max_files: int, max_bytes: int,
    dest: Path | None, missing_ok: bool = False,
) -> CodeDigest:
    files: dict[str, str] = {}
    total = 0
    for i, root in enumerate(paths):
        field_name = f"code_paths[{i}]"
        for rel, path in _walk(Path(root), field_name, exclude, missing_ok):
            if len(files) >= max_files:
                raise CodePathError(field_name, _bounds_text(max_files, max_bytes),
                                    f"{root}: more than {max_files} files")
            h = hashlib.sha256()
            out = None
            if dest is not None:
                target = dest / str(i) / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                out = open(target, "xb")  # noqa: SIM115 (closed below)
            try:
                with open(path, "rb") as f:
                    while chunk := f.read(_CHUNK):
                        total += len(chunk)
                        if total > max_bytes:
                            raise CodePathError(
                                field_name, _bounds_text(max_files, max_bytes),
                                f"{root}: more than {max_bytes} bytes (at {rel})")
                        h.update(chunk)
                        if out is not None:
                            out.write(chunk)
                    mode = os.fstat(f.fileno()).st_mode
            finally:
                if out is not None:
                    out.close()
            if dest is not None:
                # Keeps the execute bits: a model may run a script beside it.
                os.chmod(dest / str(i) / rel, stat.S_IMODE(mode) & 0o755 | 0o400)
            files[f"{i}/{rel}"] = h.hexdigest()
    return _digest(files, total)


def hash_code(paths: Sequence[Path], *, exclude: Sequence[Path] = (),
              max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES,
              missing_ok: bool = False) -> CodeDigest:
    """The digest of ``paths`` as they are now; CodePathError if one cannot be hashed
    (``missing_ok``: a missing path counts as empty, for a caller whose spec check
    names it)."""
    return _copy_tree(paths, exclude, max_files, max_bytes, None, missing_ok)


def snapshot_dirs(root: Path, digest: str, n: int) -> list[Path]:
    """The code paths of snapshot ``digest`` under ``root``, one per original path."""
    return [root / digest / str(i) for i in range(n)]


def snapshot_code(paths: Sequence[Path], root: Path, *, exclude: Sequence[Path] = (),
                  max_files: int = MAX_FILES, max_bytes: int = MAX_BYTES,
                  lock: AbstractContextManager[Any] | None = None,
                  placed: Callable[[str], None] | None = None) -> CodeDigest:
    """Copy ``paths`` into ``root/<hash>/<index>/`` and return their digest. The copy is
    made under a hidden name and renamed into place, so a snapshot that exists is whole;
    one that already exists (the same code submitted again) is kept as it is. ``lock``
    is held, and ``placed(hash)`` called, as the snapshot is put in place: a clean-up
    holding the same lock never removes a snapshot whose job is not queued yet."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    try:
        tmp.mkdir()
        for i in range(len(paths)):
            (tmp / str(i)).mkdir()
        digest = _copy_tree(paths, exclude, max_files, max_bytes, tmp)
        final = root / digest.hash
        with lock if lock is not None else contextlib.nullcontext():
            if not final.exists():
                try:
                    os.rename(tmp, final)
                except OSError:
                    if not final.is_dir():  # not a concurrent submission of the same code
                        raise
            if placed is not None:
                placed(digest.hash)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return digest


def remove_snapshots(root: Path, keep: AbstractSet[str], *,
                     temporary: bool = False) -> list[str]:
    """Remove the snapshots under ``root`` whose hash is not in ``keep``; ``temporary``:
    also half-made copies (at start-up, when no submission is under way). The names
    removed."""
    removed: list[str] = []
    if not root.is_dir():
        return removed
    for entry in sorted(root.iterdir()):
        if entry.name in keep or entry.is_symlink() or not entry.is_dir():
            continue
        if entry.name.startswith(".") and not temporary:
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry.name)
    return removed
