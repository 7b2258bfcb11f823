//! The daemon's configuration: typed YAML, unknown keys rejected, and every
//! error naming the dotted key it is about (`knock.udp[1]: start 7002 > end 7000`).
//!
//! Parsing happens in two steps: serde (through `serde_path_to_error`, so a
//! type error or an unknown key carries its path), then [`Config::validate`]
//! for the rules serde cannot express.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, de::DeserializeOwned};

pub mod duplicates;
mod ports;
mod validate;

pub use ports::{KnockPort, PortRange, Proto};
pub use validate::{DEVICE_ID_MAX, STATIC_SEQUENCE_MAX, is_valid_name};

/// Where the XDP program pins its maps unless the config says otherwise.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/knockd";
/// Where the control socket is unless the config says otherwise (systemd's
/// RuntimeDirectory=knockd).
pub const DEFAULT_CONTROL_SOCKET: &str = "/run/knockd/control.sock";
/// Where persistent state lives unless the config says otherwise (systemd's
/// StateDirectory=knockd).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/knockd";

/// Longest interface name Linux accepts (IFNAMSIZ minus the NUL).
const IFNAME_MAX: usize = 15;
/// Upper bound on the per-source knock rate and burst: beyond this the limit
/// is no limit, and the token arithmetic in the kernel stays far from overflow.
const KNOCK_RATE_MAX: u32 = 1_000_000;
/// Live grants a host holds unless the config says otherwise.
pub const DEFAULT_MAX_GRANTS: u32 = 200_000;
/// The most `max_grants` may be: the allow map it sizes costs about 100 MiB
/// of kernel memory a million grants (`knockd check-config` prints it).
pub const MAX_GRANTS_LIMIT: u32 = 8_000_000;

/// A configuration error, always naming its source: the file, or the dotted
/// key inside it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed, a value has the wrong type, or a key is unknown.
    #[error("{path}: {key}: {message}")]
    Parse {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// The values parse but break a rule.
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl Error {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Why a configuration file that names hooks must not be trusted: not
/// root's, or writable by others than its owner.
fn hooks_file_problem(uid: u32, mode: u32) -> Option<String> {
    if uid != 0 {
        return Some(format!("owned by uid {uid}, not root"));
    }
    if mode & 0o022 != 0 {
        return Some(format!(
            "mode {:04o}: group or others may write it",
            mode & 0o7777
        ));
    }
    None
}

/// How to attach the XDP program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic mode with a warning when
    /// the driver cannot run XDP.
    #[default]
    Auto,
    /// Native mode only: never generic (without it, `without_xdp` applies).
    Native,
    /// Generic (skb) mode: works on any interface, at a lower packet rate.
    Generic,
}

/// What knockd does when the kernel refuses the XDP program or its
/// attachment (an old kernel's verifier, a driver, missing BTF).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WithoutXdp {
    /// Run on nftables alone, which enforces every protected port anyway:
    /// no line-rate drop and no per-source knock rate limit in the kernel,
    /// knocks read from a packet socket. Logged at err, shown in status and
    /// metrics. The default, because a host left open or a daemon that
    /// will not start is worse than a slower guard.
    #[default]
    Nftables,
    /// Exit (status 69, which the unit does not restart) saying at err that
    /// the ports are not protected: for hosts where the line-rate drop is
    /// the point.
    Refuse,
}

/// What the guard does with ports the configuration does not mention.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClosedPorts {
    /// Leave them to the host's own firewall (today's behaviour).
    #[default]
    Pass,
    /// A dark host: a bare TCP SYN to any port that is neither public nor
    /// granted is dropped in XDP; UDP that starts no known flow, and ICMP
    /// echo requests, are dropped in nftables (they need conntrack to tell
    /// a reply from a probe). Replies to the host's own connections and
    /// established flows pass.
    Drop,
}

/// The whole configuration file. `D` is how doors are held: as written
/// ([`RawDoor`], what serde reads and [`Config::validate`] checks), or as
/// [`Door`], the typed form everything else uses (the default).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config<D = Door> {
    /// Interfaces to attach the XDP guard to. Traffic arriving elsewhere is
    /// not protected, so the list must not be empty.
    pub interfaces: Vec<String>,
    /// How to attach to each interface.
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// What to do when XDP cannot be had.
    #[serde(default)]
    pub without_xdp: WithoutXdp,
    /// Ports dropped unless a grant admits the source.
    #[serde(default)]
    pub protect: PortSet,
    /// Ports whose packets are knocks (and so are protected too).
    #[serde(default)]
    pub knock: KnockSection,
    /// What happens to a new connection or datagram to a port no rule
    /// here mentions: `pass` (the default) leaves it to the host's own
    /// firewall, so closed ports answer as they always did (RST, ICMP
    /// port unreachable); `drop` makes the host dark (R-XDP-6).
    #[serde(default)]
    pub closed_ports: ClosedPorts,
    /// Ports anyone may reach even with `closed_ports: drop`, such as a
    /// web server's 80 and 443. They must not be protected, knock, service
    /// or grant ports.
    #[serde(default)]
    pub public: PortSet,
    /// bpffs directory the maps are pinned under, so `knockd stats` and later
    /// a restarted daemon can find them.
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
    /// Where the daemon keeps state that must survive a restart: the record
    /// of consumed one-time sequences, so a replay after a restart fails.
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// A directory of device files (`*.yaml`), so provisioning a device never
    /// edits this file. Devices may also be listed under `devices`.
    #[serde(default)]
    pub devices_dir: Option<PathBuf>,
    /// The protected services and how they are opened, by name.
    #[serde(default = "BTreeMap::new")]
    pub doors: BTreeMap<String, D>,
    /// Devices that may knock, by id.
    #[serde(default)]
    pub devices: BTreeMap<String, DeviceEntry>,
    /// The control socket `knockctl` talks to.
    #[serde(default = "default_control_socket")]
    pub control_socket: PathBuf,
    /// A group whose members may use the control socket too (it is 0660
    /// for that group, else 0600, root only).
    #[serde(default)]
    pub control_group: Option<String>,
    /// An OpenMetrics endpoint (`GET /metrics`), off unless set. It must
    /// listen on a loopback address: metrics are for the host's own scraper.
    #[serde(default)]
    pub metrics: Option<Metrics>,
    /// Fleet mode: devices, consumed sequences and cluster doors' grants
    /// shared through etcd (`docs/CLUSTER.md`). Without it every node is an
    /// island, as before.
    #[serde(default)]
    pub cluster: Option<Cluster>,
    /// The most grants this host holds at once (every door, every address
    /// and device). It sizes the XDP allow map when knockd starts, so the
    /// kernel memory is reserved up front; a knock past it is refused,
    /// naming it, and changes nothing. A restart applies a new value.
    #[serde(default = "default_max_grants")]
    pub max_grants: u32,
}

fn default_max_grants() -> u32 {
    DEFAULT_MAX_GRANTS
}

/// The `cluster:` section: where etcd is and who this node is.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// This node's name, unique in the fleet (it names its heartbeat key
    /// and the grants it publishes).
    pub name: String,
    /// etcd client URLs, such as `https://10.0.0.1:2379`.
    pub endpoints: Vec<String>,
    /// Every key knockd writes starts with this (default `/knockd/`), so
    /// one etcd can serve several fleets, and etcd roles can confine them.
    #[serde(default = "default_cluster_prefix")]
    pub prefix: String,
    /// The cluster key (64 hex digits, root-only, the same on every node):
    /// device keys are sealed under it in etcd, so an etcd backup alone
    /// gives away no device key.
    #[serde(default = "default_cluster_key_file")]
    pub key_file: PathBuf,
    /// TLS to etcd (https endpoints).
    #[serde(default)]
    pub tls: Option<ClusterTls>,
    /// etcd user authentication. With client certificates and
    /// `--client-cert-auth`, etcd takes the certificate's CN as the user
    /// instead.
    #[serde(default)]
    pub user: Option<String>,
    /// File holding the user's password (root-only, like a key file).
    #[serde(default)]
    pub password_file: Option<PathBuf>,
    /// How long one etcd request may take before the node counts etcd as
    /// unreachable for it, in milliseconds (default 1000).
    #[serde(default = "default_cluster_timeout_ms")]
    pub timeout_ms: u32,
}

/// Client TLS to etcd.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterTls {
    /// The CA that signed etcd's server certificates.
    pub ca_file: PathBuf,
    /// This node's client certificate and key, for `--client-cert-auth`.
    #[serde(default)]
    pub cert_file: Option<PathBuf>,
    #[serde(default)]
    pub key_file: Option<PathBuf>,
}

fn default_cluster_prefix() -> String {
    "/knockd/".to_owned()
}

fn default_cluster_key_file() -> PathBuf {
    PathBuf::from("/etc/knockd/cluster.key")
}

fn default_cluster_timeout_ms() -> u32 {
    1000
}

/// Where a one-time door's grants hold.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// On the node that accepted the knock (the default).
    #[default]
    Local,
    /// On every node of the fleet, through etcd.
    Cluster,
}

/// What a one-time door does with an accepted knock while etcd cannot
/// confirm its sequence is fresh fleet-wide.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnClusterUnavailable {
    /// Refuse it (`cluster_unavailable`): fail closed, the default.
    #[default]
    Closed,
    /// Act on it here, with this node's replay record only: the sequence
    /// could still be replayed to another node that is cut off too.
    Local,
}

/// The metrics endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// Address and port, such as `127.0.0.1:9477` or `[::1]:9477`.
    pub listen: std::net::SocketAddr,
}

fn default_control_socket() -> PathBuf {
    PathBuf::from(DEFAULT_CONTROL_SOCKET)
}

fn default_bpffs_dir() -> PathBuf {
    PathBuf::from(DEFAULT_BPFFS_DIR)
}

fn default_state_dir() -> PathBuf {
    PathBuf::from(DEFAULT_STATE_DIR)
}

/// How a door is opened.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum DoorMode {
    /// Time-based one-time sequences keyed per device (R-AUTH-2).
    #[default]
    OneTime,
    /// A fixed port sequence, compatible with classic knockd clients
    /// (R-AUTH-1). Anyone who sees it can replay it.
    Static,
}

/// Who may open a one-time door.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Allow {
    /// Devices in any of these groups.
    #[serde(default)]
    pub groups: Vec<String>,
    /// These devices, by id.
    #[serde(default)]
    pub devices: Vec<String>,
}

/// A door as the file writes it: every setting of either mode optional.
/// [`Config::validate`] rejects fields of the other mode (so a door never
/// silently carries settings that do nothing), and the conversion to
/// [`Door`] applies the defaults, once.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDoor {
    /// The TCP port of the service behind the door (sshd's 22, say). It is
    /// protected: reachable only through a grant. A static door may leave
    /// it out to be an action door: its grant opens no port and only runs
    /// its hooks (classic knockd's sections that wake or start something).
    pub service_port: Option<u16>,
    /// Static: `tcp` (default) or `udp`, the service's protocol (a
    /// WireGuard or OpenVPN server's `udp`). A UDP service port is guarded
    /// by knockd's nftables table rather than XDP: only conntrack can tell
    /// a datagram of a flow a grant let in from a new one.
    pub service_protocol: Option<Proto>,
    /// `one_time` (default) or `static`.
    #[serde(default)]
    pub mode: DoorMode,
    /// How long a grant admits new connections, in seconds (default 30).
    /// Established connections outlive it.
    pub open_for_secs: Option<u32>,
    /// How long a connection a grant let in may live, in seconds (default
    /// 86400; 0: no cap). At the cap it is cut the way `knockctl revoke`
    /// cuts; heartbeats do not extend it (R-GRANT-3).
    pub max_session_secs: Option<u32>,
    /// The TCP range grants are drawn from (default 40000-40999): each
    /// grant is a random free port here, redirected to the service port for
    /// the granted source only. Doors may share a range: a port serves one
    /// grant at a time.
    pub grant_ports: Option<PortRange>,
    /// Leave the service port reachable without a grant (default false: it
    /// is dropped unless the connection came through a granted port).
    #[serde(default)]
    pub expose_service_port: bool,
    /// A lease (a grant kept alive by heartbeats) ends after this many
    /// seconds without one (default 90).
    pub lease_idle_secs: Option<u32>,
    /// A lease moves to a fresh random port this often, in seconds (default
    /// 300; 0 never rotates). Established connections survive.
    pub rotate_every_secs: Option<u32>,
    /// A grant moves to a fresh port at once after this many SYNs from other
    /// sources hit its port (default 10; 0 never): someone found it.
    pub rotate_on_probes: Option<u32>,
    /// One-time: the UDP range the derived knock ports fall in (default
    /// 7000-7999). The whole range is protected.
    pub knock_ports: Option<PortRange>,
    /// One-time: knocks per sequence (default 3, at most 16).
    pub knocks: Option<u8>,
    /// One-time: length of a time step in seconds (default 30).
    pub step_secs: Option<u32>,
    /// One-time: clock skew accepted, in steps either way (default 1).
    pub skew_steps: Option<u32>,
    /// One-time: the devices and groups that may open the door.
    pub allow: Option<Allow>,
    /// One-time, fleet mode: `cluster` opens the door on every node.
    pub scope: Option<Scope>,
    /// One-time, fleet mode: `closed` (default) or `local`.
    pub on_cluster_unavailable: Option<OnClusterUnavailable>,
    /// Static: the port sequence.
    pub sequence: Option<Vec<KnockPort>>,
    /// Static: seconds a sequence may take from its first knock (default 10).
    pub seq_timeout_secs: Option<u32>,
    /// Commands to run when a grant of this door opens and when it ends.
    pub hooks: Option<Hooks>,
}

/// Commands a door runs when a grant opens and when it ends (classic
/// knockd's start and stop commands, for what is not a firewall rule:
/// waking a service, telling another system). Each is an argv list, run
/// without a shell (unless the operator writes one), as `user`, with the
/// grant's facts in its environment (`KNOCKD_EVENT`, `KNOCKD_DOOR`,
/// `KNOCKD_SOURCE`, `KNOCKD_FAMILY`, `KNOCKD_PORT`, `KNOCKD_DEVICE`) and
/// `%IP%` in an argument replaced by the source address. A hook never
/// delays the grant: it starts after the grant is in place, is killed at
/// `timeout_secs`, and its failure is logged and counted.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hooks {
    /// Run when a grant opens (each accepted open, as classic knockd runs
    /// its start command on each sequence).
    #[serde(default)]
    pub on_open: Vec<String>,
    /// Run when a grant ends: its deadline, a close, a revoke, or a reload
    /// that removes the door.
    #[serde(default)]
    pub on_close: Vec<String>,
    /// The user the commands run as (required: whoever writes the
    /// configuration chooses, knowingly, `root` if it must be).
    pub user: String,
    /// The group (default: the user's own).
    pub group: Option<String>,
    /// Seconds a command may run before it is killed (default 10).
    #[serde(default = "default_hook_timeout")]
    pub timeout_secs: u32,
}

fn default_hook_timeout() -> u32 {
    10
}

/// Defaults and bounds of door settings.
pub mod door_defaults {
    use super::PortRange;
    pub const OPEN_FOR_SECS: u32 = 30;
    pub const MAX_SESSION_SECS: u32 = 86_400;
    pub const GRANT_PORTS: PortRange = PortRange {
        start: 40000,
        end: 40999,
    };
    pub const LEASE_IDLE_SECS: u32 = 90;
    pub const ROTATE_EVERY_SECS: u32 = 300;
    pub const ROTATE_ON_PROBES: u32 = 10;
    pub const KNOCK_PORTS: PortRange = PortRange {
        start: 7000,
        end: 7999,
    };
    pub const KNOCKS: u8 = 3;
    pub const STEP_SECS: u32 = 30;
    pub const SKEW_STEPS: u32 = 1;
    pub const SEQ_TIMEOUT_SECS: u32 = 10;

    /// What a client knocks with on a door of default settings.
    pub fn params() -> crate::proto::DoorParams {
        crate::proto::DoorParams {
            knock_ports: KNOCK_PORTS.start..=KNOCK_PORTS.end,
            knocks: KNOCKS,
            step_secs: STEP_SECS,
        }
    }
}

/// The settings validation reads with their defaults (the same defaults
/// [`Door`] gets).
impl RawDoor {
    /// The TCP range grants are drawn from.
    pub(crate) fn grant_ports(&self) -> PortRange {
        self.grant_ports.unwrap_or(door_defaults::GRANT_PORTS)
    }
    /// One-time knock port range.
    pub(crate) fn knock_ports(&self) -> PortRange {
        self.knock_ports.unwrap_or(door_defaults::KNOCK_PORTS)
    }
    /// Static sequence (empty for one-time doors).
    pub(crate) fn sequence(&self) -> &[KnockPort] {
        self.sequence.as_deref().unwrap_or_default()
    }
}

/// A protected service and how it is opened, with every default applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Door {
    /// The TCP port of the service behind the door: reachable only through
    /// a grant, unless `expose_service_port`. `None` for an action door,
    /// whose grant opens nothing and runs its hooks (static doors only).
    pub service_port: Option<u16>,
    /// The service's protocol: TCP, or UDP (static doors only).
    pub service_protocol: Proto,
    pub expose_service_port: bool,
    /// Seconds a grant admits new connections.
    pub open_for_secs: u32,
    /// Seconds a connection it let in may live (0: no cap).
    pub max_session_secs: u32,
    pub kind: DoorKind,
    /// Commands run when a grant opens or ends.
    pub hooks: Option<Hooks>,
}

/// How a door is opened, and the settings only that way has.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DoorKind {
    /// Time-based one-time sequences keyed per device (R-AUTH-2).
    OneTime(OneTimeDoor),
    /// A fixed port sequence, compatible with classic knockd clients
    /// (R-AUTH-1). Anyone who sees it can replay it.
    Static(StaticDoor),
}

/// A one-time door's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OneTimeDoor {
    /// The TCP range grants are drawn from.
    pub grant_ports: PortRange,
    /// Seconds without a heartbeat after which a lease ends.
    pub lease_idle_secs: u32,
    /// Seconds between rotations of a lease's port (0: never).
    pub rotate_every_secs: u32,
    /// Probes of a leased port that make it move (0: never).
    pub rotate_on_probes: u32,
    /// The UDP range knock ports are derived in.
    pub knock_ports: PortRange,
    /// Knocks per sequence.
    pub knocks: u8,
    /// Length of a time step.
    pub step_secs: u32,
    /// Clock skew accepted, in steps either way.
    pub skew_steps: u32,
    /// Who may open it.
    pub allow: Allow,
    /// Where its grants hold (fleet mode).
    pub scope: Scope,
    /// Whether it fails closed while etcd is unreachable (fleet mode).
    pub on_cluster_unavailable: OnClusterUnavailable,
}

/// A static door's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticDoor {
    pub sequence: Vec<KnockPort>,
    /// Seconds a sequence may take from its first knock.
    pub seq_timeout_secs: u32,
}

impl OneTimeDoor {
    /// What a client needs of these settings to knock (its profile's).
    pub fn params(&self) -> crate::proto::DoorParams {
        crate::proto::DoorParams {
            knock_ports: self.knock_ports.start..=self.knock_ports.end,
            knocks: self.knocks,
            step_secs: self.step_secs,
        }
    }
}

impl Door {
    /// The ports this door's grants land on: a one-time door's whole
    /// `grant_ports` range (a lease's earlier ports after a rotation too),
    /// a static door's service port, none for an action door. What a
    /// revoke, a session cap and the grant table look at.
    pub fn grant_ports(&self) -> std::ops::RangeInclusive<u16> {
        match (&self.kind, self.service_port) {
            (DoorKind::OneTime(o), _) => o.grant_ports.start..=o.grant_ports.end,
            (DoorKind::Static(_), Some(port)) => port..=port,
            #[expect(
                clippy::reversed_empty_ranges,
                reason = "empty on purpose: an action door admits no connection"
            )]
            (DoorKind::Static(_), None) => 1..=0,
        }
    }

    /// The TCP service port a grant lets connections reach, when the door
    /// guards one and does not leave it exposed: the port XDP drops,
    /// sessions are capped on and conflicting rules are looked for.
    pub fn guarded_port(&self) -> Option<u16> {
        self.service_port
            .filter(|_| !self.expose_service_port && self.service_protocol == Proto::Tcp)
    }

    /// The UDP service port of a UDP door, which knockd's nftables table
    /// guards (XDP passes it: see [`RawDoor::service_protocol`]).
    pub fn udp_service_port(&self) -> Option<u16> {
        self.service_port
            .filter(|_| self.service_protocol == Proto::Udp)
    }

    /// The one-time settings, for a one-time door.
    pub fn one_time(&self) -> Option<&OneTimeDoor> {
        match &self.kind {
            DoorKind::OneTime(d) => Some(d),
            DoorKind::Static(_) => None,
        }
    }

    /// The static settings, for a static door.
    pub fn static_door(&self) -> Option<&StaticDoor> {
        match &self.kind {
            DoorKind::Static(d) => Some(d),
            DoorKind::OneTime(_) => None,
        }
    }
}

impl From<RawDoor> for Door {
    /// Applies the defaults; `Config::validate` has checked the rest.
    fn from(raw: RawDoor) -> Door {
        use door_defaults as d;
        let kind = match raw.mode {
            DoorMode::OneTime => DoorKind::OneTime(OneTimeDoor {
                grant_ports: raw.grant_ports(),
                lease_idle_secs: raw.lease_idle_secs.unwrap_or(d::LEASE_IDLE_SECS),
                rotate_every_secs: raw.rotate_every_secs.unwrap_or(d::ROTATE_EVERY_SECS),
                rotate_on_probes: raw.rotate_on_probes.unwrap_or(d::ROTATE_ON_PROBES),
                knock_ports: raw.knock_ports(),
                knocks: raw.knocks.unwrap_or(d::KNOCKS),
                step_secs: raw.step_secs.unwrap_or(d::STEP_SECS),
                skew_steps: raw.skew_steps.unwrap_or(d::SKEW_STEPS),
                allow: raw.allow.unwrap_or_default(),
                scope: raw.scope.unwrap_or_default(),
                on_cluster_unavailable: raw.on_cluster_unavailable.unwrap_or_default(),
            }),
            DoorMode::Static => DoorKind::Static(StaticDoor {
                sequence: raw.sequence.unwrap_or_default(),
                seq_timeout_secs: raw.seq_timeout_secs.unwrap_or(d::SEQ_TIMEOUT_SECS),
            }),
        };
        Door {
            service_port: raw.service_port,
            service_protocol: raw.service_protocol.unwrap_or(Proto::Tcp),
            expose_service_port: raw.expose_service_port,
            open_for_secs: raw.open_for_secs.unwrap_or(d::OPEN_FOR_SECS),
            max_session_secs: raw.max_session_secs.unwrap_or(d::MAX_SESSION_SECS),
            kind,
            hooks: raw.hooks,
        }
    }
}

impl Config<RawDoor> {
    /// The typed configuration: every door with its defaults applied.
    fn into_typed(self) -> Config {
        Config {
            interfaces: self.interfaces,
            xdp_mode: self.xdp_mode,
            without_xdp: self.without_xdp,
            protect: self.protect,
            knock: self.knock,
            closed_ports: self.closed_ports,
            public: self.public,
            bpffs_dir: self.bpffs_dir,
            state_dir: self.state_dir,
            devices_dir: self.devices_dir,
            doors: self
                .doors
                .into_iter()
                .map(|(name, door)| (name, Door::from(door)))
                .collect(),
            devices: self.devices,
            control_socket: self.control_socket,
            control_group: self.control_group,
            metrics: self.metrics,
            cluster: self.cluster,
            max_grants: self.max_grants,
        }
    }
}

/// A device listed in the main file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceEntry {
    /// File holding the device's 256-bit key as 64 hex digits. It must be
    /// owned by root and not readable by group or others.
    pub key_file: PathBuf,
    /// Groups the device belongs to, which doors can allow.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// Ports per transport protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSet {
    /// TCP ports and ranges.
    #[serde(default)]
    pub tcp: Vec<PortRange>,
    /// UDP ports and ranges.
    #[serde(default)]
    pub udp: Vec<PortRange>,
}

/// Knock ports and the per-source limit on knocks reaching userspace.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KnockSection {
    /// TCP knock ports: a bare SYN to one is a knock, for classic knockd
    /// clients that knock with TCP.
    #[serde(default)]
    pub tcp: Vec<PortRange>,
    /// UDP knock ports.
    #[serde(default)]
    pub udp: Vec<PortRange>,
    /// Knock events one source may send to userspace per second, on average.
    /// Past it, the kernel drops the knocks and counts them.
    #[serde(default = "default_rate_per_sec")]
    pub rate_per_sec: u32,
    /// Knock events one source may send in a burst.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_rate_per_sec() -> u32 {
    20
}

fn default_burst() -> u32 {
    40
}

impl Default for KnockSection {
    fn default() -> Self {
        KnockSection {
            tcp: Vec::new(),
            udp: Vec::new(),
            rate_per_sec: default_rate_per_sec(),
            burst: default_burst(),
        }
    }
}

/// Where a YAML document did not fit its type: the dotted key, and what
/// was wrong there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct YamlError {
    pub key: String,
    pub message: String,
}

/// Parses YAML `text` into `T` with the path to any error: the one reader
/// of the configuration, device files and client profiles, so all three
/// name the key at fault the same way.
pub fn parse_yaml<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    refuse_duplicates(text)?;
    parse_yaml_document(serde_yaml::Deserializer::from_str(text))
}

/// A key written twice in one mapping of `text`, as an error naming both
/// lines (see [`duplicates`]).
pub fn refuse_duplicates(text: &str) -> Result<(), YamlError> {
    match duplicates::first(text) {
        Some(duplicate) => Err(YamlError {
            message: duplicate.message(),
            key: duplicate.key,
        }),
        None => Ok(()),
    }
}

/// [`parse_yaml`] for one document of a YAML stream (`---` separated).
pub fn parse_yaml_document<T: DeserializeOwned>(
    document: serde_yaml::Deserializer<'_>,
) -> Result<T, YamlError> {
    serde_path_to_error::deserialize(document).map_err(|e| {
        let key = e.path().to_string();
        let message = e.into_inner().to_string();
        // serde_yaml prefixes its own (shorter) path; keep ours only.
        let message = match message.split_once(": ") {
            Some((prefix, rest)) if key.starts_with(prefix) => rest.to_owned(),
            _ => message,
        };
        YamlError {
            key: if key == "." {
                "(top level)".into()
            } else {
                key
            },
            message,
        }
    })
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        let config = Config::parse(&text, path)?;
        if let Some(name) = config
            .doors
            .iter()
            .find(|(_, d)| d.hooks.is_some())
            .map(|(n, _)| n)
        {
            let meta = std::fs::metadata(path).map_err(|source| Error::Read {
                path: path.to_owned(),
                source,
            })?;
            if let Some((uid, mode)) = crate::platform::owner_and_mode(&meta)
                && let Some(problem) = hooks_file_problem(uid, mode)
            {
                return Err(Error::invalid(
                    format!("doors.{name}.hooks"),
                    format!(
                        "{}: {problem}: hooks run commands, so only root may write the file \
                         that names them (fix: chown root {1} && chmod go-w {1})",
                        path.display(),
                        path.display()
                    ),
                ));
            }
        }
        Ok(config)
    }

    /// Parses and validates `text`; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let raw: Config<RawDoor> = parse_yaml(text).map_err(|e| Error::Parse {
            path: path.to_owned(),
            key: e.key,
            message: e.message,
        })?;
        raw.validate()?;
        Ok(raw.into_typed())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(text, Path::new("test.yaml"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn hooks_are_argv_lists_with_a_user_and_are_checked() {
        let door = |hooks: &str| {
            parse(&format!(
                "interfaces: [eth0]\ndoors: {{ game: {{ service_port: 25565, mode: static, \
                 sequence: [\"1:udp\"], hooks: {{ {hooks} }} }} }}\n"
            ))
        };
        let config = door("on_open: [/srv/wake, \"%IP%\"], user: games").unwrap();
        let hooks = config.doors["game"].hooks.clone().unwrap();
        assert_eq!(hooks.on_open, ["/srv/wake", "%IP%"]);
        assert_eq!((hooks.user.as_str(), hooks.timeout_secs), ("games", 10));
        for (hooks, says) in [
            (
                "user: games",
                "doors.game.hooks.on_open: hooks need on_open, on_close or both",
            ),
            (
                "on_open: [wake], user: games",
                "the program needs an absolute path",
            ),
            (
                "on_close: [/bin/x], user: \"a b\"",
                "hooks.user: \"a b\" is not a user",
            ),
            (
                "on_close: [/bin/x], user: games, timeout_secs: 0",
                "hooks.timeout_secs",
            ),
        ] {
            let e = door(hooks).unwrap_err().to_string();
            assert!(e.contains(says), "{hooks}: {e}");
        }
        assert!(
            door("on_open: [/srv/wake]")
                .unwrap_err()
                .to_string()
                .contains("user"),
            "the user is required"
        );
    }

    #[test]
    fn a_file_naming_hooks_must_be_roots_and_not_writable_by_others() {
        assert_eq!(hooks_file_problem(0, 0o100644), None);
        assert_eq!(hooks_file_problem(0, 0o100600), None);
        assert!(
            hooks_file_problem(1000, 0o100644)
                .unwrap()
                .contains("uid 1000")
        );
        assert!(hooks_file_problem(0, 0o100664).unwrap().contains("0664"));
        assert!(hooks_file_problem(0, 0o100646).unwrap().contains("others"));
    }

    /// Two `ssh:` doors: serde would keep the second, and port 22 (the
    /// first's) would be guarded by nothing.
    #[test]
    fn a_door_written_twice_is_refused_naming_both_lines() {
        let e = err(
            "interfaces: [eth0]\ndoors:\n  ssh: { service_port: 22 }\n  ssh: { service_port: 2222 }\n",
        );
        assert_eq!(
            e,
            "test.yaml: doors.ssh: written twice in one mapping, on lines 3 and 4; YAML would \
             keep only the second without a word, so remove or rename one"
        );
        let e = err("interfaces: [eth0]\ninterfaces: [eth1]\ndoors: {}\n");
        assert!(
            e.contains("interfaces: written twice in one mapping, on lines 1 and 2"),
            "{e}"
        );
    }

    #[test]
    fn cluster_settings_are_checked_and_name_their_field() {
        let base = "interfaces: [eth0]\n";
        let cluster = |extra: &str| {
            format!(
                "{base}cluster:\n  name: n1\n  endpoints: [\"http://198.18.0.21:2379\"]\n{extra}"
            )
        };
        let config = parse(&format!(
            "{}doors: {{ ssh: {{ service_port: 22, scope: cluster, on_cluster_unavailable: local }} }}\n",
            cluster("")
        ))
        .unwrap();
        let c = config.cluster.as_ref().unwrap();
        assert_eq!((c.prefix.as_str(), c.timeout_ms), ("/knockd/", 1000));
        let door = config.doors["ssh"].one_time().unwrap();
        assert_eq!(door.scope, Scope::Cluster);
        assert_eq!(door.on_cluster_unavailable, OnClusterUnavailable::Local);
        for (extra, message) in [
            (
                "  prefix: knockd\n",
                "cluster.prefix: \"knockd\" must start and end with /",
            ),
            (
                "  user: knockd\n",
                "cluster.password_file: cluster.user and cluster.password_file go together",
            ),
            (
                "  key_file: cluster.key\n",
                "cluster.key_file: cluster.key is not an absolute path",
            ),
            (
                "  timeout_ms: 5\n",
                "cluster.timeout_ms: 5 is not in 100-60000",
            ),
            (
                "  tls: { ca_file: /ca.pem }\n",
                "cluster.endpoints[0]: with cluster.tls set, endpoints must be https://",
            ),
        ] {
            let e = err(&cluster(extra));
            assert!(e.starts_with(message), "{extra:?}: {e}");
        }
        assert!(
            err(&format!(
                "{base}cluster: {{ name: n1, endpoints: [\"198.18.0.21:2379\"] }}\n"
            ))
            .contains(
                "cluster.endpoints[0]: \"198.18.0.21:2379\" is not an http:// or https:// URL"
            )
        );
        assert!(
            err(&format!(
                "{base}cluster: {{ name: \"a/b\", endpoints: [] }}\n"
            ))
            .starts_with("cluster.name:")
        );
        // Fleet settings on a door need a cluster section, and a one-time door.
        assert_eq!(
            err(&format!(
                "{base}doors: {{ ssh: {{ service_port: 22, scope: cluster }} }}\n"
            )),
            "doors.ssh.scope: only takes effect in fleet mode: add a cluster: section"
        );
        assert_eq!(
            err(&format!(
                "{}doors: {{ k: {{ service_port: 22, mode: static, sequence: [\"1:udp\"], scope: cluster }} }}\n",
                cluster("")
            )),
            "doors.k.scope: only one_time doors take this setting"
        );
    }

    #[test]
    fn dark_host_settings_parse_and_public_ports_have_one_owner() {
        let config = parse(
            "interfaces: [eth0]\nclosed_ports: drop\npublic: { tcp: [443, \"80-81\"], udp: [546] }\n",
        )
        .unwrap();
        assert_eq!(config.closed_ports, ClosedPorts::Drop);
        assert_eq!(config.public.tcp.len(), 2);
        assert_eq!(
            parse("interfaces: [eth0]\n").unwrap().closed_ports,
            ClosedPorts::Pass
        );
        assert_eq!(
            err("interfaces: [eth0]\nclosed_ports: shut\n"),
            "test.yaml: closed_ports: unknown variant `shut`, expected `pass` or `drop` at line 2 column 15"
        );
        assert_eq!(
            err("interfaces: [eth0]\npublic: { tcp: [22] }\n\
                 doors: { ssh: { service_port: 22 } }\n"),
            "doors.ssh.service_port: 22:tcp is already used by public.tcp[0]"
        );
        assert_eq!(
            err(
                "interfaces: [eth0]\npublic: { udp: [7005] }\ndoors: { ssh: { service_port: 22 } }\n"
            ),
            "doors.ssh.knock_ports: 7005:udp is already used by public.udp[0]"
        );
    }

    #[test]
    fn full_config_parses() {
        let config = parse(
            "interfaces: [eth0, eth1]\n\
             xdp_mode: generic\n\
             protect: { tcp: [22, \"40000-40999\"] }\n\
             knock: { udp: [\"7000-7002\"], tcp: [8000], rate_per_sec: 5, burst: 10 }\n\
             bpffs_dir: /sys/fs/bpf/kd\n",
        )
        .unwrap();
        assert_eq!(config.interfaces, ["eth0", "eth1"]);
        assert_eq!(config.xdp_mode, XdpMode::Generic);
        assert_eq!(
            config.protect.tcp,
            [
                PortRange { start: 22, end: 22 },
                PortRange {
                    start: 40000,
                    end: 40999
                }
            ]
        );
        assert_eq!(
            config.knock.udp,
            [PortRange {
                start: 7000,
                end: 7002
            }]
        );
        assert_eq!(config.knock.tcp[0].start, 8000);
        assert_eq!((config.knock.rate_per_sec, config.knock.burst), (5, 10));
        assert_eq!(config.bpffs_dir, Path::new("/sys/fs/bpf/kd"));
    }

    #[test]
    fn defaults_apply() {
        let config = parse("interfaces: [eth0]\n").unwrap();
        assert_eq!(config.xdp_mode, XdpMode::Auto);
        assert_eq!(config.knock, KnockSection::default());
        assert_eq!(config.bpffs_dir, Path::new(DEFAULT_BPFFS_DIR));
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/knockd.example.yaml");
        Config::load(&path).unwrap();
        // Its commented doors (a static one, an action door) hold too.
        let text = std::fs::read_to_string(&path).unwrap();
        let uncommented: String = text
            .lines()
            .map(|line| match line.strip_prefix("  # ") {
                Some(rest)
                    if rest.starts_with("  ") || (rest.ends_with(':') && !rest.contains(' ')) =>
                {
                    format!("  {rest}\n")
                }
                _ => format!("{line}\n"),
            })
            .collect();
        let config = Config::parse(&uncommented, &path).unwrap();
        assert_eq!(
            config.doors.keys().collect::<Vec<_>>(),
            ["legacy", "ssh", "wake"]
        );
        assert_eq!(config.doors["wake"].service_port, None);
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err("interfaces: [eth0]\nknock: { udp: [7000], rate: 3 }\n");
        assert!(
            e.contains("knock") && e.contains("unknown field `rate`"),
            "{e}"
        );
        let e = err("interfaces: [eth0]\nprotects: {}\n");
        assert!(e.contains("unknown field `protects`"), "{e}");
        let e = err("interfaces: [eth0]\nprotect: { sctp: [1] }\n");
        assert!(e.contains("protect") && e.contains("`sctp`"), "{e}");
    }

    #[test]
    fn bad_ports_name_their_key() {
        let e = err("interfaces: [eth0]\nknock: { udp: [7000, \"7002-7000\"] }\n");
        assert!(
            e.contains("knock.udp[1]") && e.contains("start 7002 > end 7000"),
            "{e}"
        );
        let e = err("interfaces: [eth0]\nprotect: { tcp: [0] }\n");
        assert!(
            e.contains("protect.tcp[0]") && e.contains("not in 1-65535"),
            "{e}"
        );
        let e = err("interfaces: [eth0]\nprotect: { tcp: [70000] }\n");
        assert!(e.contains("protect.tcp[0]"), "{e}");
        let e = err("interfaces: [eth0]\nprotect: { tcp: [-1] }\n");
        assert!(e.contains("protect.tcp[0]"), "{e}");
        let e = err("interfaces: [eth0]\nprotect: { tcp: [\"ssh\"] }\n");
        assert!(
            e.contains("protect.tcp[0]") && e.contains("not a port number"),
            "{e}"
        );
        let e = err("interfaces: [eth0]\nprotect: { tcp: [1.5] }\n");
        assert!(e.contains("protect.tcp[0]"), "{e}");
    }

    #[test]
    fn rule_violations_name_their_key() {
        assert_eq!(
            err("interfaces: []\n"),
            "interfaces: at least one interface is needed"
        );
        let e = err("interfaces: [eth0, eth0]\n");
        assert!(e.starts_with("interfaces[1]: "), "{e}");
        let e = err("interfaces: [averyveryverylongname]\n");
        assert!(e.starts_with("interfaces[0]: "), "{e}");
        let e =
            err("interfaces: [eth0]\nprotect: { udp: [7001] }\nknock: { udp: [\"7000-7002\"] }\n");
        assert_eq!(
            e,
            "knock.udp[0]: 7001:udp is already used by protect.udp[0]"
        );
        let e = err("interfaces: [eth0]\nknock: { burst: 0 }\n");
        assert!(e.starts_with("knock.burst: 0 is not in"), "{e}");
        let e = err("interfaces: [eth0]\nbpffs_dir: relative\n");
        assert!(e.starts_with("bpffs_dir: "), "{e}");
    }

    const DOORS: &str = "interfaces: [eth0]\n\
        devices:\n  laptop: { key_file: /etc/knockd/keys/laptop.key, groups: [admins] }\n\
        doors:\n\
        \x20 ssh: { service_port: 22, allow: { groups: [admins] } }\n\
        \x20 web: { service_port: 443, mode: static, sequence: [\"6000:udp\", 8000, \"9000:udp\"] }\n";

    #[test]
    fn doors_parse_with_defaults() {
        let config = parse(DOORS).unwrap();
        assert_eq!(config.doors["ssh"].open_for_secs, 30);
        let ssh = config.doors["ssh"]
            .one_time()
            .expect("one_time is the default");
        assert_eq!((ssh.knocks, ssh.step_secs, ssh.skew_steps), (3, 30, 1));
        assert_eq!(ssh.knock_ports, door_defaults::KNOCK_PORTS);
        assert_eq!(ssh.grant_ports, door_defaults::GRANT_PORTS);
        assert_eq!(ssh.allow.groups, ["admins"]);
        let web = config.doors["web"].static_door().expect("a static door");
        let seq: Vec<String> = web.sequence.iter().map(ToString::to_string).collect();
        assert_eq!(seq, ["6000:udp", "8000:tcp", "9000:udp"]);
        assert_eq!(web.seq_timeout_secs, 10);
        assert_eq!(config.devices["laptop"].groups, ["admins"]);
        assert_eq!(config.state_dir, Path::new(DEFAULT_STATE_DIR));
    }

    #[test]
    fn door_errors_name_their_key() {
        let with = |extra: &str| err(&format!("{DOORS}{extra}"));
        let e = with("  vpn: { service_port: 1194, sequence: [1] }\n");
        assert_eq!(e, "doors.vpn.sequence: only static doors take this setting");
        let e = with("  vpn: { service_port: 1194, mode: static, knocks: 2, sequence: [1] }\n");
        assert_eq!(e, "doors.vpn.knocks: only one_time doors take this setting");
        let e = with("  vpn: { service_port: 1194, mode: static }\n");
        assert!(
            e.starts_with("doors.vpn.sequence: a static door needs"),
            "{e}"
        );
        let e = with("  vpn: { service_port: 1194, knocks: 17 }\n");
        assert_eq!(e, "doors.vpn.knocks: 17 is not in 1-16");
        let e = with("  vpn: { service_port: 1194, step_secs: 1 }\n");
        assert_eq!(e, "doors.vpn.step_secs: 1 is not in 5-3600");
        let e = with("  vpn: { knocks: 3 }\n");
        assert!(
            e.starts_with("doors.vpn.service_port: missing: a one-time door opens a service"),
            "{e}"
        );
        let e = with("  vpn: { mode: static, sequence: [\"5000:udp\"] }\n");
        assert!(e.contains("needs hooks.on_open to run"), "{e}");
        let e = with(
            "  vpn: { mode: static, sequence: [\"5000:udp\"], \
             hooks: { on_close: [/bin/true], user: root } }\n",
        );
        assert!(e.contains("needs hooks.on_open to run"), "{e}");
        let e = with("  vpn: { service_port: 1194, service_protocol: udp }\n");
        assert_eq!(
            e,
            "doors.vpn.service_protocol: only static doors take this setting"
        );
        let e = with(
            "  vpn: { mode: static, service_protocol: udp, sequence: [\"5000:udp\"], \
             hooks: { on_open: [/bin/true], user: root } }\n",
        );
        assert!(
            e.starts_with("doors.vpn.service_protocol: a door without"),
            "{e}"
        );
        let e = with(
            "  vpn: { service_port: 7001, service_protocol: udp, mode: static, \
             sequence: [\"5000:udp\"] }\n",
        );
        assert_eq!(
            e,
            "doors.vpn.service_port: 7001:udp is already used by doors.ssh.knock_ports"
        );
        let e = with("  vpn: { service_port: 0 }\n");
        assert_eq!(e, "doors.vpn.service_port: port 0 is not in 1-65535");
        let e = with("  vpn: { service_port: 22, knock_ports: \"9000-9100\" }\n");
        assert_eq!(
            e,
            "doors.vpn.service_port: 22:tcp is already used by doors.ssh.service_port"
        );
        let e = with("  vpn: { service_port: 1194, knock_ports: \"7999-8100\" }\n");
        assert_eq!(
            e,
            "doors.vpn.knock_ports: 7999:udp is already used by doors.ssh.knock_ports"
        );
        let e = with("  vpn: { service_port: 1194, knock_ports: \"9000-9100\", mode: static }\n");
        assert_eq!(
            e,
            "doors.vpn.knock_ports: only one_time doors take this setting"
        );
        let e = with(
            "  vpn: { service_port: 1194, mode: static, sequence: [\"5000:udp\", \"5000:udp\"] }\n",
        );
        assert!(
            e.starts_with("doors.vpn.sequence[1]: 5000:udp repeats"),
            "{e}"
        );
        let e = with("  vpn: { service_port: 1194, mode: static, sequence: [\"8000:tcp\"] }\n");
        assert_eq!(
            e,
            "doors.web.sequence[1]: 8000:tcp is already used by doors.vpn.sequence[0]"
        );
        let e = with("  vpn: { service_port: 1194, mode: static, sequence: [\"8000:sctp\"] }\n");
        assert!(
            e.contains("doors.vpn.sequence[0]") && e.contains("\"sctp\" is not tcp or udp"),
            "{e}"
        );
        let e = with("  vpn: { service_port: 1194, colour: blue }\n");
        assert!(
            e.contains("doors.vpn.colour") && e.contains("unknown field"),
            "{e}"
        );
        let e = with("  \"bad door\": { service_port: 1194 }\n");
        assert!(e.starts_with("doors.bad door: "), "{e}");
        let e = err("interfaces: [eth0]\ndevices: { laptop: { key_file: /k, group: [a] } }\n");
        assert!(
            e.contains("devices.laptop.group") && e.contains("unknown field"),
            "{e}"
        );
        let e = err("interfaces: [eth0]\nmetrics: { listen: \"0.0.0.0:9477\" }\n");
        assert_eq!(
            e,
            "metrics.listen: 0.0.0.0 is not a loopback address; the endpoint is for this host only"
        );
        assert!(parse("interfaces: [eth0]\nmetrics: { listen: \"[::1]:9477\" }\n").is_ok());
        let e = err("interfaces: [eth0]\nstate_dir: var/lib\n");
        assert_eq!(e, "state_dir: var/lib is not an absolute path");
    }

    #[test]
    fn type_errors_name_their_key() {
        let e = err("interfaces: eth0\n");
        assert!(e.contains("interfaces"), "{e}");
        let e = err("interfaces: [eth0]\nxdp_mode: turbo\n");
        assert!(e.contains("xdp_mode") && e.contains("turbo"), "{e}");
        let e = err("interfaces: [eth0]\nknock: { rate_per_sec: lots }\n");
        assert!(e.contains("knock.rate_per_sec"), "{e}");
        let e = err(": : :\n");
        assert!(e.starts_with("test.yaml: "), "{e}");
        let e = err("");
        assert!(e.starts_with("test.yaml: "), "{e}");
    }

    #[test]
    fn missing_file_is_named() {
        let e = Config::load(Path::new("/nonexistent/knockd.yaml")).unwrap_err();
        assert_eq!(e.to_string(), "reading /nonexistent/knockd.yaml");
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(source.contains("No such file"), "{source}");
    }
}
