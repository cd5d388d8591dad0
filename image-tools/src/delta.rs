//! Chunk deltas: fetching a new chunk as a zstd delta against chunks the receiver already has.
//!
//! Content-defined chunking moves every chunk that changed at all, however little. When a rack
//! holds an older version of the same file, the chunk that replaced a local one is usually
//! almost the same bytes, so the rack names, for each chunk it wants, up to [`BASES_MAX`] chunks
//! it has at the same place in the old file (its *bases*), and the region answers with the new
//! chunk compressed by zstd with the bases as its reference prefix (`ZSTD_CCtx_refPrefix`): in
//! effect a binary diff. The receiver rebuilds the chunk from the same bases and checks its BLAKE3
//! hash as for any chunk, so a wrong base or a damaged delta is caught like a damaged chunk.
//!
//! Request body: a sequence of wants, no count (the body ends after the last one):
//!
//! ```text
//!  0        32           33
//!  +--------+------------+---------------------------+
//!  | hash   | base_count | base hashes [32 × count]  |  × as many wants as the body holds
//!  +--------+------------+---------------------------+
//! ```
//!
//! Answer: one chunk frame ([`crate::frame`]) per want, in order, whose data is a payload: one
//! tag byte, then either the chunk itself ([`PayloadTag::Raw`]) or a zstd frame to be decoded
//! against the concatenation of *all* the want's bases in request order ([`PayloadTag::Delta`]).
//! The sender falls back to raw whenever a delta would not be smaller or it lacks a base.
//!
//! A chunk that compresses on its own (most of a real image: code, text, zeros) also travels as
//! [`PayloadTag::Delta`]: a plain zstd frame ([`compress_chunk`]) never refers to bytes before
//! its start, so it decodes the same against any prefix, the empty one included. Racks that
//! predate plain compression decode it unchanged, so the format needs no new tag and no
//! negotiation. The sender decides once per chunk, when the chunk is stored, whether it is worth
//! compressing ([`COMPRESSED_WORTH`]), and keeps the compressed copy beside the chunk.

use crate::Hash;

/// Bases a want may name. Four cover a chunk and its neighbours when boundaries moved.
pub const BASES_MAX: usize = 4;

/// The most base bytes a sender reads and indexes for one want (a rack asking for more gets
/// the chunk raw): bounds the sender's memory per request in flight.
pub const BASE_BYTES_MAX: u64 = 4 * 1024 * 1024;

/// Largest zstd window: enough for [`BASE_BYTES_MAX`] of bases plus the largest chunk
/// (`manifest::CHUNK_LEN_MAX`, 16 MiB), and what every zstd decoder accepts by default (2^27).
const WINDOW_LOG_MAX: u32 = 27;
const WINDOW_LOG_MIN: u32 = 10;
/// Largest match table (2^24 entries, 64 MiB): bounds the sender's memory per delta.
const HASH_LOG_MAX: u32 = 24;

/// zstd level for deltas: level 1 already finds every long match against the bases (which is
/// all a delta needs); higher levels cost the region CPU for a few bytes.
pub const DELTA_LEVEL: i32 = 1;

/// zstd level that decides whether a chunk is worth compressing: fast on incompressible input
/// (~2.5 GB/s on one core of the bench machine: zstd stores such blocks raw after a quick look),
/// so random data costs little more than reading it.
pub const TRY_LEVEL: i32 = 3;

/// zstd level of the compressed copy kept for a chunk that passed [`TRY_LEVEL`]'s test. A
/// chunk is compressed alone (no context from its neighbours), which costs ~13% against `zstd -3`
/// of a whole Debian image at level 3; level 6 wins most of it back (~8%; level 9 ~7% at two
/// thirds the speed) at ~100 MB/s, paid once per new chunk when it is stored, never per serve.
pub const COMPRESS_LEVEL: i32 = 6;

/// A compressed copy is kept only when at most this fraction (numerator, denominator) of the
/// chunk: below 1/8 saved the copy's disk space and the rack's decompression buy too little.
pub const COMPRESSED_WORTH: (usize, usize) = (7, 8);

mod field {
    pub const HASH: std::ops::Range<usize> = 0..32;
    pub const BASE_COUNT: usize = 32;
    pub const BASES: usize = 33;
}

/// Bytes of a want before its base hashes.
pub const WANT_HEADER_LEN: usize = field::BASES;

/// One chunk asked for, with the chunks the asker has that resemble it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Want {
    pub hash: Hash,
    pub bases: Vec<Hash>,
}

impl Want {
    /// Bytes this want takes in a request body.
    pub fn buffer_len(&self) -> usize {
        WANT_HEADER_LEN + 32 * self.bases.len()
    }

    /// Appends this want to a request body. Panics if it names more than [`BASES_MAX`] bases.
    pub fn emit(&self, out: &mut Vec<u8>) {
        assert!(self.bases.len() <= BASES_MAX, "a want names at most {BASES_MAX} bases");
        out.extend_from_slice(self.hash.as_bytes());
        out.push(self.bases.len() as u8);
        for base in &self.bases {
            out.extend_from_slice(base.as_bytes());
        }
    }

    /// Parses a whole request body, refusing more than `wants_max` wants.
    pub fn parse_all(mut bytes: &[u8], wants_max: usize) -> Result<Vec<Want>, DeltaError> {
        let mut wants = Vec::new();
        while !bytes.is_empty() {
            if wants.len() == wants_max {
                return Err(DeltaError::TooManyWants { max: wants_max });
            }
            if bytes.len() < WANT_HEADER_LEN {
                return Err(DeltaError::Truncated { want: wants.len() });
            }
            let count = usize::from(bytes[field::BASE_COUNT]);
            if count > BASES_MAX {
                return Err(DeltaError::TooManyBases { want: wants.len(), count });
            }
            let len = WANT_HEADER_LEN + 32 * count;
            if bytes.len() < len {
                return Err(DeltaError::Truncated { want: wants.len() });
            }
            let hash = Hash(bytes[field::HASH].try_into().expect("32 bytes"));
            let bases =
                bytes[field::BASES..len].chunks_exact(32).map(|b| Hash(b.try_into().expect("32 bytes"))).collect();
            wants.push(Want { hash, bases });
            bytes = &bytes[len..];
        }
        Ok(wants)
    }
}

/// What follows a payload's tag byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PayloadTag {
    /// The chunk's bytes.
    Raw = 0,
    /// A zstd frame to decode with the want's bases, concatenated, as reference prefix.
    Delta = 1,
}

/// Why a request or a payload is invalid.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum DeltaError {
    #[error("want {want} is cut short")]
    Truncated { want: usize },
    #[error("want {want} names {count} bases, more than {BASES_MAX}")]
    TooManyBases { want: usize, count: usize },
    #[error("more than {max} chunks asked for in one request")]
    TooManyWants { max: usize },
    #[error("empty chunk payload")]
    EmptyPayload,
    #[error("unknown chunk payload tag {tag}")]
    UnknownTag { tag: u8 },
    #[error("zstd could not {step}: {reason}")]
    Zstd { step: &'static str, reason: &'static str },
    #[error("the delta does not say how long the chunk is")]
    NoContentSize,
    #[error("the delta decodes to {got} bytes, the chunk has {expected}")]
    WrongLength { got: u64, expected: usize },
}

fn zstd_error(step: &'static str) -> impl FnOnce(zstd::zstd_safe::ErrorCode) -> DeltaError {
    move |code| DeltaError::Zstd { step, reason: zstd::zstd_safe::get_error_name(code) }
}

/// A window that holds the prefix and the chunk, so every match against the bases is in reach.
fn window_log(prefix_len: usize, data_len: usize) -> u32 {
    let total = (prefix_len + data_len).max(1) as u64;
    (64 - (total - 1).leading_zeros()).clamp(WINDOW_LOG_MIN, WINDOW_LOG_MAX)
}

/// `data` as a zstd delta against `prefix` (the bases concatenated), or None when that would
/// not be smaller than `data` itself (or there is no prefix).
pub fn encode_delta(data: &[u8], prefix: &[u8]) -> Result<Option<Vec<u8>>, DeltaError> {
    if prefix.is_empty() {
        return Ok(None);
    }
    let mut cctx = zstd::zstd_safe::CCtx::create();
    let step = zstd_error("set up the compressor");
    cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(DELTA_LEVEL)).map_err(step)?;
    let window = window_log(prefix.len(), data.len());
    cctx.set_parameter(zstd::zstd_safe::CParameter::WindowLog(window)).map_err(zstd_error("set the window"))?;
    // Level 1's hash table keeps 2^14 positions: most of a 200 KiB prefix would be forgotten
    // before the chunk is compressed, and its matches missed. One slot per prefix position
    // (as `zstd --patch-from` sizes it) finds them all.
    cctx.set_parameter(zstd::zstd_safe::CParameter::HashLog(window.min(HASH_LOG_MAX)))
        .map_err(zstd_error("size the match table"))?;
    // Checksums are the chunk hash's job; the frame content size lets the receiver check the
    // length before it allocates.
    cctx.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false)).map_err(zstd_error("set flags"))?;
    cctx.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(true)).map_err(zstd_error("set flags"))?;
    cctx.ref_prefix(prefix).map_err(zstd_error("reference the bases"))?;
    // Only worth it when smaller than raw, so zstd gets exactly that much room and fails
    // (incompressible against these bases) when it needs more.
    let mut delta = Vec::with_capacity(data.len().saturating_sub(1));
    Ok(cctx.compress2(&mut delta, data).is_ok().then_some(delta))
}

/// `data` compressed as one plain zstd frame (no prefix, content size in the header, no
/// checksum: the chunk hash checks it) at [`COMPRESS_LEVEL`], or None when [`TRY_LEVEL`] does
/// not bring it to at most [`COMPRESSED_WORTH`] of `data`. Sent as a [`PayloadTag::Delta`] payload, it decodes against any bases.
pub fn compress_chunk(data: &[u8]) -> Result<Option<Vec<u8>>, DeltaError> {
    let worth = compressed_len_max(data.len());
    if worth == 0 || looks_incompressible(data)? {
        return Ok(None);
    }
    let Some(tried) = compress_at(data, TRY_LEVEL, worth)? else { return Ok(None) };
    match compress_at(data, COMPRESS_LEVEL, tried.len())? {
        Some(better) if better.len() < tried.len() => Ok(Some(better)),
        _ => Ok(Some(tried)),
    }
}

/// The largest compressed copy worth keeping for a chunk of `chunk_len` bytes
/// ([`COMPRESSED_WORTH`] of it, rounded down; 0 for an empty chunk).
pub fn compressed_len_max(chunk_len: usize) -> usize {
    let (numerator, denominator) = COMPRESSED_WORTH;
    chunk_len / denominator * numerator + chunk_len % denominator * numerator / denominator
}

/// Bytes of each sample [`looks_incompressible`] takes, and how many: 4 × 2 KiB of a 64 KiB
/// chunk is 1/8 of it, so random data costs an eighth of a zstd try (zstd level 1 on the
/// samples, ~0.1 ms per MiB of chunk); chunks shorter than all samples together are tried whole.
const SAMPLE_LEN: usize = 2 * 1024;
const SAMPLES: usize = 4;

/// Whether evenly spread samples of `data` do not compress at all (zstd level 1 cannot take
/// 1/32 off them): random or already-compressed bytes, which a whole-chunk try would only
/// confirm. Deliberately strict: a chunk whose samples compress even a little is tried whole.
pub fn looks_incompressible(data: &[u8]) -> Result<bool, DeltaError> {
    if data.len() < 2 * SAMPLES * SAMPLE_LEN {
        return Ok(false);
    }
    let stride = (data.len() - SAMPLE_LEN) / (SAMPLES - 1);
    let mut samples = Vec::with_capacity(SAMPLES * SAMPLE_LEN);
    for index in 0..SAMPLES {
        samples.extend_from_slice(&data[index * stride..index * stride + SAMPLE_LEN]);
    }
    let room = samples.len() - samples.len() / 32;
    Ok(compress_at(&samples, 1, room)?.is_none())
}

/// `data` as one plain zstd frame at `level`, or None when that takes more than `room` bytes.
fn compress_at(data: &[u8], level: i32, room: usize) -> Result<Option<Vec<u8>>, DeltaError> {
    thread_local! {
        /// One compressor per thread, reused: creating one allocates and clears its tables
        /// (about as long as compressing a whole 64 KiB chunk of random data), and a pusher
        /// compresses tens of thousands of chunks.
        static CCTX: std::cell::RefCell<zstd::zstd_safe::CCtx<'static>> =
            std::cell::RefCell::new(zstd::zstd_safe::CCtx::create());
    }
    CCTX.with_borrow_mut(|cctx| {
        // A reused context keeps its parameters: reset them, then set every one this needs.
        cctx.reset(zstd::zstd_safe::ResetDirective::SessionAndParameters)
            .map_err(zstd_error("reset the compressor"))?;
        let step = zstd_error("set up the compressor");
        cctx.set_parameter(zstd::zstd_safe::CParameter::CompressionLevel(level)).map_err(step)?;
        cctx.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(false)).map_err(zstd_error("set flags"))?;
        cctx.set_parameter(zstd::zstd_safe::CParameter::ContentSizeFlag(true)).map_err(zstd_error("set flags"))?;
        // Exactly the room it may take: zstd fails (not worth it) rather than growing the buffer.
        let mut compressed = Vec::with_capacity(room);
        Ok(cctx.compress2(&mut compressed, data).is_ok().then_some(compressed))
    })
}

/// Appends the payload for `data` to `out`: a delta against `prefix` when that is smaller
/// than the chunk, the chunk itself otherwise.
pub fn encode_payload(data: &[u8], prefix: &[u8], out: &mut Vec<u8>) -> Result<PayloadTag, DeltaError> {
    match encode_delta(data, prefix)? {
        Some(delta) => {
            out.push(PayloadTag::Delta as u8);
            out.extend_from_slice(&delta);
            Ok(PayloadTag::Delta)
        }
        None => {
            out.push(PayloadTag::Raw as u8);
            out.extend_from_slice(data);
            Ok(PayloadTag::Raw)
        }
    }
}

/// A decoded chunk: the payload's own buffer past its tag for raw payloads (no copy), a new
/// buffer for deltas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    buffer: Vec<u8>,
    start: usize,
}

impl std::ops::Deref for Chunk {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.buffer[self.start..]
    }
}

/// Decodes a payload into the chunk of `expected_len` bytes, using `prefix` (the want's bases
/// concatenated) for a delta. The caller still checks the chunk's hash.
pub fn decode_payload(payload: Vec<u8>, prefix: &[u8], expected_len: usize) -> Result<Chunk, DeltaError> {
    let (&tag, body) = payload.split_first().ok_or(DeltaError::EmptyPayload)?;
    let chunk = if tag == PayloadTag::Raw as u8 {
        Chunk { buffer: payload, start: 1 }
    } else if tag == PayloadTag::Delta as u8 {
        Chunk { buffer: decode_frame(body, prefix, expected_len)?, start: 0 }
    } else {
        return Err(DeltaError::UnknownTag { tag });
    };
    if chunk.len() != expected_len {
        return Err(DeltaError::WrongLength { got: chunk.len() as u64, expected: expected_len });
    }
    Ok(chunk)
}

/// Decodes a chunk's compressed copy ([`compress_chunk`]) of `expected_len` bytes. The caller
/// still checks the result against the chunk.
pub fn decompress_chunk(compressed: &[u8], expected_len: usize) -> Result<Vec<u8>, DeltaError> {
    decode_frame(compressed, &[], expected_len)
}

/// Decodes one zstd frame of `expected_len` bytes against `prefix` (which may be empty).
fn decode_frame(body: &[u8], prefix: &[u8], expected_len: usize) -> Result<Vec<u8>, DeltaError> {
    let mut dctx = zstd::zstd_safe::DCtx::create();
    dctx.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(WINDOW_LOG_MAX))
        .map_err(zstd_error("set the window limit"))?;
    dctx.ref_prefix(prefix).map_err(zstd_error("reference the bases"))?;
    // The frame says its decoded size (the encoder knows it): check before allocating.
    match zstd::zstd_safe::get_frame_content_size(body) {
        Ok(Some(size)) if size == expected_len as u64 => {}
        Ok(Some(size)) => return Err(DeltaError::WrongLength { got: size, expected: expected_len }),
        Ok(None) | Err(_) => return Err(DeltaError::NoContentSize),
    }
    let mut data = vec![0u8; expected_len];
    let n = dctx.decompress(&mut data[..], body).map_err(zstd_error("decode the delta"))?;
    data.truncate(n);
    if data.len() != expected_len {
        return Err(DeltaError::WrongLength { got: data.len() as u64, expected: expected_len });
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testdata::random_bytes;
    use proptest::prelude::*;

    #[test]
    fn a_chunk_with_a_small_change_travels_as_a_small_delta() {
        let old = random_bytes(96 * 1024, 1);
        let mut new = old.clone();
        new[40_000..44_096].copy_from_slice(&random_bytes(4096, 2));
        let mut payload = Vec::new();
        assert_eq!(encode_payload(&new, &old, &mut payload).unwrap(), PayloadTag::Delta);
        assert!(payload.len() < 4096 + 200, "delta of a 4 KiB change is {} bytes", payload.len());
        assert_eq!(decode_payload(payload.clone(), &old, new.len()).unwrap().to_vec(), new);
    }

    #[test]
    fn matches_are_found_across_a_whole_large_base() {
        // A manifest-sized base (1 MB): the delta of a small insertion stays small only if the
        // match table covers the whole base, not just its last positions.
        let old = random_bytes(1_000_000, 11);
        let new = [&old[..100_000], &random_bytes(500, 12)[..], &old[100_036..]].concat();
        let mut payload = Vec::new();
        assert_eq!(encode_payload(&new, &old, &mut payload).unwrap(), PayloadTag::Delta);
        assert!(payload.len() < 2000, "delta of a 500-byte insertion into 1 MB is {} bytes", payload.len());
        assert_eq!(decode_payload(payload, &old, new.len()).unwrap().to_vec(), new);
    }

    #[test]
    fn shifted_content_and_several_bases_still_match() {
        let a = random_bytes(64 * 1024, 3);
        let b = random_bytes(64 * 1024, 4);
        let prefix = [a.as_slice(), b.as_slice()].concat();
        // A new chunk that straddles the two old ones, with 1000 new bytes in the middle.
        let new = [&a[30_000..], &random_bytes(1000, 5)[..], &b[..20_000]].concat();
        let mut payload = Vec::new();
        assert_eq!(encode_payload(&new, &prefix, &mut payload).unwrap(), PayloadTag::Delta);
        assert!(payload.len() < 1000 + 200);
        assert_eq!(decode_payload(payload.clone(), &prefix, new.len()).unwrap().to_vec(), new);
    }

    #[test]
    fn unrelated_or_baseless_chunks_go_raw() {
        let data = random_bytes(10_000, 6);
        let mut payload = Vec::new();
        assert_eq!(encode_payload(&data, &random_bytes(10_000, 7), &mut payload).unwrap(), PayloadTag::Raw);
        assert_eq!(payload.len(), data.len() + 1);
        assert_eq!(decode_payload(payload.clone(), &[], data.len()).unwrap().to_vec(), data);
        let mut payload = Vec::new();
        assert_eq!(encode_payload(&data, &[], &mut payload).unwrap(), PayloadTag::Raw);
    }

    #[test]
    fn decoding_against_the_wrong_bases_or_length_fails_or_differs() {
        let old = random_bytes(50_000, 8);
        let mut new = old.clone();
        new[100] ^= 1;
        let mut payload = Vec::new();
        encode_payload(&new, &old, &mut payload).unwrap();
        // A wrong prefix of the same length decodes to other bytes (the hash check catches it).
        if let Ok(data) = decode_payload(payload.clone(), &random_bytes(50_000, 9), new.len()) {
            assert_ne!(data.to_vec(), new);
        }
        assert_eq!(
            decode_payload(payload.clone(), &old, new.len() - 1),
            Err(DeltaError::WrongLength { got: new.len() as u64, expected: new.len() - 1 })
        );
        assert!(matches!(decode_payload(payload.clone(), &old, new.len() + 1), Err(DeltaError::WrongLength { .. })));
        // A raw payload of the wrong length too.
        assert!(matches!(decode_payload(vec![0, 1, 2], &old, 3), Err(DeltaError::WrongLength { got: 2, expected: 3 })));
        assert_eq!(decode_payload(Vec::new(), &old, 1), Err(DeltaError::EmptyPayload));
        assert_eq!(decode_payload(vec![7, 1, 2], &old, 2), Err(DeltaError::UnknownTag { tag: 7 }));
    }

    /// Text-like bytes: a few words repeated in a shuffled order, as code and configuration are.
    fn text(seed: u64, len: usize) -> Vec<u8> {
        let words: [&[u8]; 6] = [b"kernel ", b"module ", b"/usr/lib/", b"0000 ", b"config=", b"\n"];
        random_bytes(len, seed)
            .iter()
            .flat_map(|b| words[usize::from(*b) % words.len()].iter().copied())
            .take(len)
            .collect()
    }

    #[test]
    fn a_compressed_chunk_decodes_as_a_delta_with_or_without_bases() {
        let data = text(20, 100_000);
        let compressed = compress_chunk(&data).unwrap().expect("text compresses");
        assert!(compressed.len() < data.len() / 3, "{} of {} bytes", compressed.len(), data.len());
        let payload = [&[PayloadTag::Delta as u8][..], &compressed].concat();
        // A first sync (no bases): what today's racks do with a delta whose want named none.
        assert_eq!(decode_payload(payload.clone(), &[], data.len()).unwrap().to_vec(), data);
        // A rack that named bases decodes it against them: a plain frame never reaches back.
        let bases = [random_bytes(50_000, 21), text(22, 30_000)].concat();
        assert_eq!(decode_payload(payload, &bases, data.len()).unwrap().to_vec(), data);
        assert_eq!(decompress_chunk(&compressed, data.len()).unwrap(), data);
        assert!(matches!(decompress_chunk(&compressed, data.len() + 1), Err(DeltaError::WrongLength { .. })));
        assert!(decompress_chunk(&compressed[..compressed.len() - 1], data.len()).is_err());
    }

    #[test]
    fn incompressible_or_barely_compressible_chunks_are_not_compressed() {
        assert_eq!(compress_chunk(&random_bytes(64 * 1024, 23)).unwrap(), None);
        assert_eq!(compress_chunk(&[]).unwrap(), None);
        // 10% zeros, the rest noise: saves less than an eighth.
        let mostly_noise = [vec![0u8; 6_000], random_bytes(54_000, 24)].concat();
        assert_eq!(compress_chunk(&mostly_noise).unwrap(), None);
        // 20% zeros saves more than an eighth.
        let some_zeros = [vec![0u8; 12_000], random_bytes(48_000, 25)].concat();
        let compressed = compress_chunk(&some_zeros).unwrap().expect("worth it");
        assert!(compressed.len() * COMPRESSED_WORTH.1 <= some_zeros.len() * COMPRESSED_WORTH.0);
    }

    #[test]
    fn only_samples_of_random_data_are_tried() {
        assert!(looks_incompressible(&random_bytes(64 * 1024, 26)).unwrap());
        assert!(!looks_incompressible(&text(27, 64 * 1024)).unwrap());
        // Short chunks are tried whole, whatever they hold.
        assert!(!looks_incompressible(&random_bytes(4 * 1024, 28)).unwrap());
        // Zeros at the start only: the first sample sees them, the chunk is tried.
        let some_zeros = [vec![0u8; 12_000], random_bytes(48_000, 29)].concat();
        assert!(!looks_incompressible(&some_zeros).unwrap());
        assert_eq!(compressed_len_max(8), 7);
        assert_eq!(compressed_len_max(64 * 1024), 56 * 1024);
        assert_eq!(compressed_len_max(0), 0);
    }

    #[test]
    fn request_bodies_are_checked() {
        let want = Want { hash: Hash([1; 32]), bases: vec![Hash([2; 32])] };
        let mut body = Vec::new();
        want.emit(&mut body);
        want.emit(&mut body);
        assert_eq!(Want::parse_all(&body, 1), Err(DeltaError::TooManyWants { max: 1 }));
        assert_eq!(Want::parse_all(&body[..body.len() - 1], 2), Err(DeltaError::Truncated { want: 1 }));
        let mut bad = body[..WANT_HEADER_LEN].to_vec();
        bad[field::BASE_COUNT] = BASES_MAX as u8 + 1;
        assert_eq!(Want::parse_all(&bad, 2), Err(DeltaError::TooManyBases { want: 0, count: BASES_MAX + 1 }));
    }

    fn want() -> impl Strategy<Value = Want> {
        (any::<[u8; 32]>(), proptest::collection::vec(any::<[u8; 32]>(), 0..=BASES_MAX))
            .prop_map(|(hash, bases)| Want { hash: Hash(hash), bases: bases.into_iter().map(Hash).collect() })
    }

    proptest! {
        #[test]
        fn wants_round_trip(wants in proptest::collection::vec(want(), 0..20)) {
            let mut body = Vec::new();
            for want in &wants {
                want.emit(&mut body);
            }
            prop_assert_eq!(body.len(), wants.iter().map(Want::buffer_len).sum::<usize>());
            prop_assert_eq!(Want::parse_all(&body, 20).unwrap(), wants);
        }

        #[test]
        fn any_bytes_parse_or_fail_cleanly(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = Want::parse_all(&bytes, 8);
            let _ = decode_payload(bytes.clone(), &bytes, 300);
        }

        #[test]
        fn payloads_round_trip(seed: u64, len in 1usize..20_000, edit in 0usize..20_000, with_base: bool) {
            let old = random_bytes(len, seed);
            let mut new = old.clone();
            new[edit % len] ^= 0x5a;
            let prefix = if with_base { old.clone() } else { Vec::new() };
            let mut payload = Vec::new();
            encode_payload(&new, &prefix, &mut payload).unwrap();
            prop_assert!(payload.len() <= new.len() + 1);
            prop_assert_eq!(decode_payload(payload.clone(), &prefix, new.len()).unwrap().to_vec(), new);
        }

        #[test]
        fn compressed_chunks_round_trip_against_any_prefix(
            seed: u64, len in 1usize..50_000, zeros in 0usize..50_000, prefix_len in 0usize..5_000,
        ) {
            let mut data = text(seed, len);
            let zeros = zeros % len;
            data[..zeros].fill(0);
            if seed % 2 == 0 {
                data = random_bytes(len, seed);
            }
            if let Some(compressed) = compress_chunk(&data).unwrap() {
                let (numerator, denominator) = COMPRESSED_WORTH;
                prop_assert!(compressed.len() * denominator <= data.len() * numerator);
                let payload = [&[PayloadTag::Delta as u8][..], &compressed].concat();
                let prefix = random_bytes(prefix_len, seed ^ 1);
                prop_assert_eq!(decode_payload(payload, &prefix, data.len()).unwrap().to_vec(), data);
            }
        }
    }
}
