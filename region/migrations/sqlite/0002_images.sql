-- The image catalogue and each rack's sync settings. Manifests live on disk under
-- DATA_DIR/manifests/<manifest id> and chunks under DATA_DIR/chunks; rows name them by hash.

CREATE TABLE images (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    arch TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    UNIQUE (name, arch)
);

CREATE TABLE image_versions (
    id TEXT PRIMARY KEY,
    image_id TEXT NOT NULL REFERENCES images (id) ON DELETE CASCADE,
    version TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL,
    UNIQUE (image_id, version)
);

-- One committed file of a version, by kind (kernel, initrd, root-disk, squashfs).
CREATE TABLE image_files (
    version_id TEXT NOT NULL REFERENCES image_versions (id) ON DELETE CASCADE,
    kind TEXT NOT NULL,
    manifest_id TEXT NOT NULL,
    file_hash TEXT NOT NULL,
    file_len BIGINT NOT NULL,
    n_chunks BIGINT NOT NULL,
    committed_at_ms BIGINT NOT NULL,
    PRIMARY KEY (version_id, kind)
);

-- Uploads in progress: the manifest was accepted, chunks are arriving.
CREATE TABLE uploads (
    id TEXT PRIMARY KEY,
    image_name TEXT NOT NULL,
    arch TEXT NOT NULL,
    kind TEXT NOT NULL,
    version TEXT NOT NULL,
    manifest_id TEXT NOT NULL,
    created_at_ms BIGINT NOT NULL
);

-- Bumped on every catalogue change; racks long-poll for a revision above theirs.
CREATE TABLE catalogue_state (
    id BIGINT PRIMARY KEY,
    revision BIGINT NOT NULL
);
INSERT INTO catalogue_state (id, revision) VALUES (1, 0);

ALTER TABLE racks ADD COLUMN sync_policy TEXT NOT NULL DEFAULT 'auto';
ALTER TABLE racks ADD COLUMN sync_delay_ms BIGINT NOT NULL DEFAULT 300000;
ALTER TABLE racks ADD COLUMN sync_window_start TEXT NOT NULL DEFAULT '04:00';
ALTER TABLE racks ADD COLUMN sync_window_end TEXT NOT NULL DEFAULT '06:00';
ALTER TABLE racks ADD COLUMN sync_bandwidth_bytes_per_s BIGINT NOT NULL DEFAULT 0;
-- A counter: "sync now" raises it; the rack syncs when it sees a value above the one it handled.
ALTER TABLE racks ADD COLUMN sync_requested BIGINT NOT NULL DEFAULT 0;
-- The rack's last reported sync state (JSON), for the Images page.
ALTER TABLE racks ADD COLUMN sync_report_json TEXT;
