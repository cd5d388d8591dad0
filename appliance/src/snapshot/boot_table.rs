//! The boot table (`DATA/boot-table.json`): each machine's boot decision and the deploy
//! environment as last received from the region, plus the deploys this rack saw finish
//! (`DATA/deploys-done.json`). Sync writes the first, the agent endpoints the second, PXE reads
//! both; both are kept on disk so machines boot with the region away, also after a rack restart.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use metalrack_api::agent::{AgentJob, DeployEnv};
use metalrack_api::machines::{BootAction, MachineBoot};
use metalrack_image_tools::private_file::write_private_file;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::data_dir::DataDir;

/// Finished deploys remembered at most: one per machine the rack serves. A deploy is forgotten
/// once the region's table no longer names its token (the region took the news); until then it
/// turns the machine's answer into "boot from the local disk". 10,000 entries are ~1 MiB.
pub const DEPLOYS_DONE_MAX: usize = 10_000;

/// What the region told this rack about its machines.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Boots {
    pub machines: Vec<MachineBoot>,
    /// What unknown machines boot to enlist (absent: they wait for an operator).
    #[serde(default)]
    pub deploy_env: Option<DeployEnv>,
    /// The region's boot generation for this rack that `machines` hold at least
    /// (`RackCatalogue::boot_generation`): power requests wait for theirs.
    #[serde(default)]
    pub generation: u64,
}

impl Boots {
    pub fn machine(&self, mac: &str) -> Option<&MachineBoot> {
        self.machines.iter().find(|m| m.mac == mac)
    }
}

/// The machines' boot decisions, shared: PXE holds a receiver, the writer replaces the whole
/// table at once.
pub type Machines = Arc<Boots>;

/// The writing side: the file and the channel readers watch.
#[derive(Debug)]
pub struct BootTable {
    path: PathBuf,
    sender: watch::Sender<Machines>,
}

impl BootTable {
    /// Loads the table kept on disk (also the older form, a bare list of machines). A missing or
    /// unreadable file is an empty table: the next catalogue from the region replaces it.
    pub fn open(data_dir: &DataDir) -> BootTable {
        let path = data_dir.boot_table();
        let bytes = std::fs::read(&path).unwrap_or_default();
        let boots = serde_json::from_slice::<Boots>(&bytes)
            .or_else(|_| {
                serde_json::from_slice::<Vec<MachineBoot>>(&bytes).map(|machines| Boots {
                    machines,
                    deploy_env: None,
                    generation: 0,
                })
            })
            .unwrap_or_default();
        let (sender, _) = watch::channel(Arc::new(boots));
        BootTable { path, sender }
    }

    pub fn subscribe(&self) -> watch::Receiver<Machines> {
        self.sender.subscribe()
    }

    /// Replaces the table if it differs: saved first (a failure to save is logged and the table
    /// served from memory), then shown to readers. Returns whether it changed.
    pub fn update(&self, machines: &[MachineBoot], deploy_env: Option<&DeployEnv>, generation: u64) -> bool {
        {
            let current = self.sender.borrow();
            if current.machines.as_slice() == machines
                && current.deploy_env.as_ref() == deploy_env
                && current.generation == generation
            {
                return false;
            }
        }
        let boots = Boots { machines: machines.to_vec(), deploy_env: deploy_env.cloned(), generation };
        let json = serde_json::to_vec_pretty(&boots).expect("boot table serializes");
        if let Err(e) = write_private_file(&self.path, &json) {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot save the boot table; serving it from memory");
        }
        tracing::info!(
            n_machines = machines.len(),
            deploy_env = deploy_env.is_some(),
            generation,
            "boot table updated"
        );
        self.sender.send_replace(Arc::new(boots));
        true
    }
}

/// The deploys this rack saw finish (the agent reported the image written and verified), by MAC
/// → the job's token: the machine's next boot is answered "local disk" even while the region,
/// which has not heard yet, still says "deploy". Saved on each change (a handful per deploy).
#[derive(Debug)]
pub struct DeploysDone {
    path: PathBuf,
    done: Mutex<HashMap<String, String>>,
}

impl DeploysDone {
    pub fn open(data_dir: &DataDir) -> DeploysDone {
        let path = data_dir.deploys_done();
        let done = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        DeploysDone { path, done: Mutex::new(done) }
    }

    /// Records that the deploy `token` of `mac` finished.
    pub fn mark(&self, mac: &str, token: &str) {
        let mut done = self.done.lock().expect("lock");
        if done.get(mac).map(String::as_str) == Some(token) {
            return;
        }
        if done.len() >= DEPLOYS_DONE_MAX && !done.contains_key(mac) {
            // Full of machines the region never moved on from: an arbitrary one is forgotten
            // (its machine would deploy again, writing nothing, as its disk already matches).
            let victim = done.keys().next().cloned().expect("full map has keys");
            done.remove(&victim);
        }
        done.insert(mac.to_owned(), token.to_owned());
        self.save(&done);
    }

    /// Whether the deploy `token` of `mac` finished here.
    pub fn is_done(&self, mac: &str, token: &str) -> bool {
        self.done.lock().expect("lock").get(mac).is_some_and(|t| t == token)
    }

    /// Forgets finished deploys the region's table no longer names (it has moved on).
    pub fn prune(&self, boots: &Boots) {
        let mut done = self.done.lock().expect("lock");
        let before = done.len();
        done.retain(|mac, token| {
            boots.machine(mac).is_some_and(
                |m| matches!(&m.boot, BootAction::Agent { token: t, job: AgentJob::Deploy { .. }, .. } if t == token),
            )
        });
        if done.len() != before {
            self.save(&done);
        }
    }

    fn save(&self, done: &HashMap<String, String>) {
        let json = serde_json::to_vec(done).expect("map serializes");
        if let Err(e) = write_private_file(&self.path, &json) {
            tracing::warn!(error = %e, path = %self.path.display(), "cannot save the finished deploys");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalrack_api::agent::ImageRef;

    fn machine(mac: &str) -> MachineBoot {
        MachineBoot { mac: mac.into(), hostname: "n".into(), boot: BootAction::Local }
    }

    fn env() -> DeployEnv {
        DeployEnv {
            image: ImageRef { image: "metalrack/deploy-env".into(), arch: "amd64".into(), version: "1".into() },
            kernel_params: "console=ttyS0".into(),
        }
    }

    #[test]
    fn updates_reach_readers_and_survive_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(dir.path());
        let table = BootTable::open(&data_dir);
        let reader = table.subscribe();
        assert!(reader.borrow().machines.is_empty());
        assert!(table.update(&[machine("52:54:00:00:00:01")], None, 1));
        assert_eq!(reader.borrow().machines.len(), 1);
        assert!(!table.update(&[machine("52:54:00:00:00:01")], None, 1), "the same table is no change");
        assert!(table.update(&[machine("52:54:00:00:00:01")], Some(&env()), 1), "a new deploy env is a change");
        assert!(table.update(&[machine("52:54:00:00:00:01")], Some(&env()), 2), "a new generation is a change");
        assert_eq!(reader.borrow().generation, 2, "which readers see");
        drop(table);
        let reopened = BootTable::open(&data_dir);
        let boots = reopened.subscribe().borrow().clone();
        assert_eq!(boots.machines, [machine("52:54:00:00:00:01")]);
        assert_eq!(boots.deploy_env, Some(env()));
        assert_eq!(boots.generation, 2);
    }

    #[test]
    fn a_damaged_file_is_an_empty_table_and_the_older_form_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(dir.path());
        std::fs::write(data_dir.boot_table(), b"[{\"mac\": tru").unwrap();
        assert!(BootTable::open(&data_dir).subscribe().borrow().machines.is_empty());
        std::fs::write(data_dir.boot_table(), serde_json::to_vec(&[machine("52:54:00:00:00:02")]).unwrap()).unwrap();
        assert_eq!(BootTable::open(&data_dir).subscribe().borrow().machines, [machine("52:54:00:00:00:02")]);
    }

    #[test]
    fn finished_deploys_survive_a_restart_and_are_forgotten_once_the_region_moves_on() {
        let dir = tempfile::tempdir().unwrap();
        let data_dir = DataDir::new(dir.path());
        let done = DeploysDone::open(&data_dir);
        done.mark("52:54:00:00:00:01", "t1");
        assert!(done.is_done("52:54:00:00:00:01", "t1") && !done.is_done("52:54:00:00:00:01", "t0"));
        let done = DeploysDone::open(&data_dir);
        assert!(done.is_done("52:54:00:00:00:01", "t1"), "kept on disk");
        let deploying = Boots {
            machines: vec![MachineBoot {
                mac: "52:54:00:00:00:01".into(),
                hostname: "n".into(),
                boot: BootAction::Agent {
                    env: env(),
                    machine_id: "m1".into(),
                    token: "t1".into(),
                    job: AgentJob::Deploy { image: env().image, kind: "root-disk".into(), disk: None },
                },
            }],
            deploy_env: None,
            generation: 1,
        };
        done.prune(&deploying);
        assert!(done.is_done("52:54:00:00:00:01", "t1"), "the region still says deploy: kept");
        done.prune(&Boots { machines: vec![machine("52:54:00:00:00:01")], ..Boots::default() });
        assert!(!done.is_done("52:54:00:00:00:01", "t1"), "the region says local now: forgotten");
    }
}
