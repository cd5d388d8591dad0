//! End to end: `imgtool push` into the region's catalogue, racks syncing it by chunks, policies,
//! faults (damaged chunks, kill -9 mid-sync), garbage collection and bad uploads.

use std::path::{Path, PathBuf};
use std::time::Duration;

use metalrack_api::images::{ImageView, SyncPhase, SyncPolicy, SyncPolicyKind};
use metalrack_api::{RackState, RackView};
use metalrack_image_tools::chunker::{chunk_file, ChunkerConfig};
use metalrack_image_tools::diff::diff;
use metalrack_image_tools::Hash;
use metalrack_tests::{compressible_bytes, random_bytes, stderr, wait_for, Rack, Region, DEADLINE, FAST_REGION_CONFIG};
use reqwest::StatusCode;

/// Region settings: fast heartbeats, and a chunk-batch limit (1 MiB) far below the test files,
/// so every push must stream in many requests.
fn region_config() -> String {
    format!("{FAST_REGION_CONFIG}upload_batch_bytes_max = 1048576\n")
}

fn push_ok(region: &Region, api_key: &str, file: &Path, name: &str, version: &str) -> String {
    region.push(api_key, file, name, "root-disk", version)
}

fn file_hash(path: &Path) -> String {
    Hash::of(&std::fs::read(path).unwrap()).to_hex()
}

fn snapshot_file(rack: &Rack, name: &str, version: &str) -> PathBuf {
    rack.snapshot_file(name, version, "root-disk")
}

async fn set_policy(region: &Region, api_key: &str, rack_id: &str, policy: &SyncPolicy) {
    region.api(api_key).set_sync_policy(rack_id, policy).await.unwrap();
}

async fn rack_view(region: &Region, api_key: &str, name: &str) -> RackView {
    region.api(api_key).rack(name).await.unwrap()
}

/// Waits until the rack is idle and the region shows it serving `file_hash`'s version.
async fn wait_synced(region: &Region, api_key: &str, rack: &str, file_hash: &str) -> RackView {
    wait_for(&format!("{rack} to sync {}", &file_hash[..12]), DEADLINE, || async {
        // The Images view first: once it shows the file served, the heartbeat that named the
        // new snapshot (and carried its figures) is in, so the rack view read after it has them.
        let serves = region.api(api_key).rack_serves_file(rack, file_hash).await.unwrap();
        let view = rack_view(region, api_key, rack).await;
        let idle = view.sync.as_ref().is_some_and(|s| s.phase == SyncPhase::Idle);
        (serves && idle).then_some(view)
    })
    .await
}

async fn start_racks(region: &Region, api_key: &str, root: &Path, names: &[&str], policy: &SyncPolicy) -> Vec<Rack> {
    let secret = region.secret();
    let mut racks = Vec::new();
    for name in names {
        let mut rack = Rack::new(root, name);
        rack.register_ok(&region.url, &secret);
        let id = rack_view(region, api_key, name).await.id;
        set_policy(region, api_key, &id, policy).await;
        rack.serve();
        region.wait_rack_state(api_key, name, RackState::Online).await;
        racks.push(rack);
    }
    racks
}

/// `now` plus `minutes` as the `HH:MM` of a sync window (wrapping at midnight).
fn hhmm(now: &jiff::Zoned, minutes: i64) -> String {
    let m = (now.hour() as i64 * 60 + now.minute() as i64 + minutes).rem_euclid(24 * 60);
    format!("{:02}:{:02}", m / 60, m % 60)
}

fn auto(delay_ms: u64) -> SyncPolicy {
    SyncPolicy { policy: SyncPolicyKind::Auto, delay_ms, ..SyncPolicy::default() }
}

#[tokio::test]
async fn two_racks_sync_identical_snapshots_and_a_delta_moves_only_new_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start_with_config(&dir.path().join("region"), &region_config());
    let api_key = region.create_admin("admin", "correct horse battery");
    let racks = start_racks(&region, &api_key, dir.path(), &["r1", "r2"], &auto(100)).await;

    // v1: 12 MiB, twelve times the region's request body limit.
    let v1 = dir.path().join("v1.img");
    std::fs::write(&v1, random_bytes(12 << 20, 1)).unwrap();
    let out = push_ok(&region, &api_key, &v1, "ubuntu/jammy", "1");
    assert!(out.contains("committed"), "{out}");
    // The summary says where the time went, for an operator wondering why a push is slow.
    for phase in ["(chunking ", ", sending ", ", commit "] {
        assert!(out.contains(phase), "no {phase:?} in the push's summary: {out}");
    }
    let v1_hash = file_hash(&v1);
    for rack in &racks {
        wait_synced(&region, &api_key, &rack.name, &v1_hash).await;
        assert_eq!(file_hash(&snapshot_file(rack, "ubuntu/jammy", "1")), v1_hash, "{} holds v1 exactly", rack.name);
    }

    // v2: 4 KiB changed in the middle. The rack fetches exactly the chunks v1 lacks.
    let mut bytes = std::fs::read(&v1).unwrap();
    bytes[5 << 20..(5 << 20) + 4096].copy_from_slice(&random_bytes(4096, 2));
    let v2 = dir.path().join("v2.img");
    std::fs::write(&v2, &bytes).unwrap();
    let v2_hash = file_hash(&v2);
    let config = ChunkerConfig::default();
    let delta = diff(&chunk_file(&v1, config, |_| {}).unwrap(), &chunk_file(&v2, config, |_| {}).unwrap());
    assert!(delta.bytes_to_move > 0 && delta.bytes_to_move < 1 << 20, "{delta:?}");
    let out = push_ok(&region, &api_key, &v2, "ubuntu/jammy", "2");
    assert!(out.contains(&format!("{} bytes sent", delta.bytes_to_move)), "only new chunks are uploaded: {out}");
    for rack in &racks {
        let view = wait_synced(&region, &api_key, &rack.name, &v2_hash).await;
        let last = view.sync.unwrap().last_sync.unwrap();
        assert_eq!(last.bytes_fetched, delta.bytes_to_move, "{}: only new chunks cross the network", rack.name);
        // ...and they cross it as a delta against the v1 chunks at the same place, with the
        // manifest as a delta against v1's: about the 4 KiB that changed, not whole chunks.
        assert!(
            last.bytes_received < 6 << 10 && last.bytes_received * 4 < delta.bytes_to_move,
            "{}: {} bytes received for {} bytes of new chunks",
            rack.name,
            last.bytes_received,
            delta.bytes_to_move
        );
        assert!(last.bytes_sent > 0 && last.bytes_sent < 1024, "{last:?}");
        assert!(last.bytes_reused >= (12 << 20) - delta.bytes_to_move - (256 << 10), "{last:?}");
        assert_eq!(file_hash(&snapshot_file(rack, "ubuntu/jammy", "2")), v2_hash);
        assert_eq!(file_hash(&snapshot_file(rack, "ubuntu/jammy", "1")), v1_hash, "v1 stays in the snapshot");
    }

    // The Images API shows both versions synced on both racks.
    let images = region.api(&api_key).images().await.unwrap();
    assert_eq!(images.len(), 1);
    assert_eq!(images[0].versions.len(), 2);
    for version in &images[0].versions {
        assert_eq!(version.size_bytes, 12 << 20);
        assert!(
            version.racks.iter().all(|r| r.status == metalrack_api::images::VersionSyncStatus::Synced),
            "{version:?}"
        );
    }

    // Deleting v1 reclaims the chunks only it used; racks drop it from their snapshots.
    let image_id = &images[0].id;
    let response = region
        .api(&api_key)
        .request(reqwest::Method::DELETE, &format!("/images/{image_id}/versions/1"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let deleted: metalrack_api::images::DeleteVersionResponse = response.json().await.unwrap();
    assert!(deleted.reclaimed_bytes > 0 && deleted.reclaimed_bytes < 1 << 20, "{deleted:?}");
    for rack in &racks {
        wait_for("v1 gone from the rack", DEADLINE, || async {
            (!snapshot_file(rack, "ubuntu/jammy", "1").exists()).then_some(())
        })
        .await;
        assert_eq!(file_hash(&snapshot_file(rack, "ubuntu/jammy", "2")), v2_hash);
    }
}

#[tokio::test]
async fn damaged_chunks_in_transit_are_detected_and_refetched() {
    let last = sync_with_three_chunks_damaged_in_transit(random_bytes(3 << 20, 7)).await;
    assert_eq!(last.chunks_refetched, 3);
}

/// A region that damages the first three chunks it sends, one rack, an image of `bytes` pushed:
/// returns the rack's sync once its copy holds the image (checked by hash).
async fn sync_with_three_chunks_damaged_in_transit(bytes: Vec<u8>) -> metalrack_api::images::SyncFigures {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start_with_env(
        &dir.path().join("region"),
        &region_config(),
        &[("METALRACK_FAULT_CORRUPT_CHUNKS", "3")],
    );
    let api_key = region.create_admin("admin", "correct horse battery");
    let racks = start_racks(&region, &api_key, dir.path(), &["r1"], &auto(0)).await;
    let image = dir.path().join("img");
    std::fs::write(&image, bytes).unwrap();
    push_ok(&region, &api_key, &image, "custom/damaged", "1");
    let view = wait_synced(&region, &api_key, "r1", &file_hash(&image)).await;
    assert_eq!(file_hash(&snapshot_file(&racks[0], "custom/damaged", "1")), file_hash(&image));
    view.sync.unwrap().last_sync.unwrap()
}

#[tokio::test]
async fn a_compressible_image_crosses_the_network_compressed_and_random_data_raw() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start_with_config(&dir.path().join("region"), &region_config());
    let api_key = region.create_admin("admin", "correct horse battery");
    let racks = start_racks(&region, &api_key, dir.path(), &["r1"], &auto(0)).await;

    // A pushed image whose chunks compress: the first sync moves the compressed copies.
    let text = dir.path().join("text.img");
    let bytes = compressible_bytes(6 << 20, 11);
    let zstd_len = zstd::bulk::compress(&bytes, 3).unwrap().len() as u64;
    std::fs::write(&text, &bytes).unwrap();
    push_ok(&region, &api_key, &text, "custom/text", "1");
    let view = wait_synced(&region, &api_key, "r1", &file_hash(&text)).await;
    let last = view.sync.unwrap().last_sync.unwrap();
    assert_eq!(last.bytes_fetched, 6 << 20, "{last:?}");
    assert!(
        last.bytes_received * 2 < last.bytes_fetched && last.bytes_received as f64 <= zstd_len as f64 * 1.1,
        "{} bytes received for {} bytes of chunks (zstd -3 of the file: {zstd_len})",
        last.bytes_received,
        last.bytes_fetched
    );
    assert_eq!(file_hash(&snapshot_file(&racks[0], "custom/text", "1")), file_hash(&text), "the rack's copy verifies");

    // Random data moves raw: the chunks, a frame header and tag each, and the manifest.
    let random = dir.path().join("random.img");
    std::fs::write(&random, random_bytes(3 << 20, 12)).unwrap();
    push_ok(&region, &api_key, &random, "custom/random", "1");
    let view = wait_synced(&region, &api_key, "r1", &file_hash(&random)).await;
    let last = view.sync.unwrap().last_sync.unwrap();
    assert_eq!(last.bytes_fetched, 3 << 20, "{last:?}");
    let overhead = last.bytes_received - last.bytes_fetched;
    assert!(overhead < 8 << 10, "{} bytes received for {} of chunks", last.bytes_received, last.bytes_fetched);
    assert_eq!(file_hash(&snapshot_file(&racks[0], "custom/random", "1")), file_hash(&random));
}

#[tokio::test]
async fn damaged_compressed_chunks_in_transit_are_detected_and_refetched() {
    let last = sync_with_three_chunks_damaged_in_transit(compressible_bytes(3 << 20, 13)).await;
    assert_eq!(last.chunks_refetched, 3);
    assert!(last.bytes_received * 2 < last.bytes_fetched, "the chunks came compressed: {last:?}");
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(
                    |e| {
                        if e.path().is_dir() {
                            dir_bytes(&e.path())
                        } else {
                            e.metadata().map(|m| m.len()).unwrap_or(0)
                        }
                    },
                )
                .sum()
        })
        .unwrap_or(0)
}

#[tokio::test]
async fn kill_9_mid_sync_publishes_nothing_half_done_and_resumes_without_refetching() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start_with_config(&dir.path().join("region"), &region_config());
    let api_key = region.create_admin("admin", "correct horse battery");
    // 8 MiB at 2 MiB/s: about four seconds of sync to interrupt.
    let policy = SyncPolicy { bandwidth_bytes_per_s: 2 << 20, ..auto(0) };
    let mut racks = start_racks(&region, &api_key, dir.path(), &["r1"], &policy).await;
    let image = dir.path().join("img");
    std::fs::write(&image, random_bytes(8 << 20, 11)).unwrap();
    let image_hash = file_hash(&image);
    push_ok(&region, &api_key, &image, "custom/big", "1");

    // Chunks land in the partial file as they arrive; the progress log lists them (4 bytes each).
    let progress = racks[0].data_dir.join(format!("images/files/.{image_hash}.progress"));
    let chunks_logged = || std::fs::metadata(&progress).map(|m| m.len() / 4).unwrap_or(0);
    wait_for("some chunks fetched", DEADLINE, || async { (chunks_logged() >= 24).then_some(()) }).await;
    racks[0].daemon.as_mut().unwrap().kill();
    let manifest = chunk_file(&image, ChunkerConfig::default(), |_| {}).unwrap();
    let logged = std::fs::read(&progress).unwrap();
    let fetched_before_kill: u64 = logged
        .chunks_exact(4)
        .map(|e| u64::from(manifest.chunks[u32::from_le_bytes(e.try_into().unwrap()) as usize].len))
        .sum();
    assert!((1 << 20..8 << 20).contains(&fetched_before_kill), "killed mid-sync: {fetched_before_kill}");
    assert!(!snapshot_file(&racks[0], "custom/big", "1").exists(), "nothing half done is published");

    racks[0].serve();
    let view = wait_synced(&region, &api_key, "r1", &image_hash).await;
    let last = view.sync.unwrap().last_sync.unwrap();
    assert!(
        last.bytes_fetched + fetched_before_kill <= (8 << 20) + (512 << 10),
        "verified chunks are not fetched again: {} after restart, {} before",
        last.bytes_fetched,
        fetched_before_kill
    );
    assert_eq!(file_hash(&snapshot_file(&racks[0], "custom/big", "1")), image_hash);
    assert!(!progress.exists(), "the partial file's log is gone once the file is published");
}

#[tokio::test]
async fn window_and_manual_policies_sync_only_when_allowed() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start_with_config(&dir.path().join("region"), &region_config());
    let api_key = region.create_admin("admin", "correct horse battery");
    let now = jiff::Zoned::now();
    let hhmm = |minutes: i64| hhmm(&now, minutes);
    let closed = SyncPolicy {
        policy: SyncPolicyKind::Window,
        window_start: hhmm(120),
        window_end: hhmm(180),
        ..SyncPolicy::default()
    };
    let manual = SyncPolicy { policy: SyncPolicyKind::Manual, ..SyncPolicy::default() };
    let racks = start_racks(&region, &api_key, dir.path(), &["win"], &closed).await;
    let mut manual_racks = start_racks(&region, &api_key, dir.path(), &["man", "man2"], &manual).await;
    let image = dir.path().join("img");
    std::fs::write(&image, random_bytes(2 << 20, 3)).unwrap();
    let image_hash = file_hash(&image);
    push_ok(&region, &api_key, &image, "custom/policy", "1");

    // Each rack knows of the change and says why it waits.
    for (name, reason) in [("win", "window policy"), ("man", "manual policy"), ("man2", "manual policy")] {
        wait_for(&format!("{name} waiting"), DEADLINE, || async {
            let sync = rack_view(&region, &api_key, name).await.sync?;
            (sync.phase == SyncPhase::Waiting && sync.message.contains(reason)).then_some(())
        })
        .await;
    }
    assert!(!snapshot_file(&racks[0], "custom/policy", "1").exists());

    // Opening the window (around now) lets the window rack sync by itself.
    let open = SyncPolicy { window_start: hhmm(-60), window_end: hhmm(60), ..closed.clone() };
    set_policy(&region, &api_key, &rack_view(&region, &api_key, "win").await.id, &open).await;
    wait_synced(&region, &api_key, "win", &image_hash).await;

    // The manual racks still wait; `rackd sync --now --wait` syncs one and prints the figures...
    assert!(!snapshot_file(&manual_racks[0], "custom/policy", "1").exists());
    let output = manual_racks[0].command(&["sync", "--now", "--wait"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let text = String::from_utf8(output.stdout).unwrap();
    assert!(text.contains(&format!("{} bytes fetched", 2 << 20)), "{text}");
    assert_eq!(file_hash(&snapshot_file(&manual_racks[0], "custom/policy", "1")), image_hash);

    // ...and the API's "sync now" (the UI's button) syncs the other.
    let id = rack_view(&region, &api_key, "man2").await.id;
    let response =
        region.api(&api_key).request(reqwest::Method::POST, &format!("/racks/{id}/sync")).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::ACCEPTED);
    wait_synced(&region, &api_key, "man2", &image_hash).await;
    let output = manual_racks[1].command(&["sync"]);
    assert!(String::from_utf8(output.stdout).unwrap().contains("Idle"));
    manual_racks[1].daemon.as_mut().unwrap().kill();
    let output = manual_racks[1].command(&["sync"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(stderr(&output).contains("is it running"), "{}", stderr(&output));
}

#[tokio::test]
async fn malformed_manifests_and_chunk_uploads_get_4xx_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start_with_config(&dir.path().join("region"), &region_config());
    let api_key = region.create_admin("admin", "correct horse battery");
    let client = region.https_client();
    let upload_url = format!("{}/api/v1/uploads?name=custom/x&arch=amd64&kind=root-disk&version=1", region.https_url());

    for (body, reason) in [(b"nonsense".to_vec(), "invalid manifest"), (vec![0u8; 200], "invalid manifest")] {
        let response = client.post(&upload_url).bearer_auth(&api_key).body(body).send().await.unwrap();
        assert_eq!(response.status(), StatusCode::BAD_REQUEST);
        assert!(response.json::<metalrack_api::ErrorBody>().await.unwrap().error.contains(reason));
    }
    let bad_name = format!("{}/api/v1/uploads?name=../x&arch=amd64&kind=root-disk&version=1", region.https_url());
    let response = client.post(&bad_name).bearer_auth(&api_key).body(b"x".to_vec()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);

    // A valid manifest, then a chunk whose bytes do not match its hash.
    let file = dir.path().join("f");
    std::fs::write(&file, random_bytes(300 << 10, 5)).unwrap();
    let manifest = chunk_file(&file, ChunkerConfig::default(), |_| {}).unwrap();
    let response = client.post(&upload_url).bearer_auth(&api_key).body(manifest.to_bytes()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let upload: metalrack_api::images::UploadResponse = response.json().await.unwrap();
    let first = manifest.chunks[0];
    let mut frame = Vec::new();
    metalrack_image_tools::frame::encode_frame(&first.hash, &vec![0u8; first.len as usize], &mut frame);
    let chunks_url = format!("{}/api/v1/uploads/{}/chunks", region.https_url(), upload.upload_id);
    let response = client.post(&chunks_url).bearer_auth(&api_key).body(frame).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert!(response.json::<metalrack_api::ErrorBody>().await.unwrap().error.contains("damaged"));
    // A truncated frame, and committing with chunks missing.
    let response = client.post(&chunks_url).bearer_auth(&api_key).body(vec![1u8; 20]).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    let commit_url = format!("{}/api/v1/uploads/{}/commit", region.https_url(), upload.upload_id);
    let response = client.post(&commit_url).bearer_auth(&api_key).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);
    assert!(response.json::<metalrack_api::ErrorBody>().await.unwrap().error.contains("missing"));

    // Nothing changed: no image, no stored chunk.
    let images: Vec<ImageView> = client
        .get(format!("{}/api/v1/images", region.https_url()))
        .bearer_auth(&api_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(images.is_empty());
    assert_eq!(dir_bytes(&region.data_dir.join("chunks")), 0);
    // Anonymous uploads are refused.
    let response = client.post(&upload_url).body(manifest.to_bytes()).send().await.unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    // An interrupted push resumes: the same command finishes it.
    let out = push_ok(&region, &api_key, &file, "custom/x", "1");
    assert!(out.contains("committed"), "{out}");
}

#[tokio::test]
async fn a_sync_running_when_its_window_closes_pauses_and_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start_with_config(&dir.path().join("region"), &region_config());
    let api_key = region.create_admin("admin", "correct horse battery");
    let now = jiff::Zoned::now();
    let closed = SyncPolicy {
        policy: SyncPolicyKind::Window,
        window_start: hhmm(&now, 120),
        window_end: hhmm(&now, 180),
        ..SyncPolicy::default()
    };
    let racks = start_racks(&region, &api_key, dir.path(), &["night"], &closed).await;
    let size: u64 = 8 << 20;
    let image = dir.path().join("img");
    std::fs::write(&image, random_bytes(size as usize, 4)).unwrap();
    let image_hash = file_hash(&image);
    push_ok(&region, &api_key, &image, "custom/night", "1");
    let id = rack_view(&region, &api_key, "night").await.id;

    // A window of this minute only, and a cap that makes the sync take ~90 s: the window closes
    // (at the next minute, 15-60 s away) with the sync half done. Start early in a minute.
    let now = wait_for("the start of a minute", Duration::from_secs(70), || async {
        let now = jiff::Zoned::now();
        (now.second() < 45).then_some(now)
    })
    .await;
    let short = SyncPolicy {
        window_start: hhmm(&now, 0),
        window_end: hhmm(&now, 1),
        bandwidth_bytes_per_s: size / 90,
        ..closed.clone()
    };
    set_policy(&region, &api_key, &id, &short).await;
    let paused = wait_for("the sync to pause at the window's end", Duration::from_secs(120), || async {
        let sync = rack_view(&region, &api_key, "night").await.sync?;
        (sync.phase == SyncPhase::Paused).then_some(sync)
    })
    .await;
    assert!(paused.message.contains("window closed"), "{paused:?}");
    assert!(paused.bytes_done > 0 && paused.bytes_done < size, "paused half way: {paused:?}");
    assert!(!snapshot_file(&racks[0], "custom/night", "1").exists(), "nothing half done is published");

    // The next window (here: one around now, uncapped) finishes it, fetching only the rest.
    let now = jiff::Zoned::now();
    let open = SyncPolicy { window_start: hhmm(&now, -60), window_end: hhmm(&now, 60), ..closed };
    set_policy(&region, &api_key, &id, &open).await;
    let view = wait_synced(&region, &api_key, "night", &image_hash).await;
    let last = view.sync.unwrap().last_sync.unwrap();
    assert!(
        last.bytes_fetched + paused.bytes_done <= size + (256 << 10),
        "the resumed run fetched {} of {size} bytes after {} before the pause",
        last.bytes_fetched,
        paused.bytes_done
    );
    assert_eq!(file_hash(&snapshot_file(&racks[0], "custom/night", "1")), image_hash);
}

/// The boot table follows the region while a sync runs: a machine added to the rack in the
/// middle of a slow sync is in the rack's boot table before the sync ends. (The rack asked for
/// the catalogue only between syncs, so a machine deployed while a 10 GiB image crossed a capped
/// uplink booted what the rack was told before, for as long as the sync took.)
#[tokio::test]
async fn a_machine_added_during_a_slow_sync_reaches_the_racks_boot_table_before_the_sync_ends() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start_with_config(&dir.path().join("region"), &region_config());
    let api_key = region.create_admin("admin", "correct horse battery");
    // 16 MiB at 1 MiB/s: a sync of about sixteen seconds, the machine added early in it.
    let policy = SyncPolicy { bandwidth_bytes_per_s: 1 << 20, ..auto(0) };
    let racks = start_racks(&region, &api_key, dir.path(), &["r1"], &policy).await;
    let image = dir.path().join("img");
    std::fs::write(&image, random_bytes(16 << 20, 12)).unwrap();
    let image_hash = file_hash(&image);
    push_ok(&region, &api_key, &image, "custom/slow", "1");
    let progress = racks[0].data_dir.join(format!("images/files/.{image_hash}.progress"));
    wait_for("the sync to start", DEADLINE, || async { progress.exists().then_some(()) }).await;

    let mac = "52:54:00:aa:bb:5e";
    let create = metalrack_api::machines::MachineCreate {
        hostname: "during-sync".into(),
        mac: mac.into(),
        power: metalrack_api::power::PowerParameters::Manual,
        rack: Some("r1".into()),
    };
    region.api(&api_key).add_machine(&create).await.unwrap();
    let boot_table = racks[0].data_dir.join("boot-table.json");
    wait_for("the machine in the rack's boot table", DEADLINE, || async {
        std::fs::read_to_string(&boot_table).ok().filter(|table| table.contains(mac)).map(|_| ())
    })
    .await;
    assert!(progress.exists(), "the boot table took the machine only after the sync ended");
    assert!(!snapshot_file(&racks[0], "custom/slow", "1").exists(), "nor was the image published yet");
    wait_synced(&region, &api_key, "r1", &image_hash).await;
}
