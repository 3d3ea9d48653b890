-- Versioned FHIR resources (see datastore.resources for the model). seq is the
-- store-wide sequence, assigned by the single writer in commit order; next_seq is the seq
-- of the version that replaced this one (NULL while current). Times are microseconds
-- since the epoch. "C" collation: byte order, as the other backends sort. import_job and
-- import_pos: which import wrote (or last confirmed) the version, and from where in its
-- inputs; a line that comes earlier never replaces what a later line of the same import
-- wrote.
CREATE TABLE resources (
    seq          bigint  PRIMARY KEY,
    type         text    COLLATE "C" NOT NULL,
    id           text    COLLATE "C" NOT NULL,
    version      integer NOT NULL,
    last_updated bigint  NOT NULL,
    deleted      boolean NOT NULL DEFAULT false,
    next_seq     bigint,
    raw          bytea,
    import_job   text,
    import_pos   bigint
);
-- Export pages: keyset scans over (type, seq).
CREATE INDEX resources_type_seq ON resources (type, seq);
-- A resource's versions; as in SQLite, "one current version" is kept by the serialized
-- writer, not by another index on random ids that every write would have to maintain.
CREATE UNIQUE INDEX resources_version ON resources (type, id, version);

-- Which Patients' compartments each version belongs to (FHIR R4 CompartmentDefinition).
CREATE TABLE resource_patients (
    patient_id text   COLLATE "C" NOT NULL,
    seq        bigint NOT NULL,
    PRIMARY KEY (patient_id, seq)
);
CREATE INDEX resource_patients_seq ON resource_patients (seq);
