"""The SecretStore: destination credentials of each job, encrypted at rest.

A job's destination (type plus credentials) is stored at kick-off under a name kept in
the record, read by the task, and deleted when the job ends. Values are Fernet-encrypted
before they reach the operation data store, and never appear in a response or a log.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken

from datastore.operations import OperationDataStore
from exportsvc.errors import ExportSvcError, SecretNotFound
from exportsvc.settings import Settings


def load_key(settings: Settings) -> bytes:
    """The configured key, else the one in ``{data_dir}/secret.key`` (created 0600)."""
    if settings.secret_key is not None:
        return settings.secret_key.get_secret_value().encode()
    path = Path(settings.data_dir) / "secret.key"
    try:
        return path.read_bytes().strip()
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    key = Fernet.generate_key()
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:  # another process made it first
        return path.read_bytes().strip()
    with os.fdopen(fd, "wb") as out:
        out.write(key)
    return key


class SecretStore:
    def __init__(self, backend: OperationDataStore, key: bytes) -> None:
        self._backend = backend
        self._fernet = Fernet(key)

    async def put(self, name: str, value: dict[str, Any]) -> None:
        await self._backend.put_secret(name, self._fernet.encrypt(orjson.dumps(value)))

    async def get(self, name: str) -> dict[str, Any]:
        ciphertext = await self._backend.get_secret(name)
        if ciphertext is None:
            raise SecretNotFound()
        try:
            value: dict[str, Any] = orjson.loads(self._fernet.decrypt(ciphertext))
        except InvalidToken as exc:
            raise ExportSvcError("the destination secret cannot be decrypted") from exc
        return value

    async def delete(self, name: str) -> None:
        await self._backend.delete_secret(name)
