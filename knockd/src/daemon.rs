//! The running daemon's decisions turned into effects: grants in the XDP
//! allow map, sealed replies, the consumed-sequence record and the decision
//! log.
//!
//! Until the nftables grant layer exists, a grant admits the authenticated
//! source to the door's service port itself, for `open_for_secs`, through
//! the XDP allow map, whose entries expire in the kernel.

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
    maps::{self, GuardMaps, PortPolicy, Proto},
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

/// An open door for one address.
#[derive(Debug, Clone)]
struct Grant {
    device: Option<String>,
    port: u16,
    expires: Instant,
}

/// An error that stops the daemon.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Maps(#[from] maps::Error),
    #[error(transparent)]
    State(#[from] state::Error),
}

/// Everything the event loop acts on.
pub struct Daemon {
    config: Config,
    engine: Engine,
    maps: GuardMaps,
    state: StateFile,
    /// Open doors by (door, address).
    grants: HashMap<(String, IpAddr), Grant>,
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
        maps: GuardMaps,
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
        let mut daemon = Daemon {
            config,
            engine,
            maps,
            state,
            grants: HashMap::new(),
            reject_log: LogLimiter::new(),
            tally: BTreeMap::new(),
        };
        daemon.load_policy()?;
        Ok(daemon)
    }

    fn load_policy(&mut self) -> Result<(), Error> {
        let policy = PortPolicy::from_config(&self.config, &self.engine.knock_ports());
        let written = self.maps.apply_port_policy(&policy)?;
        tracing::debug!(entries = written, "port policy updated");
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

    /// Once a second: move the engine's clock (reloading knock ports when
    /// the time step turns) and forget expired grants.
    pub fn tick(&mut self) -> Result<(), Error> {
        if self.engine.tick(unix_ms()) {
            self.load_policy()?;
        }
        let now = Instant::now();
        self.grants.retain(|_, grant| grant.expires > now);
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
        let key = (door_name.clone(), decision.grant_to);
        let open_for = Duration::from_secs(u64::from(door.open_for_secs()));
        let (status, port, expires_in) = match action {
            Action::Open => {
                self.maps.allow(
                    decision.grant_to,
                    Proto::Tcp,
                    door.service_port,
                    Some(open_for),
                )?;
                self.grants.insert(
                    key,
                    Grant {
                        device: decision.device.clone(),
                        port: door.service_port,
                        expires: Instant::now() + open_for,
                    },
                );
                (Status::Granted, door.service_port, door.open_for_secs())
            }
            Action::Close => {
                if let Some(grant) = self.grants.remove(&key) {
                    self.maps
                        .revoke(decision.grant_to, Proto::Tcp, grant.port)?;
                }
                (Status::Closed, 0, 0)
            }
            Action::Heartbeat => match self.grants.get(&key) {
                Some(grant) if grant.device == decision.device => {
                    let left = grant.expires.saturating_duration_since(Instant::now());
                    (Status::Granted, grant.port, left.as_secs() as u32)
                }
                _ => (Status::NoGrant, 0, 0),
            },
        };
        tracing::info!(
            outcome = "accepted",
            action = ?action,
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
