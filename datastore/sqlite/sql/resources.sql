-- name: current_seq
SELECT coalesce(max(seq), 0) FROM resources;

-- name: current_version
SELECT seq, version, deleted, raw FROM resources
WHERE key_hash = :key AND type = :type AND id = :id AND next_seq IS NULL;

-- name: current_versions
SELECT type, id, seq, version, raw, import_job, import_pos FROM resources
WHERE key_hash IN (SELECT value FROM json_each(:keys)) AND next_seq IS NULL;

-- name: current_exists
SELECT type, id FROM resources
WHERE key_hash IN (SELECT value FROM json_each(:keys)) AND next_seq IS NULL;

-- name: insert_version
INSERT INTO resources (seq, type, id, version, last_updated, deleted, raw, next_seq,
                       import_job, import_pos, key_hash)
VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?);

-- name: insert_first_version
-- A first version (the import's fast path): the columns every one has alike are not bound.
INSERT INTO resources (seq, type, id, version, last_updated, deleted, raw, next_seq,
                       import_job, import_pos, key_hash)
VALUES (?, ?, ?, 1, ?, 0, ?, NULL, ?, ?, ?);

-- name: set_import_pos
UPDATE resources SET import_job = ?, import_pos = ? WHERE seq = ?;

-- name: supersede_many
UPDATE resources SET next_seq = ? WHERE seq = ?;

-- name: supersede
UPDATE resources SET next_seq = :next_seq WHERE seq = :seq;

-- name: insert_patient
INSERT OR IGNORE INTO resource_patients (patient_id, seq) VALUES (?, ?);

-- name: read_as_of
SELECT raw FROM resources
WHERE key_hash = :key AND type = :type AND id = :id AND seq <= :as_of
  AND (next_seq IS NULL OR next_seq > :as_of) AND deleted = 0;

-- name: seq_bounds
-- Two subqueries: SQLite answers a lone min() or max() from the index in one step, but
-- scans the whole range for both in one SELECT.
SELECT (SELECT min(seq) FROM resources WHERE type = :type AND seq <= :as_of),
       (SELECT max(seq) FROM resources WHERE type = :type AND seq <= :as_of);

-- name: types
-- A skip scan over the (type, seq, ...) index: one step per type, not per resource.
WITH RECURSIVE t(type) AS (
    SELECT min(type) FROM resources
    UNION ALL
    SELECT (SELECT min(r.type) FROM resources AS r WHERE r.type > t.type) FROM t
    WHERE t.type IS NOT NULL
)
SELECT type FROM t
WHERE type IS NOT NULL
  AND (SELECT min(r.seq) FROM resources AS r WHERE r.type = t.type) <= :as_of
ORDER BY type;

-- name: page_all
SELECT seq, raw FROM resources
WHERE type = :type AND seq > :after AND seq <= :last
  AND (next_seq IS NULL OR next_seq > :snap) AND deleted = 0
  AND last_updated >= :since AND last_updated <= :until
  AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
ORDER BY seq LIMIT :limit;

-- name: page_compartment
SELECT seq, raw FROM resources AS r
WHERE type = :type AND seq > :after AND seq <= :last
  AND (next_seq IS NULL OR next_seq > :snap) AND deleted = 0
  AND last_updated >= :since AND last_updated <= :until
  AND EXISTS (SELECT 1 FROM resource_patients AS rp WHERE rp.seq = r.seq)
  AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
ORDER BY seq LIMIT :limit;

-- name: page_patients
SELECT seq, raw FROM resources AS r
WHERE type = :type AND seq > :after AND seq <= :last
  AND (next_seq IS NULL OR next_seq > :snap) AND deleted = 0
  AND last_updated >= :since AND last_updated <= :until
  AND EXISTS (
    SELECT 1 FROM resource_patients AS rp
    WHERE rp.seq = r.seq AND rp.patient_id IN (SELECT value FROM json_each(:patients))
  )
  AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
ORDER BY seq LIMIT :limit;

-- name: count_all
SELECT count(*) FROM resources
WHERE type = :type AND seq <= :snap
  AND (next_seq IS NULL OR next_seq > :snap) AND deleted = 0
  AND last_updated >= :since AND last_updated <= :until
  AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)));

-- name: count_compartment
SELECT count(*) FROM resources AS r
WHERE type = :type AND seq <= :snap
  AND (next_seq IS NULL OR next_seq > :snap) AND deleted = 0
  AND last_updated >= :since AND last_updated <= :until
  AND EXISTS (SELECT 1 FROM resource_patients AS rp WHERE rp.seq = r.seq)
  AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)));

-- name: count_patients
SELECT count(*) FROM resources AS r
WHERE type = :type AND seq <= :snap
  AND (next_seq IS NULL OR next_seq > :snap) AND deleted = 0
  AND last_updated >= :since AND last_updated <= :until
  AND EXISTS (
    SELECT 1 FROM resource_patients AS rp
    WHERE rp.seq = r.seq AND rp.patient_id IN (SELECT value FROM json_each(:patients))
  )
  AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)));

-- name: scan_versions
SELECT seq, type, id, version, next_seq, last_updated, deleted, raw FROM resources
WHERE seq > :after ORDER BY seq LIMIT :limit;

-- name: deletions_all
-- Deletions: resources whose version current at the snapshot is a deletion made in
-- (since, until]. Their compartment is that of the version they deleted (version - 1),
-- which is always a live one.
SELECT seq, id, version, last_updated FROM resources
WHERE type = :type AND deleted = 1 AND seq > :after AND seq <= :snap
  AND (next_seq IS NULL OR next_seq > :snap)
  AND last_updated > :since AND last_updated <= :until
ORDER BY seq LIMIT :limit;

-- name: deletions_compartment
SELECT seq, id, version, last_updated FROM resources AS r
WHERE type = :type AND deleted = 1 AND seq > :after AND seq <= :snap
  AND (next_seq IS NULL OR next_seq > :snap)
  AND last_updated > :since AND last_updated <= :until
  AND EXISTS (
    SELECT 1 FROM resources AS p JOIN resource_patients AS rp ON rp.seq = p.seq
    WHERE p.key_hash = r.key_hash AND p.type = r.type AND p.id = r.id
      AND p.version = r.version - 1
  )
ORDER BY seq LIMIT :limit;

-- name: deletions_patients
SELECT seq, id, version, last_updated FROM resources AS r
WHERE type = :type AND deleted = 1 AND seq > :after AND seq <= :snap
  AND (next_seq IS NULL OR next_seq > :snap)
  AND last_updated > :since AND last_updated <= :until
  AND EXISTS (
    SELECT 1 FROM resources AS p JOIN resource_patients AS rp ON rp.seq = p.seq
    WHERE p.key_hash = r.key_hash AND p.type = r.type AND p.id = r.id
      AND p.version = r.version - 1
      AND rp.patient_id IN (SELECT value FROM json_each(:patients))
  )
ORDER BY seq LIMIT :limit;

-- name: blocks_all
-- organizeOutputBy=Patient: (patient, resource) pairs in (patient id, seq) order, keyset
-- pages over the resource_patients primary key.
SELECT rp.patient_id, r.seq, r.type, r.id, r.version, r.raw
FROM resource_patients AS rp JOIN resources AS r ON r.seq = rp.seq
WHERE (rp.patient_id, rp.seq) > (:after_patient, :after_seq) AND rp.seq <= :snap
  AND (r.next_seq IS NULL OR r.next_seq > :snap) AND r.deleted = 0
  AND r.last_updated >= :since AND r.last_updated <= :until
  AND (:any_type OR r.type IN (SELECT value FROM json_each(:types)))
ORDER BY rp.patient_id, rp.seq LIMIT :limit;

-- name: blocks_patients
SELECT rp.patient_id, r.seq, r.type, r.id, r.version, r.raw
FROM resource_patients AS rp JOIN resources AS r ON r.seq = rp.seq
WHERE (rp.patient_id, rp.seq) > (:after_patient, :after_seq) AND rp.seq <= :snap
  AND rp.patient_id IN (SELECT value FROM json_each(:patients))
  AND (r.next_seq IS NULL OR r.next_seq > :snap) AND r.deleted = 0
  AND r.last_updated >= :since AND r.last_updated <= :until
  AND (:any_type OR r.type IN (SELECT value FROM json_each(:types)))
ORDER BY rp.patient_id, rp.seq LIMIT :limit;
