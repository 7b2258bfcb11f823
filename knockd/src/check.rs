//! `check-config`: a configuration file checked as `knockd run` would read
//! it (the file, its devices and key files, its interfaces, the cluster
//! files), with the warnings worth reading first. Kept apart from
//! [`devices`](crate::devices) and [`lockout`](crate::lockout), which it
//! uses, so neither needs the other through it.

use std::path::Path;

use crate::{
    config::Config,
    devices::{Devices, Error, load_key, load_secret},
};

/// Why `check-config` failed: the file itself, or its devices.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Devices(#[from] Error),
    /// An interface the guard would attach to does not exist (now).
    #[error("{key}: no interface {name:?} on this host")]
    NoInterface { key: String, name: String },
    /// A file the `cluster:` section names is missing, unsafe or bad (the
    /// source says how; printed as the error's cause, not twice).
    #[error("{key}")]
    Cluster {
        key: &'static str,
        #[source]
        source: Error,
    },
}

/// Validates a configuration file with its devices and key files, as
/// `knockd check-config` and `knockctl check-config` both do; returns the
/// report to print (warnings, then the verdict).
pub fn check_config(path: &Path) -> Result<String, CheckError> {
    let config = Config::load(path)?;
    let devices = Devices::load(&config, path)?;
    for (i, name) in config.interfaces.iter().enumerate() {
        if crate::platform::interface_index(name).is_none() {
            return Err(CheckError::NoInterface {
                key: format!("interfaces[{i}]"),
                name: name.clone(),
            });
        }
    }
    if let Some(cluster) = &config.cluster {
        check_cluster_files(cluster)?;
    }
    let mut report = String::new();
    let kernel = crate::host::kernel_warning(&crate::host::kernel_release(), config.without_xdp);
    let ephemeral = crate::host::ephemeral_warnings(
        &config,
        crate::host::ephemeral_ports().unwrap_or(crate::host::DEFAULT_EPHEMERAL),
    );
    #[cfg(feature = "daemon")]
    let memory = memory_warning(config.max_grants, crate::host::memory_total());
    #[cfg(not(feature = "daemon"))]
    let memory: Option<String> = None;
    #[cfg(feature = "daemon")]
    let conflicts = match crate::kernel::conflicts_on_host(&config) {
        Ok(found) => found,
        Err(e) => vec![format!(
            "could not read the host's ruleset to look for rules that keep doors shut ({e}); \
             run check-config as root"
        )],
    };
    #[cfg(not(feature = "daemon"))]
    let conflicts: Vec<String> = Vec::new();
    for warning in devices
        .warnings
        .iter()
        .chain(&crate::lockout::check(&config, &devices))
        .chain(&kernel)
        .chain(&ephemeral)
        .chain(&memory)
        .chain(&conflicts)
    {
        report.push_str(&format!("warning: {warning}\n"));
    }
    #[cfg(feature = "daemon")]
    report.push_str(&memory_line(config.max_grants));
    report.push_str(&format!(
        "{}: ok (doors: {}, devices: {}{})",
        path.display(),
        config.doors.len(),
        devices.by_id.len(),
        if config.cluster.is_some() {
            " here, and those in etcd"
        } else {
            ""
        }
    ));
    Ok(report)
}

/// The cluster key (a key file: root, 0600, 64 hex digits) and the
/// password file (root, 0600), as `knockd run` will read them.
fn check_cluster_files(cluster: &crate::config::Cluster) -> Result<(), CheckError> {
    load_key(&cluster.key_file, 0).map_err(|source| CheckError::Cluster {
        key: "cluster.key_file",
        source,
    })?;
    if let Some(path) = &cluster.password_file {
        load_secret(path, 0).map_err(|source| CheckError::Cluster {
            key: "cluster.password_file",
            source,
        })?;
    }
    Ok(())
}

/// What `max_grants` costs, in bytes: the allow map's kernel memory
/// (reserved when knockd starts) and the daemon's own at that many grants.
#[cfg(feature = "daemon")]
fn memory_cost(max_grants: u32) -> (u32, u64, u64) {
    let entries = crate::maps::allow_entries(max_grants);
    let kernel = crate::maps::allow_map_bytes(entries);
    let daemon = u64::from(max_grants) * crate::grants::DAEMON_BYTES_PER_GRANT;
    (entries, kernel, daemon)
}

#[cfg(feature = "daemon")]
fn mib(bytes: u64) -> f64 {
    bytes as f64 / f64::from(1 << 20)
}

/// The line of the report that gives `max_grants`' memory cost.
#[cfg(feature = "daemon")]
fn memory_line(max_grants: u32) -> String {
    let (entries, kernel, daemon) = memory_cost(max_grants);
    format!(
        "max_grants {max_grants}: the XDP allow map holds {entries} entries, {:.1} MiB of \
         kernel memory reserved at start; the daemon itself needs about {:.1} MiB more \
         when that many grants are live\n",
        mib(kernel),
        mib(daemon),
    )
}

/// A warning when `max_grants` would take more than half of the host's
/// memory (`total`, bytes; `None` when unknown).
#[cfg(feature = "daemon")]
fn memory_warning(max_grants: u32, total: Option<u64>) -> Option<String> {
    let (_, kernel, daemon) = memory_cost(max_grants);
    let total = total?;
    (kernel + daemon > total / 2).then(|| {
        format!(
            "max_grants: {max_grants} grants would take {:.0} MiB, more than half of this \
             host's {:.0} MiB of memory",
            mib(kernel + daemon),
            mib(total)
        )
    })
}

#[cfg(all(test, feature = "daemon"))]
mod tests {
    use super::*;

    #[test]
    fn the_cost_of_max_grants_is_stated_and_warned_of_past_half_the_memory() {
        let line = memory_line(200_000);
        assert!(
            line.starts_with("max_grants 200000: the XDP allow map holds 250000 entries, 23.1 MiB"),
            "{line}"
        );
        let gib = 1 << 30;
        assert_eq!(memory_warning(1_000_000, Some(8 * gib)), None);
        let warned = memory_warning(8_000_000, Some(2 * gib)).unwrap();
        assert!(
            warned.starts_with("max_grants: 8000000 grants would take"),
            "{warned}"
        );
        assert_eq!(memory_warning(8_000_000, None), None);
    }
}
