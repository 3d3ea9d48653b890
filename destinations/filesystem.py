"""Local filesystem destination: ``{root}/{job_id}/{Type}-{seq}.ndjson``.

Commit = flush + fsync; the committed state of a file is its byte length. Restore
truncates each recorded file to its committed length and removes files the record does
not know, so bytes written after the last checkpoint vanish (the same contract as Azure
block lists). While a worker holds a job it holds an exclusive ``flock`` on the job's
folder, so a stalled worker that lost its lease cannot write beside the new owner.
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import shutil
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from destinations.base import ExportDestinationClient
from exportsvc.errors import DestinationConflict, DestinationError
from exportsvc.records import OutputFile

LOCK_NAME = ".lock"


@dataclass(slots=True)
class _OpenFile:
    handle: BinaryIO
    pending: list[bytes] = field(default_factory=list)
    pending_bytes: int = 0


class FilesystemDestination(ExportDestinationClient):
    def __init__(
        self, job_id: str, root: Path, *, block_bytes: int = 4 << 20, scope: str | None = None
    ) -> None:
        super().__init__(job_id, scope)
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"invalid job id {job_id!r}")
        self.root = Path(root)
        self.folder = self.root / job_id
        self.block_bytes = block_bytes
        self._files: dict[str, _OpenFile] = {}
        self._lock: int | None = None

    @property
    def _lock_name(self) -> str:
        return f"{LOCK_NAME}-{self.scope}" if self.scope else LOCK_NAME

    def _owned(self, entry: Path) -> bool:
        return not entry.name.startswith(LOCK_NAME) and self.in_scope(entry.name)

    def _path(self, name: str) -> Path:
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise DestinationError(f"invalid file name {name!r}")
        return self.folder / name

    # -- writing ----------------------------------------------------------------------

    async def _connect(self) -> None:
        await asyncio.to_thread(self._take_lock)

    def _take_lock(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.folder / self._lock_name, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as exc:
            os.close(fd)
            raise DestinationError("the job's output is locked by another worker") from exc
        self._lock = fd

    async def _restore(self, files: Sequence[OutputFile]) -> None:
        await asyncio.to_thread(self._restore_sync, list(files))

    def _restore_sync(self, files: list[OutputFile]) -> None:
        known = {f.name: f for f in files}
        for entry in self.folder.iterdir():
            if self._owned(entry) and entry.name not in known:
                entry.unlink()
        for f in files:
            path = self._path(f.name)
            size = path.stat().st_size if path.exists() else -1
            if size < f.committed_bytes:
                raise DestinationConflict(
                    f"{f.name} holds {max(size, 0)} bytes but {f.committed_bytes} were committed"
                )
            os.truncate(path, f.committed_bytes)

    async def _start_file(self, file: OutputFile) -> None:
        await self._close_file(file.name)
        handle = await asyncio.to_thread(open, self._path(file.name), "wb")
        self._files[file.name] = _OpenFile(handle)

    async def _open(self, name: str) -> _OpenFile:
        entry = self._files.get(name)
        if entry is None:
            handle = await asyncio.to_thread(open, self._path(name), "ab")
            entry = self._files[name] = _OpenFile(handle)
        return entry

    async def _write(self, name: str, data: bytes) -> None:
        entry = await self._open(name)
        entry.pending.append(data)
        entry.pending_bytes += len(data)
        if entry.pending_bytes >= self.block_bytes:
            await self._flush(entry)

    async def _flush(self, entry: _OpenFile) -> None:
        if entry.pending:  # written as they are: no copy into one buffer first
            chunks, entry.pending, entry.pending_bytes = entry.pending, [], 0
            await asyncio.to_thread(entry.handle.writelines, chunks)

    async def _commit(self, files: Sequence[OutputFile]) -> list[OutputFile]:
        committed = []
        for f in files:
            entry = self._files.get(f.name)
            if entry is None:
                committed.append(f)
                continue
            await self._flush(entry)
            size = await asyncio.to_thread(_sync, entry.handle)
            committed.append(f.model_copy(update={"committed_bytes": size}))
        await asyncio.to_thread(_sync_folder, self.folder)
        return committed

    async def _finalize(self, files: Sequence[OutputFile], sweep: bool) -> None:
        keep = {f.name for f in files}
        await self._close_all()
        if not sweep:
            return
        for entry in await asyncio.to_thread(lambda: list(self.folder.iterdir())):
            if self._owned(entry) and entry.name not in keep:
                await asyncio.to_thread(entry.unlink)

    async def _delete_all(self) -> None:
        await self._close_all()
        if self.scope is None:
            await asyncio.to_thread(shutil.rmtree, self.folder, True)
            return
        for entry in await asyncio.to_thread(lambda: list(self.folder.glob("*"))):
            if self._owned(entry) or entry.name == self._lock_name:
                await asyncio.to_thread(entry.unlink, True)

    async def _close_file(self, name: str) -> None:
        entry = self._files.pop(name, None)
        if entry is not None:
            await asyncio.to_thread(entry.handle.close)

    async def _close_all(self) -> None:
        for name in list(self._files):
            await self._close_file(name)

    async def close(self) -> None:
        """Drop uncommitted buffers and handles, then release the job's lock."""
        for entry in self._files.values():
            entry.pending.clear()
        await self._close_all()
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    # -- reading ----------------------------------------------------------------------

    def local_path(self, name: str) -> Path | None:
        return self._path(name)

    async def _read(self, name: str, chunk: int) -> AsyncGenerator[bytes, None]:
        with await _open_for_reading(self._path(name)) as handle:
            while data := await asyncio.to_thread(handle.read, chunk):
                yield data


async def _open_for_reading(path: Path) -> BinaryIO:
    """``open(path, "rb")`` on a thread. A reader cancelled while the thread opens (a
    download whose server shuts down) closes the file once it is open, instead of
    leaving it to the garbage collector."""
    opening = asyncio.ensure_future(asyncio.to_thread(open, path, "rb"))
    try:
        return await asyncio.shield(opening)
    except asyncio.CancelledError:
        opening.add_done_callback(_close_opened)
        raise


def _close_opened(opening: asyncio.Future[Any]) -> None:
    if not opening.cancelled() and opening.exception() is None:
        opening.result().close()


def _sync(handle: BinaryIO) -> int:
    handle.flush()
    os.fsync(handle.fileno())
    return handle.tell()


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
