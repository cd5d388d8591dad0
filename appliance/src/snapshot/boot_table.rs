//! The boot table (`DATA/boot-table.json`): each machine's boot decision as last received from
//! the region. Sync writes it (from the catalogue), PXE reads it; it is kept on disk so machines
//! boot with the region away, also after a rack restart.

use std::path::PathBuf;
use std::sync::Arc;

use metalrack_api::machines::MachineBoot;
use metalrack_image_tools::private_file::write_private_file;
use tokio::sync::watch;

use crate::data_dir::DataDir;

/// The machines' boot decisions, shared: PXE holds a receiver, the writer replaces the whole
/// table at once.
pub type Machines = Arc<Vec<MachineBoot>>;

/// The writing side: the file and the channel readers watch.
#[derive(Debug)]
pub struct BootTable {
    path: PathBuf,
    sender: watch::Sender<Machines>,
}

impl BootTable {
    /// Loads the table kept on disk. A missing or unreadable file is an empty table: the next
    /// catalogue from the region replaces it.
    pub fn open(data_dir: &DataDir) -> BootTable {
        let path = data_dir.boot_table();
        let machines: Vec<MachineBoot> =
            std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let (sender, _) = watch::channel(Arc::new(machines));
        BootTable { path, sender }
    }

    pub fn subscribe(&self) -> watch::Receiver<Machines> {
        self.sender.subscribe()
    }

    /// Replaces the table if `machines` differs: saved first (a failure to save is logged and the
    /// table served from memory), then shown to readers. Returns whether it changed.
    pub fn update(&self, machines: &[MachineBoot]) -> bool {
        if self.sender.borrow().as_slice() == machines {
            return false;
        }
        let json = serde_json::to_vec_pretty(machines).expect("boot table serializes");
        if let Err(e) = write_private_file(&self.path, &json) {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot save the boot table; serving it from memory");
        }
        tracing::info!(n_machines = machines.len(), "boot table updated");
        self.sender.send_replace(Arc::new(machines.to_vec()));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalrack_api::machines::BootAction;

    fn machine(mac: &str) -> MachineBoot {
        MachineBoot { mac: mac.into(), hostname: "n".into(), boot: BootAction::Local }
    }

    #[test]
    fn updates_reach_readers_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(dir.path());
        let table = BootTable::open(&data_dir);
        let reader = table.subscribe();
        assert!(reader.borrow().is_empty());
        assert!(table.update(&[machine("52:54:00:00:00:01")]));
        assert_eq!(reader.borrow().len(), 1);
        assert!(!table.update(&[machine("52:54:00:00:00:01")]), "the same table is no change");
        drop(table);
        let reopened = BootTable::open(&data_dir);
        assert_eq!(reopened.subscribe().borrow().as_slice(), &[machine("52:54:00:00:00:01")]);
    }

    #[test]
    fn a_damaged_file_is_an_empty_table() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(dir.path());
        std::fs::write(data_dir.boot_table(), b"[{\"mac\": tru").unwrap();
        assert!(BootTable::open(&data_dir).subscribe().borrow().is_empty());
    }
}
