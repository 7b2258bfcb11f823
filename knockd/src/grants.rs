//! Grants: which source may reach which door, through which port, until
//! when. The one owner of "who may reach what", for both kinds of door:
//! - a one-time door's grant is a random port of its range, redirected to
//!   the service, which can become a lease that heartbeats keep alive and
//!   that moves to fresh ports;
//! - a static door's grant is the service port itself (classic clients
//!   cannot learn a port), open for the door's `open_for`;
//! - an action door's grant opens nothing: it is the time between the
//!   door's open and close hooks (classic knockd's start and stop
//!   commands), and lives here only, so a restart forgets it.
//!
//! A grant exists twice in the kernel, and this module keeps the two in
//! step: an nftables element (a one-time grant's redirect, or a static
//! grant's element in the static sets) and an XDP allow-map entry (the
//! admission of new connections to that port), with the same deadline.
//! Both expire by themselves, so a dead daemon leaves no open door behind.
//! A UDP door's grant is its element in the UDP static sets alone (XDP
//! passes that port: only conntrack tells a granted flow's datagrams from
//! new ones).

use std::{
    cmp::Ordering,
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    ops::Bound,
    ops::RangeInclusive,
    sync::Arc,
    time::{Duration, Instant},
};

use rand::Rng as _;
use serde::Serialize;

use crate::{
    config::{Config, DoorKind},
    kernel::Kernel,
    maps::{self, Proto},
    nft::{self, DoorRules, Element, GrantKey},
};

/// An error from the kernel side of a grant, or no port to give.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nft(#[from] nft::Error),
    #[error(transparent)]
    Maps(#[from] maps::Error),
    #[error(
        "door {door}: no free port left in {start}-{end} for {address} (each is granted to it already, or bound on this host)"
    )]
    Exhausted {
        door: String,
        start: u16,
        end: u16,
        address: IpAddr,
    },
    /// The host holds `max_grants` grants already; the allow map is sized
    /// for no more.
    #[error(
        "this host holds max_grants ({max_grants}) grants already; raise max_grants in the configuration (it takes effect on restart) for more"
    )]
    Full { max_grants: u32 },
}

/// What the daemon's memory grows by for each live grant, in bytes, as
/// measured: `cargo xtask bench footprint` ((RSS with its grants − idle
/// RSS) ÷ grants, rounded up). `check-config` states the cost of
/// `max_grants` with it.
pub const DAEMON_BYTES_PER_GRANT: u64 = 420;

/// Which port a door grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GrantKind {
    /// A random port of the door's range, redirected to the service
    /// (one-time doors).
    Redirect,
    /// The service port itself (static doors).
    ServicePort,
    /// No port: the grant only runs its door's hooks (action doors).
    Action,
}

/// A door's grant settings.
#[derive(Debug, Clone)]
struct DoorGrants {
    /// The door's name, which each of its grants and holders shares.
    name: Arc<str>,
    kind: GrantKind,
    range: RangeInclusive<u16>,
    /// 0 for an action door, which has none.
    service_port: u16,
    /// Whether the service is UDP (a static door's): its grant is an
    /// element of the UDP static set, and XDP is not involved.
    udp: bool,
    open_for: Duration,
    lease_idle: Duration,
    rotate_every: Option<Duration>,
    /// Probes that make a grant move at once (0: never).
    rotate_on_probes: u64,
}

/// One open door for one address.
#[derive(Debug, Clone, Serialize)]
pub struct Grant {
    pub kind: GrantKind,
    /// Shared with its holder (and the door's name with every grant of
    /// the door): a million grants do not keep a million copies of names.
    pub door: Arc<str>,
    pub source: IpAddr,
    /// The device that opened it, when known (grants adopted after a
    /// restart have none until the device's next heartbeat).
    pub device: Option<Arc<str>>,
    /// The port it admits to: a random one, or a static door's service
    /// port; 0 for an action door's grant, which admits nothing.
    pub port: u16,
    /// Whether heartbeats keep it alive (and its port rotates).
    pub leased: bool,
    /// Rotations so far.
    pub rotations: u32,
    /// SYNs from other sources to its current port.
    pub probes: u64,
    /// When new connections stop being admitted.
    #[serde(skip)]
    pub expires: Instant,
    /// When a lease moves to a new port.
    #[serde(skip)]
    pub next_rotation: Option<Instant>,
    /// Ports this lease held before a rotation that probes caused, each
    /// still open to this source (and only it) until the deadline it had
    /// then: a third party's SYNs must not lock the holder out before it
    /// has heard of the new port. At most [`RETIRED_MAX`].
    #[serde(skip)]
    pub retired: Vec<(u16, Instant)>,
    /// Fleet mode: another node made or last renewed this grant, and this
    /// one follows what it publishes. It never rotates here (a node that
    /// rotated on its own would give the fleet two ports for one grant).
    #[serde(skip)]
    pub remote: bool,
    /// Whether it admits to a UDP service (a UDP door's).
    #[serde(skip)]
    pub udp: bool,
    /// When this grant of this source began (Unix ms; 0 when not known:
    /// one restored after a restart). Heartbeats and rotations keep it;
    /// fleet mode publishes it, so a revoke ends only grants opened
    /// before it.
    #[serde(skip)]
    pub opened_at_ms: u64,
}

/// A grant as another node published it (fleet mode).
#[derive(Debug, Clone)]
pub struct Published {
    pub port: u16,
    pub expires: Instant,
    pub leased: bool,
    /// Whether another node owns it (else this node published it, before
    /// a restart).
    pub remote: bool,
    /// When it began, as the publishing node said.
    pub opened_at_ms: u64,
}

/// Who holds a grant: a door, an address and, on a one-time door, the
/// device that authenticated. Devices behind one address (a NAT) each hold
/// their own grant, with its own port and lease, and each one's close or
/// heartbeat acts on its own alone. A static or action door's grant has no
/// device in its holder: it is the service port for an address, which the
/// kernel cannot tell devices apart on.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Holder {
    pub door: Arc<str>,
    pub source: IpAddr,
    pub device: Option<Arc<str>>,
}

/// Holders sort by address first, then door and device: an address's
/// grants are one range of the held grants ([`Grants::at`]).
impl Ord for Holder {
    fn cmp(&self, other: &Self) -> Ordering {
        (self.source, &self.door, &self.device).cmp(&(other.source, &other.door, &other.device))
    }
}

impl PartialOrd for Holder {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Holder {
    pub fn new(door: &str, source: IpAddr, device: Option<&str>) -> Holder {
        Holder {
            door: door.into(),
            source,
            device: device.map(Arc::from),
        }
    }
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "door {}, source {}, device {}",
            self.door,
            self.source,
            self.device.as_deref().unwrap_or("-")
        )
    }
}

/// Why a lease moves to a fresh port.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rotation {
    /// `rotate_every` came round.
    Scheduled,
    /// Other sources probed its port (`rotate_on_probes`).
    Probed,
}

/// Most retired ports one lease keeps; while it has this many, probes no
/// longer move it (an on-path attacker who sees each new port could
/// otherwise make it hold one port per second of its idle time).
pub const RETIRED_MAX: usize = 4;

impl Grant {
    /// Who holds it: the key it is kept under.
    pub fn holder(&self) -> Holder {
        Holder {
            door: self.door.clone(),
            source: self.source,
            device: self
                .device
                .clone()
                .filter(|_| self.kind == GrantKind::Redirect),
        }
    }

    /// Seconds left to open new connections.
    pub fn secs_left(&self, now: Instant) -> u32 {
        self.expires.saturating_duration_since(now).as_secs() as u32
    }

    /// The seconds a reply states, at the time of the decision `now`:
    /// whole seconds strictly under what is left then. The kernel's
    /// timeouts start when they are written, after `now`, and the reply
    /// arrives later still, so a grant of exactly 30 s is stated as 29:
    /// never more than the client really has.
    pub fn secs_stated(&self, now: Instant) -> u32 {
        self.expires
            .saturating_duration_since(now)
            .saturating_sub(Duration::from_nanos(1))
            .as_secs() as u32
    }

    fn element(&self, now: Instant) -> Element {
        self.element_for(self.port, self.expires, now)
    }

    fn element_for(&self, port: u16, expires: Instant, now: Instant) -> Element {
        Element {
            door: self.door.to_string(),
            key: GrantKey {
                source: self.source,
                port,
            },
            timeout: expires.saturating_duration_since(now),
            device: self.device.as_deref().map(str::to_owned),
        }
    }

    /// When the tick next has something to do with it: its end, its
    /// rotation (unless another node rotates it) or a retired port's end.
    fn next_event(&self) -> Instant {
        let rotation = self.next_rotation.filter(|_| !self.remote);
        self.retired
            .iter()
            .map(|&(_, ends)| ends)
            .chain(rotation)
            .fold(self.expires, Instant::min)
    }

    /// Whether its ports have allow entries in the XDP map: TCP grants
    /// do; a UDP door's (nftables alone admits) and an action door's
    /// (nothing is admitted) do not.
    fn has_allow_entry(&self) -> bool {
        self.kind != GrantKind::Action && !self.udp
    }

    /// The current port and the retired ones.
    fn ports(&self) -> impl Iterator<Item = u16> + '_ {
        std::iter::once(self.port).chain(self.retired.iter().map(|&(port, _)| port))
    }

    /// The current element and those of retired ports.
    fn elements(&self, now: Instant) -> Vec<Element> {
        std::iter::once(self.element(now))
            .chain(
                self.retired
                    .iter()
                    .map(|&(port, expires)| self.element_for(port, expires, now)),
            )
            .collect()
    }
}

/// Every grant, and the doors they are for.
pub struct Grants {
    doors: HashMap<String, DoorGrants>,
    /// The table's rules beyond the doors (interfaces, protected ports),
    /// from the configuration, so a flushed table can be put back.
    table: nft::TableRules,
    /// In holder order (address, door, device), so an address's grants
    /// are one range and a page of the list follows on from a holder
    /// without a sort. A B-tree, not a hash table: at a million grants a
    /// hash table rounds up to two million slots of a whole grant each,
    /// while B-tree nodes stay mostly full (`cargo xtask bench
    /// footprint`). Keyed by a shared holder, which the indexes point to
    /// too: an index entry costs a pointer, not a copy of the names.
    held: BTreeMap<Arc<Holder>, Grant>,
    /// Kept by [`put`](Self::put) and [`take`](Self::take), rebuilt after
    /// the bulk changes (install, reload).
    index: Index,
    /// The most grants held at once (`max_grants`), and the allow map's
    /// entries ([`maps::allow_entries`]), which retired ports share.
    max_grants: u32,
    allow_capacity: usize,
}

/// What is found from the grants without walking them all.
struct Index {
    /// The holders that name a device, in device order: a device's grants
    /// (what its close or revoke ends) are one range. A pointer a grant:
    /// a map of device names to sets cost a name and a set a device.
    by_device: BTreeSet<ByDevice>,
    /// Each grant's [`Grant::next_event`]: the tick visits the grants due,
    /// not every grant (a walk of a million takes tens of milliseconds,
    /// every second, and knocks wait behind it).
    timeline: BTreeSet<(Instant, Arc<Holder>)>,
    /// How many one-time grants have each TCP port as their current one:
    /// the port policy's granted ports, without a walk.
    on_port: Box<[u32]>,
    /// Retired ports over every grant: whether the allow map has room.
    retired: usize,
}

impl Index {
    fn new() -> Index {
        Index {
            by_device: BTreeSet::new(),
            timeline: BTreeSet::new(),
            on_port: vec![0; usize::from(u16::MAX) + 1].into_boxed_slice(),
            retired: 0,
        }
    }

    fn add(&mut self, holder: &Arc<Holder>, grant: &Grant) {
        self.retired += grant.retired.len();
        self.timeline
            .insert((grant.next_event(), Arc::clone(holder)));
        if grant.kind == GrantKind::Redirect {
            self.on_port[usize::from(grant.port)] += 1;
        }
        if holder.device.is_some() {
            self.by_device.insert(ByDevice(Arc::clone(holder)));
        }
    }

    /// Undoes [`add`](Self::add) of `grant` as it was then.
    fn remove(&mut self, holder: &Arc<Holder>, grant: &Grant) {
        self.retired -= grant.retired.len();
        self.timeline
            .remove(&(grant.next_event(), Arc::clone(holder)));
        if grant.kind == GrantKind::Redirect {
            self.on_port[usize::from(grant.port)] -= 1;
        }
        if holder.device.is_some() {
            self.by_device.remove(&ByDevice(Arc::clone(holder)));
        }
    }
}

/// A holder ordered by device, then address and door (see
/// [`Index::by_device`]).
#[derive(Debug, Clone, PartialEq, Eq)]
struct ByDevice(Arc<Holder>);

impl Ord for ByDevice {
    fn cmp(&self, other: &Self) -> Ordering {
        let (a, b) = (&*self.0, &*other.0);
        (&a.device, a.source, &a.door).cmp(&(&b.device, b.source, &b.door))
    }
}

impl PartialOrd for ByDevice {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

/// What a tick did: grants that ended (for their close hooks), leases it
/// moved, and the first kernel error met (the tick goes on past one).
#[derive(Debug, Default)]
pub struct Ticked {
    pub expired: Vec<Grant>,
    pub rotated: Vec<(Grant, Grant)>,
    pub failed: Option<Error>,
}

/// A random port of `range` that `free` accepts (no grant uses it, nothing
/// is bound to it), from the CSPRNG; `None` when there is none.
pub fn pick_port(range: &RangeInclusive<u16>, free: impl Fn(u16) -> bool) -> Option<u16> {
    let free = |p: &u16| free(*p);
    let mut rng = rand::rng();
    for _ in 0..64 {
        let port = rng.random_range(range.clone());
        if free(&port) {
            return Some(port);
        }
    }
    // Nearly full: scan from a random point so the choice stays unpredictable.
    let len = usize::from(range.end() - range.start()) + 1;
    let offset = rng.random_range(0..len);
    (0..len)
        .map(|i| range.start() + ((offset + i) % len) as u16)
        .find(free)
}

impl Grants {
    /// The doors of `config`.
    pub fn new(config: &Config) -> Grants {
        let doors = config
            .doors
            .iter()
            .map(|(name, d)| {
                let open_for = Duration::from_secs(u64::from(d.open_for_secs));
                let secs = |s: u32| Duration::from_secs(u64::from(s));
                let settings = match &d.kind {
                    DoorKind::OneTime(o) => DoorGrants {
                        name: Arc::from(name.as_str()),
                        kind: GrantKind::Redirect,
                        range: d.grant_ports(),
                        service_port: d.service_port.unwrap_or_default(),
                        udp: false,
                        open_for,
                        lease_idle: secs(o.lease_idle_secs),
                        rotate_every: (o.rotate_every_secs > 0).then(|| secs(o.rotate_every_secs)),
                        rotate_on_probes: u64::from(o.rotate_on_probes),
                    },
                    DoorKind::Static(_) => DoorGrants {
                        name: Arc::from(name.as_str()),
                        kind: if d.service_port.is_some() {
                            GrantKind::ServicePort
                        } else {
                            GrantKind::Action
                        },
                        range: d.grant_ports(),
                        service_port: d.service_port.unwrap_or_default(),
                        udp: d.udp_service_port().is_some(),
                        open_for,
                        lease_idle: open_for,
                        rotate_every: None,
                        rotate_on_probes: 0,
                    },
                };
                (name.clone(), settings)
            })
            .collect();
        // The ports XDP protects whatever the time step: knock ports that
        // are valid now lie inside protected ranges already.
        let protected = crate::policy::port_policy(config, &Default::default());
        let table = nft::TableRules {
            doors: Vec::new(),
            interfaces: config.interfaces.clone(),
            guarded_tcp: protected.protected_ranges(Proto::Tcp),
            // UDP doors' service ports too: XDP passes them to this table,
            // whose conntrack tells a granted flow's datagrams from new ones.
            guarded_udp: protected
                .protected_ranges(Proto::Udp)
                .into_iter()
                .chain(
                    config
                        .doors
                        .values()
                        .filter_map(|d| d.udp_service_port())
                        .map(|port| port..=port),
                )
                .collect(),
            dark: (config.closed_ports == crate::config::ClosedPorts::Drop)
                .then(|| config.public.udp.iter().map(|r| r.start..=r.end).collect()),
        };
        Grants {
            doors,
            table,
            held: BTreeMap::new(),
            index: Index::new(),
            max_grants: config.max_grants,
            allow_capacity: maps::allow_entries(config.max_grants) as usize,
        }
    }

    /// Allow-map entries the grants use: a current port each, and the
    /// retired ones (counted for every grant kind: an upper bound).
    fn allow_used(&self) -> usize {
        self.held.len() + self.index.retired
    }

    /// Refuses a grant for a holder that has none when the host holds
    /// `max_grants` already.
    fn room_for_one(&self) -> Result<(), Error> {
        if self.held.len() >= self.max_grants as usize {
            return Err(Error::Full {
                max_grants: self.max_grants,
            });
        }
        Ok(())
    }

    /// The shared name of `door` (a new one for a door not configured).
    fn door_name(&self, door: &str) -> Arc<str> {
        self.doors
            .get(door)
            .map_or_else(|| Arc::from(door), |d| d.name.clone())
    }

    /// Keeps `grant` under `holder`, in the indexes too.
    fn put(&mut self, holder: Holder, grant: Grant) {
        let holder = match self.held.remove_entry(&holder) {
            Some((shared, old)) => {
                self.index.remove(&shared, &old);
                shared
            }
            None => Arc::new(holder),
        };
        self.index.add(&holder, &grant);
        self.held.insert(holder, grant);
    }

    /// Forgets the grant of `holder`, in the indexes too.
    fn take(&mut self, holder: &Holder) -> Option<Grant> {
        let (shared, grant) = self.held.remove_entry(holder)?;
        self.index.remove(&shared, &grant);
        Some(grant)
    }

    /// Rebuilds the indexes from the grants held.
    fn reindex(&mut self) {
        let mut index = Index::new();
        for (holder, grant) in &self.held {
            index.add(holder, grant);
        }
        self.index = index;
    }

    /// The nftables table for these doors and the configuration's guard.
    pub fn rules(&self) -> nft::TableRules {
        let mut doors: Vec<DoorRules> = self
            .doors
            .iter()
            .filter(|(_, d)| d.kind == GrantKind::Redirect)
            .map(|(name, d)| DoorRules {
                name: name.clone(),
                grant_ports: d.range.clone(),
                service_port: d.service_port,
            })
            .collect();
        doors.sort_by(|a, b| a.name.cmp(&b.name));
        nft::TableRules {
            doors,
            ..self.table.clone()
        }
    }

    /// Installs the table and takes over the grants it already holds (from
    /// before a restart), rebuilding their XDP allow entries.
    pub fn install(&mut self, kernel: &mut dyn Kernel, now: Instant) -> Result<usize, Error> {
        kernel.install(&self.rules())?;
        let names: Vec<&str> = self
            .doors
            .iter()
            .filter(|(_, d)| d.kind == GrantKind::Redirect)
            .map(|(name, _)| name.as_str())
            .collect();
        let existing = kernel.list_grants(&names)?;
        for element in &existing {
            kernel.allow(element.key.source, element.key.port, Some(element.timeout))?;
            let (port, expires) = (element.key.port, now + element.timeout);
            let device: Option<Arc<str>> = element.device.as_deref().map(Arc::from);
            let key = Holder {
                door: self.door_name(&element.door),
                source: element.key.source,
                device: device.clone(),
            };
            match self.held.get_mut(&key) {
                // (Indexes are rebuilt below.)
                // Several elements for one holder: the longest-lived is the
                // grant, the others ports a probe rotation retired.
                Some(grant) => {
                    let (keep, retire) = if expires > grant.expires {
                        ((port, expires), (grant.port, grant.expires))
                    } else {
                        ((grant.port, grant.expires), (port, expires))
                    };
                    (grant.port, grant.expires) = keep;
                    grant.retired.push(retire);
                }
                None => {
                    let door = key.door.clone();
                    self.held.insert(
                        Arc::new(key),
                        Grant {
                            kind: GrantKind::Redirect,
                            door,
                            source: element.key.source,
                            // Kept in the element's comment across restarts.
                            device,
                            port,
                            leased: false,
                            rotations: 0,
                            probes: 0,
                            expires,
                            next_rotation: None,
                            retired: Vec::new(),
                            remote: false,
                            // Redirect grants (the only ones listed) are TCP.
                            udp: false,
                            opened_at_ms: 0,
                        },
                    );
                }
            }
        }
        self.reindex();
        kernel.adopt_sessions();
        Ok(existing.len())
    }

    /// Puts the table back after someone removed it (`nft flush ruleset`),
    /// with every live grant and its remaining time.
    pub fn restore(&self, kernel: &mut dyn Kernel, now: Instant) -> Result<(), Error> {
        kernel.install(&self.rules())?;
        let elements: Vec<Element> = self
            .held
            .values()
            .filter(|g| g.kind == GrantKind::Redirect)
            .flat_map(|g| g.elements(now))
            .collect();
        kernel.update_grants(&elements, &[])?;
        for g in self
            .held
            .values()
            .filter(|g| g.kind == GrantKind::ServicePort)
        {
            let key = GrantKey {
                source: g.source,
                port: g.port,
            };
            kernel.update_static_grant(
                key,
                g.udp,
                Some(g.expires.saturating_duration_since(now)),
                false,
            )?;
        }
        kernel.adopt_sessions();
        Ok(())
    }

    /// A random port of `door`'s range for a new grant to `source`: one no
    /// grant of `source` uses (current or retired, on any door: the allow
    /// map is keyed by address and port) and nothing on this host is bound
    /// to. Other addresses' grants do not count: a port is granted to an
    /// address, never to everyone, so one port serves many addresses and
    /// a door's grants are bounded by memory, not by its range. A stranger
    /// learns no more from a port than before: its SYN meets no allow
    /// entry of its own. Only `source`'s grants are read (the index), not
    /// every grant.
    fn fresh_port(&self, kernel: &dyn Kernel, door: &str, source: IpAddr) -> Result<u16, Error> {
        let range = &self.doors[door].range;
        let used: HashSet<u16> = self.at(source).flat_map(Grant::ports).collect();
        pick_port(range, |p| !used.contains(&p) && kernel.port_unbound(p)).ok_or_else(|| {
            Error::Exhausted {
                door: door.to_owned(),
                start: *range.start(),
                end: *range.end(),
                address: source,
            }
        })
    }

    /// Writes a grant's current deadline to both kernel places. An element
    /// that exists is replaced, so its timeout restarts.
    fn enforce(
        &self,
        kernel: &mut dyn Kernel,
        grant: &Grant,
        replace: Option<&Grant>,
        now: Instant,
    ) -> Result<(), Error> {
        match grant.kind {
            GrantKind::Redirect => {
                let add = [grant.element(now)];
                let remove: Vec<Element> =
                    replace.map(|old| old.element(now)).into_iter().collect();
                if kernel.update_grants(&add, &remove).is_err() {
                    // The old element may have expired in the kernel a
                    // moment ago.
                    kernel.update_grants(&add, &[])?;
                }
            }
            GrantKind::ServicePort => {
                let key = GrantKey {
                    source: grant.source,
                    port: grant.port,
                };
                // Live if the grant it replaces had not expired yet.
                let exists = replace.is_some_and(|old| old.expires > now);
                let timeout = grant.expires.saturating_duration_since(now);
                kernel.update_static_grant(key, grant.udp, Some(timeout), exists)?;
                if grant.udp {
                    // XDP passes a UDP door's port: nftables alone admits.
                    return Ok(());
                }
            }
            // Nothing in the kernel: the hooks are the grant.
            GrantKind::Action => return Ok(()),
        }
        kernel.allow(
            grant.source,
            grant.port,
            Some(grant.expires.saturating_duration_since(now)),
        )?;
        if let Some(old) = replace
            && old.port != grant.port
        {
            kernel.revoke(old.source, old.port)?;
        }
        Ok(())
    }

    /// The holder a knock of `device` from `source` on `door` acts on,
    /// and the grant it holds. On a one-time door a device with no grant
    /// of its own takes over one at that address whose device is unknown
    /// (restored after a restart from an element without a comment), which
    /// is returned as the key to retire.
    fn find(
        &self,
        door: &str,
        source: IpAddr,
        device: Option<&str>,
    ) -> (Holder, Option<Grant>, Option<Holder>) {
        let settings = &self.doors[door];
        let per_device = settings.kind == GrantKind::Redirect;
        let holder = Holder {
            door: settings.name.clone(),
            source,
            device: device.filter(|_| per_device).map(Arc::from),
        };
        if let Some(grant) = self.held.get(&holder) {
            return (holder, Some(grant.clone()), None);
        }
        let unknown = Holder::new(door, source, None);
        match self.held.get(&unknown) {
            Some(grant) if per_device && holder.device.is_some() => {
                (holder, Some(grant.clone()), Some(unknown))
            }
            _ => (holder, None, None),
        }
    }

    /// Keeps `grant` under `holder`, retiring the key it was found under.
    fn keep(&mut self, holder: Holder, grant: &Grant, retire: Option<Holder>) {
        if let Some(old) = retire {
            self.take(&old);
        }
        self.put(holder, grant.clone());
    }

    /// Opens `door` for `device` at `source`: a fresh random port, or the
    /// one its grant has, with its deadline renewed. Returns the grant.
    pub fn open(
        &mut self,
        kernel: &mut dyn Kernel,
        door: &str,
        source: IpAddr,
        device: Option<&str>,
        now: Instant,
    ) -> Result<Grant, Error> {
        let settings = self.doors[door].clone();
        let (holder, existing, retire) = self.find(door, source, device);
        let grant = match &existing {
            Some(old) => Grant {
                device: holder.device.clone().or(old.device.clone()),
                remote: false,
                expires: now
                    + if old.leased {
                        settings.lease_idle
                    } else {
                        settings.open_for
                    },
                ..old.clone()
            },
            None => {
                if retire.is_none() {
                    self.room_for_one()?;
                }
                let port = match settings.kind {
                    GrantKind::Redirect => self.fresh_port(kernel, door, source)?,
                    GrantKind::ServicePort | GrantKind::Action => settings.service_port,
                };
                Grant {
                    kind: settings.kind,
                    door: holder.door.clone(),
                    source,
                    device: holder.device.clone().or_else(|| device.map(Arc::from)),
                    port,
                    leased: false,
                    rotations: 0,
                    probes: 0,
                    expires: now + settings.open_for,
                    next_rotation: None,
                    retired: Vec::new(),
                    remote: false,
                    udp: settings.udp,
                    opened_at_ms: crate::proto::unix_ms(),
                }
            }
        };
        self.enforce(kernel, &grant, existing.as_ref(), now)?;
        self.keep(holder, &grant, retire);
        Ok(grant)
    }

    /// A heartbeat: the grant becomes (or stays) a lease, alive for
    /// `lease_idle` more, rotating every `rotate_every`. `None` when the
    /// device holds no grant on the door from this address.
    pub fn heartbeat(
        &mut self,
        kernel: &mut dyn Kernel,
        door: &str,
        source: IpAddr,
        device: Option<&str>,
        now: Instant,
    ) -> Result<Option<Grant>, Error> {
        let settings = self.doors[door].clone();
        let (holder, Some(old), retire) = self.find(door, source, device) else {
            return Ok(None);
        };
        if old.kind != GrantKind::Redirect {
            return Ok(None);
        }
        let grant = Grant {
            device: holder.device.clone().or_else(|| device.map(Arc::from)),
            leased: true,
            remote: false,
            expires: now + settings.lease_idle,
            next_rotation: old
                .next_rotation
                .or(settings.rotate_every.map(|every| now + every)),
            ..old.clone()
        };
        self.enforce(kernel, &grant, Some(&old), now)?;
        self.keep(holder, &grant, retire);
        Ok(Some(grant))
    }

    /// Ends a grant now. Established connections carry on (conntrack).
    pub fn close(
        &mut self,
        kernel: &mut dyn Kernel,
        holder: &Holder,
        now: Instant,
    ) -> Result<Option<Grant>, Error> {
        let Some(grant) = self.take(holder) else {
            return Ok(None);
        };
        // Elements may have just expired; their absence is the goal, so
        // each goes in its own batch (one missing would fail the others).
        match grant.kind {
            GrantKind::Redirect => {
                for element in grant.elements(now) {
                    let _ = kernel.update_grants(&[], &[element]);
                }
            }
            GrantKind::ServicePort => {
                let key = GrantKey {
                    source: grant.source,
                    port: grant.port,
                };
                let _ = kernel.update_static_grant(key, grant.udp, None, grant.expires > now);
                if grant.udp {
                    return Ok(Some(grant));
                }
            }
            GrantKind::Action => return Ok(Some(grant)),
        }
        for port in grant.ports() {
            kernel.revoke(grant.source, port)?;
        }
        Ok(Some(grant))
    }

    /// Ends, now, what a device's `close` knock ends: every grant the
    /// device holds on `door`, from any address of either family (a
    /// dual-stack client may hold one per family), and the grant of
    /// `source` if no device is known for it (adopted after a restart).
    /// Another device's grant, on the same address or not, is left alone.
    pub fn close_device(
        &mut self,
        kernel: &mut dyn Kernel,
        door: &str,
        source: IpAddr,
        device: &str,
        now: Instant,
    ) -> Result<Vec<Grant>, Error> {
        let unknown = Holder::new(door, source, None);
        let holders: Vec<Holder> = self
            .of_device(device)
            .map(Grant::holder)
            .filter(|h| &*h.door == door)
            .chain(self.held.contains_key(&unknown).then_some(unknown))
            .collect();
        let mut ended = Vec::new();
        for holder in holders {
            ended.extend(self.close(kernel, &holder, now)?);
        }
        Ok(ended)
    }

    /// Does what is due: forgets the grants past their deadline (for
    /// their close hooks), forgets retired ports past theirs, and moves
    /// leases whose rotation is due to fresh ports. Only the grants due
    /// are visited (the timeline), never all of them.
    ///
    /// The kernel stopped admitting at each deadline already (nftables'
    /// timeouts, the allow entries' own deadlines); the allow entries are
    /// deleted here, or the map would fill with dead ones until no new
    /// grant fits in it.
    pub fn tick(&mut self, kernel: &mut dyn Kernel, now: Instant) -> Ticked {
        let due: Vec<Arc<Holder>> = self
            .index
            .timeline
            .iter()
            .take_while(|(at, _)| *at <= now)
            .map(|(_, holder)| Arc::clone(holder))
            .collect();
        let mut ticked = Ticked::default();
        let mut failed = |e: Error| {
            ticked.failed.get_or_insert(e);
        };
        let mut expired = Vec::new();
        let mut rotated = Vec::new();
        for holder in due {
            let Some(mut grant) = self.take(&holder) else {
                continue;
            };
            if grant.expires <= now {
                if grant.has_allow_entry() {
                    for port in grant.ports() {
                        self.release(kernel, grant.source, port)
                            .unwrap_or_else(&mut failed);
                    }
                }
                expired.push(grant);
                continue;
            }
            let mut ended = Vec::new();
            grant.retired.retain(|&(port, ends)| {
                if ends <= now {
                    ended.push(port);
                }
                ends > now
            });
            let rotate = !grant.remote && grant.next_rotation.is_some_and(|at| at <= now);
            self.put((*holder).clone(), grant.clone());
            for port in ended {
                self.release(kernel, grant.source, port)
                    .unwrap_or_else(&mut failed);
            }
            if rotate {
                match self.rotate(kernel, grant.clone(), Rotation::Scheduled, now) {
                    Ok(new) => rotated.push((grant, new)),
                    Err(e) => failed(e),
                }
            }
        }
        ticked.expired = expired;
        ticked.rotated = rotated;
        ticked
    }

    /// Deletes the allow entry of `source` and `port`, unless a live grant
    /// of `source` has that port (then the entry is its).
    fn release(&self, kernel: &mut dyn Kernel, source: IpAddr, port: u16) -> Result<(), Error> {
        if self.at(source).any(|g| g.ports().any(|p| p == port)) {
            return Ok(());
        }
        Ok(kernel.revoke(source, port)?)
    }

    /// Moves a lease to a fresh port. On its schedule the old port closes
    /// to new connections now and the next rotation is set; after probes
    /// the old port stays open to the holder until its deadline, and the
    /// schedule is left as it was.
    fn rotate(
        &mut self,
        kernel: &mut dyn Kernel,
        old: Grant,
        why: Rotation,
        now: Instant,
    ) -> Result<Grant, Error> {
        let settings = self.doors[&*old.door].clone();
        let port = self.fresh_port(kernel, &old.door, old.source)?;
        let mut grant = Grant {
            port,
            rotations: old.rotations + 1,
            probes: 0,
            ..old.clone()
        };
        match why {
            Rotation::Scheduled => {
                grant.next_rotation = settings.rotate_every.map(|every| now + every);
                self.enforce(kernel, &grant, Some(&old), now)?;
            }
            Rotation::Probed => {
                // The old element and allow entry stay, with their deadline.
                grant.retired.push((old.port, old.expires));
                self.enforce(kernel, &grant, None, now)?;
            }
        }
        self.put(old.holder(), grant.clone());
        Ok(grant)
    }

    /// Adds probe counts (granted port, SYNs from other sources) to the
    /// grants on those ports. A lease whose port reached its door's
    /// `rotate_on_probes` moves to a fresh port at once, and its old port
    /// stays open to the holder alone until the deadline it already had:
    /// the holder hears of the new port at its next heartbeat, and no
    /// third party's SYNs, spoofed or not, lock it out before then. A grant
    /// without a lease keeps its port: its holder could not learn a new
    /// one, and it closes within `open_for` anyway. Returns (old, new)
    /// pairs of the leases moved.
    pub fn rotate_probed(
        &mut self,
        kernel: &mut dyn Kernel,
        now: Instant,
    ) -> Result<Vec<(Grant, Grant)>, Error> {
        let mut probes: HashMap<u16, u64> = HashMap::new();
        for (port, count) in kernel.drain_probes()? {
            *probes.entry(port).or_default() += count;
        }
        let mut due = Vec::new();
        // One walk for every probed port (ports are shared by addresses,
        // and only probed ones are drained: rarely any).
        if !probes.is_empty() {
            for grant in self.held.values_mut() {
                let Some(count) = probes.get(&grant.port) else {
                    continue;
                };
                grant.probes += count;
                let threshold = self.doors[&*grant.door].rotate_on_probes;
                if grant.leased
                    && !grant.remote
                    && threshold > 0
                    && grant.probes >= threshold
                    && grant.retired.len() < RETIRED_MAX
                {
                    due.push(grant.clone());
                }
            }
        }
        let mut rotated = Vec::new();
        for old in due {
            // The port it leaves keeps an allow entry: with the map full,
            // probes no longer move leases (as with RETIRED_MAX).
            if self.allow_used() >= self.allow_capacity {
                break;
            }
            rotated.push((
                old.clone(),
                self.rotate(kernel, old, Rotation::Probed, now)?,
            ));
        }
        Ok(rotated)
    }

    /// After a reload: keeps what `old` knew of each grant this table holds
    /// too (its device, lease and rotation state), which the kernel's
    /// elements do not record.
    pub fn inherit(&mut self, old: &Grants) {
        for (key, grant) in &mut self.held {
            if let Some(before) = old.held.get(key)
                && before.port == grant.port
            {
                grant.device.clone_from(&before.device);
                grant.leased = before.leased;
                grant.rotations = before.rotations;
                grant.probes = before.probes;
                grant.next_rotation = before.next_rotation;
                grant.opened_at_ms = before.opened_at_ms;
                if grant.retired.is_empty() {
                    grant.retired.clone_from(&before.retired);
                }
            }
        }
        // The kernel lists no static grants (and holds no action door's);
        // those of doors that remain as they were carry over.
        for (key, grant) in &old.held {
            if grant.kind != GrantKind::Redirect
                && self.doors.get(&*key.door).is_some_and(|d| {
                    d.kind == grant.kind && d.service_port == grant.port && d.udp == grant.udp
                })
            {
                self.held.insert(key.clone(), grant.clone());
            }
        }
        // Devices were learnt above.
        self.reindex();
    }

    /// Fleet mode: makes this node's grant of `holder` what another node
    /// published (its port, deadline, lease), in both kernel places,
    /// replacing what it had. One-time doors only. With `remote`, it
    /// follows that node and does not rotate.
    pub fn apply(
        &mut self,
        kernel: &mut dyn Kernel,
        holder: &Holder,
        published: Published,
        now: Instant,
    ) -> Result<Grant, Error> {
        let (door, source) = (&*holder.door, holder.source);
        let existing = self.held.get(holder).cloned();
        if existing.is_none() {
            self.room_for_one()?;
        }
        let rotate_every = self.doors.get(door).and_then(|d| d.rotate_every);
        let grant = Grant {
            kind: GrantKind::Redirect,
            door: holder.door.clone(),
            source,
            device: holder.device.clone(),
            port: published.port,
            leased: published.leased,
            rotations: existing
                .as_ref()
                .map_or(0, |g| g.rotations + u32::from(g.port != published.port)),
            probes: 0,
            expires: published.expires,
            next_rotation: if published.remote {
                None
            } else {
                existing
                    .as_ref()
                    .and_then(|g| g.next_rotation)
                    .or(rotate_every
                        .filter(|_| published.leased)
                        .map(|every| now + every))
            },
            retired: Vec::new(),
            remote: published.remote,
            udp: false,
            opened_at_ms: published.opened_at_ms,
        };
        // Retired ports of the grant it replaces close now: the fleet
        // knows only the current one.
        if let Some(old) = &existing {
            for &(port, _) in &old.retired {
                let _ = kernel.update_grants(&[], &[old.element_for(port, old.expires, now)]);
                kernel.revoke(source, port)?;
            }
        }
        self.enforce(kernel, &grant, existing.as_ref(), now)?;
        self.put(holder.clone(), grant.clone());
        Ok(grant)
    }

    /// Fleet mode: a grant restored after a restart does not know when it
    /// was opened (the kernel keeps no such thing); the fleet's record of
    /// it does, and a revoke judges by it.
    pub fn learn_opened(&mut self, holder: &Holder, opened_at_ms: u64) {
        if let Some(g) = self.held.get_mut(holder)
            && g.opened_at_ms == 0
        {
            g.opened_at_ms = opened_at_ms;
        }
    }

    /// The grant `holder` holds, if there is one.
    pub fn get(&self, holder: &Holder) -> Option<&Grant> {
        self.held.get(holder)
    }

    /// The random ports grants use now (not retired ones, not static
    /// doors' service ports), in no order: the ports probes are counted on.
    pub fn current_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.index
            .on_port
            .iter()
            .enumerate()
            .filter(|&(_, &grants)| grants > 0)
            .map(|(port, _)| port as u16)
    }

    /// The grants at `source` (every device's behind it), in no order,
    /// from the index: no walk of every grant.
    pub fn at(&self, source: IpAddr) -> impl Iterator<Item = &Grant> + '_ {
        // The least holder of `source`: no door name sorts before "".
        let first = Holder {
            door: "".into(),
            source,
            device: None,
        };
        self.held
            .range::<Holder, _>(&first..)
            .take_while(move |(holder, _)| holder.source == source)
            .map(|(_, grant)| grant)
    }

    /// The grants `device` holds, from every address, in no order, from
    /// the index.
    pub fn of_device<'a>(&'a self, device: &str) -> impl Iterator<Item = &'a Grant> + 'a {
        // The least holder of `device`: no address sorts before 0.0.0.0,
        // and no door before "".
        let first = ByDevice(Arc::new(Holder {
            door: "".into(),
            source: IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
            device: Some(device.into()),
        }));
        let device = first.0.device.clone();
        self.index
            .by_device
            .range(first..)
            .take_while(move |h| h.0.device == device)
            .filter_map(|h| self.held.get(&*h.0))
    }

    /// Every live grant, in holder order (address, door, device).
    pub fn list(&self) -> Vec<&Grant> {
        self.held.values().collect()
    }

    /// How many grants are live.
    pub fn len(&self) -> usize {
        self.held.len()
    }

    /// Whether no grant is live.
    pub fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Up to `limit` grants in holder order, from the one after `after`
    /// (from the first without it): a page of the list, found in the
    /// tree, not by sorting every grant.
    pub fn page(&self, after: Option<&Holder>, limit: usize) -> Vec<&Grant> {
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.held
            .range::<Holder, _>((from, Bound::Unbounded))
            .take(limit)
            .map(|(_, grant)| grant)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::HashSet, path::Path};

    use super::*;
    use crate::kernel::Fake;

    const SECS: fn(u64) -> Duration = Duration::from_secs;

    /// Door "ssh": grants from 40000-40015, open 30 s, leases idle out
    /// after 90 s and move every 300 s or after 10 probes.
    fn grants() -> Grants {
        grants_with("")
    }

    /// [`grants`], with `extra` (top-level YAML lines) in the configuration.
    fn grants_with(extra: &str) -> Grants {
        let config = Config::parse(
            &(String::from(
                "interfaces: [eth0]\n\
             devices: { laptop: { key_file: /k/laptop, groups: [admins] } }\n\
             doors:\n\
             \x20 ssh: { service_port: 22, allow: { groups: [admins] }, grant_ports: \"40000-40015\",\
             \x20 open_for_secs: 30, lease_idle_secs: 90, rotate_every_secs: 300, rotate_on_probes: 10 }\n\
             \x20 legacy: { service_port: 2222, mode: static, open_for_secs: 20, sequence: [\"6000:udp\", \"6001:udp\"] }\n",
            ) + extra),
            Path::new("t.yaml"),
        )
        .unwrap();
        Grants::new(&config)
    }

    /// What the daemon's tick does with the grants: expiry, then
    /// retired ports and rotations.
    fn step(grants: &mut Grants, k: &mut Fake, now: Instant) -> Result<Vec<(Grant, Grant)>, Error> {
        let ticked = grants.tick(k, now);
        match ticked.failed {
            Some(e) => Err(e),
            None => Ok(ticked.rotated),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn an_open_is_in_both_kernel_places_and_a_reopen_keeps_its_port() {
        let (mut grants, mut k, t0) = (grants(), Fake::default(), Instant::now());
        let a = ip("198.18.0.2");
        let g = grants.open(&mut k, "ssh", a, Some("laptop"), t0).unwrap();
        assert!((40000..=40015).contains(&g.port));
        assert!(k.admits("ssh", a, g.port));
        assert_eq!(k.allowed[&(a, g.port)], Some(SECS(30)));
        let again = grants
            .open(&mut k, "ssh", a, Some("laptop"), t0 + SECS(20))
            .unwrap();
        assert_eq!(again.port, g.port, "a renewal keeps the port");
        assert_eq!(again.expires, t0 + SECS(50));
        assert_eq!(k.elements.len(), 1);
        // Another source gets another port.
        let b = grants
            .open(&mut k, "ssh", ip("198.18.0.3"), None, t0)
            .unwrap();
        assert_ne!(b.port, g.port);
    }

    #[test]
    fn a_lease_moves_on_schedule_and_a_plain_grant_never_does() {
        let (mut grants, mut k, t0) = (grants(), Fake::default(), Instant::now());
        let (a, b) = (ip("198.18.0.2"), ip("198.18.0.3"));
        let plain = grants.open(&mut k, "ssh", b, None, t0).unwrap();
        let opened = grants.open(&mut k, "ssh", a, Some("laptop"), t0).unwrap();
        let lease = grants
            .heartbeat(&mut k, "ssh", a, Some("laptop"), t0)
            .unwrap()
            .unwrap();
        assert!(lease.leased);
        assert_eq!(lease.next_rotation, Some(t0 + SECS(300)));
        // Heartbeats every 60 s keep it; the plain grant closes at 30 s.
        for i in 1..5 {
            grants
                .heartbeat(&mut k, "ssh", a, Some("laptop"), t0 + SECS(60 * i))
                .unwrap()
                .unwrap();
        }
        let rotated = step(&mut grants, &mut k, t0 + SECS(300)).unwrap();
        assert_eq!(rotated.len(), 1, "only the lease moves");
        let (old, new) = &rotated[0];
        assert_eq!((old.port, new.rotations), (opened.port, 1));
        assert_ne!(new.port, old.port);
        assert!(k.admits("ssh", a, new.port) && !k.allowed.contains_key(&(a, old.port)));
        assert!(!grants.list().iter().any(|g| g.source == b));
        assert_eq!(new.next_rotation, Some(t0 + SECS(600)));
        let _ = plain;
    }

    #[test]
    fn an_idle_lease_ends_and_a_heartbeat_without_a_grant_finds_none() {
        let (mut grants, mut k, t0) = (grants(), Fake::default(), Instant::now());
        let a = ip("198.18.0.2");
        grants.open(&mut k, "ssh", a, Some("laptop"), t0).unwrap();
        grants
            .heartbeat(&mut k, "ssh", a, Some("laptop"), t0)
            .unwrap();
        step(&mut grants, &mut k, t0 + SECS(89)).unwrap();
        assert_eq!(grants.list().len(), 1);
        step(&mut grants, &mut k, t0 + SECS(91)).unwrap();
        assert!(grants.list().is_empty(), "idle past lease_idle");
        assert!(
            grants
                .heartbeat(&mut k, "ssh", a, Some("laptop"), t0 + SECS(92))
                .unwrap()
                .is_none()
        );
        // Another device's heartbeat never takes over a grant.
        grants
            .open(&mut k, "ssh", a, Some("laptop"), t0 + SECS(100))
            .unwrap();
        assert!(
            grants
                .heartbeat(&mut k, "ssh", a, Some("intern"), t0 + SECS(100))
                .unwrap()
                .is_none()
        );
    }

    /// A lease of laptop's at 198.18.0.2 (opened, then a heartbeat) and a
    /// plain grant at 198.18.0.3, both opened at `t0`.
    fn lease_and_plain(grants: &mut Grants, k: &mut Fake, t0: Instant) -> (Grant, Grant) {
        let (a, b) = (ip("198.18.0.2"), ip("198.18.0.3"));
        let first = grants.open(k, "ssh", a, Some("laptop"), t0).unwrap();
        grants.heartbeat(k, "ssh", a, Some("laptop"), t0).unwrap();
        let plain = grants.open(k, "ssh", b, None, t0).unwrap();
        (first, plain)
    }

    #[test]
    fn probes_move_a_lease_and_keep_its_old_port_for_the_holder() {
        let (mut grants, mut k, t0) = (grants(), Fake::default(), Instant::now());
        let (a, b) = (ip("198.18.0.2"), ip("198.18.0.3"));
        let (first, plain) = lease_and_plain(&mut grants, &mut k, t0);
        // Nine probes do nothing; the tenth moves the lease, never the
        // plain grant, however probed.
        k.probes = vec![(first.port, 9), (plain.port, 50)];
        assert!(grants.rotate_probed(&mut k, t0).unwrap().is_empty());
        k.probes = vec![(first.port, 1)];
        let moved = grants.rotate_probed(&mut k, t0 + SECS(1)).unwrap();
        assert_eq!(moved.len(), 1);
        let new = &moved[0].1;
        assert_ne!(new.port, first.port);
        assert_eq!(new.retired, vec![(first.port, t0 + SECS(90))]);
        assert!(
            k.admits("ssh", a, first.port),
            "the holder keeps the old port"
        );
        assert!(k.admits("ssh", a, new.port));
        assert_eq!(
            grants.list().iter().find(|g| g.source == b).unwrap().port,
            plain.port
        );
        // Retired ports close at their deadline.
        step(&mut grants, &mut k, t0 + SECS(91)).unwrap();
        assert!(grants.list().iter().all(|g| g.retired.is_empty()));
    }

    /// A port is granted to an address, so addresses share a door's
    /// ports: the range bounds the grants of one address (its devices),
    /// not the door's. Bound ports are never given.
    #[test]
    fn a_range_is_exhausted_per_address_and_bound_ports_are_never_given() {
        let (mut grants, mut k, t0) = (grants(), Fake::default(), Instant::now());
        // Bound by someone else: all but three ports of the range.
        k.bound.insert(40001);
        k.bound.extend(40004..=40015);
        let nat = ip("198.18.0.2");
        let devices = ["d0", "d1", "d2", "d3"];
        let ports: HashSet<u16> = devices[..3]
            .iter()
            .map(|d| grants.open(&mut k, "ssh", nat, Some(d), t0).unwrap().port)
            .collect();
        assert_eq!(ports, HashSet::from([40000, 40002, 40003]));
        let full = grants.open(&mut k, "ssh", nat, Some(devices[3]), t0);
        assert!(
            matches!(
                full,
                Err(Error::Exhausted {
                    start: 40000,
                    end: 40015,
                    address,
                    ..
                }) if address == nat
            ),
            "{full:?}"
        );
        // Other addresses get the same ports: 16 of them, three ports.
        for i in 3..19 {
            let other = ip(&format!("198.18.0.{i}"));
            let g = grants.open(&mut k, "ssh", other, None, t0).unwrap();
            assert!(ports.contains(&g.port));
            assert!(k.admits("ssh", other, g.port));
        }
        // One address's close ends its own (address, port) alone.
        let shared = grants
            .get(&Holder::new("ssh", nat, Some("d0")))
            .unwrap()
            .port;
        grants
            .close(&mut k, &Holder::new("ssh", nat, Some("d0")), t0)
            .unwrap()
            .unwrap();
        assert!(!k.admits("ssh", nat, shared));
        assert!(
            grants
                .list()
                .iter()
                .filter(|g| g.port == shared)
                .all(|g| k.admits("ssh", g.source, g.port))
        );
        // The port is free again for that address.
        assert!(
            grants
                .open(&mut k, "ssh", nat, Some(devices[3]), t0)
                .is_ok()
        );
    }

    /// A static door's grant is the service port itself, in the static
    /// sets and the allow map; it never becomes a lease, is never counted
    /// for probes, and survives a reload that keeps its door.
    #[test]
    fn a_static_grant_opens_the_service_port_and_is_one_grant_among_the_rest() {
        let (mut grants, mut k, t0) = (grants(), Fake::default(), Instant::now());
        let a = ip("198.18.0.2");
        let g = grants.open(&mut k, "legacy", a, None, t0).unwrap();
        assert_eq!((g.kind, g.port), (GrantKind::ServicePort, 2222));
        assert_eq!(k.allowed[&(a, 2222)], Some(SECS(20)));
        assert_eq!(k.elements[&("static".into(), a, 2222)], SECS(20));
        let renewed = grants
            .open(&mut k, "legacy", a, None, t0 + SECS(10))
            .unwrap();
        assert_eq!(renewed.expires, t0 + SECS(30));
        assert!(
            grants
                .heartbeat(&mut k, "legacy", a, None, t0)
                .unwrap()
                .is_none(),
            "no lease on a static door"
        );
        grants.open(&mut k, "ssh", a, Some("laptop"), t0).unwrap();
        assert_eq!(grants.list().len(), 2, "one list for both kinds");
        assert!(!grants.current_ports().any(|p| p == 2222));
        let mut reloaded = self::grants();
        reloaded.inherit(&grants);
        assert!(reloaded.list().iter().any(|g| &*g.door == "legacy"));
        grants
            .close(&mut k, &Holder::new("legacy", a, None), t0 + SECS(11))
            .unwrap();
        assert!(!k.allowed.contains_key(&(a, 2222)));
        assert!(!k.elements.contains_key(&("static".into(), a, 2222)));
        // Expired, it is forgotten at the next tick.
        grants.open(&mut k, "legacy", a, None, t0).unwrap();
        step(&mut grants, &mut k, t0 + SECS(21)).unwrap();
        assert!(!grants.list().iter().any(|g| &*g.door == "legacy"));
    }

    /// A device's close ends its grants from both families; another
    /// device's grant, even on the same address, stays.
    #[test]
    fn a_close_ends_the_devices_grants_over_both_families() {
        let (mut grants, mut k, t0) = (grants(), Fake::default(), Instant::now());
        let (v4, v6, other) = (ip("198.18.0.2"), ip("2001:db8::2"), ip("198.18.0.3"));
        grants.open(&mut k, "ssh", v4, Some("laptop"), t0).unwrap();
        grants.open(&mut k, "ssh", v6, Some("laptop"), t0).unwrap();
        grants
            .open(&mut k, "ssh", other, Some("sensor"), t0)
            .unwrap();
        let ended = grants
            .close_device(&mut k, "ssh", v4, "laptop", t0)
            .unwrap();
        let mut sources: Vec<IpAddr> = ended.iter().map(|g| g.source).collect();
        sources.sort();
        assert_eq!(sources, [v4, v6]);
        let left: Vec<IpAddr> = grants.list().iter().map(|g| g.source).collect();
        assert_eq!(left, [other]);
        // Nothing left to close: an empty answer (the reply says no_grant).
        assert!(
            grants
                .close_device(&mut k, "ssh", v6, "laptop", t0)
                .unwrap()
                .is_empty()
        );
        // The sensor's close from the laptop's address ends only its own.
        assert_eq!(
            grants
                .close_device(&mut k, "ssh", v4, "sensor", t0)
                .unwrap()
                .len(),
            1
        );
    }

    /// The indexes hold exactly the grants: each under its address and its
    /// device, nothing else.
    fn assert_indexed(grants: &Grants) {
        let all = grants.list();
        let mut sources: Vec<IpAddr> = all.iter().map(|g| g.source).collect();
        sources.sort();
        sources.dedup();
        let indexed: usize = sources.iter().map(|&s| grants.at(s).count()).sum();
        assert_eq!(indexed, all.len(), "by address");
        for g in &all {
            assert!(grants.at(g.source).any(|x| x.holder() == g.holder()));
            if let Some(d) = &g.device {
                assert!(grants.of_device(d).any(|x| x.holder() == g.holder()));
            }
        }
        let with_device = all.iter().filter(|g| g.device.is_some()).count();
        let by_device = grants.index.by_device.len();
        assert_eq!(by_device, with_device, "by device");
        let retired: usize = all.iter().map(|g| g.retired.len()).sum();
        assert_eq!(grants.index.retired, retired, "retired ports counted");
        // The timeline has each grant once, at its next event.
        let mut timeline: Vec<(Instant, Holder)> = grants
            .index
            .timeline
            .iter()
            .map(|(at, h)| (*at, (**h).clone()))
            .collect();
        let mut wanted: Vec<(Instant, Holder)> = grants
            .held
            .iter()
            .map(|(h, g)| (g.next_event(), (**h).clone()))
            .collect();
        timeline.sort();
        wanted.sort();
        assert_eq!(timeline, wanted, "timeline");
        let mut ports: Vec<u16> = all
            .iter()
            .filter(|g| g.kind == GrantKind::Redirect)
            .map(|g| g.port)
            .collect();
        ports.sort();
        ports.dedup();
        assert_eq!(grants.current_ports().collect::<Vec<_>>(), ports, "ports");
        let from_tree: Vec<&Grant> = grants.page(None, usize::MAX);
        assert_eq!(from_tree.len(), all.len());
    }

    /// Pages follow on from a holder, in address order, and together are
    /// the whole list.
    #[test]
    fn pages_follow_on_from_a_holder_in_address_order() {
        let (mut grants, mut k, t0) = (grants(), Fake::default(), Instant::now());
        for a in ["198.18.0.9", "2001:db8::2", "198.18.0.2", "198.18.0.10"] {
            grants
                .open(&mut k, "ssh", ip(a), Some("laptop"), t0)
                .unwrap();
        }
        grants
            .open(&mut k, "legacy", ip("198.18.0.9"), None, t0)
            .unwrap();
        let order: Vec<(IpAddr, Arc<str>)> = grants
            .list()
            .iter()
            .map(|g| (g.source, g.door.clone()))
            .collect();
        let mut sorted = order.clone();
        sorted.sort();
        assert_eq!(order, sorted, "address, then door");
        assert_eq!(order[0].0, ip("198.18.0.2"));
        let mut paged = Vec::new();
        let mut after: Option<Holder> = None;
        loop {
            let page = grants.page(after.as_ref(), 2);
            if page.is_empty() {
                break;
            }
            assert!(page.len() <= 2);
            after = page.last().map(|g| g.holder());
            paged.extend(page.iter().map(|g| (g.source, g.door.clone())));
        }
        assert_eq!(paged, order);
        assert_eq!(grants.len(), 5);
    }

    /// A grant's allow entries go when it ends by itself, as when it is
    /// closed: before, expiry left them, and the map (sized for the live
    /// grants) filled with dead entries until no new grant fitted.
    #[test]
    fn expired_grants_and_retired_ports_leave_no_allow_entry() {
        let (mut grants, mut k, t0) = (grants(), Fake::default(), Instant::now());
        let (a, b) = (ip("198.18.0.2"), ip("198.18.0.3"));
        let (first, plain) = lease_and_plain(&mut grants, &mut k, t0);
        grants.open(&mut k, "legacy", b, None, t0).unwrap();
        k.probes = vec![(first.port, 10)];
        let moved = grants.rotate_probed(&mut k, t0).unwrap();
        let new = moved[0].1.port;
        assert_indexed(&grants);
        assert_eq!(
            k.allowed.len(),
            4,
            "a's two ports, b's grant and b's static door"
        );
        // b's grants end (20 s and 30 s); a's lease lives on heartbeats.
        step(&mut grants, &mut k, t0 + SECS(31)).unwrap();
        assert!(!k.allowed.contains_key(&(b, plain.port)));
        assert!(!k.allowed.contains_key(&(b, 2222)));
        grants
            .heartbeat(&mut k, "ssh", a, Some("laptop"), t0 + SECS(60))
            .unwrap();
        // The retired port ends at its deadline (90 s), the lease's port
        // stays.
        step(&mut grants, &mut k, t0 + SECS(91)).unwrap();
        assert_indexed(&grants);
        assert!(!k.allowed.contains_key(&(a, first.port)));
        assert!(k.allowed.contains_key(&(a, new)));
        step(&mut grants, &mut k, t0 + SECS(200)).unwrap();
        assert!(k.allowed.is_empty(), "left: {:?}", k.allowed);
        assert_indexed(&grants);
    }

    /// `max_grants` bounds the grants held: one more is refused, naming
    /// it, and changes nothing in the kernel; a renewal still goes through,
    /// and a grant that ends makes room.
    #[test]
    fn past_max_grants_a_new_grant_is_refused_and_nothing_changes() {
        let (mut grants, mut k, t0) = (
            grants_with("max_grants: 2\n"),
            Fake::default(),
            Instant::now(),
        );
        let (a, b, c) = (ip("198.18.0.2"), ip("198.18.0.3"), ip("2001:db8::4"));
        grants.open(&mut k, "ssh", a, Some("laptop"), t0).unwrap();
        grants.open(&mut k, "legacy", b, None, t0).unwrap();
        let (elements, allowed) = (k.elements.clone(), k.allowed.clone());
        let refused = grants.open(&mut k, "ssh", c, Some("laptop"), t0);
        assert!(
            matches!(refused, Err(Error::Full { max_grants: 2 })),
            "{refused:?}"
        );
        assert!(refused.unwrap_err().to_string().contains("max_grants (2)"));
        assert_eq!((k.elements.clone(), k.allowed.clone()), (elements, allowed));
        assert_eq!(grants.list().len(), 2);
        grants
            .open(&mut k, "ssh", a, Some("laptop"), t0 + SECS(5))
            .expect("a renewal is no new grant");
        // The static grant ends at 20 s: room for one.
        step(&mut grants, &mut k, t0 + SECS(21)).unwrap();
        grants
            .open(&mut k, "ssh", c, Some("laptop"), t0 + SECS(21))
            .unwrap();
        assert_indexed(&grants);
    }

    /// Opens, heartbeats, rotations, closes, expiry, a restart and a
    /// reload keep the indexes exact.
    #[test]
    fn the_indexes_follow_every_change() {
        let (mut grants, mut k, t0) = (grants(), Fake::default(), Instant::now());
        let (a, b) = (ip("198.18.0.2"), ip("2001:db8::2"));
        grants.open(&mut k, "ssh", a, Some("laptop"), t0).unwrap();
        grants.open(&mut k, "ssh", a, Some("sensor"), t0).unwrap();
        grants.open(&mut k, "ssh", b, Some("laptop"), t0).unwrap();
        grants.open(&mut k, "legacy", a, None, t0).unwrap();
        assert_indexed(&grants);
        assert_eq!(grants.at(a).count(), 3);
        assert_eq!(grants.of_device("laptop").count(), 2);
        grants
            .heartbeat(&mut k, "ssh", a, Some("sensor"), t0)
            .unwrap()
            .unwrap();
        step(&mut grants, &mut k, t0 + SECS(301)).unwrap();
        assert_indexed(&grants);
        grants.open(&mut k, "ssh", a, Some("laptop"), t0).unwrap();
        grants.close_device(&mut k, "ssh", a, "laptop", t0).unwrap();
        assert_indexed(&grants);
        assert_eq!(grants.of_device("laptop").count(), 0);
        grants.open(&mut k, "ssh", b, Some("laptop"), t0).unwrap();
        let mut restarted = super::tests::grants();
        restarted.install(&mut k, t0).unwrap();
        assert_indexed(&restarted);
        restarted.inherit(&grants);
        assert_indexed(&restarted);
        assert!(restarted.of_device("laptop").any(|g| g.source == b));
        let ticked = restarted.tick(&mut k, t0 + SECS(1000));
        assert!(ticked.failed.is_none());
        let expired = ticked.expired;
        assert!(!expired.is_empty());
        assert_indexed(&restarted);
        assert!(restarted.at(b).next().is_none());
    }

    /// Devices behind one address (a NAT) each hold their own grant: their
    /// own port, lease and close. Before, a second device's open took over
    /// the first one's grant, and the first one's close then found none
    /// while the port stayed open.
    #[test]
    fn devices_behind_one_address_hold_one_grant_each() {
        let (mut grants, mut k, t0) = (grants(), Fake::default(), Instant::now());
        let nat = ip("198.18.0.2");
        let laptop = grants.open(&mut k, "ssh", nat, Some("laptop"), t0).unwrap();
        let sensor = grants.open(&mut k, "ssh", nat, Some("sensor"), t0).unwrap();
        assert_ne!(laptop.port, sensor.port, "a port each");
        assert_eq!(grants.list().len(), 2);
        for port in [laptop.port, sensor.port] {
            assert!(k.admits("ssh", nat, port));
        }
        // The sensor's heartbeat makes its own grant a lease, not the
        // laptop's.
        grants
            .heartbeat(&mut k, "ssh", nat, Some("sensor"), t0 + SECS(10))
            .unwrap()
            .unwrap();
        let held = |grants: &Grants, device: &str| {
            grants
                .get(&Holder::new("ssh", nat, Some(device)))
                .map(|g| (g.port, g.leased))
        };
        assert_eq!(held(&grants, "sensor"), Some((sensor.port, true)));
        assert_eq!(held(&grants, "laptop"), Some((laptop.port, false)));
        // A reopen by the laptop keeps its own port.
        let again = grants
            .open(&mut k, "ssh", nat, Some("laptop"), t0 + SECS(20))
            .unwrap();
        assert_eq!(again.port, laptop.port);
        // The laptop's close ends its grant alone.
        let ended = grants
            .close_device(&mut k, "ssh", nat, "laptop", t0 + SECS(21))
            .unwrap();
        assert_eq!(ended.len(), 1);
        assert_eq!(ended[0].port, laptop.port);
        assert!(!k.admits("ssh", nat, laptop.port));
        assert!(k.admits("ssh", nat, sensor.port));
        assert_eq!(held(&grants, "sensor"), Some((sensor.port, true)));
        // A third device behind the NAT has nothing to heartbeat.
        assert!(
            grants
                .heartbeat(&mut k, "ssh", nat, Some("phone"), t0 + SECS(22))
                .unwrap()
                .is_none()
        );
    }

    /// A grant restored from an element without a device (written before
    /// elements named theirs) is taken over by the first device that
    /// knocks from its address, and is then that device's alone.
    #[test]
    fn a_grant_of_no_known_device_goes_to_the_first_device_that_claims_it() {
        let (mut k, t0) = (Fake::default(), Instant::now());
        let nat = ip("198.18.0.2");
        k.existing = vec![Element {
            door: "ssh".into(),
            key: GrantKey {
                source: nat,
                port: 40007,
            },
            timeout: SECS(30),
            device: None,
        }];
        let mut grants = grants();
        grants.install(&mut k, t0).unwrap();
        let claimed = grants
            .heartbeat(&mut k, "ssh", nat, Some("laptop"), t0)
            .unwrap()
            .unwrap();
        assert_eq!(
            (claimed.port, claimed.device.as_deref()),
            (40007, Some("laptop"))
        );
        assert!(grants.get(&Holder::new("ssh", nat, None)).is_none());
        let other = grants.open(&mut k, "ssh", nat, Some("sensor"), t0).unwrap();
        assert_ne!(other.port, 40007);
        assert_eq!(grants.list().len(), 2);
    }
    #[test]
    fn a_restart_adopts_the_table_and_a_reload_keeps_what_it_knew() {
        let (mut before, mut k, t0) = (grants(), Fake::default(), Instant::now());
        let a = ip("198.18.0.2");
        before.open(&mut k, "ssh", a, Some("laptop"), t0).unwrap();
        let lease = before
            .heartbeat(&mut k, "ssh", a, Some("laptop"), t0)
            .unwrap()
            .unwrap();
        // Two elements for one source (a probe rotation's retired port):
        // the longest-lived is the grant.
        let element = |port, secs| Element {
            door: "ssh".into(),
            key: GrantKey { source: a, port },
            timeout: SECS(secs),
            device: Some("laptop".into()),
        };
        k.existing = vec![element(40003, 20), element(lease.port, 80)];
        let mut adopted = grants();
        assert_eq!(adopted.install(&mut k, t0).unwrap(), 2);
        let g = adopted.list()[0].clone();
        assert_eq!(
            (g.port, g.retired.clone()),
            (lease.port, vec![(40003, t0 + SECS(20))])
        );
        assert!(k.allowed.contains_key(&(a, 40003)));
        assert_eq!(
            (g.device.as_deref(), g.leased),
            (Some("laptop"), false),
            "the kernel keeps the device (the element's comment), not the lease"
        );
        // Nor when the grant was opened: a fleet's record tells it.
        assert_eq!(g.opened_at_ms, 0);
        let mut restarted = grants();
        restarted.install(&mut k, t0).unwrap();
        let laptop = Holder::new("ssh", a, Some("laptop"));
        restarted.learn_opened(&laptop, 1234);
        restarted.learn_opened(&laptop, 5678);
        assert_eq!(restarted.list()[0].opened_at_ms, 1234, "learnt once");
        adopted.inherit(&before);
        let g = adopted.list()[0].clone();
        assert_eq!((g.device.as_deref(), g.leased), (Some("laptop"), true));
        assert_eq!(
            g.opened_at_ms,
            before.list()[0].opened_at_ms,
            "a reload keeps when it was opened"
        );
        assert_ne!(g.opened_at_ms, 0);
        // Closing ends every port it held, retired ones too.
        adopted.close(&mut k, &laptop, t0).unwrap().unwrap();
        assert!(k.elements.is_empty() && k.allowed.is_empty());
    }

    #[test]
    fn picked_ports_are_free_and_spread() {
        let range = 40000..=40015;
        let taken: HashSet<u16> = (40000..=40013).collect();
        for _ in 0..50 {
            assert_eq!(
                pick_port(&range, |p| !taken.contains(&p) && p != 40014),
                Some(40015)
            );
        }
        assert_eq!(pick_port(&range, |_| false), None);
        let seen: HashSet<u16> = (0..400)
            .filter_map(|_| pick_port(&range, |_| true))
            .collect();
        assert_eq!(seen.len(), 16, "every port of the range gets drawn");
    }

    #[test]
    fn ports_in_use_are_not_unbound() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        assert!(
            !crate::kernel::port_unbound(port),
            "a listener on one address holds the port"
        );
        drop(listener);
        assert!(crate::kernel::port_unbound(port));
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        assert!(!crate::kernel::port_unbound(
            v6.local_addr().unwrap().port()
        ));
    }
}
