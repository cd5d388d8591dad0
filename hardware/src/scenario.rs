//! Scenario files (TOML): a site to simulate — its racks and their machines (firmware, disk), the
//! images, the link rates, the region's relevant settings, and the deploy to run — checked as a
//! whole when loaded, so a runner never starts namespaces for a scenario it cannot finish.
//!
//! Shipped examples live in `hardware/scenarios/` (`seed.toml` is the seed's site: 3 racks × 15
//! machines); a test parses each.

use std::collections::HashSet;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::qemu::Firmware;
use crate::topology::{RackLinks, TopologySpec, LINK_MBIT_MAX, LINK_MBIT_MIN, RACKS_MAX};

/// Machines one rack may have. A rack's provisioning network is a /24 and its DHCP range leaves
/// the first [`DHCP_RANGE_FIRST_HOST`] addresses to the rack: 200 leases fit with room to spare,
/// and 200 simulated machines are already more than one fleet process drives on 2 cores.
pub const MACHINES_PER_RACK_MAX: u32 = 200;

/// The first host address of a rack's DHCP range (`.1` is the rack itself).
pub const DHCP_RANGE_FIRST_HOST: u8 = 20;

/// Largest image a scenario may generate or name: a 10 GiB custom image is the issue's largest
/// case; 64 GiB leaves room and still fits the disks of the machines this runs on.
pub const IMAGE_BYTES_MAX: u64 = 64 << 30;

/// Largest simulated disk: the fleet's disks are sparse files or sinks, so the size is what the
/// deploy environment reports, not what is stored; 16 TiB is a large real disk.
pub const DISK_BYTES_MAX: u64 = 16 << 40;

/// Images one scenario may list: each is generated (or copied), pushed and synced to every rack.
pub const IMAGES_MAX: usize = 16;

/// Highest `deploys_per_rack_max` a scenario may set: the region's queue runs them; more than
/// 1,000 at once on one rack is beyond any fleet this lab simulates.
pub const DEPLOYS_PER_RACK_MAX_LIMIT: u32 = 1_000;

#[derive(Debug, thiserror::Error)]
pub enum ScenarioError {
    #[error("cannot read scenario file {path}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("scenario file {path} is not a valid scenario")]
    Parse { path: PathBuf, source: toml::de::Error },
    #[error("scenario file {path}: {problem}")]
    Invalid { path: PathBuf, problem: ScenarioProblem },
}

/// What is wrong with a scenario that parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScenarioProblem {
    #[error("name must be 1 to 64 letters, digits, '-' or '_', not {name:?}")]
    Name { name: String },
    #[error("a scenario has 1 to {RACKS_MAX} racks, this one {n}")]
    RackCount { n: usize },
    #[error("rack {name:?}: {reason}")]
    RackName { name: String, reason: String },
    #[error("two racks are named {name:?}")]
    DuplicateRack { name: String },
    #[error("rack {rack}: {n} machines (bios_machines + uefi_machines) is outside 1..={MACHINES_PER_RACK_MAX}")]
    MachineCount { rack: String, n: u64 },
    #[error("rack {rack}: disk_bytes {disk_bytes} is smaller than image {image} ({image_bytes} bytes)")]
    DiskTooSmall { rack: String, disk_bytes: u64, image: String, image_bytes: u64 },
    #[error("rack {rack}: disk_bytes {disk_bytes} is outside 1..={DISK_BYTES_MAX}")]
    DiskSize { rack: String, disk_bytes: u64 },
    #[error("a scenario has 1 to {IMAGES_MAX} images, this one {n}")]
    ImageCount { n: usize },
    #[error("image {name:?}: {reason}")]
    ImageName { name: String, reason: String },
    #[error("two images are named {name:?}")]
    DuplicateImage { name: String },
    #[error("image {name}: give exactly one of `path` and `[images.synthetic]`")]
    ImageSource { name: String },
    #[error("image {name}: size_bytes {size_bytes} is outside 1..={IMAGE_BYTES_MAX}")]
    ImageSize { name: String, size_bytes: u64 },
    #[error("image {name}: {key} = {percent} and the other percentages add up to more than 100")]
    ImagePercent { name: String, key: &'static str, percent: u8 },
    #[error("image {name}: cannot read {path}: {reason}")]
    ImageFile { name: String, path: PathBuf, reason: String },
    #[error("deploy.image {image:?} is not one of the scenario's images")]
    DeployImage { image: String },
    #[error("deploy.machines_at_once {n} is outside 1..={total} (the scenario's machines)")]
    MachinesAtOnce { n: u32, total: u64 },
    #[error("links.{key} = {mbit} is outside {LINK_MBIT_MIN}..={LINK_MBIT_MAX}")]
    Rate { key: &'static str, mbit: u32 },
    #[error("region.{key} = {value}: {reason}")]
    Region { key: &'static str, value: u64, reason: &'static str },
}

/// A whole scenario file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Scenario {
    /// Shown in reports and directory names.
    pub name: String,
    pub links: Links,
    /// The region's settings that matter to a fleet; every key has a default.
    #[serde(default)]
    pub region: RegionSettings,
    pub images: Vec<ImageSpec>,
    pub deploy: DeploySpec,
    pub racks: Vec<RackSpec>,
}

/// Link rates, each direction.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Links {
    /// Every rack's uplink to the region (the seed's top-of-rack uplinks are 10 Gbit/s).
    pub uplink_mbit: u32,
    /// Each rack's provisioning network towards its machines (the fleet's one tap); unshaped
    /// when absent.
    #[serde(default)]
    pub provisioning_mbit: Option<u32>,
}

/// The region's config keys a scenario may set (they go into its `region.toml`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegionSettings {
    /// Deploys one rack runs at once; the rest wait. Default 50, the region's own default.
    pub deploys_per_rack_max: u32,
    /// A job with no report for this long fails. Default 600 s: a simulated deploy reports
    /// every few seconds, so ten minutes of silence is a real failure, found within a run.
    pub stall_timeout_s: u64,
    /// Default 1000 ms: a rack is seen Online within a second of starting, and heartbeats cost
    /// each uplink a few KiB per second (counted in its bytes).
    pub rack_heartbeat_interval_ms: u64,
    /// Default 5000 ms: five missed heartbeats.
    pub rack_offline_after_ms: u64,
}

impl Default for RegionSettings {
    fn default() -> Self {
        RegionSettings {
            deploys_per_rack_max: 50,
            stall_timeout_s: 600,
            rack_heartbeat_interval_ms: 1000,
            rack_offline_after_ms: 5000,
        }
    }
}

impl RegionSettings {
    /// The settings as `region.toml` lines.
    pub fn to_region_toml(&self) -> String {
        format!(
            "deploys_per_rack_max = {}\nstall_timeout_s = {}\nrack_heartbeat_interval_ms = {}\nrack_offline_after_ms = {}\n",
            self.deploys_per_rack_max, self.stall_timeout_s, self.rack_heartbeat_interval_ms, self.rack_offline_after_ms
        )
    }
}

/// One image of the catalogue, pushed once as version `1` of a `root-disk`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSpec {
    /// Its name in the catalogue (`site/ubuntu`).
    pub name: String,
    /// An existing file (a custom image); relative to the scenario file's directory.
    #[serde(default)]
    pub path: Option<PathBuf>,
    /// Or generated bytes.
    #[serde(default)]
    pub synthetic: Option<SyntheticImage>,
}

/// A generated image with the structure of a real disk image, so chunking finds what it finds in
/// one: free space (zeros), files that appear more than once (duplicates), the rest unique.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SyntheticImage {
    pub size_bytes: u64,
    /// The same seed gives the same bytes, so runs compare.
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Share of the image that is runs of zeros. Default 10 (a freshly built image's free space).
    #[serde(default = "default_zero_percent")]
    pub zero_percent: u8,
    /// Share of the image that repeats an earlier file. Default 20.
    #[serde(default = "default_duplicate_percent")]
    pub duplicate_percent: u8,
}

fn default_seed() -> u64 {
    1
}
fn default_zero_percent() -> u8 {
    10
}
fn default_duplicate_percent() -> u8 {
    20
}

/// Where an image's bytes come from, once checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSource<'a> {
    File(&'a Path),
    Synthetic(&'a SyntheticImage),
}

impl ImageSpec {
    pub fn source(&self) -> ImageSource<'_> {
        match (&self.path, &self.synthetic) {
            (Some(path), None) => ImageSource::File(path),
            (None, Some(synthetic)) => ImageSource::Synthetic(synthetic),
            _ => unreachable!("Scenario::check requires exactly one source"),
        }
    }
}

/// The deploy a scenario runs.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeploySpec {
    /// Which of the scenario's images.
    pub image: String,
    /// How many machines are asked to deploy at once (the first ones of each rack in turn).
    /// Default all of them.
    #[serde(default)]
    pub machines_at_once: Option<u32>,
    /// Stop the region once every deploy has started, and start it again once they ended:
    /// deploys must not need it. Default false.
    #[serde(default)]
    pub stop_region_after_start: bool,
}

/// One rack and its machines.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RackSpec {
    /// The rack's name in the region (`rackd register --name`).
    pub name: String,
    /// Machines with BIOS firmware (PXE, `undionly.kpxe`). Default 0.
    #[serde(default)]
    pub bios_machines: u32,
    /// Machines with UEFI firmware (`ipxe.efi`). Default 0.
    #[serde(default)]
    pub uefi_machines: u32,
    /// Each machine's disk.
    pub disk_bytes: u64,
}

impl RackSpec {
    pub fn machine_count(&self) -> u64 {
        u64::from(self.bios_machines) + u64::from(self.uefi_machines)
    }
}

/// One machine a scenario asks for, with what it is made of: what the fleet is started with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlannedMachine {
    /// `02:6d:72:<rack>:<n high>:<n low>`: locally administered, unique across the site.
    pub mac: String,
    /// `<rack>-m<nn>`.
    pub hostname: String,
    pub firmware: Firmware,
    pub disk_bytes: u64,
}

impl Scenario {
    /// Reads, parses and checks `path`; relative image paths are resolved against its directory.
    pub fn load(path: &Path) -> Result<Scenario, ScenarioError> {
        let text =
            std::fs::read_to_string(path).map_err(|source| ScenarioError::Read { path: path.to_owned(), source })?;
        Scenario::from_toml(&text, path)
    }

    /// Parses and checks `text`, which came from `path` (for errors and relative image paths).
    pub fn from_toml(text: &str, path: &Path) -> Result<Scenario, ScenarioError> {
        let mut scenario: Scenario =
            toml::from_str(text).map_err(|source| ScenarioError::Parse { path: path.to_owned(), source })?;
        let base = path.parent().unwrap_or(Path::new("."));
        for image in &mut scenario.images {
            if let Some(file) = &image.path {
                if file.is_relative() {
                    image.path = Some(base.join(file));
                }
            }
        }
        scenario.check().map_err(|problem| ScenarioError::Invalid { path: path.to_owned(), problem })?;
        Ok(scenario)
    }

    /// Every rule of the file format beyond its types.
    fn check(&self) -> Result<(), ScenarioProblem> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self.name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
        if !name_ok {
            return Err(ScenarioProblem::Name { name: self.name.clone() });
        }
        let rates =
            [("uplink_mbit", Some(self.links.uplink_mbit)), ("provisioning_mbit", self.links.provisioning_mbit)];
        for (key, mbit) in rates {
            if let Some(mbit) = mbit.filter(|m| !(LINK_MBIT_MIN..=LINK_MBIT_MAX).contains(m)) {
                return Err(ScenarioProblem::Rate { key, mbit });
            }
        }
        self.check_region()?;
        self.check_images()?;
        let image_bytes = |name: &str| self.image_bytes(name);
        let deploy_image = self
            .images
            .iter()
            .find(|i| i.name == self.deploy.image)
            .ok_or_else(|| ScenarioProblem::DeployImage { image: self.deploy.image.clone() })?;

        if self.racks.is_empty() || self.racks.len() > RACKS_MAX {
            return Err(ScenarioProblem::RackCount { n: self.racks.len() });
        }
        let mut names = HashSet::new();
        for rack in &self.racks {
            metalrack_api::validate_rack_name(&rack.name)
                .map_err(|reason| ScenarioProblem::RackName { name: rack.name.clone(), reason })?;
            if !names.insert(rack.name.as_str()) {
                return Err(ScenarioProblem::DuplicateRack { name: rack.name.clone() });
            }
            let n = rack.machine_count();
            if n == 0 || n > u64::from(MACHINES_PER_RACK_MAX) {
                return Err(ScenarioProblem::MachineCount { rack: rack.name.clone(), n });
            }
            if rack.disk_bytes == 0 || rack.disk_bytes > DISK_BYTES_MAX {
                return Err(ScenarioProblem::DiskSize { rack: rack.name.clone(), disk_bytes: rack.disk_bytes });
            }
            if let Some(bytes) = image_bytes(&deploy_image.name) {
                if rack.disk_bytes < bytes {
                    return Err(ScenarioProblem::DiskTooSmall {
                        rack: rack.name.clone(),
                        disk_bytes: rack.disk_bytes,
                        image: deploy_image.name.clone(),
                        image_bytes: bytes,
                    });
                }
            }
        }
        let total = self.machine_count();
        if let Some(n) = self.deploy.machines_at_once {
            if n == 0 || u64::from(n) > total {
                return Err(ScenarioProblem::MachinesAtOnce { n, total });
            }
        }
        Ok(())
    }

    fn check_region(&self) -> Result<(), ScenarioProblem> {
        let region = &self.region;
        let problem = |key, value: u64, reason| Err(ScenarioProblem::Region { key, value, reason });
        let per_rack = u64::from(region.deploys_per_rack_max);
        if per_rack == 0 || per_rack > u64::from(DEPLOYS_PER_RACK_MAX_LIMIT) {
            return problem("deploys_per_rack_max", per_rack, "must be 1 to 1000");
        }
        if region.stall_timeout_s == 0 {
            return problem("stall_timeout_s", 0, "must be above 0");
        }
        if region.rack_heartbeat_interval_ms == 0 {
            return problem("rack_heartbeat_interval_ms", 0, "must be above 0");
        }
        if region.rack_offline_after_ms <= region.rack_heartbeat_interval_ms {
            return problem(
                "rack_offline_after_ms",
                region.rack_offline_after_ms,
                "must be longer than rack_heartbeat_interval_ms",
            );
        }
        Ok(())
    }

    fn check_images(&self) -> Result<(), ScenarioProblem> {
        if self.images.is_empty() || self.images.len() > IMAGES_MAX {
            return Err(ScenarioProblem::ImageCount { n: self.images.len() });
        }
        let mut names = HashSet::new();
        for image in &self.images {
            let name = || image.name.clone();
            metalrack_api::images::validate_image_name(&image.name)
                .map_err(|reason| ScenarioProblem::ImageName { name: name(), reason })?;
            if !names.insert(image.name.as_str()) {
                return Err(ScenarioProblem::DuplicateImage { name: name() });
            }
            match (&image.path, &image.synthetic) {
                (Some(path), None) => {
                    let size_bytes = std::fs::metadata(path)
                        .map_err(|e| ScenarioProblem::ImageFile {
                            name: name(),
                            path: path.clone(),
                            reason: e.to_string(),
                        })?
                        .len();
                    if size_bytes == 0 || size_bytes > IMAGE_BYTES_MAX {
                        return Err(ScenarioProblem::ImageSize { name: name(), size_bytes });
                    }
                }
                (None, Some(synthetic)) => {
                    if synthetic.size_bytes == 0 || synthetic.size_bytes > IMAGE_BYTES_MAX {
                        return Err(ScenarioProblem::ImageSize { name: name(), size_bytes: synthetic.size_bytes });
                    }
                    let shares = u16::from(synthetic.zero_percent) + u16::from(synthetic.duplicate_percent);
                    if shares > 100 {
                        let (key, percent) = if synthetic.zero_percent > 100 {
                            ("zero_percent", synthetic.zero_percent)
                        } else {
                            ("duplicate_percent", synthetic.duplicate_percent)
                        };
                        return Err(ScenarioProblem::ImagePercent { name: name(), key, percent });
                    }
                }
                _ => return Err(ScenarioProblem::ImageSource { name: name() }),
            }
        }
        Ok(())
    }

    /// An image's size in bytes: the synthetic size, or the file's (if it can be read now).
    pub fn image_bytes(&self, name: &str) -> Option<u64> {
        let image = self.image(name)?;
        match (&image.path, &image.synthetic) {
            (_, Some(synthetic)) => Some(synthetic.size_bytes),
            (Some(path), None) => std::fs::metadata(path).ok().map(|m| m.len()),
            (None, None) => None,
        }
    }

    pub fn image(&self, name: &str) -> Option<&ImageSpec> {
        self.images.iter().find(|i| i.name == name)
    }

    /// Every machine of the site.
    pub fn machine_count(&self) -> u64 {
        self.racks.iter().map(RackSpec::machine_count).sum()
    }

    /// How many machines deploy at once.
    pub fn machines_at_once(&self) -> u64 {
        self.deploy.machines_at_once.map_or(self.machine_count(), u64::from)
    }

    /// The machines of rack `index`: BIOS ones first, then UEFI, numbered from 1.
    pub fn machines(&self, index: usize) -> Vec<PlannedMachine> {
        let rack = &self.racks[index];
        let firmware = std::iter::repeat_n(Firmware::Bios, rack.bios_machines as usize)
            .chain(std::iter::repeat_n(Firmware::Uefi, rack.uefi_machines as usize));
        firmware
            .enumerate()
            .map(|(n, firmware)| {
                let number = n + 1;
                PlannedMachine {
                    mac: format!("02:6d:72:{index:02x}:{:02x}:{:02x}", number >> 8, number & 0xff),
                    hostname: format!("{}-m{number:02}", rack.name),
                    firmware,
                    disk_bytes: rack.disk_bytes,
                }
            })
            .collect()
    }

    /// The namespaces and links to build for this scenario.
    pub fn topology_spec(&self) -> TopologySpec {
        TopologySpec {
            racks: self
                .racks
                .iter()
                .map(|rack| RackLinks {
                    name: rack.name.clone(),
                    uplink_mbit: self.links.uplink_mbit,
                    provisioning_mbit: self.links.provisioning_mbit,
                })
                .collect(),
        }
    }
}

/// The DHCP range a rack whose bridge is `gateway` (`a.b.c.1`) hands its `machines` machines:
/// from `.DHCP_RANGE_FIRST_HOST`, one address per machine and as many again for renewals and
/// strays.
pub fn dhcp_range(gateway: Ipv4Addr, machines: u32) -> (Ipv4Addr, Ipv4Addr) {
    let [a, b, c, _] = gateway.octets();
    let last = (u32::from(DHCP_RANGE_FIRST_HOST) + 2 * machines).min(254) as u8;
    (Ipv4Addr::new(a, b, c, DHCP_RANGE_FIRST_HOST), Ipv4Addr::new(a, b, c, last))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMALL: &str = r#"
name = "small"
[links]
uplink_mbit = 1000
[[images]]
name = "site/ubuntu"
[images.synthetic]
size_bytes = 33554432
[deploy]
image = "site/ubuntu"
[[racks]]
name = "rack1"
bios_machines = 1
uefi_machines = 1
disk_bytes = 1073741824
"#;

    fn parse(text: &str) -> Result<Scenario, ScenarioError> {
        Scenario::from_toml(text, Path::new("/scenarios/test.toml"))
    }

    fn problem(text: &str) -> ScenarioProblem {
        match parse(text) {
            Err(ScenarioError::Invalid { problem, .. }) => problem,
            other => panic!("expected an invalid scenario, got {other:?}"),
        }
    }

    #[test]
    fn a_small_scenario_parses_with_defaults_and_plans_its_machines() {
        let scenario = parse(SMALL).unwrap();
        assert_eq!(scenario.region, RegionSettings::default());
        assert_eq!(scenario.machine_count(), 2);
        assert_eq!(scenario.machines_at_once(), 2);
        let machines = scenario.machines(0);
        assert_eq!(machines[0].mac, "02:6d:72:00:00:01");
        assert_eq!(machines[0].hostname, "rack1-m01");
        assert_eq!(machines[0].firmware, Firmware::Bios);
        assert_eq!(machines[1].firmware, Firmware::Uefi);
        let synthetic = scenario.images[0].synthetic.as_ref().unwrap();
        assert_eq!((synthetic.seed, synthetic.zero_percent, synthetic.duplicate_percent), (1, 10, 20));
        assert_eq!(scenario.topology_spec().racks[0].uplink_mbit, 1000);
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let text = SMALL.replace("uplink_mbit = 1000", "uplink_mbit = 1000\nuplink_gbit = 1");
        let error = parse(&text).unwrap_err();
        let ScenarioError::Parse { source, .. } = &error else { panic!("{error:?}") };
        assert!(source.to_string().contains("uplink_gbit"), "{source}");
    }

    #[test]
    fn bad_values_are_refused_with_what_is_wrong() {
        let cases: Vec<(String, ScenarioProblem)> = vec![
            (SMALL.replace("name = \"small\"", "name = \"a b\""), ScenarioProblem::Name { name: "a b".into() }),
            (
                SMALL.replace("uplink_mbit = 1000", "uplink_mbit = 0"),
                ScenarioProblem::Rate { key: "uplink_mbit", mbit: 0 },
            ),
            (
                SMALL.replace("image = \"site/ubuntu\"", "image = \"site/other\""),
                ScenarioProblem::DeployImage { image: "site/other".into() },
            ),
            (
                SMALL.replace("bios_machines = 1\nuefi_machines = 1", "bios_machines = 0"),
                ScenarioProblem::MachineCount { rack: "rack1".into(), n: 0 },
            ),
            (
                SMALL.replace("bios_machines = 1", "bios_machines = 250"),
                ScenarioProblem::MachineCount { rack: "rack1".into(), n: 251 },
            ),
            (
                SMALL.replace("disk_bytes = 1073741824", "disk_bytes = 1024"),
                ScenarioProblem::DiskTooSmall {
                    rack: "rack1".into(),
                    disk_bytes: 1024,
                    image: "site/ubuntu".into(),
                    image_bytes: 33554432,
                },
            ),
            (
                SMALL.replace("[images.synthetic]\nsize_bytes = 33554432", "path = \"missing.img\""),
                ScenarioProblem::ImageFile {
                    name: "site/ubuntu".into(),
                    path: PathBuf::from("/scenarios/missing.img"),
                    reason: "No such file or directory (os error 2)".into(),
                },
            ),
            (
                SMALL.replace("name = \"site/ubuntu\"", "name = \"site/ubuntu\"\npath = \"/etc/hostname\""),
                ScenarioProblem::ImageSource { name: "site/ubuntu".into() },
            ),
            (
                SMALL.replace("size_bytes = 33554432", "size_bytes = 33554432\nzero_percent = 90"),
                ScenarioProblem::ImagePercent { name: "site/ubuntu".into(), key: "duplicate_percent", percent: 20 },
            ),
            (
                format!("{SMALL}[[racks]]\nname = \"rack1\"\nbios_machines = 1\ndisk_bytes = 1073741824\n"),
                ScenarioProblem::DuplicateRack { name: "rack1".into() },
            ),
            (
                SMALL.replace("image = \"site/ubuntu\"", "image = \"site/ubuntu\"\nmachines_at_once = 3"),
                ScenarioProblem::MachinesAtOnce { n: 3, total: 2 },
            ),
            (
                format!("{SMALL}[region]\nrack_heartbeat_interval_ms = 9000\n"),
                ScenarioProblem::Region {
                    key: "rack_offline_after_ms",
                    value: 5000,
                    reason: "must be longer than rack_heartbeat_interval_ms",
                },
            ),
        ];
        for (text, expected) in cases {
            let found = problem(&text);
            assert_eq!(found, expected, "for:\n{text}");
            // The message names the key or the thing that is wrong.
            assert!(!found.to_string().is_empty());
        }
        assert!(matches!(
            problem(&SMALL.replace("name = \"rack1\"", "name = \"rack one\"")),
            ScenarioProblem::RackName { .. }
        ));
    }

    #[test]
    fn relative_image_paths_resolve_against_the_scenario_file() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("custom.img"), vec![7u8; 4096]).unwrap();
        let text = SMALL.replace("[images.synthetic]\nsize_bytes = 33554432", "path = \"custom.img\"");
        let scenario = Scenario::from_toml(&text, &dir.path().join("s.toml")).unwrap();
        assert_eq!(scenario.images[0].source(), ImageSource::File(&dir.path().join("custom.img")));
        assert_eq!(scenario.image_bytes("site/ubuntu"), Some(4096));
    }

    #[test]
    fn every_shipped_scenario_parses_and_the_seed_is_the_issues_site() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("scenarios");
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                Scenario::load(&path).unwrap_or_else(|e| panic!("{}: {e}: {:?}", path.display(), e));
                names.push(path.file_name().unwrap().to_string_lossy().into_owned());
            }
        }
        names.sort();
        assert_eq!(names, ["seed.toml", "small.toml", "storm.toml"]);
        let storm = Scenario::load(&dir.join("storm.toml")).unwrap();
        assert_eq!((storm.racks.len(), storm.machine_count(), storm.machines_at_once()), (1, 100, 100));
        assert!(storm.region.deploys_per_rack_max >= 100, "the storm's machines all deploy at once");
        let seed = Scenario::load(&dir.join("seed.toml")).unwrap();
        assert_eq!(seed.racks.len(), 3);
        assert!(seed.racks.iter().all(|r| r.machine_count() == 15));
        assert_eq!(seed.machines_at_once(), 45);
    }

    #[test]
    fn dhcp_range_leaves_the_rack_its_addresses_and_fits_the_subnet() {
        let gateway = Ipv4Addr::new(10, 77, 2, 1);
        assert_eq!(dhcp_range(gateway, 15), (Ipv4Addr::new(10, 77, 2, 20), Ipv4Addr::new(10, 77, 2, 50)));
        assert_eq!(dhcp_range(gateway, MACHINES_PER_RACK_MAX).1, Ipv4Addr::new(10, 77, 2, 254));
    }
}
