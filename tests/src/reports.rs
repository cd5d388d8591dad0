//! What a deploy agent reports, as fixtures for tests that play the agent and rack through the
//! region's API (`POST /rack/events`): an inventory and a deploy's figures.

use metalrack_api::agent::{DeployPhase, DeployProgress, DiskInventory, Firmware, Inventory, NicInventory};

/// A UEFI machine with 4 CPUs, 4 GiB, one 20 GiB virtio disk `vda` and one NIC with `mac`.
pub fn inventory(mac: &str) -> Inventory {
    Inventory {
        firmware: Firmware::Uefi,
        cpus: 4,
        cpu_model: "QEMU Virtual CPU".into(),
        memory_bytes: 4 << 30,
        disks: vec![DiskInventory {
            name: "vda".into(),
            size_bytes: 20 << 30,
            model: "QEMU".into(),
            serial: "s1".into(),
        }],
        nics: vec![NicInventory { name: "eth0".into(), mac: mac.into(), speed_mbps: Some(1000) }],
    }
}

/// A deploy of 1000 B in `phase`, `done` of them fetched and written, at 100 B/s.
pub fn progress(phase: DeployPhase, done: u64) -> DeployProgress {
    DeployProgress {
        phase,
        bytes_total: 1000,
        bytes_done: done,
        bytes_fetched: done,
        bytes_written: done,
        bytes_skipped: 0,
        chunks_refetched: 0,
        rate_bytes_per_s: 100,
    }
}
