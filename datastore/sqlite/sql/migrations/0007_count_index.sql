-- Planning an export counts each type's resources as of the snapshot. With the columns
-- that decide it in the (type, seq) index, the count reads only the index, not every
-- stored resource (a third of a second per 300k resources on a 2-core machine).
DROP INDEX resources_type_seq;
CREATE INDEX resources_type_seq ON resources (type, seq, next_seq, deleted, last_updated);
