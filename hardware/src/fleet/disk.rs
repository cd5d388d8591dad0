//! The simulated machines' disks: a fleet-wide content-addressed store of the blocks written
//! (each distinct block kept once, in memory, whatever the number of machines holding it) and,
//! per machine, an extent map from disk offsets to pieces of those blocks. Unwritten ranges, and
//! ranges written with zeros, read as zeros and cost nothing.
//!
//! Why not sparse files: 100 machines × a 1 GiB image would be 100 GiB on a box with far less
//! disk, and the writes would cost the page cache and I/O the real rack needs. Why not a sink
//! that keeps only hashes: `deploy::finish` reads the whole image back and hashes it, and that
//! check must really run on every machine against real bytes. The deploy writes the same chunks
//! at the same places on every machine, so the store holds the image once (~1 GiB for the 1 GiB
//! scenario) and each machine only its extent map (one entry per chunk written, ~100 bytes).
//! A block leaves the store when no extent refers to it any more (an erase, an overwrite).

use std::collections::{BTreeMap, HashMap};
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use metalrack_image_tools::deploy::Disk;
use metalrack_image_tools::Hash;

/// Bytes the fleet's block store holds at most by default: the distinct blocks of every disk.
/// One 1 GiB image deployed to any number of machines is 1 GiB; 12 GiB leaves the 10 GiB
/// custom-image scenario room on a 23 GiB box. A write past it fails like a broken disk would.
pub const STORE_BYTES_MAX_DEFAULT: u64 = 12 << 30;

/// One stored block: its bytes, and the store to leave when the last extent lets go of it.
struct Block {
    hash: Hash,
    bytes: Box<[u8]>,
    store: Weak<StoreInner>,
}

impl Drop for Block {
    fn drop(&mut self) {
        if let Some(store) = self.store.upgrade() {
            let mut blocks = store.blocks.lock().unwrap_or_else(PoisonError::into_inner);
            // A newer block of the same hash may have replaced this entry meanwhile.
            if blocks.get(&self.hash).is_some_and(|weak| weak.strong_count() == 0) {
                blocks.remove(&self.hash);
            }
            store.bytes.fetch_sub(self.bytes.len() as u64, Ordering::Relaxed);
        }
    }
}

struct StoreInner {
    blocks: Mutex<HashMap<Hash, Weak<Block>>>,
    bytes: AtomicU64,
    bytes_max: u64,
}

/// The fleet-wide block store. Clones share it.
#[derive(Clone)]
pub struct BlockStore {
    inner: Arc<StoreInner>,
}

impl std::fmt::Debug for BlockStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockStore").field("bytes", &self.bytes()).finish_non_exhaustive()
    }
}

impl BlockStore {
    pub fn new(bytes_max: u64) -> BlockStore {
        BlockStore {
            inner: Arc::new(StoreInner { blocks: Mutex::new(HashMap::new()), bytes: AtomicU64::new(0), bytes_max }),
        }
    }

    /// Bytes of distinct blocks held.
    pub fn bytes(&self) -> u64 {
        self.inner.bytes.load(Ordering::Relaxed)
    }

    /// Distinct blocks held.
    pub fn blocks(&self) -> usize {
        self.inner.blocks.lock().unwrap_or_else(PoisonError::into_inner).len()
    }

    /// The block holding `bytes`: the stored one if any disk wrote the same bytes before.
    fn intern(&self, bytes: &[u8]) -> io::Result<Arc<Block>> {
        let hash = Hash::of(bytes);
        let mut blocks = self.inner.blocks.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(block) = blocks.get(&hash).and_then(Weak::upgrade) {
            return Ok(block);
        }
        let held = self.inner.bytes.load(Ordering::Relaxed);
        if held + bytes.len() as u64 > self.inner.bytes_max {
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                format!("the fleet's block store is full ({held} of {} bytes)", self.inner.bytes_max),
            ));
        }
        let block =
            Arc::new(Block { hash, bytes: bytes.to_vec().into_boxed_slice(), store: Arc::downgrade(&self.inner) });
        self.inner.bytes.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        blocks.insert(hash, Arc::downgrade(&block));
        Ok(block)
    }
}

/// A piece of a block at a place on the disk.
#[derive(Clone)]
struct Extent {
    len: u64,
    block: Arc<Block>,
    /// Where in the block the piece starts.
    block_offset: u64,
}

/// One machine's disk.
pub struct SimDisk {
    size_bytes: u64,
    store: BlockStore,
    /// Disk offset → extent; extents never overlap.
    extents: BTreeMap<u64, Extent>,
}

impl std::fmt::Debug for SimDisk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SimDisk")
            .field("size_bytes", &self.size_bytes)
            .field("extents", &self.extents.len())
            .finish_non_exhaustive()
    }
}

impl SimDisk {
    /// An empty (all zeros) disk of `size_bytes`.
    pub fn new(store: BlockStore, size_bytes: u64) -> SimDisk {
        SimDisk { size_bytes, store, extents: BTreeMap::new() }
    }

    /// Whether anything but zeros was ever left on it (a firmware finds nothing to boot on an
    /// empty disk).
    pub fn is_blank(&self) -> bool {
        self.extents.is_empty()
    }

    /// Bytes of the disk that hold written (non-zero) data.
    pub fn bytes_written(&self) -> u64 {
        self.extents.values().map(|extent| extent.len).sum()
    }

    /// BLAKE3 of the disk's first `len` bytes (the image a deploy wrote there, if it did).
    pub fn hash_prefix(&self, len: u64) -> io::Result<Hash> {
        const PIECE: u64 = 4 << 20;
        let mut hasher = blake3::Hasher::new();
        let mut buf = vec![0u8; PIECE.min(len) as usize];
        let mut offset = 0;
        while offset < len {
            let piece = (len - offset).min(PIECE) as usize;
            self.read_at(&mut buf[..piece], offset)?;
            hasher.update(&buf[..piece]);
            offset += piece as u64;
        }
        Ok(Hash(*hasher.finalize().as_bytes()))
    }

    fn check_range(&self, offset: u64, len: usize) -> io::Result<u64> {
        offset
            .checked_add(len as u64)
            .filter(|end| *end <= self.size_bytes)
            .ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "past the end of the simulated disk"))
    }

    /// Removes `start..end` from the map, keeping the parts of extents outside it.
    fn punch(&mut self, start: u64, end: u64) {
        // The extent that begins before `start` and may reach into the range.
        if let Some((&at, extent)) = self.extents.range(..start).next_back() {
            let extent_end = at + extent.len;
            if extent_end > start {
                let extent = extent.clone();
                self.extents.get_mut(&at).expect("just found").len = start - at;
                if extent_end > end {
                    let tail = Extent {
                        len: extent_end - end,
                        block: extent.block.clone(),
                        block_offset: extent.block_offset + (end - at),
                    };
                    self.extents.insert(end, tail);
                }
            }
        }
        let inside: Vec<u64> = self.extents.range(start..end).map(|(&at, _)| at).collect();
        for at in inside {
            let extent = self.extents.remove(&at).expect("just listed");
            let extent_end = at + extent.len;
            if extent_end > end {
                let tail = Extent { len: extent_end - end, block_offset: extent.block_offset + (end - at), ..extent };
                self.extents.insert(end, tail);
            }
        }
    }
}

impl Disk for SimDisk {
    fn size_bytes(&self) -> io::Result<u64> {
        Ok(self.size_bytes)
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let end = self.check_range(offset, buf.len())?;
        buf.fill(0);
        let first = self.extents.range(..=offset).next_back().map_or(offset, |(&at, _)| at);
        for (&at, extent) in self.extents.range(first..end) {
            let extent_end = at + extent.len;
            let (from, to) = (at.max(offset), extent_end.min(end));
            if from >= to {
                continue;
            }
            let source_start = (extent.block_offset + (from - at)) as usize;
            let source = &extent.block.bytes[source_start..source_start + (to - from) as usize];
            buf[(from - offset) as usize..(to - offset) as usize].copy_from_slice(source);
        }
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let end = self.check_range(offset, buf.len())?;
        if buf.is_empty() {
            return Ok(());
        }
        // Zeros are what an unwritten range reads as: an erase stores nothing.
        let block = if buf.iter().all(|byte| *byte == 0) { None } else { Some(self.store.intern(buf)?) };
        self.punch(offset, end);
        if let Some(block) = block {
            self.extents.insert(offset, Extent { len: buf.len() as u64, block, block_offset: 0 });
        }
        Ok(())
    }

    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use metalrack_image_tools::deploy::MemoryDisk;
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn two_disks_with_the_same_chunk_store_it_once_and_an_erase_frees_it() {
        let store = BlockStore::new(1 << 20);
        let mut a = SimDisk::new(store.clone(), 4096);
        let mut b = SimDisk::new(store.clone(), 4096);
        a.write_at(&[7u8; 1000], 100).unwrap();
        b.write_at(&[7u8; 1000], 100).unwrap();
        assert_eq!((store.blocks(), store.bytes()), (1, 1000));
        let mut back = vec![0u8; 1200];
        b.read_at(&mut back, 0).unwrap();
        assert!(back[..100].iter().all(|x| *x == 0) && back[100..1100].iter().all(|x| *x == 7));
        a.write_at(&[0u8; 4096], 0).unwrap();
        assert!(a.is_blank());
        assert_eq!(store.blocks(), 1, "b still holds it");
        drop(b);
        assert_eq!((store.blocks(), store.bytes()), (0, 0));
    }

    #[test]
    fn a_full_store_fails_the_write_and_out_of_range_is_an_error() {
        let store = BlockStore::new(100);
        let mut disk = SimDisk::new(store, 1000);
        assert_eq!(disk.write_at(&[1u8; 101], 0).unwrap_err().kind(), io::ErrorKind::StorageFull);
        assert!(disk.write_at(&[1u8; 10], 995).is_err());
        assert!(disk.read_at(&mut [0u8; 10], 995).is_err());
    }

    #[test]
    fn the_prefix_hash_is_the_blake3_of_the_bytes() {
        let mut disk = SimDisk::new(BlockStore::new(1 << 20), 10_000);
        disk.write_at(b"hello", 3).unwrap();
        let mut expected = vec![0u8; 9000];
        expected[3..8].copy_from_slice(b"hello");
        assert_eq!(disk.hash_prefix(9000).unwrap(), Hash::of(&expected));
    }

    proptest! {
        /// Any sequence of writes reads back exactly as on a plain memory disk.
        #[test]
        fn reads_match_a_memory_disk_after_any_writes(
            writes in proptest::collection::vec((0u64..2000, 0usize..600, 0u8..4), 0..40),
            read_at in 0u64..2000, read_len in 0usize..600,
        ) {
            const SIZE: u64 = 2600;
            let mut sim = SimDisk::new(BlockStore::new(1 << 20), SIZE);
            let mut plain = MemoryDisk(vec![0u8; SIZE as usize]);
            for (offset, len, value) in writes {
                // Some zero writes, some patterned ones (distinct bytes catch offset mistakes).
                let bytes: Vec<u8> = (0..len).map(|i| if value == 0 { 0 } else { (i as u8).wrapping_mul(value) | 1 }).collect();
                sim.write_at(&bytes, offset).unwrap();
                plain.write_at(&bytes, offset).unwrap();
            }
            let (mut a, mut b) = (vec![0u8; read_len], vec![0u8; read_len]);
            sim.read_at(&mut a, read_at).unwrap();
            plain.read_at(&mut b, read_at).unwrap();
            prop_assert_eq!(a, b);
            let mut whole = vec![0u8; SIZE as usize];
            sim.read_at(&mut whole, 0).unwrap();
            prop_assert_eq!(&whole, &plain.0);
        }
    }
}
