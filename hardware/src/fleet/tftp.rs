//! The firmware's TFTP client: RFC 1350 reads with the RFC 2347/2348/2349 options `blksize` and
//! `tsize`, as PXE ROMs send them; one ACK per block (iPXE-era ROMs do not use windows), bounded
//! retransmissions and file size. The wire format is [`Packet`]; the transfer runs on a smoltcp
//! UDP socket in [`super::net`].

/// TFTP opcodes.
mod opcode {
    pub const RRQ: u16 = 1;
    pub const DATA: u16 = 3;
    pub const ACK: u16 = 4;
    pub const ERROR: u16 = 5;
    pub const OACK: u16 = 6;
}

/// Options an OACK may carry that we read; more is malformed.
const OACK_OPTIONS_MAX: usize = 8;

/// A packet from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    Data { block: u16, payload: &'a [u8] },
    Oack { options: Vec<(String, String)> },
    Error { code: u16, message: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("a TFTP packet of {len} bytes is too short")]
    Truncated { len: usize },
    #[error("TFTP opcode {opcode} is not one a server sends to a reading client")]
    Opcode { opcode: u16 },
    #[error("a TFTP OACK is not pairs of NUL-terminated ASCII strings (at most {OACK_OPTIONS_MAX})")]
    Oack,
}

impl Packet<'_> {
    pub fn parse(bytes: &[u8]) -> Result<Packet<'_>, WireError> {
        if bytes.len() < 4 && !(bytes.len() == 2 && u16::from_be_bytes([bytes[0], bytes[1]]) == opcode::OACK) {
            return Err(WireError::Truncated { len: bytes.len() });
        }
        let op = u16::from_be_bytes([bytes[0], bytes[1]]);
        match op {
            opcode::DATA => Ok(Packet::Data { block: u16::from_be_bytes([bytes[2], bytes[3]]), payload: &bytes[4..] }),
            opcode::ERROR => {
                let text = &bytes[4..];
                let text = text.split(|b| *b == 0).next().unwrap_or_default();
                let message = String::from_utf8_lossy(text).chars().filter(|c| !c.is_control()).take(200).collect();
                Ok(Packet::Error { code: u16::from_be_bytes([bytes[2], bytes[3]]), message })
            }
            opcode::OACK => {
                let body = &bytes[2..];
                if body.last().is_some_and(|b| *b != 0) {
                    return Err(WireError::Oack);
                }
                let fields: Vec<&[u8]> =
                    if body.is_empty() { Vec::new() } else { body[..body.len() - 1].split(|b| *b == 0).collect() };
                if !fields.chunks_exact(2).remainder().is_empty() || fields.len() / 2 > OACK_OPTIONS_MAX {
                    return Err(WireError::Oack);
                }
                let text = |field: &[u8]| -> Result<String, WireError> {
                    std::str::from_utf8(field)
                        .ok()
                        .filter(|t| t.chars().all(|c| c.is_ascii_graphic()))
                        .map(str::to_ascii_lowercase)
                        .ok_or(WireError::Oack)
                };
                let options =
                    fields.chunks(2).map(|pair| Ok((text(pair[0])?, text(pair[1])?))).collect::<Result<_, _>>()?;
                Ok(Packet::Oack { options })
            }
            opcode => Err(WireError::Opcode { opcode }),
        }
    }
}

/// A read request for `file` in octet mode asking for `blksize` and the size.
pub fn read_request(file: &str, blksize: u16) -> Vec<u8> {
    let mut packet = opcode::RRQ.to_be_bytes().to_vec();
    for field in [file, "octet", "blksize", &blksize.to_string(), "tsize", "0"] {
        packet.extend_from_slice(field.as_bytes());
        packet.push(0);
    }
    packet
}

/// The ACK of `block` (0 acknowledges an OACK).
pub fn ack(block: u16) -> [u8; 4] {
    let [a, b] = opcode::ACK.to_be_bytes();
    let [c, d] = block.to_be_bytes();
    [a, b, c, d]
}

/// The block size the server granted: its OACK's `blksize` if within what we asked, else 512
/// (RFC 2348: a server that ignores the option sends 512-byte blocks).
pub fn granted_blksize(options: &[(String, String)], asked: u16) -> Option<u16> {
    match options.iter().find(|(name, _)| name == "blksize") {
        None => Some(512),
        Some((_, value)) => value.parse::<u16>().ok().filter(|size| (8..=asked).contains(size)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_emit_read_request_and_ack() {
        assert_eq!(
            read_request("undionly.kpxe", 1468),
            b"\0\x01undionly.kpxe\0octet\0blksize\x001468\0tsize\x000\0".to_vec()
        );
        assert_eq!(ack(258), [0, 4, 1, 2]);
    }

    #[test]
    fn test_parse_data_oack_error() {
        assert_eq!(Packet::parse(b"\0\x03\0\x07abc").unwrap(), Packet::Data { block: 7, payload: b"abc" });
        assert_eq!(Packet::parse(b"\0\x03\0\x08").unwrap(), Packet::Data { block: 8, payload: b"" });
        let oack = Packet::parse(b"\0\x06BLKSIZE\x001468\0tsize\x0070000\0").unwrap();
        let Packet::Oack { options } = oack else { panic!("{oack:?}") };
        assert_eq!(granted_blksize(&options, 1468), Some(1468));
        assert_eq!(options[1], ("tsize".into(), "70000".into()));
        assert_eq!(granted_blksize(&[("blksize".into(), "9000".into())], 1468), None);
        assert_eq!(granted_blksize(&[], 1468), Some(512));
        assert_eq!(
            Packet::parse(b"\0\x05\0\x01File not found\0").unwrap(),
            Packet::Error { code: 1, message: "File not found".into() }
        );
    }

    #[test]
    fn test_truncated_and_malformed() {
        assert_eq!(Packet::parse(b"\0\x03\0"), Err(WireError::Truncated { len: 3 }));
        assert_eq!(Packet::parse(b"\0\x06blksize\0"), Err(WireError::Oack));
        assert_eq!(Packet::parse(b"\0\x06blksize\x001468"), Err(WireError::Oack));
        assert_eq!(Packet::parse(b"\0\x01file\0octet\0"), Err(WireError::Opcode { opcode: 1 }));
        assert_eq!(Packet::parse(b"\0\x06").unwrap(), Packet::Oack { options: vec![] });
    }
}
