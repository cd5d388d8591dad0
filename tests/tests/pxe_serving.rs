//! The rack's PXE services on loopback (no namespace needed): HTTP boot (Range, HEAD, ETag,
//! per-MAC scripts, refusals), TFTP (negotiated options, escapes refused), metrics, and boot
//! events queued while the region is down and delivered after.

use std::net::SocketAddr;

use metalrack_api::images::SyncPhase;
use metalrack_api::RackState;
use metalrack_tests::tftp::{self, TftpError};
use metalrack_tests::{free_port, random_bytes, wait_for, Rack, Region, DEADLINE};
use reqwest::StatusCode;

const MAC: &str = "52:54:00:aa:bb:01";

#[tokio::test]
async fn http_boot_tftp_scripts_metrics_and_events_with_the_region_down() {
    let dir = tempfile::tempdir().unwrap();
    let mut region = Region::start(&dir.path().join("region"));
    let api_key = region.create_admin("admin", "correct horse battery");
    let client = reqwest::Client::new();
    region.boot_machine_from_noble(&api_key, MAC).await;

    let kernel = dir.path().join("vmlinuz");
    let initrd = dir.path().join("initrd.img");
    std::fs::write(&kernel, random_bytes(300_000, 1)).unwrap();
    std::fs::write(&initrd, random_bytes(1_000_000, 2)).unwrap();
    region.push(&api_key, &kernel, "ubuntu/noble", "kernel", "1");
    region.push(&api_key, &initrd, "ubuntu/noble", "initrd", "1");

    let loaders = dir.path().join("loaders");
    std::fs::create_dir_all(&loaders).unwrap();
    let loader = random_bytes(70_000, 3);
    std::fs::write(loaders.join("undionly.kpxe"), &loader).unwrap();
    let (http_port, tftp_port) = (free_port(), free_port());
    let pxe = format!(
        "[pxe]\ninterface = \"lo\"\naddress = \"127.0.0.1\"\nhttp_listen = \"127.0.0.1:{http_port}\"\nloaders_dir = \"{}\"\n\
         [pxe.tftp]\nlisten = \"127.0.0.1:{tftp_port}\"\nblksize_max = 1024\nwindowsize_max = 8\n\
         [pxe.dhcp]\nmode = \"off\"\n",
        loaders.display()
    );
    let mut rack = Rack::new(dir.path(), "r1");
    rack.register_ok(&region.url, &region.secret());
    rack.serve_with_config(&pxe);
    region.wait_rack_state(&api_key, "r1", RackState::Online).await;
    let kernel_hash = metalrack_image_tools::Hash::of(&std::fs::read(&kernel).unwrap()).to_hex();
    wait_for("kernel and initrd synced", DEADLINE, || async {
        let racks = region.racks(&api_key).await;
        let sync = racks[0].sync.clone()?;
        let serves = region.api(&api_key).rack_serves_file(&racks[0].name, &kernel_hash).await.unwrap();
        (sync.phase == SyncPhase::Idle && racks[0].snapshot_files == 2 && serves).then_some(())
    })
    .await;
    let base = format!("http://127.0.0.1:{http_port}");

    // The per-MAC script boots the machine's image; an unknown MAC enlists.
    let script = client.get(format!("{base}/ipxe/52-54-00-aa-bb-01")).send().await.unwrap().text().await.unwrap();
    assert!(script.starts_with("#!ipxe"), "{script}");
    assert!(script
        .contains(&format!("{base}/images/ubuntu/noble/amd64/1/kernel BOOTIF=01-52-54-00-aa-bb-01 console=ttyS0")));
    let unknown = client.get(format!("{base}/ipxe/52-54-00-00-00-07")).send().await.unwrap().text().await.unwrap();
    assert!(unknown.contains("enlist"), "{unknown}");
    assert_eq!(client.get(format!("{base}/ipxe/not-a-mac")).send().await.unwrap().status(), StatusCode::BAD_REQUEST);

    // Files: whole, HEAD, Range, ETag = content hash, conditional GET.
    let url = format!("{base}/images/ubuntu/noble/amd64/1/kernel");
    let full = client.get(&url).send().await.unwrap();
    assert_eq!(full.status(), StatusCode::OK);
    assert_eq!(full.headers()["etag"], format!("\"{kernel_hash}\"").as_str());
    assert!(full.headers().contains_key("last-modified"));
    assert_eq!(full.headers()["content-length"], "300000");
    assert_eq!(full.bytes().await.unwrap().as_ref(), std::fs::read(&kernel).unwrap().as_slice());
    let head = client.head(&url).send().await.unwrap();
    assert_eq!(head.headers()["content-length"], "300000");
    let part = client.get(&url).header("range", "bytes=1000-1999").send().await.unwrap();
    assert_eq!(part.status(), StatusCode::PARTIAL_CONTENT);
    assert_eq!(part.headers()["content-range"], "bytes 1000-1999/300000");
    assert_eq!(part.bytes().await.unwrap().as_ref(), &std::fs::read(&kernel).unwrap()[1000..2000]);
    let bad_range = client.get(&url).header("range", "bytes=400000-").send().await.unwrap();
    assert_eq!(bad_range.status(), StatusCode::RANGE_NOT_SATISFIABLE);
    let cached = client.get(&url).header("if-none-match", format!("\"{kernel_hash}\"")).send().await.unwrap();
    assert_eq!(cached.status(), StatusCode::NOT_MODIFIED);
    let escape = client.get(format!("{base}/images/..%2F..%2Fregistration.toml")).send().await.unwrap();
    assert!(
        escape.status() == StatusCode::FORBIDDEN || escape.status() == StatusCode::NOT_FOUND,
        "{}",
        escape.status()
    );
    let loader_http = client.get(format!("{base}/boot/undionly.kpxe")).send().await.unwrap();
    assert_eq!(loader_http.bytes().await.unwrap().as_ref(), loader.as_slice());

    // TFTP: options negotiated within the caps, files from the snapshot, escapes refused.
    let server = SocketAddr::from(([127, 0, 0, 1], tftp_port));
    let read =
        tokio::task::spawn_blocking(move || tftp::read(server, "undionly.kpxe", 1468, 16)).await.unwrap().unwrap();
    assert_eq!((read.blksize, read.windowsize), (1024, 8));
    assert_eq!(read.data, loader);
    let kernel_path = "images/ubuntu/noble/amd64/1/kernel";
    let read = tokio::task::spawn_blocking(move || tftp::read(server, kernel_path, 512, 1)).await.unwrap().unwrap();
    assert_eq!(read.data, std::fs::read(&kernel).unwrap());
    for (path, code) in
        [("../registration.toml", 2), ("/etc/passwd", 2), ("images/../../registration.toml", 2), ("nothing", 1)]
    {
        let result = tokio::task::spawn_blocking(move || tftp::read(server, path, 512, 1)).await.unwrap();
        assert!(matches!(result, Err(TftpError::Refused(c, _)) if c == code), "{path}: {result:?}");
    }

    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    let metric = |name: &str| -> f64 {
        metrics
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().last())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} missing from:\n{metrics}"))
    };
    for name in
        ["metalrack_rack_http_bytes_total", "metalrack_rack_tftp_bytes_total", "metalrack_rack_tftp_refused_total"]
    {
        assert!(metric(name) > 0.0, "{name} = {}", metric(name));
    }
    // Every body byte left zero-copy: what the streams handed out went by sendfile.
    assert_eq!(metric("metalrack_rack_http_sendfile_bytes_total"), metric("metalrack_rack_http_bytes_total"));
    assert!(metrics.contains("metalrack_rack_sync_phase{kind=\"idle\"} 1"), "{metrics}");

    // Boot events reach the region.
    wait_for("boot events at the region", DEADLINE, || async {
        let events = region.event_messages(&api_key).await;
        let has = |kind: &str| events.iter().any(|e| e.starts_with(kind));
        (has("boot.script") && has("boot.http") && has("boot.tftp") && has("boot.refused")).then_some(())
    })
    .await;

    // With the region down the rack still serves, and queues what happened.
    region.daemon.terminate().unwrap();
    let script = client.get(format!("{base}/ipxe/52-54-00-aa-bb-01")).send().await.unwrap().text().await.unwrap();
    assert!(script.contains("ubuntu/noble"), "boot table kept locally: {script}");
    let status = client.get(format!("{base}/callback/52-54-00-aa-bb-01?event=loaded")).send().await.unwrap().status();
    assert_eq!(status, StatusCode::OK);
    region.restart();
    wait_for("queued callback delivered after the region returns", DEADLINE, || async {
        let events = region.event_messages(&api_key).await;
        events.iter().any(|e| e.starts_with("boot.callback") && e.contains("loaded")).then_some(())
    })
    .await;
}
