"""The embedded default backend: one SQLite database file in WAL mode."""

from datastore.sqlite.operations import SqliteOperationDataStore
from datastore.sqlite.resources import SqliteResourceStore

__all__ = ["SqliteOperationDataStore", "SqliteResourceStore"]
