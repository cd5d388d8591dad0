//! A rack without `rackd`: registration by challenge (in clear) and proof (over HTTPS),
//! heartbeats and catalogue long-polls over HTTPS, sent straight to the region's API from a
//! source address of the caller's choice, for tests that need hundreds of racks or one exact
//! request. It takes whatever certificate the region shows (see `loopback::client_from`); what a
//! real rack trusts is tested with `rackd` itself (`tests/tls.rs`).

use std::net::IpAddr;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use metalrack_api::images::RackCatalogue;
use metalrack_api::power::{PowerRequest, PowerResult};
use metalrack_api::{
    paths, rack_authorization, registration_proof, ChallengeRequest, ChallengeResponse, HeartbeatRequest,
    HeartbeatResponse, RegisterRequest, RegisterResponse, Secret, API_PREFIX, REGISTRATION_PROOF_VERSION,
};

/// How long a registration or heartbeat may take before the rack gives up on it.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// How much longer than the wait it asked for a rack gives a catalogue long-poll.
const POLL_TIMEOUT_MARGIN: Duration = Duration::from_secs(10);

/// A registered rack: its credential and an HTTP client bound to its source address.
#[derive(Debug, Clone)]
pub struct RackClient {
    http: reqwest::Client,
    /// `https://HOST:PORT/MAAS/api/v1`.
    base: String,
    pub name: String,
    pub rack_id: String,
    authorization: String,
}

/// `POST /racks/challenge` for `name` with `http`: the region's answer as it is, refusals too.
pub async fn request_challenge(http: &reqwest::Client, region_url: &str, name: &str) -> Result<reqwest::Response> {
    let url = format!("{region_url}{API_PREFIX}{}", paths::RACK_CHALLENGE);
    let request = http.post(url).timeout(REQUEST_TIMEOUT).json(&ChallengeRequest { name: name.to_owned() });
    request.send().await.context("challenge request")
}

/// Asks for a challenge and answers it with a proof under `secret` (right or wrong): the
/// region's answer to the registration as it is.
pub async fn attempt_registration(
    http: &reqwest::Client,
    region_url: &str,
    name: &str,
    secret: &Secret,
) -> Result<reqwest::Response> {
    let response = request_challenge(http, region_url, name).await?;
    let status = response.status();
    ensure!(status.is_success(), "challenge for {name}: {status}: {}", response.text().await.unwrap_or_default());
    let ChallengeResponse { nonce, certificate_sha256 } = response.json().await.context("challenge answer")?;
    let fingerprint: [u8; 32] = hex::decode(certificate_sha256.context("the challenge names no certificate")?)
        .ok()
        .and_then(|bytes| bytes.try_into().ok())
        .context("the certificate fingerprint is 32 bytes of hex")?;
    let proof = registration_proof(secret, &hex::decode(&nonce).context("nonce is hex")?, &fingerprint, name);
    let register = RegisterRequest {
        name: name.to_owned(),
        nonce,
        proof: hex::encode(proof),
        proof_version: REGISTRATION_PROOF_VERSION,
    };
    let url = format!("{}{API_PREFIX}{}", https(region_url), paths::RACK_REGISTER);
    http.post(url).timeout(REQUEST_TIMEOUT).json(&register).send().await.context("register request")
}

/// The region's URL over TLS: the same port serves both.
fn https(region_url: &str) -> String {
    region_url.replacen("http://", "https://", 1)
}

impl RackClient {
    /// Registers rack `name` with the region at `region_url` (`http://HOST:PORT/MAAS`) from
    /// `source`, proving it knows `secret`.
    pub async fn register(region_url: &str, secret: &str, name: &str, source: IpAddr) -> Result<RackClient> {
        let http = crate::loopback::client_from(source);
        let secret = Secret::parse(secret).context("the region's secret")?;
        let response = attempt_registration(&http, region_url, name, &secret).await?;
        let status = response.status();
        ensure!(status.is_success(), "register {name}: {status}: {}", response.text().await.unwrap_or_default());
        let registered: RegisterResponse = response.json().await.context("registration answer")?;
        Ok(RackClient {
            http,
            base: format!("{}{API_PREFIX}", https(region_url)),
            name: name.to_owned(),
            authorization: rack_authorization(&registered.rack_id, &registered.credential),
            rack_id: registered.rack_id,
        })
    }

    /// One heartbeat with empty health.
    pub async fn heartbeat(&self) -> Result<HeartbeatResponse> {
        self.heartbeat_with(&HeartbeatRequest { health: Default::default(), sync: None }).await
    }

    /// One heartbeat carrying `request` (health figures, a sync report).
    pub async fn heartbeat_with(&self, request: &HeartbeatRequest) -> Result<HeartbeatResponse> {
        let response = self
            .http
            .post(format!("{}{}", self.base, paths::RACK_HEARTBEAT))
            .header("authorization", &self.authorization)
            .timeout(REQUEST_TIMEOUT)
            .json(request)
            .send()
            .await
            .context("heartbeat")?;
        let status = response.status();
        ensure!(status.is_success(), "heartbeat of {}: {status}: {}", self.name, response.text().await?);
        response.json().await.context("heartbeat answer")
    }

    /// `POST /rack/events` with `events` (JSON, as the rack's queue would send them); the status.
    pub async fn send_boot_events(&self, events: &serde_json::Value) -> Result<reqwest::StatusCode> {
        let response = self
            .http
            .post(format!("{}{}", self.base, paths::RACK_EVENTS))
            .header("authorization", &self.authorization)
            .timeout(REQUEST_TIMEOUT)
            .json(events)
            .send()
            .await
            .context("boot events")?;
        Ok(response.status())
    }

    /// The power long-poll (`GET /rack/power?wait_ms=`): this rack's power requests, held up to
    /// `wait` while there are none.
    pub async fn power_requests(&self, wait: Duration) -> Result<Vec<PowerRequest>> {
        let response = self
            .http
            .get(format!("{}{}?wait_ms={}", self.base, paths::RACK_POWER, wait.as_millis()))
            .header("authorization", &self.authorization)
            .timeout(wait + POLL_TIMEOUT_MARGIN)
            .send()
            .await
            .context("power poll")?;
        let status = response.status();
        ensure!(status.is_success(), "power poll of {}: {status}: {}", self.name, response.text().await?);
        response.json().await.context("power poll answer")
    }

    /// `POST /rack/power` with `result`; the status.
    pub async fn power_result(&self, result: &PowerResult) -> Result<reqwest::StatusCode> {
        let response = self
            .http
            .post(format!("{}{}", self.base, paths::RACK_POWER))
            .header("authorization", &self.authorization)
            .timeout(REQUEST_TIMEOUT)
            .json(result)
            .send()
            .await
            .context("power result")?;
        Ok(response.status())
    }

    /// The catalogue long-poll: answers at once unless the region is at revision `after` with
    /// sync request counter `requested`, else when something changes or `wait` passes.
    pub async fn catalogue(&self, after: i64, requested: i64, wait: Duration) -> Result<RackCatalogue> {
        self.catalogue_since(after, requested, None, wait).await
    }

    /// [`RackClient::catalogue`] naming the region's change count of the last answer, as rackd
    /// does (`RackCatalogue::changes_seen`).
    pub async fn catalogue_since(
        &self,
        after: i64,
        requested: i64,
        changes_seen: Option<u64>,
        wait: Duration,
    ) -> Result<RackCatalogue> {
        let mut query = format!("?after={after}&requested={requested}&wait_ms={}", wait.as_millis());
        if let Some(changes) = changes_seen {
            query.push_str(&format!("&changes={changes}"));
        }
        let response = self
            .http
            .get(format!("{}{}{query}", self.base, paths::RACK_CATALOGUE))
            .header("authorization", &self.authorization)
            .timeout(wait + POLL_TIMEOUT_MARGIN)
            .send()
            .await
            .context("catalogue poll")?;
        let status = response.status();
        ensure!(status.is_success(), "catalogue poll of {}: {status}: {}", self.name, response.text().await?);
        response.json().await.context("catalogue answer")
    }
}
