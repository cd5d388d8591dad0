//! The saved login (`metalrack login URL KEY`): the region's URL, the API key and how to trust
//! the region's certificate, in a TOML file only its owner can read.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use metalrack_imgtool::tls::RegionCertificate;
use serde::{Deserialize, Serialize};

/// What `login` saves.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Login {
    /// `https://REGION:5240/MAAS`.
    pub url: String,
    pub api_key: String,
    #[serde(default)]
    pub ca_cert: Option<PathBuf>,
    #[serde(default)]
    pub region_cert_sha256: Option<String>,
}

impl std::fmt::Debug for Login {
    // The API key is a password: never in a log or a panic message.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Login").field("url", &self.url).finish_non_exhaustive()
    }
}

impl Login {
    pub fn certificate(&self) -> anyhow::Result<RegionCertificate> {
        RegionCertificate::from_options(self.ca_cert.clone(), self.region_cert_sha256.as_deref())
    }
}

/// Where the login lives: `--login-file`, `$METALRACK_LOGIN_FILE`, else
/// `$XDG_CONFIG_HOME/metalrack/login.toml` (`~/.config/metalrack/login.toml`).
pub fn default_path() -> anyhow::Result<PathBuf> {
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME").filter(|d| !d.is_empty()) {
        return Ok(PathBuf::from(dir).join("metalrack/login.toml"));
    }
    let Some(home) = std::env::var_os("HOME").filter(|h| !h.is_empty()) else {
        bail!("neither XDG_CONFIG_HOME nor HOME is set: give --login-file FILE");
    };
    Ok(PathBuf::from(home).join(".config/metalrack/login.toml"))
}

pub fn load(path: &Path) -> anyhow::Result<Login> {
    let text = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("not logged in ({} does not exist): run 'metalrack login URL API_KEY' first", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("cannot read {}", path.display())),
    };
    toml::from_str(&text).with_context(|| format!("{} is not a metalrack login file", path.display()))
}

pub fn save(path: &Path, login: &Login) -> anyhow::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).with_context(|| format!("cannot create {}", parent.display()))?;
    }
    let text = toml::to_string(login).expect("a login serializes");
    metalrack_image_tools::private_file::write_private_file(path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}
