//! One simulated machine's network stack: a smoltcp [`Interface`] on its switch port, and the
//! blocking operations the firmware and the agent need on it: DHCP (smoltcp's client with the
//! PXE options), a TFTP read, HTTP requests over kept-alive TCP connections. Every wait is
//! bounded and ends early when the machine loses power.

use std::net::Ipv4Addr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use smoltcp::iface::{Config, Interface, SocketHandle, SocketSet};
use smoltcp::socket::{dhcpv4, tcp, udp};
use smoltcp::wire::{DhcpOption, EthernetAddress, HardwareAddress, IpCidr, IpEndpoint, Ipv4Cidr};

use super::http::{self, Head, Url};
use super::switch::{Port, PortDevice, Switch};
use super::tftp;

/// TCP receive buffer per connection: the window the rack may fill before waiting for an ACK.
/// At most 65,535 bytes, so that smoltcp uses no window scaling. With scaling (it was 1 MiB,
/// shift 5) smoltcp 0.12 advertises its free space rounded down to the scale, so when a machine
/// reads slower than the rack sends (a starved simulator) the window's right edge can move back
/// a few bytes after the rack has already sent up to it; smoltcp accepts those bytes (it checks
/// segments against its buffer, not its last window) and then panics computing the next window
/// update ("attempt to subtract sequence numbers with underflow", `last_scaled_window`; the same
/// trace as smoltcp issue #1048, and the code is unchanged in 0.13). The 10 GiB deploy storm hit
/// it. Unscaled, the advertised edge never moves back. 64 KiB still moves a range request at
/// hundreds of MB/s over the lab's sub-millisecond links, more than a simulated machine takes.
pub const TCP_RX_BUFFER_BYTES: usize = u16::MAX as usize;
const _: () = assert!(TCP_RX_BUFFER_BYTES <= u16::MAX as usize, "a larger buffer turns window scaling on");
/// TCP send buffer: requests and JSON reports are small.
pub const TCP_TX_BUFFER_BYTES: usize = 64 * 1024;
/// UDP buffers (TFTP): one window of datagrams, each up to a jumbo frame.
const UDP_PACKETS_MAX: usize = 64;
const UDP_BUFFER_BYTES: usize = 64 * 1024;
/// A DHCP packet is at most an Ethernet payload.
const DHCP_PACKET_BYTES_MAX: usize = 1500;

/// Connecting to the rack on its own network takes milliseconds; 10 s means it is not there.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A response that makes no progress for this long is given up (the rack is gone or stuck).
pub const READ_TIMEOUT: Duration = Duration::from_secs(30);
/// TFTP: the first reply must come within this, else the last packet is sent again and the
/// wait doubles (1, 2, 4, 8, 16 s, as PXE ROMs back off): a rack serving a hundred machines'
/// loaders at once, or a fleet sharing a core with it, answers late, not never ...
const TFTP_TIMEOUT: Duration = Duration::from_secs(1);
/// ... at most this many times in a row (PXE ROMs give up after a handful too).
const TFTP_RETRIES_MAX: u32 = 5;
/// Largest file a TFTP read takes: loaders are under 2 MiB.
pub const TFTP_FILE_BYTES_MAX: u64 = 32 << 20;
/// Longest wait between two polls when smoltcp has no timer due: a power-off is noticed by a
/// wake-up, so this only bounds clock drift of idle sockets.
const IDLE_WAIT: Duration = Duration::from_millis(200);
/// Largest body read whole into memory (scripts, tasks, manifests are read with their own,
/// smaller limits).
const ERROR_BODY_BYTES_MAX: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("the machine lost power")]
    Aborted,
    #[error("no {what} within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("TFTP read of {file:?}: {reason}")]
    Tftp { file: String, reason: String },
    #[error("{url}: {reason}")]
    Http { url: String, reason: String },
    #[error("{url}: the response is malformed")]
    HttpWire { url: String, source: http::WireError },
    #[error("{url}: the rack answered {status}: {body}")]
    HttpStatus { url: String, status: u16, body: String },
}

impl NetError {
    /// Whether trying again may help (a dropped connection, a 5xx) or not (a 404, a bad token).
    pub fn retryable(&self) -> bool {
        match self {
            NetError::Aborted | NetError::HttpWire { .. } => false,
            NetError::HttpStatus { status, .. } => *status >= 500 || *status == 408 || *status == 429,
            _ => true,
        }
    }
}

/// Bytes a machine received, by protocol (shared with its status).
#[derive(Debug, Default)]
pub struct Counters {
    pub bytes_tftp: AtomicU64,
    pub bytes_http: AtomicU64,
}

/// What a DHCP exchange gave.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    pub address: Ipv4Cidr,
    /// `siaddr`: where the boot file is.
    pub next_server: Ipv4Addr,
    pub boot_file: String,
}

/// What a smoltcp-side wait says after each poll.
enum Check<T> {
    Done(T),
    /// Something moved: the no-progress deadline starts again.
    Progressed,
    Waiting,
}

pub type Aborted = Arc<dyn Fn() -> bool + Send + Sync>;

/// The stack.
pub struct Net {
    iface: Interface,
    device: PortDevice,
    sockets: SocketSet<'static>,
    port: Arc<Port>,
    aborted: Aborted,
    next_local_port: u16,
    pub counters: Arc<Counters>,
}

fn now() -> smoltcp::time::Instant {
    smoltcp::time::Instant::now()
}

impl Net {
    /// A stack on port `index` of `switch` with no address yet (a NIC just reset).
    pub fn new(switch: Arc<Switch>, index: usize, mtu: usize, aborted: Aborted, counters: Arc<Counters>) -> Net {
        let mut device = PortDevice::new(switch.clone(), index, mtu);
        let mac = switch.port(index).mac();
        let mut config = Config::new(HardwareAddress::Ethernet(EthernetAddress(mac)));
        let seed: u64 = rand::random();
        config.random_seed = seed;
        let iface = Interface::new(config, &mut device, now());
        Net {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            port: switch.port(index),
            aborted,
            next_local_port: 49152 + (seed % 10000) as u16,
            counters,
        }
    }

    /// Whether the machine lost power (the fleet stopped, or its BMC turned it off).
    pub fn is_aborted(&self) -> bool {
        (self.aborted)()
    }

    fn local_port(&mut self) -> u16 {
        self.next_local_port = if self.next_local_port >= 65000 { 49152 } else { self.next_local_port + 1 };
        self.next_local_port
    }

    fn poll(&mut self) {
        self.iface.poll(now(), &mut self.device, &mut self.sockets);
    }

    /// Sleeps until a frame comes, smoltcp has a timer due, `limit` passes or power goes.
    fn wait(&mut self, limit: Duration) {
        let delay = self
            .iface
            .poll_delay(now(), &self.sockets)
            .map_or(IDLE_WAIT, |delay| Duration::from_micros(delay.total_micros()))
            .min(limit)
            .min(IDLE_WAIT);
        if !delay.is_zero() {
            let aborted = self.aborted.clone();
            self.port.wait(delay, move || aborted());
        }
    }

    /// Polls and checks until `check` is done, failing after `timeout` without progress.
    fn run<T>(
        &mut self,
        what: &str,
        timeout: Duration,
        mut check: impl FnMut(&mut Net) -> Result<Check<T>, NetError>,
    ) -> Result<T, NetError> {
        let mut deadline = Instant::now() + timeout;
        loop {
            if (self.aborted)() {
                return Err(NetError::Aborted);
            }
            self.poll();
            match check(self)? {
                Check::Done(value) => {
                    // Whatever the check queued (an ACK, a request) goes out now.
                    self.poll();
                    return Ok(value);
                }
                Check::Progressed => {
                    deadline = Instant::now() + timeout;
                    continue;
                }
                Check::Waiting => {}
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(NetError::Timeout { what: what.to_string(), timeout });
            }
            self.wait(deadline - now);
        }
    }

    /// Sleeps `duration` (a script's `sleep`), ending early when power goes.
    pub fn sleep(&mut self, duration: Duration) -> Result<(), NetError> {
        let end = Instant::now() + duration;
        while Instant::now() < end {
            if (self.aborted)() {
                return Err(NetError::Aborted);
            }
            self.poll();
            self.wait(end.saturating_duration_since(Instant::now()));
        }
        Ok(())
    }

    /// A DHCP exchange sending `options` (the PXE ones, or none as Linux's client), which
    /// configures the interface's address and default route.
    pub fn dhcp(&mut self, options: &[DhcpOption<'_>], timeout: Duration) -> Result<Lease, NetError> {
        self.iface.update_ip_addrs(|addresses| addresses.clear());
        self.iface.routes_mut().remove_default_ipv4_route();
        let mut packet = vec![0u8; DHCP_PACKET_BYTES_MAX];
        let mut socket = dhcpv4::Socket::new();
        socket.set_outgoing_options(options);
        socket.set_receive_packet_buffer(&mut packet);
        // smoltcp waits 10 s before a second DISCOVER; firmware tries again within 4 s.
        let mut retry = dhcpv4::RetryConfig::default();
        retry.discover_timeout = smoltcp::time::Duration::from_secs(2);
        retry.initial_request_timeout = smoltcp::time::Duration::from_secs(1);
        socket.set_retry_config(retry);
        let mut set = SocketSet::new(Vec::new());
        let handle = set.add(socket);
        let deadline = Instant::now() + timeout;
        loop {
            if (self.aborted)() {
                return Err(NetError::Aborted);
            }
            self.iface.poll(now(), &mut self.device, &mut set);
            if let Some(dhcpv4::Event::Configured(config)) = set.get_mut::<dhcpv4::Socket>(handle).poll() {
                let (next_server, boot_file) = match &config.packet {
                    Some(packet) => (packet.server_ip(), packet.get_boot_file().unwrap_or_default().to_string()),
                    None => (Ipv4Addr::UNSPECIFIED, String::new()),
                };
                let lease = Lease { address: config.address, next_server, boot_file };
                let router = config.router;
                self.iface.update_ip_addrs(|addresses| {
                    let _ = addresses.push(IpCidr::Ipv4(lease.address));
                });
                if let Some(router) = router {
                    let _ = self.iface.routes_mut().add_default_ipv4_route(router);
                }
                return Ok(lease);
            }
            let now_std = Instant::now();
            if now_std >= deadline {
                return Err(NetError::Timeout { what: "DHCP lease".into(), timeout });
            }
            let delay = self
                .iface
                .poll_delay(now(), &set)
                .map_or(IDLE_WAIT, |delay| Duration::from_micros(delay.total_micros()))
                .min(deadline - now_std)
                .min(IDLE_WAIT);
            let aborted = self.aborted.clone();
            self.port.wait(delay, move || aborted());
        }
    }

    /// Reads `file` from the TFTP server at `server`; returns its length. The bytes are counted,
    /// not kept: a simulated machine does not run the loader.
    pub fn tftp_read(&mut self, server: Ipv4Addr, file: &str, blksize: u16) -> Result<u64, NetError> {
        let fail = |reason: String| NetError::Tftp { file: file.to_string(), reason };
        let mut socket = udp::Socket::new(
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; UDP_PACKETS_MAX], vec![0; UDP_BUFFER_BYTES]),
            udp::PacketBuffer::new(vec![udp::PacketMetadata::EMPTY; UDP_PACKETS_MAX], vec![0; UDP_BUFFER_BYTES]),
        );
        let local = self.local_port();
        socket.bind(local).map_err(|e| fail(format!("cannot bind UDP port {local}: {e}")))?;
        let handle = self.sockets.add(socket);
        let result = self.tftp_transfer(handle, server, file, blksize);
        self.sockets.remove(handle);
        result.map_err(|error| match error {
            NetError::Tftp { .. } | NetError::Aborted => error,
            other => fail(other.to_string()),
        })
    }

    fn tftp_transfer(
        &mut self,
        handle: SocketHandle,
        server: Ipv4Addr,
        file: &str,
        asked: u16,
    ) -> Result<u64, NetError> {
        let fail = |reason: String| NetError::Tftp { file: file.to_string(), reason };
        let mut last_sent = tftp::read_request(file, asked);
        let mut destination = IpEndpoint::new(server.into(), 69);
        let mut server_port: Option<u16> = None;
        let mut blksize = 512u16;
        let mut expected: u16 = 1;
        let mut total = 0u64;
        let mut retries = 0;
        let mut sent_at = Instant::now();
        let send = |net: &mut Net, bytes: &[u8], to: IpEndpoint| -> Result<(), NetError> {
            net.sockets
                .get_mut::<udp::Socket>(handle)
                .send_slice(bytes, to)
                .map_err(|e| NetError::Tftp { file: file.to_string(), reason: format!("cannot send: {e}") })
        };
        send(self, &last_sent, destination)?;
        loop {
            if (self.aborted)() {
                return Err(NetError::Aborted);
            }
            self.poll();
            let mut received = Vec::new();
            {
                let socket = self.sockets.get_mut::<udp::Socket>(handle);
                while let Ok((payload, meta)) = socket.recv() {
                    received.push((payload.to_vec(), meta.endpoint));
                }
            }
            for (payload, from) in received {
                if from.addr != server.into() || server_port.is_some_and(|port| port != from.port) {
                    continue; // not our server's transfer
                }
                let packet = tftp::Packet::parse(&payload).map_err(|e| fail(e.to_string()))?;
                if server_port.is_none() {
                    server_port = Some(from.port);
                    destination = from;
                }
                match packet {
                    tftp::Packet::Oack { options } if expected == 1 => {
                        blksize = tftp::granted_blksize(&options, asked)
                            .ok_or_else(|| fail(format!("the server granted an unusable blksize: {options:?}")))?;
                        last_sent = tftp::ack(0).to_vec();
                    }
                    tftp::Packet::Oack { .. } => continue,
                    tftp::Packet::Error { code, message } => return Err(fail(format!("error {code}: {message}"))),
                    tftp::Packet::Data { block, payload } if block == expected => {
                        if payload.len() > usize::from(blksize) {
                            return Err(fail(format!(
                                "block {block} has {} bytes, over blksize {blksize}",
                                payload.len()
                            )));
                        }
                        total += payload.len() as u64;
                        self.counters.bytes_tftp.fetch_add(payload.len() as u64, Ordering::Relaxed);
                        if total > TFTP_FILE_BYTES_MAX {
                            return Err(fail(format!("the file is over {TFTP_FILE_BYTES_MAX} bytes")));
                        }
                        last_sent = tftp::ack(block).to_vec();
                        expected = expected.wrapping_add(1);
                        if payload.len() < usize::from(blksize) {
                            send(self, &last_sent, destination)?;
                            // The last ACK goes out; the transfer is done for us.
                            self.poll();
                            return Ok(total);
                        }
                    }
                    // A duplicate (our ACK was lost): ACK it again; anything else is ignored.
                    tftp::Packet::Data { block, .. } if block == expected.wrapping_sub(1) => {}
                    tftp::Packet::Data { .. } => continue,
                }
                send(self, &last_sent, destination)?;
                retries = 0;
                sent_at = Instant::now();
            }
            let timeout = TFTP_TIMEOUT * (1 << retries.min(TFTP_RETRIES_MAX));
            if sent_at.elapsed() >= timeout {
                retries += 1;
                if retries > TFTP_RETRIES_MAX {
                    return Err(fail(format!("no answer after {TFTP_RETRIES_MAX} retransmissions (block {expected})")));
                }
                send(self, &last_sent, destination)?;
                sent_at = Instant::now();
            }
            self.poll();
            self.wait((TFTP_TIMEOUT * (1 << retries.min(TFTP_RETRIES_MAX))).saturating_sub(sent_at.elapsed()));
        }
    }
}

/// Where a response body goes.
pub enum Sink<'b> {
    /// Kept, up to `limit` bytes (more is an error).
    Collect { into: &'b mut Vec<u8>, limit: u64 },
    /// Counted and dropped (a kernel the simulation does not run).
    Count(&'b mut u64),
    /// Exactly the buffer's length (a range of the image); `filled` says how much arrived.
    Exact { buf: &'b mut [u8], filled: &'b mut usize },
}

/// An HTTP/1.1 client with one kept-alive connection.
#[derive(Debug, Default)]
pub struct HttpClient {
    conn: Option<(SocketHandle, Ipv4Addr, u16)>,
}

impl HttpClient {
    pub fn new() -> HttpClient {
        HttpClient::default()
    }

    /// Drops the connection (a reset the rack sees at once).
    pub fn close(&mut self, net: &mut Net) {
        if let Some((handle, _, _)) = self.conn.take() {
            net.sockets.get_mut::<tcp::Socket>(handle).abort();
            net.poll();
            net.sockets.remove(handle);
        }
    }

    fn connect(&mut self, net: &mut Net, url: &Url) -> Result<(SocketHandle, bool), NetError> {
        if let Some((handle, host, port)) = self.conn {
            let socket = net.sockets.get::<tcp::Socket>(handle);
            let alive = socket.state() == tcp::State::Established && socket.recv_queue() == 0;
            if host == url.host && port == url.port && alive {
                return Ok((handle, true));
            }
            self.close(net);
        }
        let mut socket = tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0; TCP_RX_BUFFER_BYTES]),
            tcp::SocketBuffer::new(vec![0; TCP_TX_BUFFER_BYTES]),
        );
        socket.set_nagle_enabled(false);
        let local = net.local_port();
        let remote = IpEndpoint::new(url.host.into(), url.port);
        socket
            .connect(net.iface.context(), remote, local)
            .map_err(|e| NetError::Http { url: url.target.clone(), reason: format!("cannot connect: {e}") })?;
        let handle = net.sockets.add(socket);
        self.conn = Some((handle, url.host, url.port));
        let target = url.target.clone();
        net.run("a TCP connection to the rack", CONNECT_TIMEOUT, |net| {
            let socket = net.sockets.get::<tcp::Socket>(handle);
            match socket.state() {
                tcp::State::Established => Ok(Check::Done(())),
                tcp::State::Closed | tcp::State::TimeWait => {
                    Err(NetError::Http { url: target.clone(), reason: "the connection was refused".into() })
                }
                _ => Ok(Check::Waiting),
            }
        })
        .inspect_err(|_| self.close(net))?;
        Ok((handle, false))
    }

    /// Sends a request and reads the response's head.
    fn send_and_head(
        &mut self,
        net: &mut Net,
        url: &Url,
        raw_url: &str,
        request: &[u8],
    ) -> Result<(SocketHandle, Head), NetError> {
        // A kept connection the rack closed meanwhile fails before any answer: once more, fresh.
        for attempt in 0..2 {
            let (handle, reused) = self.connect(net, url)?;
            match Self::exchange_head(net, handle, raw_url, request) {
                Ok(head) => return Ok((handle, head)),
                Err(NetError::Http { .. }) if reused && attempt == 0 => self.close(net),
                Err(error) => {
                    self.close(net);
                    return Err(error);
                }
            }
        }
        unreachable!("the second attempt returns")
    }

    fn exchange_head(net: &mut Net, handle: SocketHandle, url: &str, request: &[u8]) -> Result<Head, NetError> {
        let closed = || NetError::Http { url: url.to_string(), reason: "the rack closed the connection".into() };
        let mut sent = 0;
        net.run("room to send the request", READ_TIMEOUT, |net| {
            let socket = net.sockets.get_mut::<tcp::Socket>(handle);
            if !socket.may_send() {
                return Err(closed());
            }
            let before = sent;
            sent += socket.send_slice(&request[sent..]).map_err(|_| closed())?;
            Ok(if sent == request.len() {
                Check::Done(())
            } else if sent > before {
                Check::Progressed
            } else {
                Check::Waiting
            })
        })?;
        let mut head = Vec::new();
        let end = net.run("a response head", READ_TIMEOUT, |net| {
            let socket = net.sockets.get_mut::<tcp::Socket>(handle);
            if !socket.can_recv() {
                return if socket.may_recv() { Ok(Check::Waiting) } else { Err(closed()) };
            }
            let old = head.len();
            let found = socket
                .recv(|data| {
                    let take = data.len().min(http::HEAD_BYTES_MAX + 1 - old);
                    head.extend_from_slice(&data[..take]);
                    let from = old.saturating_sub(3);
                    match http::head_end(&head[from..]) {
                        Some(end) => {
                            let end = from + end;
                            head.truncate(end);
                            (end - old, Some(end))
                        }
                        None => (take, None),
                    }
                })
                .map_err(|_| closed())?;
            match found {
                Some(end) => Ok(Check::Done(end)),
                None if head.len() > http::HEAD_BYTES_MAX => {
                    Err(NetError::HttpWire { url: url.to_string(), source: http::WireError::HeadTooLong })
                }
                None => Ok(Check::Progressed),
            }
        })?;
        http::parse_head(&head[..end]).map_err(|source| NetError::HttpWire { url: url.to_string(), source })
    }

    fn read_body(
        net: &mut Net,
        handle: SocketHandle,
        url: &str,
        head: &Head,
        sink: &mut Sink<'_>,
    ) -> Result<(), NetError> {
        let fail = |reason: String| NetError::Http { url: url.to_string(), reason };
        let length = head.content_length;
        match (&sink, length) {
            (Sink::Collect { limit, .. }, Some(length)) if length > *limit => {
                return Err(fail(format!("the body of {length} bytes is over the limit of {limit}")))
            }
            (Sink::Exact { buf, .. }, Some(length)) if length != buf.len() as u64 => {
                return Err(fail(format!("the body has {length} bytes, {} were asked for", buf.len())))
            }
            (Sink::Exact { .. }, None) => return Err(fail("a range answer without Content-Length".into())),
            _ => {}
        }
        let mut received = 0u64;
        let counters = net.counters.clone();
        net.run("the response body", READ_TIMEOUT, |net| {
            if length.is_some_and(|length| received >= length) {
                return Ok(Check::Done(()));
            }
            let socket = net.sockets.get_mut::<tcp::Socket>(handle);
            if !socket.can_recv() {
                return match (socket.may_recv(), length) {
                    (true, _) => Ok(Check::Waiting),
                    (false, None) => Ok(Check::Done(())),
                    (false, Some(length)) => {
                        Err(fail(format!("the connection closed after {received} of {length} body bytes")))
                    }
                };
            }
            let before = received;
            while socket.can_recv() {
                let want = length.map_or(usize::MAX, |length| (length - received) as usize);
                if want == 0 {
                    break;
                }
                let got = match sink {
                    Sink::Exact { buf, filled } => {
                        let n = socket.recv_slice(&mut buf[**filled..]).map_err(|e| fail(e.to_string()))?;
                        **filled += n;
                        n
                    }
                    Sink::Count(count) => {
                        let n = socket.recv(|data| {
                            let n = data.len().min(want);
                            (n, n)
                        });
                        let n = n.map_err(|e| fail(e.to_string()))?;
                        **count += n as u64;
                        n
                    }
                    Sink::Collect { into, limit } => {
                        let n = socket.recv(|data| {
                            let n = data.len().min(want);
                            into.extend_from_slice(&data[..n]);
                            (n, n)
                        });
                        let n = n.map_err(|e| fail(e.to_string()))?;
                        if into.len() as u64 > *limit {
                            return Err(fail(format!("the body is over the limit of {limit} bytes")));
                        }
                        n
                    }
                };
                if got == 0 {
                    break;
                }
                received += got as u64;
            }
            counters.bytes_http.fetch_add(received - before, Ordering::Relaxed);
            Ok(if length.is_some_and(|length| received >= length) { Check::Done(()) } else { Check::Progressed })
        })
    }

    /// One request; a 2xx body goes to `sink`, another status becomes [`NetError::HttpStatus`].
    pub fn request(
        &mut self,
        net: &mut Net,
        method: &str,
        raw_url: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        sink: &mut Sink<'_>,
    ) -> Result<u16, NetError> {
        let url = Url::parse(raw_url).map_err(|source| NetError::HttpWire { url: raw_url.to_string(), source })?;
        let request = http::request(method, &url, headers, body);
        let (handle, head) = self.send_and_head(net, &url, raw_url, &request)?;
        let result = if (200..300).contains(&head.status) {
            Self::read_body(net, handle, raw_url, &head, sink).map(|()| head.status)
        } else {
            let mut text = Vec::new();
            let small = head.content_length.is_some_and(|length| length <= ERROR_BODY_BYTES_MAX);
            if small {
                let mut error_sink = Sink::Collect { into: &mut text, limit: ERROR_BODY_BYTES_MAX };
                Self::read_body(net, handle, raw_url, &head, &mut error_sink)?;
            }
            let body = String::from_utf8_lossy(&text).chars().filter(|c| !c.is_control()).collect();
            if !small {
                self.close(net);
            }
            Err(NetError::HttpStatus { url: raw_url.to_string(), status: head.status, body })
        };
        if head.close || result.is_err() {
            self.close(net);
        }
        result
    }
}
