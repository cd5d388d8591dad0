//! The region's configuration file (TOML): every setting, its unit and its default.

use std::net::SocketAddr;
use std::path::Path;

use serde::Deserialize;

/// How often the racks' buffered heartbeats are written, all in one transaction (see
/// `db::heartbeats`). 1 s: 1,000 racks at one heartbeat per 5 s cost one commit a second
/// instead of 200, while a crash loses at most a second of `last_seen_ms` (the racks' next
/// heartbeats restore it). Not configurable: [`RegionConfig::check`] requires
/// `rack_offline_after_ms` to exceed the heartbeat interval plus this, so the metrics' rack
/// counts (read from the database, not through the buffer) never show a heartbeating rack
/// offline.
pub const HEARTBEAT_FLUSH_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegionConfig {
    /// Address of the HTTP server (UI under /MAAS/, API under /MAAS/api/v1/). Default 0.0.0.0:5240,
    /// the port MAAS uses, so operators' firewalls and habits carry over.
    pub listen: SocketAddr,
    /// The URL racks use to reach this region, shown in "Add rack controller". Default: built from
    /// the listen address (this machine's hostname when listening on every address).
    pub public_url: Option<String>,
    /// Host names and addresses the region's generated TLS certificate names, beside
    /// `localhost`, the loopback addresses, this machine's hostname and the listen address.
    /// Default none. Racks pin the certificate whatever it names; browsers and curl check the
    /// names. Read when the certificate is made (first start, or after `DATA/tls/` is removed).
    pub tls_names: Vec<String>,
    /// How often racks send heartbeats. Default 5000 ms: a dead rack shows within seconds while
    /// 1000 racks cost the region 200 small requests per second.
    pub rack_heartbeat_interval_ms: u64,
    /// A rack silent for this long shows offline (longer than the heartbeat interval plus
    /// [`HEARTBEAT_FLUSH_INTERVAL`]). Default 30000 ms: six missed heartbeats, so a
    /// restart or a short network blip does not flap the UI.
    pub rack_offline_after_ms: u64,
    /// How long a UI session lasts. Default 14 days.
    pub session_lifetime_ms: u64,
    /// Largest body of one chunk-upload request. Default 64 MiB: big enough that per-request
    /// overhead is noise, small enough that a failed request costs little to resend.
    pub upload_batch_bytes_max: u64,
    /// Deploys that run at once on one rack; more wait in the order they were asked for.
    /// Default 50: each deploy streams an image from the rack, and 50 at ~100 MB/s each fill a
    /// 40 Gbit/s uplink.
    pub deploys_per_rack_max: u32,
    /// How often the power state of machines with a BMC is queried. Default 120 s: a BMC
    /// answers in a second or two, and 1,000 machines then cost ~8 queries per second.
    pub power_poll_interval_s: u64,
    /// A commissioning, deploy or release with no report from its machine for this long
    /// fails. Default 1800 s: a slow disk writing a large image reports progress every few
    /// seconds, while a machine that never booted the deploy environment reports nothing.
    pub stall_timeout_s: u64,
    /// The image (and its arch) whose newest version with `kernel` and `initrd` files is the
    /// deploy environment machines boot to enlist, commission, deploy and release. Default
    /// `metalrack/deploy-env`, `amd64`: what `imgtool deploy-env build --push` pushes.
    pub deploy_env_image: String,
    pub deploy_env_arch: String,
    /// Kernel parameters the deploy environment boots with. Default `console=ttyS0`, so a
    /// machine's serial console shows the agent.
    pub deploy_env_kernel_params: String,
}

impl Default for RegionConfig {
    fn default() -> Self {
        RegionConfig {
            listen: SocketAddr::from(([0, 0, 0, 0], 5240)),
            public_url: None,
            tls_names: Vec::new(),
            rack_heartbeat_interval_ms: 5_000,
            rack_offline_after_ms: 30_000,
            session_lifetime_ms: 14 * 24 * 3600 * 1000,
            upload_batch_bytes_max: 64 * 1024 * 1024,
            deploys_per_rack_max: 50,
            power_poll_interval_s: 120,
            stall_timeout_s: 1800,
            deploy_env_image: "metalrack/deploy-env".into(),
            deploy_env_arch: "amd64".into(),
            deploy_env_kernel_params: "console=ttyS0".into(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is invalid")]
    Parse { path: String, source: toml::de::Error },
    #[error("config file {path}: {problem}")]
    Invalid { path: String, problem: String },
}

impl RegionConfig {
    pub fn load(path: &Path) -> Result<RegionConfig, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: name.clone(), source })?;
        let config: RegionConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: name.clone(), source })?;
        config.check().map_err(|problem| ConfigError::Invalid { path: name, problem })?;
        Ok(config)
    }

    fn check(&self) -> Result<(), String> {
        if self.rack_heartbeat_interval_ms == 0 {
            return Err("rack_heartbeat_interval_ms must be above 0".into());
        }
        let flush_ms = HEARTBEAT_FLUSH_INTERVAL.as_millis() as u64;
        if self.rack_offline_after_ms <= self.rack_heartbeat_interval_ms.saturating_add(flush_ms) {
            return Err(format!(
                "rack_offline_after_ms must be longer than rack_heartbeat_interval_ms plus {flush_ms} ms (how often \
                 heartbeats are written to the database)"
            ));
        }
        if self.upload_batch_bytes_max < 1024 * 1024 {
            return Err("upload_batch_bytes_max must be at least 1 MiB (one chunk must fit)".into());
        }
        if self.deploys_per_rack_max == 0 {
            return Err("deploys_per_rack_max must be at least 1".into());
        }
        if self.power_poll_interval_s == 0 || self.stall_timeout_s == 0 {
            return Err("power_poll_interval_s and stall_timeout_s must be above 0".into());
        }
        metalrack_api::images::validate_image_name(&self.deploy_env_image)
            .map_err(|e| format!("deploy_env_image: {e}"))?;
        metalrack_api::images::validate_image_token("arch", &self.deploy_env_arch)
            .map_err(|e| format!("deploy_env_arch: {e}"))?;
        if self.deploy_env_kernel_params.len() > 1024 || self.deploy_env_kernel_params.chars().any(char::is_control) {
            return Err("deploy_env_kernel_params must be one line of at most 1024 characters".into());
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                return Err(format!("public_url {url:?} must start with http:// or https://"));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/region.toml");
        let config = RegionConfig::load(&path).unwrap();
        assert_eq!(config, RegionConfig::default());
    }

    #[test]
    fn unknown_keys_are_refused() {
        let err = toml::from_str::<RegionConfig>("listne = \"0.0.0.0:1\"").unwrap_err();
        assert!(err.to_string().contains("listne"), "{err}");
    }

    #[test]
    fn offline_threshold_must_exceed_interval() {
        let config =
            RegionConfig { rack_offline_after_ms: 1000, rack_heartbeat_interval_ms: 1000, ..Default::default() };
        assert!(config.check().is_err());
    }

    #[test]
    fn offline_threshold_must_exceed_interval_plus_the_heartbeat_flush_interval() {
        let flush_ms = HEARTBEAT_FLUSH_INTERVAL.as_millis() as u64;
        let config = RegionConfig {
            rack_heartbeat_interval_ms: 1000,
            rack_offline_after_ms: 1000 + flush_ms,
            ..Default::default()
        };
        assert!(config.check().unwrap_err().contains("plus"));
        let config = RegionConfig { rack_offline_after_ms: 1001 + flush_ms, ..config };
        config.check().unwrap();
    }
}
