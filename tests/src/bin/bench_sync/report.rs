//! The report: medians of the samples as a Markdown table with ratios against the reference
//! tools, then every sample.

use std::fmt::Write as _;
use std::time::Duration;

use crate::chunking::ChunkingSamples;
use crate::peers::RsyncSample;
use crate::sync::{RackDeltaSample, SyncSample};
use crate::tools::HttpKind;
use crate::{GIB, MIB};

#[derive(Debug, Default)]
pub struct DeltaSamples {
    pub title: String,
    pub rack: Vec<RackDeltaSample>,
    pub rsync: Vec<RsyncSample>,
}

#[derive(Debug, Default)]
pub struct Report {
    pub size: u64,
    pub runs: usize,
    pub http_kind: HttpKind,
    /// Cores, memory, filesystem, tool versions, load at the start.
    pub machine: String,
    pub load_at_end: String,
    pub chunking: ChunkingSamples,
    pub push_v1_secs: f64,
    pub first_sync: Vec<SyncSample>,
    /// `zstd -3` of the whole v1.
    pub zstd3_bytes: u64,
    pub curl_null: Vec<Duration>,
    pub curl_file: Vec<Duration>,
    /// The same `curl -o FILE` runs with `sync FILE` after each: curl's time with the flush the
    /// rack pays.
    pub curl_file_flushed: Vec<Duration>,
    /// The box's busy time ([`metalrack_tests::bench::box_busy`]) over each first sync (from
    /// registering the rack to the file on its disk), over each `curl -o FILE`, and over each
    /// `curl -o FILE` with its `sync FILE`: what each way of getting the file costs in CPU, on a
    /// box whose two cores serve both ends.
    pub first_sync_busy: Vec<Duration>,
    pub curl_file_busy: Vec<Duration>,
    pub curl_file_flushed_busy: Vec<Duration>,
    /// The disk's write speed as the time for the whole file (`dd oflag=direct`): no flushed
    /// copy can be faster.
    pub disk_write: Vec<Duration>,
    pub deltas: Vec<DeltaSamples>,
}

pub fn median<T: Copy + PartialOrd>(values: impl IntoIterator<Item = T>) -> T {
    let mut values: Vec<T> = values.into_iter().collect();
    values.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    values[values.len() / 2]
}

pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// MiB/s for `bytes` in `seconds`.
pub fn rate(bytes: u64, seconds: f64) -> f64 {
    bytes as f64 / MIB as f64 / seconds
}

pub fn mib(bytes: u64) -> String {
    format!("{:.2} MiB", bytes as f64 / MIB as f64)
}

impl Report {
    pub fn to_markdown(&self) -> String {
        let mut out = String::new();
        self.write_markdown(&mut out).expect("writing to a String cannot fail");
        out
    }

    fn write_markdown(&self, out: &mut String) -> std::fmt::Result {
        let size = self.size;
        let c = &self.chunking;
        let (t_chunk, t_b3, t_b3_1) = if c.imgtool.is_empty() {
            (0.0, 0.0, 0.0) // not measured (--first-sync-only)
        } else {
            (
                median(c.imgtool.iter().map(|d| secs(*d))),
                median(c.b3sum.iter().map(|d| secs(*d))),
                median(c.b3sum_one_thread.iter().map(|d| secs(*d))),
            )
        };
        let server = match self.http_kind {
            HttpKind::Nginx => "nginx (sendfile on)",
            HttpKind::PythonHttpServer => "python3 -m http.server (nginx unavailable)",
        };
        writeln!(out, "\n## bench_sync: {} MiB image, medians of {} runs\n", size / MIB, self.runs)?;
        writeln!(out, "{}; load average at the end {}.\n", self.machine, self.load_at_end)?;
        writeln!(out, "Ratios are Metalrack / reference: for bytes and times below 1 is better, for throughput above 1 is better.\n")?;
        writeln!(out, "| # | Measurement | Metalrack | Reference | Ratio |")?;
        writeln!(out, "|---|---|---|---|---|")?;
        if !c.imgtool.is_empty() {
            writeln!(
            out,
            "| 1 | chunk + hash, warm cache | `imgtool chunk`: {t_chunk:.2} s, {:.0} MiB/s ({} chunks) | `b3sum`: {t_b3:.2} s, {:.0} MiB/s | {:.2}× throughput |",
            rate(size, t_chunk), c.n_chunks, rate(size, t_b3), t_b3 / t_chunk
        )?;
            writeln!(
            out,
            "| 1 | same, b3sum on one thread | | `b3sum --num-threads 1`: {t_b3_1:.2} s, {:.0} MiB/s | {:.2}× throughput |",
            rate(size, t_b3_1), t_b3_1 / t_chunk
        )?;
        }
        for (delta, key) in self.deltas.iter().zip(["2a", "2b"]) {
            let fetched = median(delta.rack.iter().map(|s| s.sync.figures.bytes_fetched));
            let protocol = median(delta.rack.iter().map(|s| s.protocol_bytes));
            let chunks = median(delta.rack.iter().map(|s| s.sync.figures.chunks_fetched));
            let reused = median(delta.rack.iter().map(|s| s.sync.figures.bytes_reused));
            let rsync_bytes = median(delta.rsync.iter().map(|s| s.bytes_sent + s.bytes_received));
            let literal = median(delta.rsync.iter().map(|s| s.literal));
            let duration = median(delta.rack.iter().map(|s| s.sync.figures.duration_ms)) as f64 / 1000.0;
            let wall = median(delta.rack.iter().map(|s| secs(s.sync.wall_from_start)));
            let wall_api = median(delta.rack.iter().map(|s| secs(s.sync.wall_to_api)));
            let rsync_wall = median(delta.rsync.iter().map(|s| secs(s.wall)));
            writeln!(
                out,
                "| {key} | {}: bytes on the wire | received + sent {} ({protocol} B: manifest delta, chunk deltas and frames, requests) for {} of new chunks ({fetched} B, {chunks} chunks; {} reused) | rsync sent + received {} ({rsync_bytes} B; literal data {}) | **{:.3}×** |",
                delta.title, mib(protocol), mib(fetched), mib(reused), mib(rsync_bytes), mib(literal),
                protocol as f64 / rsync_bytes as f64
            )?;
            writeln!(
                out,
                "| {key} | {}: wall time | `duration_ms` {duration:.2} s; commit → snapshot on rack disk {wall:.2} s (→ region API {wall_api:.2} s) | rsync {rsync_wall:.2} s | {:.2}× (commit → disk {:.2}×) |",
                delta.title, duration / rsync_wall, wall / rsync_wall
            )?;
        }
        let duration = median(self.first_sync.iter().map(|s| s.figures.duration_ms as f64 / 1000.0));
        let sync_rate = rate(size, duration);
        // The snapshot is published before the rack clears its fetched chunks; `duration_ms`
        // (and the region's view) include that clean-up, the file on disk does not.
        let published = median(self.first_sync.iter().map(|s| secs(s.wall_from_start)));
        let median_secs = |samples: &[Duration]| median(samples.iter().map(|d| secs(*d)));
        let (t_null, t_file, t_flushed) =
            (median_secs(&self.curl_null), median_secs(&self.curl_file), median_secs(&self.curl_file_flushed));
        writeln!(
            out,
            "| 3 | first sync | rack `duration_ms` {duration:.2} s, {sync_rate:.0} MiB/s (snapshot on disk after {published:.2} s, {:.0} MiB/s) | `curl -o /dev/null` from {server}: {t_null:.2} s, {:.0} MiB/s | {:.3}× throughput (to snapshot on disk {:.3}×) |",
            rate(size, published), rate(size, t_null), t_null / duration, t_null / published
        )?;
        writeln!(
            out,
            "| 3 | first sync, curl writing a file | | `curl -o FILE` (same disk, no fsync): {t_file:.2} s, {:.0} MiB/s | {:.3}× throughput |",
            rate(size, t_file), t_file / duration
        )?;
        writeln!(
            out,
            "| 3 | first sync, curl writing a file and flushing it | | `curl -o FILE`, then `sync FILE`: {t_flushed:.2} s, {:.0} MiB/s | {:.3}× throughput |",
            rate(size, t_flushed), t_flushed / duration
        )?;
        let gib = size as f64 / GIB as f64;
        let (busy_rack, busy_file, busy_flushed) = (
            median_secs(&self.first_sync_busy) / gib,
            median_secs(&self.curl_file_busy) / gib,
            median_secs(&self.curl_file_flushed_busy) / gib,
        );
        writeln!(
            out,
            "| 3 | first sync, CPU s per GiB of the whole box (medians; both ends share it) | rack + region {busy_rack:.2} | `curl -o FILE` + nginx {busy_file:.2}; with `sync FILE` {busy_flushed:.2} | {:.2}×; {:.2}× |",
            busy_file / busy_rack, busy_flushed / busy_rack
        )?;
        // Empty for a file smaller than one of `dd`'s blocks.
        if !self.disk_write.is_empty() {
            let t_disk = median_secs(&self.disk_write);
            writeln!(
                out,
                "| 3 | the disk: the best a flushing writer can reach against `curl -o FILE` | | `dd oflag=direct bs=64M` (the device's write speed): {t_disk:.2} s, {:.0} MiB/s | ≤ {:.3}× throughput |",
                rate(size, t_disk), t_file / t_disk
            )?;
        }
        let wire = median(self.first_sync.iter().map(|s| s.figures.bytes_received + s.figures.bytes_sent));
        writeln!(
            out,
            "| 3 | first sync, bytes on the wire | received + sent {} ({wire} B: manifest, chunk frames, requests) for {} | `zstd -3` of the file: {} ({} B) | **{:.3}×** |",
            mib(wire), mib(size), mib(self.zstd3_bytes), self.zstd3_bytes, wire as f64 / self.zstd3_bytes as f64
        )?;

        writeln!(out, "\n### Samples\n")?;
        let list = |values: &[f64]| values.iter().map(|v| format!("{v:.2}")).collect::<Vec<_>>().join(", ");
        let secs_of = |ds: &[Duration]| ds.iter().map(|d| secs(*d)).collect::<Vec<_>>();
        if !c.imgtool.is_empty() {
            writeln!(
                out,
                "- imgtool chunk s: {}; b3sum s: {}; b3sum 1 thread s: {}",
                list(&secs_of(&c.imgtool)),
                list(&secs_of(&c.b3sum)),
                list(&secs_of(&c.b3sum_one_thread))
            )?;
        }
        writeln!(out, "- push of v1 (chunk + upload of every chunk): {:.2} s", self.push_v1_secs)?;
        for s in &self.first_sync {
            let f = &s.figures;
            writeln!(
                out,
                "- first sync: duration_ms {}, {} chunks, {} B fetched, {} B received; rackd start → snapshot on disk {:.2} s, → region API {:.2} s",
                f.duration_ms, f.chunks_fetched, f.bytes_fetched, f.bytes_received, secs(s.wall_from_start), secs(s.wall_to_api)
            )?;
        }
        writeln!(
            out,
            "- curl -o /dev/null s: {}; curl -o FILE s: {}; the same, then sync FILE s: {}; dd oflag=direct s (for the whole file): {}",
            list(&secs_of(&self.curl_null)),
            list(&secs_of(&self.curl_file)),
            list(&secs_of(&self.curl_file_flushed)),
            list(&secs_of(&self.disk_write))
        )?;
        writeln!(
            out,
            "- box busy s: first syncs {}; curl -o FILE {}; the same with sync FILE {}",
            list(&secs_of(&self.first_sync_busy)),
            list(&secs_of(&self.curl_file_busy)),
            list(&secs_of(&self.curl_file_flushed_busy))
        )?;
        for (delta, key) in self.deltas.iter().zip(["2a", "2b"]) {
            for s in &delta.rack {
                let f = &s.sync.figures;
                writeln!(
                    out,
                    "- {key} rack: push {:.2} s; duration_ms {}; fetched {} B in {} chunks; reused {} B; on the wire {} B; commit → disk {:.2} s, → API {:.2} s",
                    secs(s.push), f.duration_ms, f.bytes_fetched, f.chunks_fetched, f.bytes_reused, s.protocol_bytes, secs(s.sync.wall_from_start), secs(s.sync.wall_to_api)
                )?;
            }
            for s in &delta.rsync {
                writeln!(
                    out,
                    "- {key} rsync: {:.2} s; sent {} B, received {} B, literal {} B",
                    secs(s.wall),
                    s.bytes_sent,
                    s.bytes_received,
                    s.literal
                )?;
            }
        }
        Ok(())
    }
}
