"""In-memory backends for unit tests (yours too): same contracts, no persistence."""

from datastore.memory.operations import MemoryOperationDataStore
from datastore.memory.resources import MemoryResourceStore

__all__ = ["MemoryOperationDataStore", "MemoryResourceStore"]
