//! A deploy lab: a region, one rack serving PXE on a lab namespace's bridge, the deploy
//! environment in the catalogue, and one QEMU machine with an empty virtio disk behind the lab's
//! virtual Redfish BMC (HTTPS, self-signed), added to the region with Redfish power. Shared by
//! the QEMU deploy test and `bench_deploy`; everything runs inside the lab (see
//! [`crate::lab::block_on_in`]).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use metalrack_api::machines::{MachineCreate, MachineState, MachineView};
use metalrack_api::power::PowerParameters;
use metalrack_api::{paths, EventView, RackState};
use metalrack_hardware::bmc::{BmcConfig, BmcServer, BmcTransport, QemuMachine};
use metalrack_hardware::qemu::machine_name;
use metalrack_hardware::{Firmware, GuestReboot, Lab, MachineSpec, Nic};

use crate::api::Api;
use crate::{wait_for, Rack, Region, DEADLINE};

/// The rack's name in the region.
pub const RACK_NAME: &str = "rack1";

/// What to build.
#[derive(Debug, Clone)]
pub struct DeployLabSpec<'a> {
    /// The deploy environment (`kernel`, `initrd`): [`crate::deploy_env::deploy_env`].
    pub env: &'a Path,
    /// Where the region, rack, disk and logs live.
    pub dir: &'a Path,
    pub mac: &'a str,
    pub disk_bytes: u64,
    pub memory_mib: u32,
    /// More `[pxe]` keys for the rack (e.g. its fault hook).
    pub pxe_extra: &'a str,
}

pub struct DeployLab {
    pub region: Region,
    pub api_key: String,
    pub machine_id: String,
    /// The machine's disk file.
    pub disk: PathBuf,
    serial_log: PathBuf,
    _rack: Rack,
    bmc: BmcServer,
}

impl std::fmt::Debug for DeployLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeployLab").field("machine_id", &self.machine_id).finish_non_exhaustive()
    }
}

/// A commission or deploy (a boot into the deploy environment and its work, or a boot of the
/// deployed system) takes a minute or two under TCG here; allow for a loaded CI machine.
pub const PHASE_DEADLINE: Duration = Duration::from_secs(420);

impl DeployLab {
    /// Starts everything; the machine is added (New, off) and the rack holds the deploy
    /// environment.
    pub async fn start(lab: &Arc<Lab>, tap: &str, spec: &DeployLabSpec<'_>) -> DeployLab {
        let region = Region::start(&spec.dir.join("region"));
        let api_key = region.create_admin("admin", "correct horse battery");
        region.push(&api_key, &spec.env.join("kernel"), "metalrack/deploy-env", "kernel", "1");
        region.push(&api_key, &spec.env.join("initrd"), "metalrack/deploy-env", "initrd", "1");
        let gateway = lab.gateway();
        let [a, b, c, _] = gateway.octets();
        let pxe = format!(
            "[pxe]\ninterface = \"{}\"\naddress = \"{gateway}\"\n{}\n\
             [pxe.dhcp]\nmode = \"managed\"\nrange_start = \"{a}.{b}.{c}.100\"\nrange_end = \"{a}.{b}.{c}.150\"\n\
             router = \"{gateway}\"\n",
            lab.bridge(),
            spec.pxe_extra
        );
        let mut rack = Rack::new(spec.dir, RACK_NAME);
        rack.register_ok(&region.url, &region.secret());
        rack.serve_with_config(&pxe);
        region.wait_rack_state(&api_key, RACK_NAME, RackState::Online).await;
        wait_for("the deploy environment in the rack's snapshot", DEADLINE, || async {
            let rack = region.racks(&api_key).await.first()?.clone();
            (rack.snapshot_files >= 2).then_some(())
        })
        .await;

        let logs = spec.dir.join("qemu");
        let disk = spec.dir.join("disk.img");
        std::fs::File::create(&disk).unwrap().set_len(spec.disk_bytes).unwrap();
        let machine = MachineSpec {
            firmware: Firmware::Bios,
            nic: Nic::Virtio,
            memory_mib: spec.memory_mib,
            disk: Some(disk.clone()),
            guest_reboot: GuestReboot::Restart,
            ..MachineSpec::new(spec.mac)
        };
        let mut bmc_config = BmcConfig::new("root", "bmc-password-not-in-logs");
        bmc_config.transport = BmcTransport::Https { names: vec!["127.0.0.1".into()] };
        let bmc = BmcServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            bmc_config,
            QemuMachine::new(lab.clone(), tap, machine, logs.clone()),
        )
        .unwrap();
        let added = region
            .api(&api_key)
            .add_machine(&MachineCreate {
                hostname: "deploy1".into(),
                mac: spec.mac.into(),
                power: PowerParameters::Redfish {
                    address: bmc.url(),
                    username: "root".into(),
                    password: "bmc-password-not-in-logs".into(),
                    system_id: None,
                    trust_self_signed: true,
                },
                rack: None,
            })
            .await
            .unwrap();
        let serial_log = logs.join(format!("{}.serial.log", machine_name(lab, tap)));
        DeployLab { region, api_key, machine_id: added.id, disk, serial_log, _rack: rack, bmc }
    }

    pub fn api(&self) -> Api {
        self.region.api(&self.api_key)
    }

    /// The machine's action `template` with `body`.
    pub async fn act(&self, template: &str, body: &impl serde::Serialize) -> MachineView {
        self.api().machine_action(template, &self.machine_id, body).await.unwrap_or_else(|e| panic!("{e:#}"))
    }

    pub async fn machine(&self) -> Option<MachineView> {
        self.api().machine(&self.machine_id).await.ok()
    }

    /// Waits for `state`; a failed state ends the wait with the machine shown.
    pub async fn wait_state(&self, state: MachineState, what: &str) -> MachineView {
        wait_for(what, PHASE_DEADLINE, || async {
            let machine = self.machine().await?;
            assert!(
                !matches!(
                    machine.state,
                    MachineState::FailedCommissioning | MachineState::FailedDeployment | MachineState::FailedReleasing
                ),
                "{what}: the machine failed: {machine:#?}"
            );
            (machine.state == state).then_some(machine)
        })
        .await
    }

    /// Pushes `file` as version `version` of `image` (a `root-disk`), asks the rack to sync now,
    /// and waits until its snapshot serves the file.
    pub async fn push_image(&self, file: &Path, image: &str, version: &str) {
        self.region.push(&self.api_key, file, image, "root-disk", version);
        let api = self.api();
        // The rack's policy syncs a while after a change; "sync now" instead of waiting for it.
        let sync = api.request(reqwest::Method::POST, paths::SYNC_ALL).send().await.unwrap();
        assert!(sync.status().is_success(), "sync now: {}", sync.status());
        let hash = crate::data::file_blake3(file);
        wait_for("the image in the rack's snapshot", DEADLINE, || async {
            api.rack_serves_file(RACK_NAME, &hash).await.ok()?.then_some(())
        })
        .await;
    }

    /// The machine's serial console since its last power-on (QEMU starts the file afresh).
    pub fn serial(&self) -> String {
        String::from_utf8_lossy(&std::fs::read(&self.serial_log).unwrap_or_default()).into_owned()
    }

    /// The region's events after event `after_id`, oldest first.
    pub async fn events_after(&self, after_id: i64) -> Vec<EventView> {
        let mut events: Vec<EventView> =
            self.api().events().await.unwrap().into_iter().filter(|e| e.id > after_id).collect();
        events.sort_by_key(|e| e.id);
        events
    }

    /// The BMC's address, for a test that checks what the region shows.
    pub fn bmc_url(&self) -> String {
        self.bmc.url()
    }
}
