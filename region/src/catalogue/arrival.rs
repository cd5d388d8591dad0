//! An upload's file hash, computed in file order while its chunks arrive, so that its commit
//! need not read every chunk back from the store to check the manifest's file hash.
//!
//! Chunks arrive in batches over several connections, so not in order. Each one, once checked
//! against its hash and stored, is offered here: the chunk at the cursor (the next one in the
//! file) is hashed at once, and a chunk further on waits in memory until every chunk before it
//! has been hashed. A chunk the upload does not send (the store had it already, or a duplicate
//! already hashed) is read from the store when the cursor reaches it. The bytes that wait are
//! bounded for all uploads together ([`WAITING_BYTES_MAX`]); an upload that would go past it
//! gives up its arrival hash, and its commit reads the chunks back as it always could.
//!
//! No I/O here: reading a stored chunk is the caller's closure (`read_stored`), so the logic is
//! tested without a store.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use metalrack_image_tools::Hash;

/// Early chunks all uploads together may hold while they wait for the chunks before them. A
/// push has a few batches in flight (`imgtool` sends 3 of 8 MiB at once), and the chunks of a
/// later batch wait at most for the batches before it: 64 MiB leaves room for two such pushes
/// and is small beside the region's 100 MiB budget for a push (issue 12).
pub const WAITING_BYTES_MAX: usize = 64 * 1024 * 1024;

/// The bytes of one received chunk: its buffer from the frame decoder, from `start` on (a raw
/// payload keeps its one-byte tag in front).
#[derive(Debug)]
pub struct ChunkBytes {
    pub buf: Vec<u8>,
    pub start: usize,
}

impl ChunkBytes {
    pub fn as_slice(&self) -> &[u8] {
        &self.buf[self.start..]
    }
}

/// What waits, for every upload of a region: the bytes held against [`WAITING_BYTES_MAX`].
#[derive(Debug, Default)]
pub struct WaitingBudget {
    held: AtomicUsize,
}

impl WaitingBudget {
    /// Takes `bytes` from the budget if they fit.
    fn take(&self, bytes: usize) -> bool {
        self.held
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |held| {
                held.checked_add(bytes).filter(|&total| total <= WAITING_BYTES_MAX)
            })
            .is_ok()
    }

    fn give_back(&self, bytes: usize) {
        self.held.fetch_sub(bytes, Ordering::AcqRel);
    }

    #[cfg(test)]
    pub fn held(&self) -> usize {
        self.held.load(Ordering::Acquire)
    }
}

/// A stored chunk as `read_stored` finds it: its bytes, not there (yet), or unreadable.
pub enum Stored {
    Bytes(Vec<u8>),
    Absent,
    Unreadable,
}

#[derive(Debug)]
pub struct ArrivalHash {
    /// The manifest's chunks in file order.
    order: Vec<Hash>,
    /// The last position of each chunk in `order`: a chunk offered after the cursor passed its
    /// last position is not needed any more (it was read from the store meanwhile).
    last_position: HashMap<Hash, usize>,
    cursor: usize,
    hasher: blake3::Hasher,
    waiting: HashMap<Hash, ChunkBytes>,
    waiting_bytes: usize,
    budget: Arc<WaitingBudget>,
    /// Gave up (over budget, or a stored chunk could not be read): the commit reads back.
    abandoned: bool,
}

impl ArrivalHash {
    pub fn new(order: Vec<Hash>, budget: Arc<WaitingBudget>) -> ArrivalHash {
        let last_position = order.iter().enumerate().map(|(position, hash)| (*hash, position)).collect();
        ArrivalHash {
            order,
            last_position,
            cursor: 0,
            hasher: blake3::Hasher::new(),
            waiting: HashMap::new(),
            waiting_bytes: 0,
            budget,
            abandoned: false,
        }
    }

    /// Chunks checked against their hashes and stored: hashes what is now in file order and
    /// keeps the rest waiting.
    pub fn offer(&mut self, arrived: Vec<(Hash, ChunkBytes)>, read_stored: impl FnMut(&Hash) -> Stored) {
        if self.abandoned {
            return;
        }
        for (hash, bytes) in arrived {
            let needed = self.last_position.get(&hash).is_some_and(|&last| last >= self.cursor);
            if !needed || self.waiting.contains_key(&hash) {
                continue;
            }
            let len = bytes.buf.len();
            if !self.budget.take(len) {
                self.abandon();
                return;
            }
            self.waiting_bytes += len;
            self.waiting.insert(hash, bytes);
        }
        self.advance(read_stored, false);
    }

    /// After the upload's last chunk: the file's hash, reading from the store every chunk not
    /// hashed yet; `None` if this arrival hash gave up (or a chunk is not in the store), and
    /// then the caller reads every chunk back.
    pub fn finish(mut self, read_stored: impl FnMut(&Hash) -> Stored) -> Option<Hash> {
        self.advance(read_stored, true);
        (!self.abandoned && self.cursor == self.order.len()).then(|| Hash(*self.hasher.finalize().as_bytes()))
    }

    /// Hashes chunks from the cursor on while they are waiting or in the store; with `to_end`,
    /// a chunk neither waiting nor stored gives up, else it stops there until it arrives.
    fn advance(&mut self, mut read_stored: impl FnMut(&Hash) -> Stored, to_end: bool) {
        while !self.abandoned && self.cursor < self.order.len() {
            let hash = self.order[self.cursor];
            let last = self.last_position[&hash] == self.cursor;
            if let Some(bytes) = self.waiting.get(&hash) {
                self.hasher.update(bytes.as_slice());
                if last {
                    let len = self.waiting.remove(&hash).map_or(0, |b| b.buf.len());
                    self.waiting_bytes -= len;
                    self.budget.give_back(len);
                }
            } else {
                match read_stored(&hash) {
                    Stored::Bytes(data) => {
                        self.hasher.update(&data);
                    }
                    Stored::Absent if !to_end => return,
                    Stored::Absent | Stored::Unreadable => {
                        self.abandon();
                        return;
                    }
                }
            }
            self.cursor += 1;
        }
    }

    /// How many chunks, from the file's start, are hashed.
    #[cfg(test)]
    pub fn hashed_through(&self) -> usize {
        self.cursor
    }

    fn abandon(&mut self) {
        self.abandoned = true;
        self.release();
    }

    fn release(&mut self) {
        self.waiting.clear();
        self.budget.give_back(self.waiting_bytes);
        self.waiting_bytes = 0;
    }
}

impl Drop for ArrivalHash {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file of `n` chunks of various sizes, with the chunk at `repeat` appearing again at the
    /// end (as a run of zeros would).
    fn pieces(n: usize, repeat: usize) -> Vec<Vec<u8>> {
        let mut pieces: Vec<Vec<u8>> =
            (0..n).map(|i| (0..(1000 + i * 37)).map(|j| (i * 31 + j * 7) as u8).collect()).collect();
        pieces.push(pieces[repeat].clone());
        pieces
    }

    fn file_hash(pieces: &[Vec<u8>]) -> Hash {
        Hash::of(&pieces.concat())
    }

    fn bytes(piece: &[u8], tagged: bool) -> ChunkBytes {
        let mut buf = if tagged { vec![0] } else { Vec::new() };
        buf.extend_from_slice(piece);
        ChunkBytes { buf, start: usize::from(tagged) }
    }

    /// Feeds `pieces` in the order `arrivals` (indices, in groups), with `stored` readable
    /// from the start (the store had them) and each arrival stored as it is offered.
    fn run(
        pieces: &[Vec<u8>],
        groups: &[Vec<usize>],
        stored_before: &[usize],
        budget: Arc<WaitingBudget>,
    ) -> Option<Hash> {
        let order: Vec<Hash> = pieces.iter().map(|p| Hash::of(p)).collect();
        let mut store: HashMap<Hash, Vec<u8>> = stored_before.iter().map(|&i| (order[i], pieces[i].clone())).collect();
        let mut arrival = ArrivalHash::new(order.clone(), budget);
        for group in groups {
            for &i in group {
                store.insert(order[i], pieces[i].clone());
            }
            let arrived = group.iter().map(|&i| (order[i], bytes(&pieces[i], i % 2 == 0))).collect();
            let read = |hash: &Hash| store.get(hash).map_or(Stored::Absent, |data| Stored::Bytes(data.clone()));
            arrival.offer(arrived, read);
        }
        let read = |hash: &Hash| store.get(hash).map_or(Stored::Absent, |data| Stored::Bytes(data.clone()));
        arrival.finish(read)
    }

    #[test]
    fn chunks_arriving_out_of_order_hash_to_the_files_hash() {
        let pieces = pieces(12, 3);
        let budget = Arc::new(WaitingBudget::default());
        // Later batches first, one chunk the store had already, the repeated chunk sent once.
        let groups = vec![vec![8, 9, 10, 11], vec![4, 5, 6], vec![0, 1, 2, 3], vec![7]];
        assert_eq!(run(&pieces, &groups, &[], budget.clone()), Some(file_hash(&pieces)));
        assert_eq!(budget.held(), 0, "every waiting byte given back");
        let groups = vec![vec![5, 6, 7], vec![0, 1, 2], vec![8, 9, 10, 11], vec![3]];
        assert_eq!(run(&pieces, &groups, &[4], budget.clone()), Some(file_hash(&pieces)));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn a_chunk_offered_after_the_cursor_read_it_from_the_store_is_not_kept() {
        let pieces = pieces(4, 0);
        let order: Vec<Hash> = pieces.iter().map(|p| Hash::of(p)).collect();
        let budget = Arc::new(WaitingBudget::default());
        let mut arrival = ArrivalHash::new(order.clone(), budget.clone());
        // Chunk 1 is stored by one task while another offers chunk 0: the cursor reads chunk 1
        // from the store, and the late offer of chunk 1 must not wait for a position passed.
        let store: HashMap<Hash, Vec<u8>> = [0, 1].iter().map(|&i| (order[i], pieces[i].clone())).collect();
        let read = |hash: &Hash| store.get(hash).map_or(Stored::Absent, |data| Stored::Bytes(data.clone()));
        arrival.offer(vec![(order[0], bytes(&pieces[0], false))], read);
        arrival.offer(vec![(order[1], bytes(&pieces[1], false))], read);
        // Chunk 0 appears again at the end, so it waits; chunk 1 does not.
        assert_eq!(budget.held(), pieces[0].len(), "only the repeated chunk waits");
        let store: HashMap<Hash, Vec<u8>> = (0..4).map(|i| (order[i], pieces[i].clone())).collect();
        let read = |hash: &Hash| store.get(hash).map_or(Stored::Absent, |data| Stored::Bytes(data.clone()));
        assert_eq!(arrival.finish(read), Some(file_hash(&pieces)));
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn an_upload_over_the_waiting_budget_gives_up_and_returns_its_bytes() {
        let pieces = pieces(6, 0);
        let budget = Arc::new(WaitingBudget::default());
        // Another upload holds all but a few bytes of the budget.
        assert!(budget.take(WAITING_BYTES_MAX - 100));
        let groups = vec![vec![3, 4, 5, 6], vec![0, 1, 2]];
        assert_eq!(run(&pieces, &groups, &[], budget.clone()), None, "gave up: the commit reads back");
        assert_eq!(budget.held(), WAITING_BYTES_MAX - 100, "the other upload's bytes only");
    }

    #[test]
    fn a_chunk_missing_from_the_store_at_the_end_gives_no_hash() {
        let pieces = pieces(5, 1);
        let budget = Arc::new(WaitingBudget::default());
        // Chunk 2 never arrives and the store does not have it.
        let groups = vec![vec![0, 1], vec![3, 4, 5]];
        assert_eq!(run(&pieces, &groups, &[], budget.clone()), None);
        assert_eq!(budget.held(), 0);
    }

    #[test]
    fn wrong_bytes_give_a_hash_that_is_not_the_files() {
        let mut pieces = pieces(5, 1);
        let budget = Arc::new(WaitingBudget::default());
        let expected = file_hash(&pieces);
        // The store's copy of chunk 2 differs from what the manifest names (torn on disk).
        let order: Vec<Hash> = pieces.iter().map(|p| Hash::of(p)).collect();
        pieces[2][0] ^= 1;
        let store: HashMap<Hash, Vec<u8>> = (0..6).map(|i| (order[i], pieces[i].clone())).collect();
        let read = |hash: &Hash| store.get(hash).map_or(Stored::Absent, |data| Stored::Bytes(data.clone()));
        let arrival = ArrivalHash::new(order, budget);
        assert_ne!(arrival.finish(read), Some(expected));
    }
}
