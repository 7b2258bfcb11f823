//! The running daemon's decisions turned into effects: grants, sealed
//! replies, the consumed-sequence record and the decision log.
//!
//! Every grant, a one-time door's random port or a static door's service
//! port, is [`crate::grants`]'s: this module decides, `grants` opens, renews
//! and closes in both kernel places, and the kernel expires grants on its
//! own. What the daemon reports about itself is in `report`; the control
//! requests that change things (revoke, reload) are in `requests`.

use std::{
    collections::{BTreeMap, VecDeque},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use log_limit::LogLimiter;

mod commands;
mod fleet;
mod log_limit;
mod report;
mod requests;
mod sessions;
#[cfg(test)]
mod tests;

pub use fleet::Fleet;
pub use requests::RequestError;

use crate::{
    auth::{Accepted, Action, Consumed, Engine, KnockIn, Reason, Rejected, Verdict},
    config::Config,
    devices::Devices,
    events::SeenKnock,
    grants::{self, Grants},
    guard::Attachment,
    hooks::{HookEvent, HookRun},
    kernel::Kernel,
    maps::{self, PortPolicy},
    proto::Status,
    state::{self, StateFile},
};

/// The time of one event: the run loop reads the clock once per event
/// and hands it to the daemon, which never reads it. The monotonic time
/// serves deadlines, the wall time conntrack's timestamps and the records
/// other nodes and clients read (in Unix milliseconds).
#[derive(Debug, Clone, Copy)]
pub struct Now {
    pub mono: Instant,
    pub wall: SystemTime,
    pub unix_ms: u64,
}

impl Now {
    /// Reads both clocks.
    pub fn read() -> Now {
        let wall = SystemTime::now();
        Now {
            mono: Instant::now(),
            wall,
            unix_ms: wall
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as u64),
        }
    }

    /// `later` after this.
    #[cfg(test)]
    pub fn after(self, later: Duration) -> Now {
        Now {
            mono: self.mono + later,
            wall: self.wall + later,
            unix_ms: self.unix_ms + later.as_millis() as u64,
        }
    }
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
    /// The port policy of `config` and the engine's current knock ports,
    /// without grants: it changes only when the time step turns or the
    /// configuration is reloaded, so it is not rebuilt per knock.
    policy_base: PortPolicy,
    /// Everything the daemon does to the host goes through here.
    kernel: Box<dyn Kernel + Send>,
    /// The time of the event being handled (see [`Now`]).
    now: Now,
    state: StateFile,
    /// Accepted one-time knocks whose sequences are not yet on disk, with
    /// their decision time: `flush` records them, then acts.
    unsynced: Vec<(Accepted, u64)>,
    /// Every door's grants.
    grants: Grants,
    /// When the nftables table was last checked.
    table_checked: Instant,
    /// Unauthenticated rejects, rate-limited in the log.
    reject_log: LogLimiter,
    /// Events that are not knock decisions (sessions capped, state writes
    /// failed, probe rotations), by name.
    events: BTreeMap<&'static str, u64>,
    /// The file the configuration came from, for reloads and status.
    config_path: Option<PathBuf>,
    /// When the running configuration was loaded (Unix ms).
    loaded_at_ms: u64,
    /// The last errors, newest last, for status.
    recent_errors: VecDeque<(u64, String)>,
    /// Where the XDP program is attached, for status.
    attachments: Vec<Attachment>,
    /// Counters at the previous status, for rates.
    previous_counters: Option<(Instant, maps::Counters)>,
    /// When sessions next meet their caps.
    session_caps: sessions::SessionCaps,
    /// Why the lockout guard left service ports open, for status.
    lockout_open: Vec<String>,
    /// Decisions by (door, outcome, reason code), for the metrics' labels.
    decisions: BTreeMap<(String, &'static str, &'static str), u64>,
    /// Reloads that took effect, and that were refused.
    reloads: (u64, u64),
    /// What the last reload did, for systemd's STATUS=.
    last_reload: String,
    /// Fleet mode (a `cluster:` section), else `None`.
    fleet: Option<Fleet>,
}

/// Errors kept for `knockctl status`.
const RECENT_ERRORS: usize = 20;

impl Daemon {
    /// Builds the engine from the persisted record and loads the knock
    /// ports into the XDP program.
    pub fn new(
        config: Config,
        devices: &Devices,
        mut kernel: Box<dyn Kernel + Send>,
        mut state: StateFile,
        now: Now,
    ) -> Result<Daemon, Error> {
        let consumed = state.load()?;
        state::crash_point("after_load");
        for (name, door) in &config.doors {
            if door.static_door().is_some() {
                tracing::warn!(
                    door = %name,
                    "door uses a static knock sequence: anyone who observes it can replay it; prefer mode: one_time"
                );
            }
        }
        let engine = Engine::new(&config, devices, &consumed, now.unix_ms);
        // Start from a short log. Failing here costs nothing: the log
        // still holds what the snapshot would have.
        if state.log_lines() > 0
            && let Err(e) = state.compact(&engine.consumed())
        {
            tracing::warn!(error = %chain(&e), "compacting the consumed-sequence record failed");
        }
        let policy_base = crate::policy::port_policy(&config, &engine.knock_ports());
        let mut grants = Grants::new(&config);
        let adopted = grants.install(kernel.as_mut(), now.mono)?;
        if adopted > 0 {
            tracing::info!(
                grants = adopted,
                "adopted the grants the nftables table held"
            );
        }
        kernel.warn_conflicts(&config);
        // The table's conntrack expressions have loaded conntrack, so its
        // sysctls exist now.
        sessions::stamp_if_capped(&config, kernel.as_mut());
        let mut daemon = Daemon {
            config,
            engine,
            policy_base,
            kernel,
            now,
            state,
            unsynced: Vec::new(),
            grants,
            table_checked: now.mono,
            reject_log: LogLimiter::new(now.mono),
            events: BTreeMap::new(),
            config_path: None,
            loaded_at_ms: now.unix_ms,
            recent_errors: VecDeque::new(),
            attachments: Vec::new(),
            previous_counters: None,
            session_caps: sessions::SessionCaps::new(now.mono),
            lockout_open: Vec::new(),
            decisions: BTreeMap::new(),
            reloads: (0, 0),
            last_reload: String::new(),
            fleet: None,
        };
        daemon.load_policy()?;
        Ok(daemon)
    }

    /// Brings the XDP port policy up to date: the config's ports, the
    /// knock ports valid now, and the ports grants use (to count probes).
    fn load_policy(&mut self) -> Result<(), Error> {
        let mut policy = self.policy_base.clone();
        policy.mark_granted(self.grants.current_ports());
        let written = self.kernel.apply_port_policy(&policy)?;
        if written > 0 {
            tracing::debug!(entries = written, "port policy updated");
        }
        Ok(())
    }

    /// Records the doors the lockout guard left open ([`crate::lockout::guard`]).
    pub fn set_lockout_open(&mut self, warnings: Vec<String>) {
        self.lockout_open = warnings;
    }

    /// The kernel, for the counters and the port policy the run loop reads.
    pub fn kernel(&self) -> &dyn Kernel {
        self.kernel.as_ref()
    }

    /// Decisions so far, by outcome (accepted, progress, duplicate) or, for
    /// rejects, reason code, with the other events: what the log and status
    /// show. Derived from `decisions`, which metrics label by door too.
    pub fn tally(&self) -> BTreeMap<&'static str, u64> {
        let mut tally = self.events.clone();
        let hooks = self.kernel.hook_counts();
        for (name, count) in [
            ("hooks_started", hooks.started),
            ("hooks_failed", hooks.failed),
            ("hooks_timed_out", hooks.timed_out),
        ] {
            if count > 0 {
                tally.insert(name, count);
            }
        }
        for ((_, outcome, reason), count) in &self.decisions {
            let key = if reason.is_empty() { outcome } else { reason };
            *tally.entry(key).or_default() += count;
        }
        tally
    }

    /// Once a second: move the engine's clock (reloading knock ports when
    /// the time step turns), forget expired grants, rotate leases that are
    /// due, and put the nftables table back if someone removed it.
    pub fn tick(&mut self, now: Now) -> Result<(), Error> {
        self.now = now;
        if self.engine.tick(now.unix_ms) {
            self.policy_base = crate::policy::port_policy(&self.config, &self.engine.knock_ports());
        }
        if self
            .state
            .wants_compaction(self.engine.state_sizes().consumed)
            && let Err(e) = self.state.compact(&self.engine.consumed())
        {
            self.record_error(format!(
                "compacting the consumed-sequence record failed: {}",
                chain(&e)
            ));
        }
        let ticked = self.grants.tick(self.kernel.as_mut(), now.mono);
        if let Some(e) = ticked.failed {
            self.record_error(format!(
                "ending or rotating grants on the tick: {}",
                chain(&e)
            ));
        }
        for grant in &ticked.expired {
            self.hook_ended(grant);
        }
        self.log_rotations(Ok(ticked.rotated), false);
        let probed = self.grants.rotate_probed(self.kernel.as_mut(), now.mono);
        self.log_rotations(probed, true);
        // Knock ports turn with the time step; granted ports with grants.
        self.load_policy()?;
        if self.session_caps.due(now.mono) {
            self.enforce_session_caps();
        }
        self.report_to_fleet();
        if now.mono.duration_since(self.table_checked) >= TABLE_CHECK_EVERY {
            self.table_checked = now.mono;
            match self.kernel.table_exists() {
                Ok(true) => {}
                Ok(false) => {
                    tracing::warn!(
                        "the knockd nftables table is gone (flushed?); restoring it and its grants"
                    );
                    let restored = self.grants.restore(self.kernel.as_mut(), now.mono);
                    if let Err(e) = restored {
                        self.record_error(format!(
                            "restoring the nftables table failed: {}",
                            chain(&e)
                        ));
                    }
                }
                Err(e) => {
                    self.record_error(format!("checking the nftables table failed: {}", chain(&e)))
                }
            }
        }
        Ok(())
    }

    /// Cuts the sessions past their door's cap, logging each.
    fn enforce_session_caps(&mut self) {
        match self.session_caps.enforce(
            &self.config,
            self.kernel.as_mut(),
            self.now.mono,
            self.now.wall,
        ) {
            Ok(cut) => {
                for session in cut {
                    tracing::info!(
                        door = %session.door,
                        client = %session.client,
                        age_secs = session.age_secs,
                        max_session_secs = session.cap_secs,
                        "session cut at its cap"
                    );
                    *self.events.entry("session_capped").or_default() += 1;
                }
            }
            Err(e) => self.record_error(format!("enforcing session caps failed: {}", chain(&e))),
        }
    }

    /// Judges a knock and acts on the verdict.
    pub fn on_knock(&mut self, knock: &SeenKnock, now: Now) -> Result<(), Error> {
        self.now = now;
        let verdict = self.engine.on_knock(
            &KnockIn {
                source: knock.source,
                destination: knock.destination,
                proto: knock.proto,
                payload: &knock.payload,
            },
            now.unix_ms,
        );
        match verdict {
            // Acted on in `flush`, once its sequence is on disk, and
            // counted there: until then it is not final.
            Verdict::Accepted(accepted) if accepted.consumed.is_some() => {
                self.unsynced.push((*accepted, now.unix_ms));
            }
            Verdict::Accepted(accepted) => self.accept(*accepted, now.unix_ms)?,
            Verdict::Progress {
                door,
                device,
                source,
                have,
                need,
            } => {
                self.count(Some(&door), "progress", "");
                tracing::debug!(
                    outcome = "progress",
                    have,
                    need,
                    door,
                    device,
                    %source,
                    "decision"
                );
            }
            Verdict::Duplicate {
                door,
                device,
                source,
            } => {
                self.count(door.as_deref(), "duplicate", "");
                tracing::debug!(outcome = "duplicate", door, device, %source, "decision");
            }
            Verdict::Rejected(rejected) => self.reject(&rejected),
        }
        Ok(())
    }

    /// Records every sequence consumed since the last flush with one
    /// write and one sync, then acts on their knocks. The event loop calls
    /// it after each batch it reads, so knocks that arrive together share
    /// the sync, and none is answered before its record is on disk.
    ///
    /// If the record cannot be written (a full or failing disk), those
    /// knocks are refused: acting on them would leave sequences that could
    /// be replayed after a restart. The daemon goes on serving.
    pub fn flush(&mut self, now: Now) -> Result<(), Error> {
        self.now = now;
        if self.unsynced.is_empty() {
            return Ok(());
        }
        let batch = std::mem::take(&mut self.unsynced);
        let records: Vec<Consumed> = batch
            .iter()
            .filter_map(|(accepted, _)| accepted.consumed.clone())
            .collect();
        if let Err(e) = self.state.append(&records) {
            let cause = format!("recording the sequence as used failed: {}", chain(&e));
            for (accepted, _) in batch {
                let error = format!(
                    "refused an accepted knock (door {}, device {}, source {}): {cause}",
                    accepted.door,
                    accepted.device.as_deref().unwrap_or("-"),
                    accepted.source,
                );
                let rejected = accepted.refused(Reason::StateWriteFailed, cause.clone());
                self.count(rejected.door.as_deref(), "rejected", rejected.reason.name());
                self.record_error(error);
            }
            return Ok(());
        }
        for (accepted, decided_ms) in batch {
            // In fleet mode etcd has the last word on freshness.
            if let Some((accepted, decided_ms)) = self.fleet_gate(accepted, decided_ms) {
                self.accept(accepted, decided_ms)?;
            }
        }
        Ok(())
    }

    /// Counts and logs a reject. Authenticated rejects name a device and
    /// are rare: always logged. Anyone can cause the others, so they are
    /// rate-limited.
    fn reject(&mut self, rejected: &Rejected) {
        self.count(rejected.door.as_deref(), "rejected", rejected.reason.name());
        let suppressed = if rejected.device.is_some() {
            Some(0)
        } else {
            self.reject_log.allow(self.now.mono)
        };
        let Some(suppressed) = suppressed else { return };
        tracing::warn!(
            outcome = "rejected",
            reason = rejected.reason.name(),
            door = rejected.door.as_deref(),
            device = rejected.device.as_deref(),
            source = %rejected.source,
            detail = rejected.detail.as_deref(),
            suppressed_before = suppressed,
            "decision"
        );
    }

    /// Counts a verdict once it is final: what it did, never what it
    /// might do. Counters only grow (Prometheus reads a decrease as a
    /// restart).
    fn count(&mut self, door: Option<&str>, outcome: &'static str, reason: &'static str) {
        *self
            .decisions
            .entry((door.unwrap_or_default().to_owned(), outcome, reason))
            .or_default() += 1;
    }

    /// Acts on an accepted knock whose acceptance is final (its sequence
    /// on disk, and in fleet mode fresh in etcd), and counts it.
    /// `decided_ms`: when the engine accepted it (the reply says so).
    fn accept(&mut self, accepted: Accepted, decided_ms: u64) -> Result<(), Error> {
        self.count(Some(&accepted.door), "accepted", "");
        self.act(&accepted, decided_ms)
    }

    fn act(&mut self, accepted: &Accepted, decided_ms: u64) -> Result<(), Error> {
        let (action, door_name) = (accepted.action, accepted.door.clone());
        let source = accepted.grant_to;
        let device = accepted.device.as_deref();
        let one_time = self.config.doors[&door_name].one_time().is_some();
        let now = self.now.mono;
        let mut closed = Vec::new();
        let kernel = self.kernel.as_mut();
        // Static doors only ever complete an `open`, which admits the
        // source to the service port itself. The seconds a reply states are
        // [`grants::Grant::secs_stated`]: never more than the client really
        // has.
        let result: Result<(Status, u16, u32), grants::Error> = match action {
            Action::Open => self
                .grants
                .open(kernel, &door_name, source, device, now)
                .map(|g| (Status::Granted, g.port, g.secs_stated(now))),
            Action::Heartbeat => self
                .grants
                .heartbeat(kernel, &door_name, source, device, now)
                .map(|g| match g {
                    Some(g) => (Status::Granted, g.port, g.secs_stated(now)),
                    None => (Status::NoGrant, 0, 0),
                }),
            // A close names its device (it authenticated): it ends that
            // device's grants on the door, whatever their address.
            Action::Close => self
                .grants
                .close_device(kernel, &door_name, source, device.unwrap_or_default(), now)
                .map(|ended| {
                    let status = if ended.is_empty() {
                        Status::NoGrant
                    } else {
                        Status::Closed
                    };
                    closed.extend(ended);
                    (status, 0, 0)
                }),
        };
        let (status, port, expires_in) = match result {
            Ok(done) => {
                state::crash_point("after_grant");
                done
            }
            Err(e) => {
                // The knock was fine; the kernel side failed. Say so, send
                // nothing, and keep serving.
                self.record_error(format!(
                    "could not act on an accepted knock (door {door_name}, device {}, source {}): {}",
                    device.unwrap_or("-"),
                    accepted.source,
                    chain(&e)
                ));
                return Ok(());
            }
        };
        // The grant is in place; the policy update only marks its port for
        // probe counting, so a failure here is reported, not fatal. Only
        // this port: marking every grant's costs a walk of them all (a
        // millisecond at 100,000 grants), and the tick does that anyway,
        // unmarking ports grants left.
        if one_time
            && status == Status::Granted
            && let Err(e) = self.kernel.mark_granted(port)
        {
            self.record_error(format!("updating the port policy failed: {}", chain(&e)));
        }
        // A cluster door's grant (or its end) goes to every node.
        if status == Status::Granted {
            self.publish_grant(&grants::Holder::new(&door_name, source, device));
        }
        for grant in &closed {
            self.publish_grant(&grant.holder());
        }
        tracing::info!(
            outcome = "accepted",
            action = ?action,
            status = ?status,
            door = %door_name,
            device,
            source = %accepted.source,
            grant_to = %accepted.grant_to,
            port,
            expires_in_secs = expires_in,
            "decision"
        );
        if let Some(reply) = &accepted.reply {
            let sealed = reply.seal(status, port, expires_in, decided_ms);
            if let Err(e) = self.kernel.send_reply(reply.from, reply.to, &sealed) {
                tracing::warn!(error = %e, to = %reply.to, "could not send the sealed reply");
            }
            state::crash_point("after_reply");
        }
        // Hooks last: the grant and the reply never wait for them.
        if action == Action::Open && status == Status::Granted {
            self.hook(HookEvent::Open, &door_name, source, device, port);
        }
        for grant in &closed {
            self.hook_ended(grant);
        }
        Ok(())
    }
}

pub(crate) use crate::error_chain as chain;

impl Daemon {
    /// Logs an error and keeps it for `knockctl status`.
    fn record_error(&mut self, message: String) {
        tracing::error!("{message}");
        self.keep_error(message);
    }

    /// Keeps an error for `status` that its caller logged already (with
    /// fields of its own, or at another level).
    fn keep_error(&mut self, message: String) {
        if self.recent_errors.len() == RECENT_ERRORS {
            self.recent_errors.pop_front();
        }
        self.recent_errors.push_back((self.now.unix_ms, message));
    }

    /// Logs each (old, new) rotation; `attack` ones (a probed port) are
    /// warnings and counted. A failure to rotate is recorded as an error.
    fn log_rotations(
        &mut self,
        rotations: Result<Vec<(grants::Grant, grants::Grant)>, grants::Error>,
        attack: bool,
    ) {
        let rotations = match rotations {
            Ok(rotations) => rotations,
            Err(e) => return self.record_error(format!("rotating grants failed: {}", chain(&e))),
        };
        for (old, new) in rotations {
            self.publish_grant(&new.holder());
            let (door, device, source) = (&new.door, new.device.as_deref(), new.source);
            let (old_port, port, probes) = (old.port, new.port, old.probes);
            if attack {
                *self.events.entry("probe_rotations").or_default() += 1;
                tracing::warn!(%door, device, %source, old_port, port, probes, "granted port probed by other sources; lease moved, old port kept for its holder until its deadline");
            } else {
                tracing::info!(%door, device, %source, old_port, port, rotations = new.rotations, "lease rotated");
            }
        }
    }

    /// Starts `door`'s hook for `event` on a grant of `source`, if the door
    /// has one (it runs in the background: see [`Kernel::run_hook`]).
    fn hook(
        &mut self,
        event: HookEvent,
        door: &str,
        source: std::net::IpAddr,
        device: Option<&str>,
        port: u16,
    ) {
        let Some(hooks) = self.config.doors.get(door).and_then(|d| d.hooks.clone()) else {
            return;
        };
        self.kernel.run_hook(HookRun {
            event,
            door: door.to_owned(),
            source,
            device: device.map(str::to_owned),
            port,
            hooks,
        });
    }

    /// A grant this node made ended (its deadline, a close, a revoke, a
    /// reload): its door's close hook. Grants another node made run their
    /// hooks there.
    fn hook_ended(&mut self, grant: &grants::Grant) {
        if !grant.remote {
            self.hook(
                HookEvent::Close,
                &grant.door.clone(),
                grant.source,
                grant.device.clone().as_deref(),
                grant.port,
            );
        }
    }

    /// Where the configuration came from, and where the guard is attached:
    /// facts the main loop knows and status reports.
    pub fn set_origin(&mut self, config_path: Option<PathBuf>, attachments: Vec<Attachment>) {
        self.config_path = config_path;
        self.attachments = attachments;
    }
}
