-- Which import wrote a version, and from where in its inputs: a line that comes earlier
-- in an input never replaces the version a later line of the same import wrote.
ALTER TABLE resources ADD COLUMN import_job TEXT;
ALTER TABLE resources ADD COLUMN import_pos INTEGER;
