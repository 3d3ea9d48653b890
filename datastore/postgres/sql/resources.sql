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

-- name: current_versions
SELECT id, seq, version, raw, import_job, import_pos FROM resources
WHERE type = $1 AND id = ANY($2::text[]) AND next_seq IS NULL;

-- name: insert_version
INSERT INTO resources (seq, type, id, version, last_updated, deleted, raw, next_seq)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8);

-- name: insert_versions
INSERT INTO resources (seq, type, id, version, last_updated, deleted, raw, next_seq,
                       import_job, import_pos)
SELECT * FROM unnest($1::bigint[], $2::text[], $3::text[], $4::integer[], $5::bigint[],
                     $6::boolean[], $7::bytea[], $8::bigint[], $9::text[], $10::bigint[]);

-- name: set_import_pos
UPDATE resources AS r SET import_job = u.job, import_pos = u.pos
FROM unnest($1::text[], $2::bigint[], $3::bigint[]) AS u(job, pos, seq)
WHERE r.seq = u.seq;

-- name: supersede
UPDATE resources SET next_seq = $2 WHERE seq = $1;

-- name: supersede_many
UPDATE resources AS r SET next_seq = u.next_seq
FROM unnest($1::bigint[], $2::bigint[]) AS u(seq, next_seq)
WHERE r.seq = u.seq;

-- name: insert_patients
INSERT INTO resource_patients (patient_id, seq)
SELECT * FROM unnest($1::text[], $2::bigint[]);

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
