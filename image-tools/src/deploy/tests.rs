//! Property tests of plan, execute and finish with in-memory disks and sources that corrupt
//! and drop; erase tests on a real file.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::io;
use std::rc::Rc;
use std::time::Duration;

use proptest::prelude::*;

use super::*;
use crate::chunker::{chunk_slice, ChunkerConfig};
use crate::testdata::random_bytes;

/// Small chunks so a small image has many of them.
const CONFIG: ChunkerConfig = ChunkerConfig { min_len: 256, avg_len: 1024, max_len: 4096 };

fn options(range_bytes_max: usize) -> ExecuteOptions {
    ExecuteOptions {
        range_bytes_max,
        retry: RetryPolicy {
            failures_max: 1000,
            backoff_initial: Duration::ZERO,
            backoff_max: Duration::ZERO,
            stall_deadline: Duration::from_secs(60),
        },
    }
}

/// What the disk holds before the deploy.
#[derive(Debug, Clone)]
enum Prior {
    Zeros,
    Random(u64),
    /// The image with a few byte runs changed (an older version).
    Older(Vec<(usize, u8)>),
}

fn prior_disk(image: &[u8], prior: &Prior, extra: usize) -> Vec<u8> {
    let disk_len = image.len() + extra;
    match prior {
        Prior::Zeros => vec![0; disk_len],
        Prior::Random(seed) => random_bytes(disk_len, *seed),
        Prior::Older(edits) => {
            let mut disk = image.to_vec();
            disk.extend(random_bytes(extra, 7));
            for &(position, value) in edits {
                if !disk.is_empty() {
                    let at = position % disk.len();
                    let end = (at + 100).min(disk.len());
                    disk[at..end].iter_mut().for_each(|byte| *byte ^= value | 1);
                }
            }
            disk
        }
    }
}

fn prior_strategy() -> impl Strategy<Value = Prior> {
    prop_oneof![
        Just(Prior::Zeros),
        any::<u64>().prop_map(Prior::Random),
        proptest::collection::vec((any::<usize>(), any::<u8>()), 0..6).prop_map(Prior::Older),
    ]
}

/// The chunks whose bytes on `disk` differ from the image's, by direct comparison.
fn differing(manifest: &crate::manifest::Manifest, image: &[u8], disk: &[u8]) -> (Vec<u32>, u64) {
    let mut indices = Vec::new();
    let mut len = 0;
    for (index, (offset, chunk)) in manifest.chunk_offsets().enumerate() {
        let range = offset as usize..offset as usize + chunk.len as usize;
        if image[range.clone()] != disk[range] {
            indices.push(index as u32);
            len += u64::from(chunk.len);
        }
    }
    (indices, len)
}

/// Serves the image; corrupts the chunks in `corrupt_once` the first time it serves them;
/// after `drop_every` bytes served in one call, drops the connection (partial data); records
/// every range served and refuses a range overlapping a chunk already written.
struct TestSource {
    image: Vec<u8>,
    corrupt_once: BTreeSet<u64>,
    chunk_starts: Vec<(u64, u64)>,
    drop_after: Option<usize>,
    fetches: u64,
    written: Rc<RefCell<Vec<(u64, u64)>>>,
}

impl ChunkSource for TestSource {
    fn fetch(&mut self, start: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let end = start + buf.len() as u64;
        assert!(end <= self.image.len() as u64, "fetch past the image: {start}..{end}");
        for &(written_start, written_end) in self.written.borrow().iter() {
            assert!(
                end <= written_start || start >= written_end,
                "fetch {start}..{end} overlaps chunk {written_start}..{written_end} already written"
            );
        }
        self.fetches += 1;
        buf.copy_from_slice(&self.image[start as usize..end as usize]);
        for &(chunk_start, chunk_end) in &self.chunk_starts {
            if chunk_start >= start && chunk_end <= end && self.corrupt_once.remove(&chunk_start) {
                buf[(chunk_start - start) as usize] ^= 0xff;
            }
        }
        match self.drop_after {
            // Every other call drops, so each drop is followed by progress.
            Some(after) if buf.len() > after && self.fetches % 2 == 1 => {
                Err(SourceError::retryable(after, "connection dropped (test)"))
            }
            _ => Ok(()),
        }
    }
}

/// A disk that asserts every write is a whole manifest chunk at its place, with its bytes.
struct CheckingDisk {
    inner: MemoryDisk,
    chunks: Vec<(u64, u32, crate::Hash)>,
    written: Rc<RefCell<Vec<(u64, u64)>>>,
}

impl Disk for CheckingDisk {
    fn size_bytes(&self) -> io::Result<u64> {
        self.inner.size_bytes()
    }

    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.inner.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let (_, len, hash) =
            *self.chunks.iter().find(|(start, _, _)| *start == offset).expect("a write at a chunk's start");
        assert_eq!(buf.len(), len as usize, "a write is one whole chunk");
        assert_eq!(crate::Hash::of(buf), hash, "a write at {offset} holds unverified bytes");
        self.written.borrow_mut().push((offset, offset + u64::from(len)));
        self.inner.write_at(buf, offset)
    }

    fn sync(&mut self) -> io::Result<()> {
        self.inner.sync()
    }
}

struct Case {
    image: Vec<u8>,
    manifest: crate::manifest::Manifest,
    disk: CheckingDisk,
    source: TestSource,
    expected_indices: Vec<u32>,
    expected_bytes: u64,
}

fn case(seed: u64, len: usize, prior: &Prior, extra: usize) -> Case {
    let image = random_bytes(len, seed);
    let manifest = chunk_slice(&image, CONFIG, |_| {}).unwrap();
    let disk_bytes = prior_disk(&image, prior, extra);
    let (expected_indices, expected_bytes) = differing(&manifest, &image, &disk_bytes);
    let chunks: Vec<_> = manifest.chunk_offsets().map(|(offset, chunk)| (offset, chunk.len, chunk.hash)).collect();
    let written = Rc::new(RefCell::new(Vec::new()));
    let source = TestSource {
        image: image.clone(),
        corrupt_once: BTreeSet::new(),
        chunk_starts: chunks.iter().map(|&(offset, len, _)| (offset, offset + u64::from(len))).collect(),
        drop_after: None,
        fetches: 0,
        written: written.clone(),
    };
    let disk = CheckingDisk { inner: MemoryDisk(disk_bytes), chunks, written };
    Case { image, manifest, disk, source, expected_indices, expected_bytes }
}

fn assert_deployed(case: &Case, before: &[u8]) {
    let disk = &case.disk.inner.0;
    assert!(disk[..case.image.len()] == case.image[..], "the disk holds the image");
    assert!(disk[case.image.len()..] == before[case.image.len()..], "bytes past the image are untouched");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn the_plan_lists_exactly_the_chunks_that_differ(
        seed in any::<u64>(), len in 0usize..60_000, prior in prior_strategy(), extra in 0usize..5000,
    ) {
        let case = case(seed, len, &prior, extra);
        let plan = plan(&case.manifest, &case.disk).unwrap();
        let planned: Vec<u32> = plan.to_write.iter().map(|chunk| chunk.index).collect();
        prop_assert_eq!(planned, case.expected_indices.clone());
        prop_assert_eq!(plan.bytes_to_write, case.expected_bytes);
        prop_assert_eq!(plan.bytes_skipped, case.manifest.file_len - case.expected_bytes);
    }

    #[test]
    fn a_deploy_writes_only_the_differing_chunks_and_leaves_the_image(
        seed in any::<u64>(), len in 0usize..60_000, prior in prior_strategy(), extra in 0usize..5000,
        range_bytes_max in 1usize..20_000,
    ) {
        let mut case = case(seed, len, &prior, extra);
        let before = case.disk.inner.0.clone();
        let mut reports = Vec::new();
        let result = deploy(&case.manifest, &mut case.source, &mut case.disk, &options(range_bytes_max), &mut |p| reports.push(*p)).unwrap();
        assert_deployed(&case, &before);
        prop_assert_eq!(result.bytes_written, case.expected_bytes);
        prop_assert_eq!(result.bytes_fetched, case.expected_bytes);
        prop_assert_eq!(result.bytes_skipped, case.manifest.file_len - case.expected_bytes);
        prop_assert_eq!(result.bytes_done, case.manifest.file_len);
        prop_assert_eq!(result.chunks_refetched, 0);
        prop_assert_eq!(result.phase, DeployPhase::Done);
        prop_assert_eq!(reports.last().copied(), Some(result));
        // Figures only grow.
        for pair in reports.windows(2) {
            prop_assert!(pair[1].bytes_done >= pair[0].bytes_done);
        }
    }

    #[test]
    fn chunks_corrupted_in_transit_are_fetched_again_and_never_written_unverified(
        seed in any::<u64>(), len in 1usize..60_000, prior in prior_strategy(),
        pick in proptest::collection::vec(any::<usize>(), 1..5), range_bytes_max in 1usize..20_000,
    ) {
        let mut case = case(seed, len, &prior, 0);
        let before = case.disk.inner.0.clone();
        let planned: Vec<u64> = case.expected_indices.iter()
            .map(|&index| case.source.chunk_starts[index as usize].0).collect();
        if !planned.is_empty() {
            case.source.corrupt_once = pick.iter().map(|p| planned[p % planned.len()]).collect();
        }
        let n_corrupt = case.source.corrupt_once.len() as u64;
        let result = deploy(&case.manifest, &mut case.source, &mut case.disk, &options(range_bytes_max), &mut |_| {}).unwrap();
        assert_deployed(&case, &before);
        prop_assert_eq!(result.chunks_refetched, n_corrupt);
        prop_assert_eq!(result.bytes_written, case.expected_bytes);
    }

    #[test]
    fn a_dropped_connection_resumes_without_fetching_written_chunks_again(
        seed in any::<u64>(), len in 1usize..60_000, prior in prior_strategy(),
        drop_after in 0usize..10_000, range_bytes_max in 1usize..20_000,
    ) {
        let mut case = case(seed, len, &prior, 0);
        let before = case.disk.inner.0.clone();
        case.source.drop_after = Some(drop_after);
        let result = deploy(&case.manifest, &mut case.source, &mut case.disk, &options(range_bytes_max), &mut |_| {}).unwrap();
        assert_deployed(&case, &before);
        prop_assert_eq!(result.bytes_written, case.expected_bytes);
        prop_assert_eq!(result.chunks_refetched, 0);
    }
}

#[test]
fn a_source_that_always_corrupts_a_chunk_fails_the_deploy_without_writing_it() {
    struct Liar(Vec<u8>);
    impl ChunkSource for Liar {
        fn fetch(&mut self, start: u64, buf: &mut [u8]) -> Result<(), SourceError> {
            buf.copy_from_slice(&self.0[start as usize..start as usize + buf.len()]);
            buf[0] ^= 1;
            Ok(())
        }
    }
    let mut case = case(1, 20_000, &Prior::Zeros, 0);
    let error =
        deploy(&case.manifest, &mut Liar(case.image.clone()), &mut case.disk, &options(8192), &mut |_| {}).unwrap_err();
    assert!(matches!(error, DeployError::ChunkCorrupt { index: 0, attempts: 3, .. }), "{error:?}");
    assert!(case.disk.written.borrow().is_empty());
}

#[test]
fn a_fatal_source_error_ends_the_deploy_at_once_and_retries_are_bounded() {
    struct Refuses(bool);
    impl ChunkSource for Refuses {
        fn fetch(&mut self, _start: u64, _buf: &mut [u8]) -> Result<(), SourceError> {
            Err(if self.0 { SourceError::retryable(0, "reset") } else { SourceError::fatal("404 Not Found") })
        }
    }
    let mut case = case(2, 20_000, &Prior::Zeros, 0);
    let error = deploy(&case.manifest, &mut Refuses(false), &mut case.disk, &options(8192), &mut |_| {}).unwrap_err();
    assert!(matches!(error, DeployError::Fetch { start: 0, .. }), "{error:?}");
    let mut bounded = options(8192);
    bounded.retry.failures_max = 3;
    let error = deploy(&case.manifest, &mut Refuses(true), &mut case.disk, &bounded, &mut |_| {}).unwrap_err();
    assert!(matches!(error, DeployError::FetchGaveUp { failures: 4, .. }), "{error:?}");
}

#[test]
fn a_disk_smaller_than_the_image_is_refused_before_anything_is_written() {
    let mut case = case(3, 20_000, &Prior::Zeros, 0);
    case.disk.inner.0.truncate(10_000);
    let error = deploy(&case.manifest, &mut case.source, &mut case.disk, &options(8192), &mut |_| {}).unwrap_err();
    assert!(matches!(error, DeployError::DiskTooSmall { disk_len: 10_000, file_len: 20_000 }), "{error:?}");
}

#[test]
fn a_deploy_to_a_regular_file_then_finish_reads_it_back() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("disk");
    let image = random_bytes(100_000, 4);
    let manifest = chunk_slice(&image, CONFIG, |_| {}).unwrap();
    std::fs::write(&path, vec![0u8; 150_000]).unwrap();
    let mut file = std::fs::OpenOptions::new().read(true).write(true).open(&path).unwrap();
    assert_eq!(Disk::size_bytes(&file).unwrap(), 150_000);
    let mut source = case(4, 100_000, &Prior::Zeros, 0).source;
    deploy(&manifest, &mut source, &mut file, &ExecuteOptions::default(), &mut |_| {}).unwrap();
    assert_eq!(std::fs::read(&path).unwrap()[..100_000], image[..]);
    // Damage one byte behind the deploy's back: finish notices.
    file.write_at(&[image[500] ^ 1], 500).unwrap();
    let error = finish(&manifest, &mut file, &ExecuteOptions::default()).unwrap_err();
    assert!(matches!(error, DeployError::ReadBackHash { .. }), "{error:?}");
}

#[test]
fn erase_quick_zeroes_both_ends_and_full_zeroes_everything() {
    let len = 3 * ERASE_QUICK_BYTES as usize + 4096;
    let mut disk = MemoryDisk(vec![0xaa; len]);
    erase(&mut disk, EraseMode::Quick, &mut |_, _| {}).unwrap();
    let quick = ERASE_QUICK_BYTES as usize;
    assert!(disk.0[..quick].iter().all(|&b| b == 0));
    assert!(disk.0[len - quick..].iter().all(|&b| b == 0));
    assert!(disk.0[quick..len - quick].iter().all(|&b| b == 0xaa));
    // A disk smaller than the two ends together is zeroed whole, without overlap errors.
    let mut small = MemoryDisk(vec![0xaa; 1000]);
    erase(&mut small, EraseMode::Quick, &mut |_, _| {}).unwrap();
    assert!(small.0.iter().all(|&b| b == 0));
    let mut none = MemoryDisk(vec![0xaa; 1000]);
    erase(&mut none, EraseMode::None, &mut |_, _| {}).unwrap();
    assert!(none.0.iter().all(|&b| b == 0xaa));
    let mut last = (0, 0);
    erase(&mut disk, EraseMode::Full, &mut |done, total| last = (done, total)).unwrap();
    assert!(disk.0.iter().all(|&b| b == 0));
    assert_eq!(last, (len as u64, len as u64));
}
