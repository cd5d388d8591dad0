//! Calls to the region's API over HTTPS, with the saved login's key and trust.

use std::time::Duration;

use anyhow::{bail, Context};
use metalrack_api::images::ImageView;
use metalrack_api::machines::{MachinePage, MachineView};
use metalrack_api::{paths, ErrorBody, EventView, API_PREFIX};
use metalrack_imgtool::tls::{https_base, RegionCertificate};
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::login::Login;

/// Longer than any machine id or MAC (17 characters): longer keys are typos.
const MACHINE_KEY_LEN_MAX: usize = 64;

/// A call that takes longer has a region in trouble; say so rather than hang a script.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

pub struct Client {
    http: reqwest::blocking::Client,
    /// `https://REGION:5240/MAAS/api/v1`.
    api: String,
    authorization: String,
    certificate: RegionCertificate,
}

impl Client {
    pub fn new(login: &Login) -> anyhow::Result<Client> {
        let base = https_base(&login.url)?;
        let certificate = login.certificate()?;
        let http = reqwest::blocking::Client::builder()
            .use_preconfigured_tls(certificate.client_config()?)
            // A redirect could lead the API key to another host; the region never redirects the API.
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .timeout(REQUEST_TIMEOUT)
            .user_agent(concat!("metalrack/", env!("CARGO_PKG_VERSION")))
            .build()?;
        Ok(Client {
            http,
            api: format!("{base}{API_PREFIX}"),
            authorization: format!("Bearer {}", login.api_key),
            certificate,
        })
    }

    fn send(
        &self,
        request: reqwest::blocking::RequestBuilder,
        what: &str,
    ) -> anyhow::Result<reqwest::blocking::Response> {
        let response = request.header("authorization", &self.authorization).send().map_err(|error| {
            match self.certificate.refusal(&error) {
                Some(refusal) => anyhow::anyhow!("{}: {refusal}", self.api),
                None => anyhow::Error::new(error).context(format!("cannot reach the region at {}", self.api)),
            }
        })?;
        let status = response.status();
        if status.is_success() {
            return Ok(response);
        }
        let body = response.text().unwrap_or_default();
        match serde_json::from_str::<ErrorBody>(&body) {
            Ok(error) => bail!("{what}: the region refused ({status}): {}", error.error),
            Err(_) => bail!("{what}: the region answered {status}"),
        }
    }

    fn get<T: DeserializeOwned>(&self, path: &str, what: &str) -> anyhow::Result<T> {
        let response = self.send(self.http.get(format!("{}{path}", self.api)), what)?;
        response.json().with_context(|| format!("{what}: the region's answer is not what this metalrack expects"))
    }

    fn post<B: Serialize>(&self, path: &str, body: &B, what: &str) -> anyhow::Result<()> {
        self.send(self.http.post(format!("{}{path}", self.api)).json(body), what).map(drop)
    }

    pub fn account(&self) -> anyhow::Result<metalrack_api::AccountView> {
        self.get(paths::ACCOUNT, "checking the login")
    }

    pub fn machines(&self, state: Option<&str>, offset: u64, limit: u32) -> anyhow::Result<MachinePage> {
        let mut path = format!("{}?offset={offset}&limit={limit}", paths::MACHINES);
        if let Some(state) = state {
            path.push_str(&format!("&state={state}"));
        }
        self.get(&path, "listing machines")
    }

    pub fn machine(&self, machine: &str) -> anyhow::Result<MachineView> {
        self.get(&paths::machine(segment(machine)?), &format!("reading machine {machine}"))
    }

    pub fn add(&self, create: &metalrack_api::machines::MachineCreate) -> anyhow::Result<()> {
        self.post(paths::MACHINES, create, "adding the machine")
    }

    /// Posts to one of a machine's action paths (`paths::MACHINE_DEPLOY`, ...).
    pub fn act<B: Serialize>(&self, template: &str, machine: &str, body: &B, what: &str) -> anyhow::Result<()> {
        self.post(&paths::machine_path(template, segment(machine)?), body, &format!("{what} {machine}"))
    }

    pub fn delete(&self, machine: &str) -> anyhow::Result<()> {
        let url = format!("{}{}", self.api, paths::machine(segment(machine)?));
        self.send(self.http.delete(url), &format!("deleting {machine}")).map(drop)
    }

    pub fn events(&self, machine: &str) -> anyhow::Result<Vec<EventView>> {
        self.get(&paths::machine_path(paths::MACHINE_EVENTS, segment(machine)?), &format!("reading {machine}'s events"))
    }

    pub fn images(&self) -> anyhow::Result<Vec<ImageView>> {
        self.get(paths::IMAGES, "listing images")
    }
}

/// A machine id or MAC as one path segment (MACs keep their colons). Anything else is refused
/// rather than dropped: `ab/cd1234` must not quietly become another machine's id `abcd1234`.
fn segment(machine: &str) -> anyhow::Result<&str> {
    let fits = |c: char| c.is_ascii_alphanumeric() || matches!(c, ':' | '-' | '_' | '.');
    if machine.is_empty()
        || machine.len() > MACHINE_KEY_LEN_MAX
        || !machine.chars().all(fits)
        || machine.starts_with('.')
    {
        bail!("{machine:?} is not a machine: give its id (8 letters and digits) or its MAC (aa:bb:cc:dd:ee:ff)");
    }
    Ok(machine)
}
