//! The Redfish driver: `ComputerSystem.Reset` for power, `PowerState` for queries, and a
//! `PATCH` of `Boot` (with the system's etag in `If-Match`) for the next boot device, over HTTPS
//! (or HTTP for a lab BMC) with Basic auth.

use std::sync::Arc;
use std::time::Duration;

use metalrack_api::power::{BootDevice, PowerState};
use metalrack_api::tls_pin::{client_config, RegionTrust};
use reqwest::StatusCode;
use serde_json::{json, Value};
use tokio::sync::OnceCell;

use super::PowerControl;

/// Deadline of one HTTP request to a BMC. BMCs are slow (a reset may take seconds to answer on
/// real hardware) but a minute of silence is a dead one.
pub const REDFISH_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// Deadline to connect to a BMC: on a rack-local network a connection is milliseconds away.
pub const REDFISH_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Largest response body read from a BMC. A `ComputerSystem` with vendor (OEM) sections is tens
/// of KiB; anything past this is not an answer we can use, and is not read into memory.
pub const REDFISH_RESPONSE_BYTES_MAX: usize = 1024 * 1024;

/// Longest BMC message quoted in an error: enough for a Redfish error's message.
const BMC_MESSAGE_BYTES_MAX: usize = 256;

/// Where every Redfish service lists its systems.
const SYSTEMS_PATH: &str = "/redfish/v1/Systems";

#[derive(Debug, thiserror::Error)]
pub enum RedfishError {
    #[error("the Redfish address {address:?} is not http(s)://HOST[:PORT]")]
    Address { address: String },
    #[error("cannot build an HTTP client")]
    Client { source: reqwest::Error },
    #[error("{what}: {method} {url} failed")]
    Request { what: &'static str, method: &'static str, url: String, source: reqwest::Error },
    #[error("{what}: {method} {url} answered {status}: {message}")]
    Status { what: &'static str, method: &'static str, url: String, status: StatusCode, message: String },
    #[error("{what}: the answer of {url} is larger than {REDFISH_RESPONSE_BYTES_MAX} bytes")]
    ResponseTooLarge { what: &'static str, url: String },
    #[error("{what}: the answer of {url} is not JSON")]
    Json { what: &'static str, url: String, source: serde_json::Error },
    #[error("the BMC lists no system at {url}")]
    NoSystem { url: String },
    #[error("the BMC's system link {path:?} is not a path on the BMC")]
    SystemPath { path: String },
    #[error("the system at {url} has no PowerState")]
    NoPowerState { url: String },
    #[error("the system at {url} changed under each of two PATCHes (412 twice)")]
    EtagKeptChanging { url: String },
}

/// One BMC over Redfish. Built per request: its TLS trust is that machine's setting.
pub struct RedfishDriver {
    client: reqwest::Client,
    /// `scheme://host[:port]`, no trailing slash.
    base: String,
    username: String,
    password: String,
    system_id: Option<String>,
    /// The system's path, found once per driver.
    system_path: OnceCell<String>,
}

impl std::fmt::Debug for RedfishDriver {
    // The password never reaches a log.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedfishDriver")
            .field("base", &self.base)
            .field("username", &self.username)
            .field("system_id", &self.system_id)
            .finish_non_exhaustive()
    }
}

/// The TLS client config for a BMC.
///
/// With `trust_self_signed`, any certificate is accepted (the handshake's signature is still
/// checked): most BMCs ship a self-signed certificate made on first boot, which no authority
/// vouches for and which the rack cannot know in advance. That gives up authenticating the BMC
/// (someone on the BMC network could pose as it and learn its password), so it happens only when
/// the operator chose it for that machine; the BMC network is rack-local and usually isolated.
/// Otherwise the certificate must chain to a public CA (webpki's roots) and name the host.
fn tls_config(trust_self_signed: bool) -> rustls::ClientConfig {
    if trust_self_signed {
        // The wire contract's accept-any verifier (it serves the region's registration challenge
        // too), rather than a second copy of one.
        return client_config(RegionTrust::NothingYet);
    }
    let roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports the default TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth()
}

impl RedfishDriver {
    /// A driver for the BMC at `address` (`https://HOST[:PORT]` or `http://…`).
    pub fn new(
        address: &str,
        username: &str,
        password: &str,
        system_id: Option<&str>,
        trust_self_signed: bool,
    ) -> Result<RedfishDriver, RedfishError> {
        let base = address.trim_end_matches('/');
        let rest = base.strip_prefix("https://").or_else(|| base.strip_prefix("http://"));
        if rest.is_none_or(|host| host.is_empty() || host.contains(['/', '?', '#', '@'])) {
            return Err(RedfishError::Address { address: address.to_string() });
        }
        let client = reqwest::Client::builder()
            .use_preconfigured_tls(tls_config(trust_self_signed))
            // A redirect could carry the credentials elsewhere; BMCs answer where they are asked.
            .redirect(reqwest::redirect::Policy::none())
            .timeout(REDFISH_REQUEST_TIMEOUT)
            .connect_timeout(REDFISH_CONNECT_TIMEOUT)
            .user_agent(concat!("rackd/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|source| RedfishError::Client { source })?;
        Ok(RedfishDriver {
            client,
            base: base.to_string(),
            username: username.to_string(),
            password: password.to_string(),
            system_id: system_id.map(str::to_string),
            system_path: OnceCell::new(),
        })
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    /// Sends `request` (credentials added) and reads a bounded body; non-2xx is an error with the
    /// BMC's message. Returns the headers and the body.
    async fn send(
        &self,
        what: &'static str,
        method: &'static str,
        url: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<(reqwest::header::HeaderMap, Vec<u8>), RedfishError> {
        let request_error = |source| RedfishError::Request { what, method, url: url.to_string(), source };
        let mut response =
            request.basic_auth(&self.username, Some(&self.password)).send().await.map_err(request_error)?;
        let mut body = Vec::new();
        while let Some(chunk) = response.chunk().await.map_err(request_error)? {
            if body.len() + chunk.len() > REDFISH_RESPONSE_BYTES_MAX {
                return Err(RedfishError::ResponseTooLarge { what, url: url.to_string() });
            }
            body.extend_from_slice(&chunk);
        }
        let status = response.status();
        if !status.is_success() {
            let message = bmc_message(&body);
            return Err(RedfishError::Status { what, method, url: url.to_string(), status, message });
        }
        Ok((response.headers().clone(), body))
    }

    async fn get_json(
        &self,
        what: &'static str,
        path: &str,
    ) -> Result<(reqwest::header::HeaderMap, Value), RedfishError> {
        let url = self.url(path);
        let (headers, body) = self.send(what, "GET", &url, self.client.get(&url)).await?;
        let value = serde_json::from_slice(&body).map_err(|source| RedfishError::Json { what, url, source })?;
        Ok((headers, value))
    }

    /// The system's path: `Systems/{system_id}`, or the first member of `Systems`.
    async fn system_path(&self) -> Result<&str, RedfishError> {
        self.system_path
            .get_or_try_init(|| async {
                if let Some(id) = &self.system_id {
                    return Ok(format!("{SYSTEMS_PATH}/{id}"));
                }
                let (_, systems) = self.get_json("list the BMC's systems", SYSTEMS_PATH).await?;
                let path = systems["Members"][0]["@odata.id"]
                    .as_str()
                    .ok_or_else(|| RedfishError::NoSystem { url: self.url(SYSTEMS_PATH) })?;
                // The link names a resource of this BMC: an absolute path, never another host.
                if !path.starts_with('/') || path.starts_with("//") || path.contains(['?', '#']) {
                    return Err(RedfishError::SystemPath { path: path.chars().take(BMC_MESSAGE_BYTES_MAX).collect() });
                }
                Ok(path.trim_end_matches('/').to_string())
            })
            .await
            .map(String::as_str)
    }

    async fn reset(&self, reset_type: &'static str) -> Result<(), RedfishError> {
        let path = format!("{}/Actions/ComputerSystem.Reset", self.system_path().await?);
        let url = self.url(&path);
        let request = self.client.post(&url).json(&json!({ "ResetType": reset_type }));
        self.send(reset_action_name(reset_type), "POST", &url, request).await.map(|_| ())
    }

    /// The system and its etag (the `ETag` header, else `@odata.etag`).
    async fn system(&self, what: &'static str) -> Result<(Value, Option<String>), RedfishError> {
        let path = self.system_path().await?.to_string();
        let (headers, system) = self.get_json(what, &path).await?;
        let etag = headers
            .get(reqwest::header::ETAG)
            .and_then(|value| value.to_str().ok())
            .map(str::to_string)
            .or_else(|| system["@odata.etag"].as_str().map(str::to_string));
        Ok((system, etag))
    }

    async fn patch_boot(&self, target: &'static str, etag: Option<&str>) -> Result<(), RedfishError> {
        let path = self.system_path().await?.to_string();
        let url = self.url(&path);
        let body = json!({ "Boot": { "BootSourceOverrideTarget": target, "BootSourceOverrideEnabled": "Once" } });
        let mut request = self.client.patch(&url).json(&body);
        if let Some(etag) = etag {
            request = request.header(reqwest::header::IF_MATCH, etag);
        }
        self.send("set the next boot device", "PATCH", &url, request).await.map(|_| ())
    }
}

fn reset_action_name(reset_type: &'static str) -> &'static str {
    match reset_type {
        "On" => "power on (Reset On)",
        "ForceOff" => "power off (Reset ForceOff)",
        "ForceRestart" => "power cycle (Reset ForceRestart)",
        _ => "reset",
    }
}

/// The BMC's own words from an error body: the Redfish error's message (or its first extended
/// message), else the start of the body; cut to [`BMC_MESSAGE_BYTES_MAX`].
fn bmc_message(body: &[u8]) -> String {
    let parsed: Option<Value> = serde_json::from_slice(body).ok();
    let message = parsed.as_ref().and_then(|value| {
        let error = &value["error"];
        error["@Message.ExtendedInfo"][0]["Message"].as_str().or_else(|| error["message"].as_str()).map(str::to_string)
    });
    let text = message.unwrap_or_else(|| String::from_utf8_lossy(body).into_owned());
    let text: String = text.chars().filter(|c| !c.is_control()).collect();
    let mut end = text.len().min(BMC_MESSAGE_BYTES_MAX);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    if text.is_empty() {
        return "(no message)".to_string();
    }
    text[..end].to_string()
}

/// A Redfish `PowerState` as ours: the transitions count as where they lead.
fn power_state(value: &Value) -> Option<PowerState> {
    Some(match value.as_str()? {
        "On" | "PoweringOn" => PowerState::On,
        "Off" | "PoweringOff" => PowerState::Off,
        _ => PowerState::Unknown,
    })
}

impl PowerControl for RedfishDriver {
    type Error = RedfishError;
    const CONFIRMS_POWER: bool = true;

    async fn power_on(&self) -> Result<(), RedfishError> {
        // Some BMCs refuse a reset into the state the machine is in (409 "already on"): look first.
        if self.query().await? == PowerState::On {
            return Ok(());
        }
        self.reset("On").await
    }

    async fn power_off(&self) -> Result<(), RedfishError> {
        if self.query().await? == PowerState::Off {
            return Ok(());
        }
        self.reset("ForceOff").await
    }

    async fn power_cycle(&self) -> Result<(), RedfishError> {
        // ForceRestart of a machine that is off is refused by some BMCs: power it on instead.
        match self.query().await? {
            PowerState::Off => self.reset("On").await,
            _ => self.reset("ForceRestart").await,
        }
    }

    async fn query(&self) -> Result<PowerState, RedfishError> {
        let (system, _) = self.system("read the power state").await?;
        power_state(&system["PowerState"]).ok_or_else(|| RedfishError::NoPowerState { url: self.base.clone() })
    }

    async fn set_next_boot(&self, device: BootDevice) -> Result<(), RedfishError> {
        let target = match device {
            BootDevice::Pxe => "Pxe",
            BootDevice::Disk => "Hdd",
        };
        let (_, etag) = self.system("read the system's etag").await?;
        match self.patch_boot(target, etag.as_deref()).await {
            // The system changed between the read and the patch (its power state, say): once more
            // with the new etag; a second 412 means it keeps changing, which is an error.
            Err(RedfishError::Status { status: StatusCode::PRECONDITION_FAILED, url, .. }) => {
                let (_, etag) = self.system("read the system's etag again").await?;
                match self.patch_boot(target, etag.as_deref()).await {
                    Err(RedfishError::Status { status: StatusCode::PRECONDITION_FAILED, .. }) => {
                        Err(RedfishError::EtagKeptChanging { url })
                    }
                    other => other,
                }
            }
            other => other,
        }
    }
}

#[cfg(test)]
mod tests;
