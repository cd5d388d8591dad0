//! One read transfer: its own task and its own UDP socket connected to the client (a fresh
//! port, the transfer ID of RFC 1350), option negotiation (OACK, then ACK 0), then windows of
//! DATA until the last block is acknowledged. Every wait is bounded by the negotiated timeout
//! and every retransmission by [`RETRANSMITS_MAX`].

use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::UdpSocket;
use tokio::time::{timeout_at, Instant};

use super::send::{BlockSender, SendPath};
use super::transfer::{AckOutcome, Transfer, WINDOWSIZE_LIMIT};
use super::wire::{self, ErrorCode, Options, Repr, BLKSIZE_DEFAULT};
use crate::config::TftpConfig;

/// Timeouts in a row, without the client confirming anything, before a transfer is dropped.
/// With the default 3 s timeout a vanished client holds its session slot for about 18 s; a
/// client-chosen timeout is capped by `timeout_s_max` (10 s: about 60 s).
pub const RETRANSMITS_MAX: u32 = 5;

/// Longest packet read from a client during a transfer. The client sends ACKs (4 bytes) and
/// ERRORs (a message of a few dozen); longer datagrams are truncated by the kernel and ignored.
const CLIENT_PACKET_LEN_MAX: usize = 1024;

/// What the client and the server agreed on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Negotiated {
    pub blksize: u16,
    pub windowsize: u16,
    pub timeout: Duration,
    /// The options to confirm in an OACK; `None` when the client asked for none we grant, in
    /// which case the transfer starts with DATA 1 (plain RFC 1350, 512-byte lockstep).
    pub oack: Option<Options>,
}

/// Grants what the client asked within the configured caps (RFC 2347: the server may only
/// lower blksize and windowsize, and answers the file's size). A timeout above
/// `timeout_s_max` is not granted: RFC 2349 lets the server only echo the client's value or
/// leave the option out, and echoing 255 s would let a vanished client hold its session for
/// (RETRANSMITS_MAX + 1) × 255 s; without the option the transfer runs on `timeout_ms`.
pub fn negotiate(requested: &Options, config: &TftpConfig, len_bytes: u64) -> Negotiated {
    let granted = Options {
        blksize: requested.blksize.map(|asked| asked.min(config.blksize_max.max(BLKSIZE_DEFAULT))),
        timeout_s: requested.timeout_s.filter(|&asked| asked <= config.timeout_s_max),
        tsize: requested.tsize.map(|_| len_bytes),
        windowsize: requested.windowsize.map(|asked| asked.min(config.windowsize_max.max(1)).min(WINDOWSIZE_LIMIT)),
    };
    Negotiated {
        blksize: granted.blksize.unwrap_or(BLKSIZE_DEFAULT),
        windowsize: granted.windowsize.unwrap_or(1),
        timeout: granted
            .timeout_s
            .map_or(Duration::from_millis(config.timeout_ms), |seconds| Duration::from_secs(u64::from(seconds))),
        oack: (!granted.is_empty()).then_some(granted),
    }
}

/// Why a transfer did not complete. `kind()` names it in metrics.
#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot send to {peer}")]
    Send { peer: SocketAddr, source: std::io::Error },
    #[error("cannot receive from {peer}")]
    Receive { peer: SocketAddr, source: std::io::Error },
    #[error("{peer} confirmed nothing for {retransmits} retransmissions at block {n_acked}")]
    TimedOut { peer: SocketAddr, n_acked: u64, retransmits: u32 },
    #[error("{peer} aborted with error {code:?}: {message}")]
    ClientAborted { peer: SocketAddr, code: ErrorCode, message: String },
    #[error("{peer} sent an unexpected {opcode:?}")]
    IllegalOperation { peer: SocketAddr, opcode: wire::Opcode },
}

impl SessionError {
    pub fn kind(&self) -> &'static str {
        match self {
            SessionError::Send { .. } => "send",
            SessionError::Receive { .. } => "receive",
            SessionError::TimedOut { .. } => "timed_out",
            SessionError::ClientAborted { .. } => "client_aborted",
            SessionError::IllegalOperation { .. } => "illegal_operation",
        }
    }
}

/// What a finished transfer did, for logs and metrics.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sent {
    /// Bytes of the file sent at least once.
    pub fresh_bytes: u64,
    /// Windows (or the OACK) sent again after a timeout.
    pub retransmits: u64,
}

/// Waits until `deadline` for the client's next packet that parses; returns its length in
/// `buf`, `None` on timeout. (The caller parses again: one parse of 4 bytes is cheaper than
/// fighting the borrow checker over a `Repr` borrowed across loop iterations.)
async fn receive(
    socket: &UdpSocket,
    peer: SocketAddr,
    buf: &mut [u8; CLIENT_PACKET_LEN_MAX],
    deadline: Instant,
) -> Result<Option<usize>, SessionError> {
    loop {
        let len = match timeout_at(deadline, socket.recv(&mut buf[..])).await {
            Err(_elapsed) => return Ok(None),
            // ECONNREFUSED here means an ICMP port unreachable: the client is gone.
            Ok(Err(source)) => return Err(SessionError::Receive { peer, source }),
            Ok(Ok(len)) => len,
        };
        match wire::parse(&buf[..len]) {
            Ok(_) => return Ok(Some(len)),
            // The connected socket already drops other senders; this is the client's garbage.
            Err(error) => tracing::trace!(%peer, len, %error, "malformed packet during a TFTP transfer ignored"),
        }
    }
}

/// Sends an OACK until the client acknowledges it with ACK 0 (RFC 2347).
async fn confirm_options(
    socket: &UdpSocket,
    peer: SocketAddr,
    options: Options,
    timeout: Duration,
    sent: &mut Sent,
) -> Result<(), SessionError> {
    let oack = Repr::OptionAck { options }.to_bytes();
    let mut buf = [0u8; CLIENT_PACKET_LEN_MAX];
    let mut retransmits = 0;
    loop {
        socket.send(&oack).await.map_err(|source| SessionError::Send { peer, source })?;
        let deadline = Instant::now() + timeout;
        while let Some(len) = receive(socket, peer, &mut buf, deadline).await? {
            match wire::parse(&buf[..len]) {
                Ok(Repr::Ack { block: 0 }) => return Ok(()),
                // A stray ACK cannot confirm options; wait for ACK 0 or the timeout.
                Ok(Repr::Ack { .. }) | Err(_) => {}
                Ok(other) => return Err(unexpected(peer, other)),
            }
        }
        retransmits += 1;
        if retransmits > RETRANSMITS_MAX {
            return Err(SessionError::TimedOut { peer, n_acked: 0, retransmits: RETRANSMITS_MAX });
        }
        sent.retransmits += 1;
    }
}

/// The error for a packet other than ACK from the client mid-transfer.
fn unexpected(peer: SocketAddr, packet: Repr<'_>) -> SessionError {
    match packet {
        Repr::Error { code, message } => SessionError::ClientAborted { peer, code, message: message.to_owned() },
        other => SessionError::IllegalOperation { peer, opcode: opcode_of(&other) },
    }
}

fn opcode_of(packet: &Repr<'_>) -> wire::Opcode {
    match packet {
        Repr::ReadRequest { .. } => wire::Opcode::ReadRequest,
        Repr::WriteRequest { .. } => wire::Opcode::WriteRequest,
        Repr::Data { .. } => wire::Opcode::Data,
        Repr::Ack { .. } => wire::Opcode::Ack,
        Repr::Error { .. } => wire::Opcode::Error,
        Repr::OptionAck { .. } => wire::Opcode::OptionAck,
    }
}

/// Runs a transfer of `file` to `peer` on `socket` (connected to it): the OACK exchange if
/// options were granted, then windows until the last block is acknowledged. `on_fresh_bytes`
/// hears of bytes sent for the first time, as they go out.
pub async fn transfer(
    socket: &UdpSocket,
    peer: SocketAddr,
    file: &[u8],
    negotiated: Negotiated,
    send_path: SendPath,
    sent: &mut Sent,
    mut on_fresh_bytes: impl FnMut(u64),
) -> Result<(), SessionError> {
    if let Some(options) = negotiated.oack {
        confirm_options(socket, peer, options, negotiated.timeout, sent).await?;
    }
    let mut transfer = Transfer::new(file.len() as u64, negotiated.blksize, negotiated.windowsize);
    let mut sender = BlockSender::new(send_path);
    let mut buf = [0u8; CLIENT_PACKET_LEN_MAX];
    let mut retransmits = 0;
    while !transfer.is_complete() {
        let window = transfer.window();
        sender
            .send(socket, file, &transfer, negotiated.blksize, window.clone())
            .await
            .map_err(|source| SessionError::Send { peer, source })?;
        let fresh_bytes = transfer.mark_sent(window);
        sent.fresh_bytes += fresh_bytes;
        on_fresh_bytes(fresh_bytes);
        // Ignored ACKs do not extend the wait: a client repeating an old ACK cannot keep a
        // dead transfer alive.
        let deadline = Instant::now() + negotiated.timeout;
        let advanced = loop {
            let Some(len) = receive(socket, peer, &mut buf, deadline).await? else { break false };
            match wire::parse(&buf[..len]) {
                Ok(Repr::Ack { block }) => {
                    if let AckOutcome::Advanced { .. } = transfer.on_ack(block) {
                        break true;
                    }
                }
                Err(_) => {}
                Ok(other) => return Err(unexpected(peer, other)),
            }
        };
        if advanced {
            retransmits = 0;
        } else {
            retransmits += 1;
            if retransmits > RETRANSMITS_MAX {
                return Err(SessionError::TimedOut { peer, n_acked: transfer.n_acked(), retransmits: RETRANSMITS_MAX });
            }
            sent.retransmits += 1;
        }
    }
    tracing::trace!(%peer, send_path = ?sender.path(), "TFTP transfer complete");
    Ok(())
}

/// Sends an ERROR; errors end a transfer and are never retransmitted (RFC 1350), so a failure
/// to send is only logged.
pub async fn send_error(socket: &UdpSocket, peer: SocketAddr, code: ErrorCode, message: &str) {
    let bytes = Repr::Error { code, message }.to_bytes();
    if let Err(error) = socket.send(&bytes).await {
        tracing::debug!(%peer, %error, "cannot send TFTP error");
    }
}
