-- Job records: the JSON document plus the columns that queries and control need.
CREATE TABLE jobs (
    id               TEXT    PRIMARY KEY,
    kind             TEXT    NOT NULL,
    client           TEXT    NOT NULL,
    fingerprint      TEXT    NOT NULL,
    status           TEXT    NOT NULL,
    lease_owner      TEXT,
    lease_version    INTEGER NOT NULL DEFAULT 0,
    lease_expires    REAL,
    retry_after      REAL,
    restart_count    INTEGER NOT NULL DEFAULT 0,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    pause_requested  INTEGER NOT NULL DEFAULT 0,
    created_at       REAL    NOT NULL,
    record           TEXT    NOT NULL
);
CREATE INDEX jobs_runnable ON jobs (status, created_at);
CREATE INDEX jobs_client ON jobs (client, status);
-- Destination secrets, encrypted (Fernet) before they reach this table.
CREATE TABLE secrets (
    name       TEXT PRIMARY KEY,
    ciphertext BLOB NOT NULL
);
