//! Metalrack images: FastCDC chunking, BLAKE3 hashes, the manifest and chunk-frame wire formats,
//! the content-addressed chunk store, and file verification — shared by the region, the racks
//! and `imgtool`.
//!
//! An image file is cut into content-defined chunks ([`chunker`]); its [`manifest::Manifest`]
//! lists every chunk's BLAKE3 hash and length in file order plus the whole file's hash. Chunks
//! travel in [`frame`]s and rest in a [`store::ChunkStore`] under their hash, so a new image
//! version only moves the chunks the old one lacks ([`diff`]). [`verify`] checks a file against
//! its manifest without ever holding the file in memory.

pub mod block_hash;
pub mod chunker;
mod cut;
pub mod delta;
pub mod deploy;
pub mod diff;
pub mod error_chain;
pub mod frame;
pub mod log_safe;
pub mod manifest;
mod mapped;
pub mod private_file;
pub mod store;
pub mod testdata;
pub mod verify;

pub use error_chain::error_chain;

use std::fmt;
use std::str::FromStr;

/// A BLAKE3 hash of a chunk or of a whole file.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Hash(pub [u8; 32]);

/// Characters in a hash's hex form: two per byte.
const HASH_HEX_LEN: usize = 64;

/// Hex characters `Debug` shows: enough to tell hashes apart in logs and test failures
/// (48 bits), short enough that a `Vec<ChunkRef>` stays readable.
const HASH_DEBUG_HEX_LEN: usize = 12;

impl Hash {
    /// The BLAKE3 hash of `data`.
    pub fn of(data: &[u8]) -> Hash {
        Hash(*blake3::hash(data).as_bytes())
    }

    /// The full 64-character lowercase hex form, as used in store paths and URLs.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// Parses the 64-character hex form (either case).
    pub fn from_hex(s: &str) -> Result<Hash, HashParseError> {
        // Checked first so that a wrong length is reported as such, not as the first position
        // where `hex` happens to stumble.
        if s.len() != HASH_HEX_LEN {
            return Err(HashParseError::Length { len: s.len() });
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(s, &mut bytes).map_err(|e| match e {
            hex::FromHexError::InvalidHexCharacter { c, index } => {
                HashParseError::InvalidCharacter { character: c, index }
            }
            // Unreachable after the length check; kept total rather than panicking.
            hex::FromHexError::OddLength | hex::FromHexError::InvalidStringLength => {
                HashParseError::Length { len: s.len() }
            }
        })?;
        Ok(Hash(bytes))
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Display for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for Hash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(&self.0[..HASH_DEBUG_HEX_LEN / 2]))
    }
}

impl FromStr for Hash {
    type Err = HashParseError;

    fn from_str(s: &str) -> Result<Hash, HashParseError> {
        Hash::from_hex(s)
    }
}

/// Why a string is not a hash.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum HashParseError {
    #[error("a hash is {HASH_HEX_LEN} hex characters, got {len}")]
    Length { len: usize },
    #[error("a hash is hex, got {character:?} at position {index}")]
    InvalidCharacter { character: char, index: usize },
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BLAKE3 of the empty input, from the BLAKE3 test vectors.
    const EMPTY_HEX: &str = "af1349b9f5f9a1a6a0404dea36dcc9499bcb25c9adc112b7cc9a93cae41f3262";

    #[test]
    fn test_of_empty() {
        assert_eq!(Hash::of(b"").to_hex(), EMPTY_HEX);
    }

    #[test]
    fn test_hex_round_trip() {
        let hash = Hash::of(b"metalrack");
        assert_eq!(Hash::from_hex(&hash.to_hex()), Ok(hash));
        assert_eq!(Hash::from_hex(&hash.to_hex().to_uppercase()), Ok(hash));
        assert_eq!(hash.to_string(), hash.to_hex());
        assert_eq!(hash.as_bytes(), &hash.0);
        assert_eq!(EMPTY_HEX.parse::<Hash>(), Ok(Hash::of(b"")));
    }

    #[test]
    fn test_debug_is_short() {
        assert_eq!(format!("{:?}", Hash::of(b"")), "af1349b9f5f9");
    }

    #[test]
    fn test_from_hex_errors() {
        assert_eq!(Hash::from_hex(""), Err(HashParseError::Length { len: 0 }));
        assert_eq!(Hash::from_hex(&EMPTY_HEX[1..]), Err(HashParseError::Length { len: 63 }));
        let bad = format!("{}g", &EMPTY_HEX[..63]);
        assert_eq!(Hash::from_hex(&bad), Err(HashParseError::InvalidCharacter { character: 'g', index: 63 }));
        // 64 bytes but 63 characters: must be an error, never a panic on a char boundary.
        let multibyte = format!("é{}", &EMPTY_HEX[..62]);
        assert!(Hash::from_hex(&multibyte).is_err());
    }
}
