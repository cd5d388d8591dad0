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

/// A power request sent to a rack and not answered within this is sent again: the rack
/// restarted, or its answer was lost. A BMC answers within seconds; a cycle takes under a
/// minute even on slow BMCs. What a rack waits for before it runs a request (its boot table,
/// `BOOT_TABLE_WAIT_MAX`) must be shorter, or the request would arrive twice.
pub const POWER_RESEND_AFTER: Duration = Duration::from_secs(120);

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

/// Longest boot event `kind`, in bytes. Kinds are the rack's own words (`boot.callback`, 13
/// bytes, is the longest); the bound only keeps a mistaken or hostile sender from filling the
/// event log with them.
pub const BOOT_EVENT_KIND_BYTES_MAX: usize = 32;

/// Longest boot event `mac`, in bytes: a MAC (17) or, for a client the rack has no MAC of, its
/// address (an IPv6 address with a zone fits).
pub const BOOT_EVENT_MAC_BYTES_MAX: usize = 64;

/// Longest boot event `message`, in bytes. Messages quote what the client asked for (a TFTP file
/// name may be ~1000 bytes in the rack's 1 KiB request read), so the rack cuts longer ones here;
/// it is the region's limit for event text from before the limit was named, so nothing it took
/// then is refused now. Costs at most ~1 KiB a row in the event log.
pub const BOOT_EVENT_MESSAGE_BYTES_MAX: usize = 1024;

/// Largest JSON of one boot event: every byte of its text escaped (`\u0000`, 6 bytes each) plus
/// the field names, quotes and four 20-digit numbers (~150 bytes; 256 with room to spare), plus
/// the machine report an agent's event carries (~31 KiB at most, an inventory).
pub const BOOT_EVENT_JSON_BYTES_MAX: usize = 6
    * (BOOT_EVENT_KIND_BYTES_MAX + BOOT_EVENT_MAC_BYTES_MAX + BOOT_EVENT_MESSAGE_BYTES_MAX)
    + 256
    + crate::agent::MACHINE_REPORT_JSON_BYTES_MAX;

/// Bytes of JSON in one `POST /rack/events` body, as the rack counts them (the array, its
/// commas and each event's serialized length). Three quarters of [`REQUEST_BODY_MAX_BYTES`]: the
/// count is exact, the margin is for what a proxy or a later field may add. ~300 typical events
/// (~150 bytes each) a batch, so 20,000 queued events drain in ~70 requests.
pub const BOOT_EVENTS_BATCH_BYTES_MAX: usize = 48 * 1024;

// A full batch must fit the body the region reads, or the region would refuse it whole...
const _: () = assert!(BOOT_EVENTS_BATCH_BYTES_MAX <= REQUEST_BODY_MAX_BYTES);
// ...and the largest possible event must fit a batch on its own, or it could never be sent.
const _: () = assert!(BOOT_EVENT_JSON_BYTES_MAX + 2 <= BOOT_EVENTS_BATCH_BYTES_MAX);
