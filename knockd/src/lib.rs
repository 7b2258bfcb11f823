//! knockd: a port-knocking daemon whose first line of defence is an XDP
//! program.
//!
//! The binary in `src/bin/knockd.rs` is thin: it parses the command line,
//! sets up logging and calls [`run`], which tests call directly too.
//!
//! Module ownership:
//! - [`config`]: the YAML configuration and its validation;
//! - [`devices`]: devices and their key files;
//! - [`guard`]: loading and attaching the XDP program;
//! - [`host`]: the host's kernel release (and the oldest it supports) and
//!   interfaces;
//! - [`maps`]: every read and write of the program's maps;
//! - [`policy`]: the port policy a configuration asks of the guard;
//! - [`events`]: the knock ring buffer;
//! - [`sniff`]: knocks from a packet socket where the kernel refused XDP;
//! - [`nft`]: the nftables table, its rules and grant sets;
//! - [`cut`]: ending a revoked grant's established connections (conntrack,
//!   sock_diag);
//! - [`grants`]: every grant (one-time doors' random ports, leases and
//!   rotation; static doors' service ports), kept in step in nft and maps;
//! - [`control`]: the control protocol's types (`control::wire`), the
//!   control socket and the metrics endpoint;
//! - [`proto`]: the one-time knock wire protocol (`docs/PROTOCOL.md`);
//! - [`auth`]: knock authentication, a pure state machine;
//! - [`state`]: the consumed-sequence record;
//! - [`daemon`]: decisions turned into grants, replies and log lines;
//! - [`cluster`]: fleet mode, the one owner of etcd (devices, consumed
//!   sequences, cluster grants, revokes and heartbeats).

pub mod auth;
pub mod check;
pub mod classic;
pub mod client;
#[cfg(feature = "daemon")]
pub mod cluster;
pub mod config;
pub mod conflicts;
pub mod control;
#[cfg(feature = "daemon")]
pub mod cut;
#[cfg(feature = "daemon")]
pub mod daemon;
pub mod devices;
#[cfg(feature = "daemon")]
pub mod events;
#[cfg(feature = "daemon")]
pub mod grants;
#[cfg(feature = "daemon")]
pub mod guard;
pub mod hooks;
pub mod host;
#[cfg(feature = "daemon")]
pub mod kernel;
pub mod lockout;
#[cfg(feature = "daemon")]
pub mod maps;
#[cfg(feature = "daemon")]
pub mod nft;
pub mod platform;
#[cfg(feature = "daemon")]
pub mod policy;
pub mod profile;
pub mod proto;
#[cfg(feature = "daemon")]
pub mod sniff;
pub mod state;

#[cfg(feature = "daemon")]
mod run;
#[cfg(feature = "daemon")]
pub use run::{Error, RunOptions, run};

/// An error and its sources, on one line: how every log line and control
/// reply states an error.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The next value of a xorshift64 sequence: deterministic noise for the
/// parsers' never-panic tests, reproducible from the seed.
#[cfg(all(test, feature = "daemon"))]
pub(crate) fn xorshift(state: &mut u64) -> u64 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    *state
}
