//! The rack under test and its image: `imgtool push` into the region, and a registered rack
//! serving PXE on the lab's bridge, both inside the rack's lab.

use std::path::Path;

use anyhow::{ensure, Result};
use metalrack_hardware::Lab;
use metalrack_tests::process::{self, Spawn};
use metalrack_tests::rack::Rack;
use metalrack_tests::region::Region;

use crate::{IMAGE, RACKD_HTTP_PORT, RACK_LAB};

/// Pushes `file` as the `kind` file of version 1 of [`IMAGE`].
pub fn push(lab: &Lab, region: &Region, api_key: &str, file: &Path, kind: &str) -> Result<()> {
    let output = process::run(region.push_command(api_key, file, IMAGE, kind, "1")?, Some(lab))?;
    let text = String::from_utf8_lossy(&output.stdout);
    ensure!(text.contains("committed"), "imgtool push did not commit: {text}");
    Ok(())
}

/// Registers the rack `bench` and starts `rackd serve` with PXE on the lab's bridge: HTTP boot
/// on port 5248, TFTP on 69, DHCP managed with a pool of 4081 addresses; the rest defaults,
/// except the per-client limits: every bench client connects from the same address, which the
/// defaults (8 HTTP streams, 4 TFTP transfers per address) would refuse past the first few.
pub fn start_rack(lab: &Lab, region: &Region, secret: &str, work: &Path) -> Result<Rack> {
    let mut rack = Rack::new(work, "bench");
    rack.register_checked(&region.url, secret, Some(lab))?;
    let loaders = work.join("loaders");
    std::fs::create_dir_all(&loaders)?;
    // A stand-in loader: rackd only needs one to start, and nothing here boots.
    std::fs::write(loaders.join("undionly.kpxe"), vec![0x55u8; 70_000])?;
    let [a, b, _] = RACK_LAB;
    let config = format!(
        "retry_backoff_max_ms = 400\n\
         [pxe]\ninterface = \"{bridge}\"\naddress = \"{gateway}\"\nhttp_listen = \"0.0.0.0:{RACKD_HTTP_PORT}\"\n\
         loaders_dir = \"{loaders}\"\nhttp_streams_per_client_max = 1024\n\
         [pxe.tftp]\nlisten = \"0.0.0.0:69\"\nsessions_per_client_max = 256\n\
         [pxe.dhcp]\nmode = \"managed\"\nsubnet_mask = \"255.255.240.0\"\n\
         range_start = \"{a}.{b}.16.10\"\nrange_end = \"{a}.{b}.31.250\"\nrouter = \"{a}.{b}.16.1\"\n",
        bridge = lab.bridge(),
        gateway = lab.gateway(),
        loaders = loaders.display()
    );
    rack.launch(&config, Spawn::in_lab(lab))?;
    Ok(rack)
}
