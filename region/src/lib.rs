//! regiond, the Metalrack region server: the authoritative catalogue of racks, users and events,
//! its HTTP admin API and web UI. See `docs/ARCHITECTURE.md` for how the pieces fit.

pub mod api;
pub mod auth;
pub mod catalogue_store;
pub mod cli;
pub mod config;
pub mod error;
pub mod images;
pub mod machines;
pub mod secret;
pub mod server;
pub mod store;
pub mod ui;
pub mod util;
