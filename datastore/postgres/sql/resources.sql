-- Resource versions. Page and count queries take ($1 type, $2 snapshot seq, $3 since,
-- $4 until) then, for pages, ($5 after seq, $6 limit); the patient list comes last.

-- name: lock_writes
-- Serializes every writer of versions, so that sequence numbers commit in order.
SELECT pg_advisory_xact_lock(1163416406, 2);

-- name: current_seq
SELECT coalesce(max(seq), 0) FROM resources;

-- name: current_version
SELECT seq, version, deleted FROM resources
WHERE type = $1 AND id = $2 AND next_seq IS NULL;

-- name: create_staging
-- A write's staged resources (datastore.postgres.staging) and their compartment rows:
-- temporary tables of the session, emptied when each transaction ends. The merge's
-- estimated cost is far above jit_above_cost (the staged rows are never analyzed), and
-- compiling it would take longer than running it: no JIT in this transaction. Nor the
-- notice "already exists, skipping" at every write. The merge sorts the staged bytes
-- (4 MiB and more) to join them: in memory, not through a temporary file.
SET LOCAL jit = off;
SET LOCAL work_mem = '64MB';
SET LOCAL client_min_messages = warning;
CREATE TEMP TABLE IF NOT EXISTS write_staging (
    idx          integer NOT NULL,
    type         text    COLLATE "C" NOT NULL,
    id           text    COLLATE "C" NOT NULL,
    last_updated bigint  NOT NULL,
    head         bytea   NOT NULL,
    tail         bytea   NOT NULL,
    content_hash bytea   NOT NULL,
    import_pos   bigint,
    stamp_at     integer  -- where tail holds a pending stamp; NULL: last_updated is kept
) ON COMMIT DELETE ROWS;
CREATE TEMP TABLE IF NOT EXISTS write_staging_patients (
    idx        integer NOT NULL,
    patient_id text    COLLATE "C" NOT NULL
) ON COMMIT DELETE ROWS;

-- name: stage
INSERT INTO write_staging
SELECT * FROM unnest($1::integer[], $2::text[], $3::text[], $4::bigint[], $5::bytea[],
                     $6::bytea[], $7::bytea[], $8::bigint[], $9::integer[]);

-- name: stage_patients
INSERT INTO write_staging_patients SELECT * FROM unnest($1::integer[], $2::text[]);

-- name: no_jit
-- A write whose statements the planner cannot estimate well (arrays of a block's rows):
-- compiling them would take longer than running them.
SET LOCAL jit = off;

-- name: current_keys
-- Which of the resources ($1 types, $2 ids) have a current version: one index probe each
-- (LATERAL with LIMIT, as in merge, keeps it a nested loop whatever the estimates).
SELECT k.type, k.id FROM unnest($1::text[], $2::text[]) AS k(type, id)
CROSS JOIN LATERAL (
    SELECT 1 FROM resources AS r
    WHERE r.type = k.type AND r.id = k.id AND r.next_seq IS NULL
    LIMIT 1
) AS r;

-- name: insert_first_versions
-- First versions of resources that have none, ready to store (datastore.postgres.resources
-- FIRST_VERSION_COLUMNS, one array each): what binary COPY inserts for a large batch.
INSERT INTO resources (seq, type, id, version, last_updated, deleted, raw, import_job,
                       import_pos, content_hash)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::integer[], $5::bigint[],
                     $6::boolean[], $7::bytea[], $8::text[], $9::bigint[], $10::bytea[]);

-- name: insert_patients
INSERT INTO resource_patients (patient_id, seq) SELECT * FROM unnest($1::text[], $2::bigint[]);

-- name: any_unhashed
SELECT EXISTS (
    SELECT 1 FROM resources
    WHERE content_hash IS NULL AND raw IS NOT NULL AND next_seq IS NULL
);

-- name: unhashed
-- Current versions of staged resources that have no content hash yet (migration 0003).
SELECT DISTINCT r.seq, r.raw FROM write_staging AS s
CROSS JOIN LATERAL (
    SELECT r.seq, r.raw FROM resources AS r
    WHERE r.type = s.type AND r.id = s.id
      AND r.content_hash IS NULL AND r.raw IS NOT NULL AND r.next_seq IS NULL
    LIMIT 1
) AS r;

-- name: set_hashes
UPDATE resources AS r SET content_hash = u.content_hash
FROM unnest($1::bigint[], $2::bytea[]) AS u(seq, content_hash)
WHERE r.seq = u.seq;

-- name: merge
-- The staged resources, in staging order (idx), as new versions numbered from $1 + 1; $2
-- the import that writes them (NULL: none); those staged with a pending stamp (stamp_at)
-- stamped $3 (the instant, in place of the pending one in tail) and $4 (its microseconds):
-- the time of this transaction, taken under the write lock. What writing them one by one
-- would do:
-- - skipped: a later line of the same import already wrote or confirmed the resource
--   (the current import position, stored or staged earlier, is beyond this one's);
-- - changed: its content differs from the version before it (the stored current one,
--   or the previous resource staged for the same id that was not skipped); deleted and
--   absent count as different. Only those become versions; the others only confirm
--   the version before them, which then carries the latest import position;
-- - every new version supersedes the one before it (next_seq), stored or staged.
-- Returns the new versions in seq order, and whether each one created its resource.
WITH staged AS (
    -- The windows below sort these narrow rows; the bytes join in at the INSERT.
    SELECT s.idx, s.type, s.id, s.content_hash, s.import_pos,
           c.seq AS prev_seq, c.version AS prev_version,
           c.content_hash AS prev_hash,
           coalesce(greatest(
               CASE WHEN c.import_job = $2 THEN c.import_pos END,
               max(s.import_pos) OVER (PARTITION BY s.type, s.id ORDER BY s.idx
                                       ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING)
           ) > s.import_pos, false) AND $2::text IS NOT NULL AS skipped
    FROM write_staging AS s
    -- One index probe per staged resource (LIMIT keeps it a nested loop whatever the
    -- statistics of a table that grows by a batch at a time; at most one is current).
    LEFT JOIN LATERAL (
        SELECT c.seq, c.version, c.content_hash, c.import_job, c.import_pos
        FROM resources AS c
        WHERE c.type = s.type AND c.id = s.id AND c.next_seq IS NULL
        LIMIT 1
    ) AS c ON true
), chained AS (
    SELECT l.*,
           coalesce(lag(l.content_hash) OVER w, l.prev_hash)
               IS DISTINCT FROM l.content_hash AS changed
    FROM staged AS l WHERE NOT l.skipped
    WINDOW w AS (PARTITION BY l.type, l.id ORDER BY l.idx)
), grouped AS (
    SELECT c.*,
           sum(c.changed::integer) OVER (PARTITION BY c.type, c.id ORDER BY c.idx) AS grp,
           sum(c.changed::integer) OVER (ORDER BY c.idx) AS ordinal
    FROM chained AS c
), positioned AS (
    SELECT g.*, max(g.import_pos) OVER (PARTITION BY g.type, g.id, g.grp) AS group_pos
    FROM grouped AS g
), numbered AS (
    SELECT p.*, $1::bigint + p.ordinal AS seq,
           $1::bigint + lead(p.ordinal) OVER (PARTITION BY p.type, p.id ORDER BY p.idx)
               AS next_seq
    FROM positioned AS p WHERE p.changed
), before AS (
    SELECT p.prev_seq,
           min($1::bigint + p.ordinal) FILTER (WHERE p.changed) AS successor,
           max(p.import_pos) FILTER (WHERE p.grp = 0) AS confirmed_pos
    FROM positioned AS p WHERE p.prev_seq IS NOT NULL
    GROUP BY p.prev_seq
), superseded AS (
    UPDATE resources AS r SET
        next_seq = coalesce(b.successor, r.next_seq),
        import_job = CASE WHEN b.confirmed_pos IS NULL THEN r.import_job ELSE $2 END,
        import_pos = coalesce(b.confirmed_pos, r.import_pos)
    FROM before AS b  -- the array: as in merge_distinct's superseded
    WHERE r.seq = b.prev_seq
      AND (b.successor IS NOT NULL OR ($2::text IS NOT NULL AND b.confirmed_pos IS NOT NULL))
      AND r.seq = ANY (ARRAY(SELECT prev_seq FROM before))
), inserted AS (
    INSERT INTO resources (seq, type, id, version, last_updated, deleted, raw, next_seq,
                           import_job, import_pos, content_hash)
    SELECT n.seq, n.type, n.id, coalesce(n.prev_version, 0) + n.grp,
           CASE WHEN s.stamp_at IS NULL THEN s.last_updated ELSE $4::bigint END, false,
           s.head || convert_to((coalesce(n.prev_version, 0) + n.grp)::text, 'UTF8')
               || CASE WHEN s.stamp_at IS NULL THEN s.tail
                       ELSE overlay(s.tail PLACING $3::bytea FROM s.stamp_at) END,
           n.next_seq, $2, CASE WHEN $2::text IS NOT NULL THEN n.group_pos END, n.content_hash
    FROM numbered AS n JOIN write_staging AS s USING (idx)
), patients AS (
    INSERT INTO resource_patients (patient_id, seq)
    SELECT sp.patient_id, n.seq FROM write_staging_patients AS sp JOIN numbered AS n USING (idx)
)
SELECT n.type, n.id, (coalesce(n.prev_version, 0) + n.grp)::integer AS version,
       n.prev_seq IS NULL AND n.grp = 1 AS created
FROM numbered AS n ORDER BY n.seq;

-- name: merge_distinct
-- merge, for a batch that stages each resource once: no chains within the batch, so
-- one window (the numbering) instead of five. The same parameters, and the same result
-- as merge on such a batch.
WITH staged AS (
    SELECT s.idx, s.type, s.id, s.content_hash, s.import_pos,
           c.seq AS prev_seq, c.version AS prev_version,
           coalesce(c.import_job = $2 AND c.import_pos > s.import_pos, false) AS skipped,
           c.content_hash IS DISTINCT FROM s.content_hash AS changed
    FROM write_staging AS s
    LEFT JOIN LATERAL (
        SELECT c.seq, c.version, c.content_hash, c.import_job, c.import_pos
        FROM resources AS c
        WHERE c.type = s.type AND c.id = s.id AND c.next_seq IS NULL
        LIMIT 1
    ) AS c ON true
), numbered AS (
    SELECT t.*, $1::bigint + row_number() OVER (ORDER BY t.idx) AS seq
    FROM staged AS t WHERE t.changed AND NOT t.skipped
), superseded AS (
    -- The array makes these a look-up per predecessor: joined on prev_seq alone, the
    -- planner, which takes every staged row for one with a predecessor, hashed the whole
    -- table at every write (an import into an empty store has none).
    UPDATE resources AS r SET next_seq = n.seq
    FROM numbered AS n
    WHERE r.seq = n.prev_seq
      AND r.seq = ANY (ARRAY(SELECT prev_seq FROM numbered WHERE prev_seq IS NOT NULL))
), confirmed AS (
    UPDATE resources AS r SET import_job = $2, import_pos = t.import_pos
    FROM staged AS t
    WHERE $2::text IS NOT NULL AND r.seq = t.prev_seq AND NOT t.changed AND NOT t.skipped
      AND r.seq = ANY (ARRAY(SELECT prev_seq FROM staged WHERE NOT changed AND NOT skipped))
), inserted AS (
    INSERT INTO resources (seq, type, id, version, last_updated, deleted, raw, next_seq,
                           import_job, import_pos, content_hash)
    SELECT n.seq, n.type, n.id, coalesce(n.prev_version, 0) + 1,
           CASE WHEN s.stamp_at IS NULL THEN s.last_updated ELSE $4::bigint END, false,
           s.head || convert_to((coalesce(n.prev_version, 0) + 1)::text, 'UTF8')
               || CASE WHEN s.stamp_at IS NULL THEN s.tail
                       ELSE overlay(s.tail PLACING $3::bytea FROM s.stamp_at) END,
           NULL, $2, CASE WHEN $2::text IS NOT NULL THEN n.import_pos END, n.content_hash
    FROM numbered AS n JOIN write_staging AS s USING (idx)
), patients AS (
    INSERT INTO resource_patients (patient_id, seq)
    SELECT sp.patient_id, n.seq FROM write_staging_patients AS sp JOIN numbered AS n USING (idx)
)
SELECT n.type, n.id, (coalesce(n.prev_version, 0) + 1)::integer AS version,
       n.prev_seq IS NULL AS created
FROM numbered AS n ORDER BY n.seq;

-- name: insert_version
INSERT INTO resources (seq, type, id, version, last_updated, deleted, raw, next_seq)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8);

-- name: supersede
UPDATE resources SET next_seq = $2 WHERE seq = $1;

-- name: read_current
SELECT raw FROM resources
WHERE type = $1 AND id = $2 AND next_seq IS NULL AND NOT deleted;

-- name: read_as_of
SELECT raw FROM resources
WHERE type = $1 AND id = $2 AND seq <= $3
  AND (next_seq IS NULL OR next_seq > $3) AND NOT deleted;

-- name: seq_bounds
SELECT min(seq), max(seq) FROM resources WHERE type = $1 AND seq <= $2;

-- name: types
-- A skip scan of the (type, seq) index: one probe per distinct type, not a table scan.
WITH RECURSIVE t(type) AS (
    (SELECT type FROM resources ORDER BY type LIMIT 1)
    UNION ALL
    SELECT (SELECT r.type FROM resources AS r WHERE r.type > t.type ORDER BY r.type LIMIT 1)
    FROM t WHERE t.type IS NOT NULL
)
SELECT type FROM t
WHERE type IS NOT NULL
  AND EXISTS (SELECT 1 FROM resources AS r WHERE r.type = t.type AND r.seq <= $1)
ORDER BY type;

-- name: page_all
SELECT seq, raw FROM resources
WHERE type = $1 AND seq > $5 AND seq <= $8
  AND (next_seq IS NULL OR next_seq > $2) AND NOT deleted
  AND last_updated >= $3 AND last_updated <= $4
  AND ($7::text[] IS NULL OR id = ANY($7::text[]))
ORDER BY seq LIMIT $6;

-- name: page_compartment
SELECT seq, raw FROM resources AS r
WHERE type = $1 AND seq > $5 AND seq <= $8
  AND (next_seq IS NULL OR next_seq > $2) AND NOT deleted
  AND last_updated >= $3 AND last_updated <= $4
  AND EXISTS (SELECT 1 FROM resource_patients AS rp WHERE rp.seq = r.seq)
  AND ($7::text[] IS NULL OR id = ANY($7::text[]))
ORDER BY seq LIMIT $6;

-- name: page_patients
SELECT seq, raw FROM resources AS r
WHERE type = $1 AND seq > $5 AND seq <= $9
  AND (next_seq IS NULL OR next_seq > $2) AND NOT deleted
  AND last_updated >= $3 AND last_updated <= $4
  AND EXISTS (
    SELECT 1 FROM resource_patients AS rp
    WHERE rp.seq = r.seq AND rp.patient_id = ANY($7::text[])
      AND rp.seq > $5 AND rp.seq <= $9  -- the planner does not carry ranges across joins
  )
  AND ($8::text[] IS NULL OR id = ANY($8::text[]))
ORDER BY seq LIMIT $6;

-- name: count_all
SELECT count(*) FROM resources
WHERE type = $1 AND seq <= $2
  AND (next_seq IS NULL OR next_seq > $2) AND NOT deleted
  AND last_updated >= $3 AND last_updated <= $4
  AND ($5::text[] IS NULL OR id = ANY($5::text[]));

-- name: count_compartment
SELECT count(*) FROM resources AS r
WHERE type = $1 AND seq <= $2
  AND (next_seq IS NULL OR next_seq > $2) AND NOT deleted
  AND last_updated >= $3 AND last_updated <= $4
  AND EXISTS (SELECT 1 FROM resource_patients AS rp WHERE rp.seq = r.seq)
  AND ($5::text[] IS NULL OR id = ANY($5::text[]));

-- name: count_patients
SELECT count(*) FROM resources AS r
WHERE type = $1 AND seq <= $2
  AND (next_seq IS NULL OR next_seq > $2) AND NOT deleted
  AND last_updated >= $3 AND last_updated <= $4
  AND EXISTS (
    SELECT 1 FROM resource_patients AS rp
    WHERE rp.seq = r.seq AND rp.patient_id = ANY($5::text[]) AND rp.seq <= $2
  )
  AND ($6::text[] IS NULL OR id = ANY($6::text[]));

-- name: scan_versions
SELECT seq, type, id, version, next_seq, last_updated, deleted, raw FROM resources
WHERE seq > $1 ORDER BY seq LIMIT $2;

-- name: deletions_all
-- Deletions: resources whose version current at the snapshot ($2) is a deletion made in
-- ($3, $4]; pages take ($5 after seq, $6 limit), the patient list comes last. Their
-- compartment is that of the version they deleted (version - 1), always a live one.
SELECT seq, id, version, last_updated FROM resources
WHERE type = $1 AND deleted AND seq > $5 AND seq <= $2
  AND (next_seq IS NULL OR next_seq > $2)
  AND last_updated > $3 AND last_updated <= $4
ORDER BY seq LIMIT $6;

-- name: deletions_compartment
SELECT seq, id, version, last_updated FROM resources AS r
WHERE type = $1 AND deleted AND seq > $5 AND seq <= $2
  AND (next_seq IS NULL OR next_seq > $2)
  AND last_updated > $3 AND last_updated <= $4
  AND EXISTS (
    SELECT 1 FROM resources AS p JOIN resource_patients AS rp ON rp.seq = p.seq
    WHERE p.type = r.type AND p.id = r.id AND p.version = r.version - 1
  )
ORDER BY seq LIMIT $6;

-- name: deletions_patients
SELECT seq, id, version, last_updated FROM resources AS r
WHERE type = $1 AND deleted AND seq > $5 AND seq <= $2
  AND (next_seq IS NULL OR next_seq > $2)
  AND last_updated > $3 AND last_updated <= $4
  AND EXISTS (
    SELECT 1 FROM resources AS p JOIN resource_patients AS rp ON rp.seq = p.seq
    WHERE p.type = r.type AND p.id = r.id AND p.version = r.version - 1
      AND rp.patient_id = ANY($7::text[])
  )
ORDER BY seq LIMIT $6;

-- name: blocks_all
-- organizeOutputBy=Patient: (patient, resource) pairs in (patient id, seq) order, keyset
-- pages over the resource_patients primary key. ($1 snapshot, $2 since, $3 until,
-- $4 types or NULL, $5/$6 after (patient, seq), $7 limit, $8 patients).
SELECT rp.patient_id, r.seq, r.type, r.id, r.version, r.raw
FROM resource_patients AS rp JOIN resources AS r ON r.seq = rp.seq
WHERE (rp.patient_id, rp.seq) > ($5, $6) AND rp.seq <= $1
  AND (r.next_seq IS NULL OR r.next_seq > $1) AND NOT r.deleted
  AND r.last_updated >= $2 AND r.last_updated <= $3
  AND ($4::text[] IS NULL OR r.type = ANY($4::text[]))
ORDER BY rp.patient_id, rp.seq LIMIT $7;

-- name: blocks_patients
SELECT rp.patient_id, r.seq, r.type, r.id, r.version, r.raw
FROM resource_patients AS rp JOIN resources AS r ON r.seq = rp.seq
WHERE (rp.patient_id, rp.seq) > ($5, $6) AND rp.seq <= $1
  AND rp.patient_id = ANY($8::text[])
  AND (r.next_seq IS NULL OR r.next_seq > $1) AND NOT r.deleted
  AND r.last_updated >= $2 AND r.last_updated <= $3
  AND ($4::text[] IS NULL OR r.type = ANY($4::text[]))
ORDER BY rp.patient_id, rp.seq LIMIT $7;
