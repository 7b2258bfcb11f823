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

use crate::{config::Config, control::wire::SessionView, cut, kernel::Kernel};

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
fn doors(config: &Config) -> Vec<(String, cut::DoorPorts, u32)> {
    config
        .doors
        .iter()
        // An exposed service port admits anyone without a grant, so its
        // connections are not sessions a grant let in; an action door
        // lets in none.
        .filter_map(|(name, d)| {
            let scope = cut::DoorPorts {
                ports: d.grant_ports(),
                service_port: d.guarded_port()?,
            };
            Some((name.clone(), scope, d.max_session_secs))
        })
        .collect()
}

/// Turns conntrack's timestamps on when some door of `config` caps its
/// sessions (at start, and at a reload that may add the first cap); says
/// so when it cannot.
pub fn stamp_if_capped(config: &Config, kernel: &mut dyn Kernel) {
    if !config.doors.values().any(|d| d.max_session_secs > 0) {
        return;
    }
    match kernel.enable_timestamps() {
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
        kernel: &mut dyn Kernel,
        wall: SystemTime,
    ) -> Result<Vec<SessionView>, cut::Error> {
        let doors = doors(config);
        let scopes: Vec<cut::DoorPorts> = doors.iter().map(|(_, s, _)| s.clone()).collect();
        let sessions = kernel.sessions(&scopes)?;
        Ok(sessions
            .iter()
            .map(|s| {
                let (age, stamped) = self.age(&Seen::of(s), wall);
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
    fn age(&mut self, session: &Seen, wall: SystemTime) -> (Duration, bool) {
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
        kernel: &mut dyn Kernel,
        now: Instant,
        wall: SystemTime,
    ) -> Result<Vec<CutSession>, cut::Error> {
        let doors: Vec<_> = doors(config)
            .into_iter()
            .filter(|(_, _, cap)| *cap > 0)
            .collect();
        if doors.is_empty() {
            self.first_seen.clear();
            self.next_scan = now + MAX_SCAN_GAP;
            return Ok(Vec::new());
        }
        self.next_scan = now + RETRY_AFTER;
        let scopes: Vec<cut::DoorPorts> = doors.iter().map(|(_, s, _)| s.clone()).collect();
        let sessions = kernel.sessions(&scopes)?;
        let caps: Vec<(String, u32)> = doors.into_iter().map(|(d, _, cap)| (d, cap)).collect();
        let seen: Vec<Seen> = sessions.iter().map(Seen::of).collect();
        let verdicts = self.judge(&caps, &seen, now, wall);
        let doomed: std::collections::HashSet<usize> = verdicts.iter().map(|(i, _)| *i).collect();
        let over: Vec<cut::Session> = sessions
            .into_iter()
            .enumerate()
            .filter(|(i, _)| doomed.contains(i))
            .map(|(_, s)| s)
            .collect();
        if let Err(e) = kernel.end_sessions(&over) {
            self.next_scan = now + RETRY_AFTER;
            return Err(e);
        }
        Ok(verdicts.into_iter().map(|(_, c)| c).collect())
    }

    /// Decides which of the sessions a scan `seen` are past their door's
    /// cap (`caps[scope]`: the door and its cap in seconds, at least one),
    /// and when the next scan is due; forgets the first sightings of
    /// sessions that are gone or cut. No I/O: returns the indices into
    /// `seen` to cut, with what to log of each.
    fn judge(
        &mut self,
        caps: &[(String, u32)],
        seen: &[Seen],
        now: Instant,
        wall: SystemTime,
    ) -> Vec<(usize, CutSession)> {
        let shortest = caps.iter().map(|(_, cap)| *cap).min().unwrap_or(0);
        let shortest = Duration::from_secs(u64::from(shortest));
        let mut next_gap = shortest;
        let mut over = Vec::new();
        let mut unstamped = false;
        let mut live = std::collections::HashSet::new();
        for (i, session) in seen.iter().enumerate() {
            let (age, stamped) = self.age(session, wall);
            unstamped |= !stamped;
            let (door, cap_secs) = &caps[session.scope];
            let cap = Duration::from_secs(u64::from(*cap_secs));
            if age >= cap {
                over.push((
                    i,
                    CutSession {
                        door: door.clone(),
                        client: session.client,
                        age_secs: age.as_secs(),
                        cap_secs: *cap_secs,
                    },
                ));
            } else {
                live.insert((session.client, session.service));
                next_gap = next_gap.min(cap - age);
            }
        }
        if unstamped {
            next_gap = next_gap.min(shortest / UNSTAMPED_SCANS_PER_CAP);
        }
        self.first_seen.retain(|ends, _| live.contains(ends));
        self.next_scan = now + next_gap.clamp(MIN_SCAN_GAP, MAX_SCAN_GAP);
        over
    }
}

/// What a scan saw of one session: all that judging it needs.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Index of the door it came in through.
    scope: usize,
    client: SocketAddr,
    service: SocketAddr,
    /// conntrack's timestamp of it, if the kernel keeps them.
    started: Option<SystemTime>,
}

impl Seen {
    fn of(session: &cut::Session) -> Seen {
        Seen {
            scope: session.scope,
            client: session.client,
            service: session.service,
            started: session.started,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_800_000_000;

    fn wall(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(T0 + secs)
    }

    fn seen(scope: usize, client_port: u16, started: Option<u64>) -> Seen {
        Seen {
            scope,
            client: SocketAddr::from(([198, 18, 0, 2], client_port)),
            service: SocketAddr::from(([198, 18, 0, 1], 22)),
            started: started.map(wall),
        }
    }

    fn caps() -> Vec<(String, u32)> {
        vec![("ssh".into(), 3600), ("web".into(), 60)]
    }

    #[test]
    fn sessions_past_their_doors_cap_are_cut_and_the_next_scan_is_the_nearest_deadline() {
        let now = Instant::now();
        let mut caps_ = SessionCaps::new(now);
        // At T0 + 1000: one ssh session 1000 s old (2600 s left), one
        // 3600 s old (cut), one web session 50 s old (10 s left).
        let sessions = [
            seen(0, 40001, Some(0)),
            seen(0, 40002, None),
            seen(1, 40003, Some(950)),
        ];
        let mut old = sessions;
        old[1].started = Some(wall(0) - Duration::from_secs(2600));
        let cut = caps_.judge(&caps(), &old, now, wall(1000));
        assert_eq!(cut.len(), 1);
        assert_eq!(cut[0].0, 1);
        assert_eq!(
            cut[0].1,
            CutSession {
                door: "ssh".into(),
                client: old[1].client,
                age_secs: 3600,
                cap_secs: 3600,
            }
        );
        assert_eq!(caps_.next_scan, now + Duration::from_secs(10));
        assert!(!caps_.due(now + Duration::from_secs(9)));
        assert!(caps_.due(now + Duration::from_secs(10)));
    }

    #[test]
    fn with_no_session_the_next_scan_is_the_shortest_cap_and_gaps_are_bounded() {
        let now = Instant::now();
        let mut caps_ = SessionCaps::new(now);
        assert!(caps_.judge(&caps(), &[], now, wall(0)).is_empty());
        assert_eq!(caps_.next_scan, now + Duration::from_secs(60));
        // A deadline a few ms away is not a busy loop.
        let mut due = seen(1, 40001, Some(0));
        due.started = Some(wall(0) - Duration::from_millis(59_990));
        assert!(caps_.judge(&caps(), &[due], now, wall(0)).is_empty());
        assert_eq!(caps_.next_scan, now + MIN_SCAN_GAP);
        // Nor is a day-long cap a day without a scan.
        let long = vec![("ssh".into(), 86_400)];
        caps_.judge(&long, &[], now, wall(0));
        assert_eq!(caps_.next_scan, now + MAX_SCAN_GAP);
    }

    #[test]
    fn an_unstamped_session_is_aged_from_first_sight_and_looked_at_more_often() {
        let now = Instant::now();
        let mut caps_ = SessionCaps::new(now);
        let s = seen(1, 40001, None);
        assert!(caps_.judge(&caps(), &[s], now, wall(0)).is_empty());
        // A scan every cap/8 while it lives, so it is cut at most that late.
        assert_eq!(caps_.next_scan, now + Duration::from_millis(7500));
        assert!(caps_.judge(&caps(), &[s], now, wall(59)).is_empty());
        let cut = caps_.judge(&caps(), &[s], now, wall(60));
        assert_eq!((cut.len(), cut[0].1.age_secs), (1, 60));
        // Cut, it is forgotten: seen again (a new connection on the same
        // ends), it is aged from now.
        assert!(caps_.judge(&caps(), &[s], now, wall(61)).is_empty());
        assert!(caps_.judge(&caps(), &[s], now, wall(120)).is_empty());
    }

    #[test]
    fn a_session_that_is_gone_is_forgotten() {
        let now = Instant::now();
        let mut caps_ = SessionCaps::new(now);
        let s = seen(1, 40001, None);
        caps_.judge(&caps(), &[s], now, wall(0));
        assert_eq!(caps_.first_seen.len(), 1);
        caps_.judge(&caps(), &[], now, wall(30));
        assert!(caps_.first_seen.is_empty());
        // Back later: a new session, aged from then.
        assert!(caps_.judge(&caps(), &[s], now, wall(50)).is_empty());
        assert!(caps_.judge(&caps(), &[s], now, wall(100)).is_empty());
    }
}
