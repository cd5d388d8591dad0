//! The chunk-frame wire format for HTTP bodies: a sequence of `(hash [32], len u32 BE, data)`.
//!
//! ```text
//!  0            32         36
//!  +------------+----------+------------------+
//!  | hash       | data_len | data [data_len]  |  × as many frames as the body holds
//!  +------------+----------+------------------+
//! ```
//!
//! The format carries no count: a body ends after its last complete frame. The hash is the
//! sender's claim; receivers check it (the chunk store does on `put`). [`FrameDecoder`] takes
//! the body in whatever pieces the network delivers and refuses an oversized frame as soon as
//! its header arrives, before buffering any of its data.

use crate::Hash;

mod field {
    pub type Field = std::ops::Range<usize>;

    pub const HASH: Field = 0..32;
    pub const DATA_LEN: Field = 32..36;
}

/// Bytes before a frame's data.
pub const HEADER_LEN: usize = field::DATA_LEN.end;

/// A view of a frame header (the data follows it in the stream, not in this view).
#[derive(Debug, Clone)]
pub struct FrameHeader<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> FrameHeader<T> {
    /// Wraps `buffer` without checking its length; accessors panic if it is short.
    pub const fn new_unchecked(buffer: T) -> FrameHeader<T> {
        FrameHeader { buffer }
    }

    /// Wraps `buffer` after checking it holds a whole header.
    pub fn new_checked(buffer: T) -> Result<FrameHeader<T>, FrameError> {
        let header = FrameHeader::new_unchecked(buffer);
        header.check_len()?;
        Ok(header)
    }

    pub fn check_len(&self) -> Result<(), FrameError> {
        let buffered = self.buffer.as_ref().len();
        if buffered < HEADER_LEN {
            return Err(FrameError::Truncated { buffered });
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    pub fn hash(&self) -> Hash {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(&self.buffer.as_ref()[field::HASH]);
        Hash(bytes)
    }

    pub fn data_len(&self) -> u32 {
        let mut bytes = [0u8; 4];
        bytes.copy_from_slice(&self.buffer.as_ref()[field::DATA_LEN]);
        u32::from_be_bytes(bytes)
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> FrameHeader<T> {
    pub fn set_hash(&mut self, value: &Hash) {
        self.buffer.as_mut()[field::HASH].copy_from_slice(value.as_bytes());
    }

    pub fn set_data_len(&mut self, value: u32) {
        self.buffer.as_mut()[field::DATA_LEN].copy_from_slice(&value.to_be_bytes());
    }
}

/// Appends one frame carrying `data` under `hash` to `out`. Panics if `data` is 4 GiB or more,
/// which no chunk is (see `manifest::CHUNK_LEN_MAX`).
pub fn encode_frame(hash: &Hash, data: &[u8], out: &mut Vec<u8>) {
    let data_len = u32::try_from(data.len()).expect("frame data is under 4 GiB");
    let start = out.len();
    out.resize(start + HEADER_LEN, 0);
    let mut header = FrameHeader::new_unchecked(&mut out[start..]);
    header.set_hash(hash);
    header.set_data_len(data_len);
    out.extend_from_slice(data);
}

/// Splits a byte stream that arrives in arbitrary pieces into frames.
///
/// Each frame's data is copied once, from the pushed piece straight into the `Vec` that
/// [`FrameDecoder::next_frame`] hands out (sized by the header when it arrives), so a receiver
/// pays no second copy per chunk and no moving of leftover bytes between pieces.
///
/// Memory: the unread complete frames plus one partial frame, whose data buffer of at most
/// `max_len` bytes is allocated when its header arrives. Once a header announces more than
/// `max_len`, the decoder drops that frame and everything after, ignores further input, and
/// returns the error after any complete frames before it.
#[derive(Debug)]
pub struct FrameDecoder {
    max_len: u32,
    /// Bytes of the next frame's header, until all [`HEADER_LEN`] have arrived.
    header: Vec<u8>,
    /// The frame being filled: its hash, the data so far, and its announced length.
    partial: Option<(Hash, Vec<u8>, usize)>,
    /// Complete frames not yet returned.
    complete: std::collections::VecDeque<(Hash, Vec<u8>)>,
    /// Set once an oversized header arrives; sticky, since the stream cannot be resynchronised.
    failed: Option<FrameError>,
}

impl FrameDecoder {
    /// A decoder that accepts frames of up to `max_len` data bytes.
    pub fn new(max_len: u32) -> Self {
        FrameDecoder {
            max_len,
            header: Vec::with_capacity(HEADER_LEN),
            partial: None,
            complete: std::collections::VecDeque::new(),
            failed: None,
        }
    }

    /// Adds the next piece of the stream.
    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.failed.is_none() {
            match &mut self.partial {
                Some((_, data, data_len)) => {
                    let n = (*data_len - data.len()).min(bytes.len());
                    data.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                }
                None => {
                    let n = (HEADER_LEN - self.header.len()).min(bytes.len());
                    self.header.extend_from_slice(&bytes[..n]);
                    bytes = &bytes[n..];
                    if self.header.len() < HEADER_LEN {
                        return;
                    }
                    let header = FrameHeader::new_unchecked(&self.header[..]);
                    let data_len = header.data_len();
                    if data_len > self.max_len {
                        // Refused on its header alone, before any of its data is kept.
                        self.failed = Some(FrameError::TooLarge { len: data_len, max: self.max_len });
                        self.header = Vec::new();
                        return;
                    }
                    let data_len = data_len as usize;
                    self.partial = Some((header.hash(), Vec::with_capacity(data_len), data_len));
                    self.header.clear();
                }
            }
            // A frame of no data is complete as soon as its header is.
            self.complete_partial();
        }
    }

    /// Moves the partial frame to the complete ones once its data is all there.
    fn complete_partial(&mut self) {
        if let Some((_, data, data_len)) = &self.partial {
            if data.len() == *data_len {
                let (hash, data, _) = self.partial.take().expect("checked above");
                self.complete.push_back((hash, data));
            }
        }
    }

    /// Bytes held for frames not yet returned (headers included), for the truncation error.
    fn buffered(&self) -> usize {
        let complete: usize = self.complete.iter().map(|(_, data)| HEADER_LEN + data.len()).sum();
        let partial = self.partial.as_ref().map_or(0, |(_, data, _)| HEADER_LEN + data.len());
        complete + partial + self.header.len()
    }

    /// The next complete frame, `Ok(None)` if more input is needed, or the error that stopped
    /// the stream once the frames before it have been returned.
    pub fn next_frame(&mut self) -> Result<Option<(Hash, Vec<u8>)>, FrameError> {
        match self.complete.pop_front() {
            Some(frame) => Ok(Some(frame)),
            None => match &self.failed {
                Some(error) => Err(error.clone()),
                None => Ok(None),
            },
        }
    }

    /// Call at the end of the stream: an error if it stopped on an oversized frame or in the
    /// middle of one (or if complete frames were left unread).
    pub fn finish(&self) -> Result<(), FrameError> {
        if let Some(error) = &self.failed {
            return Err(error.clone());
        }
        let buffered = self.buffered();
        if buffered > 0 {
            return Err(FrameError::Truncated { buffered });
        }
        Ok(())
    }
}

/// Why a frame stream is invalid.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("chunk frame announces {len} bytes of data, over the limit of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("chunk frame stream ends inside a frame, with {buffered} bytes left over")]
    Truncated { buffered: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Two frames: "abc" under hash 0x11 × 32, then "" under hash 0x22 × 32.
    #[rustfmt::skip]
    static FRAMES_BYTES: [u8; 2 * HEADER_LEN + 3] = [
        0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
        0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
        0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
        0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11, 0x11,
        0x00, 0x00, 0x00, 0x03,
        b'a', b'b', b'c',
        0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
        0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
        0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
        0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22, 0x22,
        0x00, 0x00, 0x00, 0x00,
    ];

    fn expected_frames() -> Vec<(Hash, Vec<u8>)> {
        vec![(Hash([0x11; 32]), b"abc".to_vec()), (Hash([0x22; 32]), Vec::new())]
    }

    /// Feeds `bytes` in pieces of `piece_len`, draining after each, then finishes.
    fn decode_in_pieces(bytes: &[u8], piece_len: usize, max_len: u32) -> Result<Vec<(Hash, Vec<u8>)>, FrameError> {
        let mut decoder = FrameDecoder::new(max_len);
        let mut frames = Vec::new();
        for piece in bytes.chunks(piece_len) {
            decoder.push(piece);
            while let Some(frame) = decoder.next_frame()? {
                frames.push(frame);
            }
        }
        decoder.finish()?;
        Ok(frames)
    }

    #[test]
    fn test_parse_header() {
        let header = FrameHeader::new_checked(&FRAMES_BYTES[..HEADER_LEN]).unwrap();
        assert_eq!(header.hash(), Hash([0x11; 32]));
        assert_eq!(header.data_len(), 3);
    }

    #[test]
    fn test_emit() {
        let mut out = Vec::new();
        for (hash, data) in expected_frames() {
            encode_frame(&hash, &data, &mut out);
        }
        assert_eq!(out, FRAMES_BYTES);
    }

    #[test]
    fn test_parse() {
        assert_eq!(decode_in_pieces(&FRAMES_BYTES, FRAMES_BYTES.len(), 16), Ok(expected_frames()));
    }

    #[test]
    fn test_parse_byte_by_byte() {
        assert_eq!(decode_in_pieces(&FRAMES_BYTES, 1, 16), Ok(expected_frames()));
    }

    #[test]
    fn test_every_split_point() {
        let mut bytes = Vec::new();
        let frames: Vec<(Hash, Vec<u8>)> = (0..5u8).map(|i| (Hash::of(&[i]), vec![i; i as usize * 7])).collect();
        for (hash, data) in &frames {
            encode_frame(hash, data, &mut bytes);
        }
        for piece_len in 1..=bytes.len() {
            assert_eq!(decode_in_pieces(&bytes, piece_len, 64).as_ref(), Ok(&frames), "pieces of {piece_len}");
        }
    }

    #[test]
    fn test_frames_queued_before_draining() {
        let mut decoder = FrameDecoder::new(16);
        decoder.push(&FRAMES_BYTES[..10]);
        decoder.push(&FRAMES_BYTES[10..]);
        assert_eq!(decoder.next_frame(), Ok(Some(expected_frames()[0].clone())));
        assert_eq!(decoder.next_frame(), Ok(Some(expected_frames()[1].clone())));
        assert_eq!(decoder.next_frame(), Ok(None));
        assert_eq!(decoder.finish(), Ok(()));
    }

    #[test]
    fn test_truncated() {
        let header = FrameHeader::new_checked(&FRAMES_BYTES[..HEADER_LEN - 1]);
        assert_eq!(header.err(), Some(FrameError::Truncated { buffered: HEADER_LEN - 1 }));
        for len in 1..FRAMES_BYTES.len() {
            if len == HEADER_LEN + 3 {
                continue; // A whole first frame: a valid stream on its own.
            }
            let buffered = if len > HEADER_LEN + 3 { len - HEADER_LEN - 3 } else { len };
            assert_eq!(
                decode_in_pieces(&FRAMES_BYTES[..len], 1, 16),
                Err(FrameError::Truncated { buffered }),
                "prefix of {len} bytes"
            );
        }
    }

    #[test]
    fn test_too_large_refused_before_buffering() {
        let mut decoder = FrameDecoder::new(2);
        // The first frame (3 bytes of data) is over a limit of 2: refused on its header alone.
        decoder.push(&FRAMES_BYTES[..HEADER_LEN]);
        assert_eq!(decoder.next_frame(), Err(FrameError::TooLarge { len: 3, max: 2 }));
        // Its data (and anything after) is not kept.
        decoder.push(&[0u8; 4096]);
        assert_eq!(decoder.buffered(), 0);
        assert_eq!(decoder.next_frame(), Err(FrameError::TooLarge { len: 3, max: 2 }));
        assert_eq!(decoder.finish(), Err(FrameError::TooLarge { len: 3, max: 2 }));
    }

    #[test]
    fn test_too_large_after_good_frames() {
        let mut bytes = Vec::new();
        encode_frame(&Hash([1; 32]), b"ok", &mut bytes);
        encode_frame(&Hash([2; 32]), b"too long", &mut bytes);
        let mut decoder = FrameDecoder::new(4);
        // Pushed before any draining: the oversized header is still caught on arrival.
        decoder.push(&bytes);
        assert_eq!(decoder.buffered(), HEADER_LEN + 2);
        assert_eq!(decoder.next_frame(), Ok(Some((Hash([1; 32]), b"ok".to_vec()))));
        assert_eq!(decoder.next_frame(), Err(FrameError::TooLarge { len: 8, max: 4 }));
    }

    #[test]
    fn test_max_len_is_inclusive() {
        let mut bytes = Vec::new();
        encode_frame(&Hash([1; 32]), b"four", &mut bytes);
        assert_eq!(decode_in_pieces(&bytes, 5, 4), Ok(vec![(Hash([1; 32]), b"four".to_vec())]));
    }

    #[test]
    fn test_buffer_does_not_grow_when_drained() {
        let mut bytes = Vec::new();
        for i in 0..100u8 {
            encode_frame(&Hash([i; 32]), &[i; 1000], &mut bytes);
        }
        let mut decoder = FrameDecoder::new(1000);
        let mut largest = 0;
        for piece in bytes.chunks(333) {
            decoder.push(piece);
            largest = largest.max(decoder.buffered());
            while decoder.next_frame().unwrap().is_some() {}
        }
        decoder.finish().unwrap();
        assert!(largest <= HEADER_LEN + 1000 + 333, "buffer reached {largest} bytes");
    }
}
