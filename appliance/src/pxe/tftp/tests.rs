//! The TFTP server in-process against scripted clients: negotiation, windows, loss recovery,
//! block-number wrap, refusals, limits, malformed input.

use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio::time::timeout;

use super::wire::{self, ErrorCode, Mode, Options, Repr};
use super::*;
use crate::config::PxeConfig;
use crate::pxe::metrics::KindLabel;

#[test]
fn paths_stay_inside_their_roots() {
    let dir = tempfile::tempdir().unwrap();
    let boot = dir.path().join("boot");
    let snap = dir.path().join("snap");
    std::fs::create_dir_all(snap.join("ubuntu/amd64/1")).unwrap();
    std::fs::create_dir_all(&boot).unwrap();
    std::fs::write(boot.join("undionly.kpxe"), b"x").unwrap();
    std::fs::write(snap.join("ubuntu/amd64/1/kernel"), b"k").unwrap();
    std::fs::write(dir.path().join("secret"), b"s").unwrap();
    std::os::unix::fs::symlink(dir.path().join("secret"), boot.join("link-out")).unwrap();

    assert!(resolve(&boot, Some(&snap), Path::new("undionly.kpxe")).is_ok());
    assert!(resolve(&boot, Some(&snap), Path::new("./undionly.kpxe")).is_ok());
    assert!(resolve(&boot, Some(&snap), Path::new("images/ubuntu/amd64/1/kernel")).is_ok());
    assert_eq!(resolve(&boot, Some(&snap), Path::new("../secret")), Err(Refusal::Escape));
    assert_eq!(resolve(&boot, Some(&snap), Path::new("images/../../secret")), Err(Refusal::Escape));
    assert_eq!(resolve(&boot, Some(&snap), Path::new("/etc/passwd")), Err(Refusal::Escape));
    assert_eq!(resolve(&boot, Some(&snap), Path::new("link-out")), Err(Refusal::Escape));
    assert_eq!(resolve(&boot, Some(&snap), Path::new("missing")), Err(Refusal::NotFound));
    assert_eq!(resolve(&boot, None, Path::new("images/ubuntu/amd64/1/kernel")), Err(Refusal::NotFound));
    assert_eq!(resolve(&boot, Some(&snap), Path::new("images/ubuntu")), Err(Refusal::NotFound));
}

#[test]
fn negotiation_stays_within_the_caps() {
    let config =
        crate::config::TftpConfig { blksize_max: 1024, windowsize_max: 8, timeout_ms: 2500, ..Default::default() };
    let asked = Options { blksize: Some(1468), timeout_s: Some(2), tsize: Some(0), windowsize: Some(16) };
    let granted = negotiate(&asked, &config, 4242);
    assert_eq!((granted.blksize, granted.windowsize, granted.timeout), (1024, 8, Duration::from_secs(2)));
    assert_eq!(
        granted.oack,
        Some(Options { blksize: Some(1024), timeout_s: Some(2), tsize: Some(4242), windowsize: Some(8) })
    );
    let small = negotiate(&Options { blksize: Some(600), ..Options::default() }, &config, 1);
    assert_eq!((small.blksize, small.windowsize, small.timeout), (600, 1, Duration::from_millis(2500)));
    let plain = negotiate(&Options::default(), &config, 1);
    assert_eq!((plain.blksize, plain.windowsize, plain.oack), (512, 1, None), "no options: RFC 1350 lockstep");
    // Above timeout_s_max, the option is left out (RFC 2349 allows no other answer) and the
    // server's own timeout applies; at the cap it is granted.
    let config = crate::config::TftpConfig { timeout_s_max: 10, ..config };
    let greedy = negotiate(&Options { timeout_s: Some(255), blksize: Some(1024), ..Options::default() }, &config, 1);
    assert_eq!(greedy.timeout, Duration::from_millis(2500));
    assert_eq!(greedy.oack, Some(Options { blksize: Some(1024), ..Options::default() }));
    let only_timeout = negotiate(&Options { timeout_s: Some(11), ..Options::default() }, &config, 1);
    assert_eq!((only_timeout.timeout, only_timeout.oack), (Duration::from_millis(2500), None), "plain RFC 1350");
    let at_cap = negotiate(&Options { timeout_s: Some(10), ..Options::default() }, &config, 1);
    assert_eq!(at_cap.timeout, Duration::from_secs(10));
}

/// A rack's PXE state in a temp dir: a loader in the boot files and a snapshot with `files`.
struct Rack {
    _dir: tempfile::TempDir,
    pxe: Arc<Pxe>,
    server: SocketAddr,
}

const LOADER: &[u8] = b"pretend iPXE loader";

async fn rack(tftp: &str, files: &[(&str, &[u8])], send_path: SendPath) -> Rack {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = crate::data_dir::DataDir::new(dir.path());
    let config: PxeConfig = toml::from_str(&format!(
        "interface = \"lo\"\naddress = \"127.0.0.1\"\n[dhcp]\nmode = \"off\"\n\
         [tftp]\nlisten = \"127.0.0.1:0\"\n{tftp}\n"
    ))
    .unwrap();
    let store = crate::snapshot::SnapshotStore::open(&data_dir).unwrap();
    let snapshot = data_dir.root().join("snapshot");
    for (name, bytes) in files {
        let path = snapshot.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, bytes).unwrap();
    }
    std::os::unix::fs::symlink(&snapshot, store.current_link()).unwrap();
    let boot_files_dir = data_dir.boot_files();
    std::fs::create_dir_all(&boot_files_dir).unwrap();
    std::fs::write(boot_files_dir.join("undionly.kpxe"), LOADER).unwrap();
    let pxe = Pxe::for_test(config, data_dir, watch::channel(Arc::default()).1);
    let server = bind_with(pxe.clone(), send_path).await.unwrap();
    let address = server.local_addr().unwrap();
    tokio::spawn(server.serve(Default::default(), Default::default()));
    Rack { _dir: dir, pxe, server: address }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ (i >> 16) as u8).collect()
}

fn dropped(pxe: &Pxe, kind: &str) -> u64 {
    pxe.metrics.tftp_dropped.get_or_create(&KindLabel { kind: kind.to_owned() }).get()
}

fn failed(pxe: &Pxe, kind: &str) -> u64 {
    pxe.metrics.tftp_failed.get_or_create(&KindLabel { kind: kind.to_owned() }).get()
}

/// Polls `condition` every 10 ms until it holds or 10 s pass.
async fn wait_for(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !condition() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A scripted client: one socket, talks to whichever port answers first.
struct Client {
    socket: UdpSocket,
    server: SocketAddr,
    peer: Option<SocketAddr>,
    buf: Vec<u8>,
}

impl Client {
    async fn new(server: SocketAddr) -> Client {
        Client::from_address("127.0.0.1", server).await
    }

    /// A client whose packets leave from `source` (any 127.0.0.0/8 address works on loopback).
    async fn from_address(source: &str, server: SocketAddr) -> Client {
        let socket = UdpSocket::bind((source, 0)).await.unwrap();
        Client { socket, server, peer: None, buf: vec![0; 70_000] }
    }

    async fn request(&mut self, filename: &str, options: Options) {
        let bytes = Repr::ReadRequest { filename, mode: Mode::Octet, options }.to_bytes();
        self.socket.send_to(&bytes, self.server).await.unwrap();
    }

    async fn send(&self, packet: Repr<'_>) {
        self.socket.send_to(&packet.to_bytes(), self.peer.expect("the server answered")).await.unwrap();
    }

    async fn ack(&self, block: u16) {
        self.send(Repr::Ack { block }).await;
    }

    /// The next packet within `wait`, as an owned copy.
    async fn receive_within(&mut self, wait: Duration) -> Option<Vec<u8>> {
        let (len, from) = timeout(wait, self.socket.recv_from(&mut self.buf)).await.ok()?.unwrap();
        let packet = self.buf[..len].to_vec();
        // Refusals without a session (busy, writes) come from port 69, everything else from
        // the transfer's own port.
        if !matches!(wire::parse(&packet), Ok(Repr::Error { .. })) {
            assert_ne!(from, self.server, "transfers come from a port of their own");
            assert_eq!(*self.peer.get_or_insert(from), from, "one transfer ID per transfer");
        }
        Some(packet)
    }

    async fn receive(&mut self) -> Vec<u8> {
        self.receive_within(Duration::from_secs(5)).await.expect("a packet within 5 s")
    }

    /// Reads `filename` as an RFC 7440 client would (an ACK per window, a gap answered with the
    /// last block in order). Returns the bytes and the options granted, or the server's error.
    async fn fetch(&mut self, filename: &str, options: Options) -> Result<(Vec<u8>, Options), (ErrorCode, String)> {
        self.request(filename, options).await;
        let mut granted = Options::default();
        let mut data = Vec::new();
        let mut expected: u16 = 1;
        let mut since_ack = 0;
        loop {
            let packet = self.receive().await;
            match wire::parse(&packet).unwrap() {
                Repr::OptionAck { options } if data.is_empty() && expected == 1 => {
                    granted = options;
                    self.ack(0).await;
                }
                Repr::Data { block, payload } if block == expected => {
                    let blksize = usize::from(granted.blksize.unwrap_or(512));
                    assert!(payload.len() <= blksize);
                    data.extend_from_slice(payload);
                    expected = expected.wrapping_add(1);
                    since_ack += 1;
                    let last = payload.len() < blksize;
                    if last || since_ack == granted.windowsize.unwrap_or(1) {
                        self.ack(block).await;
                        since_ack = 0;
                    }
                    if last {
                        return Ok((data, granted));
                    }
                }
                Repr::Data { .. } => {
                    self.ack(expected.wrapping_sub(1)).await;
                    since_ack = 0;
                }
                Repr::Error { code, message } => return Err((code, message.to_owned())),
                other => panic!("unexpected {other:?}"),
            }
        }
    }
}

fn windowed(blksize: u16, windowsize: u16) -> Options {
    Options { blksize: Some(blksize), windowsize: Some(windowsize), tsize: Some(0), timeout_s: None }
}

#[tokio::test]
async fn windows_within_the_caps_on_every_send_path() {
    let file = pattern(100_000);
    for send_path in [SendPath::Gso, SendPath::Multiple, SendPath::Single] {
        let rack = rack("blksize_max = 1024\nwindowsize_max = 8", &[("f", &file)], send_path).await;
        let mut client = Client::new(rack.server).await;
        let (data, granted) = client.fetch("images/f", windowed(1468, 16)).await.unwrap();
        assert_eq!(
            granted,
            Options { blksize: Some(1024), windowsize: Some(8), tsize: Some(100_000), timeout_s: None }
        );
        assert!(data == file, "{send_path:?}: the file arrives intact");
        wait_for("the session to end", || rack.pxe.metrics.tftp_sessions_active.get() == 0).await;
        assert_eq!(rack.pxe.metrics.tftp_bytes.get(), 100_000);
        assert_eq!(rack.pxe.metrics.tftp_sessions.get(), 1);
    }
}

#[tokio::test]
async fn clients_without_options_get_512_byte_lockstep() {
    // 1024 bytes: two full blocks, then an empty one to end the transfer.
    let file = pattern(1024);
    let rack = rack("", &[("f", &file)], SendPath::Gso).await;
    let mut client = Client::new(rack.server).await;
    client.request("images/f", Options::default()).await;
    for (block, len) in [(1u16, 512usize), (2, 512), (3, 0)] {
        let packet = client.receive().await;
        let Ok(Repr::Data { block: got, payload }) = wire::parse(&packet) else { panic!("{packet:?}") };
        assert_eq!((got, payload.len()), (block, len));
        assert_eq!(client.receive_within(Duration::from_millis(100)).await, None, "lockstep: one block at a time");
        client.ack(block).await;
    }
    let (data, granted) = Client::new(rack.server).await.fetch("images/f", Options::default()).await.unwrap();
    assert_eq!((data, granted), (file, Options::default()));
}

#[tokio::test]
async fn block_numbers_wrap_past_65535() {
    // blksize 8 wraps after 512 KiB, so the wrap is cheap to reach.
    let file = pattern(8 * 70_000 + 5);
    let rack = rack("windowsize_max = 64", &[("f", &file)], SendPath::Gso).await;
    let mut client = Client::new(rack.server).await;
    let (data, granted) = client.fetch("images/f", windowed(8, 64)).await.unwrap();
    assert_eq!((granted.blksize, granted.windowsize), (Some(8), Some(64)));
    assert!(data == file);
}

#[tokio::test]
async fn a_file_over_96_mib_at_blksize_1468_wraps_and_arrives() {
    // 65,535 blocks of 1468 bytes are 91.7 MiB: past that the block number wraps to 0.
    let file = pattern(97 << 20);
    let rack = rack("", &[("big", &file)], SendPath::Gso).await;
    let mut client = Client::new(rack.server).await;
    let (data, granted) = client.fetch("images/big", windowed(1468, 16)).await.unwrap();
    assert_eq!(granted.tsize, Some(97 << 20));
    assert!(data == file);
}

#[tokio::test]
async fn partial_acks_roll_back_timeouts_resend_and_duplicates_are_ignored() {
    let file = pattern(512 * 40);
    let rack = rack("", &[("f", &file)], SendPath::Gso).await;
    let mut client = Client::new(rack.server).await;
    let options = Options { blksize: Some(512), windowsize: Some(4), timeout_s: Some(1), tsize: None };
    client.request("images/f", options).await;
    assert!(matches!(wire::parse(&client.receive().await), Ok(Repr::OptionAck { .. })));
    client.ack(0).await;
    let block_of = |packet: Vec<u8>| match wire::parse(&packet) {
        Ok(Repr::Data { block, .. }) => block,
        other => panic!("{other:?}"),
    };
    let mut window = Vec::new();
    for _ in 0..4 {
        window.push(block_of(client.receive().await));
    }
    assert_eq!(window, [1, 2, 3, 4]);
    // The client lost block 3: it ACKs 2 and the server goes on from 3.
    client.ack(2).await;
    let mut window = Vec::new();
    for _ in 0..4 {
        window.push(block_of(client.receive().await));
    }
    assert_eq!(window, [3, 4, 5, 6]);
    // An old ACK and a duplicate change nothing and trigger nothing.
    client.ack(1).await;
    client.ack(2).await;
    assert_eq!(client.receive_within(Duration::from_millis(500)).await, None, "no answer to stale ACKs");
    // Silence: after the 1 s timeout the same window comes again.
    let started = std::time::Instant::now();
    let mut window = Vec::new();
    for _ in 0..4 {
        window.push(block_of(client.receive().await));
    }
    assert_eq!(window, [3, 4, 5, 6]);
    assert!(started.elapsed() >= Duration::from_millis(300), "resent on timeout, not at once");
    client.ack(6).await;
    assert_eq!(block_of(client.receive().await), 7);
    assert_eq!(rack.pxe.metrics.tftp_retransmits.get(), 0, "counted when the session ends");
    // The client stays silent (a closed port would end the session at once, by ICMP).
    wait_for("the abandoned session to time out", || failed(&rack.pxe, "timed_out") == 1).await;
    assert!(rack.pxe.metrics.tftp_retransmits.get() >= u64::from(RETRANSMITS_MAX));
    assert_eq!(rack.pxe.metrics.tftp_sessions_active.get(), 0);
}

#[tokio::test]
async fn a_lost_oack_is_resent_and_a_repeated_request_starts_no_second_transfer() {
    let rack = rack("", &[], SendPath::Gso).await;
    let mut client = Client::new(rack.server).await;
    let options = Options { timeout_s: Some(1), ..windowed(512, 4) };
    client.request("undionly.kpxe", options).await;
    let first = client.receive().await;
    client.request("undionly.kpxe", options).await;
    wait_for("the repeated request to be dropped", || dropped(&rack.pxe, "repeated_request") == 1).await;
    let again = client.receive_within(Duration::from_secs(3)).await.expect("the OACK again after the timeout");
    assert_eq!(first, again);
    assert!(matches!(wire::parse(&first), Ok(Repr::OptionAck { .. })));
    client.ack(0).await;
    let packet = client.receive().await;
    assert_eq!(wire::parse(&packet), Ok(Repr::Data { block: 1, payload: LOADER }));
    client.ack(1).await;
    wait_for("the session to end", || rack.pxe.metrics.tftp_sessions_active.get() == 0).await;
    assert_eq!(rack.pxe.metrics.tftp_sessions.get(), 1);
    assert!(
        rack.pxe.loader_sent.lock().unwrap().just_sent(std::net::Ipv4Addr::LOCALHOST, Instant::now()),
        "loader bookkeeping"
    );
    assert_eq!(rack.pxe.events.len(), 1, "one boot.tftp event");
}

#[tokio::test]
async fn refusals_answer_with_the_right_error() {
    let rack = rack("", &[("f", b"data")], SendPath::Gso).await;
    for (filename, code) in [
        ("../registration.toml", ErrorCode::AccessViolation),
        ("/etc/passwd", ErrorCode::AccessViolation),
        ("images/../../x", ErrorCode::AccessViolation),
        ("nothing", ErrorCode::FileNotFound),
        ("images/nothing", ErrorCode::FileNotFound),
    ] {
        let result = Client::new(rack.server).await.fetch(filename, Options::default()).await;
        assert_eq!(result.map_err(|(code, _)| code), Err(code), "{filename}");
    }
    let mut client = Client::new(rack.server).await;
    let write = Repr::WriteRequest { filename: "f", mode: Mode::Octet, options: Options::default() };
    client.socket.send_to(&write.to_bytes(), rack.server).await.unwrap();
    let (len, _) = client.socket.recv_from(&mut client.buf).await.unwrap();
    assert!(matches!(wire::parse(&client.buf[..len]), Ok(Repr::Error { code: ErrorCode::IllegalOperation, .. })));
    let mail = Repr::ReadRequest { filename: "images/f", mode: Mode::Mail, options: Options::default() };
    client.socket.send_to(&mail.to_bytes(), rack.server).await.unwrap();
    let (len, _) = client.socket.recv_from(&mut client.buf).await.unwrap();
    assert!(matches!(wire::parse(&client.buf[..len]), Ok(Repr::Error { code: ErrorCode::IllegalOperation, .. })));
    assert_eq!(rack.pxe.metrics.tftp_refused.get(), 7);
    assert_eq!(rack.pxe.events.len(), 7, "a boot.refused event each");
    assert_eq!(rack.pxe.metrics.tftp_sessions.get(), 0);
}

#[tokio::test]
async fn malformed_packets_are_dropped_and_counted_and_serving_goes_on() {
    let rack = rack("", &[("f", b"data")], SendPath::Gso).await;
    let junk = Client::new(rack.server).await;
    for bytes in
        [&b""[..], b"\x00", b"\x00\x09\x00\x00", b"\x00\x01no-nul", b"\x00\x01f\x00binary\x00", b"\xff\xff\xff"]
    {
        junk.socket.send_to(bytes, rack.server).await.unwrap();
    }
    junk.socket.send_to(&Repr::Ack { block: 1 }.to_bytes(), rack.server).await.unwrap();
    wait_for("the junk to be counted", || dropped(&rack.pxe, "malformed") == 6).await;
    wait_for("the stray ACK to be counted", || dropped(&rack.pxe, "not_a_request") == 1).await;
    let (data, _) = Client::new(rack.server).await.fetch("images/f", Options::default()).await.unwrap();
    assert_eq!(data, b"data");
    assert_eq!(rack.pxe.metrics.tftp_refused.get(), 0);
}

#[tokio::test]
async fn the_session_limit_refuses_the_next_client_and_one_stuck_client_stalls_no_other() {
    let file = pattern(300_000);
    let rack = rack("sessions_max = 2", &[("f", &file)], SendPath::Gso).await;
    // A client that asks and then never answers holds one slot.
    let mut stuck = Client::new(rack.server).await;
    stuck.request("images/f", windowed(1468, 16)).await;
    stuck.receive().await;
    // The other slot serves a whole transfer meanwhile.
    let (data, _) = Client::new(rack.server).await.fetch("images/f", windowed(1468, 16)).await.unwrap();
    assert!(data == file);
    let mut second_stuck = Client::new(rack.server).await;
    second_stuck.request("images/f", windowed(1468, 16)).await;
    second_stuck.receive().await;
    let refused = Client::new(rack.server).await.fetch("images/f", Options::default()).await;
    assert_eq!(refused.map_err(|(code, message)| (code, message.contains("busy"))), Err((ErrorCode::NotDefined, true)));
    // The stuck client gives up with an ERROR: its slot is free again.
    stuck.send(Repr::Error { code: ErrorCode::NotDefined, message: "bye" }).await;
    wait_for("the aborted session to end", || failed(&rack.pxe, "client_aborted") == 1).await;
    let (data, _) = Client::new(rack.server).await.fetch("images/f", windowed(1468, 16)).await.unwrap();
    assert!(data == file);
}

#[tokio::test]
async fn a_client_sending_data_gets_illegal_operation() {
    let rack = rack("", &[("f", &pattern(5000))], SendPath::Gso).await;
    let mut client = Client::new(rack.server).await;
    client.request("images/f", Options::default()).await;
    client.receive().await;
    client.send(Repr::Data { block: 1, payload: b"nonsense" }).await;
    let packet = client.receive().await;
    assert!(matches!(wire::parse(&packet), Ok(Repr::Error { code: ErrorCode::IllegalOperation, .. })), "{packet:?}");
    wait_for("the session to end", || failed(&rack.pxe, "illegal_operation") == 1).await;
}

/// A client asking for `timeout 255` would make a vanished transfer hold its slot for
/// 6 × 255 s. The option is left out of the OACK, and the OACK is resent after the configured
/// timeout (200 ms here), not after 255 s.
#[tokio::test]
async fn a_client_chosen_timeout_above_the_cap_is_not_granted() {
    let rack = rack("timeout_ms = 200\ntimeout_s_max = 10", &[], SendPath::Gso).await;
    let mut client = Client::new(rack.server).await;
    let options = Options { timeout_s: Some(255), ..windowed(1024, 4) };
    client.request("undionly.kpxe", options).await;
    let first = client.receive().await;
    let Ok(Repr::OptionAck { options: granted }) = wire::parse(&first) else { panic!("{first:?}") };
    assert_eq!(granted.timeout_s, None, "timeout 255 granted: {granted:?}");
    assert_eq!((granted.blksize, granted.windowsize), (Some(1024), Some(4)), "the other options still are");
    // No ACK 0: the OACK comes again after timeout_ms.
    let started = std::time::Instant::now();
    let again = client.receive_within(Duration::from_secs(3)).await.expect("the OACK resent within 3 s");
    assert_eq!(again, first);
    assert!(started.elapsed() < Duration::from_secs(2), "resent after {:?}", started.elapsed());

    // Asking for nothing but a too-long timeout: no OACK at all, DATA 1 (RFC 2347).
    let mut plain = Client::new(rack.server).await;
    plain.request("undionly.kpxe", Options { timeout_s: Some(255), ..Options::default() }).await;
    let packet = plain.receive().await;
    assert_eq!(wire::parse(&packet), Ok(Repr::Data { block: 1, payload: LOADER }));
}

/// One address cannot take every session slot: past `sessions_per_client_max` transfers, its
/// next request is refused with an ERROR while another address is still served. A transfer
/// that ends frees its address's slot.
#[tokio::test]
async fn sessions_per_client_address_are_limited_and_other_addresses_are_served() {
    let file = pattern(300_000);
    let rack = rack("sessions_max = 16\nsessions_per_client_max = 2", &[("f", &file)], SendPath::Gso).await;
    // Two transfers from 127.0.0.2 (two ports) that never answer hold two slots.
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut client = Client::from_address("127.0.0.2", rack.server).await;
        client.request("images/f", windowed(1468, 16)).await;
        assert!(matches!(wire::parse(&client.receive().await), Ok(Repr::OptionAck { .. })));
        held.push(client);
    }
    let third = Client::from_address("127.0.0.2", rack.server).await.fetch("images/f", windowed(1468, 16)).await;
    match third {
        Err((ErrorCode::NotDefined, message)) => assert!(message.contains("your address"), "{message}"),
        other => panic!("a third transfer to 127.0.0.2 was not refused: {:?}", other.map(|(data, _)| data.len())),
    }
    assert_eq!(rack.pxe.metrics.tftp_refused.get(), 1);
    let (data, _) =
        Client::from_address("127.0.0.3", rack.server).await.fetch("images/f", windowed(1468, 16)).await.unwrap();
    assert!(data == file, "another address is served");
    // One held transfer is aborted: 127.0.0.2 may start another.
    held[0].send(Repr::Error { code: ErrorCode::NotDefined, message: "bye" }).await;
    wait_for("the aborted session to end", || failed(&rack.pxe, "client_aborted") == 1).await;
    let (data, _) =
        Client::from_address("127.0.0.2", rack.server).await.fetch("images/f", windowed(1468, 16)).await.unwrap();
    assert!(data == file);
}

/// Every client our loader goes to is remembered (for the DHCP chain window): 100k distinct
/// addresses (a spoofing flood) leave the table bounded, and the latest still count.
#[tokio::test]
async fn the_loader_table_stays_bounded_under_100k_client_addresses() {
    let rack = rack("", &[], SendPath::Gso).await;
    let shared = Shared {
        pxe: rack.pxe.clone(),
        sessions: Arc::new(Semaphore::new(1)),
        peers: Mutex::default(),
        session_ip: rack.server.ip(),
        send_path: SendPath::Gso,
    };
    let request = ReadRequest { filename: "undionly.kpxe".into(), mode: Mode::Octet, options: Options::default() };
    let client = |i: u32| SocketAddr::from((std::net::Ipv4Addr::from(0x0a00_0000 + i), 2000));
    for i in 0..100_000 {
        shared.open(client(i), &request).expect("the loader");
        let remembered = rack.pxe.loader_sent.lock().unwrap().len();
        assert!(remembered <= crate::pxe::LOADER_SENT_CLIENTS_MAX, "{remembered} clients remembered after {i}");
    }
    let sent = rack.pxe.loader_sent.lock().unwrap();
    let IpAddr::V4(latest) = client(99_999).ip() else { unreachable!() };
    assert!(sent.just_sent(latest, Instant::now()), "the latest client is remembered");
}
