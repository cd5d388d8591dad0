//! rackd, the Metalrack rack appliance: registers with a region, reports its health, keeps a
//! local image snapshot in step with the region's catalogue, and serves PXE (DHCP, TFTP, HTTP
//! boot) to the machines of its rack from that snapshot.

pub mod cli;
pub mod config;
pub mod control;
pub mod data_dir;
pub mod health;
pub mod heartbeat;
pub mod power;
pub mod power_requests;
pub mod pxe;
pub mod region_client;
pub mod region_link;
pub mod registration;
pub mod serve;
pub mod snapshot;
pub mod status;
pub mod sync;
