//! Sends a window of DATA blocks with as few system calls as the kernel allows: one UDP GSO
//! `sendmsg` for a run of full-size blocks (the kernel cuts it into datagrams), else one
//! `sendmmsg` per batch, else one `sendmsg` per block. The file's bytes go from its mapping
//! straight into the kernel (an iovec per block pointing into the mapping, after a 4-byte header
//! on the stack): nothing is allocated or copied per block in user space.

use std::io::{self, IoSlice};
use std::ops::Range;
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{self, ControlMessage, MsgFlags, MultiHeaders, SockaddrStorage};
use tokio::io::Interest;
use tokio::net::UdpSocket;

use super::transfer::Transfer;
use super::wire::{self, DATA_HEADER_LEN};

/// Blocks per system call. Linux cuts a GSO send into at most `UDP_MAX_SEGMENTS` datagrams, 64
/// on older kernels; the same batch bounds the iovec and header arrays kept on the stack
/// (64 × (2 iovecs + 4 bytes) ≈ 2.3 KiB per session future).
pub const BATCH_BLOCKS_MAX: usize = 64;

/// A GSO send is one UDP datagram until the kernel cuts it, so its payload must fit one:
/// 65,535 bytes minus the IPv4 and UDP headers (IPv4 is the stricter; IPv6 does not count its
/// header). At blksize 1468 that is 44 blocks per call.
const GSO_BATCH_BYTES_MAX: usize = 65_535 - 20 - 8;

/// How a session hands blocks to the kernel; it starts with the best and steps down once if the
/// kernel refuses, remembering it for the rest of the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SendPath {
    /// UDP generic segmentation offload: one `sendmsg` per run of full-size blocks.
    Gso,
    /// One `sendmmsg` per batch.
    Multiple,
    /// One `sendmsg` per block.
    Single,
}

#[derive(Debug)]
pub struct BlockSender {
    path: SendPath,
    /// Tests: answer GSO sends with this error instead of calling the kernel, since loopback
    /// always accepts them.
    #[cfg(test)]
    gso_refusal: Option<Errno>,
}

impl BlockSender {
    pub fn new(path: SendPath) -> BlockSender {
        BlockSender {
            path,
            #[cfg(test)]
            gso_refusal: None,
        }
    }

    pub fn path(&self) -> SendPath {
        self.path
    }

    /// Sends blocks `blocks` of `transfer` from `file` on `socket` (connected to the client).
    pub async fn send(
        &mut self,
        socket: &UdpSocket,
        file: &[u8],
        transfer: &Transfer,
        blksize: u16,
        blocks: Range<u64>,
    ) -> io::Result<()> {
        let blksize = usize::from(blksize);
        let mut next = blocks.start;
        while next < blocks.end {
            let batch_max = match self.path {
                SendPath::Gso => (GSO_BATCH_BYTES_MAX / (DATA_HEADER_LEN + blksize)).clamp(1, BATCH_BLOCKS_MAX),
                SendPath::Multiple => BATCH_BLOCKS_MAX,
                SendPath::Single => 1,
            };
            let count = (blocks.end - next).min(batch_max as u64) as usize;
            // GSO segments must all have the segment size but the last; the file's short last
            // block goes on its own.
            let full = (0..count as u64).take_while(|k| block_len(transfer, next + k) == blksize).count();
            let sent = match self.path {
                SendPath::Gso if full >= 2 => match self.send_gso(socket, file, transfer, blksize, next, full).await {
                    Err(error) if gso_refused(&error) => {
                        tracing::debug!(%error, "UDP GSO refused; this session sends with sendmmsg");
                        self.path = SendPath::Multiple;
                        continue;
                    }
                    result => result?,
                },
                SendPath::Multiple if count >= 2 => match send_multiple(socket, file, transfer, next, count).await {
                    Err(error) if error.raw_os_error() == Some(Errno::ENOSYS as i32) => {
                        tracing::debug!(%error, "sendmmsg refused; this session sends one block per call");
                        self.path = SendPath::Single;
                        continue;
                    }
                    result => result?,
                },
                SendPath::Gso | SendPath::Multiple | SendPath::Single => {
                    send_single(socket, file, transfer, next).await?;
                    1
                }
            };
            next += sent as u64;
        }
        Ok(())
    }
}

impl BlockSender {
    async fn send_gso(
        &self,
        socket: &UdpSocket,
        file: &[u8],
        transfer: &Transfer,
        blksize: usize,
        first: u64,
        count: usize,
    ) -> io::Result<usize> {
        #[cfg(test)]
        if let Some(errno) = self.gso_refusal {
            return Err(errno.into());
        }
        send_gso(socket, file, transfer, blksize, first, count).await
    }
}

fn block_len(transfer: &Transfer, index: u64) -> usize {
    let range = transfer.block_bytes(index);
    (range.end - range.start) as usize
}

fn block_data<'f>(file: &'f [u8], transfer: &Transfer, index: u64) -> &'f [u8] {
    let range = transfer.block_bytes(index);
    &file[range.start as usize..range.end as usize]
}

/// Errors that mean "this kernel, route or device cannot segment for us", not "the client is
/// gone": EIO (no checksum offload on the route), EINVAL (too many segments, or no
/// `UDP_SEGMENT` support), EMSGSIZE (a segment over the route's MTU), and the unsupported family.
fn gso_refused(error: &io::Error) -> bool {
    let refusals = [Errno::EIO, Errno::EINVAL, Errno::EMSGSIZE, Errno::ENOPROTOOPT, Errno::EOPNOTSUPP];
    error.raw_os_error().is_some_and(|code| refusals.iter().any(|errno| *errno as i32 == code))
}

/// Waits until the socket can take data, then runs `send` (a non-blocking system call) and
/// retries on `EAGAIN`: how tokio drives a raw call on its socket.
async fn when_writable<R>(socket: &UdpSocket, mut send: impl FnMut() -> nix::Result<R>) -> io::Result<R> {
    loop {
        socket.writable().await?;
        match socket.try_io(Interest::WRITABLE, || send().map_err(io::Error::from)) {
            Err(error) if error.kind() == io::ErrorKind::WouldBlock => continue,
            result => return result,
        }
    }
}

/// One `sendmsg` carrying `count` full-size blocks and a `UDP_SEGMENT` control message: the
/// kernel sends them as `count` datagrams of `4 + blksize` bytes. Returns `count`.
async fn send_gso(
    socket: &UdpSocket,
    file: &[u8],
    transfer: &Transfer,
    blksize: usize,
    first: u64,
    count: usize,
) -> io::Result<usize> {
    assert!((2..=BATCH_BLOCKS_MAX).contains(&count), "GSO batch of {count}");
    let mut headers = [[0u8; DATA_HEADER_LEN]; BATCH_BLOCKS_MAX];
    for (k, header) in headers[..count].iter_mut().enumerate() {
        *header = wire::data_header(Transfer::block_number(first + k as u64));
    }
    let mut iov = [IoSlice::new(&[]); 2 * BATCH_BLOCKS_MAX];
    for k in 0..count {
        iov[2 * k] = IoSlice::new(&headers[k]);
        iov[2 * k + 1] = IoSlice::new(block_data(file, transfer, first + k as u64));
    }
    let segment_len = u16::try_from(DATA_HEADER_LEN + blksize).expect("blksize is at most 65464");
    let fd = socket.as_raw_fd();
    when_writable(socket, || {
        let control = [ControlMessage::UdpGsoSegments(&segment_len)];
        socket::sendmsg::<SockaddrStorage>(fd, &iov[..2 * count], &control, MsgFlags::empty(), None)
    })
    .await?;
    Ok(count)
}

/// One `sendmmsg` of `count` blocks; returns how many the kernel took (at least one).
async fn send_multiple(
    socket: &UdpSocket,
    file: &[u8],
    transfer: &Transfer,
    first: u64,
    count: usize,
) -> io::Result<usize> {
    assert!((1..=BATCH_BLOCKS_MAX).contains(&count), "batch of {count}");
    let mut headers = [[0u8; DATA_HEADER_LEN]; BATCH_BLOCKS_MAX];
    for (k, header) in headers[..count].iter_mut().enumerate() {
        *header = wire::data_header(Transfer::block_number(first + k as u64));
    }
    let mut messages = [[IoSlice::new(&[]); 2]; BATCH_BLOCKS_MAX];
    for k in 0..count {
        messages[k] = [IoSlice::new(&headers[k]), IoSlice::new(block_data(file, transfer, first + k as u64))];
    }
    // The socket is connected: no addresses.
    let addresses = [None::<SockaddrStorage>; BATCH_BLOCKS_MAX];
    let fd = socket.as_raw_fd();
    when_writable(socket, || {
        // Built per call: nix's headers hold raw pointers (not `Send`), so they cannot live in
        // the session's future across an await. Fallback path only.
        let mut headers = MultiHeaders::<SockaddrStorage>::preallocate(count, None);
        let control: [ControlMessage<'_>; 0] = [];
        let results =
            socket::sendmmsg(fd, &mut headers, &messages[..count], &addresses[..count], control, MsgFlags::empty())?;
        Ok(results.count())
    })
    .await
}

/// One `sendmsg` of block `index`.
async fn send_single(socket: &UdpSocket, file: &[u8], transfer: &Transfer, index: u64) -> io::Result<()> {
    let header = wire::data_header(Transfer::block_number(index));
    let iov = [IoSlice::new(&header), IoSlice::new(block_data(file, transfer, index))];
    let fd = socket.as_raw_fd();
    when_writable(socket, || socket::sendmsg::<SockaddrStorage>(fd, &iov, &[], MsgFlags::empty(), None)).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every path puts the same datagrams on the wire: header plus the block's bytes, in order.
    #[tokio::test]
    async fn every_path_sends_the_same_datagrams() {
        let file: Vec<u8> = (0..10_000u32).map(|i| (i % 253) as u8).collect();
        let blksize = 1024u16;
        for path in [SendPath::Gso, SendPath::Multiple, SendPath::Single] {
            let (sender, receiver) = connected_pair().await;
            let transfer = Transfer::new(file.len() as u64, blksize, 16);
            let mut block_sender = BlockSender::new(path);
            block_sender.send(&sender, &file, &transfer, blksize, 0..transfer.n_blocks()).await.unwrap();
            assert_eq!(block_sender.path(), path, "loopback takes every path");
            expect_blocks(&receiver, &file, &transfer, &format!("{path:?}")).await;
        }
    }

    /// A sender connected to a receiver on loopback, as a session's socket is to its client.
    async fn connected_pair() -> (UdpSocket, UdpSocket) {
        let receiver = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let sender = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        sender.connect(receiver.local_addr().unwrap()).await.unwrap();
        (sender, receiver)
    }

    /// Receives every block of `transfer` and checks each datagram is exactly its DATA packet.
    async fn expect_blocks(receiver: &UdpSocket, file: &[u8], transfer: &Transfer, what: &str) {
        let mut buf = vec![0u8; 65_536];
        for index in 0..transfer.n_blocks() {
            let len = receiver.recv(&mut buf).await.unwrap();
            let expected =
                wire::Repr::Data { block: Transfer::block_number(index), payload: block_data(file, transfer, index) };
            assert_eq!(wire::parse(&buf[..len]), Ok(expected), "{what}, block {index}");
        }
    }

    #[tokio::test]
    async fn a_refused_gso_falls_back_for_the_session() {
        let file: Vec<u8> = (0..5_000u32).map(|i| (i % 249) as u8).collect();
        let blksize = 512u16;
        for refusal in [Errno::EIO, Errno::EINVAL, Errno::EMSGSIZE] {
            let (sender, receiver) = connected_pair().await;
            let transfer = Transfer::new(file.len() as u64, blksize, 8);
            let mut block_sender = BlockSender::new(SendPath::Gso);
            block_sender.gso_refusal = Some(refusal);
            block_sender.send(&sender, &file, &transfer, blksize, 0..transfer.n_blocks()).await.unwrap();
            assert_eq!(block_sender.path(), SendPath::Multiple, "{refusal}");
            expect_blocks(&receiver, &file, &transfer, &format!("after {refusal}")).await;
        }
    }

    #[test]
    fn only_refusals_step_down() {
        for errno in [Errno::EIO, Errno::EINVAL, Errno::EMSGSIZE, Errno::ENOPROTOOPT, Errno::EOPNOTSUPP] {
            assert!(gso_refused(&errno.into()), "{errno}");
        }
        for errno in [Errno::ECONNREFUSED, Errno::ENOBUFS, Errno::EHOSTUNREACH] {
            assert!(!gso_refused(&errno.into()), "{errno}");
        }
    }
}
