//! Grants: which source may reach which one-time door, through which random
//! port, until when.
//!
//! A grant exists twice in the kernel, and this module keeps the two in
//! step: an nftables element (the redirect from the random port to the
//! service, with a kernel timeout) and an XDP allow-map entry (the
//! admission of new connections to that port, with the same deadline). Both
//! expire by themselves, so a dead daemon leaves no open door behind.

use std::{
    collections::HashMap,
    net::IpAddr,
    ops::RangeInclusive,
    time::{Duration, Instant},
};

use rand::Rng as _;
use serde::Serialize;

use crate::{
    config::{Config, DoorMode},
    maps::{self, GuardMaps, PortPolicy, Proto},
    nft::{self, DoorRules, Element, GrantKey},
};

/// An error from the kernel side of a grant, or no port to give.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Nft(#[from] nft::Error),
    #[error(transparent)]
    Maps(#[from] maps::Error),
    #[error("door {door}: no free port left in {start}-{end}")]
    Exhausted { door: String, start: u16, end: u16 },
}

/// A one-time door's grant settings.
#[derive(Debug, Clone)]
struct DoorGrants {
    range: RangeInclusive<u16>,
    service_port: u16,
    open_for: Duration,
    lease_idle: Duration,
    rotate_every: Option<Duration>,
    /// Probes that make a grant move at once (0: never).
    rotate_on_probes: u64,
}

/// One open door for one address.
#[derive(Debug, Clone, Serialize)]
pub struct Grant {
    pub door: String,
    pub source: IpAddr,
    /// The device that opened it, when known (grants adopted after a
    /// restart have none until the device's next heartbeat).
    pub device: Option<String>,
    /// The random port it connects through.
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
    /// Seconds left to open new connections.
    pub fn secs_left(&self, now: Instant) -> u32 {
        self.expires.saturating_duration_since(now).as_secs() as u32
    }

    fn element(&self, now: Instant) -> Element {
        self.element_for(self.port, self.expires, now)
    }

    fn element_for(&self, port: u16, expires: Instant, now: Instant) -> Element {
        Element {
            door: self.door.clone(),
            key: GrantKey {
                source: self.source,
                port,
            },
            timeout: expires.saturating_duration_since(now),
        }
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
    by_source: HashMap<(String, IpAddr), Grant>,
    /// By port: whether some grant (current or retired) may be using it.
    /// Set as a port is handed out, rebuilt from `by_source` each tick and
    /// after an install or a reload, so an open does not walk every grant
    /// (with 100,000 grants that walk cost a millisecond per open; `cargo
    /// xtask bench footprint`). A port freed meanwhile stays marked until
    /// the next tick, which only keeps it out of the draw a moment longer.
    taken: Vec<bool>,
}

/// Whether nothing on this host holds TCP `port`: a wildcard bind (IPv6
/// dual-stack, else IPv4) succeeds only if no socket, listening or
/// connected, uses it. This asks the kernel about one port, where reading
/// /proc/net/tcp walks every socket (milliseconds per grant).
pub fn port_unbound(port: u16) -> bool {
    use socket2::{Domain, Socket, Type};
    let try_bind = |domain: Domain, addr: std::net::SocketAddr| -> Option<bool> {
        let socket = Socket::new(domain, Type::STREAM, None).ok()?;
        if domain == Domain::IPV6 {
            socket.set_only_v6(false).ok()?;
        }
        Some(socket.bind(&addr.into()).is_ok())
    };
    try_bind(Domain::IPV6, (std::net::Ipv6Addr::UNSPECIFIED, port).into())
        .or_else(|| try_bind(Domain::IPV4, (std::net::Ipv4Addr::UNSPECIFIED, port).into()))
        .unwrap_or(false)
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
    /// The one-time doors of `config`.
    pub fn new(config: &Config) -> Grants {
        let doors = config
            .doors
            .iter()
            .filter(|(_, d)| d.mode == DoorMode::OneTime)
            .map(|(name, d)| {
                let range = d.grant_ports();
                let rotate = d.rotate_every_secs();
                (
                    name.clone(),
                    DoorGrants {
                        range: range.start..=range.end,
                        service_port: d.service_port,
                        open_for: Duration::from_secs(u64::from(d.open_for_secs())),
                        lease_idle: Duration::from_secs(u64::from(d.lease_idle_secs())),
                        rotate_every: (rotate > 0).then(|| Duration::from_secs(u64::from(rotate))),
                        rotate_on_probes: u64::from(d.rotate_on_probes()),
                    },
                )
            })
            .collect();
        // The ports XDP protects whatever the time step: knock ports that
        // are valid now lie inside protected ranges already.
        let protected = PortPolicy::from_config(config, &Default::default());
        let table = nft::TableRules {
            doors: Vec::new(),
            interfaces: config.interfaces.clone(),
            guarded_tcp: protected.protected_ranges(Proto::Tcp),
            guarded_udp: protected.protected_ranges(Proto::Udp),
        };
        Grants {
            doors,
            table,
            by_source: HashMap::new(),
            taken: vec![false; usize::from(u16::MAX) + 1],
        }
    }

    /// Rebuilds `taken` from the grants held.
    fn refresh_taken(&mut self) {
        self.taken.fill(false);
        for port in self.by_source.values().flat_map(Grant::ports) {
            self.taken[usize::from(port)] = true;
        }
    }

    /// The nftables table for these doors and the configuration's guard.
    pub fn rules(&self) -> nft::TableRules {
        let mut doors: Vec<DoorRules> = self
            .doors
            .iter()
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
    pub fn install(&mut self, maps: &mut GuardMaps) -> Result<usize, Error> {
        nft::install(&self.rules())?;
        let names: Vec<&str> = self.doors.keys().map(String::as_str).collect();
        let existing = nft::list_grants(&names)?;
        let now = Instant::now();
        for element in &existing {
            maps.allow(
                element.key.source,
                Proto::Tcp,
                element.key.port,
                Some(element.timeout),
            )?;
            let (port, expires) = (element.key.port, now + element.timeout);
            let key = (element.door.clone(), element.key.source);
            match self.by_source.get_mut(&key) {
                // Several elements for one source: the longest-lived is the
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
                    self.by_source.insert(
                        key,
                        Grant {
                            door: element.door.clone(),
                            source: element.key.source,
                            device: None,
                            port,
                            leased: false,
                            rotations: 0,
                            probes: 0,
                            expires,
                            next_rotation: None,
                            retired: Vec::new(),
                        },
                    );
                }
            }
        }
        self.refresh_taken();
        Ok(existing.len())
    }

    /// Puts the table back after someone removed it (`nft flush ruleset`),
    /// with every live grant and its remaining time.
    pub fn restore(&self) -> Result<(), Error> {
        nft::install(&self.rules())?;
        let now = Instant::now();
        let elements: Vec<Element> = self
            .by_source
            .values()
            .flat_map(|g| g.elements(now))
            .collect();
        nft::update_grants(&elements, &[])?;
        Ok(())
    }

    /// A random free port for a new grant on `door`.
    fn fresh_port(&mut self, door: &str) -> Result<u16, Error> {
        let range = &self.doors[door].range;
        let taken = &self.taken;
        let port =
            pick_port(range, |p| !taken[usize::from(p)] && port_unbound(p)).ok_or_else(|| {
                Error::Exhausted {
                    door: door.to_owned(),
                    start: *range.start(),
                    end: *range.end(),
                }
            })?;
        self.taken[usize::from(port)] = true;
        Ok(port)
    }

    /// Writes a grant's current deadline to both kernel places. An element
    /// that exists is replaced, so its timeout restarts.
    fn enforce(
        &self,
        maps: &mut GuardMaps,
        grant: &Grant,
        replace: Option<&Grant>,
        now: Instant,
    ) -> Result<(), Error> {
        let add = [grant.element(now)];
        let remove: Vec<Element> = replace.map(|old| old.element(now)).into_iter().collect();
        if nft::update_grants(&add, &remove).is_err() {
            // The old element may have expired in the kernel a moment ago.
            nft::update_grants(&add, &[])?;
        }
        maps.allow(
            grant.source,
            Proto::Tcp,
            grant.port,
            Some(grant.expires.saturating_duration_since(now)),
        )?;
        if let Some(old) = replace
            && old.port != grant.port
        {
            maps.revoke(old.source, Proto::Tcp, old.port)?;
        }
        Ok(())
    }

    /// Opens `door` for `source`: a fresh random port, or the one it has,
    /// with its deadline renewed. Returns the grant.
    pub fn open(
        &mut self,
        maps: &mut GuardMaps,
        door: &str,
        source: IpAddr,
        device: Option<&str>,
    ) -> Result<Grant, Error> {
        let settings = self.doors[door].clone();
        let now = Instant::now();
        let key = (door.to_owned(), source);
        let existing = self.by_source.get(&key).cloned();
        let grant = match &existing {
            Some(old) => Grant {
                device: device.map(str::to_owned).or(old.device.clone()),
                expires: now
                    + if old.leased {
                        settings.lease_idle
                    } else {
                        settings.open_for
                    },
                ..old.clone()
            },
            None => {
                let port = self.fresh_port(door)?;
                Grant {
                    door: door.to_owned(),
                    source,
                    device: device.map(str::to_owned),
                    port,
                    leased: false,
                    rotations: 0,
                    probes: 0,
                    expires: now + settings.open_for,
                    next_rotation: None,
                    retired: Vec::new(),
                }
            }
        };
        self.enforce(maps, &grant, existing.as_ref(), now)?;
        self.by_source.insert(key, grant.clone());
        Ok(grant)
    }

    /// A heartbeat: the grant becomes (or stays) a lease, alive for
    /// `lease_idle` more, rotating every `rotate_every`. `None` when the
    /// device holds no grant on the door from this address.
    pub fn heartbeat(
        &mut self,
        maps: &mut GuardMaps,
        door: &str,
        source: IpAddr,
        device: Option<&str>,
    ) -> Result<Option<Grant>, Error> {
        let settings = self.doors[door].clone();
        let now = Instant::now();
        let key = (door.to_owned(), source);
        let Some(old) = self.by_source.get(&key).cloned() else {
            return Ok(None);
        };
        if old.device.is_some() && old.device.as_deref() != device {
            return Ok(None);
        }
        let grant = Grant {
            device: device.map(str::to_owned),
            leased: true,
            expires: now + settings.lease_idle,
            next_rotation: old
                .next_rotation
                .or(settings.rotate_every.map(|every| now + every)),
            ..old.clone()
        };
        self.enforce(maps, &grant, Some(&old), now)?;
        self.by_source.insert(key, grant.clone());
        Ok(Some(grant))
    }

    /// Ends a grant now. Established connections carry on (conntrack).
    pub fn close(
        &mut self,
        maps: &mut GuardMaps,
        door: &str,
        source: IpAddr,
    ) -> Result<Option<Grant>, Error> {
        let Some(grant) = self.by_source.remove(&(door.to_owned(), source)) else {
            return Ok(None);
        };
        // Elements may have just expired; their absence is the goal, so
        // each goes in its own batch (one missing would fail the others).
        let now = Instant::now();
        for element in grant.elements(now) {
            let _ = nft::update_grants(&[], &[element]);
        }
        for port in grant.ports() {
            maps.revoke(grant.source, Proto::Tcp, port)?;
        }
        Ok(Some(grant))
    }

    /// Forgets expired grants (the kernel already dropped them) and moves
    /// leases whose rotation is due to fresh ports. Returns the rotations
    /// made, as (old, new) grants.
    pub fn tick(&mut self, maps: &mut GuardMaps) -> Result<Vec<(Grant, Grant)>, Error> {
        let now = Instant::now();
        self.by_source.retain(|_, g| g.expires > now);
        // The kernel closed retired ports at their deadline already.
        for grant in self.by_source.values_mut() {
            grant.retired.retain(|&(_, expires)| expires > now);
        }
        let due: Vec<Grant> = self
            .by_source
            .values()
            .filter(|g| g.next_rotation.is_some_and(|at| at <= now))
            .cloned()
            .collect();
        let mut rotated = Vec::new();
        for old in due {
            rotated.push((
                old.clone(),
                self.rotate(maps, old, Rotation::Scheduled, now)?,
            ));
        }
        self.refresh_taken();
        Ok(rotated)
    }

    /// Moves a lease to a fresh port. On its schedule the old port closes
    /// to new connections now and the next rotation is set; after probes
    /// the old port stays open to the holder until its deadline, and the
    /// schedule is left as it was.
    fn rotate(
        &mut self,
        maps: &mut GuardMaps,
        old: Grant,
        why: Rotation,
        now: Instant,
    ) -> Result<Grant, Error> {
        let settings = self.doors[&old.door].clone();
        let port = self.fresh_port(&old.door)?;
        let mut grant = Grant {
            port,
            rotations: old.rotations + 1,
            probes: 0,
            ..old.clone()
        };
        match why {
            Rotation::Scheduled => {
                grant.next_rotation = settings.rotate_every.map(|every| now + every);
                self.enforce(maps, &grant, Some(&old), now)?;
            }
            Rotation::Probed => {
                // The old element and allow entry stay, with their deadline.
                grant.retired.push((old.port, old.expires));
                self.enforce(maps, &grant, None, now)?;
            }
        }
        self.by_source
            .insert((old.door.clone(), old.source), grant.clone());
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
        maps: &mut GuardMaps,
        probes: &[(u16, u64)],
    ) -> Result<Vec<(Grant, Grant)>, Error> {
        let now = Instant::now();
        let mut due = Vec::new();
        for (port, count) in probes {
            for grant in self.by_source.values_mut().filter(|g| g.port == *port) {
                grant.probes += count;
                let threshold = self.doors[&grant.door].rotate_on_probes;
                if grant.leased
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
            rotated.push((old.clone(), self.rotate(maps, old, Rotation::Probed, now)?));
        }
        Ok(rotated)
    }

    /// After a reload: keeps what `old` knew of each grant this table holds
    /// too (its device, lease and rotation state), which the kernel's
    /// elements do not record.
    pub fn inherit(&mut self, old: &Grants) {
        for (key, grant) in &mut self.by_source {
            if let Some(before) = old.by_source.get(key)
                && before.port == grant.port
            {
                grant.device.clone_from(&before.device);
                grant.leased = before.leased;
                grant.rotations = before.rotations;
                grant.probes = before.probes;
                grant.next_rotation = before.next_rotation;
                if grant.retired.is_empty() {
                    grant.retired.clone_from(&before.retired);
                }
            }
        }
        self.refresh_taken();
    }

    /// The ports grants use now (not retired ones), in no order.
    pub fn current_ports(&self) -> impl Iterator<Item = u16> + '_ {
        self.by_source.values().map(|g| g.port)
    }

    /// Every live grant.
    pub fn list(&self) -> Vec<&Grant> {
        let mut grants: Vec<&Grant> = self.by_source.values().collect();
        grants.sort_by_key(|g| (&g.door, g.source));
        grants
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

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
            !port_unbound(port),
            "a listener on one address holds the port"
        );
        drop(listener);
        assert!(port_unbound(port));
        let v6 = std::net::TcpListener::bind("[::1]:0").unwrap();
        assert!(!port_unbound(v6.local_addr().unwrap().port()));
    }
}
