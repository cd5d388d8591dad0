//! The rack's data dir (`--data-dir`, default /var/lib/metalrack/rack): the one place that says
//! which file is where. Every module asks it for a path instead of joining names itself, so the
//! layout can be read here whole, and stays what existing data dirs have.
//!
//! ```text
//! DATA/registration.toml      the rack's id and credential (mode 0600)          registration
//! DATA/status.json            the last heartbeat, for `rackd status`            status
//! DATA/control.sock           `rackd sync` talks to `rackd serve` here          control
//! DATA/boot-table.json        the machines' boot decisions from the region      snapshot::boot_table
//! DATA/deploys-done.json      deploys this rack saw finish (region not told yet) snapshot::boot_table
//! DATA/images/                the snapshot store (see `snapshot`)               snapshot
//! DATA/images/sync-state.json what the sync has acted on                        sync
//! DATA/boot/                  iPXE loaders copied at start (the TFTP root)      pxe
//! DATA/dhcp-leases.json       DHCP lease snapshot                               pxe::dhcp::lease_journal
//! DATA/dhcp-leases.journal    DHCP lease changes since the snapshot             pxe::dhcp::lease_journal
//! DATA/boot-events.journal    boot events not yet taken by the region           pxe::events
//! ```

use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataDir {
    root: PathBuf,
}

impl DataDir {
    pub fn new(root: impl Into<PathBuf>) -> DataDir {
        DataDir { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn registration(&self) -> PathBuf {
        self.root.join("registration.toml")
    }

    pub fn status(&self) -> PathBuf {
        self.root.join("status.json")
    }

    pub fn control_socket(&self) -> PathBuf {
        self.root.join("control.sock")
    }

    pub fn boot_table(&self) -> PathBuf {
        self.root.join("boot-table.json")
    }

    pub fn deploys_done(&self) -> PathBuf {
        self.root.join("deploys-done.json")
    }

    /// The snapshot store's root.
    pub fn images(&self) -> PathBuf {
        self.root.join("images")
    }

    pub fn sync_state(&self) -> PathBuf {
        self.images().join("sync-state.json")
    }

    pub fn boot_files(&self) -> PathBuf {
        self.root.join("boot")
    }

    pub fn lease_snapshot(&self) -> PathBuf {
        self.root.join("dhcp-leases.json")
    }

    pub fn lease_journal(&self) -> PathBuf {
        self.root.join("dhcp-leases.journal")
    }

    pub fn boot_events(&self) -> PathBuf {
        self.root.join("boot-events.journal")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Existing data dirs keep working: the names are a compatibility contract, not a detail.
    #[test]
    fn file_names_are_those_existing_data_dirs_have() {
        let data_dir = DataDir::new("/d");
        let names: Vec<PathBuf> = vec![
            data_dir.registration(),
            data_dir.status(),
            data_dir.control_socket(),
            data_dir.boot_table(),
            data_dir.images(),
            data_dir.sync_state(),
            data_dir.boot_files(),
            data_dir.lease_snapshot(),
            data_dir.lease_journal(),
            data_dir.boot_events(),
        ];
        let expected = [
            "/d/registration.toml",
            "/d/status.json",
            "/d/control.sock",
            "/d/boot-table.json",
            "/d/images",
            "/d/images/sync-state.json",
            "/d/boot",
            "/d/dhcp-leases.json",
            "/d/dhcp-leases.journal",
            "/d/boot-events.journal",
        ];
        assert_eq!(names, expected.iter().map(PathBuf::from).collect::<Vec<_>>());
    }
}
