//! The manifest wire format: one file's length, BLAKE3 hash and ordered list of chunks.
//!
//! ```text
//!  0      4        6      8          16           48            52         56
//!  +------+--------+------+----------+------------+-------------+----------+
//!  | MRMF | version| flags| file_len | file_hash  | chunk_count | reserved |  header, big-endian
//!  +------+--------+------+----------+------------+-------------+----------+
//!  | hash [32] | len u32 |  × chunk_count, in file order
//!  +-----------+---------+
//! ```
//!
//! A manifest is exactly `HEADER_LEN + chunk_count * ENTRY_LEN` bytes: no trailing data, so a
//! manifest has one encoding and its own hash can name it. `flags` and `reserved` must be zero;
//! a later version that needs them bumps `version` or sets a flag this version rejects, rather
//! than being silently misread.

use std::fmt;

use crate::Hash;

/// The first four bytes of every manifest.
pub const MAGIC: [u8; 4] = *b"MRMF";
/// The only format version this build reads and writes.
pub const VERSION: u16 = 1;

mod field {
    pub type Field = std::ops::Range<usize>;

    pub const MAGIC: Field = 0..4;
    pub const VERSION: Field = 4..6;
    pub const FLAGS: Field = 6..8;
    pub const FILE_LEN: Field = 8..16;
    pub const FILE_HASH: Field = 16..48;
    pub const CHUNK_COUNT: Field = 48..52;
    pub const RESERVED: Field = 52..56;

    /// Within one entry, relative to the entry's start.
    pub const ENTRY_HASH: Field = 0..32;
    pub const ENTRY_LEN: Field = 32..36;
}

/// Bytes before the first entry.
pub const HEADER_LEN: usize = field::RESERVED.end;
/// Bytes per chunk entry.
pub const ENTRY_LEN: usize = field::ENTRY_LEN.end;

/// The most chunks one manifest may list: 4 Mi chunks cover ~256 GiB at the default 64 KiB
/// average chunk and cost 144 MiB of manifest (and about as much memory to parse it), which
/// bounds what a peer can make us allocate with one header.
pub const CHUNKS_MAX: u32 = 4 * 1024 * 1024;
/// The longest chunk: fastcdc's own ceiling for `max_size` (16 MiB). It is also the most a
/// receiver buffers for one chunk frame.
pub const CHUNK_LEN_MAX: u32 = 16 * 1024 * 1024;

/// A read-only (or, with `AsMut`, writable) view of a manifest's bytes.
///
/// Accessors on a view from [`Packet::new_unchecked`] may panic on short buffers; use
/// [`Packet::new_checked`] for anything that came from outside.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buffer` without checking anything.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps `buffer` after checking the header (magic, version, flags, reserved) and that the
    /// length matches the chunk count, so every accessor is safe to call.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, ManifestError> {
        let packet = Packet::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    /// Checks the header and the total length. Errors come in the order an operator can act
    /// on them: "not a manifest" before "a newer version" before "cut short".
    pub fn check_len(&self) -> Result<(), ManifestError> {
        let len = self.buffer.as_ref().len();
        if len < HEADER_LEN {
            // A short buffer that does not even start like a manifest is not one; say so
            // rather than "truncated".
            let prefix = &self.buffer.as_ref()[..len.min(MAGIC.len())];
            if prefix != &MAGIC[..prefix.len()] {
                let mut found = [0u8; 4];
                found[..prefix.len()].copy_from_slice(prefix);
                return Err(ManifestError::BadMagic { found });
            }
            return Err(ManifestError::Truncated { len, needed: HEADER_LEN });
        }
        if self.magic() != MAGIC {
            return Err(ManifestError::BadMagic { found: self.magic() });
        }
        if self.version() != VERSION {
            return Err(ManifestError::UnsupportedVersion { version: self.version() });
        }
        if self.flags() != 0 {
            return Err(ManifestError::UnknownFlags { flags: self.flags() });
        }
        if self.reserved() != 0 {
            return Err(ManifestError::ReservedNotZero);
        }
        let count = self.chunk_count();
        // Cannot overflow on 64-bit targets (u32 × 36 fits easily); checked for 32-bit ones,
        // where a hostile count would otherwise wrap to a small, "matching" length.
        let expected = (count as usize)
            .checked_mul(ENTRY_LEN)
            .and_then(|entries| entries.checked_add(HEADER_LEN))
            .ok_or(ManifestError::TooManyChunks { count })?;
        if len < expected {
            return Err(ManifestError::Truncated { len, needed: expected });
        }
        if len > expected {
            return Err(ManifestError::LengthMismatch { len, expected });
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn magic(&self) -> [u8; 4] {
        read_array(&self.buffer.as_ref()[field::MAGIC])
    }

    pub fn version(&self) -> u16 {
        u16::from_be_bytes(read_array(&self.buffer.as_ref()[field::VERSION]))
    }

    pub fn flags(&self) -> u16 {
        u16::from_be_bytes(read_array(&self.buffer.as_ref()[field::FLAGS]))
    }

    pub fn file_len(&self) -> u64 {
        u64::from_be_bytes(read_array(&self.buffer.as_ref()[field::FILE_LEN]))
    }

    pub fn file_hash(&self) -> Hash {
        Hash(read_array(&self.buffer.as_ref()[field::FILE_HASH]))
    }

    pub fn chunk_count(&self) -> u32 {
        u32::from_be_bytes(read_array(&self.buffer.as_ref()[field::CHUNK_COUNT]))
    }

    pub fn reserved(&self) -> u32 {
        u32::from_be_bytes(read_array(&self.buffer.as_ref()[field::RESERVED]))
    }

    /// The hash and length of chunk `index`. Panics if `index >= chunk_count()` on a checked
    /// view (or past the buffer on an unchecked one).
    pub fn entry(&self, index: u32) -> (Hash, u32) {
        let entry = &self.buffer.as_ref()[entry_range(index)];
        let hash = Hash(read_array(&entry[field::ENTRY_HASH]));
        let len = u32::from_be_bytes(read_array(&entry[field::ENTRY_LEN]));
        (hash, len)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_magic(&mut self, value: [u8; 4]) {
        self.buffer.as_mut()[field::MAGIC].copy_from_slice(&value);
    }

    pub fn set_version(&mut self, value: u16) {
        self.buffer.as_mut()[field::VERSION].copy_from_slice(&value.to_be_bytes());
    }

    pub fn set_flags(&mut self, value: u16) {
        self.buffer.as_mut()[field::FLAGS].copy_from_slice(&value.to_be_bytes());
    }

    pub fn set_file_len(&mut self, value: u64) {
        self.buffer.as_mut()[field::FILE_LEN].copy_from_slice(&value.to_be_bytes());
    }

    pub fn set_file_hash(&mut self, value: &Hash) {
        self.buffer.as_mut()[field::FILE_HASH].copy_from_slice(value.as_bytes());
    }

    pub fn set_chunk_count(&mut self, value: u32) {
        self.buffer.as_mut()[field::CHUNK_COUNT].copy_from_slice(&value.to_be_bytes());
    }

    pub fn set_reserved(&mut self, value: u32) {
        self.buffer.as_mut()[field::RESERVED].copy_from_slice(&value.to_be_bytes());
    }

    pub fn set_entry(&mut self, index: u32, hash: &Hash, len: u32) {
        let entry = &mut self.buffer.as_mut()[entry_range(index)];
        entry[field::ENTRY_HASH].copy_from_slice(hash.as_bytes());
        entry[field::ENTRY_LEN].copy_from_slice(&len.to_be_bytes());
    }
}

fn entry_range(index: u32) -> std::ops::Range<usize> {
    let start = HEADER_LEN + index as usize * ENTRY_LEN;
    start..start + ENTRY_LEN
}

/// Copies a slice whose length the caller took from a `field` range into an array.
fn read_array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    let mut array = [0u8; N];
    array.copy_from_slice(bytes);
    array
}

/// One chunk of a file, as a manifest lists it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub hash: Hash,
    pub len: u32,
}

/// A file's chunk list: what a manifest says, checked for consistency.
///
/// Invariants (checked by [`Manifest::parse`], asserted by [`Manifest::emit`]): at most
/// [`CHUNKS_MAX`] chunks, every length in `1..=CHUNK_LEN_MAX`, lengths add up to `file_len`.
/// An empty file has no chunks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Manifest {
    pub file_len: u64,
    pub file_hash: Hash,
    pub chunks: Vec<ChunkRef>,
}

impl Manifest {
    /// Parses and checks a manifest. Never panics, whatever the bytes.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        let packet = Packet::new_checked(bytes)?;
        let count = packet.chunk_count();
        if count > CHUNKS_MAX {
            return Err(ManifestError::TooManyChunks { count });
        }
        // `new_checked` proved the buffer holds `count` entries, so this allocation is at most
        // about the size of the input.
        let mut chunks = Vec::with_capacity(count as usize);
        // At most CHUNKS_MAX × CHUNK_LEN_MAX = 2^46: no overflow.
        let mut sum: u64 = 0;
        for index in 0..count {
            let (hash, len) = packet.entry(index);
            if !(1..=CHUNK_LEN_MAX).contains(&len) {
                return Err(ManifestError::ChunkLength { index, len });
            }
            sum += u64::from(len);
            chunks.push(ChunkRef { hash, len });
        }
        let file_len = packet.file_len();
        if sum != file_len {
            return Err(ManifestError::FileLengthMismatch { file_len, sum });
        }
        Ok(Manifest { file_len, file_hash: packet.file_hash(), chunks })
    }

    /// Writes the manifest into `buf`, which must be exactly [`Manifest::buffer_len`] bytes.
    ///
    /// Panics if the manifest breaks its invariants: writing a manifest every reader rejects
    /// would only move the bug somewhere harder to find.
    pub fn emit(&self, buf: &mut [u8]) {
        assert_eq!(buf.len(), self.buffer_len(), "manifest buffer length");
        self.assert_valid();
        let mut packet = Packet::new_unchecked(buf);
        packet.set_magic(MAGIC);
        packet.set_version(VERSION);
        packet.set_flags(0);
        packet.set_file_len(self.file_len);
        packet.set_file_hash(&self.file_hash);
        packet.set_chunk_count(self.chunks.len() as u32);
        packet.set_reserved(0);
        for (index, chunk) in self.chunks.iter().enumerate() {
            packet.set_entry(index as u32, &chunk.hash, chunk.len);
        }
    }

    /// The encoded length in bytes.
    pub fn buffer_len(&self) -> usize {
        HEADER_LEN + self.chunks.len() * ENTRY_LEN
    }

    /// The encoded manifest.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.buffer_len()];
        self.emit(&mut bytes);
        bytes
    }

    /// Each chunk with its byte offset in the file, in file order.
    pub fn chunk_offsets(&self) -> impl Iterator<Item = (u64, &ChunkRef)> + '_ {
        self.chunks.iter().scan(0u64, |offset, chunk| {
            let start = *offset;
            *offset += u64::from(chunk.len);
            Some((start, chunk))
        })
    }

    fn assert_valid(&self) {
        assert!(self.chunks.len() <= CHUNKS_MAX as usize, "manifest has {} chunks, over CHUNKS_MAX", self.chunks.len());
        let mut sum: u64 = 0;
        for (index, chunk) in self.chunks.iter().enumerate() {
            assert!((1..=CHUNK_LEN_MAX).contains(&chunk.len), "chunk {index} has length {}", chunk.len);
            sum += u64::from(chunk.len);
        }
        assert_eq!(sum, self.file_len, "manifest chunk lengths do not add up to file_len");
    }
}

/// Why bytes are not a valid manifest, one variant per check.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("manifest is truncated: {len} bytes, {needed} needed")]
    Truncated { len: usize, needed: usize },
    #[error("not a Metalrack manifest: it starts with \"{}\" instead of \"MRMF\"", EscapedBytes(found))]
    BadMagic { found: [u8; 4] },
    #[error("manifest format version {version} is not supported (this imgtool reads version {VERSION})")]
    UnsupportedVersion { version: u16 },
    #[error("manifest has unknown flags {flags:#06x}; it was probably written by a newer imgtool")]
    UnknownFlags { flags: u16 },
    #[error("manifest header's reserved field is not zero; it was written by a newer imgtool or is damaged")]
    ReservedNotZero,
    #[error("manifest is {len} bytes but its chunk count makes it {expected}: there is trailing data")]
    LengthMismatch { len: usize, expected: usize },
    #[error("manifest lists {count} chunks, over the limit of {CHUNKS_MAX}")]
    TooManyChunks { count: u32 },
    #[error("manifest chunk {index} has length {len}, outside 1..={CHUNK_LEN_MAX}")]
    ChunkLength { index: u32, len: u32 },
    #[error("manifest says the file is {file_len} bytes but its chunks add up to {sum}")]
    FileLengthMismatch { file_len: u64, sum: u64 },
}

/// Shows bytes as text with non-printable ones escaped, for error messages.
struct EscapedBytes<'a>(&'a [u8]);

impl fmt::Display for EscapedBytes<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0.escape_ascii())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A two-chunk manifest for a 7-byte file: chunks of 3 and 4 bytes.
    #[rustfmt::skip]
    static MANIFEST_BYTES: [u8; HEADER_LEN + 2 * ENTRY_LEN] = [
        // magic "MRMF", version 1, flags 0
        0x4d, 0x52, 0x4d, 0x46, 0x00, 0x01, 0x00, 0x00,
        // file_len 7
        0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x07,
        // file_hash: 0xff × 32
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        // chunk_count 2, reserved 0
        0x00, 0x00, 0x00, 0x02, 0x00, 0x00, 0x00, 0x00,
        // entry 0: hash 0x11 × 32, len 3
        0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
        0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
        0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
        0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
        0x00, 0x00, 0x00, 0x03,
        // entry 1: hash 0x22 × 32, len 4
        0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
        0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
        0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
        0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
        0x00, 0x00, 0x00, 0x04,
    ];

    fn manifest_repr() -> Manifest {
        Manifest {
            file_len: 7,
            file_hash: Hash([0xff; 32]),
            chunks: vec![ChunkRef { hash: Hash([0x11; 32]), len: 3 }, ChunkRef { hash: Hash([0x22; 32]), len: 4 }],
        }
    }

    /// The fixture with `edit` applied, for one-field corruptions.
    fn fixture_with(edit: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut bytes = MANIFEST_BYTES.to_vec();
        edit(&mut bytes);
        bytes
    }

    #[test]
    fn test_layout_constants() {
        assert_eq!(HEADER_LEN, 56);
        assert_eq!(ENTRY_LEN, 36);
        assert_eq!(CHUNKS_MAX as usize * ENTRY_LEN, 144 * 1024 * 1024);
    }

    #[test]
    fn test_deconstruct() {
        let packet = Packet::new_checked(&MANIFEST_BYTES[..]).unwrap();
        assert_eq!(packet.magic(), MAGIC);
        assert_eq!(packet.version(), 1);
        assert_eq!(packet.flags(), 0);
        assert_eq!(packet.file_len(), 7);
        assert_eq!(packet.file_hash(), Hash([0xff; 32]));
        assert_eq!(packet.chunk_count(), 2);
        assert_eq!(packet.reserved(), 0);
        assert_eq!(packet.entry(0), (Hash([0x11; 32]), 3));
        assert_eq!(packet.entry(1), (Hash([0x22; 32]), 4));
        assert_eq!(packet.into_inner(), &MANIFEST_BYTES[..]);
    }

    #[test]
    fn test_parse() {
        assert_eq!(Manifest::parse(&MANIFEST_BYTES), Ok(manifest_repr()));
    }

    #[test]
    fn test_emit() {
        let manifest = manifest_repr();
        assert_eq!(manifest.buffer_len(), MANIFEST_BYTES.len());
        let mut bytes = vec![0xa5; manifest.buffer_len()];
        manifest.emit(&mut bytes);
        assert_eq!(bytes, MANIFEST_BYTES);
        assert_eq!(manifest.to_bytes(), MANIFEST_BYTES);
    }

    #[test]
    fn test_empty_file() {
        let manifest = Manifest { file_len: 0, file_hash: Hash::of(b""), chunks: vec![] };
        let bytes = manifest.to_bytes();
        assert_eq!(bytes.len(), HEADER_LEN);
        assert_eq!(Manifest::parse(&bytes), Ok(manifest));
    }

    #[test]
    fn test_truncated() {
        for len in 0..MANIFEST_BYTES.len() {
            let needed = if len < HEADER_LEN { HEADER_LEN } else { MANIFEST_BYTES.len() };
            assert_eq!(
                Manifest::parse(&MANIFEST_BYTES[..len]),
                Err(ManifestError::Truncated { len, needed }),
                "prefix of {len} bytes"
            );
        }
    }

    #[test]
    fn test_trailing_data() {
        let bytes = fixture_with(|b| b.push(0));
        let expected = MANIFEST_BYTES.len();
        assert_eq!(Manifest::parse(&bytes), Err(ManifestError::LengthMismatch { len: expected + 1, expected }));
    }

    #[test]
    fn test_bad_magic() {
        let bytes = fixture_with(|b| b[0..4].copy_from_slice(b"GIF8"));
        assert_eq!(Manifest::parse(&bytes), Err(ManifestError::BadMagic { found: *b"GIF8" }));
        // Short garbage is "not a manifest", not "truncated".
        assert_eq!(Manifest::parse(b"{\""), Err(ManifestError::BadMagic { found: *b"{\"\0\0" }));
        let message = ManifestError::BadMagic { found: *b"\x7fELF" }.to_string();
        assert_eq!(message, "not a Metalrack manifest: it starts with \"\\x7fELF\" instead of \"MRMF\"");
    }

    #[test]
    fn test_unsupported_version() {
        let bytes = fixture_with(|b| b[4..6].copy_from_slice(&2u16.to_be_bytes()));
        assert_eq!(Manifest::parse(&bytes), Err(ManifestError::UnsupportedVersion { version: 2 }));
    }

    #[test]
    fn test_unknown_flags() {
        let bytes = fixture_with(|b| b[7] = 0x80);
        assert_eq!(Manifest::parse(&bytes), Err(ManifestError::UnknownFlags { flags: 0x80 }));
    }

    #[test]
    fn test_reserved_not_zero() {
        let bytes = fixture_with(|b| b[55] = 1);
        assert_eq!(Manifest::parse(&bytes), Err(ManifestError::ReservedNotZero));
    }

    #[test]
    fn test_huge_count_is_truncated_not_a_panic() {
        let bytes = fixture_with(|b| b[48..52].copy_from_slice(&u32::MAX.to_be_bytes()));
        let needed = HEADER_LEN + u32::MAX as usize * ENTRY_LEN;
        assert_eq!(Manifest::parse(&bytes), Err(ManifestError::Truncated { len: bytes.len(), needed }));
    }

    #[test]
    fn test_too_many_chunks() {
        // A consistent manifest one chunk over the limit: 144 MiB, built once.
        let count = CHUNKS_MAX + 1;
        let mut bytes = vec![0u8; HEADER_LEN + count as usize * ENTRY_LEN];
        bytes[..HEADER_LEN].copy_from_slice(&MANIFEST_BYTES[..HEADER_LEN]);
        bytes[48..52].copy_from_slice(&count.to_be_bytes());
        assert_eq!(Manifest::parse(&bytes), Err(ManifestError::TooManyChunks { count }));
    }

    #[test]
    fn test_chunk_length_out_of_range() {
        let zero = fixture_with(|b| b[HEADER_LEN + ENTRY_LEN + 32..].copy_from_slice(&0u32.to_be_bytes()));
        assert_eq!(Manifest::parse(&zero), Err(ManifestError::ChunkLength { index: 1, len: 0 }));
        let huge = CHUNK_LEN_MAX + 1;
        let over = fixture_with(|b| b[HEADER_LEN + 32..HEADER_LEN + 36].copy_from_slice(&huge.to_be_bytes()));
        assert_eq!(Manifest::parse(&over), Err(ManifestError::ChunkLength { index: 0, len: huge }));
    }

    #[test]
    fn test_file_length_mismatch() {
        let bytes = fixture_with(|b| b[15] = 8);
        assert_eq!(Manifest::parse(&bytes), Err(ManifestError::FileLengthMismatch { file_len: 8, sum: 7 }));
        // An empty chunk list must describe an empty file.
        let mut empty = MANIFEST_BYTES[..HEADER_LEN].to_vec();
        empty[48..52].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(Manifest::parse(&empty), Err(ManifestError::FileLengthMismatch { file_len: 7, sum: 0 }));
    }

    #[test]
    fn test_chunk_offsets() {
        let manifest = manifest_repr();
        let offsets: Vec<(u64, u32)> = manifest.chunk_offsets().map(|(offset, chunk)| (offset, chunk.len)).collect();
        assert_eq!(offsets, vec![(0, 3), (3, 4)]);
    }

    #[test]
    #[should_panic(expected = "do not add up")]
    fn test_emit_asserts_invariants() {
        let mut manifest = manifest_repr();
        manifest.file_len += 1;
        manifest.to_bytes();
    }

    fn arbitrary_manifest() -> impl Strategy<Value = Manifest> {
        let chunk = (any::<[u8; 32]>(), 1..=CHUNK_LEN_MAX).prop_map(|(hash, len)| ChunkRef { hash: Hash(hash), len });
        (any::<[u8; 32]>(), proptest::collection::vec(chunk, 0..64)).prop_map(|(file_hash, chunks)| Manifest {
            file_len: chunks.iter().map(|c| u64::from(c.len)).sum(),
            file_hash: Hash(file_hash),
            chunks,
        })
    }

    /// Checks the parser's contract on any input: no panic, and whatever it accepts it
    /// re-emits byte for byte (a manifest has one encoding).
    fn check_parse(bytes: &[u8]) -> Result<(), TestCaseError> {
        if let Ok(manifest) = Manifest::parse(bytes) {
            prop_assert_eq!(manifest.to_bytes(), bytes);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn prop_parse_emit_round_trip(manifest in arbitrary_manifest()) {
            prop_assert_eq!(Manifest::parse(&manifest.to_bytes()), Ok(manifest));
        }

        #[test]
        fn prop_parse_arbitrary_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
            check_parse(&bytes)?;
        }

        /// Random bytes almost never get past the magic; these start as a valid header and
        /// exercise the later checks.
        #[test]
        fn prop_parse_arbitrary_after_header(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
            let mut bytes = MANIFEST_BYTES[..8].to_vec();
            bytes.extend_from_slice(&tail);
            check_parse(&bytes)?;
        }

        #[test]
        fn prop_parse_mutated(
            manifest in arbitrary_manifest(),
            flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
            cut in any::<prop::sample::Index>(),
            truncate in any::<bool>(),
        ) {
            let mut bytes = manifest.to_bytes();
            for (at, value) in flips {
                let at = at.index(bytes.len());
                bytes[at] = value;
            }
            if truncate {
                bytes.truncate(cut.index(bytes.len()));
            }
            check_parse(&bytes)?;
        }
    }
}
