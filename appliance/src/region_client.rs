//! The rack's link to its region: one HTTP client (one connection pool, one set of timeouts)
//! built once per registration and used by every call — heartbeat, catalogue long-poll,
//! manifests, chunk streams, boot events — with one method per call and every error saying which
//! region and what went wrong. `region_link` adds the rack's registration.
//!
//! Trust: every call after registration is HTTPS to a certificate pinned by its SHA-256, the
//! fingerprint the secret's HMAC covered at registration ([`RegionTrust::Pinned`]; the check is
//! `metalrack_api::tls_pin`'s, shared with imgtool); names and certificate authorities play no
//! part. Only the registration challenge, which carries nothing secret, goes out unpinned
//! ([`RegionTrust::NothingYet`]).
//!
//! Deadlines, all from `region_request_timeout_ms`: a call (heartbeat, events, registration)
//! has that long in all; a long-poll that long plus the time the region may hold it; a stream
//! (manifest, chunks) that long for the response to start, then [`STREAM_READ_TIMEOUT`] per read,
//! since a rate-capped stream of many chunks may rightly take far longer in all.

use std::time::Duration;

use metalrack_api::images::{RackCatalogue, RackSnapshot, MANIFEST_DELTA_TYPE};
use metalrack_api::paths;
use metalrack_api::power::{PowerRequest, PowerResult};
use metalrack_api::tls_pin::{client_config, find_pin_mismatch};
pub use metalrack_api::tls_pin::{PinMismatch, RegionTrust};
use metalrack_api::{
    ChallengeRequest, ChallengeResponse, ErrorBody, HeartbeatRequest, HeartbeatResponse, RegisterRequest,
    RegisterResponse, API_PREFIX,
};
use reqwest::{StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A chunk stream or long-poll that delivers nothing for this long is given up and retried.
pub const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(90);

// A read timeout shorter than the longest hold the region may put on a catalogue poll would cut
// off polls the region is still holding.
const _: () = assert!(STREAM_READ_TIMEOUT.as_secs() > metalrack_api::limits::CATALOGUE_POLL_HOLD_MAX.as_secs());

/// Connecting takes at most this long (or the request timeout, if shorter): a region on the
/// LAN accepts in milliseconds, and a dead one should not hold a heartbeat for the whole timeout.
pub const CONNECT_TIMEOUT_MAX: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum RegionError {
    #[error("{url:?} is not a region URL: {reason} (expected e.g. http://REGION:5240/MAAS)")]
    BadUrl { url: String, reason: String },
    #[error("cannot reach the region at {url}")]
    Unreachable { url: String, source: reqwest::Error },
    #[error("the region at {url} refused: {message}")]
    Refused { url: String, status: StatusCode, message: String, code: Option<String> },
    #[error("{url} answered {status} but not as a Metalrack region; check the URL (it ends in /MAAS)")]
    NotARegion { url: String, status: StatusCode },
    #[error("the region at {url} did not start its answer within {} ms", after.as_millis())]
    NoAnswer { url: String, after: Duration },
    #[error(
        "the region at {url} presents a TLS certificate (sha256 {presented}) other than the one this rack pinned \
         when it registered (sha256 {pinned}); if the region's certificate was replaced, register again: 'rackd \
         register --url http://REGION:5240/MAAS --secret SECRET'"
    )]
    CertificateChanged { url: String, pinned: String, presented: String },
}

impl RegionError {
    /// True when the region said this rack's credential is void and it must register again.
    pub fn must_register_again(&self) -> bool {
        match self {
            RegionError::Refused { code: Some(code), .. } => code == metalrack_api::CODE_REREGISTER,
            RegionError::CertificateChanged { .. } => true,
            _ => false,
        }
    }

    /// A failed request: [`RegionError::CertificateChanged`] when the pin refused the region's
    /// certificate, else [`RegionError::Unreachable`].
    fn from_request(url: &str, source: reqwest::Error) -> RegionError {
        match find_pin_mismatch(&source) {
            Some(mismatch) => RegionError::CertificateChanged {
                url: url.to_owned(),
                pinned: mismatch.pinned.clone(),
                presented: mismatch.presented.clone(),
            },
            None => RegionError::Unreachable { url: url.to_owned(), source },
        }
    }
}

/// Checks and normalises a region URL as operators type it: `http://HOST:5240/MAAS[/]`.
pub fn parse_region_url(text: &str) -> Result<Url, RegionError> {
    let bad = |reason: &str| RegionError::BadUrl { url: text.to_owned(), reason: reason.to_owned() };
    let mut url = Url::parse(text.trim()).map_err(|e| bad(&e.to_string()))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(bad("the scheme must be http or https"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(bad("it names no host"));
    }
    if url.query().is_some() || url.fragment().is_some() {
        return Err(bad("it must not have a query or fragment"));
    }
    let path = url.path().trim_end_matches('/').to_owned();
    url.set_path(&path);
    Ok(url)
}

/// The region URL for calls over TLS: the same host and port with `https`, since the region
/// serves both on one port (`http://REGION:5240/MAAS` → `https://REGION:5240/MAAS`).
pub fn tls_url(region_url: &Url) -> Url {
    let mut url = region_url.clone();
    let port = url.port_or_known_default();
    url.set_scheme("https").expect("http and https are both special schemes");
    url.set_port(port).expect("a region URL has a host");
    url
}

/// The HTTP client of one registration: built once, cloned (cheaply: a shared pool) into every
/// [`RegionClient`], trusting the region's certificate as `trust` says.
pub fn http_client(request_timeout: Duration, trust: RegionTrust) -> reqwest::Client {
    reqwest::Client::builder()
        .use_preconfigured_tls(client_config(trust))
        // A redirect could only lead away from the pinned region.
        .redirect(reqwest::redirect::Policy::none())
        // Per read, for streams; calls and long-polls also get an overall deadline per request.
        .read_timeout(STREAM_READ_TIMEOUT)
        .connect_timeout(request_timeout.min(CONNECT_TIMEOUT_MAX))
        .user_agent(concat!("rackd/", env!("CARGO_PKG_VERSION")))
        .build()
        .expect("an HTTP client with a rustls config builds")
}

/// Calls to one region.
#[derive(Debug, Clone)]
pub struct RegionClient {
    http: reqwest::Client,
    /// `region_request_timeout_ms`.
    request_timeout: Duration,
    /// The region URL without a trailing slash, e.g. `http://region:5240/MAAS`.
    base: String,
}

impl RegionClient {
    /// A client with its own connection pool, for one-shot commands (`rackd register`).
    pub fn new(region_url: &Url, request_timeout: Duration, trust: RegionTrust) -> RegionClient {
        RegionClient::with_http(http_client(request_timeout, trust), region_url, request_timeout)
    }

    /// A client on a shared pool (see [`http_client`]).
    pub fn with_http(http: reqwest::Client, region_url: &Url, request_timeout: Duration) -> RegionClient {
        RegionClient { http, request_timeout, base: region_url.as_str().trim_end_matches('/').to_owned() }
    }

    /// Sends a streamed request: the response must start within the request timeout; its body
    /// is then read under the per-read timeout only.
    async fn send_streaming(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response, RegionError> {
        match tokio::time::timeout(self.request_timeout, request.send()).await {
            Ok(sent) => sent.map_err(|source| RegionError::from_request(&self.base, source)),
            Err(_) => Err(RegionError::NoAnswer { url: self.base.clone(), after: self.request_timeout }),
        }
    }

    /// The catalogue, held open by the region up to `wait` until it differs from what we have.
    pub async fn catalogue(
        &self,
        authorization: &str,
        after_revision: i64,
        requested: i64,
        changes_seen: Option<u64>,
        wait: Duration,
    ) -> Result<RackCatalogue, RegionError> {
        let mut url = format!(
            "{}{API_PREFIX}{}?after={after_revision}&requested={requested}&wait_ms={}",
            self.base,
            paths::RACK_CATALOGUE,
            wait.as_millis()
        );
        if let Some(changes) = changes_seen {
            url.push_str(&format!("&changes={changes}"));
        }
        self.long_poll(&url, authorization, wait).await
    }

    /// A manifest by id. With `base` (a manifest the rack has), the region may answer with a
    /// delta payload against it: the second value says whether it did.
    pub async fn manifest(
        &self,
        authorization: &str,
        manifest_id: &str,
        base: Option<&str>,
    ) -> Result<(Vec<u8>, bool), RegionError> {
        let mut url = format!("{}{API_PREFIX}{}", self.base, paths::rack_manifest(manifest_id));
        if let Some(base) = base {
            url.push_str(&format!("?base={base}"));
        }
        let request = self.http.get(&url).header(reqwest::header::AUTHORIZATION, authorization);
        let response = self.send_streaming(request).await?;
        let status = response.status();
        let is_delta = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == MANIFEST_DELTA_TYPE.as_bytes());
        let bytes = response.bytes().await.map_err(|source| RegionError::from_request(&self.base, source))?;
        if !status.is_success() {
            return Err(self.refusal(status, &bytes));
        }
        Ok((bytes.to_vec(), is_delta))
    }

    /// Asks for chunks with a body of wants (`metalrack_image_tools::delta::Want`); the response
    /// body streams one frame per want, in the same order.
    pub async fn chunks(&self, authorization: &str, wants: Vec<u8>) -> Result<reqwest::Response, RegionError> {
        let url = format!("{}{API_PREFIX}{}", self.base, paths::RACK_CHUNKS);
        let request = self.http.post(&url).header(reqwest::header::AUTHORIZATION, authorization).body(wants);
        let response = self.send_streaming(request).await?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = response.bytes().await.unwrap_or_default();
        Err(self.refusal(status, &bytes))
    }

    /// Sends a batch of boot events: `body` is a JSON array of `metalrack_api::machines::BootEvent`,
    /// joined from each event's JSON as it was queued, so that its length is counted exactly
    /// against the wire's batch bound (see `pxe::events`).
    pub async fn boot_events(&self, authorization: &str, body: String) -> Result<(), RegionError> {
        let url = format!("{}{API_PREFIX}{}", self.base, paths::RACK_EVENTS);
        let request = self
            .http
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, authorization)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .timeout(self.request_timeout)
            .body(body);
        self.send(request).await.map(|_| ())
    }

    /// This rack's power requests, held open by the region up to `wait` while there are none.
    pub async fn power_requests(&self, authorization: &str, wait: Duration) -> Result<Vec<PowerRequest>, RegionError> {
        let url = format!("{}{API_PREFIX}{}?wait_ms={}", self.base, paths::RACK_POWER, wait.as_millis());
        self.long_poll(&url, authorization, wait).await
    }

    /// A `GET` of `url` that the region holds open up to `wait` while it has nothing new; the
    /// JSON answer.
    async fn long_poll<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        authorization: &str,
        wait: Duration,
    ) -> Result<T, RegionError> {
        // The deadline covers the region's hold and the call itself.
        let request = self
            .http
            .get(url)
            .header(reqwest::header::AUTHORIZATION, authorization)
            .timeout(self.request_timeout + wait);
        let bytes = self.send(request).await?;
        serde_json::from_slice(&bytes)
            .map_err(|_| RegionError::NotARegion { url: self.base.clone(), status: StatusCode::OK })
    }

    /// What came of one power request.
    pub async fn power_result(&self, authorization: &str, result: &PowerResult) -> Result<(), RegionError> {
        self.send_json(reqwest::Method::POST, paths::RACK_POWER, authorization, result).await
    }

    /// A rack call with a JSON body whose answer carries nothing the rack reads.
    async fn send_json<Req: Serialize>(
        &self,
        method: reqwest::Method,
        path: &str,
        authorization: &str,
        body: &Req,
    ) -> Result<(), RegionError> {
        let url = format!("{}{API_PREFIX}{path}", self.base);
        let request = self
            .http
            .request(method, &url)
            .timeout(self.request_timeout)
            .header(reqwest::header::AUTHORIZATION, authorization)
            .json(body);
        self.send(request).await.map(drop)
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<bytes::Bytes, RegionError> {
        let unreachable = |source| RegionError::from_request(&self.base, source);
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            Ok(bytes)
        } else {
            Err(self.refusal(status, &bytes))
        }
    }

    fn refusal(&self, status: StatusCode, bytes: &[u8]) -> RegionError {
        match serde_json::from_slice::<ErrorBody>(bytes) {
            Ok(body) => RegionError::Refused { url: self.base.clone(), status, message: body.error, code: body.code },
            Err(_) => RegionError::NotARegion { url: self.base.clone(), status },
        }
    }

    pub async fn challenge(&self, request: &ChallengeRequest) -> Result<ChallengeResponse, RegionError> {
        self.post(paths::RACK_CHALLENGE, None, request).await
    }

    pub async fn register(&self, request: &RegisterRequest) -> Result<RegisterResponse, RegionError> {
        self.post(paths::RACK_REGISTER, None, request).await
    }

    /// Tells the region what the current snapshot holds (asked for by a heartbeat's answer).
    pub async fn put_snapshot(&self, authorization: &str, snapshot: &RackSnapshot) -> Result<(), RegionError> {
        self.send_json(reqwest::Method::PUT, paths::RACK_SNAPSHOT, authorization, snapshot).await
    }

    pub async fn heartbeat(
        &self,
        authorization: &str,
        request: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, RegionError> {
        self.post(paths::RACK_HEARTBEAT, Some(authorization), request).await
    }

    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        authorization: Option<&str>,
        body: &Req,
    ) -> Result<Resp, RegionError> {
        let url = format!("{}{API_PREFIX}{path}", self.base);
        let mut request = self.http.post(&url).timeout(self.request_timeout).json(body);
        if let Some(value) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let unreachable = |source| RegionError::from_request(&self.base, source);
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status();
        let bytes = response.bytes().await.map_err(unreachable)?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|_| RegionError::NotARegion { url: self.base.clone(), status });
        }
        match serde_json::from_slice::<ErrorBody>(&bytes) {
            Ok(body) => {
                Err(RegionError::Refused { url: self.base.clone(), status, message: body.error, code: body.code })
            }
            Err(_) => Err(RegionError::NotARegion { url: self.base.clone(), status }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn region_urls() {
        assert_eq!(parse_region_url("http://10.0.0.1:5240/MAAS/").unwrap().as_str(), "http://10.0.0.1:5240/MAAS");
        assert_eq!(parse_region_url("https://region/MAAS").unwrap().as_str(), "https://region/MAAS");
        for bad in ["region:5240/MAAS", "ftp://region/MAAS", "http://:5240/MAAS", "not a url", "http://r/MAAS?x=1"] {
            let err = parse_region_url(bad).unwrap_err();
            assert!(matches!(err, RegionError::BadUrl { .. }), "{bad}: {err}");
        }
    }
}
