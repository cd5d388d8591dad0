//! A content-addressed chunk directory: each chunk is a file `ROOT/ab/cd/<64 hex>` named by
//! its BLAKE3 hash.
//!
//! Two levels of two-hex-digit fan-out keep directories small (65 536 leaf directories: a
//! million chunks is ~16 files per directory). Invariants: a file under its final name is
//! complete and was hash-checked when written (it only appears there by an atomic link of a
//! fully written file, synced first unless the store is volatile), and `get` checks it again,
//! so on-disk damage is reported rather than served.
//!
//! How a new file gets its name: it is written as an unnamed file (`O_TMPFILE`) in its final
//! directory and then linked under its name (`linkat` through `/proc/self/fd`), one directory
//! operation in one of the 65 536 leaf directories. Where the filesystem refuses unnamed files
//! (or `/proc` is missing) it is written as a named temp file in `ROOT/tmp`, hard-linked into
//! place and unlinked, as before. The first way was measured (docs/PERFORMANCE.md, issue 12
//! goal 2): concurrent puts all creating and unlinking in the one `tmp` directory queued on its
//! lock and on ext4's inode allocation among recently deleted inodes. Crash safety, either way:
//! before the link the file has no name (an unnamed file is freed by the filesystem when its
//! last descriptor closes, or at the next mount after a crash; a named temp file is in `tmp`,
//! never read as a chunk), and the link gives the complete file its name atomically, so a chunk
//! file is either complete (as far as the page cache is concerned) or absent. What a crash can
//! still tear is data not yet flushed under a published name in a volatile store: see
//! [`ChunkStore::open_volatile`].
//!
//! A chunk may have a compressed copy beside it, `<64 hex>.zst` (a plain zstd frame, see
//! `delta::compress_chunk`), written the same atomic way. It is not a chunk (`hashes` skips it)
//! and is removed with its chunk; it is served as is, and its reader (the rack) checks what it
//! decodes to against the chunk's hash.

use std::fs::{self, File, OpenOptions};
use std::io::{ErrorKind, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::Hash;

/// Where writes in progress live when the filesystem refuses unnamed files, inside the root so
/// the final link stays on one filesystem.
const TMP_DIR: &str = "tmp";

/// Where a process finds its own open files by number, to link an unnamed file into place
/// (`linkat` of the descriptor itself needs `CAP_DAC_READ_SEARCH`; this way needs nothing).
const PROC_SELF_FD: &str = "/proc/self/fd";

/// Suffix of a chunk's compressed copy.
const COMPRESSED_SUFFIX: &str = ".zst";

/// Distinguishes temp files of concurrent puts within one process (the pid covers processes).
static TMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// A chunk directory. Cheap to clone; clones share the directory, and any number of threads
/// or processes may use one directory at once.
#[derive(Debug, Clone)]
pub struct ChunkStore {
    root: PathBuf,
    durable: bool,
    /// New files are written unnamed (`O_TMPFILE`); cleared, for this store and its clones, the
    /// first time the filesystem refuses one, and then they go through `TMP_DIR`.
    unnamed_files: Arc<AtomicBool>,
}

impl ChunkStore {
    /// Opens the store at `root`, creating it if needed.
    ///
    /// Leftover temp files from crashed writers are not removed here: another process may be
    /// writing them right now.
    pub fn open(root: &Path) -> Result<ChunkStore, StoreError> {
        let tmp = root.join(TMP_DIR);
        fs::create_dir_all(&tmp).map_err(|source| StoreError::Io {
            what: "create the store directory",
            path: tmp,
            source,
        })?;
        let unnamed_files = Path::new(PROC_SELF_FD).is_dir();
        Ok(ChunkStore { root: root.to_owned(), durable: true, unnamed_files: Arc::new(AtomicBool::new(unnamed_files)) })
    }

    /// Opens a store whose `put` does not flush each chunk to disk (tens of times faster for
    /// many small chunks). After a crash a chunk may be torn under its valid name: `get` still
    /// detects it (`HashMismatch`), and the caller must then `remove` it and fetch it again.
    /// For stores whose contents are checked before use or made durable in bulk (`sync`).
    ///
    /// Each put starts writing its file back to the disk without waiting for it
    /// (`sync_file_range(SYNC_FILE_RANGE_WRITE)`), so the disk works while more chunks arrive
    /// and the bulk `sync` finds little left to write. Only a head start: durability still
    /// comes from `sync`.
    pub fn open_volatile(root: &Path) -> Result<ChunkStore, StoreError> {
        Ok(ChunkStore { durable: false, ..ChunkStore::open(root)? })
    }

    /// Flushes everything written to the store's filesystem (one `syncfs`, instead of a flush
    /// per chunk): after it returns, every chunk put so far survives a crash.
    pub fn sync(&self) -> Result<(), StoreError> {
        let dir = File::open(&self.root).map_err(|source| StoreError::Io {
            what: "open the store directory",
            path: self.root.clone(),
            source,
        })?;
        nix::unistd::syncfs(&dir).map_err(|errno| StoreError::Io {
            what: "flush the store to disk",
            path: self.root.clone(),
            source: errno.into(),
        })
    }

    /// Where the chunk `hash` is (or would be) stored.
    pub fn path(&self, hash: &Hash) -> PathBuf {
        let hex = hash.to_hex();
        self.root.join(&hex[0..2]).join(&hex[2..4]).join(hex)
    }

    /// Where the compressed copy of the chunk `hash` is (or would be) stored.
    pub fn compressed_path(&self, hash: &Hash) -> PathBuf {
        let mut path = self.path(hash).into_os_string();
        path.push(COMPRESSED_SUFFIX);
        PathBuf::from(path)
    }

    /// Whether the chunk is stored. Does not read it: `get` checks the content.
    pub fn contains(&self, hash: &Hash) -> bool {
        fs::metadata(self.path(hash)).is_ok_and(|metadata| metadata.is_file())
    }

    /// Stores `data` under `hash`, returning whether it was newly stored (false if it was
    /// already there). Checks `Hash::of(data) == *hash` first.
    ///
    /// Safe under concurrency: each put writes and syncs its own temp file, then hard-links it
    /// to the final name, which fails atomically if another put got there first. The sync costs
    /// a disk flush per new chunk; without it a crash could leave a torn file under a valid
    /// name that `contains` reports as present, so the chunk would never be re-sent.
    pub fn put(&self, hash: &Hash, data: &[u8]) -> Result<bool, StoreError> {
        let actual = Hash::of(data);
        if actual != *hash {
            return Err(StoreError::HashMismatch { expected: *hash, actual });
        }
        let path = self.path(hash);
        if self.contains(hash) {
            return Ok(false);
        }
        self.write_new(hash, &path, data)
    }

    /// Stores `compressed` as the compressed copy of the chunk `hash`, which must be stored,
    /// returning whether it was newly stored. The caller made it from the chunk (it is not
    /// checked here: the rack checks what it decodes to).
    pub fn put_compressed(&self, hash: &Hash, compressed: &[u8]) -> Result<bool, StoreError> {
        if !self.contains(hash) {
            return Err(StoreError::Missing { hash: *hash });
        }
        self.write_new(hash, &self.compressed_path(hash), compressed)
    }

    /// The compressed copy of the chunk `hash`, if it has one.
    pub fn get_compressed(&self, hash: &Hash) -> Result<Option<Vec<u8>>, StoreError> {
        let path = self.compressed_path(hash);
        match fs::read(&path) {
            Ok(data) => Ok(Some(data)),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(source) => Err(StoreError::Io { what: "read a compressed chunk", path, source }),
        }
    }

    /// Writes `data` to `path` as a new file given its name by an atomic link, unless `path`
    /// exists: unnamed in the final directory when the filesystem allows, else through a temp
    /// file in `TMP_DIR` (see the module's comment).
    fn write_new(&self, hash: &Hash, path: &Path, data: &[u8]) -> Result<bool, StoreError> {
        let parent = path.parent().expect("chunk paths have a parent");
        fs::create_dir_all(parent).map_err(|source| StoreError::Io {
            what: "create a chunk directory",
            path: parent.to_owned(),
            source,
        })?;
        if self.unnamed_files.load(Ordering::Relaxed) {
            match self.write_unnamed(parent, data) {
                Ok(file) => return link_into_place(&file, path),
                Err(source) if refuses_unnamed_files(&source) => {
                    if self.unnamed_files.swap(false, Ordering::Relaxed) {
                        tracing::info!(
                            dir = %parent.display(), error = %source,
                            "the filesystem refuses unnamed files (O_TMPFILE); chunks go through a temp directory"
                        );
                    }
                }
                Err(source) => return Err(StoreError::Io { what: "write a chunk", path: parent.to_owned(), source }),
            }
        }
        self.write_through_temp_dir(hash, path, data)
    }

    /// An unnamed file in `dir` holding `data`, flushed (durable store) or on its way to the
    /// disk (volatile store). Dropped without a link, it is gone: nothing names it.
    fn write_unnamed(&self, dir: &Path, data: &[u8]) -> std::io::Result<File> {
        // O_TMPFILE without O_EXCL: the file may be given a name. No O_CREAT (refused with it).
        let mut file = OpenOptions::new().write(true).custom_flags(nix::libc::O_TMPFILE).open(dir)?;
        file.write_all(data)?;
        self.flush_or_start_writeback(&file)?;
        Ok(file)
    }

    /// The portable way: a named temp file in `TMP_DIR`, hard-linked into place, then removed.
    fn write_through_temp_dir(&self, hash: &Hash, path: &Path, data: &[u8]) -> Result<bool, StoreError> {
        let mut tmp = TempFile::create(&self.root.join(TMP_DIR), hash)?;
        tmp.file
            .write_all(data)
            .and_then(|()| self.flush_or_start_writeback(&tmp.file))
            .map_err(|source| StoreError::Io { what: "write a chunk", path: tmp.path.clone(), source })?;
        match fs::hard_link(&tmp.path, path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
            Err(source) => Err(StoreError::Io { what: "link a chunk into place", path: path.to_owned(), source }),
        }
        // `tmp` is removed on drop, whatever happened.
    }

    /// Durable store: the file's data on disk before it gets a name. Volatile store: its
    /// writeback started (see [`ChunkStore::open_volatile`]).
    fn flush_or_start_writeback(&self, file: &File) -> std::io::Result<()> {
        if self.durable {
            file.sync_data()
        } else {
            start_writeback(file);
            Ok(())
        }
    }

    /// Reads the chunk `hash` and checks its content.
    pub fn get(&self, hash: &Hash) -> Result<Vec<u8>, StoreError> {
        let path = self.path(hash);
        let data = match fs::read(&path) {
            Ok(data) => data,
            Err(e) if e.kind() == ErrorKind::NotFound => return Err(StoreError::Missing { hash: *hash }),
            Err(source) => return Err(StoreError::Io { what: "read a chunk", path, source }),
        };
        let actual = Hash::of(&data);
        if actual != *hash {
            return Err(StoreError::HashMismatch { expected: *hash, actual });
        }
        Ok(data)
    }

    /// Removes the chunk `hash` and its compressed copy, returning the bytes freed (0 if it was
    /// not stored). The copy goes first: a copy without its chunk would never be removed.
    pub fn remove(&self, hash: &Hash) -> Result<u64, StoreError> {
        Ok(remove_file_counted(&self.compressed_path(hash))? + remove_file_counted(&self.path(hash))?)
    }

    /// Every stored chunk, sorted. Skips `tmp` and any name that is not a chunk in its right
    /// place (a stray file is not a chunk the store can serve under that hash).
    pub fn hashes(&self) -> Result<Vec<Hash>, StoreError> {
        let mut hashes = Vec::new();
        for level1 in self.read_dir(&self.root)? {
            let Some(prefix1) = fan_out_name(&level1) else { continue };
            for level2 in self.read_dir(&level1)? {
                let Some(prefix2) = fan_out_name(&level2) else { continue };
                for chunk in self.read_dir(&level2)? {
                    let Some(hash) = chunk.file_name().and_then(|n| n.to_str()).and_then(|n| Hash::from_hex(n).ok())
                    else {
                        continue;
                    };
                    let hex = hash.to_hex();
                    if hex[0..2] == prefix1 && hex[2..4] == prefix2 && chunk.is_file() {
                        hashes.push(hash);
                    }
                }
            }
        }
        hashes.sort_unstable();
        Ok(hashes)
    }

    /// The paths of the entries of `dir`.
    fn read_dir(&self, dir: &Path) -> Result<Vec<PathBuf>, StoreError> {
        let io_error = |source| StoreError::Io { what: "list a store directory", path: dir.to_owned(), source };
        let mut paths = Vec::new();
        for entry in fs::read_dir(dir).map_err(io_error)? {
            paths.push(entry.map_err(io_error)?.path());
        }
        Ok(paths)
    }
}

/// Gives the unnamed `file` its name `path`, atomically: false if a chunk is already there (a
/// concurrent put won; this file is freed when closed).
fn link_into_place(file: &File, path: &Path) -> Result<bool, StoreError> {
    let fd_path = format!("{PROC_SELF_FD}/{}", file.as_raw_fd());
    // AT_SYMLINK_FOLLOW: link the file the descriptor's magic link points at, not the link.
    match nix::unistd::linkat(
        nix::fcntl::AT_FDCWD,
        fd_path.as_str(),
        nix::fcntl::AT_FDCWD,
        path,
        nix::fcntl::AtFlags::AT_SYMLINK_FOLLOW,
    ) {
        Ok(()) => Ok(true),
        Err(nix::errno::Errno::EEXIST) => Ok(false),
        Err(errno) => {
            Err(StoreError::Io { what: "link a chunk into place", path: path.to_owned(), source: errno.into() })
        }
    }
}

/// Whether opening an unnamed file failed because the filesystem (or kernel) has no such thing,
/// rather than for a reason the other way would hit too: `EOPNOTSUPP` from a filesystem without
/// it, `EISDIR` from kernels before 3.11 (they take `O_TMPFILE` for `O_DIRECTORY`), `EINVAL`.
fn refuses_unnamed_files(error: &std::io::Error) -> bool {
    use nix::libc::{EINVAL, EISDIR, EOPNOTSUPP};
    matches!(error.raw_os_error(), Some(EOPNOTSUPP | EISDIR | EINVAL))
}

/// Starts writing `file` back to the disk without waiting (`sync_file_range(WRITE)` over the
/// whole file). Only a head start for a later `sync`, so a failure is logged and ignored.
fn start_writeback(file: &File) {
    // SAFETY: a system call on a file descriptor this `File` owns and keeps open for the call;
    // it takes no pointers, so it cannot touch this process's memory.
    #[allow(unsafe_code)]
    let result = unsafe { nix::libc::sync_file_range(file.as_raw_fd(), 0, 0, nix::libc::SYNC_FILE_RANGE_WRITE) };
    if result != 0 {
        tracing::debug!(error = %std::io::Error::last_os_error(), "sync_file_range failed; the store's sync does it all");
    }
}

/// The two-hex-digit name of a fan-out directory, lowercase as `Hash::to_hex` writes it.
fn fan_out_name(path: &Path) -> Option<String> {
    let name = path.file_name()?.to_str()?;
    let is_fan_out = name.len() == 2 && name.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
    (is_fan_out && path.is_dir()).then(|| name.to_owned())
}

/// Removes the file at `path`, returning its length (0 if it was not there).
fn remove_file_counted(path: &Path) -> Result<u64, StoreError> {
    let path = path.to_owned();
    let len = match fs::metadata(&path) {
        Ok(metadata) => metadata.len(),
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(0),
        Err(source) => return Err(StoreError::Io { what: "look up a chunk", path, source }),
    };
    match fs::remove_file(&path) {
        Ok(()) => Ok(len),
        // Removed concurrently: not ours to count.
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(0),
        Err(source) => Err(StoreError::Io { what: "remove a chunk", path, source }),
    }
}

/// A uniquely named file in the temp directory, removed when dropped (after a successful
/// link the chunk lives on under its final name).
struct TempFile {
    path: PathBuf,
    file: File,
}

impl TempFile {
    fn create(dir: &Path, hash: &Hash) -> Result<TempFile, StoreError> {
        let counter = TMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        let path = dir.join(format!("{}.{}.{counter}", hash.to_hex(), std::process::id()));
        // create_new: a leftover of a crashed process with a recycled pid is an error, never
        // a file two writers share.
        let file = OpenOptions::new().write(true).create_new(true).open(&path).map_err(|source| StoreError::Io {
            what: "create a temp file",
            path: path.clone(),
            source,
        })?;
        Ok(TempFile { path, file })
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        // Best effort: a leftover temp file wastes space but is never read as a chunk.
        let _ = fs::remove_file(&self.path);
    }
}

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("chunk content does not match its hash: expected {expected}, got {actual}")]
    HashMismatch { expected: Hash, actual: Hash },
    #[error("cannot {what}: {}", path.display())]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("chunk {hash} is not in the store")]
    Missing { hash: Hash },
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_store() -> (tempfile::TempDir, ChunkStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open(&dir.path().join("chunks")).unwrap();
        (dir, store)
    }

    /// The store as it is where the filesystem refuses unnamed files.
    fn temp_store_through_temp_dir() -> (tempfile::TempDir, ChunkStore) {
        let (dir, store) = temp_store();
        store.unnamed_files.store(false, Ordering::Relaxed);
        (dir, store)
    }

    /// Every file under `dir`, recursively.
    fn files_under(dir: &Path) -> Vec<PathBuf> {
        let mut files = Vec::new();
        for entry in fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                files.extend(files_under(&path));
            } else {
                files.push(path);
            }
        }
        files
    }

    #[test]
    fn test_path_layout() {
        let store = ChunkStore {
            root: PathBuf::from("/srv/chunks"),
            durable: true,
            unnamed_files: Arc::new(AtomicBool::new(true)),
        };
        let hash = Hash::of(b"");
        assert_eq!(
            store.path(&hash),
            Path::new("/srv/chunks/af/13/af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262")
        );
    }

    #[test]
    fn test_put_get_contains_remove() {
        put_get_contains_remove(temp_store());
        put_get_contains_remove(temp_store_through_temp_dir());
    }

    fn put_get_contains_remove((_dir, store): (tempfile::TempDir, ChunkStore)) {
        let data = b"a chunk of an image".to_vec();
        let hash = Hash::of(&data);
        assert!(!store.contains(&hash));
        assert!(matches!(store.get(&hash), Err(StoreError::Missing { hash: h }) if h == hash));

        assert!(store.put(&hash, &data).unwrap());
        assert!(store.contains(&hash));
        assert_eq!(fs::read(store.path(&hash)).unwrap(), data);
        assert_eq!(store.get(&hash).unwrap(), data);
        // Storing again is a no-op that says so.
        assert!(!store.put(&hash, &data).unwrap());
        assert_eq!(store.hashes().unwrap(), vec![hash]);

        assert_eq!(store.remove(&hash).unwrap(), data.len() as u64);
        assert!(!store.contains(&hash));
        assert_eq!(store.remove(&hash).unwrap(), 0);
        assert_eq!(store.hashes().unwrap(), vec![]);
    }

    #[test]
    fn test_put_rejects_wrong_hash() {
        let (_dir, store) = temp_store();
        let claimed = Hash::of(b"what the sender said");
        match store.put(&claimed, b"what it sent") {
            Err(StoreError::HashMismatch { expected, actual }) => {
                assert_eq!(expected, claimed);
                assert_eq!(actual, Hash::of(b"what it sent"));
            }
            other => panic!("expected a hash mismatch, got {other:?}"),
        }
        assert!(!store.contains(&claimed));
    }

    #[test]
    fn test_get_detects_damage() {
        let (_dir, store) = temp_store();
        let hash = Hash::of(b"good bytes");
        store.put(&hash, b"good bytes").unwrap();
        fs::write(store.path(&hash), b"bad bytes").unwrap();
        match store.get(&hash) {
            Err(StoreError::HashMismatch { expected, actual }) => {
                assert_eq!(expected, hash);
                assert_eq!(actual, Hash::of(b"bad bytes"));
            }
            other => panic!("expected a hash mismatch, got {other:?}"),
        }
    }

    #[test]
    fn test_hashes_lists_only_chunks() {
        let (dir, store) = temp_store();
        let mut expected: Vec<Hash> = (0..20u8)
            .map(|i| {
                let data = vec![i; 100];
                let hash = Hash::of(&data);
                store.put(&hash, &data).unwrap();
                hash
            })
            .collect();
        expected.sort();
        let root = dir.path().join("chunks");
        // A leftover temp file, a stray file, and a chunk-named file in the wrong place.
        fs::write(root.join(TMP_DIR).join(Hash::of(b"x").to_hex()), b"x").unwrap();
        fs::write(root.join("README"), b"not a chunk").unwrap();
        let misplaced = Hash::of(b"misplaced");
        fs::create_dir_all(root.join("00/00")).unwrap();
        fs::write(root.join("00/00").join(misplaced.to_hex()), b"misplaced").unwrap();
        assert_eq!(store.hashes().unwrap(), expected);
        // No temp files left behind by the puts.
        assert_eq!(fs::read_dir(root.join(TMP_DIR)).unwrap().count(), 1);
    }

    #[test]
    fn test_concurrent_puts_of_one_chunk() {
        concurrent_puts_of_one_chunk(temp_store());
        concurrent_puts_of_one_chunk(temp_store_through_temp_dir());
        let (dir, volatile) = temp_store();
        concurrent_puts_of_one_chunk((dir, ChunkStore { durable: false, ..volatile }));
    }

    fn concurrent_puts_of_one_chunk((_dir, store): (tempfile::TempDir, ChunkStore)) {
        let data = vec![42u8; 64 * 1024];
        let hash = Hash::of(&data);
        let newly_stored: Vec<bool> = std::thread::scope(|scope| {
            let handles: Vec<_> = (0..8).map(|_| scope.spawn(|| store.put(&hash, &data).unwrap())).collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        assert_eq!(newly_stored.iter().filter(|&&new| new).count(), 1, "{newly_stored:?}");
        assert_eq!(store.get(&hash).unwrap(), data);
        assert_eq!(fs::read_dir(store.root.join(TMP_DIR)).unwrap().count(), 0);
    }

    #[test]
    fn a_compressed_copy_lives_beside_its_chunk_and_goes_with_it() {
        let (_dir, store) = temp_store();
        let data = vec![7u8; 10_000];
        let hash = Hash::of(&data);
        assert!(matches!(store.put_compressed(&hash, b"zst"), Err(StoreError::Missing { .. })));
        store.put(&hash, &data).unwrap();
        assert_eq!(store.get_compressed(&hash).unwrap(), None);
        assert!(store.put_compressed(&hash, b"zst").unwrap());
        assert!(!store.put_compressed(&hash, b"zst").unwrap());
        assert_eq!(store.get_compressed(&hash).unwrap().as_deref(), Some(&b"zst"[..]));
        // Not a chunk of its own.
        assert_eq!(store.hashes().unwrap(), vec![hash]);
        assert_eq!(store.remove(&hash).unwrap(), data.len() as u64 + 3);
        assert!(!store.compressed_path(&hash).exists());
        assert_eq!(store.get_compressed(&hash).unwrap(), None);
    }

    /// A put gives no name to anything but the complete chunk: it never even looks at the temp
    /// directory (here a file, so any use of it fails) where unnamed files work.
    #[test]
    fn a_put_names_only_the_complete_chunk() {
        let (dir, store) = temp_store();
        let tmp = dir.path().join("chunks").join(TMP_DIR);
        fs::remove_dir(&tmp).unwrap();
        fs::write(&tmp, b"not a directory").unwrap();
        for store in [store.clone(), ChunkStore { durable: false, ..store.clone() }] {
            let data = vec![store.durable as u8; 70_000];
            let hash = Hash::of(&data);
            assert!(store.put(&hash, &data).unwrap());
            assert!(store.put_compressed(&hash, b"zst").unwrap());
            assert!(!store.put(&hash, &data).unwrap());
            assert_eq!(store.get(&hash).unwrap(), data);
        }
        assert_eq!(store.hashes().unwrap().len(), 2);
        // Two chunks, two copies, and the file that stands in for the temp directory.
        assert_eq!(files_under(&dir.path().join("chunks")).len(), 5);
    }

    /// A writer that stops between writing and linking (here: drops its file; in a crash, the
    /// filesystem frees the unnamed inode) leaves nothing in the store.
    #[test]
    fn a_write_abandoned_before_its_link_leaves_nothing() {
        let (dir, store) = temp_store();
        let data = b"never linked".to_vec();
        let parent = store.path(&Hash::of(&data)).parent().unwrap().to_owned();
        fs::create_dir_all(&parent).unwrap();
        let file = store.write_unnamed(&parent, &data).unwrap();
        assert_eq!(file.metadata().unwrap().len(), data.len() as u64);
        drop(file);
        assert_eq!(files_under(&dir.path().join("chunks")), Vec::<PathBuf>::new());
        assert!(!store.contains(&Hash::of(&data)));
    }

    #[test]
    fn test_open_error() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a-file");
        fs::write(&file, b"").unwrap();
        assert!(matches!(ChunkStore::open(&file), Err(StoreError::Io { .. })));
    }

    #[test]
    fn volatile_store_detects_a_torn_chunk_on_get() {
        let dir = tempfile::tempdir().unwrap();
        let store = ChunkStore::open_volatile(dir.path()).unwrap();
        let data = b"volatile chunk".to_vec();
        let hash = Hash::of(&data);
        assert!(store.put(&hash, &data).unwrap());
        store.sync().unwrap();
        assert_eq!(store.get(&hash).unwrap(), data);
        // What a crash before the flush can leave: the right name, the wrong bytes.
        std::fs::write(store.path(&hash), b"torn").unwrap();
        assert!(store.contains(&hash));
        assert!(matches!(store.get(&hash), Err(StoreError::HashMismatch { .. })));
        store.remove(&hash).unwrap();
        assert!(store.put(&hash, &data).unwrap(), "stored again after removal");
    }
}
