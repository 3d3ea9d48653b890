-- Bookkeeping of the numbered migrations in sql/migrations (datastore.postgres.db).
-- Advisory lock keys of this service: (1163416406 = 'EXSV', n) with n = 1 migrations,
-- 2 resource writes; (1163416407, hashtext(client)) one client's kick-offs.

-- name: lock_migrations
SELECT pg_advisory_xact_lock(1163416406, 1);

-- name: create_migrations_table
CREATE TABLE IF NOT EXISTS schema_migrations (
    number     integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
);

-- name: migrations_table_exists
SELECT to_regclass('schema_migrations') IS NOT NULL;

-- name: applied
SELECT number, name, checksum FROM schema_migrations ORDER BY number;

-- name: record_migration
INSERT INTO schema_migrations (number, name, checksum) VALUES ($1, $2, $3);
