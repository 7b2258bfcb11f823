//! What the daemon tells about itself: the status report and the grant list
//! of the control protocol (`control::wire`), and the OpenMetrics text.

use std::{collections::BTreeMap, fmt::Write as _, time::Instant};

use super::{Daemon, RECENT_ERRORS};
use crate::{
    control::wire::{
        ConfigInfo, GrantView, InterfaceView, RecentError, SequencesInProgress, StaticProgress,
        StatusReport,
    },
    maps,
};

impl Daemon {
    /// The OpenMetrics text exposition.
    pub(super) fn metrics(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "# TYPE knockd_xdp_packets counter");
        let _ = writeln!(
            out,
            "# HELP knockd_xdp_packets Packets the XDP guard judged, by verdict."
        );
        if let Ok(counters) = self.maps.counters() {
            for (verdict, value) in counters.iter() {
                let _ = writeln!(
                    out,
                    "knockd_xdp_packets_total{{verdict=\"{verdict}\"}} {value}"
                );
            }
        }
        let _ = writeln!(out, "# TYPE knockd_decisions counter");
        let _ = writeln!(
            out,
            "# HELP knockd_decisions Knock decisions, by outcome or reason code."
        );
        for (outcome, value) in &self.tally {
            let _ = writeln!(
                out,
                "knockd_decisions_total{{outcome=\"{outcome}\"}} {value}"
            );
        }
        let grants = self.grants.list();
        let leases = grants.iter().filter(|g| g.leased).count();
        let _ = writeln!(out, "# TYPE knockd_grants gauge");
        let _ = writeln!(out, "# HELP knockd_grants Live grants (leases included).");
        let _ = writeln!(out, "knockd_grants {}", grants.len());
        let _ = writeln!(out, "# TYPE knockd_leases gauge");
        let _ = writeln!(out, "# HELP knockd_leases Live leases.");
        let _ = writeln!(out, "knockd_leases {leases}");
        let _ = writeln!(out, "# TYPE knockd_errors gauge");
        let _ = writeln!(
            out,
            "# HELP knockd_errors Errors kept for status (at most {RECENT_ERRORS})."
        );
        let _ = writeln!(out, "knockd_errors {}", self.recent_errors.len());
        out.push_str("# EOF\n");
        out
    }

    /// The sessions grants let in, looked up now; a failed lookup is
    /// recorded and shows none.
    pub(super) fn session_views(&mut self) -> Vec<crate::control::wire::SessionView> {
        match self
            .session_caps
            .list(&self.config, std::time::SystemTime::now())
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
        let now = Instant::now();
        self.grants
            .list()
            .into_iter()
            .map(|g| GrantView {
                door: g.door.clone(),
                device: g.device.clone(),
                source: g.source,
                port: g.port,
                lease: g.leased,
                secs_left: u64::from(g.secs_left(now)),
                rotations: g.rotations,
                probes: g.probes,
            })
            .collect()
    }

    pub(super) fn status(&mut self) -> StatusReport {
        let now = Instant::now();
        let counters = self.maps.counters().ok();
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
                })
                .collect(),
            counters: counters.as_ref().map(named),
            rates_per_sec,
            decisions: self
                .tally
                .iter()
                .map(|(k, v)| ((*k).to_owned(), *v))
                .collect(),
            grants: self.grant_views(),
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
        }
    }
}
