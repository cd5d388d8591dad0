//! Opening an existing tap device (the fleet's one link into its rack's network): the fleet's
//! only `unsafe`, the `TUNSETIFF` ioctl that attaches a `/dev/net/tun` descriptor to the tap.

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;

use nix::libc;

use super::FleetError;

// `TUNSETIFF` is `_IOW('T', 202, int)` but takes a pointer to `struct ifreq` (the kernel's own
// quirk), hence the "bad" form with the literal request number.
nix::ioctl_write_ptr_bad!(tunsetiff, 0x4004_54ca, libc::ifreq);

/// Attaches to the tap `name` (created beforehand, e.g. by `ip tuntap add`) in the calling
/// thread's network namespace: Ethernet frames, no packet-info header, non-blocking.
pub fn open(name: &str) -> Result<File, FleetError> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ || name.contains(['/', ' ', '\0']) {
        return Err(FleetError::TapName { tap: name.to_string() });
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/net/tun")
        .map_err(|source| FleetError::OpenTun { source })?;
    let mut name_bytes = [0 as libc::c_char; libc::IFNAMSIZ];
    for (slot, byte) in name_bytes.iter_mut().zip(name.bytes()) {
        *slot = byte as libc::c_char;
    }
    let request = libc::ifreq {
        ifr_name: name_bytes,
        ifr_ifru: libc::__c_anonymous_ifr_ifru { ifru_flags: (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short },
    };
    // SAFETY: the descriptor is open for the call's duration and `request` is a valid,
    // initialised ifreq the kernel only reads.
    #[allow(unsafe_code)]
    unsafe { tunsetiff(file.as_raw_fd(), &request) }
        .map_err(|errno| FleetError::AttachTap { tap: name.to_string(), source: std::io::Error::from(errno) })?;
    Ok(file)
}
