"""The ``jti`` replay cache: a client assertion is accepted once within its lifetime.

:class:`StoreReplayCache` keeps the claims in the operation data store, so that every API
process on the same store (SQLite file or PostgreSQL) refuses an assertion any of them has
accepted: the service uses it once its stores are open. :class:`MemoryReplayCache` is per
process (the token endpoint's cache until then, and the unit tests').
"""

from __future__ import annotations

import heapq
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from datetime import UTC, datetime

from datastore.operations import OperationDataStore
from exportsvc.errors import ExportSvcError


class ReplayCacheFull(ExportSvcError):
    """Too many client assertions in flight; retry shortly."""

    status = 503
    code = "transient"
    retriable = True


class ReplayCache(ABC):
    async def claim(self, key: str, expires_at: float) -> bool:
        """True the first time ``key`` is claimed; False while an earlier claim of it is
        alive (a replay). The claim lives until ``expires_at`` (epoch seconds).
        Raises :class:`ReplayCacheFull` rather than forget a live claim."""
        return await self._claim(key, expires_at)

    @abstractmethod
    async def _claim(self, key: str, expires_at: float) -> bool: ...


class MemoryReplayCache(ReplayCache):
    """Claims in a dict, expired ones purged oldest first; at most ``max_entries`` live."""

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.time) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._expiry: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expiry)

    async def _claim(self, key: str, expires_at: float) -> bool:
        now = self._clock()
        self._purge(now)
        if key in self._expiry:
            return False
        if len(self._expiry) >= self.max_entries:
            raise ReplayCacheFull()
        self._expiry[key] = expires_at
        heapq.heappush(self._heap, (expires_at, key))
        return True

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            _, key = heapq.heappop(self._heap)
            if self._expiry.get(key, now + 1) <= now:
                del self._expiry[key]


class StoreReplayCache(ReplayCache):
    """Claims in the operation data store: shared by every process that uses it."""

    def __init__(
        self, operations: OperationDataStore, clock: Callable[[], float] = time.time
    ) -> None:
        self.operations = operations
        self._clock = clock

    async def _claim(self, key: str, expires_at: float) -> bool:
        now = datetime.fromtimestamp(self._clock(), UTC)
        return await self.operations.claim(key, datetime.fromtimestamp(expires_at, UTC), now)
