//! The sliding window of one read transfer (RFC 1350 lockstep, RFC 7440 windows), without I/O:
//! which blocks go out next and what an ACK means. Kept apart from the sockets so the protocol
//! can be tested against a simulated lossy network.
//!
//! Blocks are indexed from 0 here and numbered from 1 on the wire; numbers wrap from 65535 to
//! 0 (as tftp-hpa and dnsmasq do), so a file may have any number of blocks.

use std::ops::Range;

/// Largest window used whatever the configuration says. ACKs are told apart by a 16-bit block
/// number, so an ACK from an earlier window must never alias one in the current window: below
/// half the number space it cannot. The data is mapped, so a window costs no memory.
pub const WINDOWSIZE_LIMIT: u16 = 4096;

/// What an ACK did to the transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckOutcome {
    /// The client has every block up to the acknowledged one. `rolled_back`: it acknowledged
    /// part of the window only (it lost the block after), so sending resumes right after it.
    Advanced { rolled_back: bool },
    /// The last confirmed block again, an older one, or one never sent: changes nothing. Not
    /// answering duplicates is what avoids the sorcerer's apprentice syndrome (RFC 1123
    /// 4.2.3.1); a lost window is resent on timeout only.
    Ignored,
}

/// Where a read transfer stands.
#[derive(Debug, Clone)]
pub struct Transfer {
    len_bytes: u64,
    blksize: u64,
    windowsize: u64,
    /// `len_bytes / blksize + 1`: the last block is short, possibly empty, which ends the transfer.
    n_blocks: u64,
    /// Blocks the client confirmed: it has blocks `0..n_acked`.
    n_acked: u64,
    /// Blocks `n_acked..sent_end` were sent and are not confirmed yet.
    sent_end: u64,
    /// Blocks `0..sent_high` went out at least once (counts bytes served, not resent).
    sent_high: u64,
}

impl Transfer {
    pub fn new(len_bytes: u64, blksize: u16, windowsize: u16) -> Transfer {
        assert!(blksize >= 1 && windowsize >= 1, "blksize {blksize} and windowsize {windowsize} are positive");
        let blksize = u64::from(blksize);
        let windowsize = u64::from(windowsize.min(WINDOWSIZE_LIMIT));
        Transfer {
            len_bytes,
            blksize,
            windowsize,
            n_blocks: len_bytes / blksize + 1,
            n_acked: 0,
            sent_end: 0,
            sent_high: 0,
        }
    }

    /// The wire number of block `index` (0-based).
    pub fn block_number(index: u64) -> u16 {
        (index.wrapping_add(1) & 0xffff) as u16
    }

    pub fn n_blocks(&self) -> u64 {
        self.n_blocks
    }

    pub fn n_acked(&self) -> u64 {
        self.n_acked
    }

    pub fn is_complete(&self) -> bool {
        self.n_acked == self.n_blocks
    }

    /// The file's bytes in block `index`.
    pub fn block_bytes(&self, index: u64) -> Range<u64> {
        assert!(index < self.n_blocks, "block {index} of {}", self.n_blocks);
        let start = index * self.blksize;
        start..(start + self.blksize).min(self.len_bytes)
    }

    /// The blocks to send now: a window from the first one the client has not confirmed.
    /// After a timeout this is the same window again.
    pub fn window(&self) -> Range<u64> {
        self.n_acked..(self.n_acked + self.windowsize).min(self.n_blocks)
    }

    /// Records that `window()` went out; returns the bytes in it sent for the first time.
    pub fn mark_sent(&mut self, window: Range<u64>) -> u64 {
        assert_eq!(window.start, self.n_acked, "windows start at the first unconfirmed block");
        assert!(window.end <= self.n_blocks && window.end > window.start, "window {window:?} of {}", self.n_blocks);
        self.sent_end = window.end;
        let fresh = if window.end > self.sent_high {
            let first_fresh = self.sent_high.max(window.start);
            self.block_bytes(window.end - 1).end - self.block_bytes(first_fresh).start
        } else {
            0
        };
        self.sent_high = self.sent_high.max(window.end);
        fresh
    }

    /// Applies an ACK of wire block number `block`.
    pub fn on_ack(&mut self, block: u16) -> AckOutcome {
        // How far past the last confirmed block (number `n_acked`, 0 before any) this ACK
        // reaches; older ACKs wrap to large distances. Windows stay under half the number
        // space, so the two cannot be confused.
        let distance = u64::from(block.wrapping_sub(Transfer::block_number(self.n_acked.wrapping_sub(1))));
        let in_flight = self.sent_end - self.n_acked;
        if distance == 0 || distance > in_flight {
            return AckOutcome::Ignored;
        }
        self.n_acked += distance;
        let rolled_back = self.n_acked < self.sent_end;
        // Blocks after the acknowledged one are not trusted to have arrived: send them again.
        self.sent_end = self.n_acked;
        debug_assert!(self.n_acked <= self.n_blocks);
        AckOutcome::Advanced { rolled_back }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn lockstep_without_loss() {
        let mut transfer = Transfer::new(1024, 512, 1);
        assert_eq!(transfer.n_blocks(), 3, "two full blocks and an empty one");
        for (index, number) in [(0, 1), (1, 2), (2, 3)] {
            assert_eq!(transfer.window(), index..index + 1);
            transfer.mark_sent(transfer.window());
            assert_eq!(transfer.on_ack(number), AckOutcome::Advanced { rolled_back: false });
        }
        assert!(transfer.is_complete());
        assert_eq!(transfer.block_bytes(2), 1024..1024);
    }

    #[test]
    fn partial_ack_rolls_back_and_duplicates_are_ignored() {
        let mut transfer = Transfer::new(10_000, 100, 8);
        assert_eq!(transfer.mark_sent(transfer.window()), 800);
        assert_eq!(transfer.on_ack(0), AckOutcome::Ignored, "nothing confirmed yet");
        assert_eq!(transfer.on_ack(9), AckOutcome::Ignored, "block 9 was not sent");
        assert_eq!(transfer.on_ack(3), AckOutcome::Advanced { rolled_back: true });
        assert_eq!(transfer.window(), 3..11);
        assert_eq!(transfer.on_ack(3), AckOutcome::Ignored, "duplicate");
        assert_eq!(transfer.on_ack(5), AckOutcome::Ignored, "nothing is in flight until the window is resent");
        assert_eq!(transfer.mark_sent(transfer.window()), 300, "blocks 3..8 were sent before");
        assert_eq!(transfer.on_ack(2), AckOutcome::Ignored, "old");
        assert_eq!(transfer.on_ack(11), AckOutcome::Advanced { rolled_back: false });
        assert_eq!(transfer.window(), 11..19);
    }

    #[test]
    fn block_numbers_wrap_to_zero() {
        assert_eq!(Transfer::block_number(0), 1);
        assert_eq!(Transfer::block_number(65_534), 65_535);
        assert_eq!(Transfer::block_number(65_535), 0);
        assert_eq!(Transfer::block_number(65_536), 1);
        let mut transfer = Transfer::new(8 * 70_000, 8, 16);
        while transfer.n_acked() < 65_520 {
            let window = transfer.window();
            transfer.mark_sent(window.clone());
            assert!(matches!(transfer.on_ack(Transfer::block_number(window.end - 1)), AckOutcome::Advanced { .. }));
        }
        let window = transfer.window();
        assert_eq!(window, 65_520..65_536, "numbers 65521..=65535, then 0");
        transfer.mark_sent(window);
        assert_eq!(transfer.on_ack(65_535), AckOutcome::Advanced { rolled_back: true });
        transfer.mark_sent(transfer.window());
        assert_eq!(transfer.on_ack(65_535), AckOutcome::Ignored);
        assert_eq!(transfer.on_ack(0), AckOutcome::Advanced { rolled_back: true }, "block 65536 is number 0");
        transfer.mark_sent(transfer.window());
        assert_eq!(transfer.on_ack(16), AckOutcome::Advanced { rolled_back: false });
        assert_eq!(transfer.n_acked(), 65_536 + 16);
    }

    /// A tiny deterministic generator, so a failing case replays from its seed.
    struct Rng(u64);

    impl Rng {
        fn chance(&mut self, percent: u64) -> bool {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0 % 100 < percent
        }
    }

    /// Runs a transfer over a network that drops `loss_percent` of the packets each way, with
    /// a client that behaves as RFC 7440 describes: it ACKs every `windowsize` blocks and the
    /// last one, and on a gap ACKs the last block it has, once. Returns what the client got.
    fn simulate(file: &[u8], blksize: u16, windowsize: u16, loss_percent: u64, seed: u64) -> Vec<u8> {
        let mut rng = Rng(seed | 1);
        let mut transfer = Transfer::new(file.len() as u64, blksize, windowsize);
        let mut received = Vec::new();
        let mut expected: u16 = 1;
        let mut since_ack = 0u16;
        let mut acks: std::collections::VecDeque<u16> = Default::default();
        let mut timeouts_in_a_row = 0;
        let rounds_max = transfer.n_blocks() * 20 + 100;
        for _ in 0..rounds_max {
            let window = transfer.window();
            transfer.mark_sent(window.clone());
            let mut gap_reported = false;
            for index in window {
                if rng.chance(loss_percent) {
                    continue;
                }
                let range = transfer.block_bytes(index);
                let payload = &file[range.start as usize..range.end as usize];
                let last = payload.len() < usize::from(blksize);
                let mut ack = None;
                if Transfer::block_number(index) == expected {
                    received.extend_from_slice(payload);
                    expected = expected.wrapping_add(1);
                    since_ack += 1;
                    gap_reported = false;
                    if last || since_ack == windowsize {
                        ack = Some(expected.wrapping_sub(1));
                    }
                } else if !gap_reported {
                    ack = Some(expected.wrapping_sub(1));
                    gap_reported = true;
                }
                if let Some(block) = ack {
                    since_ack = 0;
                    if !rng.chance(loss_percent) {
                        acks.push_back(block);
                    }
                }
            }
            // The server takes ACKs until one moves the transfer on, or times out.
            let mut advanced = false;
            while let Some(block) = acks.pop_front() {
                if let AckOutcome::Advanced { .. } = transfer.on_ack(block) {
                    advanced = true;
                    break;
                }
            }
            if transfer.is_complete() {
                return received;
            }
            timeouts_in_a_row = if advanced { 0 } else { timeouts_in_a_row + 1 };
            assert!(timeouts_in_a_row < 200, "stuck at block {}", transfer.n_acked());
        }
        panic!("not done in {rounds_max} rounds");
    }

    #[test]
    fn a_lossy_transfer_past_the_block_number_wrap_delivers_the_file() {
        let file: Vec<u8> = (0..8 * 70_000 + 3).map(|i: u32| (i % 251) as u8).collect();
        assert_eq!(simulate(&file, 8, 16, 5, 42), file);
    }

    proptest! {
        #[test]
        fn lossy_transfers_deliver_the_file(
            len in 0usize..5000,
            blksize in 8u16..200,
            windowsize in 1u16..40,
            loss_percent in 0u64..30,
            seed: u64,
        ) {
            let file: Vec<u8> = (0..len).map(|i| (i * 7 % 256) as u8).collect();
            prop_assert_eq!(simulate(&file, blksize, windowsize, loss_percent, seed), file);
        }

        /// Whatever ACKs arrive, the transfer never confirms more than was sent or moves back.
        #[test]
        fn arbitrary_acks_keep_the_invariants(acks in proptest::collection::vec(any::<u16>(), 0..200), windowsize in 1u16..20) {
            let mut transfer = Transfer::new(100_000, 512, windowsize);
            for block in acks {
                let window = transfer.window();
                if window.is_empty() {
                    break;
                }
                transfer.mark_sent(window.clone());
                let before = transfer.n_acked();
                transfer.on_ack(block);
                prop_assert!(transfer.n_acked() >= before);
                prop_assert!(transfer.n_acked() <= window.end);
            }
        }
    }
}
