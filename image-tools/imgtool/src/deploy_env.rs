//! `imgtool deploy-env build`: the deploy environment machines boot to be commissioned,
//! deployed and released — Debian's cloud kernel and an initrd of busybox, the virtio modules
//! and the static agent — built reproducibly from Debian packages, without `cpio` or root.
//!
//! The initrd is an uncompressed newc archive (the kernel reads it as is; no compressor
//! needed at build or boot time). Entries are sorted and carry fixed inode numbers, owners and
//! mtimes, so two builds from the same packages and agent give identical bytes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The meta-package whose dependency names the current cloud kernel.
const KERNEL_META_PACKAGE: &str = "linux-image-cloud-amd64";
const BUSYBOX_PACKAGE: &str = "busybox-static";

/// Modules the environment loads: virtio PCI devices, the disk and the NIC. Their dependencies
/// (virtio, virtio_ring, failover, ...) come from the modules' own `depends=` lists.
pub const MODULES: [&str; 3] = ["virtio_pci", "virtio_blk", "virtio_net"];

/// Where the agent sits in the initrd (the init script runs it).
const AGENT_PATH: &str = "bin/metalrack-agent";

/// The environment's init: mounts, modules, the boot NIC by MAC, DHCP, then the agent as PID 1.
/// Any failure is printed to the console and the machine waits (no reboot loop).
const INIT_SCRIPT: &str = r#"#!/bin/sh
# Metalrack deploy environment: load the drivers, bring up the NIC the machine booted from, run
# the agent. Built by `imgtool deploy-env build`.
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
say() { echo "metalrack deploy env: $*"; }
fail() {
    say "FAILED: $*"
    say "waiting for the operator (the machine does not reboot by itself)"
    while true; do sleep 3600; done
}
mount -t proc proc /proc || fail "cannot mount /proc"
mount -t sysfs sysfs /sys || fail "cannot mount /sys"
mount -t devtmpfs devtmpfs /dev || fail "cannot mount /dev"
mkdir -p /tmp /run
exec </dev/console >/dev/console 2>&1
for module in $(cat /etc/metalrack/modules); do
    insmod "/lib/modules/$module.ko" || fail "cannot load kernel module $module"
done
mac=""
for word in $(cat /proc/cmdline); do
    case "$word" in
        metalrack.mac=*) mac="${word#metalrack.mac=}" ;;
        BOOTIF=01-*) [ -n "$mac" ] || mac=$(echo "${word#BOOTIF=01-}" | tr '-' ':') ;;
    esac
done
mac=$(echo "$mac" | tr 'A-F' 'a-f')
[ -n "$mac" ] || fail "no metalrack.mac= (or BOOTIF=) on the kernel command line"
ip link set lo up
nic=""
# Drivers probe in the background: give the NIC a few seconds to appear.
for attempt in 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15; do
    for dev in /sys/class/net/*; do
        [ "$(cat "$dev/address" 2>/dev/null)" = "$mac" ] && nic="${dev##*/}"
    done
    [ -n "$nic" ] && break
    sleep 1
done
[ -n "$nic" ] || fail "no NIC has MAC $mac; NICs: $(cat /sys/class/net/*/address | tr '\n' ' ')"
ip link set "$nic" up || fail "cannot bring $nic up"
udhcpc -i "$nic" -s /etc/metalrack/udhcpc.script -n -q -t 10 -T 3 || fail "no DHCP lease on $nic ($mac)"
say "starting the agent"
exec /bin/metalrack-agent
"#;

/// udhcpc's hook: sets the address, the default route and the resolver.
const UDHCPC_SCRIPT: &str = r#"#!/bin/sh
# Called by udhcpc with the lease in the environment ($ip, $mask, $router, $dns).
case "$1" in
    deconfig)
        ip addr flush dev "$interface"
        ip link set "$interface" up
        ;;
    bound|renew)
        ip addr flush dev "$interface"
        ip addr add "$ip/${mask:-24}" dev "$interface"
        for gateway in $router; do
            ip route add default via "$gateway" dev "$interface"
            break
        done
        : > /etc/resolv.conf
        for server in $dns; do echo "nameserver $server" >> /etc/resolv.conf; done
        echo "metalrack deploy env: $interface is $ip/${mask:-24}, gateway ${router:-none}"
        ;;
esac
exit 0
"#;

/// What to build and from where.
#[derive(Debug)]
pub struct BuildOptions<'a> {
    pub out: &'a Path,
    pub agent: &'a Path,
    pub cache: &'a Path,
}

/// The built files.
#[derive(Debug)]
pub struct Built {
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub kernel_version: String,
    pub modules: Vec<String>,
}

pub fn build(options: &BuildOptions<'_>) -> Result<Built> {
    let agent = fs::read(options.agent).with_context(|| {
        format!(
            "cannot read the agent {} (build it with scripts/build-deploy-env, or pass --agent)",
            options.agent.display()
        )
    })?;
    check_static_elf(&agent)
        .with_context(|| format!("{} cannot run in the deploy environment", options.agent.display()))?;
    fs::create_dir_all(options.cache).with_context(|| format!("cannot create {}", options.cache.display()))?;
    let kernel_package = kernel_package()?;
    let kernel_root = unpacked(options.cache, &kernel_package)?;
    let busybox_root = unpacked(options.cache, BUSYBOX_PACKAGE)?;

    let (kernel_image, kernel_version) = find_kernel(&kernel_root)?;
    let modules_dir = kernel_root.join("lib/modules").join(&kernel_version);
    let modules = resolve_modules(&modules_dir, &MODULES)?;

    let mut archive = Archive::default();
    let busybox = busybox_root.join("bin/busybox");
    archive.file(
        "bin/busybox",
        0o755,
        fs::read(&busybox).with_context(|| format!("cannot read {}", busybox.display()))?,
    );
    for applet in busybox_applets(&busybox)? {
        if applet != "bin/busybox" {
            archive.symlink(&applet, "/bin/busybox");
        }
    }
    for (name, path) in &modules {
        let bytes = fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
        archive.file(&format!("lib/modules/{name}.ko"), 0o644, bytes);
    }
    let order: String = modules.iter().map(|(name, _)| format!("{name}\n")).collect();
    archive.file("etc/metalrack/modules", 0o644, order.into_bytes());
    archive.file("etc/metalrack/udhcpc.script", 0o755, UDHCPC_SCRIPT.as_bytes().to_vec());
    archive.file("init", 0o755, INIT_SCRIPT.as_bytes().to_vec());
    archive.file(AGENT_PATH, 0o755, agent);
    for dir in ["dev", "proc", "sys", "tmp", "run", "root", "sbin", "usr/bin", "usr/sbin"] {
        archive.dir(dir);
    }
    // The kernel opens /dev/console for init before anything is mounted.
    archive.char_device("dev/console", 0o600, 5, 1);

    fs::create_dir_all(options.out).with_context(|| format!("cannot create {}", options.out.display()))?;
    let kernel = options.out.join("kernel");
    let initrd = options.out.join("initrd");
    fs::copy(&kernel_image, &kernel).with_context(|| format!("cannot write {}", kernel.display()))?;
    let bytes = archive.to_newc().context("cannot build the initrd archive")?;
    fs::write(&initrd, bytes).with_context(|| format!("cannot write {}", initrd.display()))?;
    Ok(Built { kernel, initrd, kernel_version, modules: modules.into_iter().map(|(name, _)| name).collect() })
}

/// The versioned kernel package the meta-package depends on (`linux-image-6.1.0-57-cloud-amd64`).
fn kernel_package() -> Result<String> {
    let output = Command::new("apt-cache")
        .args(["depends", KERNEL_META_PACKAGE])
        .output()
        .context("cannot run apt-cache (the deploy environment is built from Debian packages)")?;
    if !output.status.success() {
        bail!("apt-cache depends {KERNEL_META_PACKAGE} failed: {}", String::from_utf8_lossy(&output.stderr).trim());
    }
    parse_kernel_dependency(&String::from_utf8_lossy(&output.stdout))
        .with_context(|| format!("apt-cache names no linux-image dependency of {KERNEL_META_PACKAGE}"))
}

fn parse_kernel_dependency(text: &str) -> Option<String> {
    text.lines()
        .filter_map(|line| line.trim().strip_prefix("Depends:"))
        .map(str::trim)
        .find(|name| name.starts_with("linux-image-") && *name != KERNEL_META_PACKAGE)
        .map(str::to_string)
}

/// The package unpacked in the cache (downloaded and unpacked once; later builds reuse it).
fn unpacked(cache: &Path, package: &str) -> Result<PathBuf> {
    let root = cache.join(format!("root-{package}"));
    if root.is_dir() {
        return Ok(root);
    }
    let deb = downloaded(cache, package)?;
    let partial = cache.join(format!("root-{package}.partial"));
    if partial.exists() {
        fs::remove_dir_all(&partial).with_context(|| format!("cannot remove {}", partial.display()))?;
    }
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&partial), "dpkg-deb -x")?;
    fs::rename(&partial, &root).with_context(|| format!("cannot rename {}", partial.display()))?;
    Ok(root)
}

/// The package's .deb in the cache, fetched with `apt-get download` when missing.
fn downloaded(cache: &Path, package: &str) -> Result<PathBuf> {
    let find = || -> Result<Option<PathBuf>> {
        let prefix = format!("{package}_");
        let mut debs: Vec<PathBuf> = fs::read_dir(cache)
            .with_context(|| format!("cannot list {}", cache.display()))?
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                let name = path.file_name().and_then(|name| name.to_str()).unwrap_or_default();
                name.starts_with(&prefix) && name.ends_with(".deb")
            })
            .collect();
        debs.sort();
        Ok(debs.pop())
    };
    if let Some(deb) = find()? {
        return Ok(deb);
    }
    // Into a scratch directory first: an interrupted download never looks like a cached one.
    let scratch = cache.join("download.partial");
    if scratch.exists() {
        fs::remove_dir_all(&scratch).with_context(|| format!("cannot remove {}", scratch.display()))?;
    }
    fs::create_dir_all(&scratch).with_context(|| format!("cannot create {}", scratch.display()))?;
    eprintln!("downloading {package}");
    run(Command::new("apt-get").args(["download", "-q", package]).current_dir(&scratch), "apt-get download")?;
    for entry in fs::read_dir(&scratch)? {
        let path = entry?.path();
        let name = path.file_name().context("a downloaded file without a name")?;
        fs::rename(&path, cache.join(name)).with_context(|| format!("cannot move {}", path.display()))?;
    }
    fs::remove_dir_all(&scratch).ok();
    find()?.with_context(|| format!("apt-get download {package} left no .deb"))
}

fn run(command: &mut Command, what: &str) -> Result<()> {
    let output = command.output().with_context(|| format!("cannot run {what}"))?;
    if !output.status.success() {
        bail!("{what} failed ({}): {}", output.status, String::from_utf8_lossy(&output.stderr).trim());
    }
    Ok(())
}

/// `boot/vmlinuz-VERSION` and VERSION.
fn find_kernel(root: &Path) -> Result<(PathBuf, String)> {
    let boot = root.join("boot");
    let mut found: Vec<(PathBuf, String)> = fs::read_dir(&boot)
        .with_context(|| format!("cannot list {}", boot.display()))?
        .filter_map(|entry| {
            let path = entry.ok()?.path();
            let version = path.file_name()?.to_str()?.strip_prefix("vmlinuz-")?.to_string();
            Some((path, version))
        })
        .collect();
    found.sort();
    found.pop().with_context(|| format!("no vmlinuz-* in {}", boot.display()))
}

/// A module's name as the kernel knows it: the file stem with `-` as `_`.
fn module_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?.strip_suffix(".ko")?;
    Some(name.replace('-', "_"))
}

/// The modules to load, dependencies first, each once: from `wanted` and, recursively, their
/// `depends=` lists. A wanted module built into the kernel (`modules.builtin`) needs nothing.
pub fn resolve_modules(modules_dir: &Path, wanted: &[&str]) -> Result<Vec<(String, PathBuf)>> {
    let mut files = BTreeMap::new();
    let mut stack = vec![modules_dir.join("kernel")];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).with_context(|| format!("cannot list {}", dir.display()))? {
            let path = entry?.path();
            if path.is_dir() {
                stack.push(path);
            } else if let Some(name) = module_name(&path) {
                files.insert(name, path);
            }
        }
    }
    let builtin: BTreeSet<String> = fs::read_to_string(modules_dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| module_name(Path::new(line)))
        .collect();
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    for name in wanted {
        visit(name, &files, &builtin, &mut done, &mut order, &mut Vec::new())?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    files: &BTreeMap<String, PathBuf>,
    builtin: &BTreeSet<String>,
    done: &mut BTreeSet<String>,
    order: &mut Vec<(String, PathBuf)>,
    path: &mut Vec<String>,
) -> Result<()> {
    if done.contains(name) || builtin.contains(name) {
        return Ok(());
    }
    if path.iter().any(|seen| seen == name) {
        bail!("kernel modules depend on each other in a cycle: {} -> {name}", path.join(" -> "));
    }
    let file = files.get(name).with_context(|| format!("kernel module {name} is neither a module nor built in"))?;
    let bytes = fs::read(file).with_context(|| format!("cannot read {}", file.display()))?;
    path.push(name.to_string());
    for dependency in
        module_depends(&bytes).with_context(|| format!("cannot read {}'s dependencies", file.display()))?
    {
        visit(&dependency, files, builtin, done, order, path)?;
    }
    path.pop();
    done.insert(name.to_string());
    order.push((name.to_string(), file.clone()));
    Ok(())
}

/// The `depends=` list of a module's `.modinfo` section (64-bit little-endian ELF).
fn module_depends(elf: &[u8]) -> Result<Vec<String>> {
    let section = elf_section(elf, ".modinfo")?.context("no .modinfo section")?;
    Ok(section
        .split(|&byte| byte == 0)
        .filter_map(|entry| entry.strip_prefix(b"depends="))
        .flat_map(|list| String::from_utf8_lossy(list).split(',').map(str::to_string).collect::<Vec<_>>())
        .filter(|name| !name.is_empty())
        .map(|name| name.replace('-', "_"))
        .collect())
}

fn read_u16(bytes: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(bytes.get(at..at + 2)?.try_into().ok()?))
}
fn read_u32(bytes: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(bytes.get(at..at + 4)?.try_into().ok()?))
}
fn read_u64(bytes: &[u8], at: usize) -> Option<usize> {
    usize::try_from(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?)).ok()
}

/// Checks the ELF header: 64-bit, little-endian.
fn check_elf64(elf: &[u8]) -> Result<()> {
    if elf.get(..4) != Some(b"\x7fELF") || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        bail!("not a 64-bit little-endian ELF file");
    }
    Ok(())
}

/// The bytes of section `wanted`, if there is one.
fn elf_section<'a>(elf: &'a [u8], wanted: &str) -> Result<Option<&'a [u8]>> {
    check_elf64(elf)?;
    let bad = || anyhow::anyhow!("a truncated ELF section table");
    let table = read_u64(elf, 0x28).ok_or_else(bad)?;
    let entry_len = usize::from(read_u16(elf, 0x3a).ok_or_else(bad)?);
    let count = usize::from(read_u16(elf, 0x3c).ok_or_else(bad)?);
    let names_index = usize::from(read_u16(elf, 0x3e).ok_or_else(bad)?);
    let header = |index: usize| -> Option<(u32, usize, usize)> {
        let at = table.checked_add(index.checked_mul(entry_len)?)?;
        Some((read_u32(elf, at)?, read_u64(elf, at + 0x18)?, read_u64(elf, at + 0x20)?))
    };
    let (_, names_offset, names_len) = header(names_index).ok_or_else(bad)?;
    let names = elf.get(names_offset..names_offset.checked_add(names_len).ok_or_else(bad)?).ok_or_else(bad)?;
    for index in 0..count {
        let (name_at, offset, len) = header(index).ok_or_else(bad)?;
        let name = names.get(name_at as usize..).and_then(|rest| rest.split(|&b| b == 0).next()).unwrap_or_default();
        if name == wanted.as_bytes() {
            return Ok(Some(elf.get(offset..offset.checked_add(len).ok_or_else(bad)?).ok_or_else(bad)?));
        }
    }
    Ok(None)
}

/// A dynamically linked agent would not start in the initrd (there is no libc there): refuse
/// one with an interpreter (`PT_INTERP`).
fn check_static_elf(elf: &[u8]) -> Result<()> {
    check_elf64(elf)?;
    const PT_INTERP: u32 = 3;
    let bad = || anyhow::anyhow!("a truncated ELF program header table");
    let table = read_u64(elf, 0x20).ok_or_else(bad)?;
    let entry_len = usize::from(read_u16(elf, 0x36).ok_or_else(bad)?);
    let count = usize::from(read_u16(elf, 0x38).ok_or_else(bad)?);
    for index in 0..count {
        let kind = read_u32(elf, table + index * entry_len).ok_or_else(bad)?;
        if kind == PT_INTERP {
            bail!("it is dynamically linked; build it static (RUSTFLAGS=\"-C target-feature=+crt-static\", see scripts/build-deploy-env)");
        }
    }
    Ok(())
}

/// busybox's applets as paths (`bin/sh`, `sbin/ip`, ...), from the binary itself.
fn busybox_applets(busybox: &Path) -> Result<Vec<String>> {
    let output = Command::new(busybox)
        .arg("--list-full")
        .output()
        .with_context(|| format!("cannot run {} --list-full", busybox.display()))?;
    if !output.status.success() {
        bail!("{} --list-full failed", busybox.display());
    }
    Ok(String::from_utf8_lossy(&output.stdout).lines().map(|line| line.trim_start_matches('/').to_string()).collect())
}

/// One archive member.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Member {
    Dir,
    File { mode: u32, bytes: Vec<u8> },
    Symlink { target: String },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

/// The initrd's members by path (sorted: the archive's order is the paths' order).
#[derive(Debug, Default)]
pub struct Archive {
    members: BTreeMap<String, Member>,
}

/// File type bits of `st_mode`.
const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

impl Archive {
    fn parents(&mut self, path: &str) {
        let mut parent = Path::new(path).parent();
        while let Some(dir) = parent.and_then(|dir| dir.to_str()).filter(|dir| !dir.is_empty()) {
            self.members.entry(dir.to_string()).or_insert(Member::Dir);
            parent = Path::new(dir).parent();
        }
    }

    pub fn dir(&mut self, path: &str) {
        self.parents(path);
        self.members.insert(path.to_string(), Member::Dir);
    }

    pub fn file(&mut self, path: &str, mode: u32, bytes: Vec<u8>) {
        self.parents(path);
        self.members.insert(path.to_string(), Member::File { mode, bytes });
    }

    pub fn symlink(&mut self, path: &str, target: &str) {
        self.parents(path);
        self.members.insert(path.to_string(), Member::Symlink { target: target.to_string() });
    }

    pub fn char_device(&mut self, path: &str, mode: u32, major: u32, minor: u32) {
        self.parents(path);
        self.members.insert(path.to_string(), Member::CharDevice { mode, major, minor });
    }

    /// The newc archive: members in path order, inode numbers from 1 in that order, owner
    /// root, mtime 0.
    pub fn to_newc(&self) -> std::io::Result<Vec<u8>> {
        let mut out = Vec::new();
        for (index, (path, member)) in self.members.iter().enumerate() {
            let builder = cpio::NewcBuilder::new(path).ino(index as u32 + 1).uid(0).gid(0).mtime(0);
            let (builder, data): (_, &[u8]) = match member {
                Member::Dir => (builder.mode(S_IFDIR | 0o755).nlink(2), &[]),
                Member::File { mode, bytes } => (builder.mode(S_IFREG | mode), bytes),
                Member::Symlink { target } => (builder.mode(S_IFLNK | 0o777), target.as_bytes()),
                Member::CharDevice { mode, major, minor } => {
                    (builder.mode(S_IFCHR | mode).rdev_major(*major).rdev_minor(*minor), &[])
                }
            };
            let len = u32::try_from(data.len())
                .map_err(|_| std::io::Error::other(format!("{path} is over 4 GiB, too large for newc")))?;
            let mut writer = builder.write(&mut out, len);
            writer.write_all(data)?;
            writer.finish()?;
        }
        cpio::newc::trailer(&mut out)?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_kernel_dependency_is_read_from_apt_cache_output() {
        let text = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-57-cloud-amd64\n";
        assert_eq!(parse_kernel_dependency(text).as_deref(), Some("linux-image-6.1.0-57-cloud-amd64"));
        assert_eq!(parse_kernel_dependency("linux-image-cloud-amd64\n"), None);
    }

    #[test]
    fn the_archive_is_sorted_with_parents_and_reads_back_with_every_member() {
        let mut archive = Archive::default();
        archive.file("usr/bin/b", 0o755, b"bee".to_vec());
        archive.symlink("bin/sh", "/bin/busybox");
        archive.char_device("dev/console", 0o600, 5, 1);
        archive.file("init", 0o755, b"#!/bin/sh\n".to_vec());
        let bytes = archive.to_newc().unwrap();
        assert_eq!(bytes.len() % 4, 0);
        let mut reader_input = &bytes[..];
        let mut seen = Vec::new();
        loop {
            let reader = cpio::NewcReader::new(reader_input).unwrap();
            if reader.entry().is_trailer() {
                break;
            }
            let entry = reader.entry();
            seen.push((entry.name().to_string(), entry.mode(), entry.rdev_major(), entry.mtime(), entry.uid()));
            let mut data = Vec::new();
            let mut reader = reader;
            std::io::Read::read_to_end(&mut reader, &mut data).unwrap();
            if entry_is("usr/bin/b", &seen) {
                assert_eq!(data, b"bee");
            }
            reader_input = reader.finish().unwrap();
        }
        let names: Vec<&str> = seen.iter().map(|entry| entry.0.as_str()).collect();
        assert_eq!(names, ["bin", "bin/sh", "dev", "dev/console", "init", "usr", "usr/bin", "usr/bin/b"]);
        assert_eq!(seen[3].1, S_IFCHR | 0o600);
        assert_eq!(seen[3].2, 5);
        assert!(seen.iter().all(|entry| entry.3 == 0 && entry.4 == 0));
        // Same members, same bytes.
        assert_eq!(archive.to_newc().unwrap(), bytes);
    }

    fn entry_is(name: &str, seen: &[(String, u32, u32, u32, u32)]) -> bool {
        seen.last().is_some_and(|entry| entry.0 == name)
    }

    #[test]
    fn a_dynamic_binary_is_refused_as_the_agent() {
        // This test executable is dynamically linked (tests are not built static).
        let me = fs::read(std::env::current_exe().unwrap()).unwrap();
        assert!(format!("{:#}", check_static_elf(&me).unwrap_err()).contains("dynamically linked"));
        assert!(check_static_elf(b"#!/bin/sh\n").is_err());
    }
}
