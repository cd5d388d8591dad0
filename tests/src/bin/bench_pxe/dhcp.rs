//! Section 4, DHCP: the client (one socket on port 68 of the lab's bridge, replies told apart by xid;
//! DISCOVER→OFFER→REQUEST→ACK per MAC) and its cell of exchanges in flight.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use dhcproto::v4::{Architecture, DhcpOption, Flags, Message, MessageType, Opcode, OptionCode};
use dhcproto::{Decodable, Decoder, Encodable};
use metalrack_hardware::Lab;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::usage::Usage;
use crate::{in_lab, DHCP_NAKS_MAX, DHCP_REPLY_TIMEOUT, DHCP_TRIES};

pub type Pending = Arc<Mutex<HashMap<u32, mpsc::UnboundedSender<Message>>>>;

pub fn dhcp_socket(interface: &str) -> Result<UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))?;
    socket.set_reuse_address(true)?;
    socket.set_broadcast(true)?;
    socket.bind_device(Some(interface.as_bytes()))?;
    socket.set_recv_buffer_size(4 << 20)?;
    socket.set_nonblocking(true)?;
    socket.bind(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 68)).into()).context("binding 0.0.0.0:68")?;
    Ok(UdpSocket::from_std(socket.into())?)
}

/// A PXE BIOS client's DISCOVER or REQUEST, broadcast flag set (as firmware does).
pub fn dhcp_packet(mac: [u8; 6], xid: u32, kind: MessageType, chosen: Option<(Ipv4Addr, Ipv4Addr)>) -> Result<Vec<u8>> {
    let unspecified = Ipv4Addr::UNSPECIFIED;
    let mut message = Message::new_with_id(xid, unspecified, unspecified, unspecified, unspecified, &mac);
    message.set_flags(Flags::default().set_broadcast());
    let opts = message.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    opts.insert(DhcpOption::ClassIdentifier(b"PXEClient:Arch:00000:UNDI:002001".to_vec()));
    opts.insert(DhcpOption::ClientSystemArchitecture(Architecture::from(0)));
    opts.insert(DhcpOption::ParameterRequestList(vec![
        OptionCode::SubnetMask,
        OptionCode::Router,
        OptionCode::BootfileName,
        OptionCode::TFTPServerName,
    ]));
    if let Some((address, server)) = chosen {
        opts.insert(DhcpOption::RequestedIpAddress(address));
        opts.insert(DhcpOption::ServerIdentifier(server));
    }
    Ok(message.to_vec()?)
}

/// Broadcasts `packet` until a reply `wanted` arrives (at most [`DHCP_TRIES`] times).
pub async fn dhcp_ask(
    socket: &UdpSocket,
    packet: &[u8],
    replies: &mut mpsc::UnboundedReceiver<Message>,
    wanted: impl Fn(&Message) -> bool,
    what: &str,
) -> Result<Message> {
    for _ in 0..DHCP_TRIES {
        socket.send_to(packet, (Ipv4Addr::BROADCAST, 67)).await?;
        let deadline = tokio::time::Instant::now() + DHCP_REPLY_TIMEOUT;
        loop {
            match tokio::time::timeout_at(deadline, replies.recv()).await {
                Ok(Some(message)) if wanted(&message) => return Ok(message),
                Ok(Some(_)) => continue, // a late answer to an earlier step or try
                Ok(None) => bail!("the receiver stopped"),
                Err(_) => break,
            }
        }
    }
    bail!("no {what} after {DHCP_TRIES} tries")
}

pub fn kind_is(kinds: &'static [MessageType]) -> impl Fn(&Message) -> bool {
    move |message| message.opts().msg_type().is_some_and(|kind| kinds.contains(&kind))
}

/// One client's DISCOVER→OFFER→REQUEST→ACK. A NAK (the offered address went to another client
/// meanwhile) restarts it from DISCOVER with a new xid, as RFC 2131 has clients do; returns the
/// number of NAKs.
pub async fn dhcp_exchange(socket: &UdpSocket, pending: &Pending, index: usize) -> Result<u32> {
    let i = index as u32;
    // Locally administered, distinct by the last two bytes, scattered by the middle three (like
    // NICs of different makes: dnsmasq's first choice of address is a hash of the MAC, and
    // consecutive MACs in flight together would all be offered the same address).
    let scatter = (u64::from(i) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15).to_be_bytes();
    let mac = [0x02, scatter[0], scatter[1], scatter[2], (i >> 8) as u8, i as u8];
    let mut naks = 0;
    loop {
        let xid = 0x4d52_0000u32.wrapping_add(i.wrapping_mul(7919)).wrapping_add(naks << 24);
        let (sender, mut replies) = mpsc::unbounded_channel();
        pending.lock().expect("lock").insert(xid, sender);
        let result = async {
            let discover = dhcp_packet(mac, xid, MessageType::Discover, None)?;
            let offer = dhcp_ask(socket, &discover, &mut replies, kind_is(&[MessageType::Offer]), "OFFER").await?;
            let server = match offer.opts().get(OptionCode::ServerIdentifier) {
                Some(DhcpOption::ServerIdentifier(id)) => *id,
                _ => offer.siaddr(),
            };
            let request = dhcp_packet(mac, xid, MessageType::Request, Some((offer.yiaddr(), server)))?;
            let answer =
                dhcp_ask(socket, &request, &mut replies, kind_is(&[MessageType::Ack, MessageType::Nak]), "ACK").await?;
            if answer.opts().msg_type() == Some(MessageType::Nak) {
                return Ok(None);
            }
            ensure!(
                answer.yiaddr() == offer.yiaddr(),
                "ACK for {} after an OFFER of {}",
                answer.yiaddr(),
                offer.yiaddr()
            );
            Ok(Some(offer.yiaddr()))
        }
        .await;
        pending.lock().expect("lock").remove(&xid);
        match result? {
            Some(_) => return Ok(naks),
            None => {
                naks += 1;
                ensure!(naks < DHCP_NAKS_MAX, "{naks} NAKs in a row");
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct DhcpCell {
    pub server: &'static str,
    pub exchanges: usize,
    pub naks: u32,
    /// When each exchange ended, from the start: the rate early and late in the run.
    pub finished_at: Vec<Duration>,
    pub failed: usize,
    pub first_error: Option<String>,
    pub elapsed: Duration,
    pub latencies: Vec<Duration>,
    pub usage: Usage,
}

pub fn dhcp_cell(lab: &Lab, group: i32, clients: usize, inflight: usize) -> Result<DhcpCell> {
    let interface = lab.bridge().to_owned();
    in_lab(lab, move || async move {
        let socket = Arc::new(dhcp_socket(&interface)?);
        let pending: Pending = Arc::default();
        let receiver = {
            let (socket, pending) = (socket.clone(), pending.clone());
            tokio::spawn(async move {
                let mut buf = vec![0u8; 1500];
                loop {
                    let Ok((n, _)) = socket.recv_from(&mut buf).await else {
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    };
                    let Ok(message) = Message::decode(&mut Decoder::new(&buf[..n])) else { continue };
                    if message.opcode() == Opcode::BootReply {
                        if let Some(sender) = pending.lock().expect("lock").get(&message.xid()) {
                            let _ = sender.send(message);
                        }
                    }
                }
            })
        };
        let before = Usage::of_group(group);
        let next = Arc::new(AtomicUsize::new(0));
        let started = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..inflight {
            let (socket, pending, next) = (socket.clone(), pending.clone(), next.clone());
            set.spawn(async move {
                let mut outcomes = Vec::new();
                loop {
                    let index = next.fetch_add(1, Ordering::SeqCst);
                    if index >= clients {
                        return outcomes;
                    }
                    let began = Instant::now();
                    let outcome = dhcp_exchange(&socket, &pending, index)
                        .await
                        .map(|naks| (began.elapsed(), started.elapsed(), naks));
                    outcomes.push(outcome.map_err(|e| format!("{e:#}")));
                }
            });
        }
        let mut cell = DhcpCell { exchanges: clients, ..DhcpCell::default() };
        while let Some(joined) = set.join_next().await {
            for outcome in joined? {
                match outcome {
                    Ok((latency, finished_at, naks)) => {
                        cell.latencies.push(latency);
                        cell.finished_at.push(finished_at);
                        cell.naks += naks;
                    }
                    Err(e) => {
                        cell.failed += 1;
                        cell.first_error.get_or_insert(e);
                    }
                }
            }
        }
        cell.elapsed = started.elapsed();
        cell.usage = Usage::of_group(group).since(before);
        receiver.abort();
        Ok(cell)
    })
}
