//! The TFTP wire format: RFC 1350 packets with the options of RFC 2347 (OACK), 2348 (blksize),
//! 2349 (timeout, tsize) and 7440 (windowsize), as a checked view over bytes ([`Packet`]) and a
//! parsed form ([`Repr`]) with `parse` / `emit`.
//!
//! ```text
//!  0       2
//!  +-------+------------------------------------------------------+
//!  | 1 RRQ | filename NUL mode NUL (option NUL value NUL)*        |
//!  | 2 WRQ | filename NUL mode NUL (option NUL value NUL)*        |
//!  | 3 DATA| block u16 | payload (0..=blksize bytes)              |
//!  | 4 ACK | block u16                                            |
//!  | 5 ERR | code u16  | message NUL                              |
//!  | 6 OACK| (option NUL value NUL)*                              |
//!  +-------+------------------------------------------------------+
//! ```
//!
//! Everything here takes untrusted bytes: parsing never panics and never allocates. Unknown
//! options and option values outside their RFC ranges are ignored (RFC 2347: a server ignores
//! options it does not support), so [`Options`] only ever holds values a peer may be granted.

use std::fmt;
use std::str;

mod field {
    pub type Field = std::ops::Range<usize>;
    pub type Rest = std::ops::RangeFrom<usize>;

    pub const OPCODE: Field = 0..2;
    /// DATA and ACK: the block number.
    pub const BLOCK: Field = 2..4;
    /// ERROR: the error code.
    pub const ERROR_CODE: Field = 2..4;
    /// DATA: the file's bytes; ERROR: the message and its NUL.
    pub const PAYLOAD: Rest = 4..;
    /// RRQ, WRQ, OACK: NUL-terminated strings.
    pub const STRINGS: Rest = 2..;
}

/// Bytes before a DATA packet's payload (opcode and block number).
pub const DATA_HEADER_LEN: usize = field::PAYLOAD.start;

/// Block size without the blksize option (RFC 1350).
pub const BLKSIZE_DEFAULT: u16 = 512;

/// Valid blksize values (RFC 2348): 8 up to what fits a 64 KiB IPv4 datagram.
pub const BLKSIZE_RANGE: std::ops::RangeInclusive<u16> = 8..=65464;

/// Valid timeout values in seconds (RFC 2349).
pub const TIMEOUT_S_RANGE: std::ops::RangeInclusive<u8> = 1..=255;

/// Valid windowsize values (RFC 7440).
pub const WINDOWSIZE_RANGE: std::ops::RangeInclusive<u16> = 1..=65535;

/// Why bytes are not a TFTP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("packet of {len} bytes is shorter than {needed}")]
    Truncated { len: usize, needed: usize },
    #[error("unknown opcode {0}")]
    UnknownOpcode(u16),
    #[error("string field without its terminating NUL")]
    Unterminated,
    #[error("string field is not UTF-8")]
    NotUtf8,
    #[error("transfer mode {0:?} is not netascii, octet or mail")]
    UnknownMode(ModeName),
    #[error("option without a value")]
    OptionWithoutValue,
}

/// A mode name as received, kept short so [`WireError`] stays `Copy` and allocation-free.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ModeName {
    bytes: [u8; 8],
    len: u8,
}

impl ModeName {
    fn new(name: &str) -> ModeName {
        let mut bytes = [0u8; 8];
        let len = name.len().min(bytes.len());
        bytes[..len].copy_from_slice(&name.as_bytes()[..len]);
        ModeName { bytes, len: len as u8 }
    }
}

impl fmt::Debug for ModeName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&String::from_utf8_lossy(&self.bytes[..usize::from(self.len)]), f)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Opcode {
    ReadRequest = 1,
    WriteRequest = 2,
    Data = 3,
    Ack = 4,
    Error = 5,
    OptionAck = 6,
}

impl Opcode {
    fn from_u16(value: u16) -> Option<Opcode> {
        Some(match value {
            1 => Opcode::ReadRequest,
            2 => Opcode::WriteRequest,
            3 => Opcode::Data,
            4 => Opcode::Ack,
            5 => Opcode::Error,
            6 => Opcode::OptionAck,
            _ => return None,
        })
    }
}

/// Transfer mode of a request. The server sends files byte for byte in every mode it accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Netascii,
    Octet,
    Mail,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::Netascii => "netascii",
            Mode::Octet => "octet",
            Mode::Mail => "mail",
        }
    }
}

/// ERROR codes (RFC 1350, 8 from RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    NotDefined,
    FileNotFound,
    AccessViolation,
    DiskFull,
    IllegalOperation,
    UnknownTransferId,
    FileExists,
    NoSuchUser,
    OptionRefused,
    Unknown(u16),
}

impl From<u16> for ErrorCode {
    fn from(value: u16) -> ErrorCode {
        match value {
            0 => ErrorCode::NotDefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTransferId,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionRefused,
            other => ErrorCode::Unknown(other),
        }
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        match code {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTransferId => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionRefused => 8,
            ErrorCode::Unknown(other) => other,
        }
    }
}

/// The options this server knows, each within its RFC range when present.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Options {
    /// RFC 2348, bytes of data per DATA packet.
    pub blksize: Option<u16>,
    /// RFC 2349, seconds before a retransmission.
    pub timeout_s: Option<u8>,
    /// RFC 2349, the file's length (0 in a read request: "tell me").
    pub tsize: Option<u64>,
    /// RFC 7440, DATA packets sent before waiting for an ACK.
    pub windowsize: Option<u16>,
}

impl Options {
    pub fn is_empty(&self) -> bool {
        *self == Options::default()
    }

    /// The options in the order they are emitted, values as decimal text.
    fn for_each(&self, mut visit: impl FnMut(&'static str, &dyn fmt::Display)) {
        if let Some(value) = self.blksize {
            visit("blksize", &value);
        }
        if let Some(value) = self.timeout_s {
            visit("timeout", &value);
        }
        if let Some(value) = self.tsize {
            visit("tsize", &value);
        }
        if let Some(value) = self.windowsize {
            visit("windowsize", &value);
        }
    }

    fn assert_valid(&self) {
        assert!(self.blksize.is_none_or(|v| BLKSIZE_RANGE.contains(&v)), "blksize {:?} out of range", self.blksize);
        assert!(self.timeout_s.is_none_or(|v| TIMEOUT_S_RANGE.contains(&v)), "timeout {:?}", self.timeout_s);
        assert!(self.windowsize.is_none_or(|v| WINDOWSIZE_RANGE.contains(&v)), "windowsize {:?}", self.windowsize);
    }

    /// Reads `name NUL value NUL` pairs. The first occurrence of an option counts; unknown
    /// names and out-of-range values are skipped.
    fn parse(mut strings: &[u8]) -> Result<Options, WireError> {
        let mut options = Options::default();
        while !strings.is_empty() {
            let (name, rest) = split_string(strings)?;
            if rest.is_empty() {
                return Err(WireError::OptionWithoutValue);
            }
            let (value, rest) = split_string(rest)?;
            strings = rest;
            let value = value.trim();
            if name.eq_ignore_ascii_case("blksize") {
                let parsed = value.parse().ok().filter(|v| BLKSIZE_RANGE.contains(v));
                options.blksize = options.blksize.or(parsed);
            } else if name.eq_ignore_ascii_case("timeout") {
                let parsed = value.parse().ok().filter(|v| TIMEOUT_S_RANGE.contains(v));
                options.timeout_s = options.timeout_s.or(parsed);
            } else if name.eq_ignore_ascii_case("tsize") {
                options.tsize = options.tsize.or(value.parse().ok());
            } else if name.eq_ignore_ascii_case("windowsize") {
                let parsed = value.parse().ok().filter(|v| WINDOWSIZE_RANGE.contains(v));
                options.windowsize = options.windowsize.or(parsed);
            }
        }
        Ok(options)
    }

    fn emitted_len(&self) -> usize {
        let mut len = 0;
        self.for_each(|name, value| len += name.len() + 1 + decimal_len(value) + 1);
        len
    }

    fn emit(&self, out: &mut [u8]) -> usize {
        let mut at = 0;
        self.for_each(|name, value| {
            at += put_string(&mut out[at..], name);
            at += put_display(&mut out[at..], value);
        });
        at
    }
}

/// Splits off one NUL-terminated UTF-8 string.
fn split_string(bytes: &[u8]) -> Result<(&str, &[u8]), WireError> {
    let nul = bytes.iter().position(|b| *b == 0).ok_or(WireError::Unterminated)?;
    let text = str::from_utf8(&bytes[..nul]).map_err(|_| WireError::NotUtf8)?;
    Ok((text, &bytes[nul + 1..]))
}

/// Writes `text` and its NUL; returns the bytes written.
fn put_string(out: &mut [u8], text: &str) -> usize {
    assert!(!text.as_bytes().contains(&0), "TFTP strings cannot hold NUL");
    out[..text.len()].copy_from_slice(text.as_bytes());
    out[text.len()] = 0;
    text.len() + 1
}

/// A small `fmt::Write` into a fixed slice, so emitting numbers needs no allocation.
struct SliceWriter<'a> {
    out: &'a mut [u8],
    at: usize,
}

impl fmt::Write for SliceWriter<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let end = self.at + s.len();
        self.out.get_mut(self.at..end).ok_or(fmt::Error)?.copy_from_slice(s.as_bytes());
        self.at = end;
        Ok(())
    }
}

struct Counter(usize);

impl fmt::Write for Counter {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.0 += s.len();
        Ok(())
    }
}

fn decimal_len(value: &dyn fmt::Display) -> usize {
    let mut counter = Counter(0);
    fmt::write(&mut counter, format_args!("{value}")).expect("counting never fails");
    counter.0
}

fn put_display(out: &mut [u8], value: &dyn fmt::Display) -> usize {
    let mut writer = SliceWriter { out, at: 0 };
    fmt::write(&mut writer, format_args!("{value}")).expect("buffer sized by buffer_len");
    let at = writer.at;
    out[at] = 0;
    at + 1
}

/// A view of a TFTP packet over bytes.
#[derive(Debug, Clone)]
pub struct Packet<T: AsRef<[u8]>> {
    buffer: T,
}

impl<T: AsRef<[u8]>> Packet<T> {
    /// Wraps `buffer` without checks; accessors panic if it is shorter than they need.
    pub const fn new_unchecked(buffer: T) -> Packet<T> {
        Packet { buffer }
    }

    /// Wraps `buffer` after checking it holds an opcode and, for the opcodes with one, the
    /// 16-bit field after it, so every accessor below is safe to call.
    pub fn new_checked(buffer: T) -> Result<Packet<T>, WireError> {
        let packet = Packet::new_unchecked(buffer);
        packet.check_len()?;
        Ok(packet)
    }

    pub fn check_len(&self) -> Result<(), WireError> {
        let len = self.buffer.as_ref().len();
        if len < field::OPCODE.end {
            return Err(WireError::Truncated { len, needed: field::OPCODE.end });
        }
        let opcode = self.raw_opcode();
        let needed = match Opcode::from_u16(opcode).ok_or(WireError::UnknownOpcode(opcode))? {
            Opcode::Data | Opcode::Ack => field::BLOCK.end,
            // The message may be empty, its NUL may not.
            Opcode::Error => field::ERROR_CODE.end + 1,
            Opcode::ReadRequest | Opcode::WriteRequest | Opcode::OptionAck => field::OPCODE.end,
        };
        if len < needed {
            return Err(WireError::Truncated { len, needed });
        }
        Ok(())
    }

    pub fn into_inner(self) -> T {
        self.buffer
    }

    fn raw_opcode(&self) -> u16 {
        let bytes = &self.buffer.as_ref()[field::OPCODE];
        u16::from_be_bytes([bytes[0], bytes[1]])
    }

    /// The opcode; `new_checked` guarantees it is known.
    pub fn opcode(&self) -> Opcode {
        Opcode::from_u16(self.raw_opcode()).expect("checked by new_checked")
    }

    /// DATA and ACK.
    pub fn block_number(&self) -> u16 {
        let bytes = &self.buffer.as_ref()[field::BLOCK];
        u16::from_be_bytes([bytes[0], bytes[1]])
    }

    /// ERROR.
    pub fn error_code(&self) -> ErrorCode {
        let bytes = &self.buffer.as_ref()[field::ERROR_CODE];
        ErrorCode::from(u16::from_be_bytes([bytes[0], bytes[1]]))
    }
}

impl<'a, T: AsRef<[u8]> + ?Sized> Packet<&'a T> {
    /// DATA: the file's bytes. ERROR: the message with its NUL. Borrows the underlying bytes,
    /// not the view, so a [`Repr`] can outlive the view.
    pub fn payload(&self) -> &'a [u8] {
        &self.buffer.as_ref()[field::PAYLOAD]
    }

    /// RRQ, WRQ, OACK: the NUL-terminated strings.
    pub fn strings(&self) -> &'a [u8] {
        &self.buffer.as_ref()[field::STRINGS]
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Packet<T> {
    pub fn set_opcode(&mut self, value: Opcode) {
        self.buffer.as_mut()[field::OPCODE].copy_from_slice(&(value as u16).to_be_bytes());
    }

    pub fn set_block_number(&mut self, value: u16) {
        self.buffer.as_mut()[field::BLOCK].copy_from_slice(&value.to_be_bytes());
    }

    pub fn set_error_code(&mut self, value: ErrorCode) {
        self.buffer.as_mut()[field::ERROR_CODE].copy_from_slice(&u16::from(value).to_be_bytes());
    }

    pub fn payload_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::PAYLOAD]
    }

    pub fn strings_mut(&mut self) -> &mut [u8] {
        &mut self.buffer.as_mut()[field::STRINGS]
    }
}

/// The header of DATA block `block`: the data path sends it in front of file bytes it does
/// not copy (same bytes as [`Repr::Data`]'s `emit`).
pub fn data_header(block: u16) -> [u8; DATA_HEADER_LEN] {
    let mut header = [0u8; DATA_HEADER_LEN];
    let mut packet = Packet::new_unchecked(&mut header[..]);
    packet.set_opcode(Opcode::Data);
    packet.set_block_number(block);
    header
}

/// A parsed TFTP packet, borrowing strings and data from the bytes it came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Repr<'a> {
    ReadRequest { filename: &'a str, mode: Mode, options: Options },
    WriteRequest { filename: &'a str, mode: Mode, options: Options },
    Data { block: u16, payload: &'a [u8] },
    Ack { block: u16 },
    Error { code: ErrorCode, message: &'a str },
    OptionAck { options: Options },
}

impl<'a> Repr<'a> {
    /// Parses a checked packet. Trailing bytes after an ACK's block number are ignored (a
    /// lenient reading of what firmware sends); everything else must be well formed.
    pub fn parse<T: AsRef<[u8]> + ?Sized>(packet: &Packet<&'a T>) -> Result<Repr<'a>, WireError> {
        packet.check_len()?;
        Ok(match packet.opcode() {
            opcode @ (Opcode::ReadRequest | Opcode::WriteRequest) => {
                let (filename, rest) = split_string(packet.strings())?;
                let (mode_name, rest) = split_string(rest)?;
                let mode = [Mode::Netascii, Mode::Octet, Mode::Mail]
                    .into_iter()
                    .find(|mode| mode_name.eq_ignore_ascii_case(mode.name()))
                    .ok_or(WireError::UnknownMode(ModeName::new(mode_name)))?;
                let options = Options::parse(rest)?;
                if opcode == Opcode::ReadRequest {
                    Repr::ReadRequest { filename, mode, options }
                } else {
                    Repr::WriteRequest { filename, mode, options }
                }
            }
            Opcode::Data => Repr::Data { block: packet.block_number(), payload: packet.payload() },
            Opcode::Ack => Repr::Ack { block: packet.block_number() },
            Opcode::Error => {
                let (message, _) = split_string(packet.payload())?;
                Repr::Error { code: packet.error_code(), message }
            }
            Opcode::OptionAck => Repr::OptionAck { options: Options::parse(packet.strings())? },
        })
    }

    /// Bytes `emit` writes.
    pub fn buffer_len(&self) -> usize {
        field::OPCODE.end
            + match self {
                Repr::ReadRequest { filename, mode, options } | Repr::WriteRequest { filename, mode, options } => {
                    filename.len() + 1 + mode.name().len() + 1 + options.emitted_len()
                }
                Repr::Data { payload, .. } => 2 + payload.len(),
                Repr::Ack { .. } => 2,
                Repr::Error { message, .. } => 2 + message.len() + 1,
                Repr::OptionAck { options } => options.emitted_len(),
            }
    }

    /// Writes the packet into `packet`, which must hold exactly `buffer_len()` bytes. Panics on
    /// values no peer could parse back (a NUL inside a string, an option out of its range).
    pub fn emit<T: AsRef<[u8]> + AsMut<[u8]>>(&self, packet: &mut Packet<T>) {
        assert_eq!(packet.buffer.as_ref().len(), self.buffer_len(), "emit buffer sized by buffer_len");
        match *self {
            Repr::ReadRequest { filename, mode, options } | Repr::WriteRequest { filename, mode, options } => {
                let opcode =
                    if matches!(self, Repr::ReadRequest { .. }) { Opcode::ReadRequest } else { Opcode::WriteRequest };
                packet.set_opcode(opcode);
                options.assert_valid();
                let out = packet.strings_mut();
                let mut at = put_string(out, filename);
                at += put_string(&mut out[at..], mode.name());
                options.emit(&mut out[at..]);
            }
            Repr::Data { block, payload } => {
                packet.set_opcode(Opcode::Data);
                packet.set_block_number(block);
                packet.payload_mut().copy_from_slice(payload);
            }
            Repr::Ack { block } => {
                packet.set_opcode(Opcode::Ack);
                packet.set_block_number(block);
            }
            Repr::Error { code, message } => {
                packet.set_opcode(Opcode::Error);
                packet.set_error_code(code);
                put_string(packet.payload_mut(), message);
            }
            Repr::OptionAck { options } => {
                packet.set_opcode(Opcode::OptionAck);
                options.assert_valid();
                options.emit(packet.strings_mut());
            }
        }
    }

    /// `emit` into a new buffer: for the rare packets (OACK, ERROR) off the data path.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut bytes = vec![0u8; self.buffer_len()];
        self.emit(&mut Packet::new_unchecked(&mut bytes[..]));
        bytes
    }
}

/// Parses untrusted bytes in one step.
pub fn parse(bytes: &[u8]) -> Result<Repr<'_>, WireError> {
    Repr::parse(&Packet::new_checked(bytes)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    static RRQ_BYTES: &[u8] =
        b"\x00\x01undionly.kpxe\x00octet\x00blksize\x001468\x00tsize\x000\x00windowsize\x0016\x00";
    static OACK_BYTES: &[u8] = b"\x00\x06blksize\x001468\x00tsize\x00123456\x00windowsize\x0016\x00";
    static DATA_BYTES: &[u8] = b"\x00\x03\xff\xfehello";
    static ACK_BYTES: &[u8] = b"\x00\x04\x01\x02";
    static ERROR_BYTES: &[u8] = b"\x00\x05\x00\x01no such file\x00";

    fn rrq_repr() -> Repr<'static> {
        Repr::ReadRequest {
            filename: "undionly.kpxe",
            mode: Mode::Octet,
            options: Options { blksize: Some(1468), timeout_s: None, tsize: Some(0), windowsize: Some(16) },
        }
    }

    #[test]
    fn test_parse() {
        assert_eq!(parse(RRQ_BYTES), Ok(rrq_repr()));
        let options = Options { blksize: Some(1468), tsize: Some(123456), windowsize: Some(16), timeout_s: None };
        assert_eq!(parse(OACK_BYTES), Ok(Repr::OptionAck { options }));
        assert_eq!(parse(DATA_BYTES), Ok(Repr::Data { block: 0xfffe, payload: b"hello" }));
        assert_eq!(parse(ACK_BYTES), Ok(Repr::Ack { block: 0x0102 }));
        assert_eq!(parse(ERROR_BYTES), Ok(Repr::Error { code: ErrorCode::FileNotFound, message: "no such file" }));
        assert_eq!(
            parse(b"\x00\x02up\x00NetASCII\x00"),
            Ok(Repr::WriteRequest { filename: "up", mode: Mode::Netascii, options: Options::default() })
        );
        assert_eq!(parse(b"\x00\x03\x00\x07"), Ok(Repr::Data { block: 7, payload: b"" }));
    }

    #[test]
    fn test_emit() {
        assert_eq!(rrq_repr().to_bytes(), RRQ_BYTES);
        let options = Options { blksize: Some(1468), tsize: Some(123456), windowsize: Some(16), timeout_s: None };
        assert_eq!(Repr::OptionAck { options }.to_bytes(), OACK_BYTES);
        assert_eq!(Repr::Data { block: 0xfffe, payload: b"hello" }.to_bytes(), DATA_BYTES);
        assert_eq!(Repr::Ack { block: 0x0102 }.to_bytes(), ACK_BYTES);
        assert_eq!(Repr::Error { code: ErrorCode::FileNotFound, message: "no such file" }.to_bytes(), ERROR_BYTES);
        assert_eq!(data_header(0xfffe), DATA_BYTES[..DATA_HEADER_LEN]);
    }

    #[test]
    fn test_truncated() {
        assert_eq!(parse(b""), Err(WireError::Truncated { len: 0, needed: 2 }));
        assert_eq!(parse(b"\x00"), Err(WireError::Truncated { len: 1, needed: 2 }));
        assert_eq!(parse(b"\x00\x04\x01"), Err(WireError::Truncated { len: 3, needed: 4 }));
        assert_eq!(parse(b"\x00\x03"), Err(WireError::Truncated { len: 2, needed: 4 }));
        assert_eq!(parse(b"\x00\x05\x00\x01"), Err(WireError::Truncated { len: 4, needed: 5 }));
        assert_eq!(parse(b"\x00\x05\x00\x01oops"), Err(WireError::Unterminated));
        assert_eq!(parse(b"\x00\x01file"), Err(WireError::Unterminated));
        assert_eq!(parse(b"\x00\x01file\x00octet"), Err(WireError::Unterminated));
        assert_eq!(parse(b"\x00\x01file\x00octet\x00blksize\x00"), Err(WireError::OptionWithoutValue));
        assert_eq!(parse(b"\x00\x01file\x00octet\x00blksize\x00512"), Err(WireError::Unterminated));
        // A request cut anywhere but after a NUL is malformed; cut after the mode or an
        // option's value it is a shorter valid request.
        for len in 0..RRQ_BYTES.len() {
            if RRQ_BYTES[..len].last() != Some(&0) {
                assert!(parse(&RRQ_BYTES[..len]).is_err(), "{len} bytes");
            }
        }
        assert!(parse(&RRQ_BYTES[..22]).is_ok(), "cut after the mode");
        assert_eq!(parse(&RRQ_BYTES[..30]), Err(WireError::OptionWithoutValue), "cut after an option name");
    }

    #[test]
    fn test_malformed() {
        assert_eq!(parse(b"\x00\x07\x00\x00"), Err(WireError::UnknownOpcode(7)));
        assert_eq!(parse(b"\x01\x01\x00\x00"), Err(WireError::UnknownOpcode(257)));
        assert_eq!(parse(b"\x00\x01\xff\x00octet\x00"), Err(WireError::NotUtf8));
        assert!(matches!(parse(b"\x00\x01f\x00binary\x00"), Err(WireError::UnknownMode(_))));
        assert_eq!(
            format!("{}", parse(b"\x00\x01f\x00binary\x00").unwrap_err()),
            "transfer mode \"binary\" is not netascii, octet or mail"
        );
    }

    #[test]
    fn options_are_case_insensitive_first_wins_and_out_of_range_values_are_ignored() {
        let bytes =
            b"\x00\x01f\x00OCTET\x00BlkSize\x00 1024\x00blksize\x00512\x00windowsize\x000\x00timeout\x00256\x00\
                      multicast\x00\x00tsize\x00x\x00";
        let Ok(Repr::ReadRequest { mode, options, .. }) = parse(bytes) else { panic!("{:?}", parse(bytes)) };
        assert_eq!(mode, Mode::Octet);
        assert_eq!(options, Options { blksize: Some(1024), ..Options::default() });
        let Ok(Repr::ReadRequest { options, .. }) = parse(b"\x00\x01f\x00octet\x00blksize\x007\x00timeout\x001\x00")
        else {
            panic!()
        };
        assert_eq!(options, Options { timeout_s: Some(1), ..Options::default() });
    }

    #[test]
    fn ack_with_trailing_bytes_is_read_leniently() {
        assert_eq!(parse(b"\x00\x04\x00\x09junk"), Ok(Repr::Ack { block: 9 }));
    }

    #[test]
    fn view_accessors_match_the_repr() {
        let packet = Packet::new_checked(ERROR_BYTES).unwrap();
        assert_eq!(packet.opcode(), Opcode::Error);
        assert_eq!(packet.error_code(), ErrorCode::FileNotFound);
        assert_eq!(packet.payload(), b"no such file\x00");
        let packet = Packet::new_checked(DATA_BYTES).unwrap();
        assert_eq!((packet.opcode(), packet.block_number(), packet.payload()), (Opcode::Data, 0xfffe, &b"hello"[..]));
    }

    fn text() -> impl Strategy<Value = String> {
        // Any UTF-8 without NUL, including multi-byte characters.
        "[^\u{0}]{0,40}"
    }

    fn options() -> impl Strategy<Value = Options> {
        (
            proptest::option::of(BLKSIZE_RANGE),
            proptest::option::of(TIMEOUT_S_RANGE),
            proptest::option::of(any::<u64>()),
            proptest::option::of(WINDOWSIZE_RANGE),
        )
            .prop_map(|(blksize, timeout_s, tsize, windowsize)| Options {
                blksize,
                timeout_s,
                tsize,
                windowsize,
            })
    }

    fn mode() -> impl Strategy<Value = Mode> {
        prop_oneof![Just(Mode::Netascii), Just(Mode::Octet), Just(Mode::Mail)]
    }

    /// Owned inputs for a `Repr`, since the strategy cannot hand out borrows.
    #[derive(Debug, Clone)]
    enum Owned {
        Request { write: bool, filename: String, mode: Mode, options: Options },
        Data { block: u16, payload: Vec<u8> },
        Ack { block: u16 },
        Error { code: u16, message: String },
        OptionAck { options: Options },
    }

    impl Owned {
        fn repr(&self) -> Repr<'_> {
            match self {
                Owned::Request { write: false, filename, mode, options } => {
                    Repr::ReadRequest { filename, mode: *mode, options: *options }
                }
                Owned::Request { write: true, filename, mode, options } => {
                    Repr::WriteRequest { filename, mode: *mode, options: *options }
                }
                Owned::Data { block, payload } => Repr::Data { block: *block, payload },
                Owned::Ack { block } => Repr::Ack { block: *block },
                Owned::Error { code, message } => Repr::Error { code: ErrorCode::from(*code), message },
                Owned::OptionAck { options } => Repr::OptionAck { options: *options },
            }
        }
    }

    fn owned() -> impl Strategy<Value = Owned> {
        prop_oneof![
            (any::<bool>(), text(), mode(), options()).prop_map(|(write, filename, mode, options)| Owned::Request {
                write,
                filename,
                mode,
                options
            }),
            (any::<u16>(), proptest::collection::vec(any::<u8>(), 0..1500))
                .prop_map(|(block, payload)| Owned::Data { block, payload }),
            any::<u16>().prop_map(|block| Owned::Ack { block }),
            (any::<u16>(), text()).prop_map(|(code, message)| Owned::Error { code, message }),
            options().prop_map(|options| Owned::OptionAck { options }),
        ]
    }

    proptest! {
        #[test]
        fn parse_of_emit_is_identity(owned in owned()) {
            let repr = owned.repr();
            let bytes = repr.to_bytes();
            prop_assert_eq!(bytes.len(), repr.buffer_len());
            prop_assert_eq!(parse(&bytes), Ok(repr));
        }

        #[test]
        fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
            // And whatever parses emits back to something that parses the same.
            if let Ok(repr) = parse(&bytes) {
                let emitted = repr.to_bytes();
                prop_assert_eq!(parse(&emitted), Ok(repr));
            }
        }

        #[test]
        fn mutated_requests_parse_without_panic(index in 0usize..80, value: u8, truncate in 0usize..80) {
            let mut bytes = RRQ_BYTES.to_vec();
            if index < bytes.len() {
                bytes[index] = value;
            }
            bytes.truncate(truncate);
            if let Ok(repr) = parse(&bytes) {
                let emitted = repr.to_bytes();
                prop_assert_eq!(parse(&emitted), Ok(repr));
            }
        }
    }
}
