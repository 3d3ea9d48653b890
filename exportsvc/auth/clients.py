"""The registered SMART Backend Services clients (``EXPORTSVC_AUTH_CLIENTS``).

Each client signs its assertions with a private key whose public half is registered here:
inline (``jwks``) or at a URL (``jwks_url``) that must also be listed in
``EXPORTSVC_AUTH_CLIENT_JWKS_URLS``, the only URLs this service fetches client keys from.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from exportsvc.auth.jwks import check_jwks_url, public_keys
from exportsvc.auth.scopes import invalid_scopes


class ClientRegistration(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    client_id: str = Field(min_length=1, max_length=255, pattern=r"^[\x21-\x7e]+$")
    jwks: dict[str, Any] | None = None
    """The client's public JWK Set, inline."""
    jwks_url: str | None = None
    """Where the client publishes its public JWK Set (fetched and cached)."""
    scopes: list[str] = Field(min_length=1)
    """The most this client may be granted, e.g. ``["system/*.rs"]``."""

    @field_validator("jwks")
    @classmethod
    def _public(cls, jwks: dict[str, Any] | None) -> dict[str, Any] | None:
        if jwks is not None:
            public_keys(jwks)
        return jwks

    @field_validator("jwks_url")
    @classmethod
    def _url(cls, url: str | None) -> str | None:
        return None if url is None else check_jwks_url(url)

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, scopes: list[str]) -> list[str]:
        if bad := invalid_scopes(scopes):
            raise ValueError(f"not a system scope this service understands: {bad}")
        return scopes

    @model_validator(mode="after")
    def _one_key_source(self) -> ClientRegistration:
        if (self.jwks is None) == (self.jwks_url is None):
            raise ValueError(f"client {self.client_id!r}: give exactly one of jwks and jwks_url")
        return self
