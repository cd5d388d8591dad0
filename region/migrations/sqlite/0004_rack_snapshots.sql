-- What each rack's current snapshot holds, as the rack sent it (PUT /rack/snapshot), so
-- heartbeats need only name the snapshot. One row per file hash; replaced whole when the
-- rack's snapshot id changes.
ALTER TABLE racks ADD COLUMN snapshot_id TEXT;

CREATE TABLE rack_snapshot_files (
    rack_id TEXT NOT NULL REFERENCES racks (id) ON DELETE CASCADE,
    file_hash TEXT NOT NULL,
    PRIMARY KEY (rack_id, file_hash)
);
