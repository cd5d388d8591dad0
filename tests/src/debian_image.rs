//! Real Debian system images, two versions of each, built by `tests/debian-images/build.sh`
//! (`mmdebstrap` from the package mirror, then `mke2fs -d`) and cached by recipe: the cache
//! dir's name holds a hash of the script and the profile, so a changed recipe builds anew and an
//! unchanged one is reused (building takes minutes; the images are reproducible).

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

/// The recipe, compiled in: what is hashed is what runs.
const BUILD_SCRIPT: &str = include_str!("../debian-images/build.sh");

/// Which pair of images.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// minbase + the cloud kernel + a few services, 2 GiB ext4 images (a few minutes to build).
    Full,
    /// minbase only, v2 = v1 with one package added, 256 MiB ext4 images (for `./scripts/test`).
    Small,
}

impl Profile {
    pub fn name(self) -> &'static str {
        match self {
            Profile::Full => "full",
            Profile::Small => "small",
        }
    }

    pub fn parse(name: &str) -> Result<Profile> {
        match name {
            "full" => Ok(Profile::Full),
            "small" => Ok(Profile::Small),
            other => bail!("unknown image profile {other:?} (full or small)"),
        }
    }
}

/// Two versions of one Debian system as raw ext4 disk images.
#[derive(Debug, Clone)]
pub struct DebianImages {
    /// The cache dir holding them (also `tree-diff.txt`, `tree-bytes.txt`).
    pub dir: PathBuf,
    pub v1: PathBuf,
    /// v2's tree in a fresh file system (`mke2fs -d`), as an image build pipeline makes it.
    pub v2: PathBuf,
    /// v1's image with v2's tree copied over it in place (fuse2fs), `Full` only, when fuse2fs is
    /// installed: files that did not change keep their blocks.
    pub v2_in_place: Option<PathBuf>,
}

/// The cache key: the first 16 hex digits of BLAKE3(script ‖ profile).
pub fn recipe_key(profile: Profile) -> String {
    let mut hasher = blake3::Hasher::new();
    hasher.update(BUILD_SCRIPT.as_bytes());
    hasher.update(profile.name().as_bytes());
    hasher.finalize().to_hex()[..16].to_owned()
}

/// The images of `profile` under `cache_root/<profile>-<key>/`, built there first if absent.
/// Needs root (`mmdebstrap --mode=root`), `mmdebstrap`, `e2fsprogs`, and for `Full` `fuse2fs`
/// and `rsync`; reaches the Debian mirror configured for apt.
pub fn build_or_reuse(profile: Profile, cache_root: &Path) -> Result<DebianImages> {
    let dir = cache_root.join(format!("{}-{}", profile.name(), recipe_key(profile)));
    let images = |dir: &Path| {
        let in_place = dir.join("v2-inplace.img");
        DebianImages {
            dir: dir.to_owned(),
            v1: dir.join("v1.img"),
            v2: dir.join("v2.img"),
            v2_in_place: in_place.exists().then_some(in_place),
        }
    };
    if dir.join("v1.img").exists() && dir.join("v2.img").exists() {
        return Ok(images(&dir));
    }
    // Built beside, renamed when complete: an interrupted build is never taken for a cached one.
    let building = cache_root.join(format!("{}-{}.building", profile.name(), recipe_key(profile)));
    let _ = std::fs::remove_dir_all(&building);
    std::fs::create_dir_all(&building).with_context(|| format!("creating {}", building.display()))?;
    let script = building.join("build.sh");
    std::fs::write(&script, BUILD_SCRIPT)?;
    let output = Command::new("bash")
        .arg(&script)
        .arg(profile.name())
        .arg(&building)
        .output()
        .context("cannot run bash for tests/debian-images/build.sh")?;
    if !output.status.success() {
        bail!(
            "building the {} Debian images failed ({}); mmdebstrap needs the Debian mirror of \
             /etc/apt/sources.list reachable, root, and `apt-get install mmdebstrap e2fsprogs \
             fuse2fs rsync`:\n{}",
            profile.name(),
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        );
    }
    let _ = std::fs::remove_dir_all(building.join("apt-cache"));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&building, &dir)
        .with_context(|| format!("renaming {} to {}", building.display(), dir.display()))?;
    Ok(images(&dir))
}
