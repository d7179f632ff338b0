//! bulwarkd, the control plane: a REST API on a unix socket that creates, starts, pauses,
//! stops and deletes VMs, each run by its own `bulwark monitor` process; authorization of
//! the operator and of each VM's owner; a durable store of VM records; metrics.
//!
//! The daemon never maps guest memory. What it can ask a monitor is the closed message set
//! of `bulwark-channel`; what it carries for the owner (console bytes, agent requests,
//! snapshot keys) it passes through without keeping. Monitors run in their own process
//! groups, so stopping or restarting bulwarkd never stops a VM: on start it re-attaches to
//! the monitors its records name.
//!
//! # Store
//!
//! VM records live in `STATE_DIR/bulwarkd.redb`, a [redb](https://www.redb.org) database:
//! pure Rust (no C library in the daemon, nothing to link or audit beyond Rust), ACID with
//! crash-safe copy-on-write B-trees and one file, actively maintained. sled was the other
//! pure-Rust candidate but has had no stable release in years and its on-disk format is
//! still in flux; SQLite is excellent but brings a C library and a SQL layer the daemon
//! does not need for a few hundred key-value records.
//!
//! # Modules
//!
//! - [`routes`]: the route table (method, path, role), which the router dispatches from.
//! - [`api`]: HTTP/1.1 on hyper, body limits, JSON errors, the console upgrade.
//! - [`daemon`]: VM operations, monitor supervision and re-attachment.
//! - [`monitor`]: spawning monitors, the async control channel, `/proc` liveness checks.
//! - [`crossview`]: the guest agent's process list against introspection's.
//! - [`store`], [`auth`], [`metrics`], [`error`].
//! - [`client`]: the HTTP client `bulwark vm` uses.
#![forbid(unsafe_code)]

pub mod api;
pub mod auth;
pub mod client;
pub mod crossview;
pub mod daemon;
pub mod error;
pub mod metrics;
pub mod monitor;
pub mod routes;
pub mod store;

/// Default state directory.
pub const DEFAULT_STATE_DIR: &str = "/var/lib/bulwark";
/// The API socket's name in the state directory.
pub const SOCKET_NAME: &str = "bulwarkd.sock";

pub use bulwark_channel::error_chain;
