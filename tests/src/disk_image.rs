//! Bootable raw disk images for the deploy tests, made without loop mounts (LAB.md's recipe): a
//! FAT "superfloppy" with syslinux, Debian's kernel and an initramfs whose init prints a marker
//! on the serial console and powers off. A machine that boots such a disk proves the deployed
//! system runs from its disk. Needs `syslinux`, `mtools`, `dosfstools`, `cpio` and
//! `busybox-static` (scripts/test installs them).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::process::assert_success;

/// What the deployed system prints first on the serial console: `{MARKER_PREFIX}{marker}`.
pub const MARKER_PREFIX: &str = "METALRACK-DEPLOYED-SYSTEM:";

/// The static busybox of Debian's `busybox-static`.
const BUSYBOX: &str = "/bin/busybox";

/// A disk image of `size_mib` MiB at `dir/name` that boots `kernel` with an initramfs printing
/// `{MARKER_PREFIX}{marker}` on ttyS0, then powering off. `extra` files (name, bytes) are added
/// to the FAT file system, so two versions can differ in a few chunks.
pub fn bootable_disk_image(
    dir: &Path,
    name: &str,
    kernel: &Path,
    marker: &str,
    size_mib: u64,
    extra: &[(&str, &[u8])],
) -> PathBuf {
    let work = dir.join(format!("{name}.build"));
    let root = work.join("initramfs");
    std::fs::create_dir_all(root.join("bin")).unwrap();
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).expect("busybox-static is installed (/bin/busybox)");
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc 2>/dev/null\n\
         /bin/busybox echo {MARKER_PREFIX}{marker}\n\
         /bin/busybox sync\n\
         /bin/busybox poweroff -f\n"
    );
    std::fs::create_dir_all(root.join("proc")).unwrap();
    let init_path = root.join("init");
    std::fs::write(&init_path, init).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init_path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let initrd = work.join("initrd.img");
    let cpio = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "cd {} && find . | LC_ALL=C sort | cpio -o -H newc --quiet > {}",
            root.display(),
            initrd.display()
        ))
        .output()
        .expect("sh runs");
    assert_success("cpio (apt-get install cpio)", &cpio);
    assert!(std::fs::metadata(&initrd).unwrap().len() > 1024, "the initramfs is not empty");

    let image = dir.join(name);
    let _ = std::fs::remove_file(&image);
    std::fs::File::create(&image).unwrap().set_len(size_mib << 20).unwrap();
    run("mkfs.vfat", Command::new("mkfs.vfat").args(["-n", "DEPLOYED", "-i", "4d52434b"]).arg(&image));
    run("syslinux", Command::new("syslinux").arg("--install").arg(&image));
    let config = work.join("syslinux.cfg");
    std::fs::write(
        &config,
        "DEFAULT linux\nLABEL linux\n  KERNEL vmlinuz\n  APPEND initrd=initrd.img console=ttyS0 panic=-1\n",
    )
    .unwrap();
    let mut files: Vec<(String, PathBuf)> =
        vec![("vmlinuz".into(), kernel.to_path_buf()), ("initrd.img".into(), initrd), ("syslinux.cfg".into(), config)];
    for (extra_name, bytes) in extra {
        let path = work.join(extra_name);
        std::fs::write(&path, bytes).unwrap();
        files.push((extra_name.to_string(), path));
    }
    for (target, source) in files {
        run("mcopy", Command::new("mcopy").arg("-i").arg(&image).arg(&source).arg(format!("::{target}")));
    }
    std::fs::remove_dir_all(&work).unwrap();
    image
}

fn run(what: &str, command: &mut Command) {
    let output = command.output().unwrap_or_else(|e| panic!("{what} runs (scripts/test installs it): {e}"));
    assert_success(what, &output);
}
