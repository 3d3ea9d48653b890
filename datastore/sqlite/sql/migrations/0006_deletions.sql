-- Deletions are versions with deleted = 1, a small share of the table: a partial index
-- finds those of one type in seq order (the deleted[] files of a _since export) without
-- scanning every version of the type.
CREATE INDEX resources_deleted ON resources (type, seq) WHERE deleted = 1;
