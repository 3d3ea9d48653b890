"""The scale-out backend: both stores in PostgreSQL, shared by any number of workers."""

from datastore.postgres.db import PostgresDatabase, SchemaError
from datastore.postgres.operations import PostgresOperationDataStore
from datastore.postgres.resources import PostgresResourceStore

__all__ = ["PostgresDatabase", "PostgresOperationDataStore", "PostgresResourceStore", "SchemaError"]
