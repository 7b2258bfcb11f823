//! The etcd side of fleet mode: the task that holds the client (built
//! with the `cluster` feature). Everything the daemon sees of it is in the
//! parent module: [`Request`](super::Request)s in,
//! [`Event`](super::Event)s out.

use std::{
    collections::BTreeMap,
    path::Path,
    time::{Duration, Instant},
};

use etcd_client::{
    Certificate, Client, Compare, CompareOp, ConnectOptions, EventType, GetOptions, Identity,
    PutOptions, TlsOptions, Txn, TxnOp, WatchOptions,
};
use tokio::sync::mpsc;

use super::{
    EtcdError, Event, FleetDevice, Membership, Request, Trouble,
    model::{self, DeviceRecord, GrantRecord, Key, Keys, RECORD_VERSION, Refused, RevokeRecord},
};
use crate::{
    config::Cluster,
    control::{
        Response,
        wire::{ClusterDevice, ClusterStatus, DeviceChanged, NodeReport, NodeStatus},
    },
    grants::Holder,
    proto::{DeviceKey, unix_ms},
};

/// How long a heartbeat key outlives its node.
const NODE_TTL_SECS: i64 = 5;
/// How often a node publishes its report.
const REPORT_EVERY: Duration = Duration::from_secs(1);
/// A report older than this is `stale` in `status --cluster`: two
/// heartbeats (one a second) missed, while its key, under a
/// [`NODE_TTL_SECS`] lease, is still there. Past the lease it is `down`.
const STALE_MS: u64 = 2500;
/// How long a revoke record stays for nodes that are catching up: a day,
/// the default `max_session_secs`, so a node cut off for less than that
/// still cuts the sessions a revoke ended elsewhere when it returns.
const REVOKE_TTL_SECS: i64 = 86_400;
/// Waits between connection attempts, growing to the last.
const BACKOFF: [u64; 4] = [200, 500, 1000, 2000];
/// Grant records whose deadlines fall in one bucket of this many seconds
/// share one etcd lease, which ends with the bucket (and 2 s more): a grant
/// costs one write (its put), not two (a lease and a put). A record may so
/// outlive its deadline by up to a bucket; nodes ignore a record past its
/// `expires_at_ms` anyway.
const GRANT_LEASE_BUCKET_SECS: u64 = 10;

pub(super) struct Task {
    config: Cluster,
    password: Option<String>,
    cluster_key: DeviceKey,
    keys: Keys,
    events: mpsc::UnboundedSender<Event>,
    requests: mpsc::UnboundedReceiver<Request>,
    /// The latest report, published with each heartbeat.
    report: Option<Box<NodeReport>>,
    timeout: Duration,
    /// Which endpoint the next connection tries.
    endpoint: usize,
}

/// An etcd request within `timeout`: its error, or the timeout, typed.
async fn timed<T>(
    timeout: Duration,
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, EtcdError> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(typed(&e).context("etcd")),
        Err(_) => Err(EtcdError::unreachable(format!(
            "etcd did not answer within {} ms",
            timeout.as_millis()
        ))),
    }
}

/// What kind of trouble a client error is, from its gRPC status code where
/// it has one. etcd answers a bad password with InvalidArgument, and the
/// transport names a certificate problem only in words.
fn typed(e: &etcd_client::Error) -> EtcdError {
    let message = e.to_string();
    let trouble = match e {
        etcd_client::Error::GRpcStatus(status) => match status.code() {
            tonic::Code::Unauthenticated => Trouble::Authentication,
            tonic::Code::PermissionDenied => Trouble::Permission,
            tonic::Code::InvalidArgument
                if status.message().contains("authentication failed")
                    || status.message().contains("invalid auth token") =>
            {
                Trouble::Authentication
            }
            _ => Trouble::Unreachable,
        },
        etcd_client::Error::TransportError(t) => transport_trouble(&format!("{t:?}")),
        _ => Trouble::Unreachable,
    };
    EtcdError { trouble, message }
}

/// A connection failure is TLS's when its words say so (tonic keeps the
/// rustls error as text).
fn transport_trouble(message: &str) -> Trouble {
    let m = message.to_ascii_lowercase();
    if m.contains("certificate") || m.contains("tls") || m.contains("handshake") {
        Trouble::Tls
    } else {
        Trouble::Unreachable
    }
}

/// A fleet command etcd did not answer: what the operator is told.
fn unreachable(why: impl std::fmt::Display) -> String {
    format!("fleet mode: etcd is unreachable ({why}); nothing was changed")
}

fn unavailable(why: impl std::fmt::Display) -> Response {
    Response::error(unreachable(why))
}

impl Task {
    pub(super) fn new(
        settings: &Membership,
        events: mpsc::UnboundedSender<Event>,
        requests: mpsc::UnboundedReceiver<Request>,
    ) -> Task {
        let config = &settings.config;
        Task {
            keys: Keys::new(&config.prefix),
            timeout: Duration::from_millis(u64::from(config.timeout_ms)),
            config: config.clone(),
            password: settings.password.clone(),
            cluster_key: settings.cluster_key.clone(),
            events,
            requests,
            report: None,
            endpoint: rand::random::<u32>() as usize,
        }
    }

    pub(super) async fn run(mut self) {
        let mut attempt = 0;
        loop {
            let why = match self.session().await {
                Ok(why) => {
                    attempt = 0;
                    why
                }
                Err(why) => why,
            };
            let _ = self.events.send(Event::Lost(why.clone()));
            let why = why.message;
            // Each member is tried once before the waits grow.
            let step = attempt / self.config.endpoints.len();
            let wait = Duration::from_millis(BACKOFF[step.min(BACKOFF.len() - 1)]);
            attempt += 1;
            // Meanwhile, every request is answered at once: unavailable.
            let until = tokio::time::Instant::now() + wait;
            loop {
                tokio::select! {
                    () = tokio::time::sleep_until(until) => break,
                    request = self.requests.recv() => match request {
                        Some(request) => self.refuse(request, &why),
                        None => return,
                    },
                }
            }
        }
    }

    /// Answers a request while etcd is out of reach.
    fn refuse(&mut self, request: Request, why: &str) {
        match request {
            Request::Consume { token, .. } => {
                let _ = self.events.send(Event::Consumed {
                    token,
                    result: Err(why.to_owned()),
                });
            }
            Request::Revoke { id, .. } => {
                let _ = self.events.send(Event::RevokeNotPublished {
                    id,
                    why: why.to_owned(),
                });
            }
            Request::DeviceAdd { reply, .. }
            | Request::DeviceSign { reply, .. }
            | Request::DeviceRemove { reply, .. }
            | Request::DeviceList { reply }
            | Request::Status { reply } => {
                let _ = reply.send(unavailable(why));
            }
            Request::PutGrant { holder, .. } => {
                let _ = self.events.send(Event::PublishFailed {
                    holder,
                    why: why.to_owned(),
                });
            }
            Request::DeleteGrant { holder } => {
                let _ = self.events.send(Event::WithdrawFailed {
                    holder,
                    why: why.to_owned(),
                });
            }
            Request::Report(report) => self.report = Some(report),
        }
    }

    /// A client for one endpoint, the next in turn: the crate's balanced
    /// channel can route a first request to a dead member, and this way a
    /// failed session moves on to the next member.
    async fn connect(&mut self) -> Result<Client, EtcdError> {
        let endpoint = self.config.endpoints[self.endpoint % self.config.endpoints.len()].clone();
        self.endpoint += 1;
        // A partition must end the watch within seconds, not at TCP's
        // timeout: HTTP/2 pings find a dead peer.
        let mut channel = tonic::transport::Endpoint::from_shared(endpoint.clone())
            .map_err(|e| EtcdError::unreachable(format!("{endpoint}: {e}")))?
            .connect_timeout(self.timeout)
            .timeout(self.timeout)
            .http2_keep_alive_interval(Duration::from_secs(1))
            .keep_alive_timeout(self.timeout)
            .keep_alive_while_idle(true);
        if let Some(tls) = &self.config.tls {
            let read = |path: &Path| {
                std::fs::read(path).map_err(|e| EtcdError {
                    trouble: Trouble::Tls,
                    message: format!("reading {}: {e}", path.display()),
                })
            };
            let mut t =
                TlsOptions::new().ca_certificate(Certificate::from_pem(read(&tls.ca_file)?));
            if let (Some(cert), Some(key)) = (&tls.cert_file, &tls.key_file) {
                t = t.identity(Identity::from_pem(read(cert)?, read(key)?));
            }
            channel = channel.tls_config(t).map_err(|e| EtcdError {
                trouble: Trouble::Tls,
                message: format!("{endpoint}: TLS: {e}"),
            })?;
        }
        let channel = match tokio::time::timeout(self.timeout, channel.connect()).await {
            Ok(Ok(channel)) => channel,
            Ok(Err(e)) => {
                return Err(EtcdError {
                    trouble: transport_trouble(&format!("{e:?}")),
                    message: format!("{endpoint}: {e}"),
                });
            }
            Err(_) => {
                return Err(EtcdError::unreachable(format!(
                    "{endpoint}: no connection within {} ms",
                    self.timeout.as_millis()
                )));
            }
        };
        // Without quorum a member must not answer from stale state, and
        // our watch must end: fail closed.
        let mut options = ConnectOptions::new().with_require_leader(true);
        if let (Some(user), Some(password)) = (&self.config.user, &self.password) {
            options = options
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        timed(
            self.timeout,
            Client::from_channel(etcd_client::Channel::Tonic(channel), Some(options)),
        )
        .await
        .map_err(|e| e.context(&endpoint))
    }

    /// One connection: list, watch, serve requests, until something breaks.
    /// Returns why it ended.
    async fn session(&mut self) -> Result<EtcdError, EtcdError> {
        let mut client = self.connect().await?;
        let timeout = self.timeout;
        // List what the daemon mirrors, at one revision.
        let list = |client: &mut Client, key: String, revision: i64| {
            let mut client = client.clone();
            async move {
                let mut options = GetOptions::new().with_prefix();
                if revision > 0 {
                    options = options.with_revision(revision);
                }
                timed(timeout, client.get(key, Some(options))).await
            }
        };
        let devices = list(&mut client, self.keys.devices(), 0).await?;
        let revision = devices.header().map_or(0, |h| h.revision());
        let grants = list(&mut client, self.keys.grants(), revision).await?;
        let revokes = list(
            &mut client,
            format!("{}revokes/", self.keys.all()),
            revision,
        )
        .await?;
        let mut synced_devices = Vec::new();
        for kv in devices.kvs() {
            if let Key::Device(id) = self.keys.parse(kv.key()) {
                synced_devices.extend(self.device_record(&id, kv.value()));
            }
        }
        let mut synced_grants = Vec::new();
        for kv in grants.kvs() {
            if let Key::Grant(holder) = self.keys.parse(kv.key())
                && let Some(record) = self.grant_record(&holder, kv.value())
            {
                synced_grants.push((holder, record, kv.mod_revision()));
            }
        }
        let synced_revokes = revokes
            .kvs()
            .iter()
            .filter_map(|kv| {
                let Key::Revoke(id) = self.keys.parse(kv.key()) else {
                    return None;
                };
                let record = self.revoke_record(&id, kv.value())?;
                Some((id, record))
            })
            .collect();
        // Then watch from the next revision: nothing between is missed.
        let mut watch = timed(
            timeout,
            client.watch(
                self.keys.all(),
                Some(
                    WatchOptions::new()
                        .with_prefix()
                        .with_start_revision(revision + 1),
                ),
            ),
        )
        .await?;
        // The heartbeat's lease; the member key says the node exists even
        // while its heartbeat is gone.
        let lease = timed(timeout, client.lease_grant(NODE_TTL_SECS, None))
            .await?
            .id();
        let (mut keeper, mut keep_alive) = timed(timeout, client.lease_keep_alive(lease)).await?;
        let member = self.keys.member(&self.config.name);
        timed(
            timeout,
            client.txn(
                Txn::new()
                    .when([Compare::version(member.clone(), CompareOp::Equal, 0)])
                    .and_then([TxnOp::put(member, unix_ms().to_string(), None)]),
            ),
        )
        .await?;
        let _ = self.events.send(Event::Synced {
            revision,
            devices: synced_devices,
            grants: synced_grants,
            revokes: synced_revokes,
        });

        let mut heartbeat = tokio::time::interval(REPORT_EVERY);
        // When the last heartbeat was written, by its report's at_ms.
        let mut sent: Option<(u64, Instant)> = None;
        let mut consume_lease: Option<(i64, Instant, u64)> = None;
        // Bucket end (Unix seconds) → its lease, for grant records.
        let mut grant_leases: BTreeMap<u64, i64> = BTreeMap::new();
        loop {
            tokio::select! {
                message = watch.message() => {
                    let response = match message {
                        Ok(Some(response)) => response,
                        Ok(None) => return Ok(EtcdError::unreachable("the watch stream ended")),
                        Err(e) => return Ok(typed(&e).context("the watch failed")),
                    };
                    if response.canceled() {
                        return Ok(EtcdError::unreachable(format!(
                            "etcd cancelled the watch ({}; compacted at {})",
                            response.cancel_reason(),
                            response.compact_revision()
                        )));
                    }
                    let revision = response.header().map_or(0, |h| h.revision());
                    let mut lag_ms = None;
                    for event in response.events() {
                        let Some(kv) = event.kv() else { continue };
                        let put = event.event_type() == EventType::Put;
                        match self.keys.parse(kv.key()) {
                            Key::Device(id) => {
                                let device = if put { self.device_record(&id, kv.value()) } else { None };
                                let _ = self.events.send(Event::Device { id, device });
                            }
                            Key::Grant(holder) => {
                                let record = if put { self.grant_record(&holder, kv.value()) } else { None };
                                let _ = self.events.send(Event::Grant { holder, record, revision: kv.mod_revision() });
                            }
                            Key::Revoke(id) if put => {
                                if let Some(record) = self.revoke_record(&id, kv.value()) {
                                    let _ = self.events.send(Event::Revoke { id, record, revision: kv.mod_revision() });
                                }
                            }
                            Key::Node(name) if put && name == self.config.name => {
                                let at = serde_json::from_slice::<NodeReport>(kv.value()).map(|r| r.at_ms).ok();
                                if let Some((at_ms, when)) = sent && at == Some(at_ms) {
                                    lag_ms = Some(when.elapsed().as_millis() as u64);
                                }
                            }
                            _ => {}
                        }
                    }
                    let _ = self.events.send(Event::Progress { revision, lag_ms });
                }
                reply = keep_alive.message() => {
                    match reply {
                        Ok(Some(r)) if r.ttl() > 0 => {}
                        Ok(_) => return Ok(EtcdError::unreachable("the heartbeat lease expired")),
                        Err(e) => return Ok(typed(&e).context("the heartbeat lease failed")),
                    }
                }
                _ = heartbeat.tick() => {
                    if let Err(e) = timed(timeout, keeper.keep_alive()).await {
                        return Ok(e.context("renewing the heartbeat lease"));
                    }
                    if let Some(report) = &self.report {
                        let value = serde_json::to_vec(report).expect("reports serialize");
                        let key = self.keys.node(&self.config.name);
                        let at = report.at_ms;
                        let started = Instant::now();
                        if let Err(e) = timed(timeout, client.put(key, value, Some(PutOptions::new().with_lease(lease)))).await {
                            return Ok(e.context("writing the heartbeat"));
                        }
                        sent = Some((at, started));
                    }
                }
                request = self.requests.recv() => {
                    let Some(request) = request else { return Ok(EtcdError::unreachable("shutting down")) };
                    if let Request::Consume { window_secs, .. } = &request {
                        let window_secs = *window_secs;
                        // One lease for every consumed record, renewed while
                        // it has less than a window left: one write per
                        // knock, not two.
                        let fresh = consume_lease.is_some_and(|(_, at, ttl)| {
                            at.elapsed().as_secs() + window_secs < ttl
                        });
                        if !fresh {
                            let ttl = (window_secs * 2).max(60);
                            match timed(timeout, client.lease_grant(ttl as i64, None)).await {
                                Ok(r) => consume_lease = Some((r.id(), Instant::now(), ttl)),
                                Err(e) => {
                                    self.refuse(request, &e.message);
                                    continue;
                                }
                            }
                        }
                    }
                    let mut lease = consume_lease.map(|(id, _, _)| id);
                    if let Request::PutGrant { record, .. } = &request {
                        let now_s = unix_ms() / 1000;
                        // Buckets that ended are gone from etcd too.
                        grant_leases = grant_leases.split_off(&(now_s + 1));
                        let bucket = grant_bucket(record.expires_at_ms);
                        lease = match grant_leases.get(&bucket) {
                            Some(&id) => Some(id),
                            None => {
                                let ttl = (bucket + 2).saturating_sub(now_s) as i64;
                                match timed(timeout, client.lease_grant(ttl, None)).await {
                                    Ok(r) => {
                                        grant_leases.insert(bucket, r.id());
                                        Some(r.id())
                                    }
                                    // The put grants its own lease then,
                                    // and reports what fails.
                                    Err(_) => None,
                                }
                            }
                        };
                    }
                    self.serve(&client, request, lease);
                }
            }
        }
    }

    /// Starts a request on its own task, so a slow write holds up neither
    /// the watch nor other requests.
    /// `lease`: the lease the request's key goes under, when the loop chose
    /// one (a consumed record's, or a grant's bucket).
    fn serve(&mut self, client: &Client, request: Request, lease: Option<i64>) {
        let mut client = client.clone();
        let events = self.events.clone();
        let keys = self.keys.clone();
        let name = self.config.name.clone();
        let timeout = self.timeout;
        let cluster_key = self.cluster_key.clone();
        match request {
            Request::Report(report) => self.report = Some(report),
            Request::Consume {
                consumed, token, ..
            } => {
                tokio::spawn(async move {
                    let key = keys.consumed(&consumed);
                    let options = lease.map(|id| PutOptions::new().with_lease(id));
                    let txn = Txn::new()
                        .when([Compare::version(key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(key, name, options)]);
                    let result = timed(timeout, client.txn(txn))
                        .await
                        .map(|r| r.succeeded())
                        .map_err(String::from);
                    let _ = events.send(Event::Consumed { token, result });
                });
            }
            Request::PutGrant { holder, record } => {
                tokio::spawn(async move {
                    let ttl = (record.expires_at_ms.saturating_sub(unix_ms()) / 1000 + 2) as i64;
                    let mut record = record;
                    model::sign(&cluster_key, &keys.grant(&holder), &mut record);
                    let value = serde_json::to_vec(&record).expect("records serialize");
                    let key = keys.grant(&holder);
                    let put = |lease: i64| {
                        let mut client = client.clone();
                        let (key, value) = (key.clone(), value.clone());
                        async move {
                            timed(
                                timeout,
                                client.put(key, value, Some(PutOptions::new().with_lease(lease))),
                            )
                            .await
                            .map(|put| put.header().map_or(0, |h| h.revision()))
                        }
                    };
                    let mut leases = client.clone();
                    let written = async {
                        // A shared lease that etcd no longer has (it can
                        // lose one only with its data) costs one retry
                        // under a lease of the grant's own.
                        if let Some(shared) = lease
                            && let Ok(revision) = put(shared).await
                        {
                            return Ok(revision);
                        }
                        let own = timed(timeout, leases.lease_grant(ttl, None)).await?.id();
                        Ok::<_, String>(put(own).await?)
                    };
                    let _ = events.send(match written.await {
                        Ok(revision) => Event::GrantWritten { holder, revision },
                        Err(why) => Event::PublishFailed { holder, why },
                    });
                });
            }
            Request::DeleteGrant { holder } => {
                tokio::spawn(async move {
                    if let Err(why) = timed(timeout, client.delete(keys.grant(&holder), None)).await
                    {
                        let _ = events.send(Event::WithdrawFailed {
                            holder,
                            why: why.into(),
                        });
                    }
                });
            }
            Request::Revoke { id, record } => {
                tokio::spawn(async move {
                    let mut record = record;
                    model::sign(&cluster_key, &keys.revoke(&id), &mut record);
                    let ends = super::revokes::Entry::of(&record, true);
                    let done = async {
                        // The grants it ends, as etcd has them (a node
                        // that writes one meanwhile is refused by every
                        // node: it was opened before the revoke).
                        let listed = timed(
                            timeout,
                            client.get(keys.grants(), Some(GetOptions::new().with_prefix())),
                        )
                        .await?;
                        let ended: Vec<String> = listed
                            .kvs()
                            .iter()
                            .filter_map(|kv| {
                                let Key::Grant(holder) = keys.parse(kv.key()) else {
                                    return None;
                                };
                                let g =
                                    model::check_grant(&cluster_key, &keys, &holder, kv.value())
                                        .ok()?;
                                ends.ends(holder.source, g.device.as_deref(), g.opened_at_ms)
                                    .then(|| keys.grant(&holder))
                            })
                            .collect();
                        let lease = timed(timeout, client.lease_grant(REVOKE_TTL_SECS, None))
                            .await?
                            .id();
                        let mut ops = vec![TxnOp::put(
                            keys.revoke(&id),
                            serde_json::to_vec(&record).expect("records serialize"),
                            Some(PutOptions::new().with_lease(lease)),
                        )];
                        ops.extend(ended.iter().map(|key| TxnOp::delete(key.as_str(), None)));
                        timed(timeout, client.txn(Txn::new().and_then(ops))).await?;
                        Ok::<_, String>(ended.len())
                    };
                    let _ = events.send(match done.await {
                        Ok(fleet_grants) => Event::RevokePublished {
                            key: keys.revoke(&id),
                            id,
                            fleet_grants,
                        },
                        Err(why) => Event::RevokeNotPublished { id, why },
                    });
                });
            }
            Request::DeviceAdd {
                id,
                groups,
                doors,
                key,
                reply,
            } => {
                tokio::spawn(async move {
                    let mut record = DeviceRecord {
                        mac: String::new(),
                        version: RECORD_VERSION,
                        sealed_key: model::seal(&cluster_key, &keys, &id, &key),
                        id: id.clone(),
                        groups,
                        doors,
                        added_by: name,
                        added_at_ms: unix_ms(),
                    };
                    let path = keys.device(&id);
                    model::sign(&cluster_key, &path, &mut record);
                    let txn = Txn::new()
                        .when([Compare::version(path.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            path,
                            serde_json::to_vec(&record).expect("records serialize"),
                            None,
                        )]);
                    let _ = reply.send(match timed(timeout, client.txn(txn)).await {
                        Ok(r) if r.succeeded() => Response::ok(DeviceChanged {
                            id,
                            revision: r.header().map_or(0, |h| h.revision()),
                        }),
                        Ok(_) => Response::error(format!("device {id} exists already in etcd")),
                        Err(e) => unavailable(&e),
                    });
                });
            }
            Request::DeviceRemove { id, reply } => {
                tokio::spawn(async move {
                    let _ = reply.send(
                        match timed(timeout, client.delete(keys.device(&id), None)).await {
                            Ok(r) if r.deleted() > 0 => Response::ok(DeviceChanged {
                                id,
                                revision: r.header().map_or(0, |h| h.revision()),
                            }),
                            Ok(_) => Response::error(format!("no device {id} in etcd")),
                            Err(e) => unavailable(&e),
                        },
                    );
                });
            }
            Request::DeviceList { reply } => {
                tokio::spawn(async move {
                    let listed = timed(
                        timeout,
                        client.get(keys.devices(), Some(GetOptions::new().with_prefix())),
                    )
                    .await;
                    let _ = reply.send(match listed {
                        Ok(r) => Response::ok(
                            r.kvs()
                                .iter()
                                .filter_map(|kv| match keys.parse(kv.key()) {
                                    Key::Device(id) => {
                                        Some(listed_device(&cluster_key, &keys, &id, kv.value()))
                                    }
                                    _ => None,
                                })
                                .collect::<Vec<_>>(),
                        ),
                        Err(e) => unavailable(&e),
                    });
                });
            }
            Request::DeviceSign { id, reply } => {
                tokio::spawn(async move {
                    let _ = reply.send(
                        match vouch(&mut client, &keys, &cluster_key, &id, &name, timeout).await {
                            Ok(device) => Response::ok(device),
                            Err(e) => Response::error(e),
                        },
                    );
                });
            }
            Request::Status { reply } => {
                tokio::spawn(async move {
                    let _ = reply.send(
                        match cluster_status(&mut client, &keys, &name, timeout).await {
                            Ok(status) => Response::ok(status),
                            Err(e) => unavailable(&e),
                        },
                    );
                });
            }
        }
    }

    /// A device record as this node reads it; `None` (reported) when it
    /// cannot: unsigned or altered, another version, a key sealed under
    /// another cluster key.
    fn device_record(&self, id: &str, value: &[u8]) -> Option<FleetDevice> {
        match model::check_device(&self.cluster_key, &self.keys, id, value) {
            Ok((record, key)) => Some(FleetDevice {
                device: crate::devices::Device {
                    id: record.id,
                    key,
                    groups: record.groups,
                    doors: record.doors,
                    declared_in: format!("etcd:{}", self.keys.device(id)).into(),
                },
                added_by: record.added_by,
            }),
            Err(why) => {
                self.refused(format!("device {id}"), self.keys.device(id), why);
                None
            }
        }
    }

    /// A revoke as a node signed it; `None` (reported) for anything else:
    /// a revoke written to etcd by hand, or by a holder of etcd
    /// credentials without the cluster key, is not carried out.
    fn revoke_record(&self, id: &str, value: &[u8]) -> Option<RevokeRecord> {
        let key = self.keys.revoke(id);
        match model::check_revoke(&self.cluster_key, &key, value) {
            Ok(record) => Some(record),
            Err(why) => {
                self.refused(format!("revoke {id}"), key, why);
                None
            }
        }
    }

    /// A grant as a node signed it; `None` (reported) otherwise: write
    /// access to etcd without the cluster key opens nothing.
    fn grant_record(&self, holder: &Holder, value: &[u8]) -> Option<GrantRecord> {
        match model::check_grant(&self.cluster_key, &self.keys, holder, value) {
            Ok(record) => Some(record),
            Err(why) => {
                self.refused(format!("grant ({holder})"), self.keys.grant(holder), why);
                None
            }
        }
    }

    fn refused(&self, what: String, key: String, why: Refused) {
        let _ = self.events.send(Event::Refused { what, key, why });
    }
}

/// `knockd check-config --cluster`: each endpoint in turn, connected as the
/// node would (TLS, user, password), asked to list the prefix and to write
/// and delete a key of its own under it (`P/check/NAME`, which nodes
/// ignore). A line per endpoint; `Err` when none answered in full.
pub(super) async fn probe(settings: &Membership) -> Result<Vec<String>, Vec<String>> {
    let (events, _) = mpsc::unbounded_channel();
    let (_, requests) = mpsc::unbounded_channel();
    let mut task = Task::new(settings, events, requests);
    task.endpoint = 0;
    let mut lines = Vec::new();
    let mut good = false;
    for endpoint in settings.config.endpoints.clone() {
        let result = async {
            let mut client = task.connect().await?;
            let listed = timed(
                task.timeout,
                client.get(task.keys.devices(), Some(GetOptions::new().with_prefix())),
            )
            .await?;
            let refused = listed
                .kvs()
                .iter()
                .filter(|kv| match task.keys.parse(kv.key()) {
                    Key::Device(id) => {
                        model::check_device(&task.cluster_key, &task.keys, &id, kv.value()).is_err()
                    }
                    _ => false,
                })
                .count();
            let check = format!("{}check/{}", task.keys.all(), task.config.name);
            timed(task.timeout, client.put(check.clone(), unix_ms().to_string(), None))
                .await
                .map_err(|e| format!("writing {check}: {e}"))?;
            timed(task.timeout, client.delete(check.clone(), None))
                .await
                .map_err(|e| format!("deleting {check}: {e}"))?;
            Ok::<_, String>(format!(
                "read and wrote {} at revision {}; {} device(s) in etcd{}",
                task.keys.all(),
                listed.header().map_or(0, |h| h.revision()),
                listed.kvs().len(),
                if refused > 0 {
                    format!(", {refused} of them refused by every node (`knockctl device list` says why)")
                } else {
                    String::new()
                }
            ))
        }
        .await;
        match result {
            Ok(line) => {
                good = true;
                lines.push(format!("cluster: {endpoint}: {line}"));
            }
            Err(e) => lines.push(format!("cluster: {endpoint}: FAILED: {e}")),
        }
    }
    if good { Ok(lines) } else { Err(lines) }
}

/// A device record for `device list`: what it says, and whether nodes
/// accept it (they run the same check).
fn listed_device(cluster_key: &DeviceKey, keys: &Keys, id: &str, value: &[u8]) -> ClusterDevice {
    match model::check_device(cluster_key, keys, id, value) {
        Ok((d, _)) => ClusterDevice {
            id: d.id,
            groups: d.groups,
            doors: d.doors,
            added_by: d.added_by,
            added_at_ms: d.added_at_ms,
            refused: None,
        },
        Err(why) => {
            // What the record claims, for the operator to judge.
            let claimed = serde_json::from_slice::<serde_json::Value>(value).ok();
            let list = |field: &str| {
                claimed
                    .as_ref()
                    .and_then(|v| v[field].as_array().cloned())
                    .unwrap_or_default()
                    .iter()
                    .filter_map(|x| x.as_str().map(str::to_owned))
                    .collect()
            };
            ClusterDevice {
                id: id.to_owned(),
                groups: list("groups"),
                doors: list("doors"),
                added_by: claimed
                    .as_ref()
                    .and_then(|v| v["added_by"].as_str().map(str::to_owned))
                    .unwrap_or_default(),
                added_at_ms: claimed
                    .as_ref()
                    .and_then(|v| v["added_at_ms"].as_u64())
                    .unwrap_or(0),
                refused: Some(why.to_string()),
            }
        }
    }
}

/// `device sign ID`: an operator vouches for a record as it stands (one
/// written by an older knockd, before every field was signed). Its key
/// must open under the cluster key for this id, so only a record a node
/// sealed can be vouched for; its groups and doors are the operator's to
/// check. Written only if nobody changed it since it was read.
async fn vouch(
    client: &mut Client,
    keys: &Keys,
    cluster_key: &DeviceKey,
    id: &str,
    node: &str,
    timeout: Duration,
) -> Result<ClusterDevice, String> {
    let path = keys.device(id);
    let read = timed(timeout, client.get(path.clone(), None))
        .await
        .map_err(unreachable)?;
    let kv = read
        .kvs()
        .first()
        .ok_or_else(|| format!("no device {id} in etcd"))?;
    let value: serde_json::Value = serde_json::from_slice(kv.value())
        .map_err(|e| format!("device {id} in etcd is unreadable: {e}"))?;
    let field = |name: &str| value.get(name).cloned().unwrap_or(serde_json::Value::Null);
    if field("id").as_str() != Some(id) {
        return Err(format!("device {id} in etcd names device {}", field("id")));
    }
    let sealed_key = field("sealed_key")
        .as_str()
        .ok_or_else(|| format!("device {id} in etcd has no sealed_key"))?
        .to_owned();
    model::open(cluster_key, keys, id, &sealed_key)
        .map_err(|e| format!("device {id} cannot be vouched for: {e}"))?;
    let strings = |name: &str| -> Result<Vec<String>, String> {
        match field(name) {
            serde_json::Value::Null => Ok(Vec::new()),
            serde_json::Value::Array(items) => items
                .iter()
                .map(|x| {
                    x.as_str()
                        .filter(|s| crate::config::is_valid_name(s, crate::config::DEVICE_ID_MAX))
                        .map(str::to_owned)
                        .ok_or_else(|| format!("device {id}: {name} holds {x}, not a name"))
                })
                .collect(),
            other => Err(format!("device {id}: {name} is {other}, not a list")),
        }
    };
    let mut record = DeviceRecord {
        mac: String::new(),
        version: RECORD_VERSION,
        id: id.to_owned(),
        groups: strings("groups")?,
        doors: strings("doors")?,
        sealed_key,
        added_by: field("added_by").as_str().unwrap_or(node).to_owned(),
        added_at_ms: field("added_at_ms").as_u64().unwrap_or_else(unix_ms),
    };
    model::sign(cluster_key, &path, &mut record);
    let txn = Txn::new()
        .when([Compare::mod_revision(
            path.clone(),
            CompareOp::Equal,
            kv.mod_revision(),
        )])
        .and_then([TxnOp::put(
            path,
            serde_json::to_vec(&record).expect("records serialize"),
            None,
        )]);
    match timed(timeout, client.txn(txn)).await {
        Ok(r) if r.succeeded() => Ok(ClusterDevice {
            id: record.id,
            groups: record.groups,
            doors: record.doors,
            added_by: record.added_by,
            added_at_ms: record.added_at_ms,
            refused: None,
        }),
        Ok(_) => Err(format!(
            "device {id} changed in etcd while it was read; nothing was signed: look at it again"
        )),
        Err(e) => Err(unreachable(e)),
    }
}

/// A node's health from its report's age (`None`: no report, its
/// heartbeat key expired).
fn health(report_age_ms: Option<u64>) -> &'static str {
    match report_age_ms {
        None => "down",
        Some(age) if age > STALE_MS => "stale",
        Some(_) => "up",
    }
}

/// Every member and its heartbeat.
async fn cluster_status(
    client: &mut Client,
    keys: &Keys,
    asked: &str,
    timeout: Duration,
) -> Result<ClusterStatus, String> {
    let options = || Some(GetOptions::new().with_prefix());
    let members = timed(timeout, client.get(keys.members(), options())).await?;
    let revision = members.header().map_or(0, |h| h.revision());
    let nodes = timed(
        timeout,
        client.get(
            keys.nodes(),
            Some(GetOptions::new().with_prefix().with_revision(revision)),
        ),
    )
    .await?;
    let now = unix_ms();
    let mut reports: std::collections::BTreeMap<String, NodeReport> = nodes
        .kvs()
        .iter()
        .filter_map(|kv| serde_json::from_slice::<NodeReport>(kv.value()).ok())
        .map(|r| (r.name.clone(), r))
        .collect();
    let mut names: Vec<String> = members
        .kvs()
        .iter()
        .filter_map(|kv| {
            kv.key_str()
                .ok()?
                .strip_prefix(&keys.members())
                .map(str::to_owned)
        })
        .collect();
    names.extend(reports.keys().cloned());
    names.sort();
    names.dedup();
    let nodes = names
        .into_iter()
        .map(|name| {
            let report = reports.remove(&name);
            let age = report.as_ref().map(|r| now.saturating_sub(r.at_ms));
            let health = health(age);
            NodeStatus {
                name,
                health: health.into(),
                report_age_ms: age,
                report,
            }
        })
        .collect();
    Ok(ClusterStatus {
        asked: asked.to_owned(),
        revision,
        nodes,
    })
}

/// The end (Unix seconds) of the lease bucket a grant record ending at
/// `expires_at_ms` goes in: the first bucket boundary at or after its
/// deadline, so the lease never ends before the record does.
fn grant_bucket(expires_at_ms: u64) -> u64 {
    expires_at_ms
        .div_ceil(1000)
        .div_ceil(GRANT_LEASE_BUCKET_SECS)
        * GRANT_LEASE_BUCKET_SECS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A grant's lease bucket ends at or after its deadline, within one
    /// bucket of it: the shared lease never drops a live record.
    #[test]
    fn a_grant_lease_bucket_ends_at_or_after_the_grant() {
        for ms in [1, 999, 1000, 1001, 9_999, 10_000, 10_001, 1_765_000_123_456] {
            let end = grant_bucket(ms);
            assert!(end * 1000 >= ms, "{ms} → {end}");
            assert!(
                end * 1000 < ms + (GRANT_LEASE_BUCKET_SECS + 1) * 1000,
                "{ms} → {end}"
            );
            assert_eq!(end % GRANT_LEASE_BUCKET_SECS, 0);
        }
        assert_eq!(grant_bucket(10_000), 10);
        assert_eq!(grant_bucket(10_001), 20);
    }

    #[test]
    fn etcd_errors_the_operator_must_fix_are_told_from_the_network() {
        use tonic::{Code, Status};
        let status = |code, message: &str| {
            typed(&etcd_client::Error::GRpcStatus(Status::new(code, message))).trouble
        };
        // As etcd 3.4 answered the fleet tests.
        assert_eq!(
            status(
                Code::InvalidArgument,
                "etcdserver: authentication failed, invalid user ID or password"
            ),
            Trouble::Authentication
        );
        assert_eq!(
            status(Code::Unauthenticated, "etcdserver: invalid auth token"),
            Trouble::Authentication
        );
        assert_eq!(
            status(Code::PermissionDenied, "etcdserver: permission denied"),
            Trouble::Permission
        );
        assert_eq!(
            status(Code::InvalidArgument, "etcdserver: key is not provided"),
            Trouble::Unreachable
        );
        assert_eq!(
            status(Code::Unavailable, "etcdserver: no leader"),
            Trouble::Unreachable
        );
        assert_eq!(
            transport_trouble("invalid peer certificate: UnknownIssuer"),
            Trouble::Tls
        );
        assert_eq!(
            transport_trouble("tcp connect error: Connection refused"),
            Trouble::Unreachable
        );
        let e = EtcdError::unreachable("no answer").context("https://198.18.0.4:2379");
        assert_eq!(e.to_string(), "https://198.18.0.4:2379: no answer");
    }

    #[test]
    fn a_node_is_stale_between_missed_heartbeats_and_its_lease_running_out() {
        assert_eq!(health(Some(900)), "up");
        assert_eq!(health(Some(STALE_MS + 1)), "stale");
        // The report key lives NODE_TTL_SECS past the last renewal: a
        // report can be stale for a while before it is gone.
        assert!(STALE_MS + 1000 < NODE_TTL_SECS as u64 * 1000);
        assert_eq!(health(None), "down");
    }
}
