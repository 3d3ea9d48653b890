"""The destination contract against Azure Blob Storage (Azurite), plus what only Azure has.

The shared contract tests are imported from ``test_destination`` and run here with this
module's ``make_destination``. Two of them are filesystem-specific (the folder ``flock``
and ``local_path``); their Azure counterparts are the ETag fence and blob-name checks below.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest
from azure.core.exceptions import (
    ClientAuthenticationError,
    HttpResponseError,
    ResourceModifiedError,
    ServiceRequestError,
)
from azure.storage.blob.aio import BlobServiceClient

from destinations import ExportDestinationClient
from destinations.azure_blob import NDJSON, AzureBlobDestination
from exportsvc.errors import DestinationAuthError, DestinationConflict, DestinationError
from tests.azurite import Azurite, connection_string
from tests.contract.test_destination import (
    Factory,
    content,
    dest,
    new_file,
    test_commit_returns_committed_state,
    test_delete_all,
    test_finalize_keeps_only_listed_files,
    test_finalize_without_a_sweep_lets_go_and_deletes_nothing,
    test_restore_drops_what_the_checkpoint_does_not_know,
    test_restore_refuses_lost_committed_data,
)

__all__ = [  # the shared contract, collected here against Azure
    "dest",
    "test_commit_returns_committed_state",
    "test_delete_all",
    "test_finalize_keeps_only_listed_files",
    "test_finalize_without_a_sweep_lets_go_and_deletes_nothing",
    "test_restore_drops_what_the_checkpoint_does_not_know",
    "test_restore_refuses_lost_committed_data",
]


@pytest.fixture
async def service(azurite: Azurite) -> AsyncIterator[BlobServiceClient]:
    async with BlobServiceClient.from_connection_string(azurite.connection_string) as client:
        yield client


@pytest.fixture
def container() -> str:
    """A container per test: the emulator is shared by the module."""
    return f"t{uuid.uuid4().hex}"


@pytest.fixture(params=["azure_blob"])
def make_destination(service: BlobServiceClient, container: str) -> Factory:
    def make(job_id: str) -> ExportDestinationClient:
        return AzureBlobDestination(job_id, service, container, block_bytes=16)

    return make


def blob_names(service: BlobServiceClient, container: str) -> AsyncIterator[str]:
    return service.get_container_client(container).list_blob_names()


async def committed_ids(service: BlobServiceClient, container: str, blob: str) -> list[str]:
    client = service.get_blob_client(container, blob)
    blocks, _ = await client.get_block_list("committed")
    return [b.id for b in blocks]


# -- the fence ------------------------------------------------------------------------


async def test_a_stalled_writer_is_fenced_by_the_etag(
    dest: ExportDestinationClient, make_destination: Factory
) -> None:
    f = new_file()
    await dest.start_file(f)
    await dest.write(f.name, b"checkpointed\n")
    (f,) = await dest.commit([f])

    owner = make_destination("job1")  # the lease moved: a new worker resumes the job
    await owner.connect()
    await owner.restore([f])
    await owner.write(f.name, b"from the new owner\n")  # staged, not yet committed
    # The stalled writer wakes up: staging is not fenced, so it stages a block at the same
    # index, but it can neither commit nor replace the new owner's staged block.
    await dest.write(f.name, b"from the stalled writer\n")
    with pytest.raises(DestinationConflict):
        await dest.commit([f])
    (g,) = await owner.commit([f])
    assert await content(owner, f.name) == b"checkpointed\nfrom the new owner\n"
    assert g.committed_bytes == 32
    with pytest.raises(DestinationConflict):
        await dest.commit([f])

    # A new file is fenced too: its first commit requires that the blob does not exist.
    c = new_file("Observation")
    await dest.start_file(c)
    await dest.write(c.name, b"stale\n")
    await owner.start_file(c)
    await owner.write(c.name, b"fresh\n")
    await owner.commit([c])
    with pytest.raises(DestinationConflict):
        await dest.commit([c])
    assert await content(owner, c.name) == b"fresh\n"
    await owner.close()


async def test_restore_of_a_missing_blob_is_a_conflict(dest: ExportDestinationClient) -> None:
    f = new_file().model_copy(update={"committed_blocks": ["x"], "committed_bytes": 3})
    with pytest.raises(DestinationConflict, match="missing"):
        await dest.restore([f])


# -- resume ---------------------------------------------------------------------------


async def test_resume_after_commit_without_checkpoint_drops_the_extra_blocks(
    dest: ExportDestinationClient,
    make_destination: Factory,
    service: BlobServiceClient,
    container: str,
) -> None:
    a, b = new_file("Patient"), new_file("Observation")
    await dest.start_file(a)
    await dest.write(a.name, b"first block, 20 b\n")
    await dest.write(a.name, b"tail\n")
    (a,) = await dest.commit([a])  # the checkpoint records this
    assert len(a.committed_blocks) == 2
    assert a.etag is not None
    await dest.write(a.name, b"after the checkpoint\n")
    await dest.start_file(b)
    await dest.write(b.name, b"{}\n")
    await dest.commit([a, b])  # committed, but the worker dies before the checkpoint
    assert len(await committed_ids(service, container, f"job1/{a.name}")) == 3

    resumed = make_destination("job1")
    await resumed.connect()
    await resumed.restore([a])
    assert await committed_ids(service, container, f"job1/{a.name}") == a.committed_blocks
    assert [n async for n in blob_names(service, container)] == [f"job1/{a.name}"]
    assert await content(resumed, a.name) == b"first block, 20 b\ntail\n"
    # Untouched since the restore: commit reports the restore's ETag, not the stale one.
    (same,) = await resumed.commit([a])
    props = await service.get_blob_client(container, f"job1/{a.name}").get_blob_properties()
    assert same.etag == props.etag != a.etag
    assert same.committed_blocks == a.committed_blocks
    await resumed.write(a.name, b"rewritten once\n")
    (a2,) = await resumed.commit([a])
    assert await content(resumed, a.name) == b"first block, 20 b\ntail\nrewritten once\n"
    assert a2.committed_blocks[:2] == a.committed_blocks
    assert a2.committed_bytes == 38
    await resumed.close()


async def test_block_ids_have_equal_length_and_continue_after_resume(
    dest: ExportDestinationClient,
    make_destination: Factory,
    service: BlobServiceClient,
    container: str,
) -> None:
    f = new_file()
    await dest.start_file(f)
    for i in range(3):
        await dest.write(f.name, f"line {i:02d} of session one\n".encode())
    (f,) = await dest.commit([f])
    resumed = make_destination("job1")
    await resumed.connect()
    await resumed.restore([f])
    for i in range(2):
        await resumed.write(f.name, f"line {i:02d} of session two\n".encode())
    (f,) = await resumed.commit([f])
    await resumed.close()

    ids = await committed_ids(service, container, f"job1/{f.name}")
    assert ids == f.committed_blocks
    assert len({len(i) for i in ids}) == 1
    assert len({len(base64.b64encode(i.encode())) for i in ids}) == 1
    assert [int(i.rsplit("-", 1)[1]) for i in ids] == [0, 1, 2, 3, 4]
    assert len({i.rsplit("-", 1)[0] for i in ids}) == 2  # one prefix per writer session


# -- what Azure adds ------------------------------------------------------------------


async def test_committed_blobs_are_ndjson(
    dest: ExportDestinationClient,
    make_destination: Factory,
    service: BlobServiceClient,
    container: str,
) -> None:
    f = new_file()
    await dest.start_file(f)
    await dest.write(f.name, b"{}\n")
    (f,) = await dest.commit([f])
    blob = service.get_blob_client(container, f"job1/{f.name}")
    assert (await blob.get_blob_properties()).content_settings.content_type == NDJSON
    resumed = make_destination("job1")
    await resumed.connect()
    await resumed.restore([f])  # a re-commit must keep it
    assert (await blob.get_blob_properties()).content_settings.content_type == NDJSON
    await resumed.close()


async def test_uncommitted_writes_are_invisible(dest: ExportDestinationClient) -> None:
    f = new_file()
    await dest.start_file(f)
    await dest.write(f.name, b"staged: longer than one block\n")
    await dest.write(f.name, b"buffered\n")
    with pytest.raises(DestinationError):
        await content(dest, f.name)


async def test_read_streams_in_chunks(dest: ExportDestinationClient) -> None:
    f, empty = new_file("Patient"), new_file("Observation")
    await dest.start_file(f)
    await dest.start_file(empty)
    await dest.write(f.name, b"x" * 39 + b"\n")
    await dest.commit([f, empty])
    assert [len(c) async for c in dest.read(f.name, chunk=16)] == [16, 16, 8]
    assert [c async for c in dest.read(empty.name)] == []


async def test_signed_url_reads_that_blob_only(dest: ExportDestinationClient) -> None:
    a, b = new_file("Patient"), new_file("Observation")
    for f in (a, b):
        await dest.start_file(f)
        await dest.write(f.name, f"{f.type}\n".encode())
    await dest.commit([a, b])
    url = dest.signed_url(a.name, datetime.now(UTC) + timedelta(minutes=5))
    assert url is not None
    assert "sp=r&" in url
    other = url.replace(a.name, b.name)
    expired = dest.signed_url(a.name, datetime.now(UTC) - timedelta(minutes=5))
    assert expired is not None
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as response:
            assert response.status == 200
            assert response.headers["Content-Type"] == NDJSON
            assert await response.read() == b"Patient\n"
        for denied in (other, expired):
            async with http.get(denied) as response:
                assert response.status == 403
        async with http.put(url, data=b"x", headers={"x-ms-blob-type": "BlockBlob"}) as response:
            assert response.status == 403


async def test_no_signed_url_without_an_account_key(azurite: Azurite) -> None:
    async with BlobServiceClient(azurite.blob_endpoint) as anonymous:
        client = AzureBlobDestination("job1", anonymous, "any")
        assert client.signed_url("Patient-0001.ndjson", datetime.now(UTC)) is None


@pytest.mark.parametrize("name", ["../x", ".hidden", "a/b", "a\\b", ""])
async def test_file_names_cannot_escape_the_job(dest: ExportDestinationClient, name: str) -> None:
    with pytest.raises(DestinationError, match="invalid file name"):
        await dest.write(name, b"{}\n")
    with pytest.raises(DestinationError, match="invalid file name"):
        dest.signed_url(name, datetime.now(UTC))


async def test_delete_all_keeps_other_jobs(
    make_destination: Factory, service: BlobServiceClient, container: str
) -> None:
    clients = [make_destination("job1"), make_destination("job10")]
    for client in clients:
        await client.connect()
        f = new_file()
        await client.start_file(f)
        await client.write(f.name, b"{}\n")
        await client.commit([f])
    await clients[0].delete_all()
    assert [n async for n in blob_names(service, container)] == ["job10/Patient-0001.ndjson"]
    for client in clients:
        await client.close()


async def test_a_container_is_created_once_and_again_once_it_is_gone(
    azurite: Azurite, container: str
) -> None:
    """Work items share what the process knows of its containers: one creation, not
    one per item; a container deleted behind the service's back fails the write that
    meets its absence (retriable), and the retry's ``connect`` creates it again."""
    creations: list[str] = []

    def record(response: Any) -> None:
        request = response.http_request
        if request.method == "PUT" and "restype=container" in request.url:
            creations.append(request.url)

    known: set[str] = set()
    async with BlobServiceClient.from_connection_string(
        azurite.connection_string, raw_response_hook=record
    ) as service:

        async def export(job_id: str) -> None:
            client = AzureBlobDestination(job_id, service, container, containers=known)
            try:
                await client.connect()
                f = new_file()
                await client.start_file(f)
                await client.write(f.name, b"{}\n")
                await client.commit([f])
            finally:
                await client.close()

        await export("job1")
        await export("job2")
        assert len(creations) == 1 and known == {container}
        await service.delete_container(container)
        with pytest.raises(DestinationError, match="HTTP 404"):
            await export("job3")
        assert known == set()
        await export("job3")  # the retry
        assert len(creations) == 2
        names = [n async for n in blob_names(service, container)]
        assert names == ["job3/Patient-0001.ndjson"]


async def test_a_block_damaged_on_its_way_is_refused_and_sent_again(
    azurite: Azurite, container: str
) -> None:
    """Every block carries its Content-MD5: one whose bytes change after it was hashed
    (flipped here, between the client and the emulator) is refused with 400 Md5Mismatch,
    so it is never committed; the failure is retriable, and the commit that follows sends
    the same block again, intact."""
    sent: list[str | None] = []  # each Put Block's Content-MD5

    def damage(request: Any) -> None:
        http = request.http_request
        if "comp=block&" in http.url:
            sent.append(http.headers.get("Content-MD5"))
            if len(sent) == 1:
                http.data = b"X" + bytes(http.data)[1:]

    async with BlobServiceClient.from_connection_string(
        azurite.connection_string, raw_request_hook=damage
    ) as service:
        client = AzureBlobDestination("job1", service, container, block_bytes=16)
        await client.connect()
        f = new_file()
        await client.start_file(f)
        lines = [b"line one, a block of its own\n", b"line two\n"]
        await client.write(f.name, lines[0])  # staged at once: over the block size
        with pytest.raises(DestinationError, match="HTTP 400 Md5Mismatch") as caught:
            await client.commit([f])
        assert caught.value.retriable
        await client.write(f.name, lines[1])
        (f,) = await client.commit([f])
        assert len(sent) == 3 and all(sent)  # the damaged block, it again, the second
        assert sent[0] == sent[1]  # the same block, hashed once
        assert await content(client, f.name) == b"".join(lines)
        assert f.committed_bytes == sum(map(len, lines))
        await client.close()


# -- errors ---------------------------------------------------------------------------


async def test_a_wrong_account_key_is_an_auth_error(azurite: Azurite) -> None:
    key = base64.b64encode(b"not the key" * 6).decode()
    async with BlobServiceClient.from_connection_string(
        connection_string(azurite.port, key)
    ) as service:
        client = AzureBlobDestination("job1", service, "denied")
        with pytest.raises(DestinationAuthError) as caught:
            await client.connect()
    assert not caught.value.retriable
    assert str(caught.value) == "authorization failed for the destination"
    assert key not in repr(caught.value)


@pytest.fixture
def persistent_azurite() -> Iterator[Azurite]:
    """An emulator of its own that keeps its data on disk across a stop and start."""
    with Azurite(persist=True) as server:
        yield server


async def test_an_outage_is_retriable_and_commit_resumes(persistent_azurite: Azurite) -> None:
    server = persistent_azurite
    async with BlobServiceClient.from_connection_string(
        server.connection_string, retry_total=0
    ) as service:
        client = AzureBlobDestination("job1", service, "outage", block_bytes=16)
        await client.connect()
        f = new_file()
        await client.start_file(f)
        await client.write(f.name, b"before\n")
        (f,) = await client.commit([f])
        await server.astop()
        await client.write(f.name, b"during\n")
        with pytest.raises(DestinationError) as caught:
            await client.commit([f])
        assert type(caught.value) is DestinationError
        assert caught.value.retriable
        await server.astart()
        (f,) = await client.commit([f])
        assert await content(client, f.name) == b"before\nduring\n"
        assert f.committed_bytes == 14
        await client.close()


async def test_blocks_uploading_together_keep_their_order(
    service: BlobServiceClient, container: str
) -> None:
    client = AzureBlobDestination("job1", service, container, block_bytes=64, uploads=4)
    await client.connect()
    f = new_file()
    await client.start_file(f)
    lines = [b"%05d %s\n" % (n, b"x" * (n % 97)) for n in range(400)]
    for line in lines:  # about 300 blocks, up to four staging at a time
        await client.write(f.name, line)
    (f,) = await client.commit([f])
    assert await content(client, f.name) == b"".join(lines)
    assert len(f.committed_blocks) > 100
    await client.close()


async def test_an_outage_with_blocks_in_flight_loses_none(persistent_azurite: Azurite) -> None:
    server = persistent_azurite
    async with BlobServiceClient.from_connection_string(
        server.connection_string, retry_total=0
    ) as service:
        client = AzureBlobDestination("job1", service, "inflight", block_bytes=16, uploads=3)
        await client.connect()
        f = new_file()
        await client.start_file(f)
        await client.write(f.name, b"before the outage\n")
        (f,) = await client.commit([f])
        await server.astop()
        written = [b"line %d during the outage\n" % n for n in range(6)]
        sent = 0

        async def write_then_commit() -> None:
            nonlocal sent
            for line in written:  # blocks are staged, and fail, while writing goes on
                sent += 1  # a write that fails has taken its line all the same
                await client.write(f.name, line)
            await client.commit([f])

        with pytest.raises(DestinationError) as caught:
            await write_then_commit()
        assert caught.value.retriable
        await server.astart()
        for line in written[sent:]:  # what the failure interrupted
            await client.write(f.name, line)
        (f,) = await client.commit([f])
        assert await content(client, f.name) == b"before the outage\n" + b"".join(written)
        await client.close()


def _http_error(status: int, cls: type[HttpResponseError] = HttpResponseError) -> Exception:
    error = cls(message="https://acct.blob.core.windows.net/c/b?sig=SECRET")
    error.status_code = status
    return error


@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (ClientAuthenticationError("sig=SECRET"), DestinationAuthError),
        (_http_error(403), DestinationAuthError),
        (_http_error(412, ResourceModifiedError), DestinationConflict),
        (_http_error(412), DestinationConflict),
        (_http_error(503), DestinationError),
        (ServiceRequestError("connection refused, sig=SECRET"), DestinationError),
    ],
)
def test_azure_errors_are_translated_without_secrets(
    exc: Exception, expected: type[DestinationError]
) -> None:
    translated = AzureBlobDestination._translate("commit", exc)
    assert type(translated) is expected
    assert "SECRET" not in str(translated)
