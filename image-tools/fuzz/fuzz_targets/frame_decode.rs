//! Fuzzes `FrameDecoder`: the stream fed in arbitrary pieces must decode exactly as when fed
//! whole, and the frames it yields must re-encode to the bytes they came from.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metalrack_image_tools::frame::{encode_frame, FrameDecoder, FrameError};
use metalrack_image_tools::Hash;

/// Small, so the fuzzer reaches the oversize path as often as the normal one.
const MAX_LEN: u32 = 256;

type Frames = Vec<(Hash, Vec<u8>)>;

/// Decodes `data` in pieces of `piece_len`, draining after each push.
fn decode(data: &[u8], piece_len: usize) -> (Frames, Result<(), FrameError>) {
    let mut decoder = FrameDecoder::new(MAX_LEN);
    let mut frames = Vec::new();
    for piece in data.chunks(piece_len) {
        decoder.push(piece);
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) => frames.push(frame),
                Ok(None) => break,
                Err(e) => return (frames, Err(e)),
            }
        }
    }
    let end = decoder.finish();
    (frames, end)
}

fuzz_target!(|input: &[u8]| {
    let Some((&split, data)) = input.split_first() else { return };
    let whole = decode(data, data.len().max(1));
    let pieces = decode(data, usize::from(split).max(1));
    assert_eq!(whole, pieces);

    let (frames, end) = whole;
    let mut encoded = Vec::new();
    for (hash, bytes) in &frames {
        assert!(bytes.len() <= MAX_LEN as usize);
        encode_frame(hash, bytes, &mut encoded);
    }
    assert!(data.starts_with(&encoded));
    if end.is_ok() {
        assert_eq!(encoded, data);
    }
});
