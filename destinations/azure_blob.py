"""Azure Blob Storage destination: one block blob per file, ``{container}/{job_id}/{name}``.

Writes are buffered per file and staged as blocks of ``block_bytes``; ``commit`` stages
the rest and commits the blob's block list (the committed ids plus the new ones). The
committed state of a file is its block list, its byte length and the ETag of that commit.
Up to ``uploads`` blocks of a file upload at a time while the writer goes on (the export
reads its next pages meanwhile); a commit first waits for all of them, and a failed
upload fails the next write or commit. Every block carries its ``Content-MD5``, so the
service refuses a block damaged in transit instead of committing it (``_Upload.send``).

Fencing. Staging a block is never conditional in Azure, so only the commit can fence:

- Every commit is conditional: ``If-Match`` the ETag of this client's last commit or
  restore, or ``If-None-Match: *`` for a file this client created. A writer whose view of
  the blob is stale (a stalled worker that lost its lease) gets ``DestinationConflict``.
- Block ids are ``{session}-{index:08d}``: ``session`` is random per client, the index
  continues from the committed block count, so every id has the same length (an Azure
  rule) and stays readable. A writer never stages an id another writer uses, so a stalled
  writer's staged blocks can never replace the live writer's blocks in its commit (the
  block list is resolved as "latest": an uncommitted block wins over a committed one with
  the same id; azure-storage-blob 12.31 also sends explicit ``BlobBlock`` states as
  "latest"). Purely ``(file, index)`` ids would not have this property.

Resume (DESIGN.md section 4). ``restore`` checks that each recorded block list is a
prefix of the blob's committed list with the recorded byte count, then re-commits exactly
the recorded ids, conditional on the ETag it just read: Put Block List drops every block
it does not list, so blocks committed after the checkpoint vanish and get rewritten once.
It cannot be conditional on the recorded ETag, which such a commit has already changed.
The re-commit gives the blob a new ETag, so the previous owner's next commit fails at
once; this client keeps that ETag for its own next commit and returns it from ``commit``.
Blobs under the job's prefix that the record does not list are deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import secrets
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
)
from azure.storage.blob import BlobBlock, BlobSasPermissions, ContentSettings, generate_blob_sas
from azure.storage.blob.aio import BlobClient, BlobServiceClient

from destinations.base import ExportDestinationClient
from exportsvc.errors import (
    DestinationAuthError,
    DestinationConflict,
    DestinationError,
    ExportSvcError,
)
from exportsvc.records import OutputFile

NDJSON = "application/fhir+ndjson"


def block_id(session: str, index: int) -> str:
    """The id of block ``index`` staged by ``session`` (the SDK base64-encodes it)."""
    return f"{session}-{index:08d}"


@dataclass(slots=True)
class _File:
    """What this client knows of one blob: committed state, staged blocks, the buffer."""

    committed: list[str] = field(default_factory=list)
    committed_bytes: int = 0
    etag: str | None = None
    """ETag after this client's last commit or restore; None: the blob must not exist."""
    staged: list[str] = field(default_factory=list)
    staged_bytes: int = 0
    buffer: list[bytes] = field(default_factory=list)
    buffered: int = 0
    uploads: list[_Upload] = field(default_factory=list)
    """Blocks staging now or to be staged again, oldest first (their ids are already in
    ``staged``)."""


@dataclass
class _Upload:
    block_id: str
    data: bytes
    task: asyncio.Future[Any] | None = None
    """The Put Block request; None after it failed (the next wait sends it again)."""
    md5: bytes | None = None
    """The block's MD5, once computed (a block sent again is not hashed again)."""

    async def send(self, blob: BlobClient) -> None:
        """Put Block with ``Content-MD5``: the service checks the block against it and
        refuses one damaged on its way (400 ``Md5Mismatch``, retriable: it is sent again,
        never committed). The hash runs on a thread, off the event loop (hashlib lets go
        of the GIL), while the export reads its next pages."""
        if self.md5 is None:
            self.md5 = await asyncio.to_thread(_md5, self.data)
        await blob.stage_block(
            self.block_id, self.data, length=len(self.data), transactional_content_md5=self.md5
        )


def _md5(data: bytes) -> bytes:
    return hashlib.md5(data, usedforsecurity=False).digest()


class AzureBlobDestination(ExportDestinationClient):
    """One job's files in ``container``; ``service`` belongs to the caller (not closed)."""

    def __init__(
        self,
        job_id: str,
        service: BlobServiceClient,
        container: str,
        *,
        block_bytes: int = 4 << 20,
        uploads: int = 2,
        scope: str | None = None,
        containers: set[str] | None = None,
    ) -> None:
        super().__init__(job_id, scope)
        if not job_id or "/" in job_id or job_id.startswith("."):
            raise ValueError(f"invalid job id {job_id!r}")
        self.service = service
        self.container = service.get_container_client(container)
        self.prefix = f"{job_id}/"
        self.block_bytes = block_bytes
        self.uploads = max(uploads, 1)
        self.session = secrets.token_hex(4)
        self._files: dict[str, _File] = {}
        self._blobs: dict[str, BlobClient] = {}
        """A client per file name, made once: building one costs about half a
        millisecond (its own pipeline), and every page written names its file."""
        self._containers = containers if containers is not None else set()
        """Containers of ``service`` known to exist (the factory shares one set per
        account): ``connect`` creates one only when it is not known."""

    def _blob(self, name: str) -> BlobClient:
        blob = self._blobs.get(name)
        if blob is None:
            if not name or "/" in name or "\\" in name or name.startswith("."):
                raise DestinationError(f"invalid file name {name!r}")
            blob = self._blobs[name] = self.container.get_blob_client(self.prefix + name)
        return blob

    @staticmethod
    def _translate(what: str, exc: Exception) -> ExportSvcError:
        """Azure errors → ours. Only the status and error code: never a URL or a key."""
        if isinstance(exc, ExportSvcError):
            return exc
        status = getattr(exc, "status_code", None)
        if isinstance(exc, ClientAuthenticationError) or status in (401, 403):
            return DestinationAuthError("authorization failed for the destination")
        if isinstance(exc, ResourceModifiedError | ResourceExistsError) or status == 412:
            return DestinationConflict(
                f"failed to {what}: the destination changed since the last checkpoint; "
                "another writer touched it"
            )
        if isinstance(exc, HttpResponseError):
            code = getattr(exc, "error_code", None)
            code = getattr(code, "value", code)
            return DestinationError(f"the destination failed to {what}: HTTP {status} {code}")
        return ExportDestinationClient._translate(what, exc)

    # -- writing ----------------------------------------------------------------------

    async def _connect(self) -> None:
        name = self.container.container_name
        if name in self._containers:
            return  # no round trip per work item; forgotten if it turns out to be gone
        with contextlib.suppress(ResourceExistsError):
            await self.container.create_container()
        self._containers.add(name)

    def _gone(self, exc: BaseException) -> None:
        """A request failed with 404: the container may have been deleted, so the next
        ``connect`` (the retry) creates it again instead of trusting that it exists."""
        if isinstance(exc, ResourceNotFoundError):
            self._containers.discard(self.container.container_name)

    async def _restore(self, files: Sequence[OutputFile]) -> None:
        self._files.clear()
        await self._delete_unlisted({f.name for f in files})
        for f in files:
            self._files[f.name] = await self._restore_file(f)

    async def _restore_file(self, f: OutputFile) -> _File:
        blob = self._blob(f.name)
        recorded = len(f.committed_blocks)
        try:
            etag = (await blob.get_blob_properties()).etag
        except ResourceNotFoundError:
            raise DestinationConflict(
                f"{f.name} is missing but {f.committed_bytes} bytes were committed"
            ) from None
        blocks, _ = await blob.get_block_list("committed")
        ids = [b.id for b in blocks]
        size = sum(b.size for b in blocks[:recorded])
        if ids[:recorded] != f.committed_blocks or size != f.committed_bytes:
            raise DestinationConflict(
                f"{f.name} no longer holds the {f.committed_bytes} bytes committed "
                f"in {recorded} blocks"
            )
        # Always re-commit: it drops blocks committed after the checkpoint, and its new
        # ETag fences out the previous owner at once, not only at our first commit.
        etag = await self._put_block_list(blob, f.committed_blocks, etag)
        return _File(list(f.committed_blocks), f.committed_bytes, etag)

    async def _start_file(self, file: OutputFile) -> None:
        # No I/O: a new file's first commit is conditional on the blob not existing, and
        # it discards any uncommitted leftover blocks. Deleting a leftover here would not
        # be fenced (a stalled writer could delete the live writer's file).
        self._blob(file.name)
        self._files[file.name] = _File()

    async def _write(self, name: str, data: bytes) -> None:
        blob = self._blob(name)
        entry = self._files.setdefault(name, _File())  # unknown name: a new file
        entry.buffer.append(data)
        entry.buffered += len(data)
        if entry.buffered >= self.block_bytes:
            await self._stage(blob, entry)

    async def _stage(self, blob: BlobClient, entry: _File) -> None:
        """Start uploading the buffer as the file's next block; wait while ``uploads``
        blocks are already on their way."""
        if not entry.buffer:
            return
        data = b"".join(entry.buffer)
        new_id = block_id(self.session, len(entry.committed) + len(entry.staged))
        entry.staged.append(new_id)  # its place in the block list, whenever it lands
        entry.staged_bytes += len(data)
        entry.buffer, entry.buffered = [], 0
        entry.uploads.append(_Upload(new_id, data))
        await self._uploaded(blob, entry, self.uploads)

    async def _uploaded(self, blob: BlobClient, entry: _File, at_most: int) -> None:
        """Send the oldest blocks (``self.uploads`` at a time) and wait until at most
        ``at_most`` are still on their way. A failed upload raises here, after the others
        in flight have ended, and every failed one stays listed to be sent again: a commit
        retried after an outage commits every block it lists."""
        while True:
            for upload in entry.uploads[: self.uploads]:
                if upload.task is None:
                    upload.task = asyncio.ensure_future(upload.send(blob))
            if len(entry.uploads) <= at_most:
                return
            head = entry.uploads[0]
            assert head.task is not None
            try:
                await head.task
            except asyncio.CancelledError:
                head.task = None
                raise
            except Exception as exc:
                self._gone(exc)
                others = [u.task for u in entry.uploads if u.task is not None]
                await asyncio.gather(*others, return_exceptions=True)
                for upload in entry.uploads:
                    task = upload.task
                    if task is not None and (task.cancelled() or task.exception()):
                        upload.task = None
                raise
            entry.uploads.pop(0)

    async def _commit(self, files: Sequence[OutputFile]) -> list[OutputFile]:
        committed = []
        for f in files:
            entry = self._files.get(f.name)
            if entry is None:  # neither created, restored nor written by this client
                committed.append(f)
                continue
            blob = self._blob(f.name)
            await self._stage(blob, entry)
            await self._uploaded(blob, entry, 0)
            if entry.staged or entry.etag is None:
                ids = entry.committed + entry.staged
                entry.etag = await self._put_block_list(blob, ids, entry.etag)
                entry.committed, entry.staged = ids, []
                entry.committed_bytes += entry.staged_bytes
                entry.staged_bytes = 0
            update = {
                "committed_blocks": list(entry.committed),
                "committed_bytes": entry.committed_bytes,
                "etag": entry.etag,
            }
            committed.append(f.model_copy(update=update))
        return committed

    async def _put_block_list(self, blob: BlobClient, ids: list[str], etag: str | None) -> str:
        """Commit ``ids`` if the blob is still at ``etag`` (None: absent); the new ETag."""
        condition: dict[str, Any] = (
            {"etag": etag, "match_condition": MatchConditions.IfNotModified}
            if etag is not None
            else {"match_condition": MatchConditions.IfMissing}
        )
        try:
            result = await blob.commit_block_list(
                [BlobBlock(i) for i in ids],  # BlockState.LATEST; see the module docstring
                content_settings=ContentSettings(content_type=NDJSON),
                **condition,
            )
        except ResourceNotFoundError as exc:
            self._gone(exc)
            raise
        return str(result["etag"])

    async def _finalize(self, files: Sequence[OutputFile], sweep: bool) -> None:
        keep = {f.name for f in files}
        self._files = {name: e for name, e in self._files.items() if name in keep}
        if sweep:
            await self._delete_unlisted(keep)

    async def _delete_all(self) -> None:
        await self._drop_files()
        await self._delete_unlisted(set())

    async def _delete_unlisted(self, keep: set[str]) -> None:
        names = [
            blob.name
            async for blob in self.container.list_blobs(
                name_starts_with=self.prefix + (f"{self.scope}-" if self.scope else "")
            )
            if blob.name[len(self.prefix) :] not in keep
        ]
        for name in names:
            with contextlib.suppress(ResourceNotFoundError):
                await self.container.delete_blob(name, delete_snapshots="include")

    async def close(self) -> None:
        """Drop uncommitted buffers and uploads; the service client stays open (the
        caller owns it)."""
        await self._drop_files()

    async def _drop_files(self) -> None:
        """Forget every file, after stopping its uploads."""
        files, self._files = list(self._files.values()), {}
        tasks = [u.task for entry in files for u in entry.uploads if u.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    # -- reading ----------------------------------------------------------------------

    async def _read(self, name: str, chunk: int) -> AsyncGenerator[bytes, None]:
        """Ranged downloads of ``chunk`` bytes, each conditional on the first ETag."""
        blob = self._blob(name)
        props = await blob.get_blob_properties()
        for offset in range(0, props.size, chunk):
            stream = await blob.download_blob(
                offset=offset,
                length=min(chunk, props.size - offset),
                etag=props.etag,
                match_condition=MatchConditions.IfNotModified,
            )
            yield await stream.readall()

    def signed_url(self, name: str, expires: datetime) -> str | None:
        """A read-only SAS URL for this one blob, when the service holds an account key."""
        credential = self.service.credential
        account_key = getattr(credential, "account_key", None)
        account_name = getattr(credential, "account_name", None)
        if not isinstance(account_key, str) or not isinstance(account_name, str):
            return None
        blob = self._blob(name)
        expiry = expires.astimezone(UTC) if expires.tzinfo else expires.replace(tzinfo=UTC)
        token = generate_blob_sas(
            account_name,
            blob.container_name,
            blob.blob_name,
            account_key=account_key,
            permission=BlobSasPermissions(read=True),
            expiry=expiry,
        )
        return f"{blob.url}?{token}"
