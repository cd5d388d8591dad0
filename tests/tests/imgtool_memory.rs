//! `imgtool`'s resident memory while it chunks a large image: the mapped file's pages are handed
//! back as the chunker passes them, so a push of a 10 GiB image does not show a 10 GiB resident
//! set (issue 12: "client RSS under 100 MiB extra").
//!
//! One test in its own binary on purpose: the peak is read with `getrusage(RUSAGE_CHILDREN)`,
//! the largest resident set of any child this process has waited for, so no other test may
//! start children here.

use std::process::Command;

use metalrack_tests::binary;
use metalrack_tests::data::write_random_file;
use nix::sys::resource::{getrusage, UsageWho};

const MIB: u64 = 1024 * 1024;

/// Large enough that a chunker keeping the whole mapping resident is far above the bound, small
/// enough to write in a second.
const IMAGE_BYTES: u64 = 256 * MIB;

#[test]
fn chunking_a_256_mib_image_keeps_imgtools_resident_set_under_a_quarter_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let image = dir.path().join("image.raw");
    write_random_file(&image, IMAGE_BYTES, 41, || Ok(())).unwrap();
    let manifest = dir.path().join("image.manifest");
    let before = getrusage(UsageWho::RUSAGE_CHILDREN).unwrap().max_rss();
    let output = Command::new(binary("imgtool")).arg("chunk").arg(&image).arg("-o").arg(&manifest).output().unwrap();
    assert!(output.status.success(), "imgtool chunk failed: {}", String::from_utf8_lossy(&output.stderr));
    assert!(manifest.metadata().unwrap().len() > 0, "no manifest written");
    // ru_maxrss is in KiB on Linux: the largest resident set of any waited-for child.
    let peak_kib = getrusage(UsageWho::RUSAGE_CHILDREN).unwrap().max_rss() as u64;
    assert!(before == 0, "another child ran in this test binary ({before} KiB): the reading would not be imgtool's");
    let bound_kib = IMAGE_BYTES / 4 / 1024;
    assert!(
        peak_kib < bound_kib,
        "imgtool chunk peaked at {} MiB resident for a {} MiB image (bound {} MiB): the mapping is kept resident",
        peak_kib / 1024,
        IMAGE_BYTES / MIB,
        bound_kib / 1024
    );
}
