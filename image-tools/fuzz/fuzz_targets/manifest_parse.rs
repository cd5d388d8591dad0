//! Fuzzes `Manifest::parse`: it must never panic, and whatever it accepts must re-emit to the
//! same bytes and parse again to the same manifest.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metalrack_image_tools::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    if let Ok(manifest) = Manifest::parse(data) {
        let bytes = manifest.to_bytes();
        // A manifest has one encoding: parse accepts no trailing or non-canonical bytes.
        assert_eq!(bytes, data);
        assert_eq!(Manifest::parse(&bytes), Ok(manifest));
    }
});
