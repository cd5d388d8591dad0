//! A small TFTP client for tests (RFC 1350 with RFC 2347/2348/7440 options): reads a file and
//! reports the options the server granted.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

#[derive(Debug)]
pub struct TftpRead {
    pub data: Vec<u8>,
    pub blksize: usize,
    pub windowsize: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TftpError {
    /// The server answered with an ERROR packet: (code, message).
    Refused(u16, String),
    Protocol(String),
}

/// Reads `path` from `server`, asking for `blksize` and `windowsize`.
pub fn read(server: SocketAddr, path: &str, blksize: u16, windowsize: u16) -> Result<TftpRead, TftpError> {
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(|e| TftpError::Protocol(e.to_string()))?;
    socket.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut rrq = vec![0, 1];
    for part in [path, "octet", "blksize", &blksize.to_string(), "windowsize", &windowsize.to_string()] {
        rrq.extend_from_slice(part.as_bytes());
        rrq.push(0);
    }
    socket.send_to(&rrq, server).unwrap();
    let mut buf = vec![0u8; 70_000];
    let (mut granted_blksize, mut granted_window) = (512usize, 1usize);
    let mut data = Vec::new();
    let mut expected: u16 = 1;
    let mut peer = None;
    let mut in_window = 0;
    loop {
        let (n, from) = socket.recv_from(&mut buf).map_err(|e| TftpError::Protocol(format!("receive: {e}")))?;
        let packet = &buf[..n];
        peer.get_or_insert(from);
        match u16::from_be_bytes([packet[0], packet[1]]) {
            5 => {
                let code = u16::from_be_bytes([packet[2], packet[3]]);
                let message = String::from_utf8_lossy(&packet[4..n.saturating_sub(1)]).into_owned();
                return Err(TftpError::Refused(code, message));
            }
            6 => {
                let fields: Vec<String> =
                    packet[2..].split(|b| *b == 0).map(|f| String::from_utf8_lossy(f).to_ascii_lowercase()).collect();
                for pair in fields.chunks(2) {
                    if pair.len() == 2 {
                        match pair[0].as_str() {
                            "blksize" => granted_blksize = pair[1].parse().unwrap_or(512),
                            "windowsize" => granted_window = pair[1].parse().unwrap_or(1),
                            _ => {}
                        }
                    }
                }
                socket.send_to(&[0, 4, 0, 0], from).unwrap();
            }
            3 => {
                let block = u16::from_be_bytes([packet[2], packet[3]]);
                let payload = &packet[4..];
                if block == expected {
                    data.extend_from_slice(payload);
                    in_window += 1;
                    let last = payload.len() < granted_blksize;
                    if last || in_window == granted_window {
                        socket.send_to(&[0, 4, (block >> 8) as u8, block as u8], from).unwrap();
                        in_window = 0;
                    }
                    expected = expected.wrapping_add(1);
                    if last {
                        return Ok(TftpRead { data, blksize: granted_blksize, windowsize: granted_window });
                    }
                } else {
                    // Out of order (a retransmitted window): acknowledge what we have.
                    let have = expected.wrapping_sub(1);
                    socket.send_to(&[0, 4, (have >> 8) as u8, have as u8], from).unwrap();
                    in_window = 0;
                }
            }
            other => return Err(TftpError::Protocol(format!("unexpected opcode {other}"))),
        }
    }
}

/// Sends a bare read request (no options, so a file name up to ~1000 bytes fits the server's
/// 1 KiB request read) from a fresh port and returns the server's refusal: (code, message).
/// Each call is one boot event on the rack (`boot.refused`), which makes this a cheap, real way
/// to queue many.
pub fn refused(server: SocketAddr, path: &str) -> Result<(u16, String), TftpError> {
    let protocol = |e: std::io::Error| TftpError::Protocol(e.to_string());
    let socket = UdpSocket::bind("127.0.0.1:0").map_err(protocol)?;
    socket.set_read_timeout(Some(Duration::from_secs(5))).map_err(protocol)?;
    let mut rrq = vec![0, 1];
    for part in [path, "octet"] {
        rrq.extend_from_slice(part.as_bytes());
        rrq.push(0);
    }
    socket.send_to(&rrq, server).map_err(protocol)?;
    let mut buf = [0u8; 1024];
    let (n, _) =
        socket.recv_from(&mut buf).map_err(|e| TftpError::Protocol(format!("no answer to {path:.40}: {e}")))?;
    match buf[..n] {
        [0, 5, high, low, ref message @ ..] => Ok((
            u16::from_be_bytes([high, low]),
            String::from_utf8_lossy(message.strip_suffix(&[0]).unwrap_or(message)).into_owned(),
        )),
        _ => Err(TftpError::Protocol(format!("expected an ERROR packet, got {:?}", &buf[..n.min(8)]))),
    }
}
