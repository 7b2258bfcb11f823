//! Session caps (R-GRANT-3): a connection a grant let in lives at most its
//! door's `max_session_secs`, then is cut the way a revoke cuts (its
//! socket aborted, its conntrack entry deleted). Heartbeats renew a lease,
//! never a session: the cap counts from the connection's first packet.
//!
//! A session's age comes from conntrack's own timestamp of the entry
//! (`nf_conntrack_timestamp`, which the daemon turns on at start), so it
//! survives daemon restarts and needs no bookkeeping. An entry without
//! one (made before timestamps were on) is aged from when the daemon first
//! saw it, and such sessions are looked for more often.
//!
//! The scan is scheduled, not periodic: a session first seen at a scan is
//! cut at its deadline, and one that starts after a scan cannot reach its
//! cap before the shortest cap has passed, so the next scan is due at the
//! earlier of the two. With the default 24-hour cap that is a scan a day
//! plus one per deadline.

use std::{
    collections::HashMap,
    net::SocketAddr,
    time::{Duration, Instant, SystemTime},
};

use crate::{
    config::{Config, DoorKind},
    control::wire::SessionView,
    cut,
};

/// Aged from first sight, a session may be this late per `cap` (a scan
/// every cap/8): the tolerance when the kernel keeps no timestamps.
const UNSTAMPED_SCANS_PER_CAP: u32 = 8;
/// Bounds on the time between scans. The tick that runs them comes once
/// a second, so a session is cut within a second of its cap.
const MIN_SCAN_GAP: Duration = Duration::from_millis(100);
const MAX_SCAN_GAP: Duration = Duration::from_secs(3600);
/// After a failed scan, the next try.
const RETRY_AFTER: Duration = Duration::from_secs(10);

/// A session [`SessionCaps::enforce`] cut.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CutSession {
    pub door: String,
    pub client: SocketAddr,
    pub age_secs: u64,
    pub cap_secs: u32,
}

/// See the module documentation.
pub struct SessionCaps {
    next_scan: Instant,
    /// When the daemon first saw each unstamped session, by its ends.
    first_seen: HashMap<(SocketAddr, SocketAddr), SystemTime>,
}

/// Each door's scope and cap (0: none), in the configuration's order.
fn doors(config: &Config) -> Vec<(String, cut::Scope, u32)> {
    config
        .doors
        .iter()
        // An exposed service port admits anyone without a grant, so its
        // connections are not sessions a grant let in.
        .filter(|(_, d)| !d.expose_service_port)
        .map(|(name, d)| {
            let ports = match &d.kind {
                DoorKind::OneTime(o) => o.grant_ports.start..=o.grant_ports.end,
                DoorKind::Static(_) => d.service_port..=d.service_port,
            };
            let scope = cut::Scope {
                ports,
                service_port: d.service_port,
            };
            (name.clone(), scope, d.max_session_secs)
        })
        .collect()
}

/// Turns conntrack's timestamps on when some door of `config` caps its
/// sessions (at start, and at a reload that may add the first cap); says
/// so when it cannot.
pub fn stamp_if_capped(config: &Config) {
    if !config.doors.values().any(|d| d.max_session_secs > 0) {
        return;
    }
    match cut::enable_timestamps() {
        Ok(true) => {}
        Ok(false) | Err(_) => tracing::warn!(
            "could not turn on conntrack timestamps (net.netfilter.nf_conntrack_timestamp); \
             session caps count from when knockd first sees a session, and may cut up to an \
             eighth of a cap late"
        ),
    }
}

impl SessionCaps {
    pub fn new(now: Instant) -> SessionCaps {
        SessionCaps {
            next_scan: now,
            first_seen: HashMap::new(),
        }
    }

    /// Scan again at the next tick (the caps may have changed).
    pub fn rescan(&mut self, now: Instant) {
        self.next_scan = now;
    }

    /// Whether a scan is due.
    pub fn due(&self, now: Instant) -> bool {
        now >= self.next_scan
    }

    /// Every session through a door, with its age and time left.
    pub fn list(
        &mut self,
        config: &Config,
        wall: SystemTime,
    ) -> Result<Vec<SessionView>, cut::Error> {
        let doors = doors(config);
        let scopes: Vec<cut::Scope> = doors.iter().map(|(_, s, _)| s.clone()).collect();
        let sessions = cut::sessions(&scopes)?;
        Ok(sessions
            .iter()
            .map(|s| {
                let (age, stamped) = self.age(s, wall);
                let cap = doors[s.scope].2;
                SessionView {
                    door: doors[s.scope].0.clone(),
                    client: s.client,
                    granted_port: s.granted_port,
                    age_secs: age.as_secs(),
                    secs_left: (cap > 0).then(|| u64::from(cap).saturating_sub(age.as_secs())),
                    stamped,
                }
            })
            .collect())
    }

    /// The session's age, and whether conntrack stamped it; an unstamped
    /// one is aged from its first sighting (recorded now if this is it).
    fn age(&mut self, session: &cut::Session, wall: SystemTime) -> (Duration, bool) {
        match session.started {
            Some(started) => (wall.duration_since(started).unwrap_or_default(), true),
            None => {
                let seen = *self
                    .first_seen
                    .entry((session.client, session.service))
                    .or_insert(wall);
                (wall.duration_since(seen).unwrap_or_default(), false)
            }
        }
    }

    /// Cuts every session past its door's cap, and schedules the next scan.
    /// Does nothing when no door has a cap.
    pub fn enforce(
        &mut self,
        config: &Config,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Vec<CutSession>, cut::Error> {
        let doors: Vec<_> = doors(config)
            .into_iter()
            .filter(|(_, _, cap)| *cap > 0)
            .collect();
        let Some(shortest) = doors.iter().map(|(_, _, cap)| *cap).min() else {
            self.first_seen.clear();
            self.next_scan = now + MAX_SCAN_GAP;
            return Ok(Vec::new());
        };
        let shortest = Duration::from_secs(u64::from(shortest));
        self.next_scan = now + RETRY_AFTER;
        let scopes: Vec<cut::Scope> = doors.iter().map(|(_, s, _)| s.clone()).collect();
        let sessions = cut::sessions(&scopes)?;
        let mut next_gap = shortest;
        let mut over = Vec::new();
        let mut cut = Vec::new();
        let mut unstamped = false;
        let mut seen = std::collections::HashSet::new();
        for session in sessions {
            let (age, stamped) = self.age(&session, wall);
            seen.insert((session.client, session.service));
            unstamped |= !stamped;
            let (door, _, cap_secs) = &doors[session.scope];
            let cap = Duration::from_secs(u64::from(*cap_secs));
            if age >= cap {
                cut.push(CutSession {
                    door: door.clone(),
                    client: session.client,
                    age_secs: age.as_secs(),
                    cap_secs: *cap_secs,
                });
                over.push(session);
            } else {
                next_gap = next_gap.min(cap - age);
            }
        }
        if unstamped {
            next_gap = next_gap.min(shortest / UNSTAMPED_SCANS_PER_CAP);
        }
        cut::end(&over)?;
        // Forget sessions that are gone, and those just cut.
        for gone in &over {
            seen.remove(&(gone.client, gone.service));
        }
        self.first_seen.retain(|ends, _| seen.contains(ends));
        self.next_scan = now + next_gap.clamp(MIN_SCAN_GAP, MAX_SCAN_GAP);
        Ok(cut)
    }
}
