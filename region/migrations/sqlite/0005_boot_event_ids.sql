-- Boot events keep the rack's name for them (metalrack_api::machines::BootEvent's queue_id and
-- seq), so that a batch a rack sends again (the answer to the first try was lost) is not stored
-- twice: inserts skip a (rack_id, rack_queue_id, rack_seq) already present. Other events leave
-- the three NULL, and NULLs never conflict in a unique index (SQLite and PostgreSQL alike).
ALTER TABLE events ADD COLUMN rack_id TEXT;
ALTER TABLE events ADD COLUMN rack_queue_id BIGINT;
ALTER TABLE events ADD COLUMN rack_seq BIGINT;
CREATE UNIQUE INDEX events_by_rack_event ON events (rack_id, rack_queue_id, rack_seq);
