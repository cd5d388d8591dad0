//! The virtual hardware lab for Metalrack's end-to-end tests: network namespaces as racks
//! ([`lab`]) and QEMU machines that network-boot with real iPXE firmware ([`qemu`]).
//!
//! Everything needs root and lives inside network namespaces the lab creates and deletes; nothing
//! touches the host's own network.

pub mod command;
pub mod lab;
pub mod qemu;

pub use command::CommandError;
pub use lab::{have_root, Lab, LabError};
pub use qemu::{Firmware, Machine, MachineSpec, Nic, QemuError};
