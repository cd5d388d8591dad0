//! Section 3, TFTP: the client (RFC 1350 with the RFC 2347/2348/7440 options; one socket per transfer, an
//! ACK per window, every block compared with the file) and its cell of concurrent transfers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use metalrack_hardware::Lab;
use tokio::net::UdpSocket;
use tokio::task::JoinSet;

use crate::usage::Usage;
use crate::{in_lab, ONCE_DEADLINE, TFTP_PATH, TFTP_SILENCE, TFTP_SILENCES_MAX};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Granted {
    pub blksize: usize,
    pub window: usize,
}

pub async fn tftp_fetch(server: SocketAddr, path: &str, blksize: u16, window: u16, expected: &[u8]) -> Result<Granted> {
    let socket = UdpSocket::bind("0.0.0.0:0").await?;
    let mut rrq = vec![0, 1];
    for part in [path, "octet", "blksize", &blksize.to_string(), "windowsize", &window.to_string()] {
        rrq.extend_from_slice(part.as_bytes());
        rrq.push(0);
    }
    socket.send_to(&rrq, server).await?;
    let mut buf = vec![0u8; 65_536];
    let mut granted = Granted { blksize: 512, window: 1 };
    let mut next_block: u16 = 1;
    let mut received = 0usize;
    let mut in_window = 0usize;
    let mut peer: Option<SocketAddr> = None;
    let mut silences = 0;
    // After a gap, one ACK says where to resume; more would only repeat it.
    let mut gap_reported = false;
    let ack = |block: u16| [0u8, 4, (block >> 8) as u8, block as u8];
    loop {
        let (n, from) = match tokio::time::timeout(TFTP_SILENCE, socket.recv_from(&mut buf)).await {
            Ok(received) => received?,
            Err(_) => {
                silences += 1;
                ensure!(silences <= TFTP_SILENCES_MAX, "no answer for {TFTP_SILENCES_MAX} s at block {next_block}");
                match peer {
                    Some(peer) => {
                        socket.send_to(&ack(next_block.wrapping_sub(1)), peer).await?;
                    }
                    None => {
                        socket.send_to(&rrq, server).await?;
                    }
                }
                in_window = 0;
                gap_reported = false;
                continue;
            }
        };
        if *peer.get_or_insert(from) != from {
            continue; // not our transfer's server port
        }
        silences = 0;
        let packet = &buf[..n];
        ensure!(n >= 4, "short packet ({n} bytes)");
        match u16::from_be_bytes([packet[0], packet[1]]) {
            5 => {
                let code = u16::from_be_bytes([packet[2], packet[3]]);
                bail!("error {code}: {}", String::from_utf8_lossy(&packet[4..n - 1]));
            }
            6 if received == 0 && next_block == 1 => {
                let fields: Vec<String> =
                    packet[2..].split(|b| *b == 0).map(|f| String::from_utf8_lossy(f).to_ascii_lowercase()).collect();
                for pair in fields.chunks(2) {
                    if let [name, value] = pair {
                        match name.as_str() {
                            "blksize" => granted.blksize = value.parse().context("OACK blksize")?,
                            "windowsize" => granted.window = value.parse().context("OACK windowsize")?,
                            _ => {}
                        }
                    }
                }
                socket.send_to(&ack(0), from).await?;
            }
            3 => {
                let block = u16::from_be_bytes([packet[2], packet[3]]);
                let payload = &packet[4..];
                if block == next_block {
                    ensure!(payload.len() <= granted.blksize, "block {block} has {} bytes", payload.len());
                    let end = received + payload.len();
                    ensure!(
                        end <= expected.len() && expected[received..end] == *payload,
                        "block {block} differs from the file"
                    );
                    received = end;
                    in_window += 1;
                    gap_reported = false;
                    let last = payload.len() < granted.blksize;
                    if last || in_window == granted.window {
                        socket.send_to(&ack(block), from).await?;
                        in_window = 0;
                    }
                    next_block = next_block.wrapping_add(1);
                    if last {
                        ensure!(received == expected.len(), "{received} bytes of {}", expected.len());
                        return Ok(granted);
                    }
                } else if !gap_reported {
                    // Lost or reordered: acknowledge what we have; the server resends from there.
                    socket.send_to(&ack(next_block.wrapping_sub(1)), from).await?;
                    in_window = 0;
                    gap_reported = true;
                }
            }
            _ => {}
        }
    }
}

#[derive(Debug, Clone, Default)]
pub struct TftpCell {
    pub server: &'static str,
    pub window: u16,
    pub bytes: u64,
    pub elapsed: Duration,
    pub transfers: usize,
    pub failed: usize,
    pub first_error: Option<String>,
    pub granted: Vec<Granted>,
    pub usage: Usage,
    /// This program's own CPU time over the cell: the clients' share of the 2 cores.
    pub client_usage: Usage,
}

pub fn tftp_cell(
    lab: &Lab,
    server: SocketAddr,
    group: i32,
    clients: usize,
    window: u16,
    expected: Arc<Vec<u8>>,
) -> Result<TftpCell> {
    in_lab(lab, move || async move {
        let before = Usage::of_group(group);
        let client_before = Usage::of_self();
        let started = Instant::now();
        let mut set = JoinSet::new();
        for _ in 0..clients {
            let expected = expected.clone();
            set.spawn(tokio::time::timeout(ONCE_DEADLINE, async move {
                tftp_fetch(server, TFTP_PATH, 1468, window, &expected).await
            }));
        }
        let mut cell = TftpCell { transfers: clients, ..TftpCell::default() };
        while let Some(joined) = set.join_next().await {
            let outcome = match joined {
                Ok(Ok(Ok(granted))) => Ok(granted),
                Ok(Ok(Err(e))) => Err(format!("{e:#}")),
                Ok(Err(_)) => Err(format!("not done within {ONCE_DEADLINE:?}")),
                Err(e) => Err(e.to_string()),
            };
            match outcome {
                Ok(granted) => {
                    cell.bytes += expected.len() as u64;
                    if !cell.granted.contains(&granted) {
                        cell.granted.push(granted);
                    }
                }
                Err(e) => {
                    cell.failed += 1;
                    cell.first_error.get_or_insert(e);
                }
            }
        }
        cell.elapsed = started.elapsed();
        cell.usage = Usage::of_group(group).since(before);
        cell.client_usage = Usage::of_self().since(client_before);
        Ok(cell)
    })
}
