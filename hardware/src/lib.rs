//! The virtual hardware lab for Metalrack's end-to-end tests: network namespaces as racks
//! ([`lab`]), a whole site of them with shaped uplinks ([`topology`]) described by a scenario
//! file ([`scenario`]), QEMU machines that network-boot with real iPXE firmware ([`qemu`]), a
//! virtual Redfish BMC that powers them ([`bmc`]), and a simulated fleet of many PXE machines on
//! smoltcp in one process ([`fleet`]).
//!
//! Everything needs root and lives inside network namespaces the lab creates and deletes; nothing
//! touches the host's own network.

pub mod bmc;
pub mod command;
pub mod fleet;
pub mod lab;
pub mod qemu;
pub mod scenario;
pub mod topology;

pub use command::CommandError;
pub use lab::{have_root, Lab, LabError, Namespace};
pub use qemu::{BootFrom, BootOrder, Firmware, GuestReboot, Machine, MachineSpec, Nic, QemuError};
