//! QEMU machines that network-boot with real iPXE firmware on a lab's tap: the PXE clients of the
//! end-to-end tests.
//!
//! A machine is `qemu-system-x86_64 -accel tcg` (KVM is not reliable on the lab machines), booting
//! from the network (`-boot order=n`; with a disk, the network then the disk, as [`BootOrder`]
//! says), by default never rebooting (`-no-reboot`, so a guest that ends its run ends QEMU), with
//! no display and its serial console in a log file. The NIC's option ROM is Debian's iPXE build
//! from the `ipxe-qemu` package.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use crate::command::{describe, run, stderr_text, CommandError};
use crate::lab::{Lab, BRIDGE_NAME};

/// The emulator; it runs inside the lab's namespace through [`Lab::command`].
pub const QEMU_PROGRAM: &str = "qemu-system-x86_64";

/// Guest memory when a spec does not say: SeaBIOS or OVMF, iPXE and a small deploy ramdisk fit.
pub const MEMORY_MIB_DEFAULT: u32 = 256;
/// Below this the firmware and iPXE leave no room for anything iPXE loads: such a value is a typo.
pub const MEMORY_MIB_MIN: u32 = 64;
/// The lab machines have 24 GiB shared by every developer; a PXE test needs a fraction of this.
pub const MEMORY_MIB_MAX: u32 = 4096;

/// How long [`Machine::power_on`] watches a new QEMU before returning it. QEMU rejects a busy
/// tap, a missing ROM or bad firmware while it starts, within a few hundred milliseconds; waiting
/// that long turns such a failure into an error instead of a machine that is quietly off.
pub const QEMU_STARTUP_WATCH: Duration = Duration::from_millis(500);
/// How often the startup watch looks at the process.
const QEMU_STARTUP_POLL: Duration = Duration::from_millis(20);

/// The MAC the default spec uses: QEMU's own locally administered range (52:54:00).
pub const MAC_DEFAULT: &str = "52:54:00:12:34:56";

/// Where iPXE's QEMU ROMs (`pxe-<nic>.rom`, `efi-<nic>.rom`) are looked for, in order: Debian's
/// `ipxe-qemu` installs them in the first, upstream QEMU in the second.
pub const ROM_DIRS: [&str; 2] = ["/usr/lib/ipxe/qemu", "/usr/share/qemu"];

/// OVMF built as one image (code and variables), loaded with `-bios`; Debian's `ovmf` package.
pub const OVMF_COMBINED: &str = "/usr/share/ovmf/OVMF.fd";
/// OVMF split into code and a variable store template, loaded as two pflash drives.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE.fd";
/// The variable store template that goes with [`OVMF_CODE`]; each machine writes its own copy.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS.fd";

/// SeaBIOS images QEMU's `pc` machine loads; Debian's `seabios` package, a dependency of
/// `qemu-system-x86`.
const SEABIOS_IMAGES: [&str; 2] = ["/usr/share/seabios/bios-256k.bin", "/usr/share/qemu/bios-256k.bin"];

/// The machine's firmware, which decides the iPXE flavour on its NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS, with iPXE's legacy PXE ROM (`pxe-<nic>.rom`).
    Bios,
    /// OVMF, with iPXE's EFI ROM (`efi-<nic>.rom`). Needs the `ovmf` package.
    Uefi,
}

impl Firmware {
    /// Whether this firmware is installed on this machine.
    pub fn available(self) -> bool {
        match self {
            Firmware::Bios => SEABIOS_IMAGES.iter().any(|path| Path::new(path).exists()),
            Firmware::Uefi => ovmf().is_some(),
        }
    }

    fn rom_prefix(self) -> &'static str {
        match self {
            Firmware::Bios => "pxe",
            Firmware::Uefi => "efi",
        }
    }
}

/// The machine's network card.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Nic {
    /// Intel 82540EM, which every firmware and installer knows.
    E1000,
    /// virtio-net, what the deploy kernel has drivers for (LAB.md: the cloud kernel has no e1000).
    Virtio,
}

impl Nic {
    fn qemu_device(self) -> &'static str {
        match self {
            Nic::E1000 => "e1000",
            Nic::Virtio => "virtio-net-pci",
        }
    }

    fn rom_stem(self) -> &'static str {
        match self {
            Nic::E1000 => "e1000",
            Nic::Virtio => "virtio",
        }
    }
}

/// A device the firmware can boot from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BootFrom {
    /// The NIC's iPXE ROM (QEMU's `n`).
    Network,
    /// The first disk (QEMU's `c`); only meaningful with [`MachineSpec::disk`].
    Disk,
}

impl BootFrom {
    fn qemu_letter(self) -> char {
        match self {
            BootFrom::Network => 'n',
            BootFrom::Disk => 'c',
        }
    }
}

/// Which device the firmware tries first. Without a disk only the network is tried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootOrder {
    /// First on every start and every guest reboot; the other device comes second.
    pub first: BootFrom,
    /// First for this start only (QEMU's `-boot once=`): QEMU restores [`BootOrder::first`] on
    /// the guest's next reset, which is exactly a BMC's one-time boot override.
    pub once: Option<BootFrom>,
}

impl Default for BootOrder {
    /// The network first, then the disk: how MAAS expects machines set up (the rack answers
    /// "boot from the local disk" to a deployed machine, and iPXE's `exit` falls through to it).
    fn default() -> BootOrder {
        BootOrder { first: BootFrom::Network, once: None }
    }
}

impl BootOrder {
    /// The value of QEMU's `-boot` option.
    fn qemu_option(self, has_disk: bool) -> String {
        if !has_disk {
            return "order=n".to_string();
        }
        let order = match self.first {
            BootFrom::Network => "nc",
            BootFrom::Disk => "cn",
        };
        match self.once {
            Some(once) => format!("order={order},once={}", once.qemu_letter()),
            None => format!("order={order}"),
        }
    }
}

/// What a guest's reboot does to QEMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestReboot {
    /// QEMU exits (`-no-reboot`): a test sees the end of a run as the end of the process.
    PowerOff,
    /// QEMU resets the guest, as real hardware does: what a BMC-driven machine needs, whose
    /// deploy ends in a reboot into the disk.
    Restart,
}

/// What to power on.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MachineSpec {
    /// The NIC's MAC, `aa:bb:cc:dd:ee:ff`; unicast.
    pub mac: String,
    pub firmware: Firmware,
    pub nic: Nic,
    pub memory_mib: u32,
    /// A raw image attached as a virtio disk (the deploy target), if any.
    pub disk: Option<PathBuf>,
    pub boot: BootOrder,
    pub guest_reboot: GuestReboot,
}

impl MachineSpec {
    /// A BIOS machine with an e1000 NIC, [`MEMORY_MIB_DEFAULT`] of memory, no disk, booting from
    /// the network, and ending QEMU when the guest reboots.
    pub fn new(mac: impl Into<String>) -> MachineSpec {
        MachineSpec {
            mac: mac.into(),
            firmware: Firmware::Bios,
            nic: Nic::E1000,
            memory_mib: MEMORY_MIB_DEFAULT,
            disk: None,
            boot: BootOrder::default(),
            guest_reboot: GuestReboot::PowerOff,
        }
    }
}

impl Default for MachineSpec {
    /// [`MachineSpec::new`] with [`MAC_DEFAULT`].
    fn default() -> MachineSpec {
        MachineSpec::new(MAC_DEFAULT)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("MAC {mac:?} is not usable: {reason}")]
    Mac { mac: String, reason: &'static str },
    #[error("memory of {memory_mib} MiB is outside {MEMORY_MIB_MIN}..={MEMORY_MIB_MAX} MiB")]
    Memory { memory_mib: u32 },
    #[error("no OVMF firmware at {OVMF_COMBINED} or {OVMF_CODE}; install the ovmf package")]
    NoOvmf,
    #[error("no iPXE ROM {file} in {}; install the ipxe-qemu package", ROM_DIRS.join(" or "))]
    NoRom { file: String },
    #[error("tap {tap} is not in network namespace {namespace}; create it with Lab::add_tap")]
    TapMissing { tap: String, namespace: String, source: CommandError },
    #[error("tap {tap} in network namespace {namespace} is not a port of bridge {BRIDGE_NAME}")]
    TapNotOnBridge { tap: String, namespace: String },
    #[error("QEMU cannot take the path {path} in an option because it contains a comma")]
    PathWithComma { path: PathBuf },
    #[error("cannot create log directory {path}")]
    CreateLogDir { path: PathBuf, source: std::io::Error },
    #[error("cannot create QEMU's log file {path}")]
    CreateLog { path: PathBuf, source: std::io::Error },
    #[error("cannot copy the OVMF variable store {from} to {to}")]
    CopyOvmfVars { from: PathBuf, to: PathBuf, source: std::io::Error },
    #[error("cannot start `{command}`")]
    Spawn { command: String, source: std::io::Error },
    #[error("cannot watch `{command}` while it starts")]
    Watch { command: String, source: std::io::Error },
    #[error("`{command}` exited while starting ({status}): {stderr}")]
    Exited { command: String, status: ExitStatus, stderr: String },
}

/// A running QEMU machine. Dropping it powers it off.
pub struct Machine {
    child: Child,
    command: String,
    serial_log_path: PathBuf,
    qemu_log_path: PathBuf,
}

impl std::fmt::Debug for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Machine")
            .field("pid", &self.child.id())
            .field("command", &self.command)
            .field("serial_log_path", &self.serial_log_path)
            .finish_non_exhaustive()
    }
}

impl Machine {
    /// Starts QEMU inside `lab` with its NIC on `tap` (from [`Lab::add_tap`]); it network-boots at
    /// once. `log_dir` gets `<namespace>-<tap>.serial.log` (the guest's serial console) and
    /// `<namespace>-<tap>.qemu.log` (QEMU's own output).
    pub fn power_on(lab: &Lab, tap: &str, spec: &MachineSpec, log_dir: &Path) -> Result<Machine, QemuError> {
        parse_mac(&spec.mac).map_err(|reason| QemuError::Mac { mac: spec.mac.clone(), reason })?;
        if !(MEMORY_MIB_MIN..=MEMORY_MIB_MAX).contains(&spec.memory_mib) {
            return Err(QemuError::Memory { memory_mib: spec.memory_mib });
        }
        check_tap(lab, tap)?;
        let rom = match (spec.firmware, spec.nic) {
            // Debian's pxe-virtio.rom (and efi-virtio.rom given by path) sends no packet from
            // SeaBIOS here, while QEMU's own choice for the device network-boots: measured with
            // a packet dump on user networking (0 DHCP packets in 40 s against a DISCOVER in
            // seconds). So a BIOS virtio NIC keeps QEMU's default ROM.
            (Firmware::Bios, Nic::Virtio) => None,
            _ => Some(find_rom(spec.firmware, spec.nic)?),
        };

        std::fs::create_dir_all(log_dir)
            .map_err(|source| QemuError::CreateLogDir { path: log_dir.to_path_buf(), source })?;
        let stem = machine_name(lab, tap);
        let serial_log_path = log_dir.join(format!("{stem}.serial.log"));
        let qemu_log_path = log_dir.join(format!("{stem}.qemu.log"));
        check_no_comma(&serial_log_path)?;

        let mut command = lab.command(QEMU_PROGRAM);
        command
            .args(["-name", &stem, "-accel", "tcg", "-smp", "1"])
            .args(["-m", &spec.memory_mib.to_string()])
            .arg("-boot")
            .arg(spec.boot.qemu_option(spec.disk.is_some()))
            .args(["-display", "none", "-monitor", "none"])
            .arg("-serial")
            .arg(format!("file:{}", serial_log_path.display()))
            .arg("-netdev")
            .arg(format!("tap,id=net0,ifname={tap},script=no,downscript=no"))
            .arg("-device")
            .arg(match &rom {
                Some(rom) => {
                    format!("{},netdev=net0,mac={},romfile={}", spec.nic.qemu_device(), spec.mac, rom.display())
                }
                None => format!("{},netdev=net0,mac={}", spec.nic.qemu_device(), spec.mac),
            });
        if spec.guest_reboot == GuestReboot::PowerOff {
            command.arg("-no-reboot");
        }
        if let Some(disk) = &spec.disk {
            check_no_comma(disk)?;
            command.arg("-drive").arg(format!("file={},format=raw,if=virtio", disk.display()));
        }
        if spec.firmware == Firmware::Uefi {
            match ovmf().ok_or(QemuError::NoOvmf)? {
                Ovmf::Combined(image) => {
                    command.arg("-bios").arg(image);
                }
                Ovmf::Split { code, vars } => {
                    // OVMF writes its variables; each machine gets its own copy of the template.
                    let vars_copy = log_dir.join(format!("{stem}.OVMF_VARS.fd"));
                    check_no_comma(&vars_copy)?;
                    std::fs::copy(&vars, &vars_copy).map_err(|source| QemuError::CopyOvmfVars {
                        from: vars.clone(),
                        to: vars_copy.clone(),
                        source,
                    })?;
                    command
                        .arg("-drive")
                        .arg(format!("if=pflash,format=raw,readonly=on,file={}", code.display()))
                        .arg("-drive")
                        .arg(format!("if=pflash,format=raw,file={}", vars_copy.display()));
                }
            }
        }

        let qemu_log = File::create(&qemu_log_path)
            .map_err(|source| QemuError::CreateLog { path: qemu_log_path.clone(), source })?;
        let qemu_log_for_stdout =
            qemu_log.try_clone().map_err(|source| QemuError::CreateLog { path: qemu_log_path.clone(), source })?;
        command.stdin(Stdio::null()).stdout(qemu_log_for_stdout).stderr(qemu_log);
        let command_line = describe(&command);
        // `ip netns exec` execs QEMU in place, so the child is QEMU itself and killing it is enough.
        let child = command.spawn().map_err(|source| QemuError::Spawn { command: command_line.clone(), source })?;
        let mut machine = Machine { child, command: command_line, serial_log_path, qemu_log_path };

        let deadline = Instant::now() + QEMU_STARTUP_WATCH;
        while Instant::now() < deadline {
            match machine.child.try_wait() {
                Ok(None) => std::thread::sleep(QEMU_STARTUP_POLL),
                Ok(Some(status)) => {
                    let stderr = std::fs::read(&machine.qemu_log_path).unwrap_or_default();
                    return Err(QemuError::Exited {
                        command: machine.command.clone(),
                        status,
                        stderr: stderr_text(&stderr),
                    });
                }
                Err(source) => return Err(QemuError::Watch { command: machine.command.clone(), source }),
            }
        }
        Ok(machine)
    }

    /// Whether QEMU still runs. A guest that powers off ends it, and so does a guest reboot under
    /// [`GuestReboot::PowerOff`].
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The guest's serial console so far; empty before the guest wrote to it. iPXE itself prints
    /// to the (absent) screen, not here: judge a boot on the server side.
    pub fn serial_log(&self) -> String {
        std::fs::read(&self.serial_log_path)
            .map(|bytes| String::from_utf8_lossy(&bytes).into_owned())
            .unwrap_or_default()
    }

    /// Where [`Machine::serial_log`] reads from.
    pub fn serial_log_path(&self) -> &Path {
        &self.serial_log_path
    }

    /// What QEMU itself printed (warnings, and why it exited if it did).
    pub fn qemu_log(&self) -> String {
        std::fs::read(&self.qemu_log_path).map(|bytes| String::from_utf8_lossy(&bytes).into_owned()).unwrap_or_default()
    }

    /// The QEMU process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Pulls the plug: kills QEMU and waits for it. Powering off a machine that is off does nothing.
    pub fn power_off(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // The guest keeps no state worth a clean shutdown, and SIGKILL cannot be ignored.
        if let Err(error) = self.child.kill() {
            eprintln!("metalrack-hardware: cannot kill QEMU (pid {}): {error}", self.child.id());
        }
        if let Err(error) = self.child.wait() {
            eprintln!("metalrack-hardware: cannot wait for QEMU (pid {}): {error}", self.child.id());
        }
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.power_off();
    }
}

/// The `-name` [`Machine::power_on`] gives the QEMU on `tap` of `lab`: `<namespace>-<tap>`.
pub fn machine_name(lab: &Lab, tap: &str) -> String {
    format!("{}-{tap}", lab.name())
}

/// The command line (arguments joined by spaces) of the running QEMU named `name` (see
/// [`machine_name`]), read from /proc: how a test sees a QEMU that something else (a BMC)
/// started.
pub fn running_command_line(name: &str) -> Option<String> {
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let Ok(raw) = std::fs::read(entry.path().join("cmdline")) else { continue };
        let arguments: Vec<String> =
            raw.split(|&b| b == 0).map(|argument| String::from_utf8_lossy(argument).into_owned()).collect();
        let named = arguments.windows(2).any(|pair| pair[0] == "-name" && pair[1] == name);
        if named && arguments.first().is_some_and(|program| program.ends_with(QEMU_PROGRAM)) {
            return Some(arguments.join(" "));
        }
    }
    None
}

/// The six bytes of a MAC written `aa:bb:cc:dd:ee:ff` (either case), or why it is not one a NIC
/// can have.
pub fn parse_mac(text: &str) -> Result<[u8; 6], &'static str> {
    let mut mac = [0u8; 6];
    let mut octets = text.split(':');
    for byte in &mut mac {
        let octet = octets.next().ok_or("it needs six octets separated by ':'")?;
        if octet.len() != 2 {
            return Err("each octet is two hex digits");
        }
        *byte = u8::from_str_radix(octet, 16).map_err(|_| "each octet is two hex digits")?;
    }
    if octets.next().is_some() {
        return Err("it needs six octets separated by ':'");
    }
    if mac[0] & 1 == 1 {
        return Err("it is a multicast address");
    }
    Ok(mac)
}

enum Ovmf {
    Combined(PathBuf),
    Split { code: PathBuf, vars: PathBuf },
}

fn ovmf() -> Option<Ovmf> {
    if Path::new(OVMF_COMBINED).exists() {
        return Some(Ovmf::Combined(OVMF_COMBINED.into()));
    }
    if Path::new(OVMF_CODE).exists() && Path::new(OVMF_VARS).exists() {
        return Some(Ovmf::Split { code: OVMF_CODE.into(), vars: OVMF_VARS.into() });
    }
    None
}

fn find_rom(firmware: Firmware, nic: Nic) -> Result<PathBuf, QemuError> {
    let file = format!("{}-{}.rom", firmware.rom_prefix(), nic.rom_stem());
    ROM_DIRS.iter().map(|dir| Path::new(dir).join(&file)).find(|path| path.exists()).ok_or(QemuError::NoRom { file })
}

/// QEMU would create a missing tap itself, outside the bridge, and the machine would boot into
/// silence; so the tap must exist and be a port of the lab's bridge.
fn check_tap(lab: &Lab, tap: &str) -> Result<(), QemuError> {
    let output = run(lab.ip().args(["-o", "link", "show", "dev", tap])).map_err(|source| QemuError::TapMissing {
        tap: tap.to_string(),
        namespace: lab.name().to_string(),
        source,
    })?;
    let description = String::from_utf8_lossy(&output.stdout);
    let master = description.split_whitespace().skip_while(|word| *word != "master").nth(1);
    if master != Some(BRIDGE_NAME) {
        return Err(QemuError::TapNotOnBridge { tap: tap.to_string(), namespace: lab.name().to_string() });
    }
    Ok(())
}

/// QEMU splits option values at commas, so a path with one would be cut short.
fn check_no_comma(path: &Path) -> Result<(), QemuError> {
    if path.as_os_str().as_encoded_bytes().contains(&b',') {
        return Err(QemuError::PathWithComma { path: path.to_path_buf() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_mac_accepts_unicast() {
        assert_eq!(parse_mac("52:54:00:12:34:56"), Ok([0x52, 0x54, 0x00, 0x12, 0x34, 0x56]));
        assert_eq!(parse_mac("52:54:00:AB:cd:EF"), Ok([0x52, 0x54, 0x00, 0xab, 0xcd, 0xef]));
    }

    #[test]
    fn parse_mac_rejects_malformed_and_multicast() {
        for bad in
            ["", "52:54:00:12:34", "52:54:00:12:34:56:78", "52-54-00-12-34-56", "52:54:00:12:34:5", "5g:54:00:12:34:56"]
        {
            assert!(parse_mac(bad).is_err(), "{bad}");
        }
        assert_eq!(parse_mac("01:00:5e:00:00:01"), Err("it is a multicast address"));
    }

    #[test]
    fn rom_names_follow_firmware_and_nic() {
        assert_eq!(format!("{}-{}.rom", Firmware::Bios.rom_prefix(), Nic::E1000.rom_stem()), "pxe-e1000.rom");
        assert_eq!(format!("{}-{}.rom", Firmware::Uefi.rom_prefix(), Nic::Virtio.rom_stem()), "efi-virtio.rom");
    }

    #[test]
    fn boot_option_puts_the_network_first_and_a_one_time_device_before_it() {
        let network_first = BootOrder::default();
        assert_eq!(network_first.qemu_option(false), "order=n");
        assert_eq!(network_first.qemu_option(true), "order=nc");
        let disk_once = BootOrder { first: BootFrom::Network, once: Some(BootFrom::Disk) };
        assert_eq!(disk_once.qemu_option(true), "order=nc,once=c");
        let disk_always = BootOrder { first: BootFrom::Disk, once: Some(BootFrom::Network) };
        assert_eq!(disk_always.qemu_option(true), "order=cn,once=n");
    }

    #[test]
    fn comma_in_path_is_refused() {
        assert!(check_no_comma(Path::new("/tmp/a,b/serial.log")).is_err());
        assert!(check_no_comma(Path::new("/tmp/ab/serial.log")).is_ok());
    }

    #[test]
    fn default_spec_is_a_small_bios_e1000_machine() {
        let spec = MachineSpec::default();
        assert_eq!((spec.firmware, spec.nic, spec.memory_mib), (Firmware::Bios, Nic::E1000, 256));
        assert!(parse_mac(&spec.mac).is_ok());
    }
}
