//! The machine's hardware as Linux shows it in /proc and /sys: firmware, CPUs, memory, disks,
//! NICs, trimmed to the wire contract's bounds.

use std::fs;
use std::path::Path;

use anyhow::{Context, Result};
use metalrack_api::agent::{
    DiskInventory, Firmware, Inventory, NicInventory, INVENTORY_DISKS_MAX, INVENTORY_NICS_MAX, INVENTORY_TEXT_BYTES_MAX,
};
use metalrack_api::machines::normalize_mac;

/// Block devices that are not disks a machine could be deployed to: loop devices, RAM disks,
/// compressed swap, optical and floppy drives.
const NOT_DISKS: [&str; 5] = ["loop", "ram", "zram", "sr", "fd"];

/// Sector size of /sys/block/*/size, whatever the disk's own sector size.
const SYSFS_SECTOR_BYTES: u64 = 512;

/// Reads the inventory from the running kernel.
pub fn gather() -> Result<Inventory> {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").context("cannot read /proc/cpuinfo")?;
    let meminfo = fs::read_to_string("/proc/meminfo").context("cannot read /proc/meminfo")?;
    let (cpus, cpu_model) = parse_cpuinfo(&cpuinfo);
    Ok(Inventory {
        firmware: if Path::new("/sys/firmware/efi").exists() { Firmware::Uefi } else { Firmware::Bios },
        cpus,
        cpu_model,
        memory_bytes: parse_meminfo(&meminfo).context("/proc/meminfo has no MemTotal line")?,
        disks: disks(Path::new("/sys/block"))?,
        nics: nics(Path::new("/sys/class/net"))?,
    })
}

/// The number of `processor` entries and the first `model name`.
fn parse_cpuinfo(text: &str) -> (u32, String) {
    let mut cpus = 0;
    let mut model = None;
    for line in text.lines() {
        let Some((key, value)) = line.split_once(':') else { continue };
        match key.trim() {
            "processor" => cpus += 1,
            "model name" if model.is_none() => model = Some(clean_text(value)),
            _ => {}
        }
    }
    (cpus, model.unwrap_or_default())
}

/// `MemTotal` in bytes (the file says kB, meaning KiB).
fn parse_meminfo(text: &str) -> Option<u64> {
    let line = text.lines().find(|line| line.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Printable ASCII only, trimmed, at most [`INVENTORY_TEXT_BYTES_MAX`] bytes.
fn clean_text(text: &str) -> String {
    let printable: String =
        text.trim().chars().map(|c| if c.is_ascii_graphic() || c == ' ' { c } else { '?' }).collect();
    printable.chars().take(INVENTORY_TEXT_BYTES_MAX).collect::<String>().trim().to_string()
}

fn read_text(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|text| clean_text(&text))
}

/// Disks under `sys_block` (`/sys/block`), by name.
fn disks(sys_block: &Path) -> Result<Vec<DiskInventory>> {
    let mut names = entry_names(sys_block)?;
    names.retain(|name| !NOT_DISKS.iter().any(|prefix| name.starts_with(prefix)));
    names.sort();
    let mut disks = Vec::new();
    for name in names.into_iter().take(INVENTORY_DISKS_MAX) {
        let dir = sys_block.join(&name);
        let sectors: u64 = read_text(&dir.join("size")).and_then(|text| text.parse().ok()).unwrap_or(0);
        let serial = read_text(&dir.join("serial")).or_else(|| read_text(&dir.join("device/serial")));
        disks.push(DiskInventory {
            name: clean_text(&name),
            size_bytes: sectors * SYSFS_SECTOR_BYTES,
            model: read_text(&dir.join("device/model")).unwrap_or_default(),
            serial: serial.unwrap_or_default(),
        });
    }
    Ok(disks)
}

/// NICs under `sys_net` (`/sys/class/net`) with a MAC address, by name; `lo` is not one.
fn nics(sys_net: &Path) -> Result<Vec<NicInventory>> {
    let mut names = entry_names(sys_net)?;
    names.retain(|name| name != "lo");
    names.sort();
    let mut nics = Vec::new();
    for name in names {
        let dir = sys_net.join(&name);
        // Interfaces without an Ethernet address (tun, some tunnels) cannot PXE-boot anything.
        let Some(mac) = read_text(&dir.join("address")).and_then(|text| normalize_mac(&text).ok()) else { continue };
        // Reading `speed` fails while the link is down; -1 means unknown.
        let speed_mbps = read_text(&dir.join("speed")).and_then(|text| text.parse::<u32>().ok());
        nics.push(NicInventory { name: clean_text(&name), mac, speed_mbps });
        if nics.len() == INVENTORY_NICS_MAX {
            break;
        }
    }
    Ok(nics)
}

fn entry_names(dir: &Path) -> Result<Vec<String>> {
    let entries = fs::read_dir(dir).with_context(|| format!("cannot list {}", dir.display()))?;
    Ok(entries.filter_map(|entry| entry.ok()?.file_name().into_string().ok()).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpuinfo_counts_processors_and_keeps_the_first_model() {
        let text =
            "processor\t: 0\nmodel name\t: QEMU Virtual CPU version 2.5+\n\nprocessor\t: 1\nmodel name\t: other\n";
        assert_eq!(parse_cpuinfo(text), (2, "QEMU Virtual CPU version 2.5+".to_string()));
    }

    #[test]
    fn meminfo_total_is_in_kib() {
        assert_eq!(parse_meminfo("MemTotal:        2048 kB\nMemFree: 1 kB\n"), Some(2048 * 1024));
        assert_eq!(parse_meminfo("MemFree: 1 kB\n"), None);
    }

    #[test]
    fn text_is_trimmed_to_printable_ascii_within_the_bound() {
        assert_eq!(clean_text("  a\tb\u{e9}  \n"), "a?b?");
        assert_eq!(clean_text(&"x".repeat(100)).len(), INVENTORY_TEXT_BYTES_MAX);
    }

    #[test]
    fn disks_skip_loop_ram_and_optical_devices_and_read_size_model_serial() {
        let dir = tempfile::tempdir().unwrap();
        for name in ["vda", "loop0", "sr0", "zram0", "nvme0n1"] {
            fs::create_dir_all(dir.path().join(name).join("device")).unwrap();
            fs::write(dir.path().join(name).join("size"), "2048\n").unwrap();
        }
        fs::write(dir.path().join("nvme0n1/device/model"), "Fast Disk  \n").unwrap();
        fs::write(dir.path().join("nvme0n1/serial"), "S123\n").unwrap();
        fs::write(dir.path().join("vda/device/serial"), "V9\n").unwrap();
        let disks = disks(dir.path()).unwrap();
        let names: Vec<&str> = disks.iter().map(|disk| disk.name.as_str()).collect();
        assert_eq!(names, ["nvme0n1", "vda"]);
        assert_eq!(disks[0].size_bytes, 2048 * 512);
        assert_eq!((disks[0].model.as_str(), disks[0].serial.as_str()), ("Fast Disk", "S123"));
        assert_eq!(disks[1].serial, "V9");
    }
}
