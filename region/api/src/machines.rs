//! Wire types of machines' boot decisions (what the rack serves each MAC) and of the boot
//! events racks report.

use serde::{Deserialize, Serialize};

/// Boot events one request may carry; a rack with more queued sends several requests, each also
/// within [`BOOT_EVENTS_BATCH_BYTES_MAX`] of JSON, each field within its `*_BYTES_MAX`.
pub use crate::limits::{
    BOOT_EVENTS_BATCH_BYTES_MAX, BOOT_EVENTS_PER_REQUEST_MAX, BOOT_EVENT_JSON_BYTES_MAX, BOOT_EVENT_KIND_BYTES_MAX,
    BOOT_EVENT_MAC_BYTES_MAX, BOOT_EVENT_MESSAGE_BYTES_MAX,
};

/// What a machine boots into next.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum BootAction {
    /// Unknown or new machine: the enlistment script.
    Enlist,
    /// Boot from the local disk.
    Local,
    /// Network-boot the kernel and initrd of an image version.
    Image { image: String, arch: String, version: String, kernel_params: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct MachineBoot {
    /// Lower-case, colon-separated.
    pub mac: String,
    pub hostname: String,
    pub boot: BootAction,
}

/// `PUT /api/v1/machines/{mac}`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineUpdate {
    #[serde(default)]
    pub hostname: String,
    pub boot: BootAction,
}

/// One step of a machine's boot as the rack saw it (DHCP, TFTP file, HTTP file, script).
///
/// `(queue_id, seq)` names the event among all a rack ever sent: the region stores each name
/// once per rack, so a batch sent again (its answer was lost) is not stored twice. 0 and 0 are
/// events from racks older than these ids, stored as they come.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BootEvent {
    /// The rack's event queue that numbered the event: random (below 2^53, so it survives a
    /// JSON number and a signed 64-bit column), chosen when the queue's file is created. A rack
    /// whose data dir was wiped starts a new queue and numbers from 1 again without colliding
    /// with what it sent before.
    #[serde(default)]
    pub queue_id: u64,
    /// 1, 2, 3, ... in the order the rack saw the events; never reused within `queue_id`.
    #[serde(default)]
    pub seq: u64,
    pub at_ms: i64,
    pub mac: String,
    /// `boot.dhcp`, `boot.tftp`, `boot.http`, `boot.script`, `boot.callback`, `boot.refused`.
    pub kind: String,
    pub message: String,
}

/// Largest `queue_id` (exclusive): 2^53, the largest integer every JSON reader keeps exact.
pub const BOOT_EVENT_QUEUE_ID_END: u64 = 1 << 53;

/// Normalises a MAC address to `aa:bb:cc:dd:ee:ff`; accepts `:` or `-` separators.
pub fn normalize_mac(text: &str) -> Result<String, String> {
    let parts: Vec<&str> = text.split([':', '-']).collect();
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(format!("{text:?} is not a MAC address (expected aa:bb:cc:dd:ee:ff)"));
    }
    Ok(parts.join(":").to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs() {
        assert_eq!(normalize_mac("52-54-00-AA-bb-01").unwrap(), "52:54:00:aa:bb:01");
        assert!(normalize_mac("52:54:00:aa:bb").is_err() && normalize_mac("zz:54:00:aa:bb:01").is_err());
    }

    #[test]
    fn boot_events_from_racks_without_ids_still_parse() {
        let event: BootEvent =
            serde_json::from_str(r#"{"at_ms": 1, "mac": "52:54:00:aa:bb:01", "kind": "boot.tftp", "message": "m"}"#)
                .unwrap();
        assert_eq!((event.queue_id, event.seq), (0, 0));
    }

    /// The bound a rack batches by is only sound if no event serializes longer than the named
    /// maximum: the worst case is text made of bytes JSON escapes as `\u00XX`.
    #[test]
    fn the_largest_event_serializes_within_its_named_bound() {
        let escaped = |len: usize| "\u{1}".repeat(len);
        let event = BootEvent {
            queue_id: BOOT_EVENT_QUEUE_ID_END - 1,
            seq: u64::MAX,
            at_ms: i64::MIN,
            mac: escaped(BOOT_EVENT_MAC_BYTES_MAX),
            kind: escaped(BOOT_EVENT_KIND_BYTES_MAX),
            message: escaped(BOOT_EVENT_MESSAGE_BYTES_MAX),
        };
        let len = serde_json::to_vec(&event).unwrap().len();
        assert!(len <= BOOT_EVENT_JSON_BYTES_MAX, "{len} > {BOOT_EVENT_JSON_BYTES_MAX}");
    }

    #[test]
    fn boot_action_json() {
        let json = serde_json::to_string(&BootAction::Local).unwrap();
        assert_eq!(json, r#"{"kind":"local"}"#);
    }
}
