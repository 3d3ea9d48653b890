"""A throwaway PostgreSQL cluster for tests, made with ``initdb`` and run with ``pg_ctl``.

:class:`PostgresCluster` creates a cluster in a temporary folder (trust authentication,
superuser ``postgres``, UTF8, no locale), starts it listening only on 127.0.0.1 on a free
port (and on a unix socket in that folder) with durability switched off for speed, waits
until it accepts connections, and at the end stops exactly that server (``pg_ctl stop -m
fast`` on its data directory) and removes the folder. Tests isolate themselves with
:meth:`PostgresCluster.create_database`.

PostgreSQL refuses to run as root. Under root, every server command runs as the
unprivileged user ``nobody`` through ``runuser`` (util-linux), and the temporary folder is
handed to that user; clients still connect as the database role ``postgres``.

Without the server binaries the tests that need them are skipped, except under CI
(``CI`` set), where missing binaries are a failure, not a silent skip.
"""

from __future__ import annotations

import asyncio
import os
import pwd
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

import pytest

from tests.azurite import free_port

BIN_DIRS = (Path("/usr/local/bin"), Path("/usr/bin"))
STARTUP_SECONDS = 30.0
COMMAND_SECONDS = 60.0
UNPRIVILEGED = "nobody"
_IDENTIFIER = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")

# Durability off, nothing the tests do not need: a crash loses the cluster, which is fine.
SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    "wal_level": "minimal",
    "max_wal_senders": "0",
    "max_wal_size": "1GB",
    "checkpoint_timeout": "30min",
    "max_connections": "200",
    "shared_buffers": "128MB",
    "logging_collector": "off",
    "timezone": "UTC",
}


def _debian_bin_dirs() -> list[Path]:
    """Debian's ``/usr/lib/postgresql/<major>/bin``, newest major first."""
    found = Path("/usr/lib/postgresql").glob("*/bin")
    return sorted(found, key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)[::-1]


def find_binary(name: str) -> Path | None:
    """``name`` from ``$EXPORTSVC_PG_BIN``, Debian's versioned folders, or the PATH."""
    env = os.environ.get("EXPORTSVC_PG_BIN")
    for folder in ([Path(env)] if env else []) + _debian_bin_dirs() + list(BIN_DIRS):
        candidate = folder / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    found = shutil.which(name)
    return Path(found) if found else None


def require_binaries() -> dict[str, Path]:
    """``initdb``, ``pg_ctl`` and ``psql``; skip the test without them (fail under CI)."""
    found = {name: find_binary(name) for name in ("initdb", "pg_ctl", "psql")}
    missing = [name for name, path in found.items() if path is None]
    if not missing:
        return {name: path for name, path in found.items() if path is not None}
    reason = (
        f"PostgreSQL server binaries missing ({', '.join(missing)}); install postgresql "
        "or set EXPORTSVC_PG_BIN to the folder holding initdb and pg_ctl"
    )
    if os.environ.get("CI"):
        raise RuntimeError(reason)
    pytest.skip(reason)


def _run_as() -> list[str]:
    """The prefix that runs a server command as an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return []
    runuser = shutil.which("runuser") or shutil.which("runuser", path="/usr/sbin:/sbin")
    if runuser is None:
        raise RuntimeError("running as root without runuser: cannot start PostgreSQL")
    return [runuser, "-u", UNPRIVILEGED, "--"]


class PostgresCluster:
    """One ``postgres`` server in its own temporary cluster; a context manager."""

    def __init__(self) -> None:
        self.binaries = require_binaries()
        self._prefix = _run_as()
        self.port = free_port()
        self.workdir = Path(tempfile.mkdtemp(prefix="exportsvc-pg-"))
        self.datadir = self.workdir / "data"
        self.logfile = self.workdir / "postgres.log"
        self._started = False
        if self._prefix:
            user = pwd.getpwnam(UNPRIVILEGED)
            os.chown(self.workdir, user.pw_uid, user.pw_gid)

    @property
    def dsn(self) -> str:
        return self.dsn_for("postgres")

    def dsn_for(self, database: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def log(self) -> str:
        if not self.logfile.exists():
            return ""
        return self.logfile.read_text(errors="replace")[-4000:]

    def _server(self, *args: str, timeout: float = COMMAND_SECONDS) -> None:
        """Run a server program (initdb, pg_ctl) as the cluster's owner."""
        done = subprocess.run(
            [*self._prefix, *args],
            cwd=self.workdir,  # a folder the unprivileged user may enter
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(
                f"{Path(args[0]).name} failed ({done.returncode}):\n{done.stdout}{done.stderr}"
                f"\n{self.log()}"
            )

    def init(self) -> None:
        self._server(
            str(self.binaries["initdb"]),
            "-D",
            str(self.datadir),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-locale",
            "--no-sync",
        )

    def start(self) -> None:
        """Start the server (on :attr:`port`) and wait until it accepts connections."""
        settings = {**SERVER_SETTINGS, "port": str(self.port)}
        settings["unix_socket_directories"] = str(self.workdir)
        # pg_ctl hands these to a shell: quote every value.
        options = " ".join(f"-c {key}={shlex.quote(value)}" for key, value in settings.items())
        self._server(
            str(self.binaries["pg_ctl"]),
            "-D",
            str(self.datadir),
            "-l",
            str(self.logfile),
            "-o",
            options,
            "-w",
            "-t",
            str(int(STARTUP_SECONDS)),
            "start",
            timeout=STARTUP_SECONDS + 10,
        )
        self._started = True
        deadline = time.monotonic() + STARTUP_SECONDS
        while not self._accepts():
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"postgres did not accept connections within {STARTUP_SECONDS}s:\n{self.log()}"
                )
            time.sleep(0.05)

    def _psql(self, sql: str, database: str = "postgres") -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                str(self.binaries["psql"]),
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                self.dsn_for(database),
                "-c",
                sql,
            ],
            capture_output=True,
            text=True,
            timeout=COMMAND_SECONDS,
            check=False,
        )

    def _accepts(self) -> bool:
        return self._psql("SELECT 1").returncode == 0

    def create_database(self, name: str, template: str | None = None) -> str:
        """Create a database (``name``: a plain lower-case identifier), empty or a copy of
        database ``template`` (which nobody may be connected to); its DSN."""
        for identifier in (name, template or name):
            if not _IDENTIFIER.match(identifier):
                raise ValueError(f"not a plain database name: {identifier!r}")
        copy = f' TEMPLATE "{template}"' if template else ""
        done = self._psql(f'CREATE DATABASE "{name}"{copy}')
        if done.returncode != 0:
            raise RuntimeError(f"CREATE DATABASE {name} failed:\n{done.stderr}")
        return self.dsn_for(name)

    async def acreate_database(self, name: str) -> str:
        return await asyncio.to_thread(self.create_database, name)

    def drop_database(self, name: str) -> None:
        """Drop database ``name`` (a plain lower-case identifier), ending whatever sessions
        still use it."""
        if not _IDENTIFIER.match(name):
            raise ValueError(f"not a plain database name: {name!r}")
        done = self._psql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if done.returncode != 0:
            raise RuntimeError(f"DROP DATABASE {name} failed:\n{done.stderr}")

    def stop(self) -> None:
        """Stop this cluster's server (fast shutdown: running transactions roll back)."""
        if not self._started:
            return
        self._started = False
        self._server(
            str(self.binaries["pg_ctl"]), "-D", str(self.datadir), "-m", "fast", "-w", "stop"
        )

    def cleanup(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        try:
            self.init()
            for attempt in range(3):
                try:
                    self.start()
                    return self
                except RuntimeError:
                    if attempt == 2 or "could not bind" not in self.log():
                        raise
                    self.port = free_port()  # another process took the port meanwhile
                    self.logfile.unlink(missing_ok=True)
        except BaseException:
            self.cleanup()
            raise
        raise AssertionError("unreachable")

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()

    async def __aenter__(self) -> PostgresCluster:
        return await asyncio.to_thread(self.__enter__)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await asyncio.to_thread(self.cleanup)
