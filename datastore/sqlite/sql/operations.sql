-- name: find_active
SELECT id FROM jobs
WHERE client = :client AND fingerprint = :fingerprint AND cancel_requested = 0
  AND parent_id IS NULL AND status IN ('queued', 'running', 'retriable', 'paused')
ORDER BY created_at LIMIT 1;

-- name: count_active
SELECT count(*) FROM jobs
WHERE client = :client AND cancel_requested = 0 AND parent_id IS NULL
  AND status IN ('queued', 'running', 'retriable', 'paused');

-- name: insert
INSERT INTO jobs (id, kind, client, fingerprint, parent_id, status, lease_version,
                  retry_after, created_at, record)
VALUES (:id, :kind, :client, :fingerprint, :parent_id, :status, :lease_version,
        :retry_after, :created_at, :record);

-- name: get
SELECT record, status, lease_owner, lease_version, lease_expires, restart_count,
       cancel_requested, pause_requested
FROM jobs WHERE id = :id;

-- name: children
SELECT record, status, lease_owner, lease_version, lease_expires, restart_count,
       cancel_requested, pause_requested
FROM jobs WHERE parent_id = :id ORDER BY created_at, id;

-- name: acquire
UPDATE jobs SET
    restart_count = restart_count + (status = 'running' AND lease_owner IS NOT NULL),
    status = 'running',
    lease_owner = :owner,
    lease_version = lease_version + 1,
    lease_expires = :expires
WHERE id = (
    SELECT id FROM jobs
    WHERE kind != 'import' AND (
           (status IN ('queued', 'paused') AND pause_requested = 0)
        OR (status = 'retriable' AND coalesce(retry_after, 0) <= :now AND pause_requested = 0)
        OR (status = 'running' AND lease_expires < :now)
        OR (cancel_requested = 1
            AND (status IN ('queued', 'retriable', 'paused', 'completed', 'failed')
                 OR (status = 'running' AND lease_owner IS NULL))))
    ORDER BY created_at LIMIT 1
)
RETURNING record, status, lease_owner, lease_version, lease_expires, restart_count,
          cancel_requested, pause_requested;

-- name: heartbeat
UPDATE jobs SET lease_expires = :expires
WHERE id = :id AND lease_version = :version AND status = 'running'
  AND lease_owner IS NOT NULL  -- a released lease (a planned export) is renewed by no one
RETURNING cancel_requested, pause_requested;

-- name: save
-- While the lease is held its expiry belongs to the heartbeat; a release clears it.
UPDATE jobs SET
    status = :status,
    lease_owner = :owner,
    lease_expires = CASE WHEN :owner IS NULL THEN NULL ELSE coalesce(lease_expires, :expires) END,
    retry_after = :retry_after,
    restart_count = :restart_count,
    record = :record
WHERE id = :id AND lease_version = :version;

-- name: settle
UPDATE jobs SET status = CASE
    WHEN EXISTS (SELECT 1 FROM jobs AS c WHERE c.parent_id = :id
                 AND c.status IN ('queued', 'running', 'retriable', 'paused')) THEN 'running'
    WHEN NOT EXISTS (SELECT 1 FROM jobs AS c WHERE c.parent_id = :id
                     AND c.status != 'completed') THEN 'completed'
    WHEN EXISTS (SELECT 1 FROM jobs AS c WHERE c.parent_id = :id
                 AND c.status = 'cancelled') THEN 'cancelled'
    ELSE 'failed' END
WHERE id = :id;

-- name: request_pause
UPDATE jobs SET pause_requested = :pause
WHERE id = :id AND cancel_requested = 0
  AND status IN ('queued', 'running', 'retriable', 'paused');

-- name: request_pause_children
UPDATE jobs SET pause_requested = :pause
WHERE parent_id = :id AND cancel_requested = 0
  AND status IN ('queued', 'running', 'retriable', 'paused');

-- name: request_cancel
UPDATE jobs SET cancel_requested = 1
WHERE id = :id AND cancel_requested = 0 AND status != 'cancelled';

-- name: request_cancel_children
UPDATE jobs SET cancel_requested = 1
WHERE parent_id = :id AND cancel_requested = 0 AND status != 'cancelled';

-- name: list_all
SELECT record, status, lease_owner, lease_version, lease_expires, restart_count,
       cancel_requested, pause_requested
FROM jobs WHERE parent_id IS NULL ORDER BY created_at DESC LIMIT :limit;

-- name: list_client
SELECT record, status, lease_owner, lease_version, lease_expires, restart_count,
       cancel_requested, pause_requested
FROM jobs WHERE parent_id IS NULL AND client = :client
ORDER BY created_at DESC LIMIT :limit;

-- name: put_secret
INSERT OR REPLACE INTO secrets (name, ciphertext) VALUES (:name, :ciphertext);

-- name: get_secret
SELECT ciphertext FROM secrets WHERE name = :name;

-- name: delete_secret
DELETE FROM secrets WHERE name = :name;

-- name: purge_claims
DELETE FROM claims WHERE expires_at <= :now;

-- name: claim
INSERT INTO claims (key, expires_at) VALUES (:key, :expires_at)
ON CONFLICT (key) DO UPDATE SET expires_at = excluded.expires_at
WHERE claims.expires_at <= :now;
