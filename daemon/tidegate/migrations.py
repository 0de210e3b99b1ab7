"""Schema versions and migrations for tidegate's SQLite files (the ledger, the job queue).

A file's version is its ``PRAGMA user_version``. Each :class:`Schema` lists its
migrations in order; version N is what migration N leaves. Opening a file applies the
missing migrations, each in its own transaction together with the new version number, so
a migration that fails leaves the file exactly as it was. A file newer than this release
knows is refused, never written.

Files written before versions were recorded have user_version 0 and their version-1
tables: they are recognised by those tables (``Schema.legacy``) and read as version 1.
"""

from __future__ import annotations

import errno
import sqlite3
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from tidegate.errors import TidegateError

Apply = str | Callable[[sqlite3.Connection], None]


class SchemaError(TidegateError):
    """A SQLite file tidegate cannot use: not SQLite, not tidegate's, or a failed migration."""

    def __init__(self, path: Path, message: str):
        self.path = path
        self.no_space = False
        super().__init__(f"{path}: {message}")


class SchemaTooNew(SchemaError):
    """The file was written by a newer tidegate, with a schema this release does not know."""

    def __init__(self, path: Path, what: str, version: int, newest: int):
        self.version = version
        self.newest = newest
        super().__init__(
            path,
            f"{what} schema version {version} is newer than this release supports "
            f"(newest {newest}); upgrade tidegate to use it",
        )


@dataclass(frozen=True, slots=True)
class Migration:
    """What takes a file from ``version - 1`` to ``version``: SQL or a function."""

    version: int
    description: str
    apply: Apply


@dataclass(frozen=True)
class Schema:
    """The migrations of one kind of file, and how to recognise its unversioned form.

    ``what`` names the file in errors ("tidegate ledger"). ``legacy`` maps each table of
    version 1 to its columns; a file with user_version 0 holding them is version 1.
    ``remedy`` ends the message for a file that is not this schema's at all.
    """

    what: str
    migrations: tuple[Migration, ...]
    legacy: Mapping[str, frozenset[str]] = field(default_factory=dict)
    remedy: str = ""

    def __post_init__(self) -> None:
        versions = [m.version for m in self.migrations]
        if versions != list(range(1, len(versions) + 1)):
            raise ValueError(f"{self.what}: migrations must be numbered 1, 2, ...; got {versions}")

    @property
    def newest(self) -> int:
        return len(self.migrations)


def schema_version(db: sqlite3.Connection, schema: Schema, path: Path) -> int:
    """The file's schema version (0 for an empty file); SchemaError if it is not ``schema``'s."""
    try:
        (version,) = db.execute("PRAGMA user_version").fetchone()
        tables = _tables(db)
    except sqlite3.DatabaseError as exc:  # "file is not a database"
        raise SchemaError(
            path, f"not a SQLite database ({exc}); expected a {schema.what}{_then(schema)}"
        ) from None
    if version > 0 or not tables:
        return int(version)
    missing = [t for t, cols in schema.legacy.items() if not cols <= tables.get(t, frozenset())]
    if schema.legacy and not missing:
        return _legacy_version(db, path)
    raise SchemaError(
        path,
        f"not a {schema.what}: expected tables {', '.join(sorted(schema.legacy))}, "
        f"found {', '.join(sorted(tables))}{_then(schema)}",
    )


def _then(schema: Schema) -> str:
    return f"; {schema.remedy}" if schema.remedy else ""


def _legacy_version(db: sqlite3.Connection, path: Path) -> int:
    # The unversioned releases wrote meta.schema_version "1" (the job queue at creation,
    # the ledger once bound); trust it over the tables should it say otherwise.
    try:
        row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    except sqlite3.OperationalError:  # no meta table in this schema
        return 1
    if row is None:
        return 1
    try:
        return int(row[0])
    except ValueError:
        raise SchemaError(
            path, f"meta.schema_version: expected a whole number, got {row[0]!r}"
        ) from None


def migrate(
    db: sqlite3.Connection, schema: Schema, path: Path, *, target: int | None = None
) -> int:
    """Bring the file to ``target`` (default: the newest version); the version it is at.

    ``db`` must be in autocommit mode (``isolation_level=None``): each migration runs in
    its own BEGIN IMMEDIATE ... COMMIT, and the version is read again inside it, so two
    processes opening the same file apply each migration once.
    """
    target = schema.newest if target is None else target
    version = _check(db, schema, path)
    while version < target:
        step = schema.migrations[version]
        db.execute("BEGIN IMMEDIATE")
        try:
            version = _check(db, schema, path)  # another process may have got here first
            if version < step.version:
                _apply(db, step)
                db.execute(f"PRAGMA user_version = {step.version:d}")
                _mirror_meta(db, step.version)
                version = step.version
            db.execute("COMMIT")
        except BaseException as exc:
            if db.in_transaction:
                db.execute("ROLLBACK")
            if isinstance(exc, SchemaError | KeyboardInterrupt | SystemExit):
                raise
            failed = SchemaError(
                path,
                f"{schema.what} migration to version {step.version} ({step.description}) "
                f"failed, the file is unchanged at version {version}: {exc}",
            )
            # A full disk is no fault of the file: the caller ends the run interrupted.
            failed.no_space = _no_space(exc)
            raise failed from exc
    return version


def _no_space(exc: BaseException) -> bool:
    if isinstance(exc, OSError):
        return exc.errno in (errno.ENOSPC, errno.EDQUOT)
    # SQLITE_FULL
    return isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) == 13


def check_current(db: sqlite3.Connection, schema: Schema, path: Path) -> int:
    """For a read-only open: the version, SchemaError unless it is the newest."""
    version = _check(db, schema, path)
    if version < schema.newest:
        raise SchemaError(
            path,
            f"{schema.what} schema version {version} needs migrating to {schema.newest}; "
            "open it writable once",
        )
    return version


def _check(db: sqlite3.Connection, schema: Schema, path: Path) -> int:
    version = schema_version(db, schema, path)
    if version > schema.newest:
        raise SchemaTooNew(path, schema.what, version, schema.newest)
    return version


def _apply(db: sqlite3.Connection, step: Migration) -> None:
    if callable(step.apply):
        step.apply(db)
        return
    for statement in split_statements(step.apply):
        db.execute(statement)


def split_statements(script: str) -> list[str]:
    """The statements of ``script``, for running inside a transaction one by one
    (executescript() would commit first). Semicolons in strings or triggers are kept."""
    statements, pending = [], ""
    for piece in script.split(";"):
        pending += piece + ";"
        if sqlite3.complete_statement(pending):
            if pending.strip(" \t\n;"):
                statements.append(pending.strip())
            pending = ""
    if pending.strip(" \t\n;"):
        statements.append(pending.strip().rstrip(";"))
    return statements


def _mirror_meta(db: sqlite3.Connection, version: int) -> None:
    # Releases before user_version read meta.schema_version (the job queue refuses any
    # other value than 1), so keeping it equal makes them refuse a newer file too.
    if "meta" in _tables(db):
        db.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES ('schema_version', ?)", (str(version),)
        )


def _tables(db: sqlite3.Connection) -> dict[str, frozenset[str]]:
    rows = db.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ).fetchall()
    return {
        name: frozenset(c[1] for c in db.execute(f"PRAGMA table_info({_quote(name)})"))
        for (name,) in rows
    }


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'
