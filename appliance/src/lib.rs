//! rackd, the Metalrack rack appliance: registers with a region, reports its health, and (in later
//! issues) keeps a local image snapshot and serves PXE to the machines of its rack.

pub mod cli;
pub mod config;
pub mod control;
pub mod health;
pub mod heartbeat;
pub mod pxe;
pub mod region_client;
pub mod registration;
pub mod status;
pub mod sync;
