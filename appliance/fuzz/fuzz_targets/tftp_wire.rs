//! Fuzz the TFTP wire format: any bytes parse or fail without a panic, and whatever parses
//! emits back to bytes that parse to the same packet.
#![no_main]

use libfuzzer_sys::fuzz_target;
use metalrack_appliance::pxe::tftp::wire;

fuzz_target!(|data: &[u8]| {
    if let Ok(repr) = wire::parse(data) {
        let emitted = repr.to_bytes();
        assert_eq!(emitted.len(), repr.buffer_len());
        assert_eq!(wire::parse(&emitted), Ok(repr));
    }
});
