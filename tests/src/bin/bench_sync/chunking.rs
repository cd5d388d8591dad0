//! Section 1, chunk + hash throughput: `imgtool chunk` against `b3sum` (all threads and one), page cache
//! warm, interleaved so a burst of load from another user of the machine hits all three alike.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use metalrack_tests::binaries::Binaries;

use crate::tools::{b3sum, run_tool, settle};

#[derive(Debug, Default)]
pub struct ChunkingSamples {
    pub imgtool: Vec<Duration>,
    pub b3sum: Vec<Duration>,
    pub b3sum_one_thread: Vec<Duration>,
    pub n_chunks: u64,
}

pub async fn measure_chunking(
    binaries: &Binaries,
    file: &Path,
    file_hash: &str,
    manifest: &Path,
    runs: usize,
) -> Result<ChunkingSamples> {
    // Warm the page cache (the file was just written, but make it explicit), untimed.
    b3sum(file, None).await?;
    let mut samples = ChunkingSamples::default();
    let args: [OsString; 4] = ["chunk".into(), file.into(), "-o".into(), manifest.into()];
    // Interleaved, so a burst of load from the other user of the machine hits all three alike.
    for _ in 0..runs {
        settle().await?;
        let (output, elapsed) = run_tool(&binaries.imgtool, &args).await?;
        samples.imgtool.push(elapsed);
        // "M: N chunks, B bytes (..), file hash H": the same BLAKE3 of the whole file as b3sum.
        let text = String::from_utf8_lossy(&output.stdout);
        ensure!(text.trim_end().ends_with(file_hash), "imgtool chunk's file hash differs from b3sum's: {text}");
        samples.n_chunks = text
            .split(": ")
            .nth(1)
            .and_then(|rest| rest.split(' ').next())
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("unexpected imgtool chunk output {text:?}"))?;
        samples.b3sum.push(b3sum(file, None).await?.1);
        samples.b3sum_one_thread.push(b3sum(file, Some(1)).await?.1);
    }
    Ok(samples)
}
