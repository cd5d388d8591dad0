//! The rack's configuration file (TOML): every setting, its unit and its default.

use std::path::Path;

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RackConfig {
    /// Heartbeat period. Unset (the default): the period the region asks for in its answers, so
    /// one region setting governs every rack.
    pub heartbeat_interval_ms: Option<u64>,
    /// Longest wait between attempts while the region is unreachable or refuses the rack. Retries
    /// back off from the heartbeat period up to this. Default 60000 ms: a region back from an
    /// outage sees every rack within a minute, and 1000 racks retry at most ~17 times a second.
    pub retry_backoff_max_ms: u64,
    /// Deadline for any one request to the region. Default 10000 ms.
    pub region_request_timeout_ms: u64,
}

impl Default for RackConfig {
    fn default() -> Self {
        RackConfig { heartbeat_interval_ms: None, retry_backoff_max_ms: 60_000, region_request_timeout_ms: 10_000 }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}")]
    Read { path: String, source: std::io::Error },
    #[error("config file {path} is invalid")]
    Parse { path: String, source: toml::de::Error },
    #[error("config file {path}: {problem}")]
    Invalid { path: String, problem: &'static str },
}

impl RackConfig {
    pub fn load(path: &Path) -> Result<RackConfig, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: name.clone(), source })?;
        let config: RackConfig =
            toml::from_str(&text).map_err(|source| ConfigError::Parse { path: name.clone(), source })?;
        if config.heartbeat_interval_ms == Some(0) {
            return Err(ConfigError::Invalid { path: name, problem: "heartbeat_interval_ms must be above 0" });
        }
        if config.region_request_timeout_ms == 0 || config.retry_backoff_max_ms == 0 {
            return Err(ConfigError::Invalid {
                path: name,
                problem: "region_request_timeout_ms and retry_backoff_max_ms must be above 0",
            });
        }
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shipped_example_parses_and_matches_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/examples/rack.toml");
        assert_eq!(RackConfig::load(&path).unwrap(), RackConfig::default());
    }

    #[test]
    fn unknown_keys_are_refused() {
        assert!(toml::from_str::<RackConfig>("heartbeat_ms = 5").is_err());
    }
}
