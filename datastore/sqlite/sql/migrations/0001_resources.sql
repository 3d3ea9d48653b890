-- Versioned FHIR resources. seq is the store-wide sequence (rowid alias, increasing);
-- next_seq is the seq of the version that replaced this one (NULL while current).
CREATE TABLE resources (
    seq          INTEGER PRIMARY KEY,
    type         TEXT    NOT NULL,
    id           TEXT    NOT NULL,
    version      INTEGER NOT NULL,
    last_updated INTEGER NOT NULL,
    deleted      INTEGER NOT NULL DEFAULT 0,
    next_seq     INTEGER,
    raw          BLOB
);
CREATE INDEX resources_type_seq ON resources (type, seq);
-- (type, id, version) finds a resource's versions; "one current version" (next_seq NULL)
-- is kept by the single writer's transaction, not by a second index on random ids.
CREATE UNIQUE INDEX resources_version ON resources (type, id, version);
-- Which Patients' compartments each version belongs to (FHIR R4 CompartmentDefinition).
CREATE TABLE resource_patients (
    patient_id TEXT    NOT NULL,
    seq        INTEGER NOT NULL,
    PRIMARY KEY (patient_id, seq)
) WITHOUT ROWID;
CREATE INDEX resource_patients_seq ON resource_patients (seq);
