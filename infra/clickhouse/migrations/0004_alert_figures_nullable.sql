-- An alert may carry no figure (a rule that fires on an event, not a threshold):
-- NULL says so, where 0.0 read as a measured zero. Rows written before this
-- migration keep the 0.0 they were stored with.

ALTER TABLE {db}.alerts MODIFY COLUMN value Nullable(Float64);

ALTER TABLE {db}.alerts MODIFY COLUMN threshold Nullable(Float64);
