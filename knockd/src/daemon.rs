//! The running daemon's decisions turned into effects: grants, sealed
//! replies, the consumed-sequence record and the decision log.
//!
//! One-time doors grant a random port through [`crate::grants`] (nftables
//! redirect plus XDP allow entry). Static doors, whose classic clients
//! cannot learn a port, admit the source to the service port itself through
//! the XDP allow map. Either way the kernel expires the grant on its own.

use std::{
    collections::{BTreeMap, HashMap},
    net::{IpAddr, SocketAddr},
    time::{Duration, Instant},
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    auth::{Action, Decision, Engine, KnockIn, Outcome, Reason},
    config::{Config, DoorMode},
    devices::Devices,
    events::Knock,
    grants::{self, Grants},
    maps::{self, GuardMaps, PortPolicy, Proto},
    nft,
    proto::{Status, unix_ms},
    state::{self, StateFile},
};

/// Unauthenticated rejects logged per second on average, and in a burst.
/// Past that they are only counted, so a flood cannot flood the journal.
const REJECT_LOGS_PER_SEC: f64 = 5.0;
const REJECT_LOG_BURST: f64 = 20.0;

/// A token bucket for log lines.
struct LogLimiter {
    tokens: f64,
    last: Instant,
    suppressed: u64,
}

impl LogLimiter {
    fn new() -> LogLimiter {
        LogLimiter {
            tokens: REJECT_LOG_BURST,
            last: Instant::now(),
            suppressed: 0,
        }
    }

    /// Whether to log now; if so, how many lines were suppressed before.
    fn allow(&mut self) -> Option<u64> {
        let now = Instant::now();
        let refill = now.duration_since(self.last).as_secs_f64() * REJECT_LOGS_PER_SEC;
        self.tokens = (self.tokens + refill).min(REJECT_LOG_BURST);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Some(std::mem::take(&mut self.suppressed))
        } else {
            self.suppressed += 1;
            None
        }
    }
}

/// A static door open for one address (on its service port).
#[derive(Debug, Clone)]
struct StaticGrant {
    expires: Instant,
}

/// How often the daemon checks that its nftables table is still there.
const TABLE_CHECK_EVERY: Duration = Duration::from_secs(2);

/// An error that stops the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Maps(#[from] maps::Error),
    #[error(transparent)]
    State(#[from] state::Error),
    #[error(transparent)]
    Grants(#[from] grants::Error),
}

/// Everything the event loop acts on.
pub struct Daemon {
    config: Config,
    engine: Engine,
    maps: GuardMaps,
    state: StateFile,
    /// One-time doors' grants.
    grants: Grants,
    /// Static doors open, by (door, address).
    static_grants: HashMap<(String, IpAddr), StaticGrant>,
    /// When the nftables table was last checked.
    table_checked: Instant,
    /// Unauthenticated rejects, rate-limited in the log.
    reject_log: LogLimiter,
    /// Decisions by outcome or reason code, for the log and status.
    tally: BTreeMap<&'static str, u64>,
}

impl Daemon {
    /// Builds the engine from the persisted record and loads the knock
    /// ports into the XDP program.
    pub fn new(
        config: Config,
        devices: &Devices,
        mut maps: GuardMaps,
        state: StateFile,
    ) -> Result<Daemon, Error> {
        let consumed = state.load()?;
        for (name, door) in &config.doors {
            if door.mode == DoorMode::Static {
                tracing::warn!(
                    door = %name,
                    "door uses a static knock sequence: anyone who observes it can replay it; prefer mode: one_time"
                );
            }
        }
        let engine = Engine::new(&config, devices, &consumed, unix_ms());
        let mut grants = Grants::new(&config);
        let adopted = grants.install(&mut maps)?;
        if adopted > 0 {
            tracing::info!(
                grants = adopted,
                "adopted the grants the nftables table held"
            );
        }
        let mut daemon = Daemon {
            config,
            engine,
            maps,
            state,
            grants,
            static_grants: HashMap::new(),
            table_checked: Instant::now(),
            reject_log: LogLimiter::new(),
            tally: BTreeMap::new(),
        };
        daemon.load_policy()?;
        Ok(daemon)
    }

    /// Brings the XDP port policy up to date: the config's ports, the
    /// knock ports valid now, and the ports grants use (to count probes).
    fn load_policy(&mut self) -> Result<(), Error> {
        let mut policy = PortPolicy::from_config(&self.config, &self.engine.knock_ports());
        policy.mark_granted(self.grants.list().iter().map(|g| g.port));
        let written = self.maps.apply_port_policy(&policy)?;
        if written > 0 {
            tracing::debug!(entries = written, "port policy updated");
        }
        Ok(())
    }

    /// The maps, for counters.
    pub fn maps(&self) -> &GuardMaps {
        &self.maps
    }

    /// Decisions so far, by outcome or reason code.
    pub fn tally(&self) -> &BTreeMap<&'static str, u64> {
        &self.tally
    }

    /// The live one-time grants.
    pub fn grants(&self) -> &Grants {
        &self.grants
    }

    /// Once a second: move the engine's clock (reloading knock ports when
    /// the time step turns), forget expired grants, rotate leases that are
    /// due, and put the nftables table back if someone removed it.
    pub fn tick(&mut self) -> Result<(), Error> {
        self.engine.tick(unix_ms());
        let now = Instant::now();
        self.static_grants.retain(|_, grant| grant.expires > now);
        match self.grants.tick(&mut self.maps) {
            Ok(rotations) => {
                for (old, new) in rotations {
                    tracing::info!(
                        door = %new.door,
                        device = new.device.as_deref(),
                        source = %new.source,
                        old_port = old.port,
                        port = new.port,
                        rotations = new.rotations,
                        "lease rotated"
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "rotating leases failed"),
        }
        let probed = self
            .maps
            .drain_probes()
            .map_err(grants::Error::from)
            .and_then(|probes| self.grants.rotate_probed(&mut self.maps, &probes));
        match probed {
            Ok(rotations) => {
                for (old, new) in rotations {
                    *self.tally.entry("probe_rotations").or_default() += 1;
                    tracing::warn!(
                        door = %new.door,
                        device = new.device.as_deref(),
                        source = %new.source,
                        old_port = old.port,
                        port = new.port,
                        probes = old.probes,
                        "granted port probed by other sources; moved at once"
                    );
                }
            }
            Err(e) => tracing::error!(error = %e, "rotating probed grants failed"),
        }
        // Knock ports turn with the time step; granted ports with grants.
        self.load_policy()?;
        if now.duration_since(self.table_checked) >= TABLE_CHECK_EVERY {
            self.table_checked = now;
            match nft::table_exists() {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        "the knockd nftables table is gone (flushed?); restoring it and its grants"
                    );
                    if let Err(e) = self.grants.restore() {
                        tracing::error!(error = %e, "restoring the nftables table failed");
                    }
                }
                Err(e) => tracing::error!(error = %e, "checking the nftables table failed"),
            }
        }
        Ok(())
    }

    /// Judges a knock and acts on the decision.
    pub fn on_knock(&mut self, knock: &Knock) -> Result<(), Error> {
        let now_ms = unix_ms();
        let decision = self.engine.on_knock(
            &KnockIn {
                source: knock.source,
                destination: knock.destination,
                proto: knock.proto,
                payload: &knock.payload,
            },
            now_ms,
        );
        let key = match &decision.outcome {
            Outcome::Accepted(_) => "accepted",
            Outcome::Progress { .. } => "progress",
            Outcome::Duplicate => "duplicate",
            Outcome::Rejected(reason) => reason.name(),
        };
        *self.tally.entry(key).or_default() += 1;
        match decision.outcome {
            Outcome::Accepted(action) => self.accept(action, &decision, now_ms)?,
            Outcome::Progress { have, need } => tracing::debug!(
                outcome = "progress",
                have,
                need,
                door = decision.door.as_deref(),
                device = decision.device.as_deref(),
                source = %decision.source,
                "decision"
            ),
            Outcome::Duplicate => tracing::debug!(
                outcome = "duplicate",
                door = decision.door.as_deref(),
                source = %decision.source,
                "decision"
            ),
            Outcome::Rejected(reason) => self.log_reject(reason, &decision),
        }
        Ok(())
    }

    fn log_reject(&mut self, reason: Reason, decision: &Decision) {
        // Authenticated rejects name a device and are rare: always log them.
        // Anyone can cause the others, so they are rate-limited.
        let suppressed = if reason.authenticated() {
            Some(0)
        } else {
            self.reject_log.allow()
        };
        let Some(suppressed) = suppressed else { return };
        tracing::warn!(
            outcome = "rejected",
            reason = reason.name(),
            door = decision.door.as_deref(),
            device = decision.device.as_deref(),
            source = %decision.source,
            detail = decision.detail.as_deref(),
            suppressed_before = suppressed,
            "decision"
        );
    }

    fn accept(&mut self, action: Action, decision: &Decision, now_ms: u64) -> Result<(), Error> {
        let door_name = decision
            .door
            .clone()
            .expect("accepted knocks name their door");
        let door = self.config.doors[&door_name].clone();
        // Record the sequence as used before acting on it: a crash between
        // the two must not leave a replayable sequence behind.
        if decision.reply.is_some() {
            self.state.save(&self.engine.consumed())?;
        }
        let source = decision.grant_to;
        let device = decision.device.as_deref();
        let one_time = door.mode == DoorMode::OneTime;
        let result: Result<(Status, u16, u32), grants::Error> = match (action, one_time) {
            (Action::Open, true) => self
                .grants
                .open(&mut self.maps, &door_name, source, device)
                .map(|g| (Status::Granted, g.port, g.secs_left(Instant::now()))),
            (Action::Heartbeat, true) => self
                .grants
                .heartbeat(&mut self.maps, &door_name, source, device)
                .map(|g| match g {
                    Some(g) => (Status::Granted, g.port, g.secs_left(Instant::now())),
                    None => (Status::NoGrant, 0, 0),
                }),
            (Action::Close, true) => self
                .grants
                .close(&mut self.maps, &door_name, source)
                .map(|_| (Status::Closed, 0, 0)),
            // Static doors: only `open` exists, and it opens the service port.
            (_, false) => {
                let open_for = Duration::from_secs(u64::from(door.open_for_secs()));
                self.maps
                    .allow(source, Proto::Tcp, door.service_port, Some(open_for))
                    .map_err(grants::Error::from)
                    .map(|()| {
                        self.static_grants.insert(
                            (door_name.clone(), source),
                            StaticGrant {
                                expires: Instant::now() + open_for,
                            },
                        );
                        (Status::Granted, door.service_port, door.open_for_secs())
                    })
            }
        };
        let (status, port, expires_in) = match result {
            Ok(done) => done,
            Err(e) => {
                // The knock was fine; the kernel side failed. Say so, send
                // nothing, and keep serving.
                tracing::error!(
                    error = %e,
                    door = %door_name,
                    device,
                    source = %decision.source,
                    "could not act on an accepted knock"
                );
                return Ok(());
            }
        };
        self.load_policy()?;
        tracing::info!(
            outcome = "accepted",
            action = ?action,
            status = ?status,
            door = %door_name,
            device = decision.device.as_deref(),
            source = %decision.source,
            grant_to = %decision.grant_to,
            port,
            expires_in_secs = expires_in,
            "decision"
        );
        if let Some(reply) = &decision.reply {
            let sealed = reply.seal(status, port, expires_in, now_ms);
            if let Err(e) = send_reply(reply.from, reply.to, &sealed) {
                tracing::warn!(error = %e, to = %reply.to, "could not send the sealed reply");
            }
        }
        Ok(())
    }
}

/// Sends `bytes` from `from` (the knocked address and port) to `to`.
fn send_reply(from: SocketAddr, to: SocketAddr, bytes: &[u8]) -> std::io::Result<()> {
    let socket = Socket::new(Domain::for_address(from), Type::DGRAM, Some(Protocol::UDP))?;
    // Nothing else listens on a knock port, but another reply may be
    // leaving from it right now.
    socket.set_reuse_address(true)?;
    if from.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    socket.bind(&from.into())?;
    socket.send_to(bytes, &to.into())?;
    Ok(())
}
