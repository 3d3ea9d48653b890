"""``insert_many``: executemany's rows, as INSERTs of many rows each."""

from __future__ import annotations

import sqlite3

import pytest

from datastore.sqlite import db
from datastore.sqlite.db import insert_full, insert_many


def _table() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:")
    conn.execute("CREATE TABLE t (a INTEGER PRIMARY KEY, b TEXT, c BLOB)")
    return conn


@pytest.mark.parametrize("count", [0, 1, 7, 2 * db.ROWS_PER_INSERT[0] + 299])
def test_inserts_every_row_once_in_order(count: int) -> None:
    rows = [(n, f"id-{n}", bytes([n % 256]) * 3) for n in range(count)]
    conn = _table()
    insert_many(conn, "INSERT INTO t (a, b, c)\nVALUES (?, ?, ?);", rows)
    assert conn.execute("SELECT a, b, c FROM t ORDER BY a").fetchall() == rows


def test_insert_full_takes_whole_statements_and_leaves_the_rest() -> None:
    """A writer that inserts rows as it makes them: whole statements now, the rest (kept
    in the list, in order) with the final insert_many; every row once."""
    size = db.ROWS_PER_INSERT[0]
    rows = [(n, f"id-{n}", b"") for n in range(2 * size + 5)]
    pending = list(rows)
    conn = _table()
    insert_full(conn, "INSERT INTO t (a, b, c) VALUES (?, ?, ?)", pending)
    assert pending == rows[2 * size :]
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 2 * size
    insert_many(conn, "INSERT INTO t (a, b, c) VALUES (?, ?, ?)", pending)
    assert conn.execute("SELECT a, b, c FROM t ORDER BY a").fetchall() == rows


def test_statements_stay_within_the_variable_limit() -> None:
    conn = _table()
    conn.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, 10)  # three rows of three
    rows = [(n, "x", b"") for n in range(11)]
    insert_many(conn, "INSERT INTO t (a, b, c) VALUES (?, ?, ?)", rows)
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 11


def test_a_conflict_fails_like_executemany() -> None:
    conn = _table()
    with pytest.raises(sqlite3.IntegrityError):
        insert_many(
            conn, "INSERT INTO t (a, b, c) VALUES (?, ?, ?)", [(1, "a", b""), (1, "b", b"")]
        )


def test_rows_must_fill_the_placeholders() -> None:
    conn = _table()
    with pytest.raises(ValueError, match="one-row INSERT"):
        insert_many(conn, "INSERT INTO t (a, b, c) VALUES (?, ?, ?)", [(1, "a")])
    with pytest.raises(ValueError, match="one-row INSERT"):
        insert_many(conn, "INSERT INTO t (a, b, c) VALUES (?, ?, ?), (?, ?, ?)", [(1, "a", b"")])
