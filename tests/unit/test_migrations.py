"""The schema migration runner on real SQLite files: versions, rollback, refusals."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from tidegate.migrations import (
    Migration,
    Schema,
    SchemaError,
    SchemaTooNew,
    check_current,
    migrate,
    schema_version,
    split_statements,
)

_V1 = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE items (id INTEGER PRIMARY KEY, name TEXT NOT NULL);
"""


class Calls:
    """A callable migration that records how often it ran."""

    def __init__(self) -> None:
        self.n = 0

    def __call__(self, db: sqlite3.Connection) -> None:
        self.n += 1
        db.execute("INSERT INTO items (name) VALUES ('from v3')")


def _schema(third: Migration | None = None, calls: Calls | None = None) -> Schema:
    return Schema(
        what="test store",
        migrations=(
            Migration(1, "meta and items", _V1),
            Migration(2, "items.size", "ALTER TABLE items ADD COLUMN size INTEGER DEFAULT 0;"),
            third or Migration(3, "a row", calls or Calls()),
        ),
        legacy={"meta": frozenset({"key", "value"}), "items": frozenset({"id", "name"})},
    )


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "test.sqlite"


@pytest.fixture
def db(path: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(path, isolation_level=None)
    yield conn
    conn.close()


def _user_version(db: sqlite3.Connection) -> int:
    return int(db.execute("PRAGMA user_version").fetchone()[0])


def _meta_version(db: sqlite3.Connection) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    return None if row is None else row[0]


def test_fresh_file_goes_from_0_to_newest(db: sqlite3.Connection, path: Path) -> None:
    """An empty file gets every migration in order, SQL and callable alike."""
    calls = Calls()
    assert schema_version(db, _schema(calls=calls), path) == 0
    assert migrate(db, _schema(calls=calls), path) == 3
    assert _user_version(db) == 3
    assert _meta_version(db) == "3"
    assert calls.n == 1
    assert db.execute("SELECT name, size FROM items").fetchall() == [("from v3", 0)]


def test_migrating_again_changes_nothing(db: sqlite3.Connection, path: Path) -> None:
    """A file at the newest version is left alone: no migration runs twice."""
    calls = Calls()
    schema = _schema(calls=calls)
    migrate(db, schema, path)
    assert migrate(db, schema, path) == 3
    assert calls.n == 1
    assert db.execute("SELECT COUNT(*) FROM items").fetchone() == (1,)


def test_target_stops_early_and_a_later_open_continues(db: sqlite3.Connection, path: Path) -> None:
    """Migrating to 2 stops there; the next migrate applies only the third."""
    calls = Calls()
    schema = _schema(calls=calls)
    assert migrate(db, schema, path, target=2) == 2
    assert (_user_version(db), calls.n) == (2, 0)
    assert migrate(db, schema, path) == 3
    assert calls.n == 1


def test_failing_sql_migration_rolls_back(db: sqlite3.Connection, path: Path) -> None:
    """A migration failing half-way leaves neither its first statement nor a new version."""
    bad = Migration(3, "two tables", "CREATE TABLE extra (x); INSERT INTO nowhere VALUES (1);")
    schema = _schema(third=bad)
    migrate(db, schema, path, target=2)
    with pytest.raises(SchemaError) as info:
        migrate(db, schema, path)
    message = str(info.value)
    assert str(path) in message
    assert "version 3 (two tables) failed" in message
    assert "unchanged at version 2" in message and "nowhere" in message
    assert _user_version(db) == 2
    assert _meta_version(db) == "2"
    assert "extra" not in {r[0] for r in db.execute("SELECT name FROM sqlite_master")}
    assert not db.in_transaction


def test_failing_callable_migration_rolls_back(db: sqlite3.Connection, path: Path) -> None:
    """A callable that writes then raises leaves its rows out and the version unchanged."""

    def half(conn: sqlite3.Connection) -> None:
        conn.execute("INSERT INTO items (name) VALUES ('half')")
        raise ValueError("boom")

    schema = _schema(third=Migration(3, "half a job", half))
    migrate(db, schema, path, target=2)
    with pytest.raises(SchemaError, match="boom") as info:
        migrate(db, schema, path)
    assert isinstance(info.value.__cause__, ValueError)
    assert _user_version(db) == 2
    assert db.execute("SELECT COUNT(*) FROM items").fetchone() == (0,)


def test_newer_file_is_refused_untouched(db: sqlite3.Connection, path: Path) -> None:
    """A file at a version this release does not know raises SchemaTooNew, unwritten."""
    migrate(db, _schema(), path)
    db.execute("PRAGMA user_version = 7")
    before = path.read_bytes()
    with pytest.raises(SchemaTooNew) as info:
        migrate(db, _schema(), path)
    assert (info.value.version, info.value.newest, info.value.path) == (7, 3, path)
    assert str(path) in str(info.value)
    assert "version 7 is newer than this release supports (newest 3)" in str(info.value)
    assert path.read_bytes() == before


def test_not_sqlite_is_refused_naming_the_file(db: sqlite3.Connection, path: Path) -> None:
    """Garbage bytes give a SchemaError naming the file and what was expected."""
    path.write_bytes(b"this is not a database at all\n" * 200)
    before = path.read_bytes()
    with pytest.raises(SchemaError) as info:
        migrate(db, _schema(), path)
    assert str(info.value).startswith(f"{path}: not a SQLite database")
    assert "expected a test store" in str(info.value)
    assert path.read_bytes() == before


def test_foreign_sqlite_file_is_refused(db: sqlite3.Connection, path: Path) -> None:
    """A SQLite file with other tables and no version is not taken for ours."""
    db.execute("CREATE TABLE photos (id INTEGER, jpeg BLOB)")
    with pytest.raises(SchemaError, match="not a test store: expected tables items, meta, "
                                          "found photos"):
        migrate(db, _schema(), path)
    assert _user_version(db) == 0


def test_unversioned_file_with_v1_tables_is_version_1(db: sqlite3.Connection, path: Path) -> None:
    """A file from before versions were recorded is read as 1 and migrated from there."""
    for statement in split_statements(_V1):
        db.execute(statement)
    db.execute("INSERT INTO items (name) VALUES ('old')")
    calls = Calls()
    assert schema_version(db, _schema(calls=calls), path) == 1
    assert migrate(db, _schema(calls=calls), path) == 3
    assert calls.n == 1
    assert db.execute("SELECT name, size FROM items ORDER BY id").fetchall() == [
        ("old", 0), ("from v3", 0),
    ]


def test_unversioned_file_trusts_its_meta_row(db: sqlite3.Connection, path: Path) -> None:
    """An unversioned file whose meta row says a newer version is refused as newer."""
    for statement in split_statements(_V1):
        db.execute(statement)
    db.execute("INSERT INTO meta VALUES ('schema_version', '99')")
    with pytest.raises(SchemaTooNew, match="version 99 is newer"):
        migrate(db, _schema(), path)


def test_check_current_refuses_an_old_file(db: sqlite3.Connection, path: Path) -> None:
    """A read-only open cannot migrate: an older file is refused, the newest accepted."""
    migrate(db, _schema(), path, target=1)
    with pytest.raises(SchemaError, match="version 1 needs migrating to 3"):
        check_current(db, _schema(), path)
    migrate(db, _schema(), path)
    assert check_current(db, _schema(), path) == 3


def test_migrations_must_be_numbered_from_1() -> None:
    """A gap in the numbering is a programming error caught at import."""
    with pytest.raises(ValueError, match=r"numbered 1, 2, \.\.\.; got \[1, 3\]"):
        Schema("x", (Migration(1, "a", ""), Migration(3, "c", "")))


def test_split_statements_keeps_semicolons_in_strings_and_triggers() -> None:
    """Statements split where SQLite would, not at every semicolon."""
    script = """
    CREATE TABLE t (x TEXT DEFAULT 'a;b');
    CREATE TRIGGER t_ins AFTER INSERT ON t BEGIN UPDATE t SET x = 'c;d'; END;
    -- a comment
    INSERT INTO t VALUES ('e;f')
    """
    statements = split_statements(script)
    assert len(statements) == 3
    assert statements[1].endswith("END;")
    conn = sqlite3.connect(":memory:")
    for statement in statements:
        conn.execute(statement)
    assert conn.execute("SELECT x FROM t").fetchall() == [("c;d",)]
