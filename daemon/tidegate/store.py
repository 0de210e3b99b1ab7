"""The ledger: the durable record (SQLite, WAL) of which params are in which committed part.

A part's Parquet files are written and renamed into place first; the part counts as
written only once :meth:`Ledger.commit` has recorded it, its files and its param ids in
one transaction. Anything on disk the ledger does not name is debris from a run that
died between the two, and is removed on resume.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tidegate.errors import TidegateError
from tidegate.migrations import Migration, Schema, migrate

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

LEDGER_SCHEMA = Schema(
    what="tidegate ledger",
    migrations=(Migration(1, "meta, parts and params tables", _V1),),
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

        Raises LedgerMismatch if it holds a job with another fingerprint.
        """
        stored = self._meta()
        if "fingerprint" in stored:
            if stored["fingerprint"] == fingerprint:
                return True
            old = json.loads(stored.get("identity", "{}"))
            differs = sorted(k for k in set(old) | set(identity) if old.get(k) != identity.get(k))
            raise LedgerMismatch(self.path, differs or ["fingerprint"])
        rows = {
            "schema_version": str(SCHEMA_VERSION),
            "job_id": job_id,
            "fingerprint": fingerprint,
            "identity": json.dumps(identity, sort_keys=True, separators=(",", ":")),
        }
        with self._transaction():
            self._db.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", rows.items())
        return False

    def _meta(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT key, value FROM meta").fetchall())

    # --- reading --------------------------------------------------------------------

    def committed_param_ids(self) -> set[str]:
        return {r[0] for r in self._db.execute("SELECT param_id FROM params")}

    def counts(self) -> LedgerCounts:
        ok, failed = self._db.execute(
            "SELECT COALESCE(SUM(status = 'ok'), 0), COALESCE(SUM(status = 'failed'), 0) "
            "FROM params"
        ).fetchone()
        (parts,) = self._db.execute("SELECT COUNT(*) FROM parts").fetchone()
        return LedgerCounts(int(ok), int(failed), int(parts))

    def next_part(self) -> int:
        (last,) = self._db.execute("SELECT COALESCE(MAX(part), -1) FROM parts").fetchone()
        return int(last) + 1

    def files(self) -> set[str]:
        out: set[str] = set()
        for (files,) in self._db.execute("SELECT files FROM parts"):
            out.update(json.loads(files))
        return out

    def bytes_written(self) -> int:
        (total,) = self._db.execute("SELECT COALESCE(SUM(bytes), 0) FROM parts").fetchone()
        return int(total)

    # --- writing --------------------------------------------------------------------

    def commit(
        self, part: int, files: Iterable[str], statuses: Iterable[tuple[str, str]], nbytes: int
    ) -> None:
        """Record a part, its files and its params in one transaction."""
        statuses = list(statuses)
        n_failed = sum(1 for _, s in statuses if s == "failed")
        with self._transaction():
            self._db.execute(
                "INSERT INTO parts VALUES (?, ?, ?, ?, ?, ?)",
                (part, json.dumps(sorted(files)), len(statuses), n_failed, nbytes, time.time()),
            )
            self._db.executemany(
                "INSERT INTO params (param_id, part, status) VALUES (?, ?, ?)",
                ((pid, part, status) for pid, status in statuses),
            )

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *_: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
