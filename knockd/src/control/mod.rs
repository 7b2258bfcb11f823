//! The control plane: the protocol `knockctl` speaks ([`wire`]), the Unix
//! socket that serves it ([`server`]) and the metrics endpoint
//! ([`metrics`]). Only `wire` exists without the daemon feature: the client
//! needs the types, not the sockets.

pub mod wire;

#[cfg(feature = "daemon")]
mod metrics;
#[cfg(feature = "daemon")]
mod server;

#[cfg(feature = "daemon")]
pub use metrics::serve_metrics;
#[cfg(feature = "daemon")]
pub use server::{CONNECTIONS_MAX, Error, Request, serve};
pub use wire::{Command, REQUEST_MAX, Response, VERSION, parse};
