//! A simulated site (issue 13) from a scenario file: the topology in namespaces (the hardware
//! crate's `topology`), regiond in the region's namespace reachable over every rack's uplink, one
//! real `rackd` per rack serving PXE on its provisioning bridge, the scenario's images and the
//! deploy environment in the catalogue and synced to every rack; and what the fleet part drives:
//! machines added with Redfish power, commissioned, deployed, waited for, the region stopped and
//! started again.
//!
//! Everything async here runs on a runtime inside the region's namespace ([`Site::block_on`]):
//! its sockets are the region's, so the API is `https://127.0.0.1:PORT` there. Processes are
//! started in the namespace they belong to by name (regiond in the region's, each rackd in its
//! rack's), never by inheritance. The simulated machines (`hardware::fleet`) plug
//! in through [`Site::start_fleet`]: `Fleet::start` inside the rack's namespace on its tap.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use metalrack_api::agent::DeployPhase;
use metalrack_api::machines::{DeployRequest, MachineCreate, MachineState, MachineView};
use metalrack_api::power::PowerParameters;
use metalrack_api::{paths, RackState};
use metalrack_hardware::bmc::{BmcConfig, BmcTransport};
use metalrack_hardware::fleet::{Fleet, FleetConfig, FleetMachineSpec, SimPhase};
use metalrack_hardware::scenario::{dhcp_range, ImageSource, Scenario};
use metalrack_hardware::topology::{RackNetwork, Topology, UplinkCounters};

use crate::api::Api;
use crate::process::Spawn;
use crate::rack::{Rack, FAST_RACK_CONFIG};
use crate::region::Region;
use crate::wait::try_wait_for;

/// Version every scenario image is pushed as.
pub const IMAGE_VERSION: &str = "1";

/// The administrator the site creates; the password only opens the region's UI in the lab.
pub const ADMIN_USERNAME: &str = "admin";
pub const ADMIN_PASSWORD: &str = "fleet lab password";

/// How long racks may take to show Online: a few heartbeats over the uplink.
pub const RACKS_ONLINE_DEADLINE: Duration = Duration::from_secs(60);

/// How often the site looks at the region while it waits.
const POLL: Duration = Duration::from_millis(100);

/// Worker threads of the site's runtime: the API client, the UI forwarder and the pushes'
/// waits; the region, racks and fleets are processes of their own.
const RUNTIME_WORKER_THREADS: usize = 2;

/// An image of the scenario, made on disk and ready to push.
#[derive(Debug, Clone)]
pub struct SiteImage {
    pub name: String,
    pub path: PathBuf,
    pub bytes: u64,
    /// Bytes of its distinct chunks: what a rack that has none of them fetches over its uplink.
    pub unique_chunk_bytes: u64,
    /// BLAKE3 of the file, hex: how the region's Images view names it.
    pub blake3: String,
}

/// One rack of the site: its `rackd` and the region's URL over its uplink.
#[derive(Debug)]
pub struct SiteRack {
    pub name: String,
    /// `http://<the region's end of this rack's uplink>:PORT/MAAS`: what the rack registered with.
    pub region_url: String,
    pub rack: Rack,
}

/// A machine to add: what a simulated machine's virtual BMC answers at.
#[derive(Debug, Clone)]
pub struct MachineToAdd {
    pub hostname: String,
    pub mac: String,
    /// The rack whose provisioning network it boots from.
    pub rack: String,
    pub bmc_url: String,
    pub bmc_username: String,
    pub bmc_password: String,
}

/// One simulated machine as its fleet shows it: what the runner adds to the region and reports.
#[derive(Debug, Clone, Default)]
pub struct FleetMachine {
    pub mac: String,
    pub hostname: String,
    pub bmc_url: String,
    /// Its simulated phase (DHCP, TFTP, HTTP, deploy, ...), as the fleet names it.
    pub phase: String,
    pub boots: u32,
    pub bytes_tftp: u64,
    pub bytes_http: u64,
    /// Time spent in each phase so far.
    pub phase_log: Vec<(String, Duration)>,
    /// Its last deploy ended with the image on its disk, every chunk verified (the fleet's own
    /// view: what the runner waits for while the region is stopped).
    pub deployed: bool,
}

/// The simulated machines of one rack, as the runner and the tests read them: `hardware::fleet`'s
/// [`Fleet`], started by [`Site::start_fleet`].
pub trait RackFleet: Send {
    /// The rack's machines now.
    fn machines(&self) -> Vec<FleetMachine>;
}

impl RackFleet for Fleet {
    fn machines(&self) -> Vec<FleetMachine> {
        Fleet::machines(self)
            .into_iter()
            .map(|m| FleetMachine {
                deployed: m.deploy.is_some_and(|d| d.phase == DeployPhase::Done),
                phase: phase_word(&m.phase),
                phase_log: m.phase_log.iter().map(|(phase, at)| (phase_word(phase), *at)).collect(),
                mac: m.mac,
                hostname: m.hostname,
                bmc_url: m.bmc_url,
                boots: m.boots,
                bytes_tftp: m.bytes_tftp,
                bytes_http: m.bytes_http,
            })
            .collect()
    }
}

/// A phase in a word for reports (a failure's reason is in the region's events).
fn phase_word(phase: &SimPhase) -> String {
    match phase {
        SimPhase::Failed { .. } => "Failed".into(),
        other => format!("{other:?}"),
    }
}

/// The BMC credentials every simulated machine of a site answers to (a lab secret).
pub const BMC_USERNAME: &str = "root";
pub const BMC_PASSWORD: &str = "fleet-bmc-password";

/// What to add to the region for `fleet`'s machines on rack `rack`.
pub fn machines_to_add(rack: &str, fleet: &dyn RackFleet) -> Vec<MachineToAdd> {
    fleet
        .machines()
        .into_iter()
        .map(|m| MachineToAdd {
            hostname: m.hostname,
            mac: m.mac,
            rack: rack.to_owned(),
            bmc_url: m.bmc_url,
            bmc_username: BMC_USERNAME.into(),
            bmc_password: BMC_PASSWORD.into(),
        })
        .collect()
}

/// Whether every rack named shows Online now (false while the region does not answer).
async fn all_online(api: &Api, names: &[String]) -> bool {
    let Ok(racks) = api.racks().await else { return false };
    names.iter().all(|n| racks.iter().any(|r| r.name == *n && r.state == RackState::Online))
}

/// A running site. Dropping it stops every daemon; the topology (namespaces) goes when the last
/// holder of its `Arc` drops it, after the daemons.
#[derive(Debug)]
pub struct Site {
    pub scenario: Scenario,
    pub dir: PathBuf,
    pub region: Region,
    pub api_key: String,
    pub racks: Vec<SiteRack>,
    region_port: u16,
    topology: Arc<Topology>,
}

/// Writes a stand-in deploy environment into `dir` (pseudo-random `kernel` and `initrd` of the
/// given sizes) and returns `dir`: simulated machines fetch and count the deploy environment
/// but do not run it, so only its size matters.
pub fn write_stand_in_deploy_env(dir: &Path, kernel_bytes: usize, initrd_bytes: usize) -> Result<PathBuf> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::write(dir.join("kernel"), crate::random_bytes(kernel_bytes, 1))?;
    std::fs::write(dir.join("initrd"), crate::random_bytes(initrd_bytes, 2))?;
    Ok(dir.to_owned())
}

impl Site {
    /// Builds the scenario's namespaces and links; call from any thread, then run the site's
    /// async code with [`Site::block_on`].
    pub fn build_topology(scenario: &Scenario) -> Result<Arc<Topology>> {
        let topology = Topology::build(&scenario.topology_spec()).context("building the site's namespaces")?;
        Ok(Arc::new(topology))
    }

    /// Builds the scenario's topology and runs `body(topology, scenario)` to completion inside
    /// the region's namespace: how every site-level test, bench and the runner start.
    pub fn run<T, F, Fut>(scenario: Scenario, body: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(Arc<Topology>, Scenario) -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        let topology = Site::build_topology(&scenario)?;
        let inside = topology.clone();
        Site::block_on(&topology, move || body(inside, scenario))
    }

    /// Runs `make()` to completion on a runtime inside the region's namespace.
    pub fn block_on<T, F, Fut>(topology: &Topology, make: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce() -> Fut + Send + 'static,
        Fut: Future<Output = T>,
    {
        crate::lab::block_on_in_namespace(topology.region(), Some(RUNTIME_WORKER_THREADS), make)
    }

    /// Starts the region and every rack, and waits until all racks are Online. Images are not
    /// pushed yet ([`Site::push_images`], [`Site::push_deploy_env`]). Call inside
    /// [`Site::block_on`].
    pub async fn start(topology: Arc<Topology>, scenario: Scenario, dir: &Path) -> Result<Site> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let (region, region_port) = launch_region(&topology, &scenario, dir, 0)?;
        let api_key = region.add_admin(ADMIN_USERNAME, ADMIN_PASSWORD)?;
        let secret = region.shared_secret()?;
        let mut site =
            Site { scenario, dir: dir.to_owned(), region, api_key, racks: Vec::new(), region_port, topology };
        for index in 0..site.topology.racks().len() {
            let rack = site.start_rack(index, &secret)?;
            site.racks.push(rack);
        }
        site.wait_racks_online().await?;
        Ok(site)
    }

    fn start_rack(&self, index: usize, secret: &str) -> Result<SiteRack> {
        let network = &self.topology.racks()[index];
        let name = network.name().to_owned();
        let region_url = format!("http://{}:{}/MAAS", network.uplink().region_address, self.region_port);
        let mut rack = Rack::new(&self.dir, &name);
        rack.register_checked(&region_url, secret, Some(network.lab()))
            .with_context(|| format!("registering rack {name} at {region_url}"))?;
        let lab = network.lab();
        let gateway = lab.gateway();
        let machines = self.scenario.racks[index].machine_count() as u32;
        let (range_start, range_end) = dhcp_range(gateway, machines);
        let config = format!(
            "{FAST_RACK_CONFIG}[pxe]\ninterface = \"{}\"\naddress = \"{gateway}\"\n\
             [pxe.dhcp]\nmode = \"managed\"\nrange_start = \"{range_start}\"\nrange_end = \"{range_end}\"\n\
             router = \"{gateway}\"\n",
            lab.bridge()
        );
        rack.launch(&config, Spawn::in_lab(lab)).with_context(|| format!("starting rackd {name}"))?;
        Ok(SiteRack { name, region_url, rack })
    }

    /// Waits until every rack shows Online (after a start, or the region's return), failing at
    /// once, with its log, if a `rackd` exits meanwhile (a missing iPXE package, a bad config)
    /// instead of after the deadline with only "timed out".
    pub async fn wait_racks_online(&mut self) -> Result<()> {
        let api = self.api();
        let names: Arc<[String]> = self.racks.iter().map(|r| r.name.clone()).collect();
        let racks = &mut self.racks;
        try_wait_for("every rack Online", RACKS_ONLINE_DEADLINE, POLL, || {
            let exited = racks.iter_mut().filter_map(|r| r.rack.daemon.as_mut()).try_for_each(|d| d.check_running());
            let (api, names) = (api.clone(), names.clone());
            async move {
                exited?;
                Ok(all_online(&api, &names).await.then_some(()))
            }
        })
        .await
    }

    pub fn topology(&self) -> &Topology {
        &self.topology
    }

    /// Starts rack `index`'s simulated machines (`Scenario::machines`) on its tap, inside its
    /// namespace, each behind its own HTTPS Redfish BMC with the site's BMC credentials.
    pub fn start_fleet(&self, index: usize) -> Result<Fleet> {
        let rack = self.scenario.racks.get(index).with_context(|| format!("no rack {index} in the scenario"))?;
        let network = self.rack_network(&rack.name)?;
        let machines = self
            .scenario
            .machines(index)
            .into_iter()
            .map(|m| FleetMachineSpec {
                mac: m.mac,
                firmware: m.firmware,
                disk_bytes: m.disk_bytes,
                hostname: m.hostname,
            })
            .collect();
        let mut bmc = BmcConfig::new(BMC_USERNAME, BMC_PASSWORD);
        bmc.transport = BmcTransport::Https { names: vec!["127.0.0.1".into()] };
        let config = FleetConfig {
            tap: network.tap().into(),
            machines,
            bmc,
            work_dir: self.dir.join(format!("fleet-{}", rack.name)),
            mtu: 0,
        };
        let fleet = network
            .lab()
            .in_namespace(move || Fleet::start(config))
            .with_context(|| format!("entering {}'s namespace", rack.name))?
            .with_context(|| format!("starting {}'s simulated machines", rack.name))?;
        Ok(fleet)
    }

    /// The network of rack `name`: where its fleet starts (`lab().in_namespace`, on `tap()`).
    pub fn rack_network(&self, name: &str) -> Result<&RackNetwork> {
        Ok(self.topology.rack(name)?)
    }

    /// The region's API as the administrator (from inside the region's namespace).
    pub fn api(&self) -> Api {
        self.region.api(&self.api_key)
    }

    /// Every rack's uplink counters now, in the scenario's order.
    pub fn uplink_counters(&self) -> Result<Vec<(String, UplinkCounters)>> {
        self.racks.iter().map(|r| Ok((r.name.clone(), self.topology.uplink_counters(&r.name)?))).collect()
    }

    /// Makes the scenario's images: see [`make_images`].
    pub fn make_images(&self) -> Result<Vec<SiteImage>> {
        make_images(&self.scenario, &self.dir)
    }

    /// Pushes `image` as version [`IMAGE_VERSION`] of a `root-disk` with `imgtool push`.
    pub async fn push_image(&self, image: &SiteImage) -> Result<()> {
        self.push_file(&image.path, &image.name, "root-disk", IMAGE_VERSION).await
    }

    /// Pushes `image` as version `version` of a `root-disk` (an update of an image pushed before).
    pub async fn push_image_version(&self, image: &SiteImage, version: &str) -> Result<()> {
        self.push_file(&image.path, &image.name, "root-disk", version).await
    }

    /// Pushes the deploy environment (`kernel`, `initrd` of [`crate::deploy_env::deploy_env`]).
    pub async fn push_deploy_env(&self, env: &Path) -> Result<()> {
        for kind in ["kernel", "initrd"] {
            self.push_file(&env.join(kind), "metalrack/deploy-env", kind, IMAGE_VERSION).await?;
        }
        Ok(())
    }

    async fn push_file(&self, file: &Path, name: &str, kind: &str, version: &str) -> Result<()> {
        let command = self.region.push_command(&self.api_key, file, name, kind, version)?;
        // On a blocking thread of this runtime: inside the region's namespace, and the runtime
        // keeps serving (the UI forwarder) meanwhile.
        let output = tokio::task::spawn_blocking(move || crate::process::run(command, None)).await??;
        let text = String::from_utf8_lossy(&output.stdout);
        ensure!(text.contains("committed"), "imgtool push of {name} {kind} did not commit: {text}");
        Ok(())
    }

    /// Asks every rack to sync now (instead of waiting for their policy).
    pub async fn sync_all(&self) -> Result<()> {
        let response = self.api().request(reqwest::Method::POST, paths::SYNC_ALL).send().await?;
        ensure!(response.status().is_success(), "sync now: {}", response.status());
        Ok(())
    }

    /// Waits until every rack serves the file whose BLAKE3 is `file_hash`; when each did, from
    /// the call, in the racks' order.
    pub async fn wait_synced(&self, file_hash: &str, deadline: Duration) -> Result<Vec<(String, Duration)>> {
        let api = self.api();
        let started = Instant::now();
        let mut done: Vec<Option<Duration>> = vec![None; self.racks.len()];
        loop {
            for (rack, when) in self.racks.iter().zip(done.iter_mut()) {
                if when.is_none() && api.rack_serves_file(&rack.name, file_hash).await.unwrap_or(false) {
                    *when = Some(started.elapsed());
                }
            }
            if done.iter().all(Option::is_some) {
                return Ok(self.racks.iter().zip(done).map(|(r, d)| (r.name.clone(), d.unwrap_or_default())).collect());
            }
            if started.elapsed() > deadline {
                let missing: Vec<&str> =
                    self.racks.iter().zip(&done).filter(|(_, d)| d.is_none()).map(|(r, _)| r.name.as_str()).collect();
                bail!("racks {missing:?} did not serve {file_hash} within {deadline:?}");
            }
            tokio::time::sleep(POLL).await;
        }
    }

    /// Adds `machines` with Redfish power (self-signed BMC certificates trusted).
    pub async fn add_machines(&self, machines: &[MachineToAdd]) -> Result<Vec<MachineView>> {
        let api = self.api();
        let mut added = Vec::with_capacity(machines.len());
        for machine in machines {
            let create = MachineCreate {
                hostname: machine.hostname.clone(),
                mac: machine.mac.clone(),
                power: PowerParameters::Redfish {
                    address: machine.bmc_url.clone(),
                    username: machine.bmc_username.clone(),
                    password: machine.bmc_password.clone(),
                    system_id: None,
                    trust_self_signed: true,
                },
                rack: Some(machine.rack.clone()),
            };
            let view = api.add_machine(&create).await.with_context(|| format!("adding {}", machine.hostname))?;
            added.push(view);
        }
        Ok(added)
    }

    /// Asks every machine in `ids` to commission.
    pub async fn commission_all(&self, ids: &[String]) -> Result<()> {
        let api = self.api();
        for id in ids {
            api.machine_action(paths::MACHINE_COMMISSION, id, &serde_json::json!({})).await?;
        }
        Ok(())
    }

    /// Asks every machine in `ids` to deploy version [`IMAGE_VERSION`] of `image`, back to back.
    pub async fn deploy_all(&self, ids: &[String], image: &str) -> Result<()> {
        self.deploy_all_version(ids, image, IMAGE_VERSION).await
    }

    /// Asks every machine in `ids` to deploy version `version` of `image`.
    pub async fn deploy_all_version(&self, ids: &[String], image: &str, version: &str) -> Result<()> {
        let api = self.api();
        let request =
            DeployRequest { image: image.to_owned(), arch: "amd64".into(), version: Some(version.into()), disk: None };
        for id in ids {
            api.machine_action(paths::MACHINE_DEPLOY, id, &request).await?;
        }
        Ok(())
    }

    /// Waits until every machine in `ids` is in `state`; a machine in a failed state ends the
    /// wait with an error naming it.
    pub async fn wait_all(&self, ids: &[String], state: MachineState, deadline: Duration) -> Result<Vec<MachineView>> {
        let api = self.api();
        try_wait_for(&format!("{} machines {state:?}", ids.len()), deadline, POLL * 10, || async {
            let Ok(machines) = api.machines().await else { return Ok(None) };
            let ours: Vec<MachineView> = machines.into_iter().filter(|m| ids.contains(&m.id)).collect();
            if let Some(failed) = ours.iter().find(|m| {
                matches!(
                    m.state,
                    MachineState::FailedCommissioning | MachineState::FailedDeployment | MachineState::FailedReleasing
                )
            }) {
                bail!("machine {} failed: {failed:#?}", failed.hostname);
            }
            Ok((ours.len() == ids.len() && ours.iter().all(|m| m.state == state)).then_some(ours))
        })
        .await
    }

    /// Stops the region (SIGTERM; it must exit cleanly). Racks and machines go on without it.
    pub fn stop_region(&mut self) -> Result<()> {
        self.region.daemon.terminate()
    }

    /// Starts the region again on the same port and data.
    pub fn start_region(&mut self) -> Result<()> {
        self.region.daemon.terminate()?;
        let (region, _) = launch_region(&self.topology, &self.scenario, &self.dir, self.region_port)?;
        self.region = region;
        Ok(())
    }
}

/// `regiond serve` in the region's namespace on every address, `port` (0: any); its URL is made
/// `http://127.0.0.1:PORT/MAAS` (the namespace's own loopback, which its certificate names).
fn launch_region(topology: &Topology, scenario: &Scenario, dir: &Path, port: u16) -> Result<(Region, u16)> {
    let tls_names: Vec<String> =
        topology.racks().iter().map(|r| format!("\"{}\"", r.uplink().region_address)).collect();
    let config = format!("{}tls_names = [{}]\n", scenario.region.to_region_toml(), tls_names.join(", "));
    let listen = format!("0.0.0.0:{port}");
    let mut region =
        Region::launch(&dir.join("region"), &config, &listen, &[], Spawn::in_namespace(topology.region()))?;
    let port = region
        .url
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse::<u16>().ok())
        .with_context(|| format!("no port in the region's URL {}", region.url))?;
    region.url = format!("http://127.0.0.1:{port}/MAAS");
    Ok((region, port))
}

/// Makes `scenario`'s images in `DIR/images/` (generated, or copied from their path) and
/// measures them; blocking (a 1 GiB image takes seconds).
pub fn make_images(scenario: &Scenario, dir: &Path) -> Result<Vec<SiteImage>> {
    let images_dir = dir.join("images");
    std::fs::create_dir_all(&images_dir)?;
    scenario.images.iter().map(|spec| make_image(spec, &images_dir)).collect()
}

fn make_image(spec: &metalrack_hardware::scenario::ImageSpec, dir: &Path) -> Result<SiteImage> {
    let path = dir.join(format!("{}.img", spec.name.replace('/', "_")));
    match spec.source() {
        ImageSource::Synthetic(synthetic) => crate::data::write_synthetic_image(
            &path,
            synthetic.size_bytes,
            synthetic.seed,
            synthetic.zero_percent,
            synthetic.duplicate_percent,
            || Ok(()),
        )?,
        ImageSource::File(file) => {
            std::fs::copy(file, &path).with_context(|| format!("copying {} for {}", file.display(), spec.name))?;
        }
    }
    Ok(SiteImage {
        name: spec.name.clone(),
        bytes: std::fs::metadata(&path)?.len(),
        unique_chunk_bytes: crate::data::unique_chunk_bytes(&path)?,
        blake3: crate::data::file_blake3(&path),
        path,
    })
}
