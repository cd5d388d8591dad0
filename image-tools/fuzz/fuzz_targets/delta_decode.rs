//! Fuzzes the chunk-delta request parser and payload decoder: any bytes parse or fail with an
//! error, parsed wants re-emit to the bytes they came from, and a payload never decodes to
//! anything but the asked length; nor does a chunk's compressed copy.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metalrack_image_tools::delta::{decode_payload, decompress_chunk, Want};

fuzz_target!(|input: &[u8]| {
    if let Ok(wants) = Want::parse_all(input, 64) {
        let mut body = Vec::new();
        for want in &wants {
            want.emit(&mut body);
        }
        assert_eq!(body, input);
    }
    let Some((&split, rest)) = input.split_first() else { return };
    let (prefix, payload) = rest.split_at(usize::from(split).min(rest.len()));
    if let Ok(data) = decode_payload(payload.to_vec(), prefix, 512) {
        assert_eq!(data.len(), 512);
    }
    if let Ok(data) = decompress_chunk(payload, 512) {
        assert_eq!(data.len(), 512);
    }
});
