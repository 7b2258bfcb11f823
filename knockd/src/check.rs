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
        .chain(&conflicts)
    {
        report.push_str(&format!("warning: {warning}\n"));
    }
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
