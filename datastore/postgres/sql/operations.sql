-- Job records, the queue and the leases. Times are epoch seconds (double precision).
-- Work items (parent_id set) count neither against a client's limit nor in lists.

-- name: lock_client
-- One client's kick-offs run one at a time: dedupe and the active-job limit are
-- check-then-insert, safe only when serialized.
SELECT pg_advisory_xact_lock(1163416407, hashtext($1));

-- name: find_active
SELECT id FROM jobs
WHERE client = $1 AND fingerprint = $2 AND NOT cancel_requested AND parent_id IS NULL
  AND status IN ('queued', 'running', 'retriable', 'paused')
ORDER BY created_at LIMIT 1;

-- name: count_active
SELECT count(*) FROM jobs
WHERE client = $1 AND NOT cancel_requested AND parent_id IS NULL
  AND status IN ('queued', 'running', 'retriable', 'paused');

-- name: insert
INSERT INTO jobs (id, kind, client, fingerprint, parent_id, status, lease_version,
                  retry_after, created_at, record)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10);

-- name: notify
-- Wakes listening workers (datastore.postgres.operations.listen) when the transaction
-- commits; the payload is the job id.
SELECT pg_notify('exportsvc_jobs', $1);

-- name: get
SELECT record, status, lease_owner, lease_version, lease_expires, restart_count,
       cancel_requested, pause_requested
FROM jobs WHERE id = $1;

-- name: children
SELECT record, status, lease_owner, lease_version, lease_expires, restart_count,
       cancel_requested, pause_requested
FROM jobs WHERE parent_id = $1 ORDER BY created_at, id;

-- name: acquire
-- One statement: pick the oldest runnable job no other transaction holds (SKIP LOCKED),
-- lease it, bump its fencing version and, for an expired lease, its restart count.
-- ($1 owner, $2 now, $3 lease expiry)
WITH candidate AS (
    SELECT id FROM jobs
    WHERE kind != 'import' AND (
           (status IN ('queued', 'paused') AND NOT pause_requested)
        OR (status = 'retriable' AND coalesce(retry_after, 0) <= $2 AND NOT pause_requested)
        OR (status = 'running' AND lease_expires < $2)
        OR (cancel_requested
            AND (status IN ('queued', 'retriable', 'paused', 'completed', 'failed')
                 OR (status = 'running' AND lease_owner IS NULL))))
    ORDER BY created_at
    LIMIT 1
    FOR UPDATE SKIP LOCKED
)
UPDATE jobs SET
    restart_count = jobs.restart_count
        + (jobs.status = 'running' AND jobs.lease_owner IS NOT NULL)::integer,
    status = 'running',
    lease_owner = $1,
    lease_version = jobs.lease_version + 1,
    lease_expires = $3
FROM candidate
WHERE jobs.id = candidate.id
RETURNING jobs.record, jobs.status, jobs.lease_owner, jobs.lease_version, jobs.lease_expires,
          jobs.restart_count, jobs.cancel_requested, jobs.pause_requested;

-- name: heartbeat
UPDATE jobs SET lease_expires = $3
WHERE id = $1 AND lease_version = $2 AND status = 'running' AND lease_owner IS NOT NULL
RETURNING cancel_requested, pause_requested;

-- name: save
-- Fenced by the lease version: no row back means the lease was lost.
UPDATE jobs SET
    status = $3,
    lease_owner = $4,
    -- While the lease is held its expiry belongs to the heartbeat; a release clears it.
    lease_expires = CASE WHEN $4::text IS NULL THEN NULL ELSE coalesce(lease_expires, $5) END,
    retry_after = $6,
    restart_count = $7,
    record = $8
WHERE id = $1 AND lease_version = $2
RETURNING id;

-- name: lock_job
SELECT id FROM jobs WHERE id = $1 FOR UPDATE;

-- name: settle
-- Run after lock_job in the same transaction: this statement's snapshot then sees every
-- work item saved before the lock was granted, so the last settle always sees them all.
UPDATE jobs SET status = CASE
    WHEN EXISTS (SELECT 1 FROM jobs AS c WHERE c.parent_id = $1
                 AND c.status IN ('queued', 'running', 'retriable', 'paused')) THEN 'running'
    WHEN NOT EXISTS (SELECT 1 FROM jobs AS c WHERE c.parent_id = $1
                     AND c.status != 'completed') THEN 'completed'
    WHEN EXISTS (SELECT 1 FROM jobs AS c WHERE c.parent_id = $1
                 AND c.status = 'cancelled') THEN 'cancelled'
    ELSE 'failed' END
WHERE id = $1;

-- name: request_pause
UPDATE jobs SET pause_requested = $2
WHERE id = $1 AND NOT cancel_requested
  AND status IN ('queued', 'running', 'retriable', 'paused')
RETURNING id;

-- name: request_pause_children
UPDATE jobs SET pause_requested = $2
WHERE parent_id = $1 AND NOT cancel_requested
  AND status IN ('queued', 'running', 'retriable', 'paused');

-- name: request_cancel
UPDATE jobs SET cancel_requested = true
WHERE id = $1 AND NOT cancel_requested AND status != 'cancelled'
RETURNING id;

-- name: request_cancel_children
UPDATE jobs SET cancel_requested = true
WHERE parent_id = $1 AND NOT cancel_requested AND status != 'cancelled';

-- name: list_all
SELECT record, status, lease_owner, lease_version, lease_expires, restart_count,
       cancel_requested, pause_requested
FROM jobs WHERE parent_id IS NULL ORDER BY created_at DESC LIMIT $1;

-- name: list_client
SELECT record, status, lease_owner, lease_version, lease_expires, restart_count,
       cancel_requested, pause_requested
FROM jobs WHERE parent_id IS NULL AND client = $2 ORDER BY created_at DESC LIMIT $1;

-- name: put_secret
INSERT INTO secrets (name, ciphertext) VALUES ($1, $2)
ON CONFLICT (name) DO UPDATE SET ciphertext = excluded.ciphertext;

-- name: get_secret
SELECT ciphertext FROM secrets WHERE name = $1;

-- name: delete_secret
DELETE FROM secrets WHERE name = $1;

-- name: claim
-- Purges expired claims, then inserts (or takes over an expired) one; a row comes back
-- exactly when the key was free.
WITH purged AS (DELETE FROM claims WHERE expires_at <= $3)
INSERT INTO claims (key, expires_at) VALUES ($1, $2)
ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at
WHERE claims.expires_at <= $3
RETURNING 1;
