-- Work items (import batches) point at their job; a parent is never leased itself.
ALTER TABLE jobs ADD COLUMN parent_id TEXT;
CREATE INDEX jobs_parent ON jobs (parent_id, created_at);
