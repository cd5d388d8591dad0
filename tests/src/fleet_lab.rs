//! A fleet lab: a region, one rack serving PXE on a lab namespace's bridge, and simulated
//! machines (`metalrack_hardware::fleet`) on one tap of that bridge, each added to the region with
//! Redfish power through its own virtual BMC. The deploy environment is a small stand-in
//! (`metalrack/deploy-env` kernel and initrd of pseudo-random bytes): the simulated machines
//! fetch and count it but do not run it, and building the real one costs minutes. Shared by the
//! fleet test and `bench_fleet`; everything runs inside the lab (see [`crate::lab::block_on_in`]).

use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use metalrack_api::machines::{MachineCreate, MachineState, MachineView};
use metalrack_api::power::PowerParameters;
use metalrack_api::{paths, RackState};
use metalrack_hardware::bmc::{BmcConfig, BmcTransport};
use metalrack_hardware::fleet::{Fleet, FleetConfig, FleetMachineSpec, FleetMachineStatus, SimPhase};
use metalrack_hardware::Lab;

use crate::api::Api;
use crate::{wait_for, Rack, Region, DEADLINE};

pub const RACK_NAME: &str = "rack1";
const BMC_USER: &str = "root";
const BMC_PASSWORD: &str = "fleet-bmc-password-not-in-logs";
/// The stand-in deploy environment's sizes: small, but several TCP windows each.
const ENV_KERNEL_BYTES: usize = 1 << 20;
const ENV_INITRD_BYTES: usize = 3 << 20;

pub struct FleetLab {
    pub region: Region,
    pub api_key: String,
    /// The machines' region ids, in the fleet's order.
    pub machine_ids: Vec<String>,
    pub fleet: Fleet,
    pub rack: Rack,
}

impl std::fmt::Debug for FleetLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetLab").field("machine_ids", &self.machine_ids).finish_non_exhaustive()
    }
}

impl FleetLab {
    /// Starts the region, the rack (which holds the stand-in deploy environment once this
    /// returns) and the fleet (every machine added to the region, New and off).
    pub async fn start(lab: &Lab, tap: &str, dir: &Path, machines: Vec<FleetMachineSpec>) -> Result<FleetLab> {
        let region = Region::start(&dir.join("region"));
        let api_key = region.create_admin("admin", "correct horse battery");
        for (kind, len, seed) in [("kernel", ENV_KERNEL_BYTES, 1), ("initrd", ENV_INITRD_BYTES, 2)] {
            let path = dir.join(kind);
            std::fs::write(&path, crate::random_bytes(len, seed))?;
            region.push(&api_key, &path, "metalrack/deploy-env", kind, "1");
        }
        let gateway = lab.gateway();
        let [a, b, c, _] = gateway.octets();
        let pxe = format!(
            "[pxe]\ninterface = \"{}\"\naddress = \"{gateway}\"\n\n\
             [pxe.dhcp]\nmode = \"managed\"\nrange_start = \"{a}.{b}.{c}.10\"\nrange_end = \"{a}.{b}.{c}.250\"\n\
             router = \"{gateway}\"\n",
            lab.bridge(),
        );
        let mut rack = Rack::new(dir, RACK_NAME);
        rack.register_ok(&region.url, &region.secret());
        rack.serve_with_config(&pxe);
        region.wait_rack_state(&api_key, RACK_NAME, RackState::Online).await;
        wait_for("the deploy environment in the rack's snapshot", DEADLINE, || async {
            let rack = region.racks(&api_key).await.first()?.clone();
            (rack.snapshot_files >= 2).then_some(())
        })
        .await;

        let mut bmc = BmcConfig::new(BMC_USER, BMC_PASSWORD);
        bmc.transport = BmcTransport::Https { names: vec!["127.0.0.1".into()] };
        let fleet =
            Fleet::start(FleetConfig { tap: tap.to_string(), machines, bmc, work_dir: dir.join("fleet"), mtu: 1500 })
                .context("cannot start the fleet")?;
        let api = region.api(&api_key);
        let mut machine_ids = Vec::new();
        for machine in fleet.machines() {
            let added = api
                .add_machine(&MachineCreate {
                    hostname: machine.hostname.clone(),
                    mac: machine.mac.clone(),
                    power: PowerParameters::Redfish {
                        address: machine.bmc_url.clone(),
                        username: BMC_USER.into(),
                        password: BMC_PASSWORD.into(),
                        system_id: machine.system_id.clone(),
                        trust_self_signed: true,
                    },
                    rack: None,
                })
                .await?;
            machine_ids.push(added.id);
        }
        Ok(FleetLab { region, api_key, machine_ids, fleet, rack })
    }

    pub fn api(&self) -> Api {
        self.region.api(&self.api_key)
    }

    /// Asks the region for `template` (an action path) on every machine.
    pub async fn act_all(&self, template: &str, body: &impl serde::Serialize) -> Result<()> {
        let api = self.api();
        for id in &self.machine_ids {
            api.machine_action(template, id, body).await?;
        }
        Ok(())
    }

    /// Waits until every machine is in `state`; a failed state (or a failed simulated machine)
    /// ends the wait with everything shown.
    pub async fn wait_all(&self, state: MachineState, what: &str, deadline: Duration) -> Result<Vec<MachineView>> {
        let started = std::time::Instant::now();
        loop {
            let machines = self.api().machines().await?;
            let ours: Vec<MachineView> =
                machines.into_iter().filter(|machine| self.machine_ids.contains(&machine.id)).collect();
            let failed = ours.iter().any(|machine| {
                matches!(
                    machine.state,
                    MachineState::FailedCommissioning | MachineState::FailedDeployment | MachineState::FailedReleasing
                )
            });
            let sim_failed = self.fleet.machines().into_iter().any(|m| matches!(m.phase, SimPhase::Failed { .. }));
            if failed || sim_failed {
                bail!("{what}: a machine failed:\n{ours:#?}\n{:#?}", self.fleet.machines());
            }
            if ours.len() == self.machine_ids.len() && ours.iter().all(|machine| machine.state == state) {
                return Ok(ours);
            }
            if started.elapsed() > deadline {
                bail!("{what}: not within {deadline:?}:\n{ours:#?}\n{:#?}", self.fleet.machines());
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Waits until every simulated machine satisfies `condition`.
    pub async fn wait_fleet(
        &self,
        what: &str,
        deadline: Duration,
        condition: impl Fn(&FleetMachineStatus) -> bool,
    ) -> Vec<FleetMachineStatus> {
        wait_for(what, deadline, || async {
            let machines = self.fleet.machines();
            machines.iter().all(&condition).then_some(machines)
        })
        .await
    }

    /// Pushes `file` as version `version` of `image` (a `root-disk`), asks the rack to sync
    /// now, and waits until its snapshot serves the file.
    pub async fn push_image(&self, file: &Path, image: &str, version: &str) -> Result<()> {
        self.region.push(&self.api_key, file, image, "root-disk", version);
        let api = self.api();
        let sync = api.request(reqwest::Method::POST, paths::SYNC_ALL).send().await?;
        if !sync.status().is_success() {
            bail!("sync now: {}", sync.status());
        }
        let hash = crate::data::file_blake3(file);
        wait_for("the image in the rack's snapshot", DEADLINE, || async {
            api.rack_serves_file(RACK_NAME, &hash).await.ok()?.then_some(())
        })
        .await;
        Ok(())
    }
}

/// An image of `len` bytes a chunker finds structure in: pseudo-random runs, repeated runs
/// (identical chunks at several places) and zeros, as a filesystem image has.
pub fn structured_image(path: &Path, len: usize, seed: u64) -> Result<()> {
    const PIECE: usize = 1 << 20;
    let repeated = crate::random_bytes(PIECE, seed ^ 0x5eed);
    let mut bytes = Vec::with_capacity(len);
    let mut piece = 0u64;
    while bytes.len() < len {
        let take = PIECE.min(len - bytes.len());
        match piece % 4 {
            0 | 1 => bytes.extend_from_slice(&crate::random_bytes(take, seed + piece)),
            2 => bytes.extend_from_slice(&repeated[..take]),
            _ => bytes.resize(bytes.len() + take, 0),
        }
        piece += 1;
    }
    std::fs::write(path, &bytes).with_context(|| format!("cannot write {}", path.display()))
}
