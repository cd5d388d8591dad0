//! Wire types of machines' boot decisions (what the rack serves each MAC) and of the boot
//! events racks report.

use serde::{Deserialize, Serialize};

/// Boot events one request may carry; a rack with more queued sends several requests.
pub use crate::limits::BOOT_EVENTS_PER_REQUEST_MAX;

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
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BootEvent {
    pub at_ms: i64,
    pub mac: String,
    /// `boot.dhcp`, `boot.tftp`, `boot.http`, `boot.script`, `boot.callback`, `boot.refused`.
    pub kind: String,
    pub message: String,
}

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
    fn boot_action_json() {
        let json = serde_json::to_string(&BootAction::Local).unwrap();
        assert_eq!(json, r#"{"kind":"local"}"#);
    }
}
