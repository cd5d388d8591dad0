//! A catalogue of thousands of files: racks' heartbeats stay small (they name their snapshot;
//! its file list goes once, when the region asks), so racks stay online and show synced.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use metalrack_api::images::{UploadResponse, VersionSyncStatus, FILE_KINDS};
use metalrack_api::{paths, RackState};
use metalrack_image_tools::frame::encode_frame;
use metalrack_image_tools::manifest::{ChunkRef, Manifest};
use metalrack_image_tools::Hash;
use metalrack_tests::{wait_for, Rack, Region};

/// The figure: heartbeats used to exceed the region's 64 KiB body limit at about 970
/// files (a hash per file), after which the rack showed offline for good.
const FILES: usize = 5_000;

/// Uploads in flight while filling the catalogue: the region commits one at a time anyway.
const UPLOADS_IN_FLIGHT: usize = 8;

/// Pushes one tiny file (one chunk) straight through the upload API.
async fn push_tiny_file(api: &metalrack_tests::api::Api, index: usize) -> anyhow::Result<()> {
    let data = format!("file {index} of the large catalogue test\n").into_bytes();
    let hash = Hash::of(&data);
    let manifest = Manifest {
        file_len: data.len() as u64,
        file_hash: hash,
        chunks: vec![ChunkRef { hash, len: data.len() as u32 }],
    };
    let kind = FILE_KINDS[index % FILE_KINDS.len()];
    let version = (index / FILE_KINDS.len()).to_string();
    let response = api
        .request(reqwest::Method::POST, paths::UPLOADS)
        .query(&[("name", "test/large"), ("arch", "amd64"), ("kind", kind), ("version", &version)])
        .body(manifest.to_bytes())
        .send()
        .await?
        .error_for_status()?;
    let upload: UploadResponse = response.json().await?;
    let mut frames = Vec::new();
    encode_frame(&hash, &data, &mut frames);
    api.request(reqwest::Method::POST, &paths::upload_chunks(&upload.upload_id))
        .body(frames)
        .send()
        .await?
        .error_for_status()?;
    api.request(reqwest::Method::POST, &paths::upload_commit(&upload.upload_id)).send().await?.error_for_status()?;
    Ok(())
}

#[tokio::test]
async fn racks_stay_online_and_show_synced_with_5000_files_in_the_catalogue() {
    let dir = tempfile::tempdir().unwrap();
    let region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let api = region.api(&api_key);
    let mut rack = Rack::new(dir.path(), "rack1");
    rack.register_ok(&region.url, &region.secret());
    rack.serve();
    region.wait_rack_state(&api_key, "rack1", RackState::Online).await;

    let started = Instant::now();
    let n_files = FILES;
    let results: Vec<_> = futures_util::stream::iter(0..n_files)
        .map(|index| push_tiny_file(&api, index))
        .buffer_unordered(UPLOADS_IN_FLIGHT)
        .collect()
        .await;
    for result in results {
        result.expect("pushing a file");
    }
    eprintln!("{n_files} files pushed in {:.1} s", started.elapsed().as_secs_f64());
    // "Sync now" rather than the auto policy's five minutes after the last change.
    api.request(reqwest::Method::POST, paths::SYNC_ALL).send().await.unwrap().error_for_status().unwrap();

    // Every version shows synced on the rack, and the rack is online when it does: its
    // heartbeats got through all along.
    let versions = n_files / FILE_KINDS.len();
    wait_for(&format!("rack1 to show all {versions} versions synced"), Duration::from_secs(240), || async {
        let image = api.image("test/large").await.ok()?;
        let synced = image
            .versions
            .iter()
            .filter(|v| v.racks.iter().any(|r| r.rack_name == "rack1" && r.status == VersionSyncStatus::Synced))
            .count();
        (image.versions.len() == versions && synced == versions).then_some(())
    })
    .await;
    let view = api.rack("rack1").await.unwrap();
    assert_eq!(view.state, RackState::Online);
    assert_eq!(view.snapshot_files, n_files as u64);
    eprintln!("synced and shown after {:.1} s", started.elapsed().as_secs_f64());
}
