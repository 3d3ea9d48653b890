-- Job records: exports, imports, and the imports' batches (work items, which point at
-- their parent; a parent import is never leased itself). The JSON document (json keeps
-- the text as written, like SQLite's TEXT) plus the columns that queries and control
-- need. Times are epoch seconds (double precision), as datastore.columns reads and
-- writes them for every SQL backend.
CREATE TABLE jobs (
    id               text             PRIMARY KEY,
    kind             text             NOT NULL,
    client           text             NOT NULL,
    fingerprint      text             NOT NULL,
    parent_id        text,
    status           text             NOT NULL,
    lease_owner      text,
    lease_version    bigint           NOT NULL DEFAULT 0,
    lease_expires    double precision,
    retry_after      double precision,
    restart_count    integer          NOT NULL DEFAULT 0,
    cancel_requested boolean          NOT NULL DEFAULT false,
    pause_requested  boolean          NOT NULL DEFAULT false,
    created_at       double precision NOT NULL,
    record           json             NOT NULL
);
-- The queue: only jobs that may become runnable, oldest first.
CREATE INDEX jobs_runnable ON jobs (created_at)
    WHERE kind != 'import'
      AND (status IN ('queued', 'running', 'retriable', 'paused') OR cancel_requested);
CREATE INDEX jobs_client ON jobs (client, status) WHERE parent_id IS NULL;
CREATE INDEX jobs_parent ON jobs (parent_id, created_at) WHERE parent_id IS NOT NULL;
CREATE INDEX jobs_listed ON jobs (created_at) WHERE parent_id IS NULL;

-- Destination secrets, encrypted (Fernet) before they reach this table.
CREATE TABLE secrets (
    name       text  PRIMARY KEY,
    ciphertext bytea NOT NULL
);
