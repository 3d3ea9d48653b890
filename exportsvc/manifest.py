"""The export manifest, whole or in pages (``allowPartialManifests``).

Pages: with ``allowPartialManifests=true`` page ``k`` lists the files of the export's
``k``-th work item in plan order (page 0 also the export's own error file). A page exists
once its item has completed, and never changes after: an item's files are final when it
completes. The one later addition is the ``link`` to page ``k + 1``, made once that page
exists, as the spec allows. So every page is immutable once returned, without storing
anything: it is a function of the job's records.
"""

from __future__ import annotations

from datetime import datetime

from destinations import ExportDestinationClient
from exportsvc.records import ExportJobRecord, JobStatus, OutputFile
from exportsvc.views import JobView


def page_files(view: JobView, page: int) -> list[OutputFile] | None:
    """The files of manifest page ``page``, or None while it does not exist."""
    items = view.exports
    if not 0 <= page < max(len(items), 1):
        return None
    if page == 0 and not items:  # an export of nothing: its own (error) files
        return list(view.job.output) if view.job.status == JobStatus.COMPLETED else None
    item = items[page]
    if item.status != JobStatus.COMPLETED:
        return None
    return list(item.output) + (list(view.job.output) if page == 0 else [])


def page_ready_at(view: JobView, page: int) -> datetime | None:
    """When page ``page`` came to exist: its URLs expire a TTL after that."""
    if page_files(view, page) is None:
        return None
    items = view.exports
    return items[page].completed_at if items else view.job.completed_at


def available_files(view: JobView) -> list[OutputFile]:
    """Files a client may download: all of a completed export; of a running one with
    partial manifests, those of the pages that exist."""
    job = view.job
    assert isinstance(job, ExportJobRecord)
    if job.status == JobStatus.COMPLETED:
        return view.files
    if not job.request.partial_manifests:
        return []
    pages = (page_files(view, k) for k in range(max(len(view.exports), 1)))
    return [f for files in pages if files for f in files]


def manifest(
    view: JobView,
    base: str,
    dest: ExportDestinationClient,
    expires: datetime,
    *,
    requires_token: bool = False,
    files: list[OutputFile] | None = None,
    next_url: str | None = None,
) -> dict[str, object]:
    """The manifest of ``files`` (default: every file of the job). Files are signed URLs
    (read-only, expiring with the manifest) where the destination can sign, else served
    by this service."""
    job = view.job
    assert isinstance(job, ExportJobRecord)
    proxied = False

    organized = job.request.organize_by

    def url_of(name: str) -> str:
        nonlocal proxied
        url = dest.signed_url(name, expires)
        if url is None:
            proxied = True
            url = f"{base}/_output/{job.id}/{name}"
        return url

    def entry(f: OutputFile) -> dict[str, object]:
        # fileSize (STU4): the committed length, which is the file as downloaded.
        item: dict[str, object] = {"type": f.type, "url": url_of(f.name), "count": f.count}
        item["fileSize"] = f.committed_bytes
        if organized and f.role == "output":  # files of blocks have no single type
            del item["type"]
            if f.continues_in:
                item["continuesInFile"] = url_of(f.continues_in)
        return item

    listed = view.files if files is None else files
    body: dict[str, object] = {
        "transactionTime": job.transaction_time.isoformat().replace("+00:00", "Z"),
        "request": job.request.request_url,
    }
    if organized:
        body["outputOrganizedBy"] = organized
    body["output"] = [entry(f) for f in listed if f.role == "output"]
    if job.request.since is not None:  # deletions are reported for a _since export only
        body["deleted"] = [entry(f) for f in listed if f.role == "deleted"]
    body["error"] = [entry(f) for f in listed if f.role == "error"]
    # Served files need a token exactly when this service demands one (known only once
    # every entry is made).
    body["requiresAccessToken"] = proxied and requires_token
    if next_url is not None:
        body["link"] = [{"relation": "next", "url": next_url}]
    return body
