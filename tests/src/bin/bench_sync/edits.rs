//! The delta scenarios: (a) scattered 4 KiB blocks replaced, (b) bytes inserted; each makes
//! v2 from v1 with the harness's deterministic pseudo-random bytes.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;

use anyhow::{Context, Result};
use metalrack_tests::data::Random;

use crate::{INSERT_AT, MIB, SCATTERED_BLOCK, SCATTERED_FRACTION};

pub enum Edit {
    Scattered,
    Insert,
}

/// One delta scenario: its key in the table (`a`, `b`), its title, and the edit making v2.
pub struct Scenario {
    pub key: &'static str,
    pub title: String,
    pub make: Edit,
}

/// Scenario (a): `v1` with a random 5% of its aligned 4 KiB blocks replaced by new bytes.
pub fn scatter_blocks(v1: &Path, out: &Path, seed: u64) -> Result<()> {
    std::fs::copy(v1, out).with_context(|| format!("copying {} to {}", v1.display(), out.display()))?;
    let n_blocks = std::fs::metadata(v1)?.len() / SCATTERED_BLOCK;
    let n_changed = (n_blocks as f64 * SCATTERED_FRACTION).ceil() as u64;
    // A partial Fisher–Yates shuffle picks distinct blocks, spread uniformly over the file.
    let mut random = Random::new(seed);
    let mut blocks: Vec<u64> = (0..n_blocks).collect();
    for i in 0..n_changed {
        let j = i + random.next_u64() % (n_blocks - i);
        blocks.swap(i as usize, j as usize);
    }
    let mut changed = blocks[..n_changed as usize].to_vec();
    changed.sort_unstable();
    let file = std::fs::OpenOptions::new().write(true).open(out)?;
    let mut block = vec![0u8; SCATTERED_BLOCK as usize];
    for index in changed {
        random.fill(&mut block);
        file.write_all_at(&block, index * SCATTERED_BLOCK)?;
    }
    Ok(())
}

/// Scenario (b): `v1` with `len` new bytes inserted at `at`.
pub fn insert_bytes(v1: &Path, out: &Path, at: u64, len: u64, seed: u64) -> Result<()> {
    let mut input = BufReader::with_capacity(4 * MIB as usize, File::open(v1)?);
    let mut output = BufWriter::with_capacity(4 * MIB as usize, File::create(out)?);
    std::io::copy(&mut (&mut input).take(at), &mut output)?;
    let mut inserted = vec![0u8; len as usize];
    Random::new(seed).fill(&mut inserted);
    output.write_all(&inserted)?;
    std::io::copy(&mut input, &mut output)?;
    output.flush()?;
    Ok(())
}

/// Where (b) inserts: at 100 MiB, or mid-file in files too small for that.
pub fn insert_offset(size: u64) -> u64 {
    if size > 2 * INSERT_AT {
        INSERT_AT
    } else {
        size / 2
    }
}
