//! The simulated machines' HTTP/1.1 wire format: URLs they may fetch (`http://IPv4:port/path`,
//! no DNS on a provisioning network), requests (GET with an optional `Range`, POST of JSON,
//! keep-alive) and response heads (status, `Content-Length`, `Connection: close`). Bodies are
//! `Content-Length` only: the rack sends every body with a length (files, scripts, JSON), and a
//! chunked answer is refused with a clear error rather than misread. The connection logic on
//! smoltcp TCP is in [`super::net`].

use std::net::Ipv4Addr;

/// Longest response head read: the rack's heads are a few hundred bytes.
pub const HEAD_BYTES_MAX: usize = 16 * 1024;
/// Headers in one response, at most.
const HEADERS_MAX: usize = 64;

/// Where a URL points.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Url {
    pub host: Ipv4Addr,
    pub port: u16,
    /// Path and query, starting with `/`.
    pub target: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("{url:?} is not an http://IPv4[:port]/path URL")]
    Url { url: String },
    #[error("the response head is over {HEAD_BYTES_MAX} bytes")]
    HeadTooLong,
    #[error("the response's status line {line:?} is not HTTP/1.x NNN")]
    StatusLine { line: String },
    #[error("the response header {line:?} is malformed")]
    Header { line: String },
    #[error("the response has over {HEADERS_MAX} headers")]
    TooManyHeaders,
    #[error("the response uses Transfer-Encoding {encoding:?}; only Content-Length bodies are supported")]
    TransferEncoding { encoding: String },
}

impl Url {
    pub fn parse(url: &str) -> Result<Url, WireError> {
        let bad = || WireError::Url { url: url.chars().take(200).collect() };
        let rest = url.strip_prefix("http://").ok_or_else(bad)?;
        let (authority, target) = match rest.find('/') {
            Some(slash) => (&rest[..slash], &rest[slash..]),
            None => (rest, "/"),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((host, port)) => (host, port.parse::<u16>().map_err(|_| bad())?),
            None => (authority, 80),
        };
        let host = host.parse::<Ipv4Addr>().map_err(|_| bad())?;
        if target.chars().any(|c| c.is_ascii_control() || c == ' ') {
            return Err(bad());
        }
        Ok(Url { host, port, target: target.to_string() })
    }
}

/// A request's bytes: `method target`, `Host`, the extra headers, and the body with its length.
pub fn request(method: &str, url: &Url, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut text = format!(
        "{method} {} HTTP/1.1\r\nHost: {}:{}\r\nUser-Agent: metalrack-fleet\r\n",
        url.target, url.host, url.port
    );
    for (name, value) in headers {
        text.push_str(&format!("{name}: {value}\r\n"));
    }
    if !body.is_empty() || method == "POST" {
        text.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    text.push_str("\r\n");
    let mut bytes = text.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// What the client needs of a response head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    pub status: u16,
    /// `None`: no length given, the body runs to the connection's end.
    pub content_length: Option<u64>,
    /// The server closes after this response (or it is HTTP/1.0 without keep-alive).
    pub close: bool,
}

/// Where a head ends (after `\r\n\r\n`) in `bytes`, if it does.
pub fn head_end(bytes: &[u8]) -> Option<usize> {
    bytes.windows(4).position(|w| w == b"\r\n\r\n").map(|at| at + 4)
}

/// Parses a complete head (through its blank line).
pub fn parse_head(bytes: &[u8]) -> Result<Head, WireError> {
    if bytes.len() > HEAD_BYTES_MAX {
        return Err(WireError::HeadTooLong);
    }
    let text = String::from_utf8_lossy(bytes);
    let mut lines = text.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut words = status_line.splitn(3, ' ');
    let version = words.next().unwrap_or_default();
    let status = words.next().and_then(|code| code.parse::<u16>().ok()).filter(|code| (100..1000).contains(code));
    let (Some(status), true) = (status, version.starts_with("HTTP/1.")) else {
        return Err(WireError::StatusLine { line: status_line.chars().take(200).collect() });
    };
    let mut head = Head { status, content_length: None, close: version == "HTTP/1.0" };
    for (count, line) in lines.filter(|line| !line.is_empty()).enumerate() {
        if count >= HEADERS_MAX {
            return Err(WireError::TooManyHeaders);
        }
        let Some((name, value)) = line.split_once(':') else {
            return Err(WireError::Header { line: line.chars().take(200).collect() });
        };
        let value = value.trim();
        match name.trim().to_ascii_lowercase().as_str() {
            "content-length" => {
                let length = value.parse::<u64>().map_err(|_| WireError::Header { line: line.into() })?;
                if head.content_length.is_some_and(|earlier| earlier != length) {
                    return Err(WireError::Header { line: line.into() });
                }
                head.content_length = Some(length);
            }
            "transfer-encoding" if !value.eq_ignore_ascii_case("identity") => {
                return Err(WireError::TransferEncoding { encoding: value.chars().take(50).collect() })
            }
            "connection" => {
                let value = value.to_ascii_lowercase();
                if value.contains("close") {
                    head.close = true;
                } else if value.contains("keep-alive") {
                    head.close = false;
                }
            }
            _ => {}
        }
    }
    // 1xx, 204 and 304 have no body whatever they say.
    if status < 200 || status == 204 || status == 304 {
        head.content_length = Some(0);
    }
    Ok(head)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_url() {
        let url = Url::parse("http://10.99.0.1:5248/ipxe/52-54-00-aa-bb-01?x=1").unwrap();
        assert_eq!(
            url,
            Url { host: Ipv4Addr::new(10, 99, 0, 1), port: 5248, target: "/ipxe/52-54-00-aa-bb-01?x=1".into() }
        );
        assert_eq!(Url::parse("http://10.0.0.1").unwrap().target, "/");
        assert_eq!(Url::parse("http://10.0.0.1").unwrap().port, 80);
        for bad in
            ["https://10.0.0.1/", "http://rack.example/", "http://10.0.0.1:99999/", "http://10.0.0.1/a b", "tftp://x"]
        {
            assert!(Url::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn test_emit_requests() {
        let url = Url::parse("http://10.0.0.1:5248/images/a/kernel").unwrap();
        let get = String::from_utf8(request("GET", &url, &[("Range", "bytes=0-9")], b"")).unwrap();
        assert_eq!(get, "GET /images/a/kernel HTTP/1.1\r\nHost: 10.0.0.1:5248\r\nUser-Agent: metalrack-fleet\r\nRange: bytes=0-9\r\n\r\n");
        let post = request("POST", &url, &[("Content-Type", "application/json")], b"{}");
        assert!(post.ends_with(b"Content-Length: 2\r\n\r\n{}"));
    }

    #[test]
    fn test_parse_heads() {
        let bytes = b"HTTP/1.1 206 Partial Content\r\ncontent-length: 10\r\ncontent-range: bytes 0-9/100\r\n\r\nBODY";
        let end = head_end(bytes).unwrap();
        assert_eq!(&bytes[end..], b"BODY");
        assert_eq!(parse_head(&bytes[..end]).unwrap(), Head { status: 206, content_length: Some(10), close: false });
        let close = parse_head(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n").unwrap();
        assert!(close.close && close.content_length.is_none());
        assert!(parse_head(b"HTTP/1.0 200 OK\r\n\r\n").unwrap().close);
        assert_eq!(parse_head(b"HTTP/1.1 204 No Content\r\n\r\n").unwrap().content_length, Some(0));
    }

    #[test]
    fn test_malformed_heads() {
        assert!(matches!(parse_head(b"HTTP/2 200\r\n\r\n"), Err(WireError::StatusLine { .. })));
        assert!(matches!(parse_head(b"garbage\r\n\r\n"), Err(WireError::StatusLine { .. })));
        assert!(matches!(parse_head(b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n"), Err(WireError::Header { .. })));
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n"),
            Err(WireError::Header { .. })
        ));
        assert!(matches!(
            parse_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Err(WireError::TransferEncoding { .. })
        ));
        let many: String = (0..70).map(|i| format!("X-{i}: y\r\n")).collect();
        assert_eq!(parse_head(format!("HTTP/1.1 200 OK\r\n{many}\r\n").as_bytes()), Err(WireError::TooManyHeaders));
        assert_eq!(parse_head(&vec![b'a'; HEAD_BYTES_MAX + 1]), Err(WireError::HeadTooLong));
    }
}
