//! Fleet mode: the one owner of etcd. A task of its own holds the client,
//! lists and watches the prefix, publishes this node's heartbeat, and runs
//! the writes the daemon asks for; the daemon's event loop never waits on
//! etcd. It talks to the daemon through two channels: [`Request`]s in,
//! [`Event`]s out (`docs/CLUSTER.md` has the design).
//!
//! Failure is ordinary here: any request that etcd does not answer within
//! `timeout_ms` is answered "unavailable", and a watch that breaks (etcd
//! gone, no quorum with `require_leader`, a compacted revision) ends the
//! session: the daemon hears [`Event::Lost`], and the task connects, lists
//! and watches again from the listed revision before it says
//! [`Event::Synced`].

#[cfg(feature = "cluster")]
mod etcd;
pub mod model;
pub mod replication;
pub mod revokes;

use tokio::sync::{mpsc, oneshot};

use crate::{
    auth::Consumed,
    config::Cluster,
    control::{Response, wire::NodeReport},
    grants::Holder,
    proto::DeviceKey,
};
use model::{GrantRecord, Refused, RevokeRecord};

/// Why fleet mode cannot start (read at start-up and reload: a bad key or
/// password file is named; the file's problem is the cause).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cluster.key_file")]
    Key(#[source] crate::devices::Error),
    #[error("cluster.password_file")]
    Password(#[source] crate::devices::Error),
    #[error(
        "cluster: this knockd was built without fleet mode (cargo feature `cluster`); remove the section or use a build with it"
    )]
    NotBuilt,
}

/// What kind of trouble an etcd failure is: the operator's to fix
/// (credentials, permissions, TLS), which retrying does not cure, or the
/// network's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Trouble {
    Authentication,
    Permission,
    Tls,
    Unreachable,
}

impl Trouble {
    /// Every kind, for the metrics.
    pub const ALL: [Trouble; 4] = [
        Trouble::Authentication,
        Trouble::Permission,
        Trouble::Tls,
        Trouble::Unreachable,
    ];

    /// The kind's name in logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Trouble::Authentication => "authentication",
            Trouble::Permission => "permission",
            Trouble::Tls => "tls",
            Trouble::Unreachable => "unreachable",
        }
    }
}

/// An etcd failure: what kind of trouble, and what happened, in words.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct EtcdError {
    pub trouble: Trouble,
    pub message: String,
}

impl EtcdError {
    /// A failure of the network or of etcd's availability.
    pub fn unreachable(message: impl Into<String>) -> EtcdError {
        EtcdError {
            trouble: Trouble::Unreachable,
            message: message.into(),
        }
    }

    /// The same failure, saying what was being done.
    pub fn context(self, what: impl std::fmt::Display) -> EtcdError {
        EtcdError {
            message: format!("{what}: {}", self.message),
            ..self
        }
    }
}

/// Replies and status lines carry the words.
impl From<EtcdError> for String {
    fn from(e: EtcdError) -> String {
        e.message
    }
}

/// What the daemon asks of etcd.
#[derive(Debug)]
pub enum Request {
    /// Record a one-time sequence as used, fleet-wide; answered with
    /// [`Event::Consumed`] carrying `token`.
    Consume {
        consumed: Consumed,
        /// Seconds the record must outlive (the door's acceptance window).
        window_secs: u64,
        token: u64,
    },
    /// Publish a cluster door's grant (every node installs it).
    PutGrant {
        holder: Holder,
        record: GrantRecord,
    },
    /// Withdraw a cluster door's grant (a close, a revoke).
    DeleteGrant {
        holder: Holder,
    },
    /// Publish a revoke (at `P/revokes/ID`, signed there), and delete
    /// the cluster grants in etcd it ends, in one transaction; answered
    /// with [`Event::RevokePublished`] or [`Event::RevokeNotPublished`].
    Revoke {
        id: String,
        record: RevokeRecord,
    },
    DeviceAdd {
        id: String,
        groups: Vec<String>,
        doors: Vec<String>,
        key: DeviceKey,
        reply: oneshot::Sender<Response>,
    },
    DeviceRemove {
        id: String,
        reply: oneshot::Sender<Response>,
    },
    DeviceList {
        reply: oneshot::Sender<Response>,
    },
    /// Sign a device record as it stands (`device sign`).
    DeviceSign {
        id: String,
        reply: oneshot::Sender<Response>,
    },
    Status {
        reply: oneshot::Sender<Response>,
    },
    /// This node's report, published with the next heartbeat.
    Report(Box<NodeReport>),
}

/// What etcd told us, for the daemon to act on.
#[derive(Debug)]
pub enum Event {
    /// The node listed etcd at `revision` and watches from there: these
    /// are every device and cluster grant, and the recent revokes.
    Synced {
        revision: i64,
        devices: Vec<FleetDevice>,
        grants: Vec<(Holder, GrantRecord, i64)>,
        /// By id.
        revokes: Vec<(String, RevokeRecord)>,
    },
    /// etcd cannot be reached, or the watch broke: cluster doors fail
    /// closed until the next `Synced`.
    Lost(EtcdError),
    /// The answer to a [`Request::Consume`]: `Ok(true)` this node was
    /// first, `Ok(false)` another node (or this one) consumed it already.
    Consumed {
        token: u64,
        result: Result<bool, String>,
    },
    /// A device was added or changed (`Some`), or removed (`None`).
    /// `None` also stands for a record this node cannot read.
    Device {
        id: String,
        device: Option<FleetDevice>,
    },
    /// A cluster grant was published (`Some`) or withdrawn or expired.
    Grant {
        holder: Holder,
        record: Option<GrantRecord>,
        revision: i64,
    },
    /// Our own grant write reached etcd at `revision`.
    GrantWritten { holder: Holder, revision: i64 },
    /// A revoke to carry out (unless this node has, by its id).
    Revoke {
        id: String,
        record: RevokeRecord,
        revision: i64,
    },
    /// etcd took our revoke `id`, at etcd key `key`.
    RevokePublished {
        id: String,
        key: String,
        fleet_grants: usize,
    },
    /// Our revoke `id` did not reach etcd.
    RevokeNotPublished { id: String, why: String },
    /// A record in etcd that this node ignores (`what` it claims to be,
    /// at etcd key `key`).
    Refused {
        what: String,
        key: String,
        why: Refused,
    },
    /// The watch is at `revision`; `lag_ms` when our heartbeat came back.
    Progress { revision: i64, lag_ms: Option<u64> },
    /// Our grant write failed: etcd does not have this grant, though this
    /// node installed it.
    PublishFailed { holder: Holder, why: String },
    /// Our delete of a grant this node ended failed: etcd still has it.
    WithdrawFailed { holder: Holder, why: String },
}

/// A device from etcd, its key opened (once, here).
#[derive(Debug, Clone)]
pub struct FleetDevice {
    pub device: crate::devices::Device,
    /// The node whose `device add` wrote it.
    pub added_by: String,
}

/// The daemon's end: where requests go.
#[derive(Debug, Clone)]
pub struct Link {
    tx: mpsc::UnboundedSender<Request>,
    /// This node's name (`cluster.name`).
    pub name: String,
}

impl Link {
    /// A link to no task: the unit tests read what the daemon sends.
    #[cfg(test)]
    pub fn fake(name: &str) -> (Link, mpsc::UnboundedReceiver<Request>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let link = Link {
            tx,
            name: name.to_owned(),
        };
        (link, rx)
    }

    /// Sends a request; if the task is gone (it never ends while the
    /// daemon runs) the request is dropped, and a reply channel with it.
    pub fn send(&self, request: Request) {
        let _ = self.tx.send(request);
    }
}

/// This node's membership of the fleet: its `cluster:` section with the
/// cluster key and etcd password read from their files. Everything the
/// task needs, read before it starts so a bad file fails start-up with its
/// name.
#[cfg_attr(
    not(feature = "cluster"),
    expect(
        dead_code,
        reason = "Membership::load refuses without the cluster feature"
    )
)]
pub struct Membership {
    config: Cluster,
    cluster_key: DeviceKey,
    password: Option<String>,
}

impl Membership {
    pub fn load(config: &Cluster) -> Result<Membership, Error> {
        if !cfg!(feature = "cluster") {
            return Err(Error::NotBuilt);
        }
        let cluster_key = crate::devices::load_key(&config.key_file, 0).map_err(Error::Key)?;
        let password = match &config.password_file {
            Some(path) => Some(
                crate::devices::load_secret(path, 0)
                    .map_err(Error::Password)?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(Membership {
            config: config.clone(),
            cluster_key,
            password,
        })
    }
}

/// `knockd check-config --cluster`: connects to every endpoint as a node
/// would and reads and writes under the prefix. A line per endpoint; `Err`
/// (the same lines) when none answered in full.
#[cfg(feature = "cluster")]
pub fn probe(settings: &Membership) -> Result<Vec<String>, Vec<String>> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| vec![format!("cluster: starting the runtime: {e}")])?
        .block_on(etcd::probe(settings))
}

/// Without the `cluster` feature, [`Membership::load`] refuses first.
#[cfg(not(feature = "cluster"))]
pub fn probe(_settings: &Membership) -> Result<Vec<String>, Vec<String>> {
    unreachable!("Membership::load refuses fleet mode in a build without the cluster feature")
}

/// Starts the task. It runs until the daemon exits.
#[cfg(feature = "cluster")]
pub fn spawn(settings: &Membership) -> (Link, mpsc::UnboundedReceiver<Event>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let (events, events_rx) = mpsc::unbounded_channel();
    let link = Link {
        tx,
        name: settings.config.name.clone(),
    };
    tokio::spawn(etcd::Task::new(settings, events, rx).run());
    (link, events_rx)
}

/// Without the `cluster` feature, [`Membership::load`] refuses, so there is
/// never a task to start.
#[cfg(not(feature = "cluster"))]
pub fn spawn(_settings: &Membership) -> (Link, mpsc::UnboundedReceiver<Event>) {
    unreachable!("Membership::load refuses fleet mode in a build without the cluster feature")
}
