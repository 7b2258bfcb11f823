//! What the daemon tells about itself: the status report and the grant list
//! of the control protocol (`control::wire`), and the OpenMetrics text.

use std::collections::BTreeMap;

use super::{Daemon, RECENT_ERRORS};
use crate::{
    control::wire::{
        ConfigInfo, GrantCursor, GrantPage, GrantView, InterfaceView, PAGE_MAX, RecentError,
        STATUS_GRANTS, SequencesInProgress, StaticProgress, StatusReport,
    },
    maps,
};

impl Daemon {
    /// The OpenMetrics text exposition (`prometheus-client` encodes it;
    /// the metrics endpoint turns it into Prometheus' text format 0.0.4
    /// for scrapers that do not ask for OpenMetrics).
    pub(super) fn metrics(&self) -> String {
        use prometheus_client::{
            metrics::{counter::Counter, family::Family, gauge::Gauge, info::Info},
            registry::Registry,
        };
        type Labels = Vec<(&'static str, String)>;
        let mut registry = Registry::with_prefix("knockd");
        registry.register(
            "build",
            "The running knockd",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let packets = Family::<Labels, Counter>::default();
        if let Ok(counters) = self.kernel.counters() {
            for (verdict, value) in counters.iter() {
                packets
                    .get_or_create(&vec![("verdict", verdict.to_owned())])
                    .inc_by(value);
            }
        }
        registry.register(
            "xdp_packets",
            "Packets the XDP guard judged, by verdict",
            packets,
        );
        let attached = Family::<Labels, Gauge>::default();
        for a in &self.attachments {
            let on = a.mode != crate::guard::AttachedMode::NftablesOnly;
            attached
                .get_or_create(&vec![("interface", a.interface.clone())])
                .set(i64::from(on));
        }
        registry.register(
            "xdp_attached",
            "1 where the XDP guard runs; 0 where the kernel refused it and nftables alone guards the interface",
            attached,
        );
        let decisions = Family::<Labels, Counter>::default();
        for ((door, outcome, reason), value) in &self.decisions {
            decisions
                .get_or_create(&vec![
                    ("door", door.clone()),
                    ("outcome", (*outcome).to_owned()),
                    ("reason", (*reason).to_owned()),
                ])
                .inc_by(*value);
        }
        registry.register(
            "decisions",
            "Knock decisions, by door (empty: none matched), outcome and reason code",
            decisions,
        );
        let events = [
            (
                "session_caps",
                "Connections cut at their door's max_session_secs",
                "session_capped",
            ),
            (
                "state_write_failures",
                "Accepted knocks refused because the used-sequence record could not be written",
                "state_write_failed",
            ),
        ];
        // Events, and rejects by reason (a failed state write is both).
        let tally = self.tally();
        for (name, help, key) in events {
            let counter = Counter::<u64>::default();
            counter.inc_by(tally.get(key).copied().unwrap_or(0));
            registry.register(name, help, counter);
        }
        let reloads = Family::<Labels, Counter>::default();
        reloads
            .get_or_create(&vec![("result", "ok".to_owned())])
            .inc_by(self.reloads.0);
        reloads
            .get_or_create(&vec![("result", "refused".to_owned())])
            .inc_by(self.reloads.1);
        registry.register(
            "reloads",
            "Configuration reloads, by result (a refused one keeps the old configuration)",
            reloads,
        );
        let loaded = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
        loaded.set(self.loaded_at_ms as f64 / 1000.0);
        registry.register(
            "config_loaded_timestamp_seconds",
            "When the running configuration was loaded (start or last good reload), Unix time",
            loaded,
        );
        let (grants, leases) = (
            Family::<Labels, Gauge>::default(),
            Family::<Labels, Gauge>::default(),
        );
        for door in self.config.doors.keys() {
            grants.get_or_create(&vec![("door", door.clone())]).set(0);
            leases.get_or_create(&vec![("door", door.clone())]).set(0);
        }
        for grant in self.grants.list() {
            let door = vec![("door", grant.door.to_string())];
            grants.get_or_create(&door).inc();
            if grant.leased {
                leases.get_or_create(&door).inc();
            }
        }
        registry.register("grants", "Live grants (leases included), by door", grants);
        registry.register("leases", "Live leases, by door", leases);
        let errors = Gauge::<i64>::default();
        errors.set(self.recent_errors.len() as i64);
        registry.register(
            "errors",
            format!("Errors kept for status (at most {RECENT_ERRORS})"),
            errors,
        );
        if let Some(fleet) = &self.fleet {
            let view = fleet.view();
            let synced = Gauge::<i64>::default();
            synced.set(i64::from(view.synced));
            registry.register(
                "fleet_synced",
                "Fleet mode: 1 while this node follows etcd and serves one-time doors",
                synced,
            );
            let revision = Gauge::<i64>::default();
            revision.set(view.revision);
            registry.register(
                "fleet_revision",
                "Fleet mode: the etcd revision applied",
                revision,
            );
            let lag = Gauge::<f64, std::sync::atomic::AtomicU64>::default();
            lag.set(view.watch_lag_ms.map_or(f64::NAN, |ms| ms as f64 / 1000.0));
            registry.register(
                "fleet_watch_lag_seconds",
                "Fleet mode: how long this node's last heartbeat took to come back through its watch",
                lag,
            );
            let problems = Family::<Labels, Counter>::default();
            for trouble in crate::cluster::Trouble::ALL {
                problems
                    .get_or_create(&vec![("kind", trouble.name().to_owned())])
                    .inc_by(fleet.problems().get(&trouble).copied().unwrap_or(0));
            }
            registry.register(
                "fleet_etcd_errors",
                "Fleet mode: connections to etcd lost or refused, by kind (authentication, permission and tls are the operator's to fix)",
                problems,
            );
            let pending = Gauge::<i64>::default();
            pending.set(view.revokes_pending as i64);
            registry.register(
                "fleet_revokes_pending",
                "Fleet mode: revokes made on this node that etcd does not have yet",
                pending,
            );
        }
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        out
    }

    /// The sessions grants let in, looked up now; a failed lookup is
    /// recorded and shows none.
    pub(super) fn session_views(&mut self) -> Vec<crate::control::wire::SessionView> {
        match self
            .session_caps
            .list(&self.config, self.kernel.as_mut(), self.now.wall)
        {
            Ok(sessions) => sessions,
            Err(e) => {
                self.record_error(format!("listing sessions failed: {}", super::chain(&e)));
                Vec::new()
            }
        }
    }

    /// Hints for the operator from the counters.
    fn hints(&self, counters: &maps::Counters) -> Vec<String> {
        let mut hints = self.lockout_open.clone();
        let unmatched = counters.get(knockd_common::Counter::KnockUnmatched);
        if unmatched > 0 {
            hints.push(format!(
                "{unmatched} datagrams shaped like one-time knocks reached knock ports no \
                 sequence uses now, and were dropped in XDP: a client with a wrong key, a \
                 clock off by more than the window, or a profile whose knock_ports, knocks \
                 or step_secs differ from the door's (`knockctl device add` writes them all)"
            ));
        }
        hints
    }

    pub(super) fn grant_views(&self) -> Vec<GrantView> {
        self.grants
            .list()
            .into_iter()
            .map(|g| self.grant_view(g))
            .collect()
    }

    fn grant_view(&self, g: &crate::grants::Grant) -> GrantView {
        GrantView {
            door: g.door.to_string(),
            device: g.device.as_deref().map(str::to_owned),
            source: g.source,
            port: g.port,
            lease: g.leased,
            secs_left: u64::from(g.secs_left(self.now.mono)),
            rotations: g.rotations,
            probes: g.probes,
        }
    }

    /// A page of the grants: up to `limit` (at most [`PAGE_MAX`]) from the
    /// one after `after`.
    pub(super) fn grant_page(&self, after: Option<GrantCursor>, limit: Option<u32>) -> GrantPage {
        let limit = limit.unwrap_or(PAGE_MAX).clamp(1, PAGE_MAX) as usize;
        let after = after.map(|c| crate::grants::Holder {
            door: c.door.into(),
            source: c.source,
            device: c.device.map(Into::into),
        });
        let page = self.grants.page(after.as_ref(), limit);
        // A full page may have more after it; the next request says.
        let next = (page.len() == limit)
            .then(|| page.last().map(|g| g.holder()))
            .flatten()
            .map(|h| GrantCursor {
                source: h.source,
                door: h.door.to_string(),
                device: h.device.as_deref().map(str::to_owned),
            });
        GrantPage {
            grants: page.into_iter().map(|g| self.grant_view(g)).collect(),
            total: self.grants.len() as u64,
            next,
        }
    }

    pub(super) fn status(&mut self) -> StatusReport {
        let now = self.now.mono;
        let counters = self.kernel.counters().ok();
        let named = |c: &maps::Counters| -> BTreeMap<String, u64> {
            c.iter().map(|(name, v)| (name.to_owned(), v)).collect()
        };
        let rates_per_sec = match (&self.previous_counters, &counters) {
            (Some((then, before)), Some(after)) => {
                let secs = now.duration_since(*then).as_secs_f64().max(0.001);
                Some(
                    after
                        .iter()
                        .zip(before.iter())
                        .map(|((name, a), (_, b))| {
                            (name.to_owned(), a.saturating_sub(b) as f64 / secs)
                        })
                        .collect(),
                )
            }
            _ => None,
        };
        if let Some(c) = counters {
            self.previous_counters = Some((now, c));
        }
        StatusReport {
            version: env!("CARGO_PKG_VERSION").to_owned(),
            config: ConfigInfo {
                path: self.config_path.clone(),
                loaded_at_ms: self.loaded_at_ms,
                doors: self.config.doors.keys().cloned().collect(),
            },
            interfaces: self
                .attachments
                .iter()
                .map(|a| InterfaceView {
                    interface: a.interface.clone(),
                    mode: a.mode.name().to_owned(),
                    error: a.error.clone(),
                })
                .collect(),
            counters: counters.as_ref().map(named),
            rates_per_sec,
            decisions: self
                .tally()
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v))
                .collect(),
            grants: self
                .grants
                .page(None, STATUS_GRANTS)
                .into_iter()
                .map(|g| self.grant_view(g))
                .collect(),
            grants_total: self.grants.len() as u64,
            max_grants: self.config.max_grants,
            sessions: self.session_views(),
            hints: counters.as_ref().map(|c| self.hints(c)).unwrap_or_default(),
            sequences_in_progress: SequencesInProgress {
                static_doors: self
                    .engine
                    .static_progress()
                    .into_iter()
                    .map(|(source, door, knocks, of)| StaticProgress {
                        source,
                        door,
                        knocks,
                        of,
                    })
                    .collect(),
                one_time_pending: self.engine.state_sizes().pending,
            },
            recent_errors: self
                .recent_errors
                .iter()
                .map(|(at_ms, error)| RecentError {
                    at_ms: *at_ms,
                    error: error.clone(),
                })
                .collect(),
            cluster: self.fleet.as_ref().map(super::Fleet::view),
        }
    }
}
