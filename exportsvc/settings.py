"""All settings in one model, read from ``EXPORTSVC_*`` environment variables.

Each field is documented in the README's settings table; keep the two in step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from exportsvc.auth.clients import ClientRegistration
from exportsvc.ndjson_input import MAX_DEPTH


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="EXPORTSVC_", extra="ignore")

    data_dir: Path = Path(".exportsvc")
    """SQLite databases, the secret key and (by default) the filesystem destination."""

    database_url: SecretStr | None = None
    """``postgresql://...``: both stores in PostgreSQL (scale-out); unset: embedded SQLite."""
    database_pool_size: int = Field(default=10, ge=1)

    base_url: str | None = None
    """Public base URL; when unset, URLs are built from each request's Host."""

    destination: str = "filesystem"
    """``filesystem`` or ``azure-blob``: where new jobs write."""
    output_dir: Path | None = None
    """Root of the filesystem destination; default ``{data_dir}/output``."""
    azure_connection_string: SecretStr | None = None
    azure_account_url: str | None = None
    """With no connection string: the account URL, signed in with DefaultAzureCredential."""
    azure_container: str = "exports"
    azure_api_version: str | None = None
    """Pin the Blob service API version (an emulator may lag the SDK's default)."""
    azure_retry_total: int = Field(default=3, ge=0)
    """The Azure SDK's own retries per request (no retry layer on top of it)."""

    secret_key: SecretStr | None = None
    """Fernet key encrypting destination secrets; default a key file in ``data_dir``."""

    admin_token: SecretStr | None = None
    """Bearer token for ``/_admin``; when unset, only loopback clients may use it."""

    # limits on what a request may be (README: "Hostile input and limits")
    max_url_bytes: int = Field(default=8190, ge=1024, le=65536)
    """The longest request URL; longer: ``414``."""
    max_header_bytes: int = Field(default=8190, ge=1024, le=65536)
    """The longest header line; longer: ``431``."""
    max_headers: int = Field(default=100, ge=16, le=1024)
    """The most headers one request may have; more: ``431``."""
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024)
    """The largest request body (Parameters, import manifest, token form); larger: ``413``."""
    max_parameters: int = Field(default=500, ge=10)
    """The most kick-off parameters (query or Parameters entries); more: ``400``."""

    # authorization (exportsvc.auth)
    auth: Literal["smart", "external", "off"] = "smart"
    """``smart``: SMART Backend Services, tokens from ``POST /auth/token``; ``external``:
    bearer tokens of an external issuer (Entra ID...); ``off``: none (local use only)."""
    auth_clients: list[ClientRegistration] = Field(default_factory=list)
    """smart: registered clients, JSON list of ``{client_id, jwks | jwks_url, scopes}``."""
    auth_client_jwks_urls: list[str] = Field(default_factory=list)
    """smart: the only URLs client key sets (``jwks_url``) are fetched from, JSON list."""
    auth_token_key: SecretStr | None = None
    """smart: HS256 key (32+ characters) signing access tokens; unset: random per process."""
    auth_token_seconds: int = Field(default=300, ge=60, le=300)
    auth_replay_cache_size: int = Field(default=100_000, ge=100)
    """smart: assertion ``jti`` values remembered at once by a process until its stores are
    open; then they are claimed in the operation data store, shared by every process."""
    auth_issuer: str | None = None
    """external: the tokens' ``iss``."""
    auth_audience: list[str] = Field(default_factory=list)
    """external: accepted ``aud`` values, JSON list."""
    auth_issuer_jwks_url: str | None = None
    """external: the issuer's JWK Set URL, the only one fetched for it."""

    # import
    import_root: Path | None = None
    """``file://`` inputs must lie inside this folder; unset: no file inputs."""
    import_allowed_hosts: list[str] = Field(default_factory=list)
    """http(s) inputs only from these hosts (``host`` or ``host:port``), JSON list."""
    import_allowed_networks: list[str] = Field(default_factory=list)
    """Non-public networks (CIDR, JSON list) http(s) inputs may be read from; public
    addresses are always allowed, link-local/unspecified/multicast never (``outbound``)."""
    import_batch_bytes: int = Field(default=64 * 1024 * 1024, ge=1024)
    """Each input is split into batches (work items) of this many bytes."""
    import_max_line_bytes: int = Field(default=4 * 1024 * 1024, ge=256)
    import_max_depth: int = Field(default=MAX_DEPTH, ge=8, le=200)
    """Input lines nested deeper (objects and arrays) are refused (reported), not stored."""
    import_max_inputs: int = Field(default=1000, ge=1)
    """The most inputs one ``$import`` may name; more: ``400``."""
    import_lines_per_commit: int = Field(default=50_000, ge=1)
    """A batch checkpoints (one transaction) after this many lines ..."""
    import_commit_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    """... or once its pending resources hold this many bytes: memory stays bounded."""
    import_group_rows: int = Field(default=50_000, ge=0)
    """SQLite: the checkpoints of all running batches share one transaction until it holds
    this many rows (or is 2 s old, or anything else is written); 0: one each."""

    # export loop
    page_size: int = Field(default=2000, ge=1, le=100_000)
    max_file_bytes: int = Field(default=256 * 1024 * 1024, ge=1024)
    block_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    commit_every_pages: int = Field(default=25, ge=1)
    commit_interval_seconds: float = Field(default=5.0, gt=0)

    export_item_resources: int = Field(default=250_000, ge=1)
    """An export is split into work items of about this many resources per type."""

    # jobs and leases
    worker_concurrency: int = Field(default=2, ge=1)
    lease_seconds: float = Field(default=30.0, gt=0)
    poll_interval_seconds: float = Field(default=1.0, gt=0)
    drain_grace_seconds: float = Field(default=10.0, ge=0)
    max_failures: int = Field(default=5, ge=1)
    max_restarts: int = Field(default=10, ge=1)
    retry_base_seconds: float = Field(default=2.0, gt=0)
    retry_max_seconds: float = Field(default=300.0, gt=0)
    max_active_jobs_per_client: int = Field(default=5, ge=1)
    output_ttl_seconds: int = Field(default=24 * 3600, ge=60)

    @property
    def output_root(self) -> Path:
        return self.output_dir or self.data_dir / "output"

    @property
    def database_path(self) -> Path:
        """The embedded SQLite database: both stores and the secret table."""
        return self.data_dir / "exportsvc.sqlite3"
