//! A file's BLAKE3 hash from aligned blocks hashed in any order, so a file assembled out of order
//! (chunk batches arrive as they come) is hashed as its blocks fill instead of read and hashed
//! whole again at the end.
//!
//! BLAKE3 is a tree over 1 KiB chunks: a subtree that starts at a multiple of its own
//! power-of-two size has a chaining value independent of the rest of the input
//! (`blake3::hazmat`). With blocks of [`BLOCK_LEN`] bytes every interior node above the blocks
//! covers whole blocks, so the root hash is the blocks' chaining values merged in the tree's
//! shape. The result is bit-for-bit `Hash::of(whole file)`; the tests check it against that.
//!
//! [`BlockCoverage`] counts the bytes still to come in each block, so the caller learns when a
//! block is complete and can be hashed.

use std::ops::Range;

use blake3::hazmat::{self, ChainingValue, HasherExt, Mode};

use crate::Hash;

/// Bytes per block: a power of two and a multiple of BLAKE3's 1 KiB chunk (the tree requires
/// both). 1 MiB is large enough for BLAKE3's SIMD to run at full width (it wants ≥ 16 KiB) and
/// for one read per block to be cheap, small enough that a block fills soon after its chunks
/// arrive. Memory: 32 bytes per block (32 KiB per GiB) plus one block buffer per hashing call.
pub const BLOCK_LEN: u64 = 1 << 20;
const _: () = assert!(BLOCK_LEN.is_power_of_two() && BLOCK_LEN.is_multiple_of(blake3::CHUNK_LEN as u64));

/// The hash of one file of known length, built from its blocks.
#[derive(Debug, Clone)]
pub struct BlockHasher {
    file_len: u64,
    /// A block's chaining value, or for a file of one block, its root hash's bytes.
    blocks: Vec<Option<ChainingValue>>,
}

impl BlockHasher {
    pub fn new(file_len: u64) -> BlockHasher {
        BlockHasher { file_len, blocks: vec![None; n_blocks(file_len)] }
    }

    pub fn n_blocks(&self) -> usize {
        self.blocks.len()
    }

    /// The byte range of block `index` in the file.
    pub fn block_range(&self, index: usize) -> Range<u64> {
        block_range(self.file_len, index)
    }

    /// Hashes block `index`, whose bytes are `data` (exactly the block's range of the file).
    pub fn add_block(&mut self, index: usize, data: &[u8]) {
        let value = hash_block(self.file_len, index, data);
        self.insert(index, value);
    }

    /// Records a value [`hash_block`] computed (for callers that hash outside a lock).
    pub fn insert(&mut self, index: usize, value: BlockValue) {
        self.blocks[index] = Some(value.0);
    }

    pub fn has_block(&self, index: usize) -> bool {
        self.blocks[index].is_some()
    }

    /// The file's hash, or None while a block is missing.
    pub fn finalize(&self) -> Option<Hash> {
        if self.blocks.len() == 1 {
            return self.blocks[0].map(Hash);
        }
        let left_len = hazmat::left_subtree_len(self.file_len);
        let left = self.subtree(0, left_len)?;
        let right = self.subtree(left_len, self.file_len - left_len)?;
        Some(Hash(*hazmat::merge_subtrees_root(&left, &right, Mode::Hash).as_bytes()))
    }

    /// The chaining value of the subtree of `len` bytes at `start` (a block boundary).
    fn subtree(&self, start: u64, len: u64) -> Option<ChainingValue> {
        if len <= BLOCK_LEN {
            return self.blocks[(start / BLOCK_LEN) as usize];
        }
        // Above a block every split falls on a block boundary: `left_subtree_len` is a power of
        // two of at least half of `len`, so at least `BLOCK_LEN` here.
        let left_len = hazmat::left_subtree_len(len);
        let left = self.subtree(start, left_len)?;
        let right = self.subtree(start + left_len, len - left_len)?;
        Some(hazmat::merge_subtrees_non_root(&left, &right, Mode::Hash))
    }
}

/// What one block contributes to its file's hash (see [`hash_block`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockValue(ChainingValue);

/// Hashes block `index` of a file of `file_len` bytes, whose bytes are `data` (exactly the
/// block's range). Panics on a wrong length: that is a bug in the caller, and a wrong value
/// would only show later as a file that does not verify.
pub fn hash_block(file_len: u64, index: usize, data: &[u8]) -> BlockValue {
    let range = block_range(file_len, index);
    assert_eq!(data.len() as u64, range.end - range.start, "block {index} has the wrong length");
    if n_blocks(file_len) == 1 {
        // One block is the whole tree: its root is an ordinary hash.
        return BlockValue(*blake3::hash(data).as_bytes());
    }
    let mut hasher = blake3::Hasher::new();
    hasher.set_input_offset(range.start);
    hasher.update(data);
    BlockValue(hasher.finalize_non_root())
}

/// Blocks in a file of `file_len` bytes: at least one (an empty file is one empty block).
fn n_blocks(file_len: u64) -> usize {
    usize::try_from(file_len.div_ceil(BLOCK_LEN).max(1)).expect("block count fits in memory")
}

fn block_range(file_len: u64, index: usize) -> Range<u64> {
    let start = index as u64 * BLOCK_LEN;
    start..(start + BLOCK_LEN).min(file_len)
}

/// Which blocks of a file still miss bytes. The caller reports each byte range once (a range
/// written twice would be counted twice; the rack reports each chunk index once).
#[derive(Debug, Clone)]
pub struct BlockCoverage {
    file_len: u64,
    /// Bytes of each block not yet written.
    missing: Vec<u64>,
}

impl BlockCoverage {
    pub fn new(file_len: u64) -> BlockCoverage {
        let missing = (0..n_blocks(file_len))
            .map(|i| {
                let range = block_range(file_len, i);
                range.end - range.start
            })
            .collect();
        BlockCoverage { file_len, missing }
    }

    /// Notes `range` as written; calls `complete` with each block this completed, in order.
    /// An empty file's one block is complete from the start: see [`BlockCoverage::complete`].
    pub fn written(&mut self, range: Range<u64>, mut complete: impl FnMut(usize)) {
        assert!(range.end <= self.file_len, "range {range:?} past the end ({})", self.file_len);
        if range.is_empty() {
            return;
        }
        let first = (range.start / BLOCK_LEN) as usize;
        let last = ((range.end - 1) / BLOCK_LEN) as usize;
        for index in first..=last {
            let block = block_range(self.file_len, index);
            let overlap = range.end.min(block.end) - range.start.max(block.start);
            let missing = &mut self.missing[index];
            *missing = missing.checked_sub(overlap).expect("a byte range reported twice");
            if *missing == 0 {
                complete(index);
            }
        }
    }

    /// Whether block `index` has all its bytes.
    pub fn complete(&self, index: usize) -> bool {
        self.missing[index] == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::random_bytes;

    fn bytes(len: usize) -> Vec<u8> {
        random_bytes(len, 0x9e37_79b9)
    }

    fn block_hash(data: &[u8], order: impl Fn(usize) -> Vec<usize>) -> Option<Hash> {
        let mut hasher = BlockHasher::new(data.len() as u64);
        for index in order(hasher.n_blocks()) {
            let range = hasher.block_range(index);
            hasher.add_block(index, &data[range.start as usize..range.end as usize]);
        }
        hasher.finalize()
    }

    #[test]
    fn equals_the_plain_hash_for_every_shape_of_tree() {
        let block = BLOCK_LEN as usize;
        let chunk = blake3::CHUNK_LEN;
        let lens = [
            0,
            1,
            chunk,
            block - 1,
            block,
            block + 1,
            block + chunk,
            2 * block,
            2 * block + 1,
            3 * block + 7,
            4 * block,
            5 * block + chunk + 1,
            7 * block + block / 2,
        ];
        let data = bytes(8 * block);
        for len in lens {
            let data = &data[..len];
            let forward = block_hash(data, |n| (0..n).collect());
            let backward = block_hash(data, |n| (0..n).rev().collect());
            assert_eq!(forward, Some(Hash::of(data)), "len {len}");
            assert_eq!(backward, Some(Hash::of(data)), "len {len}, blocks in reverse");
        }
    }

    #[test]
    fn a_missing_block_gives_no_hash() {
        let data = bytes(3 * BLOCK_LEN as usize);
        assert_eq!(block_hash(&data, |_| vec![0, 2]), None);
        assert_eq!(block_hash(&[], |_| vec![]), None);
    }

    #[test]
    fn a_changed_byte_changes_the_hash() {
        let mut data = bytes(3 * BLOCK_LEN as usize + 5);
        let good = block_hash(&data, |n| (0..n).collect()).unwrap();
        data[2 * BLOCK_LEN as usize + 3] ^= 1;
        assert_ne!(block_hash(&data, |n| (0..n).collect()).unwrap(), good);
    }

    #[test]
    fn coverage_reports_each_block_when_its_last_byte_arrives() {
        let len = 2 * BLOCK_LEN + 10;
        let mut coverage = BlockCoverage::new(len);
        let mut done = Vec::new();
        // A range across the first boundary completes nothing yet.
        coverage.written(BLOCK_LEN - 5..BLOCK_LEN + 5, |b| done.push(b));
        assert!(done.is_empty());
        coverage.written(2 * BLOCK_LEN..len, |b| done.push(b));
        assert_eq!(done, vec![2]);
        coverage.written(BLOCK_LEN + 5..2 * BLOCK_LEN, |b| done.push(b));
        assert_eq!(done, vec![2, 1]);
        coverage.written(0..BLOCK_LEN - 5, |b| done.push(b));
        assert_eq!(done, vec![2, 1, 0]);
        assert!((0..3).all(|b| coverage.complete(b)));
        // An empty file's one block has nothing to wait for.
        assert!(BlockCoverage::new(0).complete(0));
    }

    #[test]
    #[should_panic(expected = "reported twice")]
    fn a_range_reported_twice_is_a_bug() {
        let mut coverage = BlockCoverage::new(100);
        coverage.written(0..100, |_| {});
        coverage.written(0..1, |_| {});
    }
}
