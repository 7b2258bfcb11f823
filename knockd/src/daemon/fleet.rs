//! Fleet mode, on the daemon's side: what etcd's answers and watch events
//! mean for this node's engine and grants. All etcd I/O is
//! [`crate::cluster`]'s; this module decides.
//!
//! - An accepted one-time knock waits (after its local record is on disk)
//!   for etcd's create-if-absent of its sequence: first node wins, others
//!   reject it as `replay`; no answer in time is `cluster_unavailable`
//!   (or a local decision, for doors with `on_cluster_unavailable: local`).
//! - Grants of `scope: cluster` doors are published; every other node
//!   installs them with the same port and deadline.
//! - Devices from etcd join the local ones; a change rebuilds the engine.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    path::PathBuf,
    time::Duration,
};

use tokio::sync::oneshot;

use super::{Daemon, Error, chain};
use crate::{
    auth::{Accepted, Engine, Reason},
    cluster::{
        EtcdError, Event, FleetDevice, Link, Request, Trouble,
        model::{GrantRecord, RECORD_VERSION, RevokeRecord},
        replication::{Listed, Publish, Replication},
        revokes::{self, Book},
    },
    config::{OnClusterUnavailable, Scope},
    control::{
        Response,
        wire::{NodeReport, RevokedFleet},
    },
    devices::Devices,
    grants::{Grant, Holder, Published},
    proto::DeviceKey,
};

/// Fleet state the daemon keeps.
pub struct Fleet {
    link: Link,
    /// Devices from this node's own files and configuration.
    local: Devices,
    /// Devices from etcd, keys opened (by the cluster task, once).
    remote: BTreeMap<String, FleetDevice>,
    /// Whether the node has listed etcd and follows its watch.
    synced: bool,
    /// The etcd revision applied.
    revision: i64,
    watch_lag_ms: Option<u64>,
    started_at_ms: u64,
    /// Accepted knocks waiting for etcd, by token.
    pending: HashMap<u64, (Accepted, u64)>,
    next_token: u64,
    /// Where each cluster grant stands between this node and etcd.
    pub(super) replication: Replication,
    /// Knocks refused for want of etcd.
    unavailable: u64,
    /// The revokes this node carried out or has still to publish, kept in
    /// `state_dir` ([`revokes`] says why).
    pub(super) revokes: Book,
    /// No book was on disk at start-up: the first listing says which
    /// revokes are history, not news.
    fresh_book: bool,
    state_dir: PathBuf,
    /// Revokes sent to etcd and not answered yet, by id.
    publishing: HashSet<String>,
    /// Our revokes whose write the watch has not shown yet: that one
    /// showing is the echo of our write; any later one is a replay.
    echoes: HashSet<String>,
    /// A revoke failed to publish while etcd served us: the tick tries
    /// the pending ones again.
    retry_revokes: bool,
    /// `knockctl revoke`s waiting for etcd's answer, by revoke id: the
    /// reply, and what this node ended (grants, connections).
    revoke_replies: HashMap<String, (oneshot::Sender<Response>, (usize, usize))>,
    /// Why etcd is not serving us, by kind, while it is not: a change is
    /// logged once, not every retry.
    problem: Option<EtcdError>,
    /// etcd failures by kind (`authentication`, `permission`, `tls`,
    /// `unreachable`), for the metrics.
    problems: BTreeMap<Trouble, u64>,
    /// Records in etcd this node refused, by key and reason: each is
    /// reported once (bounded; past the bound, reports start over).
    refused: HashSet<(String, String)>,
}

/// Most refused records remembered for reporting once.
const REFUSED_MAX: usize = 4096;

impl Fleet {
    /// `book`: the revoke book read from `state_dir` (`None`: none yet).
    pub fn new(
        link: Link,
        local: Devices,
        book: Option<Book>,
        state_dir: PathBuf,
        now: super::Now,
    ) -> Fleet {
        Fleet {
            link,
            local,
            remote: BTreeMap::new(),
            synced: false,
            revision: 0,
            watch_lag_ms: None,
            started_at_ms: now.unix_ms,
            pending: HashMap::new(),
            next_token: 0,
            replication: Replication::default(),
            unavailable: 0,
            fresh_book: book.is_none(),
            revokes: book.unwrap_or_default(),
            state_dir,
            revoke_replies: HashMap::new(),
            publishing: HashSet::new(),
            echoes: HashSet::new(),
            retry_revokes: false,
            problem: None,
            problems: BTreeMap::new(),
            refused: HashSet::new(),
        }
    }

    /// etcd failures by kind, for the metrics.
    pub fn problems(&self) -> &BTreeMap<Trouble, u64> {
        &self.problems
    }

    /// The local devices and etcd's, merged.
    fn devices(&self, config: &crate::config::Config) -> Devices {
        self.local
            .with_fleet(config, self.remote.values().map(|d| d.device.clone()))
    }

    /// Facts for `status`.
    pub fn view(&self) -> crate::control::wire::FleetView {
        crate::control::wire::FleetView {
            name: self.link.name.clone(),
            synced: self.synced,
            revision: self.revision,
            watch_lag_ms: self.watch_lag_ms,
            devices_from_etcd: self.remote.len(),
            waiting_for_etcd: self.pending.len(),
            cluster_unavailable: self.unavailable,
            etcd_error: self.problem.as_ref().map(|e| e.message.clone()),
            revokes_pending: self.revokes.pending_count(),
        }
    }
}

/// Grants listed in a node's report (`grants_total` counts them all).
const REPORT_GRANTS_MAX: usize = 64;

/// A node that starts in fleet mode for the first time (no revoke book)
/// carries out the revokes of this last while: it may have been down when
/// they were made, with sessions it had let in still open (the kernel
/// keeps them across a restart). With a book, it carries out every revoke
/// it has not.
const FRESH_START_REVOKES_MS: u64 = 60_000;

/// The record (unsigned: the cluster task signs it) of a revoke in the
/// book.
fn record_of(entry: &revokes::Entry) -> RevokeRecord {
    RevokeRecord {
        mac: String::new(),
        version: RECORD_VERSION,
        target: entry.target.clone(),
        node: entry.node.clone(),
        at_ms: entry.at_ms,
    }
}

/// Seconds a one-time door accepts a sequence for: its steps of skew
/// either way, and the step itself, with a step to spare.
fn window_secs(door: &crate::config::OneTimeDoor) -> u64 {
    u64::from(door.step_secs) * (2 * u64::from(door.skew_steps) + 2)
}

impl Daemon {
    /// Puts the node in fleet mode (start-up).
    pub fn set_fleet(&mut self, fleet: Fleet) {
        self.fleet = Some(fleet);
    }

    /// The door's fleet settings, for one-time doors in fleet mode.
    fn fleet_door(&self, door: &str) -> Option<(Scope, OnClusterUnavailable, u64)> {
        self.fleet.as_ref()?;
        let d = self.config.doors.get(door)?.one_time()?;
        Some((d.scope, d.on_cluster_unavailable, window_secs(d)))
    }

    /// Whether `door`'s grants are published to the fleet.
    pub(super) fn cluster_scoped(&self, door: &str) -> bool {
        self.fleet_door(door)
            .is_some_and(|(scope, _, _)| scope == Scope::Cluster)
    }

    /// Called for each accepted knock whose sequence is on disk: in fleet
    /// mode etcd must agree it is fresh before the daemon acts. Returns the
    /// knock back when it is to be acted on now.
    pub(super) fn fleet_gate(
        &mut self,
        accepted: Accepted,
        decided_ms: u64,
    ) -> Option<(Accepted, u64)> {
        let Some((_, fallback, window)) = self.fleet_door(&accepted.door) else {
            return Some((accepted, decided_ms));
        };
        let Some(consumed) = accepted.consumed.clone() else {
            return Some((accepted, decided_ms));
        };
        let fleet = self.fleet.as_mut().expect("fleet_door checked");
        if !fleet.synced {
            return self.unavailable(accepted, decided_ms, fallback, "not synchronised with etcd");
        }
        let token = fleet.next_token;
        fleet.next_token += 1;
        fleet.pending.insert(token, (accepted, decided_ms));
        fleet.link.send(Request::Consume {
            consumed,
            window_secs: window,
            token,
        });
        None
    }

    /// etcd cannot vouch for a knock: act locally if the door says so,
    /// else refuse it (fail closed).
    fn unavailable(
        &mut self,
        accepted: Accepted,
        decided_ms: u64,
        fallback: OnClusterUnavailable,
        why: &str,
    ) -> Option<(Accepted, u64)> {
        if fallback == OnClusterUnavailable::Local {
            tracing::warn!(
                door = accepted.door,
                device = accepted.device.as_deref(),
                why,
                "etcd unreachable: acting on the knock with this node's replay record only (on_cluster_unavailable: local)"
            );
            if let Some(fleet) = &mut self.fleet {
                fleet.replication.made_without_etcd(Holder::new(
                    &accepted.door,
                    accepted.grant_to,
                    accepted.device.as_deref(),
                ));
            }
            return Some((accepted, decided_ms));
        }
        if let Some(fleet) = &mut self.fleet {
            fleet.unavailable += 1;
        }
        self.reject(&accepted.refused(
            Reason::ClusterUnavailable,
            format!("etcd could not confirm the sequence is fresh fleet-wide: {why}"),
        ));
        None
    }

    /// Publishes what this node did to a cluster door's grant of
    /// `holder`: its current state, or its end.
    pub(super) fn publish_grant(&mut self, holder: &Holder) {
        if !self.cluster_scoped(&holder.door) {
            return;
        }
        let now = self.now;
        let record = self.grants.get(holder).map(|g| GrantRecord {
            mac: String::new(),
            version: RECORD_VERSION,
            port: g.port,
            device: g.device.as_deref().map(str::to_owned),
            node: String::new(),
            expires_at_ms: now.unix_ms
                + g.expires.saturating_duration_since(now.mono).as_millis() as u64,
            leased: g.leased,
            opened_at_ms: g.opened_at_ms,
        });
        let fleet = self.fleet.as_mut().expect("cluster_scoped checked");
        match fleet
            .replication
            .changed(holder.clone(), record.is_some(), fleet.synced)
        {
            Publish::Put => {
                let mut record = record.expect("held");
                record.node = fleet.link.name.clone();
                fleet.link.send(Request::PutGrant {
                    holder: holder.clone(),
                    record,
                });
            }
            Publish::Delete => fleet.link.send(Request::DeleteGrant {
                holder: holder.clone(),
            }),
            Publish::Later => {}
        }
    }

    /// Rebuilds the engine for the devices now known (a device added or
    /// removed anywhere in the fleet). Sequences in progress start over.
    fn devices_changed(&mut self) {
        let Some(fleet) = &self.fleet else { return };
        let devices = fleet.devices(&self.config);
        for warning in &devices.warnings {
            tracing::debug!(%warning, "devices");
        }
        self.engine = Engine::new(
            &self.config,
            &devices,
            &self.engine.consumed(),
            self.now.unix_ms,
        );
        self.policy_base = crate::policy::port_policy(&self.config, &self.engine.knock_ports());
    }

    /// The devices of a reload: the files' and etcd's.
    pub(super) fn fleet_devices(&mut self, local: Devices) -> Devices {
        match &mut self.fleet {
            Some(fleet) => {
                fleet.local = local;
                fleet.devices(&self.config)
            }
            None => local,
        }
    }

    /// Acts on what the cluster task reports.
    pub fn on_fleet(&mut self, event: Event, now: super::Now) -> Result<(), Error> {
        self.now = now;
        let Some(fleet) = &mut self.fleet else {
            return Ok(());
        };
        match event {
            Event::Synced {
                revision,
                devices,
                grants,
                revokes,
            } => {
                fleet.synced = true;
                fleet.revision = revision;
                if let Some(was) = fleet.problem.take() {
                    tracing::info!(was = was.trouble.name(), "fleet: etcd answers again");
                }
                let listed_devices: BTreeMap<String, FleetDevice> = devices
                    .into_iter()
                    .map(|d| (d.device.id.clone(), d))
                    .collect();
                // What changed while the node was away (or all of it, at
                // start-up), logged as the watch would have once the
                // engine and the XDP port policy know it.
                let added: Vec<(String, String)> = listed_devices
                    .iter()
                    .filter(|(id, _)| !fleet.remote.contains_key(*id))
                    .map(|(id, d)| (id.clone(), d.added_by.clone()))
                    .collect();
                let removed: Vec<String> = fleet
                    .remote
                    .keys()
                    .filter(|id| !listed_devices.contains_key(*id))
                    .cloned()
                    .collect();
                fleet.remote = listed_devices;
                // Revokes first: the grants they ended are neither
                // installed nor kept. Those this node has not carried
                // out are news (on a first start, only the last
                // minute's; the rest are history).
                let now_ms = now.unix_ms;
                let first = std::mem::replace(&mut fleet.fresh_book, false);
                let mut news = Vec::new();
                for (id, record) in revokes {
                    if fleet.revokes.knows(&id) {
                        continue;
                    }
                    let age = now_ms.saturating_sub(record.at_ms);
                    if age <= revokes::KEEP_MS && (!first || age < FRESH_START_REVOKES_MS) {
                        news.push(record.clone());
                    }
                    fleet.revokes.insert(id, revokes::Entry::of(&record, true));
                }
                self.devices_changed();
                // Carried out while the grants they end are still here, so
                // their connections are found and cut.
                for record in news {
                    self.fleet_revoke(record);
                }
                let name = self.fleet.as_ref().expect("fleet").link.name.clone();
                let mut listed = HashSet::new();
                for (holder, record, rev) in grants {
                    if self.revoked_grant(&holder, &record) {
                        continue;
                    }
                    listed.insert(holder.clone());
                    let held = self.grants.get(&holder).is_some();
                    let fleet = self.fleet.as_mut().expect("fleet");
                    match fleet.replication.listed(&holder, record.node == name, held) {
                        // Ended here while etcd refused the delete: end it
                        // fleet-wide now, rather than reopen it.
                        Listed::DeleteAgain => fleet.link.send(Request::DeleteGrant { holder }),
                        Listed::Apply => self.apply_grant(&holder, record, rev),
                    }
                }
                // Cluster grants etcd no longer has ended while we were
                // away (expired, closed, revoked).
                let gone: Vec<Holder> = self
                    .grants
                    .list()
                    .into_iter()
                    .map(Grant::holder)
                    .filter(|h| self.cluster_scoped(&h.door) && !listed.contains(h))
                    .collect();
                for holder in gone {
                    let fleet = self.fleet.as_mut().expect("fleet");
                    if !fleet.replication.unlisted(&holder) {
                        continue;
                    }
                    let _ = self.grants.close(self.kernel.as_mut(), &holder, now.mono);
                    tracing::info!(%holder, "fleet: grant ended while this node was away from etcd; closed");
                }
                // Grants etcd never had (made while away, or whose write
                // failed) are published now.
                let unpublished = self
                    .fleet
                    .as_mut()
                    .expect("fleet")
                    .replication
                    .resynchronised();
                for holder in unpublished {
                    self.publish_grant(&holder);
                }
                // Revokes made here while etcd was away reach it now.
                self.publish_revokes();
                self.save_revokes();
                self.load_policy()?;
                for (id, by) in added {
                    tracing::info!(device = %id, %by, "fleet: device added");
                }
                for id in removed {
                    tracing::info!(device = %id, "fleet: device removed");
                }
                // Said here, once the node serves from what it listed, not
                // when the cluster task has merely listed it.
                tracing::info!(revision, "fleet: synchronised with etcd; watching");
            }
            Event::Lost(why) => {
                let trouble = why.trouble;
                let kind = trouble.name();
                *fleet.problems.entry(trouble).or_default() += 1;
                let was = std::mem::replace(&mut fleet.synced, false);
                let changed = fleet.problem.as_ref().map(|e| e.trouble) != Some(trouble);
                fleet.problem = Some(why.clone());
                if was {
                    tracing::warn!(%why, "fleet: lost etcd; cluster doors fail closed");
                    self.keep_error(format!(
                        "fleet: lost etcd ({why}); cluster doors refuse knocks until it is back (grants in place stay until their deadline)"
                    ));
                } else if changed && trouble != Trouble::Unreachable {
                    // Not the network: the operator's to fix, and it will
                    // not go away by retrying.
                    tracing::error!(%why, kind, "fleet: etcd refuses this node; cluster doors refuse knocks until it is fixed");
                    self.keep_error(format!(
                        "fleet: etcd refuses this node ({kind}: {why}); cluster doors refuse knocks until it is fixed"
                    ));
                } else if changed {
                    tracing::warn!(%why, "fleet: cannot reach etcd; cluster doors refuse knocks until it answers");
                    self.keep_error(format!(
                        "fleet: cannot reach etcd ({why}); cluster doors refuse knocks until it answers"
                    ));
                } else {
                    tracing::debug!(%why, "fleet: etcd still unreachable");
                }
            }
            Event::Consumed { token, result } => {
                let Some((accepted, decided_ms)) = fleet.pending.remove(&token) else {
                    return Ok(());
                };
                match result {
                    Ok(true) => self.accept(accepted, decided_ms)?,
                    // Counted once, as this reject: it was never counted
                    // accepted.
                    Ok(false) => self.reject(&accepted.refused(
                        Reason::Replay,
                        "the sequence was consumed already in the fleet (etcd has it)".into(),
                    )),
                    Err(why) => {
                        let fallback = self
                            .fleet_door(&accepted.door)
                            .map_or(OnClusterUnavailable::Closed, |(_, f, _)| f);
                        if let Some((accepted, decided_ms)) =
                            self.unavailable(accepted, decided_ms, fallback, &why)
                        {
                            self.accept(accepted, decided_ms)?;
                        }
                    }
                }
            }
            Event::Device { id, device } => {
                // Logged once the engine and the XDP port policy know the
                // change: from that line on, the device's knocks are seen.
                let (added_by, known) = match device {
                    Some(device) => {
                        let by = device.added_by.clone();
                        fleet.remote.insert(id.clone(), device);
                        (Some(by), true)
                    }
                    None => (None, fleet.remote.remove(&id).is_some()),
                };
                self.devices_changed();
                self.load_policy()?;
                match added_by {
                    Some(by) => tracing::info!(device = %id, %by, "fleet: device added"),
                    None if known => tracing::info!(device = %id, "fleet: device removed"),
                    None => {}
                }
            }
            Event::Grant {
                holder,
                record,
                revision,
            } => match record {
                Some(record) => {
                    if !self.revoked_grant(&holder, &record) {
                        self.apply_grant(&holder, record, revision);
                    }
                }
                None => {
                    if fleet.replication.deleted(&holder, revision) {
                        let closed = self.grants.close(self.kernel.as_mut(), &holder, now.mono)?;
                        if closed.is_some() {
                            tracing::info!(%holder, "fleet: grant withdrawn");
                        }
                    }
                }
            },
            Event::GrantWritten { holder, revision } => {
                fleet.replication.written(&holder, revision);
            }
            Event::Revoke {
                id,
                record,
                revision,
            } => {
                fleet.revision = fleet.revision.max(revision);
                let ours = record.node == fleet.link.name;
                if fleet.revokes.knows(&id) {
                    // Our own write, coming back; or a revoke carried out
                    // already, written again: never twice.
                    if !(ours && fleet.echoes.remove(&id)) {
                        self.refused_once(
                            format!("revoke {id} of {}", record.target),
                            "written again: this node carried it out already, and does not again"
                                .into(),
                        );
                    }
                    return Ok(());
                }
                let old = now.unix_ms.saturating_sub(record.at_ms) > revokes::KEEP_MS;
                fleet
                    .revokes
                    .insert(id.clone(), revokes::Entry::of(&record, true));
                self.save_revokes();
                if old {
                    self.refused_once(
                        format!("revoke {id} of {}", record.target),
                        "issued more than a day ago, longer than etcd keeps a revoke: written again".into(),
                    );
                } else if !ours {
                    self.fleet_revoke(record);
                }
            }
            Event::RevokePublished {
                id,
                key,
                fleet_grants,
            } => {
                fleet.revokes.mark_published(&id);
                fleet.publishing.remove(&id);
                let waiting = fleet.revoke_replies.remove(&id);
                self.save_revokes();
                match waiting {
                    Some((reply, (revoked, connections_cut))) => {
                        let _ = reply.send(Response::ok(RevokedFleet {
                            revoked,
                            connections_cut,
                            published: Some(key),
                            fleet_grants,
                            pending: None,
                        }));
                    }
                    None => {
                        tracing::info!(%id, fleet_grants, "fleet: a revoke made while etcd was unreachable is published")
                    }
                }
            }
            Event::RevokeNotPublished { id, why } => {
                fleet.publishing.remove(&id);
                fleet.retry_revokes |= fleet.synced;
                let waiting = fleet.revoke_replies.remove(&id);
                self.record_error(format!(
                    "fleet: revoke {id} took effect here but is not in etcd yet ({why}); it is kept, and published when etcd is back"
                ));
                if let Some((reply, (revoked, connections_cut))) = waiting {
                    let _ = reply.send(Response::ok(RevokedFleet {
                        revoked,
                        connections_cut,
                        published: None,
                        fleet_grants: 0,
                        pending: Some(why),
                    }));
                }
            }
            Event::Refused { what, key, why } => {
                let mut why = why.to_string();
                if what.starts_with("device ") && why.contains("an older knockd") {
                    why.push_str(
                        ": check its groups and doors with `knockctl device list`, then vouch for it with `knockctl device sign ID`",
                    );
                }
                self.refused_once(format!("{what} ({key})"), why);
            }
            Event::Progress { revision, lag_ms } => {
                fleet.revision = fleet.revision.max(revision);
                if lag_ms.is_some() {
                    fleet.watch_lag_ms = lag_ms;
                }
            }
            Event::PublishFailed { holder, why } => {
                self.record_error(format!(
                    "fleet: could not publish the grant of cluster door {}, source {}, device {}: {why}",
                    holder.door,
                    holder.source,
                    holder.device.as_deref().unwrap_or("-")
                ));
                // Unless a later write is on its way, etcd lacks this
                // grant: treat it as one made without etcd, so the next
                // resync (or the grant's next change) publishes it.
                let held = self.grants.get(&holder).is_some();
                let fleet = self.fleet.as_mut().expect("fleet");
                fleet.replication.publish_failed(holder, held);
            }
            Event::WithdrawFailed { holder, why } => {
                self.record_error(format!(
                    "fleet: could not withdraw the grant of cluster door {}, source {}, device {}: {why}",
                    holder.door,
                    holder.source,
                    holder.device.as_deref().unwrap_or("-")
                ));
                let held = self.grants.get(&holder).is_some();
                let fleet = self.fleet.as_mut().expect("fleet");
                fleet.replication.withdraw_failed(holder, held);
            }
        }
        Ok(())
    }

    /// Installs a grant another node published (or ours, after a restart).
    fn apply_grant(&mut self, holder: &Holder, record: GrantRecord, revision: i64) {
        let (door, source) = (&*holder.door, holder.source);
        if !self.cluster_scoped(door) {
            tracing::warn!(door, %source, "fleet: a grant for a door that is not scope: cluster here; ignored (do all nodes share the configuration?)");
            return;
        }
        let fleet = self.fleet.as_mut().expect("cluster_scoped checked");
        fleet.replication.applied(holder.clone(), revision);
        let ours = record.node == fleet.link.name;
        if ours && self.grants.get(holder).is_some() {
            self.grants.learn_opened(holder, record.opened_at_ms);
            return;
        }
        let (now, now_ms) = (self.now.mono, self.now.unix_ms);
        let left = Duration::from_millis(record.expires_at_ms.saturating_sub(now_ms));
        if left.is_zero() {
            return;
        }
        let published = Published {
            port: record.port,
            expires: now + left,
            leased: record.leased,
            remote: !ours,
            opened_at_ms: record.opened_at_ms,
        };
        match self
            .grants
            .apply(self.kernel.as_mut(), holder, published, now)
        {
            Ok(g) => {
                if let Err(e) = self.kernel.mark_granted(g.port) {
                    self.record_error(format!("updating the port policy failed: {}", chain(&e)));
                }
                tracing::info!(door, %source, device = g.device.as_deref(), port = g.port, by = %record.node, expires_in_secs = g.secs_left(now), "fleet: grant installed");
            }
            Err(e) => self.record_error(format!(
                "fleet: could not install the grant of {source} on {door} from {}: {}",
                record.node,
                chain(&e)
            )),
        }
    }

    /// Whether a grant record in etcd was opened before a revoke this node
    /// knows of its address or device (a replay, or a write that raced the
    /// revoke): such a grant is not installed, and is reported.
    fn revoked_grant(&mut self, holder: &Holder, record: &GrantRecord) -> bool {
        let Some(id) = self.fleet.as_ref().and_then(|f| {
            f.revokes
                .ending(holder.source, record.device.as_deref(), record.opened_at_ms)
                .map(str::to_owned)
        }) else {
            return false;
        };
        self.refused_once(
            format!("grant ({holder})"),
            format!("it was opened before revoke {id}"),
        );
        true
    }

    /// Reports a record in etcd this node ignores (`what` it claims to
    /// be): once per record and reason, at warn, and in `status`.
    fn refused_once(&mut self, what: String, why: String) {
        let Some(fleet) = &mut self.fleet else { return };
        if fleet.refused.len() >= REFUSED_MAX {
            fleet.refused.clear();
        }
        if fleet.refused.insert((what.clone(), why.clone())) {
            tracing::warn!(record = %what, %why, "fleet: a record in etcd is ignored");
            self.keep_error(format!("fleet: {what} in etcd is ignored: {why}"));
        }
    }

    /// Sends the revokes etcd does not have (and that are not on their
    /// way) to it: after a resynchronisation, and from the tick after a
    /// failed write.
    fn publish_revokes(&mut self) {
        let Some(fleet) = &mut self.fleet else { return };
        fleet.retry_revokes = false;
        for (id, entry) in fleet.revokes.pending() {
            if !fleet.publishing.insert(id.clone()) {
                continue;
            }
            tracing::info!(target = %entry.target, %id, "fleet: publishing a revoke made while etcd did not take it");
            fleet.echoes.insert(id.clone());
            fleet.link.send(Request::Revoke {
                id,
                record: record_of(&entry),
            });
        }
    }

    /// Writes the revoke book; a failure is an error in `status` (the
    /// book in memory still holds).
    fn save_revokes(&mut self) {
        let Some(fleet) = &mut self.fleet else { return };
        fleet.revokes.prune(self.now.unix_ms);
        if let Err(e) = crate::state::save_revokes(&fleet.state_dir, &fleet.revokes) {
            self.record_error(format!(
                "fleet: could not write the revoke book: {}",
                chain(&e)
            ));
        }
    }

    /// Carries out a revoke another node published: the grants opened
    /// before it, and the connections they let in.
    fn fleet_revoke(&mut self, record: RevokeRecord) {
        match self.revoke(&record.target, record.at_ms) {
            Ok(r) => {
                tracing::info!(target = %record.target, by = %record.node, grants = r.revoked, connections = r.connections_cut, "fleet: revoked")
            }
            Err(
                super::RequestError::NothingToRevoke(_) | super::RequestError::UnknownTarget(_),
            ) => {
                tracing::info!(target = %record.target, by = %record.node, "fleet: revoke: nothing here");
            }
            Err(e) => self.record_error(format!(
                "fleet: revoke of {} from {}: {}",
                record.target,
                record.node,
                chain(&e)
            )),
        }
    }

    /// Publishes this node's report (once a second, from the tick).
    pub(super) fn report_to_fleet(&mut self) {
        if self
            .fleet
            .as_ref()
            .is_some_and(|f| f.synced && f.retry_revokes)
        {
            self.publish_revokes();
        }
        let Some(fleet) = &self.fleet else { return };
        // The first grants only: a report is one etcd value, written every
        // second, and etcd refuses values past 1.5 MiB.
        let mut grants = self.grant_views();
        let grants_total = grants.len();
        grants.truncate(REPORT_GRANTS_MAX);
        fleet.link.send(Request::Report(Box::new(NodeReport {
            name: fleet.link.name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            started_at_ms: fleet.started_at_ms,
            at_ms: self.now.unix_ms,
            synced: fleet.synced,
            revision: fleet.revision,
            watch_lag_ms: fleet.watch_lag_ms,
            cluster_unavailable: fleet.unavailable,
            grants,
            grants_total,
        })));
    }

    /// Sends a fleet command to the cluster task, which answers on
    /// `reply` once etcd has; outside fleet mode, answers that it is not.
    pub(super) fn to_cluster(
        &self,
        request: impl FnOnce(oneshot::Sender<Response>) -> Request,
        reply: oneshot::Sender<Response>,
    ) {
        match &self.fleet {
            Some(fleet) => fleet.link.send(request(reply)),
            None => drop(reply.send(not_fleet())),
        }
    }

    /// `knockctl device add` in fleet mode: checked here, written by the
    /// cluster task.
    pub(super) fn device_add(
        &self,
        id: String,
        groups: Vec<String>,
        doors: Vec<String>,
        key: &str,
        reply: oneshot::Sender<Response>,
    ) {
        let Some(fleet) = &self.fleet else {
            return drop(reply.send(not_fleet()));
        };
        let checked = (|| {
            if !crate::config::is_valid_name(&id, crate::config::DEVICE_ID_MAX) {
                return Err(format!(
                    "{id:?} is not a valid device id (1-64 of A-Z a-z 0-9 . _ -)"
                ));
            }
            for name in groups.iter().chain(&doors) {
                if !crate::config::is_valid_name(name, crate::config::DEVICE_ID_MAX) {
                    return Err(format!("{name:?} is not a valid group or door name"));
                }
            }
            if fleet.local.by_id.contains_key(&id) {
                return Err(format!(
                    "device {id} is defined on this node's files already"
                ));
            }
            DeviceKey::from_hex(key).map_err(|e| format!("key: {e}"))
        })();
        match checked {
            Ok(key) => fleet.link.send(Request::DeviceAdd {
                id,
                groups,
                doors,
                key,
                reply,
            }),
            Err(e) => drop(reply.send(Response::error(e))),
        }
    }

    /// `knockctl revoke` in fleet mode. Issued now: it ends what exists
    /// now, here at once and on every node once etcd has it; `reply` waits
    /// for etcd's answer. The cluster grants it ends go from etcd with it.
    pub(super) fn revoke_fleet(&mut self, target: String, reply: oneshot::Sender<Response>) {
        let at_ms = self.now.unix_ms;
        let grants: Vec<Holder> = self
            .grants_of(&target)
            .into_iter()
            .filter(|h| self.cluster_scoped(&h.door))
            .collect();
        let local = match self.revoke(&target, u64::MAX) {
            Ok(r) => (r.revoked, r.connections_cut),
            Err(super::RequestError::NothingToRevoke(_)) => (0, 0),
            Err(e) => {
                if matches!(e, super::RequestError::Cut { .. }) {
                    self.record_error(chain(&e));
                }
                return drop(reply.send(Response::error(chain(&e))));
            }
        };
        let Some(fleet) = self.fleet.as_mut() else {
            return drop(reply.send(not_fleet()));
        };
        for key in &grants {
            fleet.replication.forget(key);
        }
        let entry = revokes::Entry {
            target,
            node: fleet.link.name.clone(),
            at_ms,
            published: false,
        };
        let id = format!("{at_ms}-{}-{:08x}", entry.node, rand::random::<u32>());
        let record = record_of(&entry);
        fleet.revokes.insert(id.clone(), entry);
        fleet.revoke_replies.insert(id.clone(), (reply, local));
        fleet.publishing.insert(id.clone());
        fleet.echoes.insert(id.clone());
        fleet.link.send(Request::Revoke { id, record });
        // Kept before etcd answers: if it does not, the revoke still
        // stands here after a restart, and reaches etcd later.
        self.save_revokes();
    }
}

/// The answer to a fleet command outside fleet mode.
fn not_fleet() -> Response {
    Response::error("not in fleet mode: the configuration has no cluster: section")
}
