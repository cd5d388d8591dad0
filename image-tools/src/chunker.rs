//! Cuts a byte stream into content-defined chunks (FastCDC 2020) and hashes them (BLAKE3).
//!
//! Content-defined boundaries depend only on the bytes near them, so an insertion or deletion
//! moves the boundaries around it and leaves every other chunk — and its hash — unchanged:
//! a new image version shares most chunks with the previous one.
//!
//! Two paths give the same manifest for the same bytes:
//!
//! - [`chunk_file`] maps a regular file and splits the work between threads
//!   ([`chunk_slice`]): each thread cuts, hashes and file-hashes one segment of the mapping,
//!   and the segments are stitched where their boundaries meet (see [`chunk_slice`]). Memory is
//!   the chunk lists; of the mapping, each thread keeps at most [`RELEASE_BYTES`] (and the
//!   chunk it is cutting) in the process's resident set, handing the rest back as it goes.
//! - [`chunk_reader`] (pipes, sockets, block devices, anything that is not a regular file) runs
//!   on one thread: fastcdc's `StreamCDC` keeps one `max_len` window, each chunk is handed to
//!   the caller and dropped, and the whole-stream hash is computed on the way. Memory is
//!   O(`max_len`) whatever the input size.
//!
//! Either way the chunk list grows (36 bytes per chunk: ~6 MiB for 10 GiB at the default
//! 64 KiB average).

use std::fs::File;
use std::io::Read;
use std::num::NonZeroUsize;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use blake3::hazmat::{self, ChainingValue, HasherExt};
use fastcdc::v2020;

use crate::cut::Cutter;
use crate::manifest::{ChunkRef, Manifest, CHUNKS_MAX, CHUNK_LEN_MAX};
use crate::Hash;

/// Chunk size bounds in bytes. The same file chunked with the same config always yields the
/// same chunks; two versions of an image share chunks only if chunked with the same config.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkerConfig {
    pub min_len: u32,
    pub avg_len: u32,
    pub max_len: u32,
}

impl Default for ChunkerConfig {
    /// 16 KiB / 64 KiB / 256 KiB: chunks small enough that a changed package costs a few of
    /// them, large enough that a 10 GiB image is ~160 Ki chunks (a 6 MiB manifest) and
    /// per-chunk costs (a hash lookup, a store file, a frame header) stay small.
    fn default() -> Self {
        ChunkerConfig { min_len: 16 * 1024, avg_len: 64 * 1024, max_len: 256 * 1024 }
    }
}

impl ChunkerConfig {
    /// Checks the bounds against fastcdc's allowed ranges (it panics outside them), their
    /// order, and the manifest's chunk length limit.
    pub fn validate(&self) -> Result<(), ChunkError> {
        let in_range = |name: &str, value: u32, min: u32, max: u32| {
            if (min..=max).contains(&value) {
                Ok(())
            } else {
                Err(ChunkError::Config { reason: format!("{name} is {value} bytes, must be in {min}..={max}") })
            }
        };
        in_range("minimum chunk length", self.min_len, v2020::MINIMUM_MIN, v2020::MINIMUM_MAX)?;
        in_range("average chunk length", self.avg_len, v2020::AVERAGE_MIN, v2020::AVERAGE_MAX)?;
        in_range("maximum chunk length", self.max_len, v2020::MAXIMUM_MIN, v2020::MAXIMUM_MAX.min(CHUNK_LEN_MAX))?;
        if !(self.min_len <= self.avg_len && self.avg_len <= self.max_len) {
            return Err(ChunkError::Config {
                reason: format!(
                    "chunk lengths must satisfy minimum <= average <= maximum, got {} / {} / {}",
                    self.min_len, self.avg_len, self.max_len
                ),
            });
        }
        Ok(())
    }
}

/// Chunks everything `reader` yields, calling `on_chunk` with each chunk in order, and
/// returns the manifest (chunk list, total length, whole-stream hash).
///
/// Errors if the stream needs more than [`CHUNKS_MAX`] chunks at this config: the manifest
/// could not list them.
pub fn chunk_reader<R: Read>(
    reader: R,
    config: ChunkerConfig,
    mut on_chunk: impl FnMut(&ChunkRef, &[u8]) -> std::io::Result<()>,
) -> Result<Manifest, ChunkError> {
    config.validate()?;
    let chunker = v2020::StreamCDC::new(RetryInterrupted(reader), config.min_len, config.avg_len, config.max_len);
    let mut file_hasher = blake3::Hasher::new();
    let mut file_len: u64 = 0;
    let mut chunks = Vec::new();
    for result in chunker {
        let chunk = result.map_err(|e| ChunkError::Read { source: e.into() })?;
        if chunks.len() == CHUNKS_MAX as usize {
            return Err(too_many_chunks(config));
        }
        // StreamCDC never yields more than max_len, which validate() bounded by CHUNK_LEN_MAX.
        assert!(!chunk.data.is_empty() && chunk.data.len() <= config.max_len as usize);
        let chunk_ref = ChunkRef { hash: Hash::of(&chunk.data), len: chunk.data.len() as u32 };
        file_hasher.update(&chunk.data);
        file_len += u64::from(chunk_ref.len);
        on_chunk(&chunk_ref, &chunk.data).map_err(|source| ChunkError::Callback { source })?;
        chunks.push(chunk_ref);
    }
    Ok(Manifest { file_len, file_hash: Hash(*file_hasher.finalize().as_bytes()), chunks })
}

/// Chunks the file at `path`, calling `progress` with the bytes done so far from time to time
/// and last with the file's length.
///
/// A regular file is mapped and chunked on all cores ([`chunk_slice`]); anything else (a block
/// device, a FIFO, `/dev/stdin`) is read as a stream on one thread ([`chunk_reader`]). Both
/// give the same manifest.
pub fn chunk_file(path: &Path, config: ChunkerConfig, mut progress: impl FnMut(u64)) -> Result<Manifest, ChunkError> {
    config.validate()?;
    let file = File::open(path).map_err(|source| ChunkError::Open { path: path.to_owned(), source })?;
    let metadata = file.metadata().map_err(|source| ChunkError::Read { source })?;
    // An empty file cannot be mapped (and has nothing to gain from it).
    if metadata.is_file() && metadata.len() > 0 {
        let mapping = crate::mapped::map_for_reading(&file).map_err(|source| ChunkError::Map { source })?;
        let n_segments = segments_for(mapping.len());
        return chunk_segments(&mapping, config, n_segments, &|done| crate::mapped::release(&mapping, done), progress);
    }
    // No BufReader: StreamCDC reads straight into its own max_len window.
    let mut done: u64 = 0;
    chunk_reader(file, config, |chunk, _data| {
        done += u64::from(chunk.len);
        progress(done);
        Ok(())
    })
}

/// The smallest segment of a slice given to a thread of its own: ~1 ms of work at 4 GiB/s.
/// Smaller segments would spend more on starting threads and stitching lists than the second
/// core saves, and would leave few chunks per segment to stitch at.
const SEGMENT_LEN_MIN: usize = 4 * 1024 * 1024;

/// The most threads one slice is split between. Each costs a stack and its share of the chunk
/// list; past a few cores, reading the page cache (memory bandwidth), not CPU, is the limit.
const THREADS_MAX: usize = 16;

/// Chunks a byte slice (typically a mapped file), calling `progress` with the bytes done so far
/// from time to time and last with the slice's length. Gives the same manifest as
/// [`chunk_reader`] over the same bytes.
///
/// The slice is split into one segment per core (at least [`SEGMENT_LEN_MIN`] each). Each
/// thread cuts its segment as if a chunk started at the segment's start, hashes each chunk
/// while it is still in cache, and hashes the segment's part of the whole-file BLAKE3 tree
/// (subtrees that are merged at the end, `blake3::hazmat`). A boundary depends only on where
/// its chunk started and the bytes that follow, so once the chain of chunks coming from the
/// previous segment reaches a boundary the thread also found, the two chains agree from there
/// on: the previous chain is extended chunk by chunk (on the calling thread, usually one to
/// three chunks) until it lands on one of the segment's boundaries, and the segment's chunks
/// before that point are dropped. Input where chains never meet (a run of zeros across a
/// segment start, cut every `max_len` from different origins) is finished on the calling
/// thread: correct, as slow as one thread.
pub fn chunk_slice(data: &[u8], config: ChunkerConfig, progress: impl FnMut(u64)) -> Result<Manifest, ChunkError> {
    chunk_segments(data, config, segments_for(data.len()), &|_| {}, progress)
}

/// One segment per core, each at least [`SEGMENT_LEN_MIN`].
fn segments_for(len: usize) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, NonZeroUsize::get);
    cores.min(THREADS_MAX).min(len / SEGMENT_LEN_MIN).max(1)
}

/// Bytes a chunking thread reads past the last range it handed to `release` before it hands
/// over the next: what each thread keeps mapped in, at most, besides the chunk it is cutting.
/// Small next to the 100 MiB a push may add to `imgtool`'s memory (issue 12), large enough that
/// the `madvise` per release is noise (one per 8 MiB).
const RELEASE_BYTES: usize = 8 * 1024 * 1024;

/// Released ranges start and end on multiples of this: 64 KiB is a multiple of every page size
/// Linux uses (4, 16 and 64 KiB), and `madvise` takes whole pages.
const RELEASE_ALIGN: usize = 64 * 1024;

/// [`chunk_slice`] with a given number of segments (tests use small ones); `release` is handed
/// ranges of `data` (from [`RELEASE_ALIGN`] to [`RELEASE_ALIGN`]) that a thread has finished
/// reading, so that a mapped file's pages need not stay in the process's resident set. A
/// released range may still be read again (stitching re-reads a segment's first chunks), so
/// releasing must not change what `data` shows.
fn chunk_segments(
    data: &[u8],
    config: ChunkerConfig,
    n_segments: usize,
    release: &(dyn Fn(Range<usize>) + Sync),
    mut progress: impl FnMut(u64),
) -> Result<Manifest, ChunkError> {
    config.validate()?;
    let file_len = data.len();
    if file_len == 0 {
        progress(0);
        return Ok(Manifest { file_len: 0, file_hash: Hash::of(b""), chunks: vec![] });
    }
    // Segment starts on BLAKE3 chunk (1 KiB) boundaries so that the whole-file tree can be cut
    // there; tiny inputs whose starts would collide get one segment.
    let mut starts: Vec<usize> =
        (0..n_segments).map(|i| file_len / n_segments * i / blake3::CHUNK_LEN * blake3::CHUNK_LEN).collect();
    starts.dedup();
    let segments: Vec<Range<usize>> =
        starts.iter().zip(starts.iter().skip(1).copied().chain([file_len])).map(|(&start, end)| start..end).collect();

    let mut leaves = Vec::new();
    let tree = plan_subtrees(0..file_len as u64, &starts[1..], &mut leaves);
    let cutter = Cutter::new(config);
    let done = AtomicU64::new(0);
    let job = |segment: Range<usize>| {
        let first_leaf = leaves.partition_point(|leaf| leaf.start < segment.start as u64);
        let n_leaves = leaves[first_leaf..].partition_point(|leaf| leaf.start < segment.end as u64);
        SegmentJob {
            data,
            cutter: &cutter,
            config,
            segment,
            leaves: &leaves[first_leaf..][..n_leaves],
            root: segments.len() == 1,
            done: &done,
            release,
        }
    };
    let outputs: Vec<SegmentOutput> = std::thread::scope(|scope| {
        // A segment whose thread cannot be started (out of threads or memory) runs on the
        // calling thread after the first: slower, same result.
        let pending: Vec<_> = segments[1..]
            .iter()
            .map(|segment| {
                let job = job(segment.clone());
                std::thread::Builder::new()
                    .name("chunker".into())
                    .spawn_scoped(scope, move || job.run(|| {}))
                    .map_err(|_| segment.clone())
            })
            .collect();
        // The calling thread takes the first segment and reports progress between its chunks.
        let mut outputs = vec![job(segments[0].clone()).run(|| progress(done.load(Ordering::Relaxed)))];
        for segment in pending {
            outputs.push(match segment {
                Ok(thread) => thread.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)),
                Err(segment) => job(segment).run(|| {}),
            });
        }
        outputs.into_iter().collect::<Result<_, _>>()
    })?;

    let chunks = stitch(data, &cutter, config, &outputs)?;
    let mut cvs = outputs.iter().flat_map(|output| &output.leaf_cvs);
    let file_hash = match (&tree, outputs[0].root_hash) {
        (SubtreePlan::Leaf, Some(root_hash)) => root_hash,
        (SubtreePlan::Parent(left, right), None) => {
            let left = merge_subtrees(left, &mut cvs);
            let right = merge_subtrees(right, &mut cvs);
            Hash(*hazmat::merge_subtrees_root(&left, &right, hazmat::Mode::Hash).as_bytes())
        }
        _ => unreachable!("one segment hashes the root, several hash subtrees"),
    };
    assert!(cvs.next().is_none(), "every subtree is merged once");
    let manifest = Manifest { file_len: file_len as u64, file_hash, chunks };
    assert_eq!(manifest.chunks.iter().map(|chunk| u64::from(chunk.len)).sum::<u64>(), manifest.file_len);
    progress(manifest.file_len);
    Ok(manifest)
}

/// One thread's share of [`chunk_slice`].
struct SegmentJob<'a> {
    data: &'a [u8],
    cutter: &'a Cutter,
    config: ChunkerConfig,
    segment: Range<usize>,
    /// The whole-file BLAKE3 subtrees inside `segment`, in order, covering it exactly.
    leaves: &'a [Range<u64>],
    /// The segment is the whole input: its hash is the root, not a subtree.
    root: bool,
    /// Bytes of the input done, over all segments.
    done: &'a AtomicU64,
    /// Takes the ranges this thread has finished reading (see [`chunk_segments`]).
    release: &'a (dyn Fn(Range<usize>) + Sync),
}

/// What one thread found in its segment.
struct SegmentOutput {
    /// The chunks from the segment's start until the first that ends at or past the segment's
    /// end, with their offsets.
    chunks: Vec<(usize, ChunkRef)>,
    /// The chaining values of the job's subtrees, in order (empty if `root_hash` is set).
    leaf_cvs: Vec<ChainingValue>,
    root_hash: Option<Hash>,
}

impl SegmentJob<'_> {
    fn run(self, mut after_chunk: impl FnMut()) -> Result<SegmentOutput, ChunkError> {
        let mut chunks = Vec::new();
        let mut file_hasher = SubtreeHasher::new(self.leaves);
        let mut offset = self.segment.start;
        // Everything before this has been handed to `release`.
        let mut released = self.segment.start / RELEASE_ALIGN * RELEASE_ALIGN;
        while offset < self.segment.end {
            // Bounds this thread's list (48 bytes a chunk) by what a manifest could list; only
            // a config with tiny chunks on a huge input gets near it, and that fails anyway.
            if chunks.len() == CHUNKS_MAX as usize {
                return Err(too_many_chunks(self.config));
            }
            let chunk = cut_and_hash(self.data, self.cutter, offset);
            let end = offset + chunk.len as usize;
            // The bytes are in cache now: hash the part of the chunk inside the segment into
            // the whole-file tree.
            file_hasher.update(self.data, offset..end.min(self.segment.end));
            self.done.fetch_add(end.min(self.segment.end) as u64 - offset as u64, Ordering::Relaxed);
            chunks.push((offset, chunk));
            offset = end;
            let read = offset / RELEASE_ALIGN * RELEASE_ALIGN;
            if read >= released + RELEASE_BYTES {
                (self.release)(released..read);
                released = read;
            }
            after_chunk();
        }
        (self.release)(released..offset / RELEASE_ALIGN * RELEASE_ALIGN);
        let (leaf_cvs, root_hash) = if self.root {
            (vec![], Some(Hash(*file_hasher.hasher.finalize().as_bytes())))
        } else {
            (file_hasher.finish(), None)
        };
        Ok(SegmentOutput { chunks, leaf_cvs, root_hash })
    }
}

/// Cuts the chunk that starts at `offset` and hashes it.
fn cut_and_hash(data: &[u8], cutter: &Cutter, offset: usize) -> ChunkRef {
    let end = cutter.cut(data, offset);
    // cut() returns at least min_len bytes, or the rest of the input if shorter; never more
    // than max_len, which validate() bounded by CHUNK_LEN_MAX.
    assert!(offset < end && end - offset <= CHUNK_LEN_MAX as usize, "cut at {end} from {offset}");
    let bytes = &data[offset..end];
    ChunkRef { hash: Hash::of(bytes), len: bytes.len() as u32 }
}

/// Joins the segments' chunk lists into the one chain a single pass would have cut.
fn stitch(
    data: &[u8],
    cutter: &Cutter,
    config: ChunkerConfig,
    outputs: &[SegmentOutput],
) -> Result<Vec<ChunkRef>, ChunkError> {
    let mut chunks: Vec<ChunkRef> = Vec::with_capacity(outputs.iter().map(|output| output.chunks.len()).sum());
    // Where the chain's next chunk starts.
    let mut offset = 0;
    for output in outputs {
        while offset < data.len() {
            match output.chunks.binary_search_by_key(&offset, |(start, _)| *start) {
                // The chain meets this segment's boundaries: the rest of the segment agrees.
                Ok(meet) => {
                    chunks.extend(output.chunks[meet..].iter().map(|(_, chunk)| *chunk));
                    let (start, last) = output.chunks.last().expect("found in it");
                    offset = start + last.len as usize;
                    break;
                }
                // The chain has passed every chunk of this segment without meeting one.
                Err(index) if index == output.chunks.len() => break,
                Err(_) => {
                    let chunk = cut_and_hash(data, cutter, offset);
                    offset += chunk.len as usize;
                    chunks.push(chunk);
                }
            }
        }
        if chunks.len() > CHUNKS_MAX as usize {
            return Err(too_many_chunks(config));
        }
    }
    // Only if the chain never met the last segment's boundaries.
    while offset < data.len() {
        let chunk = cut_and_hash(data, cutter, offset);
        offset += chunk.len as usize;
        chunks.push(chunk);
        if chunks.len() > CHUNKS_MAX as usize {
            return Err(too_many_chunks(config));
        }
    }
    Ok(chunks)
}

/// The shape of the whole-file BLAKE3 tree down to the subtrees the segments hash.
enum SubtreePlan {
    /// The next subtree in order: hashed whole by one segment's thread.
    Leaf,
    Parent(Box<SubtreePlan>, Box<SubtreePlan>),
}

/// Splits `range` as BLAKE3 does (the left subtree is the largest power of two of 1 KiB
/// chunks shorter than the input) until no subtree spans a cut, appending the subtrees in order
/// to `leaves`. Every cut is a multiple of 1 KiB, so the split ends, at worst at single 1 KiB
/// chunks; in practice there are O(log len) subtrees per cut.
fn plan_subtrees(range: Range<u64>, cuts: &[usize], leaves: &mut Vec<Range<u64>>) -> SubtreePlan {
    if !cuts.iter().any(|&cut| range.start < cut as u64 && (cut as u64) < range.end) {
        leaves.push(range);
        return SubtreePlan::Leaf;
    }
    let middle = range.start + hazmat::left_subtree_len(range.end - range.start);
    let left = plan_subtrees(range.start..middle, cuts, leaves);
    let right = plan_subtrees(middle..range.end, cuts, leaves);
    SubtreePlan::Parent(Box::new(left), Box::new(right))
}

/// The chaining value of a non-root subtree, from its leaves' values taken in order.
fn merge_subtrees<'a>(plan: &SubtreePlan, leaf_cvs: &mut impl Iterator<Item = &'a ChainingValue>) -> ChainingValue {
    match plan {
        SubtreePlan::Leaf => *leaf_cvs.next().expect("one chaining value per leaf"),
        SubtreePlan::Parent(left, right) => {
            let left = merge_subtrees(left, leaf_cvs);
            let right = merge_subtrees(right, leaf_cvs);
            hazmat::merge_subtrees_non_root(&left, &right, hazmat::Mode::Hash)
        }
    }
}

/// Hashes consecutive bytes into a run of whole-file subtrees, one after the other.
struct SubtreeHasher<'a> {
    leaves: &'a [Range<u64>],
    /// Index in `leaves` of the subtree `hasher` is on.
    current: usize,
    hasher: blake3::Hasher,
    cvs: Vec<ChainingValue>,
}

impl<'a> SubtreeHasher<'a> {
    fn new(leaves: &'a [Range<u64>]) -> Self {
        let mut hasher = blake3::Hasher::new();
        if let Some(first) = leaves.first() {
            hasher.set_input_offset(first.start);
        }
        SubtreeHasher { leaves, current: 0, hasher, cvs: Vec::with_capacity(leaves.len()) }
    }

    /// Hashes `data[range]`, which must follow the bytes hashed before.
    fn update(&mut self, data: &[u8], range: Range<usize>) {
        let mut offset = range.start;
        while offset < range.end {
            let leaf = &self.leaves[self.current];
            let end = range.end.min(leaf.end as usize);
            self.hasher.update(&data[offset..end]);
            offset = end;
            if offset as u64 == leaf.end && self.current + 1 < self.leaves.len() {
                self.cvs.push(self.hasher.finalize_non_root());
                self.current += 1;
                self.hasher = blake3::Hasher::new();
                self.hasher.set_input_offset(self.leaves[self.current].start);
            }
        }
    }

    /// The chaining values of every subtree, the last one included.
    fn finish(mut self) -> Vec<ChainingValue> {
        assert_eq!(self.current + 1, self.leaves.len(), "every subtree was fed");
        self.cvs.push(self.hasher.finalize_non_root());
        self.cvs
    }
}

/// The error for an input that needs more chunks than a manifest can list.
fn too_many_chunks(config: ChunkerConfig) -> ChunkError {
    ChunkError::Config {
        reason: format!(
            "the input needs more than {CHUNKS_MAX} chunks (the manifest's limit) at an average of {} bytes; \
             choose larger chunk lengths",
            config.avg_len
        ),
    }
}

/// Retries reads interrupted by a signal, which `StreamCDC` would report as errors.
struct RetryInterrupted<R>(R);

impl<R: Read> Read for RetryInterrupted<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.0.read(buf) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                result => return result,
            }
        }
    }
}

/// Why chunking failed.
#[derive(Debug, thiserror::Error)]
pub enum ChunkError {
    #[error("invalid chunker configuration: {reason}")]
    Config { reason: String },
    #[error("cannot open {}", path.display())]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot read the input")]
    Read { source: std::io::Error },
    #[error("cannot map the input into memory")]
    Map { source: std::io::Error },
    #[error("cannot process a chunk")]
    Callback { source: std::io::Error },
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::testdata::random_bytes;
    use std::collections::HashSet;

    fn chunk_bytes(bytes: &[u8], config: ChunkerConfig) -> (Manifest, Vec<Vec<u8>>) {
        let mut pieces = Vec::new();
        let manifest = chunk_reader(bytes, config, |_, data| {
            pieces.push(data.to_vec());
            Ok(())
        })
        .unwrap();
        (manifest, pieces)
    }

    const MIB: usize = 1024 * 1024;

    #[test]
    fn test_default_config() {
        let config = ChunkerConfig::default();
        assert_eq!((config.min_len, config.avg_len, config.max_len), (16384, 65536, 262144));
        config.validate().unwrap();
    }

    #[test]
    fn test_validate_rejects() {
        let bad = [
            ChunkerConfig { min_len: 63, ..ChunkerConfig::default() },
            ChunkerConfig { avg_len: 255, min_len: 64, ..ChunkerConfig::default() },
            ChunkerConfig { max_len: CHUNK_LEN_MAX + 1, ..ChunkerConfig::default() },
            ChunkerConfig { min_len: 64 * 1024, avg_len: 32 * 1024, max_len: 256 * 1024 },
            ChunkerConfig { min_len: 16 * 1024, avg_len: 512 * 1024, max_len: 256 * 1024 },
        ];
        for config in bad {
            assert!(matches!(config.validate(), Err(ChunkError::Config { .. })), "{config:?}");
            assert!(matches!(chunk_reader(&b"x"[..], config, |_, _| Ok(())), Err(ChunkError::Config { .. })));
        }
        let largest = ChunkerConfig { min_len: 1024 * 1024, avg_len: 4 * MIB as u32, max_len: CHUNK_LEN_MAX };
        largest.validate().unwrap();
    }

    #[test]
    fn test_reproduces_input_and_hashes() {
        let input = random_bytes(3 * MIB + 12345, 1);
        let (manifest, pieces) = chunk_bytes(&input, ChunkerConfig::default());
        assert_eq!(pieces.concat(), input);
        assert_eq!(manifest.file_len, input.len() as u64);
        assert_eq!(manifest.file_hash, Hash::of(&input));
        assert_eq!(manifest.chunks.len(), pieces.len());
        for ((offset, chunk), piece) in manifest.chunk_offsets().zip(&pieces) {
            assert_eq!(chunk.hash, Hash::of(piece));
            assert_eq!(chunk.len as usize, piece.len());
            assert_eq!(&input[offset as usize..][..piece.len()], &piece[..]);
        }
        // All chunks but the last respect the bounds; the average is in the right ballpark.
        let config = ChunkerConfig::default();
        for chunk in &manifest.chunks[..manifest.chunks.len() - 1] {
            assert!((config.min_len..=config.max_len).contains(&chunk.len), "{chunk:?}");
        }
        assert!((20..=100).contains(&manifest.chunks.len()), "{} chunks", manifest.chunks.len());
        assert_eq!(Manifest::parse(&manifest.to_bytes()), Ok(manifest));
    }

    #[test]
    fn test_empty_input() {
        let (manifest, pieces) = chunk_bytes(b"", ChunkerConfig::default());
        assert!(pieces.is_empty());
        assert_eq!(manifest, Manifest { file_len: 0, file_hash: Hash::of(b""), chunks: vec![] });
    }

    #[test]
    fn test_small_input_is_one_chunk() {
        let (manifest, pieces) = chunk_bytes(b"hello", ChunkerConfig::default());
        assert_eq!(pieces, vec![b"hello".to_vec()]);
        assert_eq!(manifest.chunks, vec![ChunkRef { hash: Hash::of(b"hello"), len: 5 }]);
    }

    #[test]
    fn test_zeros_cut_at_max_len() {
        let config = ChunkerConfig::default();
        let (manifest, _) = chunk_bytes(&vec![0u8; 4 * config.max_len as usize], config);
        let expected = ChunkRef { hash: Hash::of(&vec![0u8; config.max_len as usize]), len: config.max_len };
        assert_eq!(manifest.chunks, vec![expected; 4]);
    }

    #[test]
    fn test_boundaries_stable_under_insertion() {
        let original = random_bytes(4 * MIB, 2);
        let insert_at = original.len() / 2;
        let mut edited = original.clone();
        edited.splice(insert_at..insert_at, random_bytes(100, 3));

        let config = ChunkerConfig::default();
        let (before, _) = chunk_bytes(&original, config);
        let (after, _) = chunk_bytes(&edited, config);

        // Every chunk that ends before the insertion point is untouched.
        let n_before_insertion = before
            .chunk_offsets()
            .take_while(|(offset, chunk)| offset + u64::from(chunk.len) <= insert_at as u64)
            .count();
        assert!(n_before_insertion > 10, "only {n_before_insertion} chunks before the insertion");
        assert_eq!(before.chunks[..n_before_insertion], after.chunks[..n_before_insertion]);

        let old_hashes: HashSet<Hash> = before.chunks.iter().map(|c| c.hash).collect();
        let n_shared = after.chunks.iter().filter(|c| old_hashes.contains(&c.hash)).count();
        assert!(
            n_shared * 10 >= after.chunks.len() * 9,
            "only {n_shared} of {} chunks shared after a 100-byte insertion",
            after.chunks.len()
        );
        assert_ne!(before.file_hash, after.file_hash);
    }

    #[test]
    fn test_read_error() {
        /// Yields some bytes, then fails.
        struct Failing(usize);
        impl Read for Failing {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                if self.0 == 0 {
                    return Err(std::io::Error::other("disk on fire"));
                }
                let n = buf.len().min(self.0);
                buf[..n].fill(7);
                self.0 -= n;
                Ok(n)
            }
        }
        let result = chunk_reader(Failing(100_000), ChunkerConfig::default(), |_, _| Ok(()));
        match result {
            Err(ChunkError::Read { source }) => assert_eq!(source.to_string(), "disk on fire"),
            other => panic!("expected a read error, got {other:?}"),
        }
    }

    #[test]
    fn test_interrupted_reads_are_retried() {
        /// Interrupts every other read.
        struct Interrupting<'a>(&'a [u8], bool);
        impl Read for Interrupting<'_> {
            fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
                self.1 = !self.1;
                if self.1 {
                    return Err(std::io::ErrorKind::Interrupted.into());
                }
                self.0.read(buf)
            }
        }
        let input = random_bytes(MIB, 4);
        let manifest = chunk_reader(Interrupting(&input, false), ChunkerConfig::default(), |_, _| Ok(())).unwrap();
        assert_eq!(manifest.file_hash, Hash::of(&input));
    }

    #[test]
    fn test_callback_error_stops() {
        let input = random_bytes(MIB, 5);
        let mut calls = 0;
        let result = chunk_reader(&input[..], ChunkerConfig::default(), |_, _| {
            calls += 1;
            Err(std::io::Error::other("store full"))
        });
        assert!(matches!(result, Err(ChunkError::Callback { .. })));
        assert_eq!(calls, 1);
    }

    /// An input with what real images have besides incompressible data: long runs of zeros
    /// (sparse space, cut at `max_len`), a short repeated pattern, a repeated 4 KiB block (the
    /// same file copied many times), and random data between them so boundaries fall at
    /// every kind of transition.
    fn structured_bytes() -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend(recorded_random_bytes(300_001, 20));
        bytes.extend(vec![0u8; MIB + 17]);
        bytes.extend(b"metalrack ".iter().cycle().take(700 * 1024 + 3));
        bytes.extend(recorded_random_bytes(MIB - 5, 21));
        let block = recorded_random_bytes(4096, 22);
        for _ in 0..200 {
            bytes.extend_from_slice(&block);
        }
        bytes.extend(vec![0u8; 300 * 1024 + 1]);
        bytes.extend(recorded_random_bytes(5000, 23));
        bytes
    }

    /// Random bytes as the fixture below was recorded with: the shared generator started from
    /// `seed | 1` as it is (see `testdata::Random::from_state`).
    fn recorded_random_bytes(len: usize, seed: u64) -> Vec<u8> {
        let mut bytes = vec![0u8; len];
        crate::testdata::Random::from_state(seed | 1).fill(&mut bytes);
        bytes
    }

    /// The hash of a manifest's encoding: chunk boundaries, chunk hashes, length and file hash
    /// in one value.
    fn manifest_digest(manifest: &Manifest) -> String {
        Hash::of(&manifest.to_bytes()).to_hex()
    }

    /// Boundaries and hashes recorded with the `StreamCDC` chunker of commit `cbaca9d`, before
    /// any speed work. A chunker that moves one boundary or changes one hash makes every
    /// manifest differ from the ones already pushed, so no chunk would be shared with images
    /// chunked before: every path (stream, file) must reproduce these exactly.
    const RECORDED: [(&str, u64, usize, &str); 3] = [
        ("random, default config", 5_247_201, 62, "5eaeb956e7ed80c8167a75dc2fb7ea2ba39b672173f51d12a921e84c8963b767"),
        (
            "structured, default config",
            4_245_369,
            28,
            "bc08fa6270fb2b9de23fca583b5cd56f63a6682709f1dc99f215ec25f648f6c4",
        ),
        (
            "structured, small chunks",
            4_245_369,
            592,
            "b2c90f32977745fca733e6187aada3f55acbe5bf72984142c330b8f32946f090",
        ),
    ];

    fn recorded_inputs() -> [(Vec<u8>, ChunkerConfig); 3] {
        let small = ChunkerConfig { min_len: 1024, avg_len: 4096, max_len: 16384 };
        [
            (recorded_random_bytes(5 * MIB + 4321, 12), ChunkerConfig::default()),
            (structured_bytes(), ChunkerConfig::default()),
            (structured_bytes(), small),
        ]
    }

    #[test]
    fn test_boundaries_match_recorded_fixture() {
        let dir = tempfile::tempdir().unwrap();
        for ((name, file_len, n_chunks, digest), (input, config)) in RECORDED.iter().zip(recorded_inputs()) {
            let (from_stream, _) = chunk_bytes(&input, config);
            let path = dir.path().join("input.raw");
            std::fs::write(&path, &input).unwrap();
            let from_file = chunk_file(&path, config, |_| {}).unwrap();
            for (path_name, manifest) in [("stream", &from_stream), ("file", &from_file)] {
                assert_eq!(
                    (manifest.file_len, manifest.chunks.len(), manifest_digest(manifest).as_str()),
                    (*file_len, *n_chunks, *digest),
                    "{name}, {path_name} path"
                );
            }
        }
    }

    #[test]
    fn test_chunk_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("image.raw");
        let input = random_bytes(MIB + 7, 6);
        std::fs::write(&path, &input).unwrap();
        let mut reports = Vec::new();
        let manifest = chunk_file(&path, ChunkerConfig::default(), |done| reports.push(done)).unwrap();
        assert_eq!(manifest, chunk_bytes(&input, ChunkerConfig::default()).0);
        assert_eq!(reports.last(), Some(&(input.len() as u64)));
        assert!(reports.windows(2).all(|w| w[0] <= w[1]), "{reports:?}");

        let empty = dir.path().join("empty.raw");
        std::fs::write(&empty, b"").unwrap();
        let manifest = chunk_file(&empty, ChunkerConfig::default(), |_| {}).unwrap();
        assert_eq!(manifest, Manifest { file_len: 0, file_hash: Hash::of(b""), chunks: vec![] });

        let missing = dir.path().join("missing.raw");
        match chunk_file(&missing, ChunkerConfig::default(), |_| {}) {
            Err(ChunkError::Open { path, .. }) => assert_eq!(path, missing),
            other => panic!("expected an open error, got {other:?}"),
        }
    }

    /// Every way of splitting an input into segments gives the one-pass manifest: boundaries
    /// where the chains meet after a few chunks, later, or never (zeros across a segment start),
    /// and BLAKE3 trees cut at every kind of place.
    #[test]
    fn test_segments_match_one_pass() {
        let tiny = ChunkerConfig { min_len: 64, avg_len: 256, max_len: 1024 };
        let small = ChunkerConfig { min_len: 1024, avg_len: 4096, max_len: 16384 };
        let mut zeros_across_starts = random_bytes(64 * 1024, 30);
        zeros_across_starts.extend(vec![0u8; 6 * MIB + 12345]);
        // Chains that never meet the last segment's: finished on the calling thread.
        let zeros_to_the_end = zeros_across_starts.clone();
        zeros_across_starts.extend(random_bytes(300_000, 31));
        let cases = [
            (random_bytes(3 * MIB + 999, 32), ChunkerConfig::default()),
            (random_bytes(3 * MIB + 999, 32), small),
            (structured_bytes(), small),
            (structured_bytes(), ChunkerConfig::default()),
            (zeros_across_starts.clone(), ChunkerConfig::default()),
            (zeros_across_starts, small),
            (zeros_to_the_end, ChunkerConfig::default()),
        ];
        for (input, config) in &cases {
            let (one_pass, _) = chunk_bytes(input, *config);
            for n_segments in [1, 2, 3, 5, 8] {
                let mut reports = Vec::new();
                let manifest = chunk_segments(input, *config, n_segments, &|_| {}, |done| reports.push(done)).unwrap();
                assert_eq!(manifest, one_pass, "{} bytes, {config:?}, {n_segments} segments", input.len());
                assert_eq!(reports.last(), Some(&(input.len() as u64)));
                assert!(reports.windows(2).all(|w| w[0] <= w[1]));
            }
        }
        // Short inputs, where segment starts collide or fall on the first BLAKE3 chunks.
        for len in [0, 1, 63, 64, 65, 1023, 1024, 1025, 2047, 2048, 2049, 3000, 4096, 5000, 8193, 65543, 100_000] {
            for input in [random_bytes(len, 33), vec![0u8; len]] {
                let (one_pass, _) = chunk_bytes(&input, tiny);
                for n_segments in 1..=6 {
                    let manifest = chunk_segments(&input, tiny, n_segments, &|_| {}, |_| {}).unwrap();
                    assert_eq!(manifest, one_pass, "{len} bytes, {n_segments} segments");
                }
            }
        }
    }

    #[test]
    fn finished_ranges_are_released_in_aligned_bounded_steps_that_cover_the_input() {
        let len = 3 * RELEASE_BYTES + 5 * RELEASE_ALIGN + 777;
        let input = random_bytes(len, 34);
        let (one_pass, _) = chunk_bytes(&input, ChunkerConfig::default());
        for n_segments in [1, 2, 3] {
            let released = std::sync::Mutex::new(Vec::new());
            let release = |range: Range<usize>| released.lock().unwrap().push(range);
            let manifest = chunk_segments(&input, ChunkerConfig::default(), n_segments, &release, |_| {}).unwrap();
            assert_eq!(manifest, one_pass, "releasing changes nothing chunked ({n_segments} segments)");
            let mut ranges = released.into_inner().unwrap();
            ranges.retain(|range| !range.is_empty());
            ranges.sort_by_key(|range| range.start);
            for range in &ranges {
                assert!(range.start % RELEASE_ALIGN == 0 && range.end % RELEASE_ALIGN == 0, "{range:?}");
                // A thread keeps no more than RELEASE_BYTES and one chunk unreleased.
                assert!(range.len() <= RELEASE_BYTES + CHUNK_LEN_MAX as usize + RELEASE_ALIGN, "{range:?}");
            }
            // Segments' ranges may overlap where one thread's last chunk runs into the next
            // segment; together they cover every whole step of the input.
            let mut covered = 0;
            for range in &ranges {
                assert!(range.start <= covered, "a gap before {range:?} ({n_segments} segments)");
                covered = covered.max(range.end);
            }
            assert_eq!(covered, len / RELEASE_ALIGN * RELEASE_ALIGN, "{n_segments} segments");
            // Each thread released as it went, not once at its end.
            assert!(ranges.len() >= 3, "{} releases for {n_segments} segments", ranges.len());
        }
    }

    #[test]
    fn test_slice_validates_config() {
        let bad = ChunkerConfig { min_len: 63, ..ChunkerConfig::default() };
        assert!(matches!(chunk_slice(b"x", bad, |_| {}), Err(ChunkError::Config { .. })));
    }
}
