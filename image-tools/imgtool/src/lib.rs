//! What the operator CLIs of this package share: how they trust the region over HTTPS ([`tls`]).
//! The binaries are `imgtool` (images: chunk, push, inspect, diff, verify) and `metalrack` (the
//! region's API: machines, images).

pub mod tls;
