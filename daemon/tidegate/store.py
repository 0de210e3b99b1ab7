"""The ledger: the durable record (SQLite, WAL) of which params are in which committed part.

A part's Parquet files are written under hidden temporary names first; the ledger
records the intent (:meth:`Ledger.record_intent`: the part, its files with their sizes
and sha256, its params), the files are renamed into place, and the part counts as
written only once :meth:`Ledger.commit` has recorded it, its files and its param ids in
one transaction. Resume rolls a leftover intent forward or back (verify.py); part files
the ledger names neither as committed nor as intended are debris, removed on resume.
"""

from __future__ import annotations

import itertools
import json
import sqlite3
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidegate.errors import TidegateError
from tidegate.migrations import Migration, Schema, migrate
from tidegate.params import Param

# Version 1 is the schema of the releases that recorded no version; never edit it, add a
# migration (see docs/operations.md, "State and output schema versions").
_V1 = """
CREATE TABLE IF NOT EXISTS meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS parts (
    part         INTEGER PRIMARY KEY,
    files        TEXT    NOT NULL,   -- JSON list of paths relative to the job output
    n_params     INTEGER NOT NULL,
    n_failed     INTEGER NOT NULL,
    bytes        INTEGER NOT NULL,
    committed_at REAL    NOT NULL
);
CREATE TABLE IF NOT EXISTS params (
    param_id TEXT PRIMARY KEY,       -- the primary key is the exactly-once guarantee
    part     INTEGER NOT NULL REFERENCES parts(part),
    status   TEXT    NOT NULL CHECK (status IN ('ok', 'failed'))
);
"""

# Version 2: each committed file's size and sha256 (resume and `tidegate verify` check
# them; parts of version 1 have none, and are checked by their total size), and the
# intents: a part whose files are written and about to be renamed into place.
_V2 = """
CREATE TABLE part_files (
    part   INTEGER NOT NULL REFERENCES parts(part) ON DELETE CASCADE,
    file   TEXT    NOT NULL,         -- relative to the job output
    bytes  INTEGER NOT NULL,
    sha256 TEXT    NOT NULL,
    PRIMARY KEY (part, file)
);
CREATE TABLE intents (
    part       INTEGER PRIMARY KEY,
    files      TEXT NOT NULL,        -- JSON {file: {"tmp": ..., "bytes": ..., "sha256": ...}}
    statuses   TEXT NOT NULL,        -- JSON [[param_id, status], ...]
    created_at REAL NOT NULL
);
"""

# Version 3: an intent may replace a committed part (a part rewritten without some of
# its params, for --retry-failed): committing it swaps the two in one transaction.
_V3 = """
ALTER TABLE intents ADD COLUMN replaces INTEGER;  -- the committed part it replaces, or NULL
"""

# Version 4: the hash of the code each part was computed with (codepaths.py; NULL for
# parts of earlier releases), on its intent too so that a rolled-forward part keeps it.
_V4 = """
ALTER TABLE parts ADD COLUMN code_hash TEXT;
ALTER TABLE intents ADD COLUMN code_hash TEXT;
"""

# Version 5: an index of params by part. Resume checks each committed part's params
# against its files (part_param_ids, one query a part) and forgetting a part deletes its
# params: without it each was a scan of the whole table. With 900,000 of 10^6 params
# committed in 900 parts, Commit.resume took 243.5 s without it and 20.0 s with it (one
# run each on a loaded machine).
_V5 = """
CREATE INDEX params_part ON params (part);
"""

# Version 6: how far each param source's leading params are all committed (its
# watermark), so that a resume starts its walk there instead of making the id of every
# param it already holds (with 900,000 of 10^6 committed: 10.4 s of walking before the
# first admission). Written in a part's own commit transaction; any params row deleted
# or changed (a retry, a prune, a repair) forgets every watermark, so one is never
# ahead of the committed rows.
_V6 = """
CREATE TABLE watermarks (
    source   TEXT PRIMARY KEY,   -- the digest of a param source (ParamSource.digest)
    position INTEGER NOT NULL    -- its first `position` params are all committed
);
CREATE TRIGGER watermarks_forget_deleted AFTER DELETE ON params
BEGIN
    DELETE FROM watermarks;
END;
CREATE TRIGGER watermarks_forget_updated AFTER UPDATE ON params
BEGIN
    DELETE FROM watermarks;
END;
"""

LEDGER_SCHEMA = Schema(
    what="tidegate ledger",
    migrations=(
        Migration(1, "meta, parts and params tables", _V1),
        Migration(2, "per-file sizes and checksums; part intents", _V2),
        Migration(3, "intents that replace a committed part", _V3),
        Migration(4, "the code hash of each part", _V4),
        Migration(5, "an index of params by part", _V5),
        Migration(6, "each param source's committed prefix (watermark)", _V6),
    ),
    legacy={
        "meta": frozenset({"key", "value"}),
        "parts": frozenset({"part", "files", "n_params", "n_failed", "bytes", "committed_at"}),
        "params": frozenset({"param_id", "part", "status"}),
    },
    remedy="point `output` elsewhere or rerun with --restart to discard it",
)
SCHEMA_VERSION = LEDGER_SCHEMA.newest


class LedgerMismatch(TidegateError):
    """The output directory holds another job's results."""

    def __init__(self, path: Path, differs: list[str]):
        self.path = path
        self.differs = differs
        super().__init__(
            f"{path.parent} already holds results of a different job spec "
            f"(differs in: {', '.join(differs)}); point `output` elsewhere or rerun "
            f"with --restart to discard them"
        )


@dataclass(frozen=True, slots=True)
class RecordedFile:
    bytes: int
    sha256: str
    tmp: str = ""  # intents only: the temporary name the file was written under


@dataclass(frozen=True, slots=True)
class Intent:
    part: int
    files: dict[str, RecordedFile]
    statuses: list[tuple[str, str]]
    replaces: int | None = None  # the committed part this one replaces when committed
    code_hash: str | None = None  # the code its rows were computed with


@dataclass(frozen=True, slots=True)
class CommittedPart:
    part: int
    files: list[str]
    nbytes: int  # the total the part was recorded with
    sizes: dict[str, RecordedFile]  # empty for parts committed by ledger version 1
    n_params: int = 0  # the params it was committed with


@dataclass(frozen=True, slots=True)
class LedgerCounts:
    ok: int
    failed: int
    parts: int

    @property
    def params(self) -> int:
        return self.ok + self.failed


class Ledger:
    """One job's ledger, stored beside its output."""

    def __init__(self, path: Path):
        self.path = path
        # The code hash recorded with each part this process commits (Commit sets it).
        self.code_hash: str | None = None
        path.parent.mkdir(parents=True, exist_ok=True)
        # isolation_level=None: transactions are explicit (BEGIN IMMEDIATE ... COMMIT).
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        try:
            # Migrate first: a file that is not a ledger is refused before anything,
            # even the switch to WAL, writes to it.
            self.schema_version = migrate(self._db, LEDGER_SCHEMA, path)
            self._db.execute("PRAGMA journal_mode=WAL")
            # FULL: a commit survives power loss, not just a process crash; one commit
            # per part makes the cost negligible.
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.execute("PRAGMA foreign_keys=ON")
        except BaseException:
            self._db.close()
            raise

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- identity -------------------------------------------------------------------

    def bind(self, job_id: str, fingerprint: str, identity: Mapping[str, Any]) -> bool:
        """Claim this ledger for a job; True if it already held the same job (a resume).

        The identity leaves the parameter values out, so a job whose values grew or
        shrank binds as the same job. A ledger of a release whose identity held the
        values (a digest of them, or every param id) is adopted when the rest matches;
        its params keep the ids that release gave them (``typed_ids``). Raises
        LedgerMismatch if it holds a job that differs in anything else.
        """
        stored = self._meta()
        if "fingerprint" in stored:
            if stored["fingerprint"] == fingerprint:
                return True
            old = json.loads(stored.get("identity", "{}"))
            legacy = {"params", "param_ids"} & set(old)
            if legacy:
                old = {k: v for k, v in old.items() if k not in legacy}
                if isinstance(old.get("param_names"), list):
                    old["param_names"] = sorted(old["param_names"])
            differs = sorted(k for k in set(old) | set(identity)
                             if old.get(k) != identity.get(k))
            if legacy and not differs:
                self._write_identity(job_id, fingerprint, identity, typed_ids=True)
                return True
            raise LedgerMismatch(self.path, differs or ["fingerprint"])
        self._write_identity(job_id, fingerprint, identity)
        return False

    def typed_ids(self) -> bool:
        """Whether this ledger's params have the ids of releases before canonical ids
        (where 1 and 1.0 were two params): a rerun gives its params those ids."""
        return self._meta().get("param_id_scheme") == "typed"

    def _write_identity(self, job_id: str, fingerprint: str, identity: Mapping[str, Any],
                        *, typed_ids: bool = False) -> None:
        rows = {
            "schema_version": str(SCHEMA_VERSION),
            "job_id": job_id,
            "fingerprint": fingerprint,
            "identity": _identity_text(identity),
        }
        if typed_ids:
            rows["param_id_scheme"] = "typed"
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows.items())

    def code(self) -> tuple[str, dict[str, str] | None] | None:
        """The code hash the output was last run with and its files' hashes (None when
        not kept), or None if no run recorded one."""
        meta = self._meta()
        if "code_hash" not in meta:
            return None
        return meta["code_hash"], json.loads(meta.get("code_files") or "null")

    def set_code(self, code_hash: str, files: Mapping[str, str] | None) -> None:
        kept = None if files is None else dict(files)
        rows = {"code_hash": code_hash, "code_files": json.dumps(kept, sort_keys=True)}
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows.items())

    def part_code_hashes(self) -> dict[int, str | None]:
        rows = self._db.execute("SELECT part, code_hash FROM parts ORDER BY part")
        return {int(p): h for p, h in rows}

    def _code_of(self, part: int | None) -> str | None:
        if part is None:
            return self.code_hash
        row = self._db.execute("SELECT code_hash FROM parts WHERE part = ?", (part,)).fetchone()
        return row[0] if row else self.code_hash

    def _meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    # --- reading --------------------------------------------------------------------

    def committed_param_ids(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT param_id FROM params")}

    def committed_ids(self, in_memory: int | None = None) -> frozenset[str] | LedgerIds:
        """The ids committed now, for a run's walk to skip: a set when there are at most
        ``in_memory`` (``COMMITTED_IN_MEMORY``), else asked of SQLite a chunk at a time."""
        limit = COMMITTED_IN_MEMORY if in_memory is None else in_memory
        (n,) = self._db.execute("SELECT COUNT(*) FROM params").fetchone()
        if n <= limit:
            return frozenset(self.committed_param_ids())
        return LedgerIds(self._db, self.next_part(), int(n))

    def counts(self) -> LedgerCounts:
        # From the parts' own counts (one row a part), not a scan of every params row:
        # 0.16 s a call with 900,000 committed. Resume's check_parts compares each part's
        # count with its params rows, and nothing changes a params row's status in place.
        ok, failed, parts = self._db.execute(
            "SELECT COALESCE(SUM(n_params - n_failed), 0), COALESCE(SUM(n_failed), 0), "
            "COUNT(*) FROM parts"
        ).fetchone()
        return LedgerCounts(int(ok), int(failed), int(parts))

    def next_part(self) -> int:
        (last,) = self._db.execute(
            "SELECT MAX(COALESCE((SELECT MAX(part) FROM parts), -1), "
            "COALESCE((SELECT MAX(part) FROM intents), -1))"
        ).fetchone()
        return int(last) + 1

    def parts(self) -> list[CommittedPart]:
        sizes: dict[int, dict[str, RecordedFile]] = {}
        for part, file, nbytes, sha in self._db.execute(
            "SELECT part, file, bytes, sha256 FROM part_files"
        ):
            sizes.setdefault(part, {})[file] = RecordedFile(nbytes, sha)
        return [
            CommittedPart(part, json.loads(files), nbytes, sizes.get(part, {}), n_params)
            for part, files, nbytes, n_params in self._db.execute(
                "SELECT part, files, bytes, n_params FROM parts ORDER BY part"
            )
        ]

    def statuses(self, ids: Iterable[str]) -> tuple[int, int]:
        """How many of ``ids`` are committed ok and failed."""
        ok = failed = 0
        for chunk in _chunks(list(ids)):
            for status, n in self._db.execute(
                f"SELECT status, COUNT(*) FROM params WHERE param_id IN "
                f"({','.join('?' * len(chunk))}) GROUP BY status", chunk):
                ok += n if status == "ok" else 0
                failed += n if status == "failed" else 0
        return ok, failed

    def files_of(self, ids: Iterable[str]) -> list[str]:
        """The files of the committed parts that hold any of ``ids``."""
        parts: set[int] = set()
        for chunk in _chunks(list(ids)):
            parts.update(r[0] for r in self._db.execute(
                f"SELECT DISTINCT part FROM params WHERE param_id IN "
                f"({','.join('?' * len(chunk))})", chunk))
        out: list[str] = []
        for part in sorted(parts):
            row = self._db.execute("SELECT files FROM parts WHERE part = ?", (part,)).fetchone()
            out += json.loads(row[0]) if row else []
        return out

    def parts_of(self, ids: Iterable[str]) -> dict[str, int]:
        """The committed part of each of ``ids`` that is committed: param id -> part."""
        out: dict[str, int] = {}
        for chunk in _chunks(list(ids)):
            out.update((pid, int(part)) for pid, part in self._db.execute(
                f"SELECT param_id, part FROM params WHERE param_id IN "
                f"({','.join('?' * len(chunk))})", chunk))
        return out

    def failed_params(self) -> dict[str, int]:
        """Every param recorded as failed (quarantined ones included): param id -> its
        part."""
        return {pid: int(part) for pid, part in self._db.execute(
            "SELECT param_id, part FROM params WHERE status = 'failed' ORDER BY part, param_id")}

    def part_statuses(self, part: int) -> list[tuple[str, str]]:
        return [(pid, st) for pid, st in self._db.execute(
            "SELECT param_id, status FROM params WHERE part = ? ORDER BY param_id", (part,))]

    def part_param_ids(self, part: int) -> list[str]:
        return [r[0] for r in self._db.execute("SELECT param_id FROM params WHERE part = ?",
                                               (part,))]

    def params_per_part(self) -> dict[int, int]:
        """How many params rows name each part: one pass of the part index."""
        return {int(part): int(n) for part, n in self._db.execute(
            "SELECT part, COUNT(*) FROM params GROUP BY part")}

    def dangling_params(self) -> dict[int, int]:
        """Params rows naming a part the ledger does not record (its ``parts`` row was
        deleted by hand): part -> number of such params. Such params count as done but
        have no data."""
        return {int(part): int(n) for part, n in self._db.execute(
            "SELECT part, COUNT(*) FROM params WHERE part NOT IN (SELECT part FROM parts) "
            "GROUP BY part ORDER BY part")}

    def referenced_parts(self) -> set[int]:
        """Every part number a params row names (recorded or not)."""
        return {int(r[0]) for r in self._db.execute("SELECT DISTINCT part FROM params")}

    def intents(self) -> list[Intent]:
        out = []
        for part, files, statuses, replaces, code_hash in self._db.execute(
            "SELECT part, files, statuses, replaces, code_hash FROM intents ORDER BY part"
        ):
            out.append(Intent(
                part,
                {f: RecordedFile(i["bytes"], i["sha256"], i["tmp"])
                 for f, i in json.loads(files).items()},
                [(pid, st) for pid, st in json.loads(statuses)],
                None if replaces is None else int(replaces),
                code_hash,
            ))
        return out

    def files(self) -> set[str]:
        out: set[str] = set()
        for (files,) in self._db.execute("SELECT files FROM parts"):
            out.update(json.loads(files))
        return out

    def bytes_written(self) -> int:
        (total,) = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM parts").fetchone()
        return int(total)

    # --- writing --------------------------------------------------------------------

    def watermark(self, source: str) -> int:
        """How many of the leading params of the source with digest ``source`` are all
        committed (0 if not known)."""
        row = self._db.execute("SELECT position FROM watermarks WHERE source = ?",
                               (source,)).fetchone()
        return int(row[0]) if row else 0

    def commit(
        self,
        part: int,
        files: Iterable[str],
        statuses: Iterable[tuple[str, str]],
        nbytes: int,
        sizes: Mapping[str, RecordedFile] | None = None,
        replaces: int | None = None,
        code_hash: str | None = None,
        watermark: tuple[str, int] | None = None,
    ) -> None:
        """Record a part, its files (with their sizes and checksums) and its params in one
        transaction, and drop its intent. With ``replaces``, the same transaction forgets
        that committed part and its params rows (the new part holds the ones kept), so a
        param is never in both, nor in neither. The part's code hash is ``code_hash``,
        else the replaced part's (its rows were computed by that code), else the
        ledger's ``code_hash``. ``watermark``: (source digest, position), that source's
        first ``position`` params all committed once this part is; the one kept (a
        source of another digest is another spec's order, no longer walked)."""
        statuses = list(statuses)
        n_failed = sum(1 for _, s in statuses if s == "failed")
        code = code_hash or self._code_of(replaces)
        with self._transaction():
            if replaces is not None:
                self._forget(replaces)
            self._db.execute(
                "INSERT INTO parts (part, files, n_params, n_failed, bytes, committed_at, "
                "code_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (part, json.dumps(sorted(files)), len(statuses), n_failed, nbytes, time.time(),
                 code),
            )
            self._db.executemany(
                "INSERT INTO part_files (part, file, bytes, sha256) VALUES (?, ?, ?, ?)",
                ((part, f, r.bytes, r.sha256) for f, r in (sizes or {}).items()),
            )
            self._db.executemany(
                "INSERT INTO params (param_id, part, status) VALUES (?, ?, ?)",
                ((pid, part, status) for pid, status in statuses),
            )
            self._db.execute("DELETE FROM intents WHERE part = ?", (part,))
            if watermark is not None:
                self._db.execute("DELETE FROM watermarks WHERE source != ?", (watermark[0],))
                self._db.execute(
                    "INSERT INTO watermarks (source, position) VALUES (?, ?) "
                    "ON CONFLICT (source) DO UPDATE SET position = excluded.position",
                    watermark)

    def record_intent(
        self, part: int, files: Mapping[str, RecordedFile], statuses: Iterable[tuple[str, str]],
        replaces: int | None = None,
    ) -> None:
        """Record that part ``part``'s files are written under their temporary names and
        about to be renamed into place (to replace committed part ``replaces``, if
        given)."""
        body = {f: {"tmp": r.tmp, "bytes": r.bytes, "sha256": r.sha256}
                for f, r in files.items()}
        with self._transaction():
            self._db.execute(
                "INSERT INTO intents (part, files, statuses, created_at, replaces, code_hash) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (part, json.dumps(body, sort_keys=True), json.dumps(list(statuses)),
                 time.time(), replaces, self._code_of(replaces)),
            )

    def commit_intent(self, intent: Intent) -> None:
        """Roll an intent forward: commit its part as recorded (replacing the part it
        names, if any)."""
        self.commit(intent.part, intent.files, intent.statuses,
                    sum(r.bytes for r in intent.files.values()),
                    {f: RecordedFile(r.bytes, r.sha256) for f, r in intent.files.items()},
                    replaces=intent.replaces, code_hash=intent.code_hash)

    def drop_intent(self, part: int) -> None:
        with self._transaction():
            self._db.execute("DELETE FROM intents WHERE part = ?", (part,))

    def uncommit(self, parts: Iterable[int]) -> int:
        """Forget committed parts (their params are then recomputed by the next run);
        returns the number of params forgotten."""
        parts = list(parts)
        with self._transaction():
            return sum(self._forget(part) for part in parts)

    def _forget(self, part: int) -> int:
        """Inside a transaction: delete a part's params rows (first: they reference it),
        files and row; the number of params rows deleted."""
        n = self._db.execute("DELETE FROM params WHERE part = ?", (part,)).rowcount
        self._db.execute("DELETE FROM part_files WHERE part = ?", (part,))
        self._db.execute("DELETE FROM parts WHERE part = ?", (part,))
        return n

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        if exc_type is not None:
            self._db.execute("ROLLBACK")
            return
        try:
            self._db.execute("COMMIT")
        except BaseException:
            # A COMMIT that fails (SQLITE_FULL) leaves the transaction open.
            if self._db.in_transaction:
                self._db.execute("ROLLBACK")
            raise


# Up to this many committed ids, a resume holds them as a Python set (about 100 bytes an
# id): beyond it the ledger answers "committed?" a chunk at a time (LedgerIds).
COMMITTED_IN_MEMORY = 50_000


class LedgerIds(AbstractSet[str]):
    """The ids committed before a run (in the parts below ``before``), never loaded: a
    walk asks which of a chunk of ids are committed with one query (``which``). The
    committed ids never met (the orphans, when the walk met fewer than ``len``) take a
    second walk of the source into a temporary table and one query (``unmet``): only a
    spec that lost params pays for it, at the end of its run. Parts this run commits
    are not among the ids, as a set of the ids at the start would not hold them."""

    def __init__(self, db: sqlite3.Connection, before: int, count: int):
        self._db, self._before, self._count = db, before, count

    def __len__(self) -> int:
        return self._count

    def __contains__(self, item: object) -> bool:
        return self._db.execute("SELECT 1 FROM params WHERE param_id = ? AND part < ?",
                                (item, self._before)).fetchone() is not None

    def __iter__(self) -> Iterator[str]:
        for (pid,) in self._db.execute("SELECT param_id FROM params WHERE part < ?",
                                       (self._before,)):
            yield pid

    def which(self, ids: Sequence[str]) -> set[str]:
        hits: set[str] = set()
        for chunk in _chunks(list(ids)):
            hits.update(r[0] for r in self._db.execute(
                # No part filter: the primary key's index alone answers (no table row
                # read), and an id this run committed was yielded before, so the walk
                # never asks about it again.
                f"SELECT param_id FROM params WHERE param_id IN "
                f"({','.join('?' * len(chunk))})", chunk))
        return hits

    def unmet(self, source: Iterable[Param], *, walked: bool = True) -> set[str]:
        # Always a second walk of the whole source, so a skipped prefix is walked too.
        db = self._db
        # TEMP: this connection's own table, in a file of its own, never in the ledger.
        db.execute("CREATE TEMP TABLE IF NOT EXISTS walked (param_id TEXT PRIMARY KEY)")
        db.execute("BEGIN")
        try:
            db.execute("DELETE FROM temp.walked")
            it = iter(source)
            while batch := [(p.param_id,) for p in itertools.islice(it, 10_000)]:
                db.executemany("INSERT OR IGNORE INTO temp.walked VALUES (?)", batch)
            out = {r[0] for r in db.execute(
                "SELECT param_id FROM params WHERE part < ? AND param_id NOT IN "
                "(SELECT param_id FROM temp.walked)", (self._before,))}
            db.execute("DELETE FROM temp.walked")
        finally:
            db.execute("COMMIT")
        return out


def _chunks(items: list[str], size: int = 500) -> Iterator[list[str]]:
    """SQLite binds at most 999 variables per statement in older builds."""
    for i in range(0, len(items), size):
        yield items[i : i + size]


def _identity_text(identity: Mapping[str, Any]) -> str:
    return json.dumps(identity, sort_keys=True, separators=(",", ":"))
