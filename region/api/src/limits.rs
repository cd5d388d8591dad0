//! Limits both sides of the wire must respect. The region enforces them; a client that sends
//! more is refused, so a client's own limits are asserted against these at compile time where
//! it declares them (TigerBeetle's "assert the relationships of constants").

use std::time::Duration;

/// Largest JSON request body the region reads (registration, heartbeats, policies, machines,
/// boot event batches). Chunk uploads and manifests have their own limits below.
pub const REQUEST_BODY_MAX_BYTES: usize = 64 * 1024;

/// Largest manifest accepted: 64 MiB is ~1.8 M chunks, a 116 GiB file at the 64 KiB average.
pub const MANIFEST_BYTES_MAX: usize = 64 * 1024 * 1024;

/// Chunks a rack may ask for in one chunk request (32 bytes of hash each): ~64 MiB of response
/// at the average chunk size, enough to keep a link busy with a few requests in flight.
pub const CHUNK_FETCH_MAX: usize = 1024;

/// Longest the region holds a rack's catalogue long-poll open. A rack's read timeout for that
/// call must be longer, or it would give up on a poll the region is still holding.
pub const CATALOGUE_POLL_HOLD_MAX: Duration = Duration::from_secs(60);

/// Boot events in one `POST /rack/events` batch.
pub const BOOT_EVENTS_PER_REQUEST_MAX: usize = 1000;

/// Files a rack's snapshot may list in `PUT /rack/snapshot`: the catalogue's size a region
/// serves (100,000 files is 10,000 image versions of a kernel, an initrd and some disks).
pub const SNAPSHOT_FILES_MAX: usize = 100_000;

/// Largest `PUT /rack/snapshot` body: a hash is 64 hex characters plus quotes and a comma.
pub const SNAPSHOT_BODY_BYTES_MAX: usize = 8 * 1024 * 1024;

const _: () = assert!(
    SNAPSHOT_FILES_MAX * (64 + 3) + 1024 <= SNAPSHOT_BODY_BYTES_MAX,
    "a snapshot of the most files must fit its body limit"
);
