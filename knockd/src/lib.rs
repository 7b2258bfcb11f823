//! knockd: a port-knocking daemon whose first line of defence is an XDP
//! program.
//!
//! The binary in `src/bin/knockd.rs` is thin: it parses the command line,
//! sets up logging and calls [`run`], which tests call directly too.
//!
//! Module ownership:
//! - [`config`]: the YAML configuration and its validation;
//! - [`guard`]: loading and attaching the XDP program;
//! - [`maps`]: every read and write of the program's maps;
//! - [`events`]: the knock ring buffer.

pub mod auth;
pub mod config;
pub mod devices;
pub mod events;
pub mod guard;
pub mod maps;
pub mod proto;

use std::{future::Future, path::PathBuf, time::Duration};

use crate::{
    config::Config,
    events::KnockReader,
    guard::{Guard, KernelLogLevel},
    maps::{GuardMaps, PortPolicy},
};

/// How often the daemon logs its counters at debug level.
const STATS_INTERVAL: Duration = Duration::from_secs(10);

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Guard(#[from] guard::Error),
    #[error(transparent)]
    Maps(#[from] maps::Error),
    #[error("reading knock events")]
    Events(#[source] std::io::Error),
}

/// Options that are not part of the configuration file.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Level of the XDP program's own log statements.
    pub kernel_log_level: KernelLogLevel,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            kernel_log_level: KernelLogLevel::Info,
        }
    }
}

/// Removes the map pins when dropped, so every exit path, errors included,
/// leaves bpffs clean.
struct Pins(PathBuf);

impl Drop for Pins {
    fn drop(&mut self) {
        GuardMaps::unpin(&self.0);
    }
}

/// Runs the daemon until `shutdown` completes.
///
/// Order matters: the maps are filled before the program is attached, so the
/// guard protects from its first packet; "ready" is logged only once every
/// interface is attached.
pub async fn run(
    config: Config,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let (mut guard, logger) = Guard::load(options.kernel_log_level)?;
    if let Some(logger) = logger {
        tokio::spawn(guard::drain_logger(logger));
    }
    let mut maps = GuardMaps::take(guard.ebpf_mut(), Some(&config.bpffs_dir))?;
    let _pins = Pins(config.bpffs_dir.clone());
    let ring = maps::take_knock_events(guard.ebpf_mut())?;
    maps.set_knock_rate(config.knock.rate_per_sec, config.knock.burst)?;
    let written = maps.apply_port_policy(&PortPolicy::from_config(&config))?;
    tracing::debug!(entries = written, "port policy loaded");

    for interface in &config.interfaces {
        let mode = guard.attach(interface, config.xdp_mode)?;
        tracing::info!(interface, ?mode, "XDP guard attached");
    }
    let mut reader = KnockReader::new(ring).map_err(Error::Events)?;
    tracing::info!(
        interfaces = ?config.interfaces,
        bpffs_dir = %config.bpffs_dir.display(),
        "ready"
    );

    let mut stats = tokio::time::interval(STATS_INTERVAL);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            batch = reader.read() => {
                for knock in batch.map_err(Error::Events)? {
                    match knock {
                        Ok(knock) => tracing::info!(
                            source = %knock.source,
                            destination = %knock.destination,
                            proto = %knock.proto,
                            ifindex = knock.ifindex,
                            at_ns = knock.at_ns,
                            payload_len = knock.payload_len,
                            payload = %hex::encode(&knock.payload),
                            "knock"
                        ),
                        Err(e) => tracing::warn!(error = %e, "undecodable knock record"),
                    }
                }
            }
            _ = stats.tick() => {
                let counters = maps.counters()?;
                tracing::debug!(counters = %serde_json::to_string(&counters).unwrap_or_default(), "counters");
            }
        }
    }

    let counters = maps.counters()?;
    tracing::info!(
        counters = %serde_json::to_string(&counters).unwrap_or_default(),
        "stopping; detaching the XDP guard"
    );
    // Dropping the guard detaches the program; the pins go with `_pins`.
    drop(guard);
    Ok(())
}
