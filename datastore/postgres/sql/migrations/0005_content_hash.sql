-- The content hash of each version (datastore.postgres.staging.content_hash: its content
-- without the server's meta, as JSON with sorted keys, BLAKE2b-128), so that an import
-- merges its staged rows in one statement and compares contents there ("identical
-- content makes no new version"). NULL for deletions, and for versions written before
-- this migration or by an older process during a rolling upgrade: a write hashes the
-- current ones among its resources first. The partial index holds just those: new
-- versions never enter it, and hashed or superseded ones leave it.
ALTER TABLE resources ADD COLUMN content_hash bytea;
CREATE INDEX resources_unhashed ON resources (type, id)
    WHERE content_hash IS NULL AND raw IS NOT NULL AND next_seq IS NULL;
