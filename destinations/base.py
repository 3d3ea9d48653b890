"""The export destination contract (DESIGN.md section 4).

An :class:`ExportDestinationClient` writes one job's ndjson files. Bytes written since the
last :meth:`commit` are *uncommitted*: they may vanish. ``commit`` makes them durable and
returns each file's new committed state, which the task then records in the job's
checkpoint. :meth:`restore` reconciles the destination to the recorded states, so data
committed after the last checkpoint (a crash between commit and checkpoint) is dropped
and rewritten exactly once. Azure block blobs and local files implement the same contract.

Public methods wrap protected hooks and turn backend errors into ``DestinationError``.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import AsyncGenerator, Sequence
from datetime import datetime
from pathlib import Path

from exportsvc.errors import DestinationError, ExportSvcError
from exportsvc.records import OutputFile


def file_name(type_: str, sequence: int) -> str:
    """``Observation-0003.ndjson``: fixed width, so names sort in sequence order."""
    return f"{type_}-{sequence:04d}.ndjson"


class ExportDestinationClient(abc.ABC):
    """One job's output. ``job_id`` is the prefix (folder) every file of the job lives in.

    With a ``scope``, this client owns only the files named ``{scope}-...`` in it: the
    work items of one export share its folder, and each restores, finalizes and deletes
    its own files only."""

    def __init__(self, job_id: str, scope: str | None = None) -> None:
        self.job_id = job_id
        self.scope = scope

    def in_scope(self, name: str) -> bool:
        return self.scope is None or name.startswith(f"{self.scope}-")

    @staticmethod
    def _translate(what: str, exc: Exception) -> ExportSvcError:
        if isinstance(exc, ExportSvcError):
            return exc
        return DestinationError(f"the destination failed to {what}: {type(exc).__name__}")

    async def connect(self) -> None:
        try:
            await self._connect()
        except Exception as exc:
            raise self._translate("connect", exc) from exc

    async def restore(self, files: Sequence[OutputFile]) -> None:
        """Reconcile the job's files to ``files`` (the last checkpoint)."""
        try:
            await self._restore(files)
        except Exception as exc:
            raise self._translate("restore the last checkpoint", exc) from exc

    async def start_file(self, file: OutputFile) -> None:
        """Begin a new, empty file (dropping any uncommitted leftover of the same name)."""
        try:
            await self._start_file(file)
        except Exception as exc:
            raise self._translate("create a file", exc) from exc

    async def write(self, name: str, data: bytes) -> None:
        """Append ``data`` to file ``name``; uncommitted until the next commit."""
        try:
            await self._write(name, data)
        except Exception as exc:
            raise self._translate("write", exc) from exc

    async def commit(self, files: Sequence[OutputFile]) -> list[OutputFile]:
        """Make everything written to ``files`` durable; return their committed states."""
        try:
            return await self._commit(files)
        except Exception as exc:
            raise self._translate("commit", exc) from exc

    async def finalize(self, files: Sequence[OutputFile], *, sweep: bool = True) -> None:
        """At completion: delete every file of the job that ``files`` does not list, and
        let go of its handles. ``sweep=False``: the caller knows there is no such file
        (no earlier run wrote any), so the destination is not listed."""
        try:
            await self._finalize(files, sweep)
        except Exception as exc:
            raise self._translate("finalize", exc) from exc

    async def delete_all(self) -> None:
        """Delete every file of the job (cancel)."""
        try:
            await self._delete_all()
        except Exception as exc:
            raise self._translate("delete the job's files", exc) from exc

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release the job's handles (not the process-wide client)."""

    # -- reading (downloads, DataValidator) ------------------------------------------

    async def read(self, name: str, chunk: int = 1 << 20) -> AsyncGenerator[bytes, None]:
        """The bytes of ``name``, in chunks. Close it (``contextlib.aclosing``) when you
        stop early: that closes what the destination opened."""
        try:
            async with contextlib.aclosing(self._read(name, chunk)) as chunks:
                async for data in chunks:
                    yield data
        except Exception as exc:
            raise self._translate(f"read {name}", exc) from exc

    def local_path(self, name: str) -> Path | None:
        """A path the service can send directly, where the destination is a local disk."""
        return None

    def signed_url(self, name: str, expires: datetime) -> str | None:
        """A URL any HTTP client can download ``name`` from, or None (service proxies)."""
        return None

    # -- hooks ------------------------------------------------------------------------

    @abc.abstractmethod
    async def _connect(self) -> None: ...

    @abc.abstractmethod
    async def _restore(self, files: Sequence[OutputFile]) -> None: ...

    @abc.abstractmethod
    async def _start_file(self, file: OutputFile) -> None: ...

    @abc.abstractmethod
    async def _write(self, name: str, data: bytes) -> None: ...

    @abc.abstractmethod
    async def _commit(self, files: Sequence[OutputFile]) -> list[OutputFile]: ...

    @abc.abstractmethod
    async def _finalize(self, files: Sequence[OutputFile], sweep: bool) -> None: ...

    @abc.abstractmethod
    async def _delete_all(self) -> None: ...

    @abc.abstractmethod
    def _read(self, name: str, chunk: int) -> AsyncGenerator[bytes, None]: ...
