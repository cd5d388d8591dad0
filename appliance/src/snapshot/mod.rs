//! The rack's snapshot store: the image files on disk, publishing snapshots atomically, the
//! `current` link PXE serves from, and the boot table (`boot_table`). Sync writes it, PXE reads
//! it; neither reaches into the other.
//!
//! ```text
//! DATA/images/manifests/<manifest id>   manifests fetched from the region (id = BLAKE3 of the bytes)
//! DATA/images/files/<file hash>         complete, verified, immutable files
//! DATA/images/files/.<hash>.partial     a file being built; never served; kept to resume
//! DATA/images/files/.<hash>.progress    indices of the chunks written to it (checked on resume)
//! DATA/images/snapshots/<id>/           snapshot.json + IMAGE/ARCH/VERSION/KIND hard links
//! DATA/images/current -> snapshots/<id> the snapshot in service, swapped by rename
//! ```
//!
//! A snapshot is immutable once published: its files are hard links to verified files, its
//! `snapshot.json` is written last, and `current` changes by an atomic rename of a symlink.

pub mod boot_table;

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use metalrack_api::images::{validate_image_name, validate_image_token, validate_kind, CatalogueFile};
use metalrack_image_tools::private_file::write_private_file;
use serde::{Deserialize, Serialize};

use crate::data_dir::DataDir;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("cannot {what} {path}")]
    Io { what: &'static str, path: PathBuf, source: std::io::Error },
    #[error("snapshot metadata {path} is damaged")]
    Metadata { path: PathBuf, source: serde_json::Error },
    #[error("the catalogue names an unsafe path: {reason}")]
    UnsafePath { reason: String },
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> SnapshotError + 'a {
    move |source| SnapshotError::Io { what, path: path.to_owned(), source }
}

/// The metadata of a published snapshot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotMeta {
    pub id: String,
    pub revision: i64,
    pub created_at_ms: i64,
    pub files: Vec<CatalogueFile>,
}

impl SnapshotMeta {
    pub fn file_hashes(&self) -> HashSet<&str> {
        self.files.iter().map(|f| f.file_hash.as_str()).collect()
    }
}

/// A snapshot's content identity: the same catalogue files give the same id.
pub fn snapshot_id(revision: i64, files: &[CatalogueFile]) -> String {
    let mut hasher = blake3::Hasher::new();
    for f in files {
        for part in [&f.image, &f.arch, &f.version, &f.kind, &f.file_hash] {
            hasher.update(part.as_bytes());
            hasher.update(b"\0");
        }
    }
    format!("r{revision}-{}", &hasher.finalize().to_hex()[..16])
}

/// Where a file lives inside a snapshot: IMAGE/ARCH/VERSION/KIND, each part checked so a
/// hostile catalogue cannot write outside the snapshot.
pub fn relative_path(file: &CatalogueFile) -> Result<PathBuf, SnapshotError> {
    let unsafe_path = |reason: String| SnapshotError::UnsafePath { reason };
    validate_image_name(&file.image).map_err(unsafe_path)?;
    validate_image_token("arch", &file.arch).map_err(unsafe_path)?;
    validate_image_token("version", &file.version).map_err(unsafe_path)?;
    validate_kind(&file.kind).map_err(unsafe_path)?;
    if file.file_hash.len() != 64 || !file.file_hash.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(unsafe_path(format!("file hash {:?}", file.file_hash)));
    }
    Ok(PathBuf::from(&file.image).join(&file.arch).join(&file.version).join(&file.kind))
}

#[derive(Debug, Clone)]
pub struct SnapshotStore {
    root: PathBuf,
}

impl SnapshotStore {
    /// Opens the store under `data_dir/images`. Partial files a crash left are kept: the next
    /// sync resumes them, checking every chunk it keeps.
    pub fn open(data_dir: &DataDir) -> Result<SnapshotStore, SnapshotError> {
        let store = SnapshotStore { root: data_dir.images() };
        for dir in [store.manifests_dir(), store.files_dir(), store.snapshots_dir()] {
            std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        }
        Ok(store)
    }

    pub fn manifests_dir(&self) -> PathBuf {
        self.root.join("manifests")
    }
    pub fn files_dir(&self) -> PathBuf {
        self.root.join("files")
    }
    pub fn snapshots_dir(&self) -> PathBuf {
        self.root.join("snapshots")
    }
    pub fn current_link(&self) -> PathBuf {
        self.root.join("current")
    }
    pub fn file_path(&self, file_hash: &str) -> PathBuf {
        self.files_dir().join(file_hash)
    }
    pub fn partial_path(&self, file_hash: &str) -> PathBuf {
        self.files_dir().join(format!(".{file_hash}.partial"))
    }
    pub fn progress_path(&self, file_hash: &str) -> PathBuf {
        self.files_dir().join(format!(".{file_hash}.progress"))
    }
    pub fn manifest_path(&self, manifest_id: &str) -> PathBuf {
        self.manifests_dir().join(manifest_id)
    }

    /// The snapshot in service, if any.
    pub fn current(&self) -> Result<Option<SnapshotMeta>, SnapshotError> {
        let path = self.current_link().join("snapshot.json");
        match std::fs::read(&path) {
            Ok(bytes) => {
                serde_json::from_slice(&bytes).map(Some).map_err(|source| SnapshotError::Metadata { path, source })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(SnapshotError::Io { what: "read", path, source }),
        }
    }

    /// Publishes a snapshot of `files` (all present in `files/`) and makes it current.
    pub fn publish(&self, revision: i64, files: &[CatalogueFile]) -> Result<SnapshotMeta, SnapshotError> {
        let meta = SnapshotMeta {
            id: snapshot_id(revision, files),
            revision,
            created_at_ms: crate::status::now_ms(),
            files: files.to_vec(),
        };
        let dir = self.snapshots_dir().join(&meta.id);
        if dir.exists() {
            // A crash between building and swapping left it: build it again from scratch.
            std::fs::remove_dir_all(&dir).map_err(io("remove stale snapshot", &dir))?;
        }
        std::fs::create_dir_all(&dir).map_err(io("create", &dir))?;
        for file in files {
            let target = dir.join(relative_path(file)?);
            let parent = target.parent().expect("relative paths have parents");
            std::fs::create_dir_all(parent).map_err(io("create", parent))?;
            let source = self.file_path(&file.file_hash);
            std::fs::hard_link(&source, &target).map_err(io("link", &target))?;
        }
        let meta_path = dir.join("snapshot.json");
        let json = serde_json::to_vec_pretty(&meta).expect("snapshot metadata serializes");
        write_private_file(&meta_path, &json).map_err(io("write", &meta_path))?;
        let link = self.current_link();
        let tmp = self.root.join(".current.tmp");
        let _ = std::fs::remove_file(&tmp);
        std::os::unix::fs::symlink(Path::new("snapshots").join(&meta.id), &tmp).map_err(io("create link", &tmp))?;
        std::fs::rename(&tmp, &link).map_err(io("swap", &link))?;
        if let Ok(root) = std::fs::File::open(&self.root) {
            let _ = root.sync_all();
        }
        Ok(meta)
    }

    /// Removes what the current snapshot does not use: other snapshots, files, partial files
    /// of builds no longer wanted, and manifests. Returns the bytes freed.
    pub fn collect_garbage(&self, current: &SnapshotMeta) -> Result<u64, SnapshotError> {
        let mut freed = 0;
        let snapshots = self.snapshots_dir();
        for entry in std::fs::read_dir(&snapshots).map_err(io("list", &snapshots))? {
            let entry = entry.map_err(io("list", &snapshots))?;
            if entry.file_name().to_string_lossy() != current.id {
                let path = entry.path();
                std::fs::remove_dir_all(&path).map_err(io("remove old snapshot", &path))?;
            }
        }
        let keep_files = current.file_hashes();
        let keep_manifests: HashSet<&str> = current.files.iter().map(|f| f.manifest_id.as_str()).collect();
        for (dir, keep) in [(self.files_dir(), &keep_files), (self.manifests_dir(), &keep_manifests)] {
            for entry in std::fs::read_dir(&dir).map_err(io("list", &dir))? {
                let entry = entry.map_err(io("list", &dir))?;
                let name = entry.file_name().to_string_lossy().into_owned();
                if !keep.contains(name.as_str()) {
                    freed += entry.metadata().map(|m| m.len()).unwrap_or(0);
                    let path = entry.path();
                    std::fs::remove_file(&path).map_err(io("remove", &path))?;
                }
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(image: &str, hash: &str) -> CatalogueFile {
        CatalogueFile {
            image: image.into(),
            arch: "amd64".into(),
            version: "1".into(),
            kind: "kernel".into(),
            manifest_id: "m".repeat(64),
            file_hash: hash.into(),
            file_len: 3,
            n_chunks: 1,
        }
    }

    #[test]
    fn unsafe_catalogue_paths_are_refused() {
        let hash = "a".repeat(64);
        assert!(relative_path(&file("ubuntu/jammy", &hash)).is_ok());
        assert!(relative_path(&file("../../etc", &hash)).is_err());
        assert!(relative_path(&file("ubuntu", "../x")).is_err());
    }

    #[test]
    fn publish_swaps_current_and_garbage_goes() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(&DataDir::new(dir.path())).unwrap();
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        std::fs::write(store.file_path(&a), b"one").unwrap();
        let first = store.publish(1, &[file("img", &a)]).unwrap();
        assert_eq!(store.current().unwrap().unwrap(), first);
        assert_eq!(std::fs::read(store.current_link().join("img/amd64/1/kernel")).unwrap(), b"one");

        std::fs::write(store.file_path(&b), b"two").unwrap();
        let second = store.publish(2, &[file("img", &b)]).unwrap();
        assert_ne!(first.id, second.id);
        assert_eq!(std::fs::read(store.current_link().join("img/amd64/1/kernel")).unwrap(), b"two");
        store.collect_garbage(&second).unwrap();
        assert!(!store.file_path(&a).exists() && store.file_path(&b).exists());
        assert_eq!(std::fs::read_dir(store.snapshots_dir()).unwrap().count(), 1);
    }

    #[test]
    fn partial_files_survive_open_and_go_with_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let store = SnapshotStore::open(&DataDir::new(dir.path())).unwrap();
        let partial = store.partial_path(&"c".repeat(64));
        std::fs::write(&partial, b"half").unwrap();
        SnapshotStore::open(&DataDir::new(dir.path())).unwrap();
        assert!(partial.exists(), "kept for resuming");
        let a = "a".repeat(64);
        std::fs::write(store.file_path(&a), b"one").unwrap();
        let meta = store.publish(1, &[file("img", &a)]).unwrap();
        store.collect_garbage(&meta).unwrap();
        assert!(!partial.exists(), "an obsolete partial goes once a snapshot is published");
    }
}
