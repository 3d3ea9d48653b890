"""One exception tree for the whole service.

Every error a client can cause or see is an :class:`ExportSvcError`. The HTTP middleware
turns it into a FHIR ``OperationOutcome`` with ``status``; the worker reads ``retriable``
to decide between a backoff and a final failure. The docstring is the default message.
Messages must never contain a secret: they are shown to clients and written to logs.
"""

from __future__ import annotations

from typing import ClassVar


class ExportSvcError(Exception):
    """The export service failed."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "exception"  # FHIR issue-type code
    retriable: ClassVar[bool] = False

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        self.message = message or (self.__doc__ or "").strip()
        self.headers = headers or {}
        super().__init__(self.message)


# -- client errors -------------------------------------------------------------------


class InvalidRequest(ExportSvcError):
    """The request is invalid."""

    status = 400
    code = "invalid"


class NotSupported(InvalidRequest):
    """The request uses a feature this server does not support."""

    code = "not-supported"


class LimitExceeded(InvalidRequest):
    """The request asks for more than this server accepts at once."""

    code = "too-long"


class Unauthorized(ExportSvcError):
    """This request needs a valid access token: Authorization: Bearer <token>."""

    status = 401
    code = "login"

    def __init__(self, message: str | None = None, *, headers: dict[str, str] | None = None):
        super().__init__(message, headers={"WWW-Authenticate": "Bearer", **(headers or {})})


class Forbidden(ExportSvcError):
    """This client may not do that."""

    status = 403
    code = "forbidden"


class NotFound(ExportSvcError):
    """No such resource."""

    status = 404
    code = "not-found"


class Conflict(ExportSvcError):
    """The request conflicts with the state of the job."""

    status = 409
    code = "conflict"


class TooManyJobs(ExportSvcError):
    """Too many running jobs for this client; retry later."""

    status = 429
    code = "throttled"


# -- job and storage errors ----------------------------------------------------------


class LeaseLost(ExportSvcError):
    """This worker no longer holds the job's lease; another worker owns it now."""

    code = "conflict"


class JobCancelled(ExportSvcError):
    """The job was cancelled."""


class DestinationError(ExportSvcError):
    """The export destination failed."""

    status = 502
    retriable = True


class DestinationAuthError(DestinationError):
    """Authorization failed for the destination."""

    retriable = False


class DestinationConflict(DestinationError):
    """The destination changed since the last checkpoint; another writer touched it."""


class SecretNotFound(ExportSvcError):
    """The job's destination secret is missing."""

    retriable = True


class KeysUnavailable(ExportSvcError):
    """The key set that verifies this token could not be fetched; retry later."""

    status = 503
    code = "transient"
    retriable = True


class StoreError(ExportSvcError):
    """The resource store failed."""

    status = 503
    retriable = True


class WritesLost(StoreError):
    """Writes that shared a transaction with a failed one were rolled back with it: the
    batch resumes from its last committed checkpoint."""


class PreparingFailed(ExportSvcError):
    """The process that prepares import lines ended (killed?): the batch resumes from its
    last checkpoint with a new one."""

    status = 503
    retriable = True
