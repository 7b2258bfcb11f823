//! Control requests that change things: revoking an address or a device
//! (its grants end and their connections are cut), and reloading the
//! configuration.

use std::net::IpAddr;

use super::{Daemon, Error};
use crate::{
    auth::Engine,
    config::{Config, Door},
    control::wire::Revoked,
    cut,
    devices::Devices,
    grants::{self, Grant, Grants, Holder},
    maps,
};

/// Why a control request failed. Its message, with its sources, is the
/// reply's error; the daemon carries on.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("no device {0:?} and no grant for it")]
    UnknownTarget(String),
    /// A revoke that ended nothing: the operator must not be told "done"
    /// when the device or address still had access somewhere else, or the
    /// name was mistyped.
    #[error("{0} holds no grant and has no connection a door let in: nothing revoked")]
    NothingToRevoke(String),
    #[error("revoked {grants} grant(s) of {target}, but cutting their connections failed")]
    Cut {
        grants: usize,
        target: String,
        #[source]
        source: cut::Error,
    },
    #[error("the daemon was not started from a configuration file")]
    NoConfigFile,
    #[error(transparent)]
    Config(#[from] crate::config::Error),
    #[error(transparent)]
    Devices(#[from] crate::devices::Error),
    #[error(transparent)]
    Grants(#[from] grants::Error),
    #[error(transparent)]
    Maps(#[from] maps::Error),
    #[error(transparent)]
    Daemon(#[from] Error),
}

impl Daemon {
    /// The flows a door admits for `source`: through its grant range to
    /// the service (one-time), or to the service port itself (static);
    /// none through an action door, which admits no connection.
    fn door_cut(door: &Door, source: IpAddr) -> Option<cut::Cut> {
        Some(cut::Cut {
            source,
            // Every port of the range: connections made through ports the
            // grant held before a rotation too.
            ports: door.grant_ports(),
            service_port: door.service_port?,
            udp: door.udp_service_port().is_some(),
        })
    }

    /// The grants a revoke of `target` ends: those of an address (every
    /// device's behind it), or of a device (by id).
    pub(super) fn grants_of(&self, target: &str) -> Vec<Holder> {
        self.grants_of_before(target, u64::MAX)
    }

    /// [`grants_of`](Self::grants_of), only those opened at or before
    /// `at_ms` (Unix ms): what a revoke issued then ends.
    pub(super) fn grants_of_before(&self, target: &str, at_ms: u64) -> Vec<Holder> {
        // From the grants' indexes: a revoke never walks every grant.
        let grants: Box<dyn Iterator<Item = &Grant>> = match target.parse::<IpAddr>() {
            Ok(ip) => Box::new(self.grants.at(ip)),
            Err(_) => Box::new(self.grants.of_device(target)),
        };
        let mut holders: Vec<Holder> = grants
            .filter(|g| g.opened_at_ms <= at_ms)
            .map(Grant::holder)
            .collect();
        // In a stable order, for the log and the hooks.
        holders.sort();
        holders
    }

    /// Ends every grant of an address, or of a device (by id), and cuts the
    /// connections grants let in (their conntrack entries and the service's
    /// sockets). Admission ends first, so the client cannot open a new
    /// connection in between. For an address, that is every connection any
    /// door admitted from it, including those whose grant has expired since;
    /// for a device, those from the addresses of its live grants.
    ///
    /// A revoke issued at `at_ms` (fleet mode: another node's) ends only
    /// the grants opened by then.
    pub(super) fn revoke(&mut self, target: &str, at_ms: u64) -> Result<Revoked, RequestError> {
        let by_ip: Option<IpAddr> = target.parse().ok();
        let doomed = self.grants_of_before(target, at_ms);
        let mut cuts = Vec::new();
        let grants = doomed.len();
        for holder in doomed {
            if let Some(grant) = self
                .grants
                .close(self.kernel.as_mut(), &holder, self.now.mono)?
            {
                self.hook_ended(&grant);
            }
            if by_ip.is_none()
                && let Some(d) = self.config.doors.get(&*holder.door)
            {
                cuts.extend(Self::door_cut(d, holder.source));
            }
        }
        if let Some(ip) = by_ip {
            cuts.extend(
                self.config
                    .doors
                    .values()
                    .filter_map(|d| Self::door_cut(d, ip)),
            );
        }
        if grants == 0 && by_ip.is_none() && !self.engine.knows_device(target) {
            return Err(RequestError::UnknownTarget(target.to_owned()));
        }
        self.load_policy()?;
        let ended = self.kernel.cut(&cuts).map_err(|source| RequestError::Cut {
            grants,
            target: target.to_owned(),
            source,
        })?;
        if grants == 0 && ended.flows == 0 {
            return Err(RequestError::NothingToRevoke(target.to_owned()));
        }
        if ended.more_left {
            tracing::warn!(
                target,
                cut = ended.flows,
                "revoke cut as many flows as one call does; revoke the address again to cut the rest"
            );
        }
        if ended.sockets_unsupported {
            tracing::warn!(
                "this kernel cannot abort sockets (no CONFIG_INET_DIAG_DESTROY): revoked \
                 connections were cut in conntrack, and the service notices when it next sends"
            );
        }
        tracing::info!(
            target,
            grants,
            connections = ended.flows,
            service_sockets_aborted = ended.sockets,
            "revoked"
        );
        Ok(Revoked {
            revoked: grants,
            connections_cut: ended.flows,
        })
    }

    /// Loads the configuration file again; it takes effect only if it is
    /// valid as a whole. Grants of doors that remain survive; interfaces,
    /// XDP mode and bpffs_dir need a restart to change.
    pub fn reload(&mut self) -> Result<String, RequestError> {
        let path = self.config_path.clone().ok_or(RequestError::NoConfigFile)?;
        let loaded = Config::load(&path)?;
        let devices = Devices::load(&loaded, &path)?;
        let devices = self.fleet_devices(devices);
        // What only a restart may change is merged back first, so every
        // layer built below (the nftables guard chain, the engine, the
        // port policy, status) follows the running interfaces and cluster,
        // never the file's new ones.
        let mut kept = Vec::new();
        if loaded.interfaces != self.config.interfaces
            || loaded.xdp_mode != self.config.xdp_mode
            || loaded.without_xdp != self.config.without_xdp
            || loaded.bpffs_dir != self.config.bpffs_dir
        {
            kept.push("interfaces, xdp_mode, without_xdp and bpffs_dir change only on restart");
        }
        if loaded.cluster != self.config.cluster {
            kept.push("the cluster section changes only on restart");
        }
        if loaded.max_grants != self.config.max_grants {
            kept.push("max_grants (the allow map's size) changes only on restart");
        }
        let merged = Config {
            interfaces: self.config.interfaces.clone(),
            xdp_mode: self.config.xdp_mode,
            without_xdp: self.config.without_xdp,
            bpffs_dir: self.config.bpffs_dir.clone(),
            cluster: self.config.cluster.clone(),
            max_grants: self.config.max_grants,
            ..loaded
        };
        let sessions = self.kernel.inbound_sessions();
        let (config, opened) = crate::lockout::prepare_with(merged, &devices, &sessions);
        for what in &kept {
            tracing::warn!(
                "reload: {what}: the file's new values are not used until knockd restarts"
            );
        }
        let now = self.now;
        let engine = Engine::new(&config, &devices, &self.engine.consumed(), now.unix_ms);
        let mut grants = Grants::new(&config);
        grants.install(self.kernel.as_mut(), now.mono)?;
        grants.inherit(&self.grants);
        // Grants of doors that are gone end now (best effort: the kernel
        // expires them anyway).
        let gone: Vec<Holder> = self
            .grants
            .list()
            .into_iter()
            .filter(|g| !config.doors.contains_key(&*g.door))
            .map(Grant::holder)
            .collect();
        for holder in gone {
            // The door is gone from the new file: its close hook is the
            // running configuration's.
            if let Ok(Some(grant)) = self.grants.close(self.kernel.as_mut(), &holder, now.mono) {
                self.hook_ended(&grant);
            }
        }
        self.kernel
            .set_knock_rate(config.knock.rate_per_sec, config.knock.burst)?;
        self.config = config;
        self.lockout_open = opened;
        self.policy_base = crate::policy::port_policy(&self.config, &engine.knock_ports());
        self.engine = engine;
        self.grants = grants;
        self.loaded_at_ms = now.unix_ms;
        self.kernel.warn_conflicts(&self.config);
        // A reload may give a door its first cap.
        super::sessions::stamp_if_capped(&self.config, self.kernel.as_mut());
        self.session_caps.rescan(now.mono);
        self.load_policy()?;
        let summary = format!(
            "{}: doors {:?}, {} devices{}",
            path.display(),
            self.config.doors.keys().collect::<Vec<_>>(),
            devices.by_id.len(),
            if kept.is_empty() {
                String::new()
            } else {
                format!("; {}", kept.join("; "))
            }
        );
        tracing::info!("reloaded {summary}");
        Ok(summary)
    }
}
