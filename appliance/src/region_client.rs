//! The rack's HTTP client for the region API: one method per call, every error saying which
//! region and what went wrong.

use std::time::Duration;

use metalrack_api::images::{RackCatalogue, MANIFEST_DELTA_TYPE};
use metalrack_api::{
    ChallengeRequest, ChallengeResponse, ErrorBody, HeartbeatRequest, HeartbeatResponse, RegisterRequest,
    RegisterResponse, API_PREFIX,
};
use reqwest::{StatusCode, Url};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// A chunk stream or long-poll that delivers nothing for this long is given up and retried.
pub const STREAM_READ_TIMEOUT: Duration = Duration::from_secs(90);

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
}

impl RegionError {
    /// True when the region said this rack's credential is void and it must register again.
    pub fn must_register_again(&self) -> bool {
        matches!(self, RegionError::Refused { code: Some(code), .. } if code == metalrack_api::CODE_REREGISTER)
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

#[derive(Debug, Clone)]
pub struct RegionClient {
    http: reqwest::Client,
    /// For long-polls and chunk streams: no overall deadline, but a deadline on every read.
    streaming: reqwest::Client,
    /// The region URL without a trailing slash, e.g. `http://region:5240/MAAS`.
    base: String,
}

impl RegionClient {
    pub fn new(region_url: &Url, timeout: Duration) -> RegionClient {
        let http = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("rackd/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client without TLS options builds");
        let streaming = reqwest::Client::builder()
            .read_timeout(STREAM_READ_TIMEOUT)
            .connect_timeout(timeout.min(Duration::from_secs(5)))
            .user_agent(concat!("rackd/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("an HTTP client without TLS options builds");
        RegionClient { http, streaming, base: region_url.as_str().trim_end_matches('/').to_owned() }
    }

    /// The catalogue, held open by the region up to `wait` until it differs from what we have.
    pub async fn catalogue(
        &self,
        authorization: &str,
        after_revision: i64,
        requested: i64,
        wait: Duration,
    ) -> Result<RackCatalogue, RegionError> {
        let url = format!(
            "{}{API_PREFIX}/rack/catalogue?after={after_revision}&requested={requested}&wait_ms={}",
            self.base,
            wait.as_millis()
        );
        let request = self.streaming.get(&url).header(reqwest::header::AUTHORIZATION, authorization);
        let bytes = self.send(request).await?;
        serde_json::from_slice(&bytes)
            .map_err(|_| RegionError::NotARegion { url: self.base.clone(), status: StatusCode::OK })
    }

    /// A manifest by id. With `base` (a manifest the rack has), the region may answer with a
    /// delta payload against it: the second value says whether it did.
    pub async fn manifest(
        &self,
        authorization: &str,
        manifest_id: &str,
        base: Option<&str>,
    ) -> Result<(Vec<u8>, bool), RegionError> {
        let mut url = format!("{}{API_PREFIX}/rack/manifests/{manifest_id}", self.base);
        if let Some(base) = base {
            url.push_str(&format!("?base={base}"));
        }
        let request = self.streaming.get(&url).header(reqwest::header::AUTHORIZATION, authorization);
        let response =
            request.send().await.map_err(|source| RegionError::Unreachable { url: self.base.clone(), source })?;
        let status = response.status();
        let is_delta = response
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes() == MANIFEST_DELTA_TYPE.as_bytes());
        let bytes =
            response.bytes().await.map_err(|source| RegionError::Unreachable { url: self.base.clone(), source })?;
        if !status.is_success() {
            return Err(self.refusal(status, &bytes));
        }
        Ok((bytes.to_vec(), is_delta))
    }

    /// Asks for chunks with a body of wants (`metalrack_image_tools::delta::Want`); the response
    /// body streams one frame per want, in the same order.
    pub async fn chunks(&self, authorization: &str, wants: Vec<u8>) -> Result<reqwest::Response, RegionError> {
        let url = format!("{}{API_PREFIX}/rack/chunks", self.base);
        let response = self
            .streaming
            .post(&url)
            .header(reqwest::header::AUTHORIZATION, authorization)
            .body(wants)
            .send()
            .await
            .map_err(|source| RegionError::Unreachable { url: self.base.clone(), source })?;
        if response.status().is_success() {
            return Ok(response);
        }
        let status = response.status();
        let bytes = response.bytes().await.unwrap_or_default();
        Err(self.refusal(status, &bytes))
    }

    pub async fn boot_events(
        &self,
        authorization: &str,
        events: &[metalrack_api::machines::BootEvent],
    ) -> Result<(), RegionError> {
        let url = format!("{}{API_PREFIX}/rack/events", self.base);
        let request = self.http.post(&url).header(reqwest::header::AUTHORIZATION, authorization).json(events);
        self.send(request).await.map(|_| ())
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<bytes::Bytes, RegionError> {
        let unreachable = |source| RegionError::Unreachable { url: self.base.clone(), source };
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
        self.post("/racks/challenge", None, request).await
    }

    pub async fn register(&self, request: &RegisterRequest) -> Result<RegisterResponse, RegionError> {
        self.post("/racks/register", None, request).await
    }

    pub async fn heartbeat(
        &self,
        authorization: &str,
        request: &HeartbeatRequest,
    ) -> Result<HeartbeatResponse, RegionError> {
        self.post("/racks/heartbeat", Some(authorization), request).await
    }

    async fn post<Req: Serialize, Resp: DeserializeOwned>(
        &self,
        path: &str,
        authorization: Option<&str>,
        body: &Req,
    ) -> Result<Resp, RegionError> {
        let url = format!("{}{API_PREFIX}{path}", self.base);
        let mut request = self.http.post(&url).json(body);
        if let Some(value) = authorization {
            request = request.header(reqwest::header::AUTHORIZATION, value);
        }
        let unreachable = |source| RegionError::Unreachable { url: self.base.clone(), source };
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
