//! Compares two manifests: which chunks of a new file version the old one already has, and how
//! many bytes an upload of the new version would move.
//!
//! Counts are over distinct hashes, since a store holds (and a transfer moves) each chunk once:
//! a chunk repeated in the new file (zeros, say) is shared or moved once. So
//! `bytes_reused + bytes_to_move` is the new file's distinct content, which is at most
//! `bytes_new_file`; the gap is duplication within the new file.

use std::collections::HashSet;

use crate::manifest::Manifest;
use crate::Hash;

/// What moving from `old` to `new` costs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestDiff {
    /// Chunk entries in the old manifest (duplicates included).
    pub chunks_old: usize,
    /// Chunk entries in the new manifest (duplicates included).
    pub chunks_new: usize,
    /// Distinct hashes of `new` also in `old`.
    pub chunks_shared: usize,
    /// Distinct hashes of `new` not in `old`.
    pub chunks_to_move: usize,
    /// The new file's length.
    pub bytes_new_file: u64,
    /// Bytes of the distinct chunks counted in `chunks_shared`.
    pub bytes_reused: u64,
    /// Bytes of the distinct chunks counted in `chunks_to_move`.
    pub bytes_to_move: u64,
}

/// Compares `old` with `new`.
pub fn diff(old: &Manifest, new: &Manifest) -> ManifestDiff {
    let old_hashes: HashSet<Hash> = old.chunks.iter().map(|chunk| chunk.hash).collect();
    let mut seen: HashSet<Hash> = HashSet::with_capacity(new.chunks.len());
    let mut result = ManifestDiff {
        chunks_old: old.chunks.len(),
        chunks_new: new.chunks.len(),
        chunks_shared: 0,
        chunks_to_move: 0,
        bytes_new_file: new.file_len,
        bytes_reused: 0,
        bytes_to_move: 0,
    };
    for chunk in &new.chunks {
        if !seen.insert(chunk.hash) {
            continue;
        }
        if old_hashes.contains(&chunk.hash) {
            result.chunks_shared += 1;
            result.bytes_reused += u64::from(chunk.len);
        } else {
            result.chunks_to_move += 1;
            result.bytes_to_move += u64::from(chunk.len);
        }
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::ChunkRef;

    fn manifest(chunks: &[(u8, u32)]) -> Manifest {
        let chunks: Vec<ChunkRef> = chunks.iter().map(|&(id, len)| ChunkRef { hash: Hash([id; 32]), len }).collect();
        Manifest { file_len: chunks.iter().map(|c| u64::from(c.len)).sum(), file_hash: Hash([0; 32]), chunks }
    }

    #[test]
    fn test_diff() {
        let old = manifest(&[(1, 10), (2, 20), (3, 30)]);
        // Chunk 2 kept, 3 dropped, 4 new and repeated, 1 repeated.
        let new = manifest(&[(1, 10), (4, 40), (2, 20), (4, 40), (1, 10)]);
        assert_eq!(
            diff(&old, &new),
            ManifestDiff {
                chunks_old: 3,
                chunks_new: 5,
                chunks_shared: 2,
                chunks_to_move: 1,
                bytes_new_file: 120,
                bytes_reused: 30,
                bytes_to_move: 40,
            }
        );
    }

    #[test]
    fn test_identical() {
        let old = manifest(&[(1, 10), (2, 20)]);
        let result = diff(&old, &old);
        assert_eq!((result.chunks_shared, result.chunks_to_move, result.bytes_to_move), (2, 0, 0));
        assert_eq!(result.bytes_reused, 30);
    }

    #[test]
    fn test_from_nothing() {
        let empty = manifest(&[]);
        let new = manifest(&[(1, 10), (2, 20)]);
        let result = diff(&empty, &new);
        assert_eq!((result.chunks_old, result.chunks_shared, result.chunks_to_move), (0, 0, 2));
        assert_eq!((result.bytes_reused, result.bytes_to_move, result.bytes_new_file), (0, 30, 30));
        assert_eq!(diff(&new, &empty).chunks_new, 0);
    }
}
