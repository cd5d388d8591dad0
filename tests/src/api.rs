//! The region's JSON API as one user (by API key), with the wire types of `metalrack-api`: what
//! tests and benchmarks read and change through it (racks, sync policies, images, machines,
//! events).

use anyhow::{ensure, Context, Result};
use metalrack_api::images::{ImageView, SyncPolicy, VersionSyncStatus};
use metalrack_api::machines::{MachinePage, MachineView};
use metalrack_api::{paths, EventView, RackPage, RackView, API_PREFIX, RACK_PAGE_MAX};
use serde::Serialize;

#[derive(Debug, Clone)]
pub struct Api {
    http: reqwest::Client,
    /// `https://HOST:PORT/MAAS/api/v1`; paths below it come from the wire contract's `paths`.
    base: String,
    pub key: String,
}

impl Api {
    /// The API of the region at `region_url` (`https://HOST:PORT/MAAS`) as the owner of `key`,
    /// over `http` (a client that trusts the region's certificate: `Region::https_client`).
    pub fn new(http: reqwest::Client, region_url: &str, key: &str) -> Api {
        Api { http, base: format!("{region_url}{API_PREFIX}"), key: key.to_owned() }
    }

    /// A request to `path` (under `/api/v1`) with the key, for what the methods below lack.
    pub fn request(&self, method: reqwest::Method, path: &str) -> reqwest::RequestBuilder {
        self.http.request(method, format!("{}{path}", self.base)).bearer_auth(&self.key)
    }

    /// Sends `request`; an error with the status and the region's reason unless it succeeds.
    async fn send(&self, request: reqwest::RequestBuilder) -> Result<reqwest::Response> {
        let response = request.send().await.context("region API")?;
        let status = response.status();
        ensure!(status.is_success(), "region API: {status}: {}", response.text().await.unwrap_or_default());
        Ok(response)
    }

    async fn get<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        let response = self.send(self.request(reqwest::Method::GET, path)).await?;
        response.json().await.with_context(|| format!("GET {path}: unexpected JSON"))
    }

    async fn put(&self, path: &str, body: &impl Serialize) -> Result<()> {
        self.send(self.request(reqwest::Method::PUT, path).json(body)).await?;
        Ok(())
    }

    /// Every rack, by name: the list's pages of [`RACK_PAGE_MAX`] one after the other.
    pub async fn racks(&self) -> Result<Vec<RackView>> {
        let mut racks = Vec::new();
        loop {
            let page = self.racks_page(racks.len() as u64, RACK_PAGE_MAX).await?;
            let last = page.racks.len() < RACK_PAGE_MAX as usize;
            racks.extend(page.racks);
            if last || racks.len() as u64 >= page.total {
                return Ok(racks);
            }
        }
    }

    /// One page of the rack list (`GET /racks?offset=&limit=`).
    pub async fn racks_page(&self, offset: u64, limit: u32) -> Result<RackPage> {
        self.get(&format!("{}?offset={offset}&limit={limit}", paths::RACKS)).await
    }

    pub async fn rack(&self, name: &str) -> Result<RackView> {
        let racks = self.racks().await?;
        racks.into_iter().find(|r| r.name == name).with_context(|| format!("rack {name} is not listed"))
    }

    pub async fn set_sync_policy(&self, rack_id: &str, policy: &SyncPolicy) -> Result<()> {
        self.put(&paths::rack_sync_policy(rack_id), policy).await
    }

    pub async fn images(&self) -> Result<Vec<ImageView>> {
        self.get(paths::IMAGES).await
    }

    /// Whether rack `rack_name` serves the image version that holds the file `file_hash` (every
    /// file of it), as the region's Images view shows it.
    pub async fn rack_serves_file(&self, rack_name: &str, file_hash: &str) -> Result<bool> {
        let images = self.images().await?;
        Ok(images
            .iter()
            .flat_map(|image| &image.versions)
            .filter(|version| version.files.iter().any(|file| file.file_hash == file_hash))
            .any(|version| {
                version.racks.iter().any(|r| r.rack_name == rack_name && r.status == VersionSyncStatus::Synced)
            }))
    }

    pub async fn image(&self, name: &str) -> Result<ImageView> {
        let images = self.images().await?;
        images.into_iter().find(|i| i.name == name).with_context(|| format!("image {name} is not listed"))
    }

    /// Deletes `version` of image `name`.
    pub async fn delete_version(&self, name: &str, version: &str) -> Result<()> {
        let image = self.image(name).await?;
        self.send(self.request(reqwest::Method::DELETE, &paths::image_version(&image.id, version))).await?;
        Ok(())
    }

    /// Sets what `mac` (any separator) boots: a `MachineUpdate` as JSON.
    pub async fn put_machine(&self, mac: &str, update: &serde_json::Value) -> Result<()> {
        self.put(&paths::machine(&mac.replace(':', "-")), update).await
    }

    /// The first page of machines (up to the page maximum).
    pub async fn machines(&self) -> Result<Vec<MachineView>> {
        let page: MachinePage =
            self.get(&format!("{}?limit={}", paths::MACHINES, metalrack_api::machines::MACHINE_PAGE_MAX)).await?;
        Ok(page.machines)
    }

    /// Machine `key` (id or MAC).
    pub async fn machine(&self, key: &str) -> Result<MachineView> {
        self.get(&paths::machine(key)).await
    }

    /// Adds a machine (`POST /machines`).
    pub async fn add_machine(&self, create: &metalrack_api::machines::MachineCreate) -> Result<MachineView> {
        let response = self.send(self.request(reqwest::Method::POST, paths::MACHINES).json(create)).await?;
        response.json().await.context("POST /machines: unexpected JSON")
    }

    /// One of a machine's actions (`paths::MACHINE_DEPLOY`, ...) with a JSON `body`.
    pub async fn machine_action(&self, template: &str, key: &str, body: &impl Serialize) -> Result<MachineView> {
        let path = paths::machine_path(template, key);
        let response = self.send(self.request(reqwest::Method::POST, &path).json(body)).await?;
        response.json().await.with_context(|| format!("POST {path}: unexpected JSON"))
    }

    /// The region's newest 1000 events.
    pub async fn events(&self) -> Result<Vec<EventView>> {
        self.get(&format!("{}?limit=1000", paths::EVENTS)).await
    }
}
