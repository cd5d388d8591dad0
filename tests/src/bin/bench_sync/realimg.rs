//! `--debian full|small`: the update of a real Debian image (v1 → v2, built by
//! `metalrack_tests::debian_image` and cached by recipe) to a rack holding v1, Metalrack against
//! casync, `rsync --no-whole-file` and zsync: bytes on the wire and wall time, interleaved,
//! medians of `--runs`; and the first sync of v1 (bytes on the wire) against the whole file,
//! `zstd -3` of it and casync's first extract.
//!
//! The peers, each as its documentation has it, with defaults:
//! - casync: `casync make --store=S v2.caibx v2.img` (default chunk sizes 16/64/256 KiB, default
//!   zstd compression of the store's chunks), the index and store served by nginx; the client
//!   runs `casync extract --store=http://…/S --seed=v1.img http://…/v2.caibx OUT`.
//! - rsync: the rsync daemon of [`RsyncDaemon`], `rsync -I --no-whole-file` into a copy of v1.
//! - zsync: `zsyncmake -u v2.img -o v2.zsync v2.img` (default block size), served by nginx; the
//!   client runs `zsync -i v1.img -o OUT http://…/v2.zsync` (HTTP range requests).
//!
//! casync's and zsync's bytes are what nginx logged for their requests (`$bytes_sent` +
//! `$request_length`, HTTP headers included); rsync's are its `--stats`; Metalrack's are the
//! rack's own `last_sync` count (bodies only, without HTTP headers: a few KB per sync).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use metalrack_tests::bench::{free_bytes, load_average};
use metalrack_tests::debian_image::{build_or_reuse, recipe_key, DebianImages, Profile};
use metalrack_tests::process::Spawn;
use metalrack_tests::region::{Region, ANY_PORT};
use serde::Serialize;

use crate::peers::{HttpServer, RsyncDaemon, Served};
use crate::report::{median, mib};
use crate::sync::{delta_sync, drop_version, push, start_rack, wait_synced};
use crate::tools::{b3sum, check_tools, machine_summary, run_tool, run_tool_in, settle};
use crate::{note, zstd3_len, IMAGE, REGION_CONFIG};

/// Everything `--debian` takes.
#[derive(Debug)]
pub struct RealImageOptions {
    pub profile: Profile,
    /// Where the built images are kept between runs (one dir per recipe key).
    pub cache_dir: PathBuf,
    pub peers: Vec<Peer>,
    pub work_dir: PathBuf,
    pub runs: usize,
    /// A casync or zsync run still going after this is stopped and reported as unfinished (zsync
    /// can take very long on images with many identical blocks); that peer is not run again in
    /// that scenario.
    pub peer_timeout: Duration,
    /// Where to write the figures as JSON (the test in tests/tests/real_images.rs reads it).
    pub summary: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Peer {
    Casync,
    Rsync,
    Zsync,
}

impl Peer {
    pub const ALL: [Peer; 3] = [Peer::Casync, Peer::Rsync, Peer::Zsync];

    pub fn parse_list(text: &str) -> Result<Vec<Peer>> {
        let mut peers = Vec::new();
        for name in text.split(',') {
            peers.push(match name {
                "casync" => Peer::Casync,
                "rsync" => Peer::Rsync,
                "zsync" => Peer::Zsync,
                other => bail!("unknown peer {other:?} (casync, rsync, zsync)"),
            });
        }
        Ok(peers)
    }

    fn name(self) -> &'static str {
        match self {
            Peer::Casync => "casync",
            Peer::Rsync => "rsync --no-whole-file",
            Peer::Zsync => "zsync",
        }
    }
}

/// One transfer: bytes on the wire and wall time.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Sample {
    pub wire_bytes: u64,
    /// For HTTP peers: response bodies only (without request and response headers).
    pub body_bytes: u64,
    pub requests: u64,
    pub secs: f64,
    /// False when the peer was stopped at `--peer-timeout-s`: its bytes are what it had moved.
    pub finished: bool,
}

/// One update scenario's samples, in the order they were taken.
#[derive(Debug, Default, Serialize)]
pub struct Scenario {
    pub key: String,
    pub title: String,
    pub metalrack: Vec<Sample>,
    /// Metalrack's chunk data and counts of the median run, for the report.
    pub metalrack_detail: String,
    pub peers: BTreeMap<Peer, Vec<Sample>>,
}

#[derive(Debug, Default, Serialize)]
pub struct Summary {
    pub profile: String,
    pub recipe_key: String,
    pub v1_bytes: u64,
    pub v1_zstd3_bytes: u64,
    pub first_sync_metalrack_bytes: u64,
    pub first_sync_metalrack_secs: f64,
    pub first_sync_casync: Option<Sample>,
    pub scenarios: Vec<Scenario>,
    pub load_at_start: String,
    pub load_at_end: String,
}

pub async fn run(options: &RealImageOptions) -> Result<String> {
    // Checked first, so that a missing build fails before minutes of image building.
    metalrack_tests::binaries::Binaries::locate()?;
    let http_kind = check_tools()?;
    let needs_http = options.peers.iter().any(|p| matches!(p, Peer::Casync | Peer::Zsync));
    ensure!(
        !needs_http || http_kind == crate::tools::HttpKind::Nginx,
        "--debian counts casync's and zsync's bytes from nginx's log: apt-get install nginx-light"
    );
    for (peer, program, install) in [(Peer::Casync, "casync", "casync"), (Peer::Zsync, "zsync", "zsync")] {
        if options.peers.contains(&peer) {
            let found = std::process::Command::new(program).arg("--help").output().is_ok();
            ensure!(found, "{program} is not installed: apt-get install {install}");
        }
    }
    let load_at_start = load_average();

    note(&format!(
        "Debian images ({}, recipe key {}) from {}",
        options.profile.name(),
        recipe_key(options.profile),
        options.cache_dir.display()
    ));
    let (profile, cache) = (options.profile, options.cache_dir.clone());
    let images: DebianImages = tokio::task::spawn_blocking(move || {
        std::fs::create_dir_all(&cache)?;
        build_or_reuse(profile, &cache)
    })
    .await??;
    let size = std::fs::metadata(&images.v1)?.len();

    // Peak use: the region's store (both versions' distinct chunks), the rack's v1 and v2,
    // rsync's copy of v1 and its temp file, one peer's output, casync's store; images are sparse
    // where zeros, copies may not be.
    let needed = 8 * size;
    let free = free_bytes(&options.work_dir)?;
    ensure!(
        free >= needed,
        "{} has {} MiB free; needs about {} MiB",
        options.work_dir.display(),
        free >> 20,
        needed >> 20
    );
    let work = tempfile::Builder::new().prefix("bench-realimg.").tempdir_in(&options.work_dir)?;
    let w = work.path();
    let machine = machine_summary(w, http_kind);

    let mut scenarios = vec![("fresh", "v2's tree in a fresh file system (`mke2fs -d`)", images.v2.clone())];
    if let Some(in_place) = &images.v2_in_place {
        scenarios.push(("inplace", "v2's tree copied over v1's file system in place (fuse2fs)", in_place.clone()));
    }
    let v1 = &images.v1;
    let v1_hash = b3sum(v1, None).await?.0;
    let mut summary = Summary {
        profile: options.profile.name().into(),
        recipe_key: recipe_key(options.profile),
        v1_bytes: size,
        v1_zstd3_bytes: zstd3_len(v1)?,
        load_at_start,
        ..Summary::default()
    };

    // The peers' servers: nginx over www/ (casync's store and indexes, zsync's files), the
    // rsync daemon with a module per scenario.
    let www = w.join("www");
    std::fs::create_dir_all(www.join("casync"))?;
    std::fs::create_dir_all(www.join("zsync"))?;
    let keys: Vec<&str> = scenarios.iter().map(|(key, _, _)| *key).collect();
    let rsyncd = RsyncDaemon::start(w, &keys).await?;
    let mut http = match needs_http {
        true => Some(HttpServer::start_logged(&w.join("nginx"), &www).await?),
        false => None,
    };
    let store = www.join("casync/store.castr");
    let mut v2_hashes = Vec::new();
    for (key, _, v2) in &scenarios {
        v2_hashes.push(b3sum(v2, None).await?.0);
        if options.peers.contains(&Peer::Rsync) {
            link_or_copy(v2, &rsyncd.source_file(key))?;
        }
        if options.peers.contains(&Peer::Casync) {
            note(&format!("casync make of {key}"));
            casync_make(&store, &www.join(format!("casync/{key}.caibx")), v2).await?;
        }
        if options.peers.contains(&Peer::Zsync) {
            note(&format!("zsyncmake of {key}"));
            let served = www.join(format!("zsync/{key}.img"));
            link_or_copy(v2, &served)?;
            let args: Vec<OsString> = vec![
                "-u".into(),
                format!("{key}.img").into(),
                "-o".into(),
                www.join(format!("zsync/{key}.zsync")).into(),
                served.into(),
            ];
            run_tool(Path::new("zsyncmake"), &args).await?;
        }
    }

    // First sync of v1: Metalrack, and casync's first extract (no seed).
    let region = Region::launch(&w.join("region"), REGION_CONFIG, ANY_PORT, &[], Spawn::default())?;
    let api = region.api(&region.add_admin("bench", "bench password 1")?);
    let secret = region.shared_secret()?;
    note("push of v1, first sync");
    push(&region, &api.key, v1, "1").await?;
    settle().await?;
    let rack = start_rack(&region, &api, &secret, w, "bench").await?;
    let first = wait_synced(&api, &rack, &rack.snapshot_file(IMAGE, "1", "root-disk"), &v1_hash, size).await?;
    summary.first_sync_metalrack_bytes = first.figures.bytes_received + first.figures.bytes_sent;
    summary.first_sync_metalrack_secs = first.wall_from_start.as_secs_f64();
    note(&format!(
        "  Metalrack first sync: {} B, {:.2} s",
        summary.first_sync_metalrack_bytes, summary.first_sync_metalrack_secs
    ));
    if options.peers.contains(&Peer::Casync) {
        casync_make(&store, &www.join("casync/v1.caibx"), v1).await?;
        let out = w.join("casync-first.img");
        let http = http.as_mut().context("nginx runs for casync")?;
        let sample = casync_extract(http, &out, None, "v1", &v1_hash, options.peer_timeout).await?;
        note(&format!("  casync first extract: {sample:?}"));
        summary.first_sync_casync = Some(sample);
    }

    // The update, interleaved: each run rotates the order, so no tool always goes first.
    for ((key, title, v2), v2_hash) in scenarios.iter().zip(&v2_hashes) {
        let mut scenario = Scenario { key: (*key).into(), title: (*title).into(), ..Scenario::default() };
        let mut details = Vec::new();
        for run in 0..options.runs {
            let mut order: Vec<Option<Peer>> =
                std::iter::once(None).chain(options.peers.iter().copied().map(Some)).collect();
            let n = order.len();
            order.rotate_left(run % n);
            for who in order {
                let gave_up = |peer: Peer| scenario.peers.get(&peer).is_some_and(|s| s.iter().any(|s| !s.finished));
                if who.is_some_and(gave_up) {
                    continue;
                }
                let sample = match who {
                    None => {
                        note(&format!("{key} run {}: Metalrack", run + 1));
                        let version = format!("{key}-{}", run + 1);
                        let sample = delta_sync(&region, &api, &rack, v2, v2_hash, &version).await?;
                        // The rack's file is v2, byte for byte (the rack checked it too).
                        let file = rack.snapshot_file(IMAGE, &version, "root-disk");
                        let got = b3sum(&file, None).await?.0;
                        ensure!(&got == v2_hash, "the rack's {} hashes to {got}, not v2's {v2_hash}", file.display());
                        let f = &sample.sync.figures;
                        details.push((
                            sample.protocol_bytes,
                            format!(
                                "{} of new chunks ({} chunks, {} B), {} reused, `duration_ms` {}",
                                mib(f.bytes_fetched),
                                f.chunks_fetched,
                                f.bytes_fetched,
                                mib(f.bytes_reused),
                                f.duration_ms
                            ),
                        ));
                        drop_version(&api, &rack, &version, &v1_hash, size).await?;
                        let sample = Sample {
                            wire_bytes: sample.protocol_bytes,
                            body_bytes: sample.protocol_bytes,
                            requests: 0,
                            secs: sample.sync.wall_from_start.as_secs_f64(),
                            finished: true,
                        };
                        note(&format!("  Metalrack: {sample:?}; {}", details.last().map_or("", |d| d.1.as_str())));
                        scenario.metalrack.push(sample);
                        continue;
                    }
                    Some(Peer::Rsync) => {
                        note(&format!("{key} run {}: rsync", run + 1));
                        let s = rsyncd.pull(key, v1, v2_hash, true).await?;
                        let bytes = s.bytes_sent + s.bytes_received;
                        (
                            Peer::Rsync,
                            Sample {
                                wire_bytes: bytes,
                                body_bytes: bytes,
                                requests: 1,
                                secs: s.wall.as_secs_f64(),
                                finished: true,
                            },
                        )
                    }
                    Some(Peer::Casync) => {
                        note(&format!("{key} run {}: casync", run + 1));
                        let out = w.join("casync-out.img");
                        let http = http.as_mut().context("nginx runs for casync")?;
                        (Peer::Casync, casync_extract(http, &out, Some(v1), key, v2_hash, options.peer_timeout).await?)
                    }
                    Some(Peer::Zsync) => {
                        note(&format!("{key} run {}: zsync", run + 1));
                        let http = http.as_mut().context("nginx runs for zsync")?;
                        (Peer::Zsync, zsync(http, w, v1, key, v2_hash, options.peer_timeout).await?)
                    }
                };
                // Each sample as it comes, so that an interrupted run still leaves its figures.
                note(&format!("  {}: {:?}", sample.0.name(), sample.1));
                scenario.peers.entry(sample.0).or_default().push(sample.1);
            }
        }
        details.sort_by_key(|(bytes, _)| *bytes);
        scenario.metalrack_detail = details.get(details.len() / 2).map(|(_, d)| d.clone()).unwrap_or_default();
        summary.scenarios.push(scenario);
    }
    drop((rsyncd, http, rack, region));
    summary.load_at_end = load_average();
    if let Some(path) = &options.summary {
        std::fs::write(path, serde_json::to_vec_pretty(&summary)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    let table = to_markdown(&summary, &images, &machine, options.runs);
    work.close().context("removing the work dir")?;
    Ok(table)
}

/// `dest` as a hard link to `source` (same bytes, no disk), or a copy across file systems.
fn link_or_copy(source: &Path, dest: &Path) -> Result<()> {
    if let Some(dir) = dest.parent() {
        std::fs::create_dir_all(dir)?;
    }
    if std::fs::hard_link(source, dest).is_err() {
        std::fs::copy(source, dest).with_context(|| format!("copying {} to {}", source.display(), dest.display()))?;
    }
    Ok(())
}

async fn casync_make(store: &Path, index: &Path, file: &Path) -> Result<()> {
    let args: Vec<OsString> =
        vec!["make".into(), format!("--store={}", store.display()).into(), index.into(), file.into()];
    run_tool(Path::new("casync"), &args).await.map(|_| ())
}

/// `casync extract` of index `key` from nginx into `out` (seeded with `seed`), timed; checks the
/// result's hash and removes it.
async fn casync_extract(
    http: &mut HttpServer,
    out: &Path,
    seed: Option<&Path>,
    key: &str,
    hash: &str,
    deadline: Duration,
) -> Result<Sample> {
    let _ = std::fs::remove_file(out);
    let mut args: Vec<OsString> = vec!["extract".into(), format!("--store={}", http.url("casync/store.castr")).into()];
    if let Some(seed) = seed {
        args.push(format!("--seed={}", seed.display()).into());
    }
    args.push(http.url(&format!("casync/{key}.caibx")).into());
    args.push(out.into());
    http.served()?;
    settle().await?;
    let Ok(result) = tokio::time::timeout(deadline, run_tool(Path::new("casync"), &args)).await else {
        // Dropping the run killed casync.
        let _ = std::fs::remove_file(out);
        return Ok(http_sample(http.served()?, deadline, false));
    };
    let (_, wall) = result?;
    let served = http.served()?;
    check_and_remove(out, hash, "casync").await?;
    Ok(http_sample(served, wall, true))
}

/// `zsync -i v1 -o OUT http://…/KEY.zsync`, timed; checks the result's hash and removes it.
async fn zsync(
    http: &mut HttpServer,
    work: &Path,
    v1: &Path,
    key: &str,
    hash: &str,
    deadline: Duration,
) -> Result<Sample> {
    let out = work.join("zsync-out.img");
    let _ = std::fs::remove_file(&out);
    let args: Vec<OsString> = vec![
        "-q".into(),
        "-i".into(),
        v1.into(),
        "-o".into(),
        (&out).into(),
        http.url(&format!("zsync/{key}.zsync")).into(),
    ];
    http.served()?;
    settle().await?;
    // zsync builds the file in an `rcksum-XXXXXX` temp file in its current dir: the work dir.
    let run = run_tool_in(Some(work), Path::new("zsync"), &args);
    let Ok(result) = tokio::time::timeout(deadline, run).await else {
        // Dropping the run killed zsync; its temp file is left in the work dir, removed at the end.
        return Ok(http_sample(http.served()?, deadline, false));
    };
    let (_, wall) = result?;
    let served = http.served()?;
    check_and_remove(&out, hash, "zsync").await?;
    // zsync keeps the output's previous contents as OUT.zs-old when OUT existed; it did not.
    let _ = std::fs::remove_file(work.join("zsync-out.img.zs-old"));
    Ok(http_sample(served, wall, true))
}

fn http_sample(served: Served, wall: Duration, finished: bool) -> Sample {
    Sample {
        wire_bytes: served.wire_bytes(),
        body_bytes: served.body_bytes_sent,
        requests: served.requests,
        secs: wall.as_secs_f64(),
        finished,
    }
}

async fn check_and_remove(file: &Path, hash: &str, who: &str) -> Result<()> {
    let got = b3sum(file, None).await?.0;
    ensure!(got == hash, "{who}'s result {} hashes to {got}, not {hash}", file.display());
    std::fs::remove_file(file)?;
    Ok(())
}

fn to_markdown(summary: &Summary, images: &DebianImages, machine: &str, runs: usize) -> String {
    let mut out = String::new();
    let size = summary.v1_bytes;
    let _ = writeln!(out, "\n## bench_sync --debian {}: real Debian images, medians of {runs} runs\n", summary.profile);
    let _ = writeln!(
        out,
        "{machine}; load average at the end {}. Images: {} (recipe key {}), {} each.\n",
        summary.load_at_end,
        images.dir.display(),
        summary.recipe_key,
        mib(size)
    );
    let changed = std::fs::read_to_string(images.dir.join("tree-diff.txt")).map_or(0, |t| t.lines().count());
    let tree_bytes = std::fs::read_to_string(images.dir.join("tree-bytes.txt")).unwrap_or_default();
    let _ = writeln!(
        out,
        "v1 → v2: {changed} paths differ between the trees (`diff -rq`); tree bytes v1, v2: {}.\n",
        tree_bytes.split_whitespace().collect::<Vec<_>>().join(", ")
    );
    let _ = writeln!(out, "First sync of v1, bytes on the wire:\n");
    let _ = writeln!(out, "| | bytes | vs Metalrack |\n|---|---:|---:|");
    let m = summary.first_sync_metalrack_bytes;
    let _ = writeln!(
        out,
        "| Metalrack (rack's received + sent; {:.2} s) | {} ({m} B) | 1 |",
        summary.first_sync_metalrack_secs,
        mib(m)
    );
    let _ = writeln!(out, "| the whole file | {} | {:.3}× |", mib(size), m as f64 / size as f64);
    let z = summary.v1_zstd3_bytes;
    let _ = writeln!(out, "| `zstd -3` of the file | {} ({z} B) | {:.3}× |", mib(z), m as f64 / z as f64);
    if let Some(c) = summary.first_sync_casync {
        let _ = writeln!(
            out,
            "| casync extract, no seed ({} requests, {:.2} s) | {} ({} B) | {:.3}× |",
            c.requests,
            c.secs,
            mib(c.wire_bytes),
            c.wire_bytes,
            m as f64 / c.wire_bytes as f64
        );
    }
    for scenario in &summary.scenarios {
        let _ = writeln!(
            out,
            "\nUpdate v1 → v2, {}: ratios are Metalrack / peer (below 1: Metalrack better).\n",
            scenario.title
        );
        let _ = writeln!(
            out,
            "| | bytes on the wire (median) | time (median) | bytes ratio | time ratio |\n|---|---:|---:|---:|---:|"
        );
        let mb = median(scenario.metalrack.iter().map(|s| s.wire_bytes));
        let mt = median(scenario.metalrack.iter().map(|s| s.secs));
        let _ = writeln!(
            out,
            "| Metalrack (commit → file in the rack's snapshot) | {} ({mb} B) | {mt:.2} s | | |",
            mib(mb)
        );
        for (peer, samples) in &scenario.peers {
            if let Some(cut) = samples.iter().find(|s| !s.finished) {
                let _ = writeln!(
                    out,
                    "| {} | did not finish: {} ({} B) moved when stopped | > {:.0} s (stopped) | n/a | **< {:.2}×** |",
                    peer.name(),
                    mib(cut.wire_bytes),
                    cut.wire_bytes,
                    cut.secs,
                    mt / cut.secs
                );
                continue;
            }
            let pb = median(samples.iter().map(|s| s.wire_bytes));
            let pt = median(samples.iter().map(|s| s.secs));
            let _ = writeln!(
                out,
                "| {} | {} ({pb} B) | {pt:.2} s | **{:.3}×** | **{:.2}×** |",
                peer.name(),
                mib(pb),
                mb as f64 / pb as f64,
                mt / pt
            );
        }
        // A peer stopped unfinished counts as slower; its bytes are not comparable (not met).
        let fewer = scenario
            .peers
            .values()
            .all(|s| s.iter().all(|s| s.finished) && mb < median(s.iter().map(|s| s.wire_bytes)));
        let not_slower = scenario.peers.values().all(|s| mt <= median(s.iter().map(|s| s.secs)));
        let verdict = |met: bool| if met { "met" } else { "**not met**" };
        let _ = writeln!(
            out,
            "\nGoal: fewer bytes than every peer: {}; not slower than any: {}. Metalrack's run with the median bytes: {}.\n",
            verdict(fewer),
            verdict(not_slower),
            scenario.metalrack_detail
        );
        let list = |samples: &[Sample]| {
            samples
                .iter()
                .map(|s| {
                    format!("{} B / {} B bodies / {} req / {:.2} s", s.wire_bytes, s.body_bytes, s.requests, s.secs)
                })
                .collect::<Vec<_>>()
                .join("; ")
        };
        let _ = writeln!(out, "- Metalrack samples: {}", list(&scenario.metalrack));
        for (peer, samples) in &scenario.peers {
            let _ = writeln!(out, "- {} samples: {}", peer.name(), list(samples));
        }
    }
    out
}
