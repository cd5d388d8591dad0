//! DHCP for PXE (dhcproto): managed mode (leases from a range, reservations, persisted by
//! [`lease_journal`]) or proxy mode (PXE options only, beside another DHCP server). Picks the
//! loader by firmware (option 93), sends iPXE (option 77) its per-MAC script URL. Malformed
//! packets are dropped and counted; each client is rate-limited. An ACK goes out only once its
//! lease is on disk; the receive loop does not wait for that, it answers other clients meanwhile.

pub mod lease_journal;
mod leases;

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::sync::Arc;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

pub use lease_journal::{Durable, LeaseJournal, Record};
pub use leases::{Lease, Leases};

use super::metrics::Metrics;
use super::Pxe;
use crate::config::{DhcpConfig, DhcpMode, PxeConfig};

/// Largest DHCP packet read; anything longer is truncated by the kernel and dropped as malformed.
const PACKET_LEN_MAX: usize = 1500;

/// How long to wait before trying again to open a lease store that could not be opened.
const LEASE_STORE_RETRY: Duration = Duration::from_secs(10);

/// At shutdown, ACKs whose lease is being made durable are still sent if that takes at most
/// this long; the writer then commits what is queued and stops (the journal's flush).
const SHUTDOWN_ACKS_MAX: Duration = Duration::from_secs(1);

/// What a client firmware is, from options 93, 60 and 77.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    Bios,
    UefiX64,
    UefiArm64,
    /// UEFI HTTP boot client (vendor class `HTTPClient`): gets URLs, not TFTP names.
    UefiHttp,
    /// Not a network-boot client (an OS asking for an address).
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub mac: String,
    pub firmware: Firmware,
    pub ipxe: bool,
}

pub fn classify(message: &Message) -> Client {
    let mac = message.chaddr().iter().take(6).map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":");
    let class = match message.opts().get(OptionCode::ClassIdentifier) {
        Some(DhcpOption::ClassIdentifier(bytes)) => String::from_utf8_lossy(bytes).into_owned(),
        _ => String::new(),
    };
    let ipxe = matches!(message.opts().get(OptionCode::UserClass), Some(DhcpOption::UserClass(bytes)) if bytes.windows(4).any(|w| w == b"iPXE"));
    let arch = match message.opts().get(OptionCode::ClientSystemArchitecture) {
        Some(DhcpOption::ClientSystemArchitecture(arch)) => Some(u16::from(*arch)),
        _ => None,
    };
    let firmware = if class.starts_with("HTTPClient") {
        Firmware::UefiHttp
    } else if class.starts_with("PXEClient") || ipxe {
        match arch {
            Some(0) | None => Firmware::Bios,
            Some(6 | 7 | 9) => Firmware::UefiX64,
            Some(11) => Firmware::UefiArm64,
            Some(16 | 19) => Firmware::UefiHttp,
            Some(_) => Firmware::Bios,
        }
    } else {
        Firmware::Other
    };
    Client { mac, firmware, ipxe }
}

/// The boot file for a client: a TFTP name or an HTTP URL. `None` for non-PXE clients.
pub fn boot_file(client: &Client, base_url: &str, loader_just_sent: bool) -> Option<String> {
    let script = format!("{base_url}/ipxe/{}", client.mac.replace(':', "-"));
    // iPXE running our loader gets its script. iPXE we did not load (a NIC ROM of unknown build)
    // first gets our loader, so every machine runs the same known iPXE; the window stops loops.
    if client.ipxe && (loader_just_sent || client.firmware == Firmware::UefiHttp) {
        return Some(script);
    }
    match client.firmware {
        Firmware::Bios => Some("undionly.kpxe".into()),
        Firmware::UefiX64 => Some("ipxe.efi".into()),
        Firmware::UefiArm64 => Some("ipxe-arm64.efi".into()),
        Firmware::UefiHttp => Some(format!("{base_url}/boot/ipxe.efi")),
        Firmware::Other => None,
    }
}

/// Per-client token buckets, at most [`RATE_LIMIT_CLIENTS_MAX`] (see [`super::make_room`]).
#[derive(Debug, Default)]
struct RateLimits {
    /// MAC → (tokens, when last seen).
    buckets: HashMap<String, (f64, Instant)>,
}

/// Clients tracked for rate limiting: ~100 bytes each, ~1.6 MiB in all. A rack boots a few
/// thousand machines; only a flood of spoofed MACs fills it, and a spoofed MAC gets a fresh
/// bucket anyway.
const RATE_LIMIT_CLIENTS_MAX: usize = 16_384;

/// A bucket refills `per_s` tokens a second up to a capacity of `per_s`: idle this long, it is
/// full again, the same as no entry at all, so it can be forgotten without changing an answer.
const RATE_BUCKET_REFILL: Duration = Duration::from_secs(1);

impl RateLimits {
    fn allow(&mut self, mac: &str, per_s: u32) -> bool {
        self.allow_at(mac, per_s, Instant::now())
    }

    fn allow_at(&mut self, mac: &str, per_s: u32, now: Instant) -> bool {
        let capacity = f64::from(per_s.max(1));
        if !self.buckets.contains_key(mac) {
            super::make_room(&mut self.buckets, RATE_LIMIT_CLIENTS_MAX, now, RATE_BUCKET_REFILL, |(_, seen)| *seen);
        }
        let (tokens, last) = self.buckets.entry(mac.to_owned()).or_insert((capacity, now));
        *tokens = (*tokens + now.saturating_duration_since(*last).as_secs_f64() * capacity).min(capacity);
        *last = now;
        let allowed = *tokens >= 1.0;
        if allowed {
            *tokens -= 1.0;
        }
        assert!(self.buckets.len() <= RATE_LIMIT_CLIENTS_MAX);
        allowed
    }
}

/// The DHCP logic, without sockets, so it can be tested packet by packet.
#[derive(Debug)]
pub struct DhcpServer {
    pub mode: DhcpMode,
    pub server: Ipv4Addr,
    pub base_url: String,
    pub leases: Leases,
    /// Where lease changes go in managed mode; `None` keeps them in memory only (tests, fuzzing).
    journal: Option<LeaseJournal>,
    config: DhcpConfig,
    limits: RateLimits,
}

/// What to do with a request: a reply and where to send it, or a reason to drop it.
#[derive(Debug)]
// One per packet, moved once or twice: boxing the reply would cost an allocation for nothing.
#[allow(clippy::large_enum_variant)]
pub enum Outcome {
    /// `durable`: send the reply only once this resolves `Ok` (an ACK whose lease is being saved).
    Reply {
        message: Message,
        to: SocketAddr,
        kind: &'static str,
        client: Client,
        durable: Option<Durable>,
    },
    Drop(&'static str),
}

impl DhcpServer {
    /// A server whose leases start from, and are saved to, `journal` (or memory only).
    pub fn new(config: &PxeConfig, mut journal: Option<LeaseJournal>) -> DhcpServer {
        let loaded = journal.as_mut().map(LeaseJournal::take_loaded).unwrap_or_default();
        DhcpServer {
            mode: config.dhcp.mode,
            server: config.address,
            base_url: format!("http://{}:{}", config.address, config.http_listen.port()),
            leases: Leases::new(&config.dhcp, config.address, loaded, crate::status::now_ms()),
            journal,
            config: config.dhcp.clone(),
            limits: RateLimits::default(),
        }
    }

    /// Handles one packet. `loader_just_sent` says whether our loader recently went to the
    /// address this client holds.
    pub fn handle(&mut self, bytes: &[u8], port: u16, loader_just_sent: impl Fn(Ipv4Addr) -> bool) -> Outcome {
        match decode(bytes) {
            Some(request) => self.handle_message(&request, port, loader_just_sent),
            None => Outcome::Drop("malformed"),
        }
    }

    /// Handles one decoded packet (the server loop decodes once, for metrics and for this).
    pub fn handle_message(
        &mut self,
        request: &Message,
        port: u16,
        loader_just_sent: impl Fn(Ipv4Addr) -> bool,
    ) -> Outcome {
        if request.opcode() != Opcode::BootRequest || request.hlen() != 6 {
            return Outcome::Drop("not a request");
        }
        let Some(kind) = request.opts().msg_type() else { return Outcome::Drop("no message type") };
        let client = classify(request);
        if !self.limits.allow(&client.mac, self.config.packets_per_s_per_client) {
            return Outcome::Drop("rate limited");
        }
        if let Some(DhcpOption::ServerIdentifier(id)) = request.opts().get(OptionCode::ServerIdentifier) {
            if *id != self.server && matches!(kind, MessageType::Request | MessageType::Release | MessageType::Decline)
            {
                return Outcome::Drop("for another server"); // the client chose another server's offer
            }
        }
        let requested = match request.opts().get(OptionCode::RequestedIpAddress) {
            Some(DhcpOption::RequestedIpAddress(a)) => Some(*a),
            _ => None,
        };
        match (self.mode, kind) {
            (DhcpMode::Managed, MessageType::Discover) => {
                let Some(address) = self.leases.offer(&client.mac, requested) else {
                    return Outcome::Drop("address pool or lease table full");
                };
                let just_sent = loader_just_sent(address);
                self.reply(request, client, MessageType::Offer, address, just_sent, "offer")
            }
            (DhcpMode::Managed, MessageType::Request) => {
                let address = requested.unwrap_or(request.ciaddr());
                let Some(lease) = self.leases.bind(&client.mac, address) else { return self.nak(request, client) };
                // The lease stays bound in memory either way: if it cannot be queued the client
                // gets no ACK, retries, and its retry is queued.
                let durable = match &self.journal {
                    Some(journal) => match journal.append_durable(Record::bind(&lease)) {
                        Ok(durable) => Some(durable),
                        Err(_) => return Outcome::Drop("lease journal busy"),
                    },
                    None => None,
                };
                let just_sent = loader_just_sent(address);
                let mut outcome = self.reply(request, client, MessageType::Ack, address, just_sent, "ack");
                if let Outcome::Reply { durable: gate, .. } = &mut outcome {
                    *gate = durable;
                }
                outcome
            }
            (DhcpMode::Managed, MessageType::Release) => {
                if let Some(lease) = self.leases.release(&client.mac).filter(|l| l.bound) {
                    self.journal_forget(Record::Release { mac: lease.mac, address: lease.address });
                }
                Outcome::Drop("released")
            }
            (DhcpMode::Managed, MessageType::Decline) => {
                if let Some(address) = requested {
                    if let Some(lease) = self.leases.decline(&client.mac, address).filter(|l| l.bound) {
                        self.journal_forget(Record::Decline { mac: lease.mac, address });
                    }
                }
                Outcome::Drop("declined")
            }
            (_, MessageType::Inform) => {
                let just_sent = loader_just_sent(request.ciaddr());
                self.reply(request, client, MessageType::Ack, Ipv4Addr::UNSPECIFIED, just_sent, "inform-ack")
            }
            (DhcpMode::Proxy, MessageType::Discover) if client.firmware != Firmware::Other => {
                self.reply(request, client, MessageType::Offer, Ipv4Addr::UNSPECIFIED, false, "proxy-offer")
            }
            // Port 4011: PXE boot server discovery after a proxy offer.
            (DhcpMode::Proxy, MessageType::Request) if port == 4011 && client.firmware != Firmware::Other => {
                let just_sent = loader_just_sent(request.ciaddr());
                self.reply(request, client, MessageType::Ack, Ipv4Addr::UNSPECIFIED, just_sent, "proxy-ack")
            }
            _ => Outcome::Drop("not for this server"),
        }
    }

    /// Queues a change nobody waits for. Losing it is harmless: the lease comes back from disk
    /// after a restart and only holds its address until it ends.
    fn journal_forget(&self, record: Record) {
        if let Some(journal) = &self.journal {
            if journal.append(record).is_err() {
                tracing::debug!("DHCP lease journal busy; a release or decline is not saved");
            }
        }
    }

    fn reply(
        &self,
        request: &Message,
        client: Client,
        kind: MessageType,
        address: Ipv4Addr,
        loader_just_sent: bool,
        label: &'static str,
    ) -> Outcome {
        let mut reply = Message::new_with_id(
            request.xid(),
            Ipv4Addr::UNSPECIFIED,
            address,
            self.server,
            request.giaddr(),
            request.chaddr(),
        );
        reply.set_opcode(Opcode::BootReply).set_flags(request.flags());
        if kind == MessageType::Ack && address.is_unspecified() {
            reply.set_ciaddr(request.ciaddr());
        }
        let opts = reply.opts_mut();
        opts.insert(DhcpOption::MessageType(kind));
        opts.insert(DhcpOption::ServerIdentifier(self.server));
        if !address.is_unspecified() {
            opts.insert(DhcpOption::AddressLeaseTime(self.config.lease_time_s));
            opts.insert(DhcpOption::SubnetMask(self.config.subnet_mask));
            if let Some(router) = self.config.router {
                opts.insert(DhcpOption::Router(vec![router]));
            }
            if !self.config.dns_servers.is_empty() {
                opts.insert(DhcpOption::DomainNameServer(self.config.dns_servers.clone()));
            }
        }
        if let Some(file) = boot_file(&client, &self.base_url, loader_just_sent) {
            reply.set_fname_str(&file);
            let opts = reply.opts_mut();
            opts.insert(DhcpOption::BootfileName(file.into_bytes()));
            opts.insert(DhcpOption::TFTPServerName(self.server.to_string().into_bytes()));
            let class: &[u8] = if client.firmware == Firmware::UefiHttp { b"HTTPClient" } else { b"PXEClient" };
            opts.insert(DhcpOption::ClassIdentifier(class.to_vec()));
        }
        let to = reply_destination(request, kind);
        Outcome::Reply { message: reply, to, kind: label, client, durable: None }
    }

    fn nak(&self, request: &Message, client: Client) -> Outcome {
        let mut reply = Message::new_with_id(
            request.xid(),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            request.giaddr(),
            request.chaddr(),
        );
        reply.set_opcode(Opcode::BootReply).set_flags(Flags::default().set_broadcast());
        reply.opts_mut().insert(DhcpOption::MessageType(MessageType::Nak));
        reply.opts_mut().insert(DhcpOption::ServerIdentifier(self.server));
        Outcome::Reply {
            message: reply,
            to: SocketAddr::from((Ipv4Addr::BROADCAST, 68)),
            kind: "nak",
            client,
            durable: None,
        }
    }
}

/// Decodes a packet, or `None` if it is malformed. dhcproto asserts on some option lengths (a
/// `debug_assert!` for the bulk-leasequery options, a `len - 1` underflow): a hostile packet
/// must never take the server down, so a panic in the decoder counts as malformed too.
pub fn decode(bytes: &[u8]) -> Option<Message> {
    std::panic::catch_unwind(|| Message::decode(&mut Decoder::new(bytes))).ok()?.ok()
}

/// RFC 2131 4.1: to the relay, to a configured client, or broadcast to a client without an address.
fn reply_destination(request: &Message, kind: MessageType) -> SocketAddr {
    if !request.giaddr().is_unspecified() {
        return SocketAddr::V4(SocketAddrV4::new(request.giaddr(), 67));
    }
    if !request.ciaddr().is_unspecified() && kind == MessageType::Ack {
        return SocketAddr::V4(SocketAddrV4::new(request.ciaddr(), 68));
    }
    SocketAddr::from((Ipv4Addr::BROADCAST, 68))
}

/// Binds the DHCP sockets on the provisioning interface: port 67, and 4011 in proxy mode.
pub fn bind(config: &PxeConfig) -> Result<Vec<(UdpSocket, u16)>, super::PxeError> {
    let fail = |source| super::PxeError::Dhcp { interface: config.interface.clone(), source };
    let mut ports = vec![67];
    if config.dhcp.mode == DhcpMode::Proxy {
        ports.push(4011);
    }
    let mut sockets = Vec::new();
    for port in ports {
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))
            .map_err(fail)?;
        socket.set_reuse_address(true).map_err(fail)?;
        socket.set_broadcast(true).map_err(fail)?;
        // Only the provisioning network: never answer DHCP on the rack's other interfaces.
        socket.bind_device(Some(config.interface.as_bytes())).map_err(fail)?;
        socket.set_nonblocking(true).map_err(fail)?;
        socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)).into()).map_err(fail)?;
        sockets.push((UdpSocket::from_std(socket.into()).map_err(fail)?, port));
    }
    Ok(sockets)
}

/// Opens the lease store (managed mode) and builds the server. Retries while the store cannot be
/// opened: answering without saving leases could give an address twice after a restart. None
/// when `shutdown` comes first.
async fn open_server(pxe: &Arc<Pxe>, shutdown: &CancellationToken) -> Option<DhcpServer> {
    if pxe.config.dhcp.mode != DhcpMode::Managed {
        return Some(DhcpServer::new(&pxe.config, None));
    }
    loop {
        let data_dir = pxe.data_dir.clone();
        match tokio::task::spawn_blocking(move || LeaseJournal::open(&data_dir)).await {
            Ok(Ok(journal)) => return Some(DhcpServer::new(&pxe.config, Some(journal))),
            Ok(Err(e)) => tracing::error!(
                error = %metalrack_image_tools::error_chain(&e),
                retry_s = LEASE_STORE_RETRY.as_secs(),
                "DHCP not serving: cannot open the lease store"
            ),
            Err(e) => tracing::error!(error = %e, "DHCP not serving: opening the lease store failed"),
        }
        tokio::select! {
            () = tokio::time::sleep(LEASE_STORE_RETRY) => {}
            () = shutdown.cancelled() => return None,
        }
    }
}

/// A reply ready to go, and the client it is for.
struct PendingReply {
    message: Message,
    to: SocketAddr,
    kind: &'static str,
    client: Client,
}

/// Serves one DHCP socket until `shutdown`, then sends the ACKs whose leases become durable
/// within [`SHUTDOWN_ACKS_MAX`] and closes the lease journal, which commits what is queued.
pub async fn serve((socket, port): (UdpSocket, u16), pxe: Arc<Pxe>, shutdown: CancellationToken) {
    let Some(mut server) = open_server(&pxe, &shutdown).await else { return };
    pxe.metrics.dhcp_leases.set(server.leases.len() as i64);
    let mut buf = vec![0u8; PACKET_LEN_MAX];
    // ACKs waiting for their lease to be durable. Bounded by the journal: each holds a queued
    // change, and a full queue refuses the change (and so the ACK) instead of waiting.
    let mut waiting = FuturesUnordered::new();
    loop {
        tokio::select! {
            // Replies whose lease is now durable go first: they are the oldest work.
            biased;
            () = shutdown.cancelled() => break,
            Some((durable, reply)) = waiting.next(), if !waiting.is_empty() => match durable {
                Ok(()) => send_reply(&socket, &pxe, reply).await,
                // The writer logged why; the client retries its REQUEST.
                Err(lease_journal::NotDurable) => Metrics::count(&pxe.metrics.dhcp_dropped, "lease not durable"),
            },
            received = socket.recv_from(&mut buf) => {
                let (n, _peer) = match received {
                    Ok(received) => received,
                    Err(e) => {
                        tracing::warn!(error = %e, "DHCP receive failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                };
                match handle_packet(&mut server, &pxe, &buf[..n], port) {
                    Outcome::Drop(reason) => {
                        if matches!(
                            reason,
                            "malformed"
                                | "not a request"
                                | "no message type"
                                | "rate limited"
                                | "address pool or lease table full"
                                | "lease journal busy"
                        ) {
                            Metrics::count(&pxe.metrics.dhcp_dropped, reason);
                            tracing::debug!(reason, "DHCP packet dropped");
                        }
                    }
                    Outcome::Reply { message, to, kind, client, durable } => {
                        let reply = PendingReply { message, to, kind, client };
                        match durable {
                            Some(durable) => waiting.push(async move { (durable.await, reply) }),
                            None => send_reply(&socket, &pxe, reply).await,
                        }
                    }
                }
                pxe.metrics.dhcp_leases.set(server.leases.len() as i64);
            }
        }
    }
    let drained = tokio::time::timeout(SHUTDOWN_ACKS_MAX, async {
        while let Some((durable, reply)) = waiting.next().await {
            if durable.is_ok() {
                send_reply(&socket, &pxe, reply).await;
            }
        }
    });
    if drained.await.is_err() {
        tracing::warn!("DHCP stopping with ACKs unsent: their leases were not durable in time");
    }
    // Dropping the journal waits for its writer to commit what is queued: a blocking wait.
    if let Err(e) = tokio::task::spawn_blocking(move || drop(server)).await {
        tracing::error!(error = %e, "DHCP lease journal did not close cleanly");
    }
    tracing::debug!(port, "DHCP stopped");
}

/// Decodes once, for the metrics and for the handling.
fn handle_packet(server: &mut DhcpServer, pxe: &Pxe, bytes: &[u8], port: u16) -> Outcome {
    let Some(request) = decode(bytes) else { return Outcome::Drop("malformed") };
    if let Some(kind) = request.opts().msg_type() {
        Metrics::count(&pxe.metrics.dhcp_packets, &format!("{kind:?}").to_lowercase());
    }
    let sent = pxe.loader_sent.lock().expect("lock");
    let now = Instant::now();
    server.handle_message(&request, port, |address| sent.just_sent(address, now))
}

async fn send_reply(socket: &UdpSocket, pxe: &Pxe, reply: PendingReply) {
    let PendingReply { message, to, kind, client } = reply;
    let mut bytes = Vec::with_capacity(600);
    if message.encode(&mut Encoder::new(&mut bytes)).is_err() {
        return;
    }
    if let Err(e) = socket.send_to(&bytes, to).await {
        tracing::warn!(error = %e, %to, "DHCP send failed");
        return;
    }
    if !message.yiaddr().is_unspecified() {
        pxe.macs_by_address.lock().expect("lock").insert(message.yiaddr(), client.mac.clone());
    }
    let file = message.fname_str().and_then(Result::ok).unwrap_or_default().to_owned();
    pxe.record(&client.mac, "boot.dhcp", format!("DHCP {kind}: {} {file} ({:?})", message.yiaddr(), client.firmware));
}

#[cfg(test)]
mod tests {
    use super::*;
    use dhcproto::v4::Architecture;

    fn config() -> PxeConfig {
        toml::from_str(
            r#"
            interface = "br0"
            address = "10.99.0.1"
            [dhcp]
            mode = "managed"
            range_start = "10.99.0.100"
            range_end = "10.99.0.101"
            router = "10.99.0.1"
            reservations = [{ mac = "52:54:00:00:00:99", address = "10.99.0.50" }]
            "#,
        )
        .unwrap()
    }

    fn packet(mac: [u8; 6], kind: MessageType, arch: Option<u16>, ipxe: bool, requested: Option<Ipv4Addr>) -> Vec<u8> {
        let mut m = Message::new(
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &mac,
        );
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        m.opts_mut().insert(DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()));
        if let Some(arch) = arch {
            m.opts_mut().insert(DhcpOption::ClientSystemArchitecture(Architecture::from(arch)));
        }
        if ipxe {
            m.opts_mut().insert(DhcpOption::UserClass(b"iPXE".to_vec()));
        }
        if let Some(a) = requested {
            m.opts_mut().insert(DhcpOption::RequestedIpAddress(a));
            m.opts_mut().insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 99, 0, 1)));
        }
        let mut out = Vec::new();
        m.encode(&mut Encoder::new(&mut out)).unwrap();
        out
    }

    fn reply(outcome: Outcome) -> Message {
        match outcome {
            Outcome::Reply { message, .. } => message,
            Outcome::Drop(reason) => panic!("dropped: {reason}"),
        }
    }

    #[test]
    fn discover_request_ack_with_loader_by_firmware() {
        let mut server = DhcpServer::new(&config(), None);
        let mac = [0x52, 0x54, 0, 0xaa, 0xbb, 1];
        let offer = reply(server.handle(&packet(mac, MessageType::Discover, Some(0), false, None), 67, |_| false));
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert_eq!(offer.yiaddr(), Ipv4Addr::new(10, 99, 0, 100));
        assert_eq!(offer.fname_str().unwrap().unwrap(), "undionly.kpxe");
        let ack =
            reply(
                server.handle(&packet(mac, MessageType::Request, Some(0), false, Some(offer.yiaddr())), 67, |_| false),
            );
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert_eq!(server.leases.get("52:54:00:aa:bb:01").unwrap().address, offer.yiaddr());

        let uefi =
            reply(
                server.handle(&packet([2, 0, 0, 0, 0, 2], MessageType::Discover, Some(7), false, None), 67, |_| false),
            );
        assert_eq!(uefi.fname_str().unwrap().unwrap(), "ipxe.efi");
        // iPXE that we loaded (loader sent recently) gets its script, no loop.
        let chained = reply(server.handle(&packet(mac, MessageType::Discover, Some(0), true, None), 67, |_| true));
        assert_eq!(chained.fname_str().unwrap().unwrap(), "http://10.99.0.1:5248/ipxe/52-54-00-aa-bb-01");
        let rom = reply(server.handle(&packet(mac, MessageType::Discover, Some(0), true, None), 67, |_| false));
        assert_eq!(rom.fname_str().unwrap().unwrap(), "undionly.kpxe");
    }

    #[test]
    fn reservations_pool_exhaustion_and_nak() {
        let mut server = DhcpServer::new(&config(), None);
        let reserved = reply(server.handle(
            &packet([0x52, 0x54, 0, 0, 0, 0x99], MessageType::Discover, Some(0), false, None),
            67,
            |_| false,
        ));
        assert_eq!(reserved.yiaddr(), Ipv4Addr::new(10, 99, 0, 50));
        for last in [1u8, 2] {
            let mac = [2, 0, 0, 0, 1, last];
            let offer = reply(server.handle(&packet(mac, MessageType::Discover, Some(0), false, None), 67, |_| false));
            reply(
                server.handle(&packet(mac, MessageType::Request, Some(0), false, Some(offer.yiaddr())), 67, |_| false),
            );
        }
        assert!(matches!(
            server.handle(&packet([2, 0, 0, 0, 1, 3], MessageType::Discover, Some(0), false, None), 67, |_| false),
            Outcome::Drop(_)
        ));
        // A request for an address another client holds is refused.
        let nak = reply(server.handle(
            &packet([2, 0, 0, 0, 1, 4], MessageType::Request, Some(0), false, Some(Ipv4Addr::new(10, 99, 0, 100))),
            67,
            |_| false,
        ));
        assert_eq!(nak.opts().msg_type(), Some(MessageType::Nak));
    }

    #[test]
    fn leases_persist_across_restart() {
        let dir = tempfile::tempdir().unwrap();
        let mac = [2, 0, 0, 0, 2, 1];
        {
            let mut server = DhcpServer::new(
                &config(),
                Some(LeaseJournal::open(&crate::data_dir::DataDir::new(dir.path())).unwrap()),
            );
            let offer = reply(server.handle(&packet(mac, MessageType::Discover, Some(0), false, None), 67, |_| false));
            reply(
                server.handle(&packet(mac, MessageType::Request, Some(0), false, Some(offer.yiaddr())), 67, |_| false),
            );
        }
        let server =
            DhcpServer::new(&config(), Some(LeaseJournal::open(&crate::data_dir::DataDir::new(dir.path())).unwrap()));
        assert_eq!(server.leases.get("02:00:00:00:02:01").unwrap().address, Ipv4Addr::new(10, 99, 0, 100));
    }

    fn wide_config() -> PxeConfig {
        let mut config = config();
        config.dhcp.range_end = Some(Ipv4Addr::new(10, 99, 0, 250));
        config
    }

    /// DISCOVER then REQUEST; returns the ACK and its durability ticket.
    fn bind_client(server: &mut DhcpServer, mac: [u8; 6]) -> (Message, Option<Durable>) {
        let offer = reply(server.handle(&packet(mac, MessageType::Discover, Some(0), false, None), 67, |_| false));
        match server.handle(&packet(mac, MessageType::Request, Some(0), false, Some(offer.yiaddr())), 67, |_| false) {
            Outcome::Reply { message, durable, .. } => (message, durable),
            Outcome::Drop(reason) => panic!("dropped: {reason}"),
        }
    }

    #[test]
    fn ack_is_released_only_once_its_lease_is_durable() {
        let dir = tempfile::tempdir().unwrap();
        let mut server = DhcpServer::new(
            &wide_config(),
            Some(LeaseJournal::open(&crate::data_dir::DataDir::new(dir.path())).unwrap()),
        );
        let stall = server.journal.as_ref().unwrap().stall();
        let stalled = stall.lock().unwrap();
        let (ack, durable) = bind_client(&mut server, [2, 0, 0, 0, 5, 1]);
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        let mut durable = durable.expect("a managed ACK waits for its lease");
        // The disk is stalled: the ACK is held, and other clients are answered meanwhile.
        let offer =
            reply(
                server.handle(&packet([2, 0, 0, 0, 5, 2], MessageType::Discover, Some(0), false, None), 67, |_| false),
            );
        assert_eq!(offer.opts().msg_type(), Some(MessageType::Offer));
        assert!(matches!(
            server.handle(&packet([2, 0, 0, 0, 5, 2], MessageType::Discover, Some(0), false, None), 67, |_| false),
            Outcome::Reply { durable: None, .. }
        ));
        std::thread::sleep(Duration::from_millis(50));
        assert_eq!(durable.try_result(), None);
        drop(stalled);
        assert_eq!(durable.wait_blocking(), Ok(()));
        // A crash right after the ACK: what is on disk already has the lease.
        let restarted = DhcpServer::new(
            &wide_config(),
            Some(LeaseJournal::open(&crate::data_dir::DataDir::new(dir.path())).unwrap()),
        );
        assert_eq!(restarted.leases.get("02:00:00:00:05:01").unwrap().address, ack.yiaddr());
    }

    #[test]
    fn restart_after_many_binds_reloads_every_lease() {
        let dir = tempfile::tempdir().unwrap();
        let mut bound = Vec::new();
        {
            let mut server = DhcpServer::new(
                &wide_config(),
                Some(LeaseJournal::open(&crate::data_dir::DataDir::new(dir.path())).unwrap()),
            );
            for i in 0..120u8 {
                let (ack, durable) = bind_client(&mut server, [2, 0, 0, 0, 6, i]);
                assert_eq!(durable.unwrap().wait_blocking(), Ok(()));
                bound.push((format!("02:00:00:00:06:{i:02x}"), ack.yiaddr()));
            }
            // Released leases stay released.
            server.handle(&packet([2, 0, 0, 0, 6, 0], MessageType::Release, Some(0), false, None), 67, |_| false);
        }
        let server = DhcpServer::new(
            &wide_config(),
            Some(LeaseJournal::open(&crate::data_dir::DataDir::new(dir.path())).unwrap()),
        );
        assert_eq!(server.leases.len(), 119);
        assert!(server.leases.get("02:00:00:00:06:00").is_none());
        for (mac, address) in &bound[1..] {
            assert_eq!(server.leases.get(mac).map(|l| l.address), Some(*address), "{mac}");
        }
    }

    #[test]
    fn without_a_journal_replies_are_not_held() {
        let mut server = DhcpServer::new(&config(), None);
        let (ack, durable) = bind_client(&mut server, [2, 0, 0, 0, 7, 1]);
        assert_eq!(ack.opts().msg_type(), Some(MessageType::Ack));
        assert!(durable.is_none());
    }

    #[test]
    fn malformed_and_flooding_packets_are_dropped() {
        let mut server = DhcpServer::new(&config(), None);
        assert!(matches!(server.handle(b"\x01\x01\x06", 67, |_| false), Outcome::Drop("malformed")));
        assert!(matches!(server.handle(&[0u8; 300], 67, |_| false), Outcome::Drop(_)));
        let discover = packet([2, 0, 0, 0, 3, 1], MessageType::Discover, Some(0), false, None);
        let dropped = (0..100)
            .filter(|_| matches!(server.handle(&discover, 67, |_| false), Outcome::Drop("rate limited")))
            .count();
        assert!(dropped >= 70, "{dropped} of 100 dropped");
    }

    /// A flood of 100k distinct MACs (spoofed) keeps the rate-limit table bounded, and a
    /// client that keeps sending meanwhile is still limited: the flood evicts the least
    /// recently seen, not it.
    #[test]
    fn the_rate_limit_table_stays_bounded_under_100k_macs() {
        let mut limits = RateLimits::default();
        let started = Instant::now();
        let mut noisy_allowed = 0;
        for i in 0..100_000u32 {
            limits.allow(&format!("02:00:{:08x}", i), 20);
            assert!(limits.buckets.len() <= RATE_LIMIT_CLIENTS_MAX, "{} MACs tracked after {i}", limits.buckets.len());
            if i % 100 == 0 && limits.allow("52:54:00:00:00:01", 20) {
                noisy_allowed += 1;
            }
        }
        // 1000 packets from the noisy client: a full bucket (20) plus 20 a second.
        let refilled = (started.elapsed().as_secs_f64() * 20.0).ceil() as usize;
        assert!(noisy_allowed <= 20 + refilled, "{noisy_allowed} of 1000 allowed in {:?}", started.elapsed());
    }

    proptest::proptest! {
        /// Any bytes, and any mutation of a valid packet, are handled without a panic.
        #[test]
        fn arbitrary_packets_never_panic(bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
            let mut server = DhcpServer::new(&config(), None);
            let _ = server.handle(&bytes, 67, |_| false);
        }

        #[test]
        fn mutated_packets_never_panic(index in 0usize..400, value: u8, truncate in 0usize..400) {
            let mut bytes = packet([2, 0, 0, 0, 9, 9], MessageType::Discover, Some(7), true, Some(Ipv4Addr::new(10, 99, 0, 100)));
            if index < bytes.len() {
                bytes[index] = value;
            }
            bytes.truncate(truncate.max(1));
            let mut server = DhcpServer::new(&config(), None);
            let _ = server.handle(&bytes, 67, |_| false);
            let _ = server.handle(&bytes, 4011, |_| true);
        }
    }

    #[test]
    fn proxy_mode_offers_boot_options_without_addresses() {
        let mut config = config();
        config.dhcp.mode = DhcpMode::Proxy;
        let mut server = DhcpServer::new(&config, None);
        let offer =
            reply(
                server.handle(&packet([2, 0, 0, 0, 4, 1], MessageType::Discover, Some(7), false, None), 67, |_| false),
            );
        assert!(offer.yiaddr().is_unspecified());
        assert_eq!(offer.fname_str().unwrap().unwrap(), "ipxe.efi");
        assert!(offer.opts().get(OptionCode::AddressLeaseTime).is_none());
    }
}
