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
SELECT min(seq), max(seq) FROM resources WHERE type = :type AND seq <= :as_of;

-- name: types
SELECT DISTINCT type FROM resources WHERE seq <= :as_of ORDER BY type;

-- name: page_all
SELECT seq, id, version, raw FROM resources
WHERE type = :type AND seq > :after AND seq <= :snap
  AND (next_seq IS NULL OR next_seq > :snap) AND deleted = 0
  AND last_updated >= :since AND last_updated <= :until
  AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
ORDER BY seq LIMIT :limit;

-- name: page_compartment
SELECT seq, id, version, raw FROM resources AS r
WHERE type = :type AND seq > :after AND seq <= :snap
  AND (next_seq IS NULL OR next_seq > :snap) AND deleted = 0
  AND last_updated >= :since AND last_updated <= :until
  AND EXISTS (SELECT 1 FROM resource_patients AS rp WHERE rp.seq = r.seq)
  AND (:ids IS NULL OR id IN (SELECT value FROM json_each(:ids)))
ORDER BY seq LIMIT :limit;

-- name: page_patients
SELECT seq, id, version, raw FROM resources AS r
WHERE type = :type AND seq > :after AND seq <= :snap
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
