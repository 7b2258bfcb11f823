//! Knock authentication: knock events in, decisions out.
//!
//! [`Engine`] is a pure state machine. The caller passes the time (Unix
//! milliseconds) with every call, so tests drive it through any clock
//! scenario, and it does no I/O: persisting consumed sequences, opening
//! grants and sending replies are the daemon's job.
//!
//! State is bounded everywhere:
//! - one-time sequences store nothing until a knock authenticates, and then
//!   at most [`PENDING_PER_DEVICE`] partial sequences per device and
//!   [`PENDING_MAX`] in all;
//! - consumed sequences are kept only while their time step could still be
//!   accepted, and each device may complete at most
//!   [`ACCEPTS_PER_DEVICE_STEP`] per step;
//! - static-sequence progress lives in an LRU of [`STATIC_MAX`] sources.

use std::{
    collections::{BTreeSet, HashMap},
    net::{IpAddr, SocketAddr},
    num::NonZeroUsize,
    ops::RangeInclusive,
};

use lru::LruCache;
use serde::{Deserialize, Serialize};

use crate::{
    config::{self, Config, KnockPort, Proto},
    devices::Devices,
    proto::{self, DoorKeys, Kind, NONCE_LEN},
};

/// Steps beyond the accepted skew for which knock ports are still loaded,
/// so a client whose clock is off by up to this much more is told so
/// ("clock skew", with the offset) rather than met with silence.
pub const SKEW_REPORT_STEPS: u32 = 4;
/// Most partial one-time sequences one device may have at once; a new one
/// evicts its oldest.
pub const PENDING_PER_DEVICE: usize = 4;
/// Most partial one-time sequences in all.
pub const PENDING_MAX: usize = 4096;
/// Most sequences one device may complete per time step.
pub const ACCEPTS_PER_DEVICE_STEP: u32 = 16;
/// Most sources with static-sequence progress.
pub const STATIC_MAX: usize = 16_384;

/// Why a knock did not count.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The payload is not a knock of this protocol version.
    Malformed,
    /// The port belongs to no door (a plain `knock:` port).
    NoDoor,
    /// No allowed device's sequence uses this port for this step and index.
    UnknownDevice,
    /// A device's sequence uses this port, but the MAC does not verify.
    BadMac,
    /// Authentic, but the sender's clock is outside the accepted skew.
    ClockSkew,
    /// Authentic, but this sequence was already used.
    Replay,
    /// Authentic, but sent from another address than its sequence (or than
    /// the address it asks the grant for).
    SourceMismatch,
    /// Authentic, but with another knock count than the door requires.
    WrongCount,
    /// Authentic, but the device completes sequences faster than allowed.
    RateLimited,
    /// Static: not the next knock of the sequence (progress reset).
    WrongKnock,
    /// Static: the sequence took longer than `seq_timeout_secs`.
    Timeout,
    /// Fleet mode: authentic, but etcd could not confirm that no other
    /// node has seen this sequence (fail closed).
    ClusterUnavailable,
    /// Authentic, but the daemon could not record the sequence as used (a
    /// full or failing disk): acting on it would let it be replayed after
    /// a restart.
    StateWriteFailed,
}

impl Reason {
    /// Every reason, for counters.
    pub const ALL: [Reason; 13] = [
        Reason::Malformed,
        Reason::NoDoor,
        Reason::UnknownDevice,
        Reason::BadMac,
        Reason::ClockSkew,
        Reason::Replay,
        Reason::SourceMismatch,
        Reason::WrongCount,
        Reason::RateLimited,
        Reason::WrongKnock,
        Reason::Timeout,
        Reason::ClusterUnavailable,
        Reason::StateWriteFailed,
    ];

    /// The reason code in logs and counters.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Malformed => "malformed",
            Reason::NoDoor => "no_door",
            Reason::UnknownDevice => "unknown_device",
            Reason::BadMac => "bad_mac",
            Reason::ClockSkew => "clock_skew",
            Reason::Replay => "replay",
            Reason::SourceMismatch => "source_mismatch",
            Reason::WrongCount => "wrong_count",
            Reason::RateLimited => "rate_limited",
            Reason::WrongKnock => "wrong_knock",
            Reason::Timeout => "timeout",
            Reason::ClusterUnavailable => "cluster_unavailable",
            Reason::StateWriteFailed => "state_write_failed",
        }
    }
}

/// What a completed sequence asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Open,
    Close,
    Heartbeat,
}

/// The result of one knock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// A sequence completed and authenticated.
    Accepted(Action),
    /// A valid knock of a sequence not yet complete.
    Progress { have: u8, need: u8 },
    /// A knock already counted (a resend, or a tolerated static repeat).
    Duplicate,
    /// The knock does not count.
    Rejected(Reason),
}

/// Where and how to answer an accepted one-time knock.
#[derive(Debug, Clone)]
pub struct ReplyTo {
    /// Keys of the device and door, for sealing.
    pub keys: DoorKeys,
    /// The sequence answered.
    pub nonce: [u8; NONCE_LEN],
    /// The kind of knock answered.
    pub kind: Kind,
    /// The knocked address and port: the reply comes from here, so it
    /// crosses the NAT mapping the knock opened.
    pub from: SocketAddr,
    /// The knocking socket.
    pub to: SocketAddr,
}

impl ReplyTo {
    /// The sealed reply.
    pub fn seal(
        &self,
        status: proto::Status,
        port: u16,
        expires_in_secs: u32,
        server_time_ms: u64,
    ) -> [u8; proto::REPLY_LEN] {
        proto::Reply {
            kind: self.kind,
            nonce: self.nonce,
            status,
            port,
            expires_in_secs,
            server_time_ms,
        }
        .seal(&self.keys)
    }
}

/// The engine's notes while it judges a knock; [`Engine::on_knock`] turns
/// them into a [`Verdict`] once it is done.
#[derive(Debug)]
struct Draft {
    outcome: Outcome,
    door: Option<String>,
    device: Option<String>,
    source: SocketAddr,
    grant_to: IpAddr,
    detail: Option<String>,
    reply: Option<ReplyTo>,
    consumed: Option<Consumed>,
}

/// What the engine decided about one knock. Each variant carries what it
/// has, and nothing it cannot: only an acceptance has an action, a
/// consumed sequence and a reply; only a reject has a reason.
#[derive(Debug, Clone)]
pub enum Verdict {
    /// Boxed: it carries the reply's keys, and the far more frequent
    /// rejects should not move them around.
    Accepted(Box<Accepted>),
    /// A valid knock of a sequence not yet complete.
    Progress {
        door: String,
        device: Option<String>,
        source: SocketAddr,
        have: u8,
        need: u8,
    },
    /// A knock already counted (a resend, or a tolerated static repeat).
    Duplicate {
        door: Option<String>,
        /// The device, once authenticated (a one-time resend).
        device: Option<String>,
        source: SocketAddr,
    },
    Rejected(Rejected),
}

/// A sequence completed and authenticated.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub action: Action,
    pub door: String,
    /// The device (one-time doors; static doors know none).
    pub device: Option<String>,
    pub source: SocketAddr,
    /// The address a grant is for: the source, or the address the knock
    /// asked for (which then equals the source).
    pub grant_to: IpAddr,
    /// Where to send the sealed answer (one-time doors).
    pub reply: Option<ReplyTo>,
    /// The sequence this knock consumed (one-time doors): it must be on
    /// disk before the daemon acts or replies.
    pub consumed: Option<Consumed>,
}

/// A knock that does not count.
#[derive(Debug, Clone)]
pub struct Rejected {
    pub reason: Reason,
    /// The door, once known.
    pub door: Option<String>,
    /// The device, once authenticated.
    pub device: Option<String>,
    pub source: SocketAddr,
    /// More about the reason, for the log (the measured clock offset, …).
    pub detail: Option<String>,
}

impl Accepted {
    /// This acceptance refused after all (its sequence could not be
    /// recorded, or etcd did not confirm it is fresh).
    pub fn refused(self, reason: Reason, detail: String) -> Rejected {
        Rejected {
            reason,
            door: Some(self.door),
            device: self.device,
            source: self.source,
            detail: Some(detail),
        }
    }
}

impl Draft {
    fn verdict(self) -> Verdict {
        match self.outcome {
            Outcome::Accepted(action) => Verdict::Accepted(Box::new(Accepted {
                action,
                door: self.door.expect("an accepted knock has found its door"),
                device: self.device,
                source: self.source,
                grant_to: self.grant_to,
                reply: self.reply,
                consumed: self.consumed,
            })),
            Outcome::Progress { have, need } => Verdict::Progress {
                door: self.door.expect("progress is made on a door"),
                device: self.device,
                source: self.source,
                have,
                need,
            },
            Outcome::Duplicate => Verdict::Duplicate {
                door: self.door,
                device: self.device,
                source: self.source,
            },
            Outcome::Rejected(reason) => Verdict::Rejected(Rejected {
                reason,
                door: self.door,
                device: self.device,
                source: self.source,
                detail: self.detail,
            }),
        }
    }
}

impl Verdict {
    /// What it comes to, without its data.
    pub fn outcome(&self) -> Outcome {
        match self {
            Verdict::Accepted(a) => Outcome::Accepted(a.action),
            Verdict::Progress { have, need, .. } => Outcome::Progress {
                have: *have,
                need: *need,
            },
            Verdict::Duplicate { .. } => Outcome::Duplicate,
            Verdict::Rejected(r) => Outcome::Rejected(r.reason),
        }
    }

    pub fn door(&self) -> Option<&str> {
        match self {
            Verdict::Accepted(a) => Some(&a.door),
            Verdict::Progress { door, .. } => Some(door),
            Verdict::Duplicate { door, .. } => door.as_deref(),
            Verdict::Rejected(r) => r.door.as_deref(),
        }
    }

    pub fn device(&self) -> Option<&str> {
        match self {
            Verdict::Accepted(a) => a.device.as_deref(),
            Verdict::Progress { device, .. } => device.as_deref(),
            Verdict::Duplicate { device, .. } => device.as_deref(),
            Verdict::Rejected(r) => r.device.as_deref(),
        }
    }

    pub fn detail(&self) -> Option<&str> {
        match self {
            Verdict::Rejected(r) => r.detail.as_deref(),
            _ => None,
        }
    }

    pub fn reply(&self) -> Option<&ReplyTo> {
        match self {
            Verdict::Accepted(a) => a.reply.as_ref(),
            _ => None,
        }
    }
}

/// A knock as the engine sees it.
#[derive(Debug, Clone, Copy)]
pub struct KnockIn<'a> {
    pub source: SocketAddr,
    pub destination: SocketAddr,
    pub proto: Proto,
    pub payload: &'a [u8],
}

/// A consumed one-time sequence, as persisted.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Consumed {
    pub door: String,
    pub device: String,
    pub step: u64,
    #[serde(with = "hex_nonce")]
    pub nonce: [u8; NONCE_LEN],
}

mod hex_nonce {
    use serde::{Deserialize, Deserializer, Serializer, de::Error as _};

    pub fn serialize<S: Serializer>(nonce: &[u8; 16], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&hex::encode(nonce))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[u8; 16], D::Error> {
        let text = String::deserialize(d)?;
        let mut out = [0; 16];
        hex::decode_to_slice(&text, &mut out).map_err(D::Error::custom)?;
        Ok(out)
    }
}

type DoorId = usize;
type DeviceId = usize;

/// Who could have sent a knock to a given port.
#[derive(Debug, Clone, Copy)]
struct Candidate {
    door: DoorId,
    device: DeviceId,
    step: u64,
    index: u8,
}

#[derive(Debug)]
struct OneTimeJudge {
    knocks: u8,
    step_secs: u32,
    skew_steps: u32,
    range: RangeInclusive<u16>,
    /// Allowed devices and their keys for this door.
    keys: Vec<(DeviceId, DoorKeys)>,
    /// The step the port index was last built around.
    built_for: Option<u64>,
}

impl OneTimeJudge {
    fn window(&self) -> u64 {
        u64::from(self.skew_steps + SKEW_REPORT_STEPS)
    }
}

#[derive(Debug)]
struct StaticJudge {
    sequence: Vec<KnockPort>,
    timeout_ms: u64,
}

/// How the engine judges one door's knocks: the configuration's settings
/// ([`config::DoorKind`]) plus what it derives from them and keeps (each
/// allowed device's door keys, the step its port index was built for).
#[derive(Debug)]
enum Judging {
    OneTime(OneTimeJudge),
    Static(StaticJudge),
}

#[derive(Debug)]
struct Door {
    name: String,
    kind: Judging,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct SequenceKey {
    door: DoorId,
    device: DeviceId,
    nonce: [u8; NONCE_LEN],
}

#[derive(Debug, Clone, Copy)]
struct Pending {
    source: IpAddr,
    step: u64,
    /// Bit i set when knock i has arrived.
    seen: u16,
}

#[derive(Debug, Clone, Copy)]
struct StaticProgress {
    /// Knocks matched so far.
    matched: usize,
    started_ms: u64,
}

/// The authentication engine.
pub struct Engine {
    doors: Vec<Door>,
    device_ids: Vec<String>,
    /// Knock port → the sequences that use it in the loaded window.
    port_index: HashMap<u16, Vec<Candidate>>,
    /// Static knock → its door and position(s) are found by scanning the
    /// (short) sequence; this maps the knock to its door.
    static_ports: HashMap<KnockPort, DoorId>,
    pending: LruCache<SequenceKey, Pending>,
    consumed: HashMap<SequenceKey, u64>,
    accepts: HashMap<(DeviceId, u64), u32>,
    statics: LruCache<(IpAddr, DoorId), StaticProgress>,
}

impl Engine {
    /// Builds the engine for `config`, with its `devices`, remembering the
    /// sequences in `consumed` (from the state file) as used.
    pub fn new(config: &Config, devices: &Devices, consumed: &[Consumed], now_ms: u64) -> Engine {
        let device_ids: Vec<String> = devices.by_id.keys().cloned().collect();
        let device_index = |id: &str| device_ids.iter().position(|d| d == id);
        let mut doors = Vec::new();
        let mut static_ports = HashMap::new();
        for (name, door) in &config.doors {
            let kind = match &door.kind {
                config::DoorKind::OneTime(door) => {
                    let range = door.knock_ports;
                    Judging::OneTime(OneTimeJudge {
                        knocks: door.knocks,
                        step_secs: door.step_secs,
                        skew_steps: door.skew_steps,
                        range: range.start..=range.end,
                        keys: devices
                            .allowed(config, name)
                            .filter_map(|d| {
                                Some((device_index(&d.id)?, DoorKeys::derive(&d.key, name)))
                            })
                            .collect(),
                        built_for: None,
                    })
                }
                config::DoorKind::Static(door) => {
                    for knock in &door.sequence {
                        static_ports.insert(*knock, doors.len());
                    }
                    Judging::Static(StaticJudge {
                        sequence: door.sequence.clone(),
                        timeout_ms: u64::from(door.seq_timeout_secs) * 1000,
                    })
                }
            };
            doors.push(Door {
                name: name.clone(),
                kind,
            });
        }
        let mut engine = Engine {
            doors,
            device_ids,
            port_index: HashMap::new(),
            static_ports,
            pending: LruCache::new(NonZeroUsize::new(PENDING_MAX).expect("non-zero")),
            consumed: HashMap::new(),
            accepts: HashMap::new(),
            statics: LruCache::new(NonZeroUsize::new(STATIC_MAX).expect("non-zero")),
        };
        for record in consumed {
            let door = engine.doors.iter().position(|d| d.name == record.door);
            let device = engine.device_ids.iter().position(|d| *d == record.device);
            if let (Some(door), Some(device)) = (door, device) {
                let key = SequenceKey {
                    door,
                    device,
                    nonce: record.nonce,
                };
                engine.consumed.insert(key, record.step);
                *engine.accepts.entry((device, record.step)).or_default() += 1;
            }
        }
        engine.tick(now_ms);
        engine
    }

    /// Moves the time window: rebuilds the knock-port index when a door's
    /// time step changed and forgets state that can no longer matter.
    /// Returns true when the knock ports changed (reload the XDP map).
    pub fn tick(&mut self, now_ms: u64) -> bool {
        let mut changed = false;
        for door in &mut self.doors {
            if let Judging::OneTime(one_time) = &mut door.kind {
                let step = proto::step_of(now_ms, one_time.step_secs);
                if one_time.built_for != Some(step) {
                    one_time.built_for = Some(step);
                    changed = true;
                }
            }
        }
        if changed {
            self.rebuild_port_index();
            let doors = &self.doors;
            let live = |door: DoorId, step: u64| match &doors[door].kind {
                Judging::OneTime(d) => {
                    let now = d.built_for.unwrap_or(0);
                    step + d.window() >= now
                }
                Judging::Static(_) => false,
            };
            self.consumed.retain(|key, step| live(key.door, *step));
            let stale: Vec<SequenceKey> = self
                .pending
                .iter()
                .filter(|(key, p)| !live(key.door, p.step))
                .map(|(key, _)| *key)
                .collect();
            for key in stale {
                self.pending.pop(&key);
            }
            let oldest_live = self
                .doors
                .iter()
                .filter_map(|d| match &d.kind {
                    Judging::OneTime(d) => {
                        Some(d.built_for.unwrap_or(0).saturating_sub(d.window()))
                    }
                    Judging::Static(_) => None,
                })
                .min()
                .unwrap_or(0);
            self.accepts.retain(|(_, step), _| *step >= oldest_live);
        }
        changed
    }

    fn rebuild_port_index(&mut self) {
        self.port_index.clear();
        for (door_id, door) in self.doors.iter().enumerate() {
            let Judging::OneTime(d) = &door.kind else {
                continue;
            };
            let now = d.built_for.unwrap_or(0);
            let steps = now.saturating_sub(d.window())..=now + d.window();
            for (device, keys) in &d.keys {
                for step in steps.clone() {
                    for index in 0..d.knocks {
                        let port = keys.port(step, index, &d.range);
                        self.port_index.entry(port).or_default().push(Candidate {
                            door: door_id,
                            device: *device,
                            step,
                            index,
                        });
                    }
                }
            }
        }
    }

    /// The knocks the XDP program should forward now: every port a one-time
    /// sequence may use in the loaded window (UDP), and every static knock.
    pub fn knock_ports(&self) -> BTreeSet<KnockPort> {
        let one_time = self.port_index.keys().map(|&port| KnockPort {
            port,
            proto: Proto::Udp,
        });
        one_time.chain(self.static_ports.keys().copied()).collect()
    }

    /// The consumed sequences, for the state file.
    pub fn consumed(&self) -> Vec<Consumed> {
        let mut out: Vec<Consumed> = self
            .consumed
            .iter()
            .map(|(key, step)| Consumed {
                door: self.doors[key.door].name.clone(),
                device: self.device_ids[key.device].clone(),
                step: *step,
                nonce: key.nonce,
            })
            .collect();
        out.sort_by(|a, b| {
            (a.step, &a.door, &a.device, a.nonce).cmp(&(b.step, &b.door, &b.device, b.nonce))
        });
        out
    }

    /// Whether `id` is a device the engine knows.
    pub fn knows_device(&self, id: &str) -> bool {
        self.device_ids.iter().any(|d| d == id)
    }

    /// Sizes of the engine's tables, to show they stay bounded.
    pub fn state_sizes(&self) -> StateSizes {
        StateSizes {
            pending: self.pending.len(),
            consumed: self.consumed.len(),
            accepts: self.accepts.len(),
            statics: self.statics.len(),
            knock_ports: self.port_index.len(),
        }
    }

    /// Static sequences in progress: (source, door, knocks matched, of).
    pub fn static_progress(&self) -> Vec<(IpAddr, String, usize, usize)> {
        self.statics
            .iter()
            .map(|((source, door), p)| {
                let len = match &self.doors[*door].kind {
                    Judging::Static(s) => s.sequence.len(),
                    Judging::OneTime(_) => 0,
                };
                (*source, self.doors[*door].name.clone(), p.matched, len)
            })
            .collect()
    }

    /// Judges one knock.
    pub fn on_knock(&mut self, knock: &KnockIn<'_>, now_ms: u64) -> Verdict {
        let mut decision = Draft {
            outcome: Outcome::Rejected(Reason::NoDoor),
            door: None,
            device: None,
            source: knock.source,
            grant_to: knock.source.ip(),
            detail: None,
            reply: None,
            consumed: None,
        };
        let static_knock = KnockPort {
            port: knock.destination.port(),
            proto: knock.proto,
        };
        if let Some(&door) = self.static_ports.get(&static_knock) {
            decision.door = Some(self.doors[door].name.clone());
            decision.outcome = self.static_knock(
                door,
                static_knock,
                knock.source.ip(),
                now_ms,
                &mut decision.detail,
            );
        } else if knock.proto == Proto::Udp
            && self.port_index.contains_key(&knock.destination.port())
        {
            self.one_time_knock(knock, now_ms, &mut decision);
        }
        decision.verdict()
    }

    fn static_knock(
        &mut self,
        door: DoorId,
        knock: KnockPort,
        source: IpAddr,
        now_ms: u64,
        detail: &mut Option<String>,
    ) -> Outcome {
        let Judging::Static(d) = &self.doors[door].kind else {
            unreachable!("static_ports only maps to static doors")
        };
        let need = d.sequence.len();
        let start = |statics: &mut LruCache<_, _>| {
            if need == 1 {
                return Outcome::Accepted(Action::Open);
            }
            statics.put(
                (source, door),
                StaticProgress {
                    matched: 1,
                    started_ms: now_ms,
                },
            );
            Outcome::Progress {
                have: 1,
                need: need as u8,
            }
        };
        let progress = self.statics.get(&(source, door)).copied();
        let Some(mut progress) = progress else {
            return if d.sequence[0] == knock {
                start(&mut self.statics)
            } else {
                *detail = Some(format!("{knock} is not the first knock"));
                Outcome::Rejected(Reason::WrongKnock)
            };
        };
        if now_ms.saturating_sub(progress.started_ms) > d.timeout_ms {
            self.statics.pop(&(source, door));
            return if d.sequence[0] == knock {
                start(&mut self.statics)
            } else {
                *detail = Some(format!(
                    "sequence took longer than {} s",
                    d.timeout_ms / 1000
                ));
                Outcome::Rejected(Reason::Timeout)
            };
        }
        if d.sequence[progress.matched] == knock {
            progress.matched += 1;
            if progress.matched == need {
                self.statics.pop(&(source, door));
                return Outcome::Accepted(Action::Open);
            }
            self.statics.put((source, door), progress);
            return Outcome::Progress {
                have: progress.matched as u8,
                need: need as u8,
            };
        }
        if d.sequence[progress.matched - 1] == knock {
            // Classic clients may repeat a knock (a retransmitted SYN);
            // tolerate it without losing progress.
            return Outcome::Duplicate;
        }
        self.statics.pop(&(source, door));
        *detail = Some(format!(
            "expected {} after {} of {need}, got {knock}",
            d.sequence[progress.matched], progress.matched
        ));
        if d.sequence[0] == knock {
            // The wrong knock may be the start of a fresh attempt.
            start(&mut self.statics);
        }
        Outcome::Rejected(Reason::WrongKnock)
    }

    fn one_time_knock(&mut self, knock: &KnockIn<'_>, now_ms: u64, decision: &mut Draft) {
        let reject = |decision: &mut Draft, reason| decision.outcome = Outcome::Rejected(reason);
        let (fields, raw) = match proto::Knock::parse(knock.payload) {
            Ok(parsed) => parsed,
            Err(e) => {
                decision.detail = Some(e.to_string());
                return reject(decision, Reason::Malformed);
            }
        };
        // The window (§7 rule 1): the steps whose knock ports the server
        // listens on. A knock that claims a step outside it cannot be
        // matched to a device (its port is not derived for that step), so
        // it is a clock_skew reject, unauthenticated: it names no device.
        let window = self.doors.iter().find_map(|d| match &d.kind {
            Judging::OneTime(one_time) if one_time.range.contains(&knock.destination.port()) => {
                Some((
                    d.name.clone(),
                    one_time.built_for.unwrap_or(0),
                    one_time.window(),
                ))
            }
            _ => None,
        });
        if let Some((door, server_step, window)) = window
            && fields.step.abs_diff(server_step) > window
        {
            decision.door = Some(door);
            decision.detail = Some(format!(
                "the knock is for step {}, {} steps from the server's; only ±{window} are listened on, so it cannot be authenticated",
                fields.step,
                fields.step as i128 - server_step as i128
            ));
            return reject(decision, Reason::ClockSkew);
        }
        let candidates = self
            .port_index
            .get(&knock.destination.port())
            .into_iter()
            .flatten()
            .filter(|c| c.step == fields.step && c.index == fields.index);
        let mut tried = None;
        let mut authentic = None;
        for candidate in candidates {
            let Judging::OneTime(door) = &self.doors[candidate.door].kind else {
                continue;
            };
            let Some((_, keys)) = door.keys.iter().find(|(d, _)| *d == candidate.device) else {
                continue;
            };
            tried = Some(candidate.door);
            if keys.verify(raw) {
                authentic = Some((*candidate, keys.clone()));
                break;
            }
        }
        let Some((candidate, keys)) = authentic else {
            decision.door = tried.map(|d| self.doors[d].name.clone());
            return reject(
                decision,
                if tried.is_some() {
                    Reason::BadMac
                } else {
                    Reason::UnknownDevice
                },
            );
        };
        // Authenticated from here on: the log may name the device.
        decision.door = Some(self.doors[candidate.door].name.clone());
        decision.device = Some(self.device_ids[candidate.device].clone());
        let Judging::OneTime(door) = &self.doors[candidate.door].kind else {
            unreachable!("candidates only name one-time doors")
        };
        // `time` is the sender's clock when it built the sequence; `step`
        // must be its step, or the offset the skew check reports would not
        // be the one that made it fail.
        if proto::step_of(fields.time_ms, door.step_secs) != fields.step {
            decision.detail = Some(format!(
                "time {} ms is in step {}, the knock says step {}",
                fields.time_ms,
                proto::step_of(fields.time_ms, door.step_secs),
                fields.step
            ));
            return reject(decision, Reason::Malformed);
        }
        let now_step = proto::step_of(now_ms, door.step_secs);
        if fields.step.abs_diff(now_step) > u64::from(door.skew_steps) {
            let offset_ms = fields.time_ms as i128 - now_ms as i128;
            decision.detail = Some(format!(
                "the client's clock is {:.1} s {} ({} steps; ±{} accepted)",
                offset_ms.abs() as f64 / 1000.0,
                if offset_ms >= 0 { "ahead" } else { "behind" },
                fields.step as i128 - now_step as i128,
                door.skew_steps
            ));
            return reject(decision, Reason::ClockSkew);
        }
        if let Some(bind) = fields.bind {
            if bind != knock.source.ip() {
                decision.detail = Some(format!("the knock asks for {bind}"));
                return reject(decision, Reason::SourceMismatch);
            }
            decision.grant_to = bind;
        }
        let need = match fields.kind {
            Kind::Open => door.knocks,
            Kind::Close | Kind::Heartbeat => 1,
        };
        if fields.count != need {
            decision.detail = Some(format!(
                "{} sequences have {need} knocks here, this one {}",
                fields.kind.name(),
                fields.count
            ));
            return reject(decision, Reason::WrongCount);
        }
        let key = SequenceKey {
            door: candidate.door,
            device: candidate.device,
            nonce: fields.nonce,
        };
        if self.consumed.contains_key(&key) {
            return reject(decision, Reason::Replay);
        }
        if need > 1 {
            let bit = 1u16 << fields.index;
            let pending = match self.pending.get_mut(&key) {
                Some(pending) => pending,
                None => {
                    self.make_room_for(candidate.device);
                    self.pending.push(
                        key,
                        Pending {
                            source: knock.source.ip(),
                            step: fields.step,
                            seen: 0,
                        },
                    );
                    self.pending.get_mut(&key).expect("just inserted")
                }
            };
            if pending.source != knock.source.ip() {
                decision.detail = Some(format!("the sequence began from {}", pending.source));
                return reject(decision, Reason::SourceMismatch);
            }
            if pending.seen & bit != 0 {
                decision.outcome = Outcome::Duplicate;
                return;
            }
            pending.seen |= bit;
            let have = pending.seen.count_ones() as u8;
            if have < need {
                decision.outcome = Outcome::Progress { have, need };
                return;
            }
            self.pending.pop(&key);
        }
        let accepts = self
            .accepts
            .entry((candidate.device, fields.step))
            .or_default();
        if *accepts >= ACCEPTS_PER_DEVICE_STEP {
            decision.detail = Some(format!(
                "more than {ACCEPTS_PER_DEVICE_STEP} sequences in one step"
            ));
            return reject(decision, Reason::RateLimited);
        }
        *accepts += 1;
        self.consumed.insert(key, fields.step);
        decision.consumed = Some(Consumed {
            door: self.doors[candidate.door].name.clone(),
            device: self.device_ids[candidate.device].clone(),
            step: fields.step,
            nonce: fields.nonce,
        });
        decision.outcome = Outcome::Accepted(match fields.kind {
            Kind::Open => Action::Open,
            Kind::Close => Action::Close,
            Kind::Heartbeat => Action::Heartbeat,
        });
        decision.reply = Some(ReplyTo {
            keys,
            nonce: fields.nonce,
            kind: fields.kind,
            from: knock.destination,
            to: knock.source,
        });
    }

    /// Evicts the device's oldest partial sequence if it has too many.
    fn make_room_for(&mut self, device: DeviceId) {
        let mine: Vec<SequenceKey> = self
            .pending
            .iter()
            .rev()
            .filter(|(key, _)| key.device == device)
            .map(|(key, _)| *key)
            .collect();
        if mine.len() >= PENDING_PER_DEVICE {
            self.pending.pop(&mine[0]);
        }
    }
}

/// Table sizes, see [`Engine::state_sizes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct StateSizes {
    pub pending: usize,
    pub consumed: usize,
    pub accepts: usize,
    pub statics: usize,
    pub knock_ports: usize,
}

#[cfg(test)]
mod tests;
