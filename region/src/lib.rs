//! regiond, the Metalrack region server: the authoritative catalogue of images, racks, machines,
//! users and events, its HTTP admin API and web UI. See `docs/ARCHITECTURE.md` for how the
//! pieces fit.
//!
//! Modules in layers; each imports only from layers below it (checked by `tests/layers.rs`):
//! 1. `util`, `config`, `tls`, `metrics`: clocks, tokens and hashes; `region.toml`; the TLS
//!    certificate; the Prometheus metrics.
//! 2. `db`: the database (pool, migrations, transactions) and the tables every domain writes:
//!    the event log and settings.
//! 3. `state`: what every domain shares (`Shared`: the store, config, data dir, change feed).
//! 4. domains, each with its error type and its SQL beside it: `secret`, `users`; then
//!    `cluster`, `racks`, `machines` (which check who acts); then `catalogue` (whose per-rack
//!    views read racks and whose rack poll carries machines).
//! 5. `http`: the router, extractors, `ApiError` (every domain error's status decided in one
//!    place), and the thin API and UI handlers.
//! 6. `cli`: the command line.

pub mod config;
pub mod metrics;
pub mod tls;
pub mod util;

pub mod db;

pub mod state;

pub mod secret;
pub mod users;

pub mod cluster;
pub mod machines;
pub mod racks;

pub mod catalogue;

pub mod http;

pub mod cli;
