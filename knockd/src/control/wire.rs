//! The control protocol's messages, as types: the daemon builds them and
//! `knockctl` reads them back, so a renamed or retyped field breaks the
//! build instead of a client at run time. No I/O here, and no tokio: the
//! client builds without the daemon.
//!
//! `docs/CONTROL.md` documents the protocol for people and other clients:
//! the framing, every command and reply field, and the version rule.

use std::{collections::BTreeMap, net::IpAddr, path::PathBuf};

use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Protocol version spoken here. Adding a reply field keeps it; removing
/// or renaming a field, changing its type or meaning, or changing a
/// command bumps it (`docs/CONTROL.md`).
pub const VERSION: u32 = 1;
/// Largest request accepted, in bytes.
pub const REQUEST_MAX: usize = 4096;
/// Grants a `status` lists (it counts them all in `grants_total`).
pub const STATUS_GRANTS: usize = 1000;
/// Most grants one `grants_page` reply holds, and the page a request that
/// names no `limit` gets.
pub const PAGE_MAX: u32 = 10_000;

/// Text that must never reach a log: `Debug` shows `<redacted>`.
#[derive(Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(transparent)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// A request, as parsed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    Status,
    /// Every grant in one reply (kept for existing clients; knockctl reads
    /// `grants_page`, which a million grants do not make into one reply).
    Grants,
    /// Up to `limit` grants ([`PAGE_MAX`] at most, and without a limit) in
    /// holder order (address, door, device), from the one after `after`
    /// (from the first without it).
    GrantsPage {
        #[serde(default)]
        after: Option<GrantCursor>,
        #[serde(default)]
        limit: Option<u32>,
    },
    Revoke {
        target: String,
    },
    Reload,
    /// The OpenMetrics text (also what the metrics endpoint serves).
    Metrics,
    /// Fleet mode: add a device to etcd, its key sealed there. `key` is
    /// the device key's 64 hex digits (the socket is root's).
    DeviceAdd {
        id: String,
        #[serde(default)]
        groups: Vec<String>,
        #[serde(default)]
        doors: Vec<String>,
        key: Secret,
    },
    /// Fleet mode: remove a device from etcd (every node forgets it).
    DeviceRemove {
        id: String,
    },
    /// Fleet mode: the devices in etcd, each marked with why nodes refuse
    /// it, if they do.
    DeviceList,
    /// Fleet mode: sign a device record as it stands, its key sealed by a
    /// node of this fleet (a record an older knockd wrote).
    DeviceSign {
        id: String,
    },
    /// Fleet mode: every node's heartbeat, health and grants.
    ClusterStatus,
}

impl Command {
    /// The request line for this command (without the newline).
    pub fn line(&self) -> String {
        let mut value = serde_json::to_value(self).expect("commands serialize");
        value["version"] = VERSION.into();
        value.to_string()
    }
}

#[derive(Deserialize)]
struct Envelope {
    version: u32,
    #[serde(flatten)]
    command: serde_json::Value,
}

/// Parses one request line: bounded, versioned, unknown commands and
/// fields rejected with a message saying which.
pub fn parse(line: &str) -> Result<Command, String> {
    if line.len() > REQUEST_MAX {
        return Err(format!("request longer than {REQUEST_MAX} bytes"));
    }
    let envelope: Envelope =
        serde_json::from_str(line).map_err(|e| format!("not a request: {e}"))?;
    if envelope.version != VERSION {
        return Err(format!(
            "protocol version {} (this daemon speaks {VERSION})",
            envelope.version
        ));
    }
    let command = envelope.command;
    // serde does not reject extra fields on internally tagged unit variants,
    // so each command's fields are checked here.
    let object = command.as_object().ok_or("a request is a JSON object")?;
    let name = object
        .get("command")
        .and_then(serde_json::Value::as_str)
        .ok_or("missing field `command`")?;
    let allowed: &[&str] = match name {
        "revoke" => &["command", "target"],
        "grants_page" => &["command", "after", "limit"],
        "device_add" => &["command", "id", "groups", "doors", "key"],
        "device_remove" | "device_sign" => &["command", "id"],
        _ => &["command"],
    };
    if let Some(extra) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!(
            "bad request: unknown field `{extra}` for command `{name}`"
        ));
    }
    serde_json::from_value(command).map_err(|e| format!("bad request: {e}"))
}

/// A response line: `data` on success (the command's reply type, below),
/// `error` otherwise.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    /// Success carrying `data`.
    pub fn ok(data: impl Serialize) -> Response {
        Response {
            ok: true,
            data: Some(serde_json::to_value(data).expect("replies serialize")),
            error: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            data: None,
            error: Some(message.into()),
        }
    }

    /// The reply as `T`, or the daemon's error.
    pub fn into_data<T: DeserializeOwned>(self) -> Result<T, String> {
        if !self.ok {
            return Err(self.error.unwrap_or_else(|| "unknown error".into()));
        }
        serde_json::from_value(self.data.unwrap_or(serde_json::Value::Null))
            .map_err(|e| format!("a reply this knockctl does not understand: {e}"))
    }
}

/// `status`: the daemon at a glance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    /// The daemon's package version.
    pub version: String,
    pub config: ConfigInfo,
    /// Where the XDP guard is attached.
    pub interfaces: Vec<InterfaceView>,
    /// XDP verdict counters by name; `null` if the maps could not be read.
    pub counters: Option<BTreeMap<String, u64>>,
    /// Their rates since the previous `status`; `null` the first time.
    pub rates_per_sec: Option<BTreeMap<String, f64>>,
    /// Knock decisions by outcome or reason code.
    pub decisions: BTreeMap<String, u64>,
    /// The first [`STATUS_GRANTS`] grants in holder order (address, door,
    /// device); `grants_page` lists them all.
    pub grants: Vec<GrantView>,
    /// Grants live now.
    #[serde(default)]
    pub grants_total: u64,
    /// The most grants the host holds (`max_grants`).
    #[serde(default)]
    pub max_grants: u32,
    /// Connections in progress that a grant let in, with their caps.
    #[serde(default)]
    pub sessions: Vec<SessionView>,
    /// What the counters suggest is wrong, in words (for example knocks
    /// that match no sequence: a client with a wrong key).
    #[serde(default)]
    pub hints: Vec<String>,
    pub sequences_in_progress: SequencesInProgress,
    /// The last errors (at most 20), oldest first.
    pub recent_errors: Vec<RecentError>,
    /// Fleet mode: this node's view of etcd; `null` outside fleet mode.
    #[serde(default)]
    pub cluster: Option<FleetView>,
}

/// This node in fleet mode (in `status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FleetView {
    pub name: String,
    /// Listed etcd and follows its watch: cluster doors are served.
    pub synced: bool,
    /// The etcd revision applied.
    pub revision: i64,
    /// The delay of its watch, from its own heartbeat's round trip.
    pub watch_lag_ms: Option<u64>,
    pub devices_from_etcd: usize,
    /// Accepted knocks waiting for etcd's word on their sequence.
    pub waiting_for_etcd: usize,
    /// Knocks refused because etcd could not be reached.
    pub cluster_unavailable: u64,
    /// Why etcd does not serve this node, while it does not (unreachable,
    /// or refusing its credentials, permissions or certificate).
    #[serde(default)]
    pub etcd_error: Option<String>,
    /// Revokes made here that etcd does not have yet.
    #[serde(default)]
    pub revokes_pending: usize,
}

/// The running configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigInfo {
    /// The file it came from, if any.
    pub path: Option<PathBuf>,
    /// When it was loaded, Unix ms.
    pub loaded_at_ms: u64,
    pub doors: Vec<String>,
}

/// One interface the guard is attached to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceView {
    pub interface: String,
    /// `native`, `generic`, `adopted` (the link an earlier run pinned), or
    /// `nftables-only` (the kernel refused XDP; nftables alone guards it).
    pub mode: String,
    /// Why XDP is not there, with `nftables-only`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Where a page of grants starts: after this holder (the `next` of the
/// page before).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrantCursor {
    pub source: IpAddr,
    pub door: String,
    pub device: Option<String>,
}

/// `grants_page`: a page of the grants.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantPage {
    pub grants: Vec<GrantView>,
    /// Grants live now, on every page.
    pub total: u64,
    /// Where the next page starts; `null` after the last.
    pub next: Option<GrantCursor>,
}

/// One live grant (`grants`, and in `status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantView {
    pub door: String,
    /// The device that opened it; `null` for static doors and grants
    /// adopted after a restart.
    pub device: Option<String>,
    pub source: IpAddr,
    /// The granted port (a static door's: its service port; 0 for an
    /// action door's grant, which opens none).
    pub port: u16,
    /// Whether heartbeats keep it alive.
    pub lease: bool,
    pub secs_left: u64,
    pub rotations: u32,
    /// SYNs from other sources to its port.
    pub probes: u64,
}

/// A connection in progress that a grant let in (in `status`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionView {
    pub door: String,
    /// The client's address and port.
    pub client: std::net::SocketAddr,
    /// The port it connected to (its grant's).
    pub granted_port: u16,
    pub age_secs: u64,
    /// Seconds until `max_session_secs` cuts it; `null` without a cap.
    pub secs_left: Option<u64>,
    /// Whether the age is conntrack's own (true), or counted from when
    /// knockd first saw the session (conntrack kept no timestamp).
    pub stamped: bool,
}

/// Knock sequences begun and not finished.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SequencesInProgress {
    #[serde(rename = "static")]
    pub static_doors: Vec<StaticProgress>,
    pub one_time_pending: usize,
}

/// A static sequence part-way through.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StaticProgress {
    pub source: IpAddr,
    pub door: String,
    /// Knocks matched so far, of `of`.
    pub knocks: usize,
    pub of: usize,
}

/// An error kept for `status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RecentError {
    pub at_ms: u64,
    pub error: String,
}

/// `revoke`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revoked {
    /// Grants ended.
    pub revoked: usize,
    /// Established connections cut.
    pub connections_cut: usize,
}

/// `revoke` in fleet mode: what this node ended, and whether the revoke
/// reached etcd for every other node to carry out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokedFleet {
    /// Grants ended on this node.
    pub revoked: usize,
    /// Connections cut on this node.
    pub connections_cut: usize,
    /// The etcd key every node acts on (`P/revokes/ID`); `null` when etcd
    /// did not take it (then `pending` says why).
    pub published: Option<String>,
    /// Cluster grants of the target removed from etcd.
    pub fleet_grants: usize,
    /// Why etcd does not have the revoke yet: it took effect on this node,
    /// is kept in its state directory, is never undone by a
    /// resynchronisation, and is published when etcd is back. Until then
    /// other nodes still admit the target.
    #[serde(default)]
    pub pending: Option<String>,
}

/// `device_add`, `device_remove`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceChanged {
    pub id: String,
    /// The etcd revision of the change: every node has it once its watch
    /// is there.
    pub revision: i64,
}

/// A device in etcd (`device_list`), without its key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterDevice {
    pub id: String,
    /// What the record says (for a refused one: claims).
    pub groups: Vec<String>,
    pub doors: Vec<String>,
    pub added_by: String,
    pub added_at_ms: u64,
    /// Why every node ignores this record (not signed over all of its
    /// fields, another version, a key that does not open); `null` for a
    /// record the nodes accept.
    #[serde(default)]
    pub refused: Option<String>,
}

/// What a node publishes about itself every second, under a lease
/// (`P/nodes/NAME`), and `cluster_status` shows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeReport {
    pub name: String,
    pub version: String,
    pub started_at_ms: u64,
    /// When this report was written (the node's clock, Unix ms).
    pub at_ms: u64,
    /// Whether it has listed etcd and follows its watch: only then does it
    /// serve cluster doors.
    pub synced: bool,
    /// The etcd revision it has applied.
    pub revision: i64,
    /// How long its own last heartbeat took to come back through its watch
    /// (ms): the delay with which it sees other nodes' changes.
    pub watch_lag_ms: Option<u64>,
    /// Knocks refused because etcd could not be reached (fail closed).
    pub cluster_unavailable: u64,
    /// Its grants (cluster doors' and its own local ones), the first 64.
    pub grants: Vec<GrantView>,
    /// How many grants it holds.
    #[serde(default)]
    pub grants_total: usize,
}

/// A node in `cluster_status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeStatus {
    pub name: String,
    /// `up` (a fresh heartbeat), `stale` (its heartbeat is older than
    /// 5 s) or `down` (a member whose heartbeat key expired).
    pub health: String,
    /// Milliseconds since its last report, by the asking node's clock.
    pub report_age_ms: Option<u64>,
    pub report: Option<NodeReport>,
}

/// `cluster_status`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClusterStatus {
    /// The node that answered.
    pub asked: String,
    /// The etcd revision of the answer.
    pub revision: i64,
    pub nodes: Vec<NodeStatus>,
}

/// `reload`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reloaded {
    /// What was loaded, and what changes only on restart.
    pub reloaded: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(
            parse(r#"{"version":1,"command":"status"}"#),
            Ok(Command::Status)
        );
        assert_eq!(
            parse(r#"{"version":1,"command":"revoke","target":"laptop"}"#),
            Ok(Command::Revoke {
                target: "laptop".into()
            })
        );
        assert!(
            parse(r#"{"version":2,"command":"status"}"#)
                .unwrap_err()
                .contains("version 2")
        );
        assert!(
            parse(r#"{"version":1,"command":"format_disk"}"#)
                .unwrap_err()
                .contains("format_disk")
        );
        assert!(
            parse(r#"{"version":1,"command":"status","extra":1}"#)
                .unwrap_err()
                .contains("extra")
        );
        assert!(
            parse(r#"{"version":1,"command":"revoke"}"#)
                .unwrap_err()
                .contains("target")
        );
        assert!(parse("").is_err());
        assert!(parse("\u{0}\u{1}garbage").is_err());
        assert!(
            parse(&"x".repeat(REQUEST_MAX + 1))
                .unwrap_err()
                .contains("longer")
        );
    }

    #[test]
    fn every_command_round_trips_through_its_line() {
        for command in [
            Command::Status,
            Command::Grants,
            Command::Revoke {
                target: "198.18.0.2".into(),
            },
            Command::Reload,
            Command::Metrics,
            Command::GrantsPage {
                after: None,
                limit: None,
            },
            Command::GrantsPage {
                after: Some(GrantCursor {
                    source: "2001:db8::2".parse().unwrap(),
                    door: "ssh".into(),
                    device: Some("laptop".into()),
                }),
                limit: Some(500),
            },
        ] {
            assert_eq!(parse(&command.line()), Ok(command));
        }
    }

    /// The field names are the protocol: a reply read back is the reply
    /// sent, and the names on the wire are the documented ones.
    #[test]
    fn replies_round_trip_with_their_documented_names() {
        let grant = GrantView {
            door: "ssh".into(),
            device: Some("laptop".into()),
            source: "198.18.0.2".parse().unwrap(),
            port: 40123,
            lease: true,
            secs_left: 29,
            rotations: 1,
            probes: 0,
        };
        let status = StatusReport {
            version: "0.1.0".into(),
            config: ConfigInfo {
                path: Some("/etc/knockd/knockd.yaml".into()),
                loaded_at_ms: 1,
                doors: vec!["ssh".into()],
            },
            interfaces: vec![InterfaceView {
                interface: "eth0".into(),
                mode: "native".into(),
                error: None,
            }],
            counters: Some([("drop_protected".to_owned(), 3)].into()),
            rates_per_sec: None,
            decisions: [("accepted".to_owned(), 1)].into(),
            grants: vec![grant.clone()],
            grants_total: 1,
            max_grants: 200_000,
            sessions: vec![SessionView {
                door: "ssh".into(),
                client: "198.18.0.2:50000".parse().unwrap(),
                granted_port: 40123,
                age_secs: 5,
                secs_left: Some(86_395),
                stamped: true,
            }],
            hints: Vec::new(),
            sequences_in_progress: SequencesInProgress {
                static_doors: vec![StaticProgress {
                    source: "198.18.0.3".parse().unwrap(),
                    door: "legacy".into(),
                    knocks: 1,
                    of: 3,
                }],
                one_time_pending: 0,
            },
            recent_errors: vec![RecentError {
                at_ms: 2,
                error: "e".into(),
            }],
            cluster: None,
        };
        let line = serde_json::to_string(&Response::ok(&status)).unwrap();
        let back: Response = serde_json::from_str(&line).unwrap();
        assert_eq!(back.into_data::<StatusReport>(), Ok(status));
        for name in [
            "\"config\":{",
            "\"path\":",
            "\"loaded_at_ms\"",
            "\"secs_left\"",
            "\"sequences_in_progress\"",
            "\"static\":[",
            "\"recent_errors\"",
            "\"grants_total\":1",
            "\"max_grants\":200000",
        ] {
            assert!(line.contains(name), "{name} in {line}");
        }
        let revoked = serde_json::to_string(&Revoked {
            revoked: 1,
            connections_cut: 2,
        })
        .unwrap();
        assert_eq!(revoked, r#"{"revoked":1,"connections_cut":2}"#);
        assert_eq!(
            Response::error("no").into_data::<Revoked>(),
            Err("no".into())
        );
    }
}
