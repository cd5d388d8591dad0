//! DHCP for PXE (dhcproto): managed mode (leases from a range, persisted, reservations) or
//! proxy mode (PXE options only, beside another DHCP server). Picks the loader by firmware
//! (option 93), sends iPXE (option 77) its per-MAC script URL. Malformed packets are dropped
//! and counted; each client is rate-limited.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dhcproto::v4::{DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable, Encoder};
use serde::{Deserialize, Serialize};
use tokio::net::UdpSocket;

use super::metrics::Metrics;
use super::{Pxe, LOADER_CHAIN_WINDOW};
use crate::config::{DhcpConfig, DhcpMode, PxeConfig};

/// Largest DHCP packet read; anything longer is truncated by the kernel and dropped as malformed.
const PACKET_LEN_MAX: usize = 1500;

/// An address offered but not requested is held for this long before it can go to another client.
const OFFER_HOLD: Duration = Duration::from_secs(60);

/// A declined address (in use by someone else) is not offered again for this long.
const DECLINE_HOLD: Duration = Duration::from_secs(600);

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

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Lease {
    pub mac: String,
    pub address: Ipv4Addr,
    pub expires_at_ms: i64,
    /// False while only offered.
    pub bound: bool,
}

/// Leases of managed mode, persisted to `DATA/dhcp-leases.json` on every change.
#[derive(Debug)]
pub struct Leases {
    config: DhcpConfig,
    server: Ipv4Addr,
    path: Option<PathBuf>,
    by_mac: HashMap<String, Lease>,
    offered_at: HashMap<String, Instant>,
    declined: HashMap<Ipv4Addr, Instant>,
}

impl Leases {
    pub fn load(config: &DhcpConfig, server: Ipv4Addr, path: Option<PathBuf>) -> Leases {
        let now = crate::status::now_ms();
        let by_mac: HashMap<String, Lease> = path
            .as_ref()
            .and_then(|p| std::fs::read(p).ok())
            .and_then(|bytes| serde_json::from_slice::<Vec<Lease>>(&bytes).ok())
            .unwrap_or_default()
            .into_iter()
            .filter(|l| l.bound && l.expires_at_ms > now)
            .map(|l| (l.mac.clone(), l))
            .collect();
        Leases { config: config.clone(), server, path, by_mac, offered_at: HashMap::new(), declined: HashMap::new() }
    }

    pub fn len(&self) -> usize {
        self.by_mac.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_mac.is_empty()
    }

    pub fn get(&self, mac: &str) -> Option<&Lease> {
        self.by_mac.get(mac)
    }

    fn save(&self) {
        if let Some(path) = &self.path {
            let leases: Vec<&Lease> = self.by_mac.values().filter(|l| l.bound).collect();
            let json = serde_json::to_vec_pretty(&leases).expect("leases serialize");
            if let Err(e) = metalrack_api::private_file::write_private_file(path, &json) {
                tracing::warn!(error = %e, "cannot save DHCP leases");
            }
        }
    }

    fn in_use(&self, address: Ipv4Addr, mac: &str, now_ms: i64) -> bool {
        address == self.server
            || Some(address) == self.config.router
            || self.config.reservations.iter().any(|r| r.address == address && !r.mac.eq_ignore_ascii_case(mac))
            || self.declined.get(&address).is_some_and(|t| t.elapsed() < DECLINE_HOLD)
            || self.by_mac.values().any(|l| {
                l.address == address
                    && l.mac != mac
                    && (if l.bound {
                        l.expires_at_ms > now_ms
                    } else {
                        self.offered_at.get(&l.mac).is_some_and(|t| t.elapsed() < OFFER_HOLD)
                    })
            })
    }

    /// The address to offer `mac`: its reservation, its lease, the one it asks for, or the
    /// first free one in the range. `None` when the pool or the lease table is full.
    pub fn offer(&mut self, mac: &str, requested: Option<Ipv4Addr>) -> Option<Ipv4Addr> {
        let now = crate::status::now_ms();
        let address = if let Some(r) = self.config.reservations.iter().find(|r| r.mac.eq_ignore_ascii_case(mac)) {
            r.address
        } else if let Some(lease) = self.by_mac.get(mac).filter(|l| !self.in_use(l.address, mac, now)) {
            lease.address
        } else {
            let (start, end) = (u32::from(self.config.range_start?), u32::from(self.config.range_end?));
            let wanted = requested.filter(|a| (start..=end).contains(&u32::from(*a)) && !self.in_use(*a, mac, now));
            match wanted {
                Some(a) => a,
                None => (start..=end).map(Ipv4Addr::from).find(|a| !self.in_use(*a, mac, now))?,
            }
        };
        if !self.by_mac.contains_key(mac) && self.by_mac.len() >= self.config.leases_max {
            self.by_mac.retain(|_, l| l.bound && l.expires_at_ms > now);
            if self.by_mac.len() >= self.config.leases_max {
                return None;
            }
        }
        let lease = self.by_mac.entry(mac.to_owned()).or_insert(Lease {
            mac: mac.to_owned(),
            address,
            expires_at_ms: 0,
            bound: false,
        });
        lease.address = address;
        self.offered_at.insert(mac.to_owned(), Instant::now());
        Some(address)
    }

    /// Binds `address` to `mac` if it is the one this server would give it.
    pub fn bind(&mut self, mac: &str, address: Ipv4Addr) -> bool {
        let now = crate::status::now_ms();
        let expected = match self.by_mac.get(mac) {
            Some(lease) => lease.address == address,
            // INIT-REBOOT after a rack restart lost an offer: accept a free address in range.
            None => self.offer(mac, Some(address)) == Some(address),
        };
        if !expected || self.in_use(address, mac, now) {
            return false;
        }
        let lease = self.by_mac.get_mut(mac).expect("offered above");
        lease.bound = true;
        lease.expires_at_ms = now + i64::from(self.config.lease_time_s) * 1000;
        self.save();
        true
    }

    pub fn release(&mut self, mac: &str) {
        if self.by_mac.remove(mac).is_some() {
            self.save();
        }
    }

    pub fn decline(&mut self, mac: &str, address: Ipv4Addr) {
        self.declined.insert(address, Instant::now());
        self.by_mac.remove(mac);
        self.save();
    }
}

/// Per-client token buckets; the table is bounded by pruning idle clients.
#[derive(Debug, Default)]
struct RateLimits {
    buckets: HashMap<String, (f64, Instant)>,
}

/// Clients tracked for rate limiting before idle ones are pruned.
const RATE_LIMIT_CLIENTS_MAX: usize = 16_384;

impl RateLimits {
    fn allow(&mut self, mac: &str, per_s: u32) -> bool {
        if self.buckets.len() >= RATE_LIMIT_CLIENTS_MAX {
            self.buckets.retain(|_, (_, t)| t.elapsed() < Duration::from_secs(10));
        }
        let capacity = f64::from(per_s.max(1));
        let (tokens, last) = self.buckets.entry(mac.to_owned()).or_insert((capacity, Instant::now()));
        *tokens = (*tokens + last.elapsed().as_secs_f64() * capacity).min(capacity);
        *last = Instant::now();
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The DHCP logic, without sockets, so it can be tested packet by packet.
#[derive(Debug)]
pub struct DhcpServer {
    pub mode: DhcpMode,
    pub server: Ipv4Addr,
    pub base_url: String,
    pub leases: Leases,
    config: DhcpConfig,
    limits: RateLimits,
}

/// What to do with a request: a reply and where to send it, or a reason to drop it.
#[derive(Debug)]
pub enum Outcome {
    Reply { message: Message, to: SocketAddr, kind: &'static str, client: Client },
    Drop(&'static str),
}

impl DhcpServer {
    pub fn new(config: &PxeConfig, leases_path: Option<PathBuf>) -> DhcpServer {
        DhcpServer {
            mode: config.dhcp.mode,
            server: config.address,
            base_url: format!("http://{}:{}", config.address, config.http_listen.port()),
            leases: Leases::load(&config.dhcp, config.address, leases_path),
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
                if self.leases.bind(&client.mac, address) {
                    let just_sent = loader_just_sent(address);
                    self.reply(request, client, MessageType::Ack, address, just_sent, "ack")
                } else {
                    self.nak(request, client)
                }
            }
            (DhcpMode::Managed, MessageType::Release) => {
                self.leases.release(&client.mac);
                Outcome::Drop("released")
            }
            (DhcpMode::Managed, MessageType::Decline) => {
                if let Some(address) = requested {
                    self.leases.decline(&client.mac, address);
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
        Outcome::Reply { message: reply, to, kind: label, client }
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
        Outcome::Reply { message: reply, to: SocketAddr::from((Ipv4Addr::BROADCAST, 68)), kind: "nak", client }
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

/// Serves one DHCP socket forever.
pub async fn serve((socket, port): (UdpSocket, u16), pxe: Arc<Pxe>) {
    let leases_path = (pxe.config.dhcp.mode == DhcpMode::Managed).then(|| pxe.data_dir.join("dhcp-leases.json"));
    let mut server = DhcpServer::new(&pxe.config, leases_path);
    pxe.metrics.dhcp_leases.set(server.leases.len() as i64);
    let mut buf = vec![0u8; PACKET_LEN_MAX];
    loop {
        let (n, _peer) = match socket.recv_from(&mut buf).await {
            Ok(received) => received,
            Err(e) => {
                tracing::warn!(error = %e, "DHCP receive failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let outcome = match decode(&buf[..n]) {
            None => Outcome::Drop("malformed"),
            Some(request) => {
                if let Some(kind) = request.opts().msg_type() {
                    Metrics::count(&pxe.metrics.dhcp_packets, &format!("{kind:?}").to_lowercase());
                }
                let sent = pxe.loader_sent.lock().expect("lock");
                server.handle_message(&request, port, |address| {
                    sent.get(&address).is_some_and(|t| t.elapsed() < LOADER_CHAIN_WINDOW)
                })
            }
        };
        match outcome {
            Outcome::Drop(reason) => {
                if matches!(
                    reason,
                    "malformed"
                        | "not a request"
                        | "no message type"
                        | "rate limited"
                        | "address pool or lease table full"
                ) {
                    Metrics::count(&pxe.metrics.dhcp_dropped, reason);
                    tracing::debug!(reason, "DHCP packet dropped");
                }
            }
            Outcome::Reply { message, to, kind, client } => {
                let mut bytes = Vec::with_capacity(600);
                if message.encode(&mut Encoder::new(&mut bytes)).is_err() {
                    continue;
                }
                if let Err(e) = socket.send_to(&bytes, to).await {
                    tracing::warn!(error = %e, %to, "DHCP send failed");
                    continue;
                }
                if !message.yiaddr().is_unspecified() {
                    pxe.macs_by_address.lock().expect("lock").insert(message.yiaddr(), client.mac.clone());
                }
                let file = message.fname_str().and_then(Result::ok).unwrap_or_default().to_owned();
                pxe.record(
                    &client.mac,
                    "boot.dhcp",
                    format!("DHCP {kind}: {} {file} ({:?})", message.yiaddr(), client.firmware),
                );
            }
        }
        pxe.metrics.dhcp_leases.set(server.leases.len() as i64);
    }
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
        let path = dir.path().join("leases.json");
        let mac = [2, 0, 0, 0, 2, 1];
        {
            let mut server = DhcpServer::new(&config(), Some(path.clone()));
            let offer = reply(server.handle(&packet(mac, MessageType::Discover, Some(0), false, None), 67, |_| false));
            reply(
                server.handle(&packet(mac, MessageType::Request, Some(0), false, Some(offer.yiaddr())), 67, |_| false),
            );
        }
        let server = DhcpServer::new(&config(), Some(path));
        assert_eq!(server.leases.get("02:00:00:00:02:01").unwrap().address, Ipv4Addr::new(10, 99, 0, 100));
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
