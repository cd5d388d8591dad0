//! Delta bases: for each chunk a sync must fetch, the chunks of the previous version of the same
//! file that sit where the new chunk goes, so the region can send the chunk as a small zstd
//! delta against them (`metalrack_image_tools::delta`).
//!
//! "Where it goes" follows the content, not just the offset: walking the new manifest, every
//! chunk both versions share fixes how far the new file is shifted against the old one there,
//! and a missing chunk is placed in the old file by the shift of the last shared chunk before
//! it. In-place edits keep shift 0; an insertion shifts everything after it, and the chunks
//! right after it still find their old neighbours.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use metalrack_api::images::CatalogueFile;
use metalrack_image_tools::delta::{BASES_MAX, BASE_BYTES_MAX};
use metalrack_image_tools::manifest::Manifest;
use metalrack_image_tools::Hash;

/// A chunk of a local file, named by hash for the region and by place for reading it back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BaseRef {
    pub hash: Hash,
    pub file: Arc<PathBuf>,
    pub offset: u64,
    pub len: u32,
}

/// The previous version of a file, complete on local disk, with its manifest.
#[derive(Debug)]
pub struct OldFile<'m> {
    path: Arc<PathBuf>,
    manifest: &'m Manifest,
    offsets: Vec<u64>,
    /// Offset of the first occurrence of each chunk.
    by_hash: HashMap<Hash, u64>,
}

impl OldFile<'_> {
    pub fn new(path: PathBuf, manifest: &Manifest) -> OldFile<'_> {
        let mut offsets = Vec::with_capacity(manifest.chunks.len());
        let mut by_hash = HashMap::with_capacity(manifest.chunks.len());
        for (offset, chunk) in manifest.chunk_offsets() {
            offsets.push(offset);
            by_hash.entry(chunk.hash).or_insert(offset);
        }
        OldFile { path: Arc::new(path), manifest, offsets, by_hash }
    }

    /// The old chunks overlapping `start..end`, at most [`BASES_MAX`] of them and
    /// [`BASE_BYTES_MAX`] bytes in all.
    fn overlapping(&self, start: u64, end: u64) -> Vec<BaseRef> {
        let chunks = &self.manifest.chunks;
        let first = self.offsets.partition_point(|&o| o <= start).saturating_sub(1);
        let mut bases = Vec::new();
        let mut bytes = 0u64;
        for (&offset, &chunk) in self.offsets[first..].iter().zip(&chunks[first..]) {
            if offset >= end || bases.len() == BASES_MAX || bytes + u64::from(chunk.len) > BASE_BYTES_MAX {
                break;
            }
            if offset + u64::from(chunk.len) <= start {
                continue;
            }
            bytes += u64::from(chunk.len);
            bases.push(BaseRef { hash: chunk.hash, file: self.path.clone(), offset, len: chunk.len });
        }
        bases
    }
}

/// Bases for each chunk of `new` listed in `missing` (chunk index, offset; ascending), keyed
/// by chunk index. Chunks that land outside the old file get none.
pub fn bases_for(new: &Manifest, old: &OldFile, missing: &[(usize, u64)]) -> HashMap<usize, Vec<BaseRef>> {
    let mut out = HashMap::with_capacity(missing.len());
    let mut wanted = missing.iter().peekable();
    let mut shift: i64 = 0;
    for (i, (offset, chunk)) in new.chunk_offsets().enumerate() {
        if wanted.peek().is_some_and(|&&(index, _)| index == i) {
            wanted.next();
            let start = offset as i64 + shift;
            let end = start + i64::from(chunk.len);
            if end > 0 && (start.max(0) as u64) < old.manifest.file_len {
                let bases = old.overlapping(start.max(0) as u64, end as u64);
                if !bases.is_empty() {
                    out.insert(i, bases);
                }
            }
        } else if let Some(&old_offset) = old.by_hash.get(&chunk.hash) {
            shift = old_offset as i64 - offset as i64;
        }
    }
    out
}

/// The file the rack has that `target` most likely replaces: same image, arch and kind, another
/// content, the highest version among them.
pub fn predecessor<'a>(target: &CatalogueFile, have: &'a [CatalogueFile]) -> Option<&'a CatalogueFile> {
    have.iter()
        .filter(|f| {
            f.image == target.image && f.arch == target.arch && f.kind == target.kind && f.file_hash != target.file_hash
        })
        .max_by(|a, b| a.version.cmp(&b.version))
}

#[cfg(test)]
mod tests {
    use super::*;
    use metalrack_image_tools::manifest::ChunkRef;

    fn manifest(chunks: &[(u8, u32)]) -> Manifest {
        let chunks: Vec<ChunkRef> = chunks.iter().map(|&(h, len)| ChunkRef { hash: Hash([h; 32]), len }).collect();
        Manifest { file_len: chunks.iter().map(|c| u64::from(c.len)).sum(), file_hash: Hash([0; 32]), chunks }
    }

    fn hashes(bases: &[BaseRef]) -> Vec<u8> {
        bases.iter().map(|b| b.hash.0[0]).collect()
    }

    #[test]
    fn an_edited_chunk_gets_the_old_chunk_at_its_place() {
        let old_manifest = manifest(&[(1, 100), (2, 100), (3, 100)]);
        let old = OldFile::new("old".into(), &old_manifest);
        let new = manifest(&[(1, 100), (9, 100), (3, 100)]);
        let bases = bases_for(&new, &old, &[(1, 100)]);
        assert_eq!(hashes(&bases[&1]), vec![2]);
        assert_eq!(bases[&1][0].offset, 100);
    }

    #[test]
    fn after_an_insertion_the_shift_follows_the_shared_chunks() {
        // 50 bytes inserted inside chunk 2: its replacement (150 bytes) overlaps only old chunk 2
        // once placed by the shift of chunk 1; the chunk after the insertion is shared again.
        let old_manifest = manifest(&[(1, 100), (2, 100), (3, 100), (4, 100)]);
        let old = OldFile::new("old".into(), &old_manifest);
        let new = manifest(&[(5, 40), (1, 100), (9, 150), (3, 100), (4, 100)]);
        let bases = bases_for(&new, &old, &[(0, 0), (2, 140)]);
        // Chunk 0 is before any shared chunk: shift 0, overlaps old chunk 1.
        assert_eq!(hashes(&bases[&0]), vec![1]);
        // Chunk 2 at new offset 140, shift -40 from chunk 1: old range 100..250 = chunks 2 and 3.
        assert_eq!(hashes(&bases[&2]), vec![2, 3]);
    }

    #[test]
    fn bases_are_capped_and_clipped_to_the_old_file() {
        let small: Vec<(u8, u32)> = (1..=10).map(|h| (h, 10)).collect();
        let old_manifest = manifest(&small);
        let old = OldFile::new("old".into(), &old_manifest);
        let new = manifest(&[(20, 100), (21, 100)]);
        let bases = bases_for(&new, &old, &[(0, 0), (1, 100)]);
        assert_eq!(bases[&0].len(), BASES_MAX);
        assert!(!bases.contains_key(&1), "beyond the old file's end");
    }

    #[test]
    fn the_predecessor_is_the_same_image_arch_and_kind() {
        let file = |image: &str, kind: &str, version: &str, hash: &str| CatalogueFile {
            image: image.into(),
            arch: "amd64".into(),
            version: version.into(),
            kind: kind.into(),
            manifest_id: format!("m{hash}"),
            file_hash: hash.into(),
            file_len: 1,
            n_chunks: 1,
        };
        let have = vec![
            file("ubuntu/noble", "kernel", "1", "a"),
            file("ubuntu/noble", "root-disk", "1", "b"),
            file("ubuntu/noble", "root-disk", "2", "c"),
            file("ubuntu/jammy", "root-disk", "9", "d"),
        ];
        let target = file("ubuntu/noble", "root-disk", "3", "e");
        assert_eq!(predecessor(&target, &have).map(|f| f.file_hash.as_str()), Some("c"));
        let same = file("ubuntu/noble", "root-disk", "3", "c");
        assert_eq!(predecessor(&same, &have).map(|f| f.file_hash.as_str()), Some("b"));
        assert!(predecessor(&file("custom/x", "kernel", "1", "z"), &have).is_none());
    }
}
