//! The one seam between the daemon's decisions and the host: everything
//! the daemon does to the kernel and the network goes through [`Kernel`].
//!
//! The daemon (`crate::daemon`) and the grant table (`crate::grants`)
//! decide; they hold a `&mut dyn Kernel` and never call nftables, the XDP
//! maps, conntrack, sock_diag, sysctls or a socket themselves. [`Real`] is
//! the host; the unit tests use [`Fake`], a recording of what was asked,
//! so the daemon's decisions (grants, revokes, session caps, fleet
//! replication, reload) are tested without root and without sleeping.
//!
//! Each method returns the error type of the module that does the work,
//! so this module depends on those (nft, maps, cut) and nothing above it.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use socket2::{Domain, Protocol, Socket, Type};

use crate::{
    config::Config,
    conflicts, cut,
    hooks::{HookCounts, HookRun, Runner},
    lockout::InboundSession,
    maps::{self, Counters, GuardMaps, PortPolicy, Proto},
    nft::{self, Element, GrantKey},
};

/// What the daemon asks of the host. See the module documentation.
pub trait Kernel {
    // nftables: the knockd table and its grant elements.

    /// Loads (or replaces) the knockd table.
    fn install(&mut self, rules: &nft::TableRules) -> Result<(), nft::Error>;
    /// Whether the knockd table is there (someone may flush the ruleset).
    fn table_exists(&mut self) -> Result<bool, nft::Error>;
    fn list_grants(&mut self, doors: &[&str]) -> Result<Vec<Element>, nft::Error>;
    fn update_grants(&mut self, add: &[Element], remove: &[Element]) -> Result<(), nft::Error>;
    /// A static grant's element (`None`: remove it), in the UDP set for a
    /// UDP door; `exists` says whether it is live, as
    /// [`nft::update_static_grant`] needs to know.
    fn update_static_grant(
        &mut self,
        key: GrantKey,
        udp: bool,
        timeout: Option<Duration>,
        exists: bool,
    ) -> Result<(), nft::Error>;

    // The XDP guard's maps.

    /// Admits `source` to TCP `port` (`ttl`: until then, else until
    /// revoked).
    fn allow(
        &mut self,
        source: IpAddr,
        port: u16,
        ttl: Option<Duration>,
    ) -> Result<(), maps::Error>;
    fn revoke(&mut self, source: IpAddr, port: u16) -> Result<(), maps::Error>;
    /// The SYNs XDP counted since the last call, by granted port, as
    /// (port, count); the counts start again from zero.
    fn drain_probes(&mut self) -> Result<Vec<(u16, u64)>, maps::Error>;
    /// Makes the port policy `policy`; returns the entries written.
    fn apply_port_policy(&mut self, policy: &PortPolicy) -> Result<usize, maps::Error>;
    /// Marks one TCP port as granted (probes to it are counted), writing
    /// that entry alone.
    fn mark_granted(&mut self, port: u16) -> Result<(), maps::Error>;
    /// The port policy the kernel holds.
    fn port_policy(&self) -> &PortPolicy;
    fn set_knock_rate(&mut self, rate_per_sec: u32, burst: u32) -> Result<(), maps::Error>;
    fn counters(&self) -> Result<Counters, maps::Error>;

    // Sockets, conntrack and sock_diag.

    /// Whether nothing on the host is bound to TCP `port`.
    fn port_unbound(&self, port: u16) -> bool;
    /// Enters the connections in progress that conntrack does not track
    /// into it. Never fails: a failure endangers sessions in progress, not
    /// the guard, so it is logged.
    fn adopt_sessions(&mut self);
    /// The connections through `scopes`, for session caps and status.
    fn sessions(&mut self, scopes: &[cut::DoorPorts]) -> Result<Vec<cut::Session>, cut::Error>;
    /// Cuts these sessions (their sockets aborted, conntrack entries gone).
    fn end_sessions(&mut self, sessions: &[cut::Session]) -> Result<cut::Ended, cut::Error>;
    /// Cuts every connection `cuts` describe (a revoke).
    fn cut(&mut self, cuts: &[cut::Cut]) -> Result<cut::Ended, cut::Error>;
    /// Turns conntrack's timestamps on; `false` when the kernel has none.
    fn enable_timestamps(&mut self) -> io::Result<bool>;
    /// The sessions in progress that entered through a listening port (the
    /// lockout guard's input).
    fn inbound_sessions(&mut self) -> Vec<InboundSession>;
    /// Warns of the host's other rules that would keep `config`'s doors
    /// shut (the operator's old firewall).
    fn warn_conflicts(&mut self, config: &Config);
    /// Sends `bytes` from `from` (the knocked address and port) to `to`.
    fn send_reply(&mut self, from: SocketAddr, to: SocketAddr, bytes: &[u8]) -> io::Result<()>;

    // Hooks.

    /// Starts a door's hook in the background: it never delays the caller.
    fn run_hook(&mut self, run: HookRun);
    /// How the hooks started so far went.
    fn hook_counts(&self) -> HookCounts;

    /// The recording, when this is the unit tests' [`Fake`].
    #[cfg(test)]
    fn fake(&mut self) -> Option<&mut Fake> {
        None
    }
}

/// The host: nftables over netlink, the guard's maps, conntrack and
/// sock_diag, sysctls, and a UDP socket per reply.
pub struct Real {
    maps: GuardMaps,
    hooks: Runner,
}

impl Real {
    pub fn new(maps: GuardMaps) -> Real {
        Real {
            maps,
            hooks: Runner::default(),
        }
    }
}

fn log_adopted(adopted: usize) {
    if adopted > 0 {
        tracing::info!(
            connections = adopted,
            "adopted connections in progress that conntrack did not track, so the guard keeps them"
        );
    }
}

/// [`cut::adopt`], logged rather than fatal: failing to adopt endangers
/// sessions in progress, not the guard.
fn adopt() {
    match cut::adopt() {
        Ok(done) => log_adopted(done.adopted),
        Err(e) => tracing::warn!(
            error = %crate::error_chain(&e),
            "could not enter the connections in progress into conntrack; \
             sessions begun before knockd on protected ports may stall"
        ),
    }
}

/// Whether nothing on this host holds TCP `port`: a wildcard bind (IPv6
/// dual-stack, else IPv4) succeeds only if no socket, listening or
/// connected, uses it. This asks the kernel about one port, where reading
/// /proc/net/tcp walks every socket (milliseconds per grant).
pub fn port_unbound(port: u16) -> bool {
    let try_bind = |domain: Domain, addr: SocketAddr| -> Option<bool> {
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

/// [`conflicts::find`] on this host's ruleset, as it is now: the rules of
/// other tables that would keep `config`'s doors shut.
pub fn conflicts_on_host(config: &Config) -> Result<Vec<String>, nft::Error> {
    let (chains, rules) = nft::host_ruleset()?;
    Ok(conflicts::find(
        &chains,
        &rules,
        &conflicts::doors_of(config),
    ))
}

impl Kernel for Real {
    /// Adopts the connections in progress before loading the table (see
    /// [`cut::adopt`]), so none of their segments meets the guard
    /// untracked; [`Kernel::adopt_sessions`] catches, once the grants are
    /// back, those that began meanwhile.
    fn install(&mut self, rules: &nft::TableRules) -> Result<(), nft::Error> {
        adopt();
        nft::install(rules)
    }
    fn table_exists(&mut self) -> Result<bool, nft::Error> {
        nft::table_exists()
    }
    fn list_grants(&mut self, doors: &[&str]) -> Result<Vec<Element>, nft::Error> {
        nft::list_grants(doors)
    }
    fn update_grants(&mut self, add: &[Element], remove: &[Element]) -> Result<(), nft::Error> {
        nft::update_grants(add, remove)
    }
    fn update_static_grant(
        &mut self,
        key: GrantKey,
        udp: bool,
        timeout: Option<Duration>,
        exists: bool,
    ) -> Result<(), nft::Error> {
        nft::update_static_grant(key, udp, timeout, exists)
    }
    fn allow(
        &mut self,
        source: IpAddr,
        port: u16,
        ttl: Option<Duration>,
    ) -> Result<(), maps::Error> {
        self.maps.allow(source, Proto::Tcp, port, ttl)
    }
    fn revoke(&mut self, source: IpAddr, port: u16) -> Result<(), maps::Error> {
        self.maps.revoke(source, Proto::Tcp, port)
    }
    fn drain_probes(&mut self) -> Result<Vec<(u16, u64)>, maps::Error> {
        self.maps.drain_probes()
    }
    fn apply_port_policy(&mut self, policy: &PortPolicy) -> Result<usize, maps::Error> {
        self.maps.apply_port_policy(policy)
    }
    fn mark_granted(&mut self, port: u16) -> Result<(), maps::Error> {
        self.maps
            .add_port_flags(Proto::Tcp, port, knockd_common::policy::GRANTED)
    }
    fn port_policy(&self) -> &PortPolicy {
        self.maps.policy()
    }
    fn set_knock_rate(&mut self, rate_per_sec: u32, burst: u32) -> Result<(), maps::Error> {
        self.maps.set_knock_rate(rate_per_sec, burst)
    }
    fn counters(&self) -> Result<Counters, maps::Error> {
        self.maps.counters()
    }
    fn port_unbound(&self, port: u16) -> bool {
        port_unbound(port)
    }
    fn adopt_sessions(&mut self) {
        adopt();
    }
    fn sessions(&mut self, scopes: &[cut::DoorPorts]) -> Result<Vec<cut::Session>, cut::Error> {
        cut::sessions(scopes)
    }
    fn end_sessions(&mut self, sessions: &[cut::Session]) -> Result<cut::Ended, cut::Error> {
        cut::end(sessions)
    }
    fn cut(&mut self, cuts: &[cut::Cut]) -> Result<cut::Ended, cut::Error> {
        cut::connections(cuts)
    }
    fn enable_timestamps(&mut self) -> io::Result<bool> {
        cut::enable_timestamps()
    }
    fn inbound_sessions(&mut self) -> Vec<InboundSession> {
        crate::lockout::inbound_sessions()
    }
    fn warn_conflicts(&mut self, config: &Config) {
        match conflicts_on_host(config) {
            Ok(found) => {
                for conflict in found {
                    tracing::warn!(conflict = %conflict, "another table keeps a door shut");
                }
            }
            Err(e) => tracing::warn!(
                error = %crate::error_chain(&e),
                "could not read the host's ruleset to look for rules that keep doors shut"
            ),
        }
    }
    fn send_reply(&mut self, from: SocketAddr, to: SocketAddr, bytes: &[u8]) -> io::Result<()> {
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
    fn run_hook(&mut self, run: HookRun) {
        self.hooks.start(run);
    }
    fn hook_counts(&self) -> HookCounts {
        self.hooks.counts()
    }
}

#[cfg(test)]
pub use fake::Fake;

#[cfg(test)]
mod fake {
    use std::collections::{HashMap, HashSet};

    use super::*;

    /// The kernel as a recording: what each call asked for, kept as the
    /// state it would leave (nftables elements and XDP allow entries with
    /// their timeouts, the port policy), and the calls that leave none
    /// (cuts, replies) in order. Tests set what the host shows (`existing`
    /// grants, `bound` ports, `probes`, `live` sessions) and may make the
    /// grant writes fail (`fail_grants`).
    pub struct Fake {
        /// nftables grant elements: (set: a door, or "static" / "static_udp"; source; port).
        pub elements: HashMap<(String, IpAddr, u16), Duration>,
        /// The device each one-time grant element names (its comment).
        pub comments: HashMap<(String, IpAddr, u16), String>,
        pub allowed: HashMap<(IpAddr, u16), Option<Duration>>,
        pub bound: HashSet<u16>,
        /// What `list_grants` finds instead of `elements` (a table from
        /// before a restart).
        pub existing: Vec<Element>,
        /// What `drain_probes` finds next.
        pub probes: Vec<(u16, u64)>,
        pub installs: usize,
        /// Whether the table is there (`install` puts it back).
        pub table: bool,
        pub policy: PortPolicy,
        /// What `sessions` finds.
        pub live: Vec<cut::Session>,
        /// Sessions `end_sessions` ended, in order.
        pub ended: Vec<cut::Session>,
        /// What each revoke asked to cut, in order.
        pub cuts: Vec<Vec<cut::Cut>>,
        /// Replies sent: (from, to, bytes).
        pub replies: Vec<(SocketAddr, SocketAddr, Vec<u8>)>,
        pub knock_rate: (u32, u32),
        /// Hooks started, in order.
        pub hooks: Vec<HookRun>,
        /// nftables writes (the table, grant elements) fail while set.
        pub fail_grants: bool,
    }

    impl Default for Fake {
        fn default() -> Fake {
            Fake {
                elements: HashMap::new(),
                comments: HashMap::new(),
                allowed: HashMap::new(),
                bound: HashSet::new(),
                existing: Vec::new(),
                probes: Vec::new(),
                installs: 0,
                table: false,
                policy: PortPolicy::empty(),
                live: Vec::new(),
                ended: Vec::new(),
                cuts: Vec::new(),
                replies: Vec::new(),
                knock_rate: (0, 0),
                hooks: Vec::new(),
                fail_grants: false,
            }
        }
    }

    impl Fake {
        /// Whether both kernel places admit `source` to `port` of `door`.
        pub fn admits(&self, door: &str, source: IpAddr, port: u16) -> bool {
            self.allowed.contains_key(&(source, port))
                && self.elements.contains_key(&(door.into(), source, port))
        }

        fn refuse(&self) -> Result<(), nft::Error> {
            if self.fail_grants {
                return Err(nft::Error::Process {
                    what: "a test's fake kernel",
                    source: io::Error::other("refused by the test"),
                });
            }
            Ok(())
        }
    }

    impl Kernel for Fake {
        fn install(&mut self, _rules: &nft::TableRules) -> Result<(), nft::Error> {
            self.refuse()?;
            self.installs += 1;
            self.table = true;
            Ok(())
        }
        fn table_exists(&mut self) -> Result<bool, nft::Error> {
            Ok(self.table)
        }
        /// `existing` when a test set it (the table a restart finds), else
        /// the elements held (as a reload finds them).
        fn list_grants(&mut self, doors: &[&str]) -> Result<Vec<Element>, nft::Error> {
            let held = self
                .elements
                .iter()
                .filter(|((door, _, _), _)| doors.contains(&door.as_str()))
                .map(|(key @ (door, source, port), timeout)| Element {
                    door: door.clone(),
                    key: GrantKey {
                        source: *source,
                        port: *port,
                    },
                    timeout: *timeout,
                    device: self.comments.get(key).cloned(),
                });
            if !self.existing.is_empty() {
                return Ok(self.existing.clone());
            }
            Ok(held.collect())
        }
        fn update_grants(&mut self, add: &[Element], remove: &[Element]) -> Result<(), nft::Error> {
            self.refuse()?;
            for e in remove {
                let key = (e.door.clone(), e.key.source, e.key.port);
                self.elements.remove(&key);
                self.comments.remove(&key);
            }
            for e in add {
                let key = (e.door.clone(), e.key.source, e.key.port);
                self.elements.insert(key.clone(), e.timeout);
                match &e.device {
                    Some(device) => self.comments.insert(key, device.clone()),
                    None => self.comments.remove(&key),
                };
            }
            Ok(())
        }
        fn update_static_grant(
            &mut self,
            key: GrantKey,
            udp: bool,
            timeout: Option<Duration>,
            _exists: bool,
        ) -> Result<(), nft::Error> {
            self.refuse()?;
            let set = if udp { "static_udp" } else { "static" };
            let element = (set.to_owned(), key.source, key.port);
            match timeout {
                Some(t) => self.elements.insert(element, t),
                None => self.elements.remove(&element),
            };
            Ok(())
        }
        fn allow(
            &mut self,
            source: IpAddr,
            port: u16,
            ttl: Option<Duration>,
        ) -> Result<(), maps::Error> {
            self.allowed.insert((source, port), ttl);
            Ok(())
        }
        fn revoke(&mut self, source: IpAddr, port: u16) -> Result<(), maps::Error> {
            self.allowed.remove(&(source, port));
            Ok(())
        }
        fn drain_probes(&mut self) -> Result<Vec<(u16, u64)>, maps::Error> {
            Ok(std::mem::take(&mut self.probes))
        }
        fn apply_port_policy(&mut self, policy: &PortPolicy) -> Result<usize, maps::Error> {
            let changed = usize::from(self.policy != *policy);
            self.policy = policy.clone();
            Ok(changed)
        }
        fn mark_granted(&mut self, port: u16) -> Result<(), maps::Error> {
            self.policy.mark_granted([port]);
            Ok(())
        }
        fn port_policy(&self) -> &PortPolicy {
            &self.policy
        }
        fn set_knock_rate(&mut self, rate_per_sec: u32, burst: u32) -> Result<(), maps::Error> {
            self.knock_rate = (rate_per_sec, burst);
            Ok(())
        }
        fn counters(&self) -> Result<Counters, maps::Error> {
            Ok(Counters::default())
        }
        fn port_unbound(&self, port: u16) -> bool {
            !self.bound.contains(&port)
        }
        fn adopt_sessions(&mut self) {}
        fn sessions(&mut self, scopes: &[cut::DoorPorts]) -> Result<Vec<cut::Session>, cut::Error> {
            Ok(self
                .live
                .iter()
                .filter(|s| s.scope < scopes.len())
                .cloned()
                .collect())
        }
        fn end_sessions(&mut self, sessions: &[cut::Session]) -> Result<cut::Ended, cut::Error> {
            self.live.retain(|s| !sessions.contains(s));
            self.ended.extend_from_slice(sessions);
            Ok(cut::Ended {
                flows: sessions.len(),
                sockets: sessions.len(),
                ..cut::Ended::default()
            })
        }
        fn cut(&mut self, cuts: &[cut::Cut]) -> Result<cut::Ended, cut::Error> {
            let before = self.live.len();
            self.live.retain(|s| {
                !cuts.iter().any(|c| {
                    c.source == s.client.ip()
                        && (c.ports.contains(&s.granted_port) || s.granted_port == c.service_port)
                })
            });
            self.cuts.push(cuts.to_vec());
            let flows = before - self.live.len();
            Ok(cut::Ended {
                flows,
                sockets: flows,
                ..cut::Ended::default()
            })
        }
        fn enable_timestamps(&mut self) -> io::Result<bool> {
            Ok(true)
        }
        fn inbound_sessions(&mut self) -> Vec<InboundSession> {
            Vec::new()
        }
        fn warn_conflicts(&mut self, _config: &Config) {}
        fn send_reply(&mut self, from: SocketAddr, to: SocketAddr, bytes: &[u8]) -> io::Result<()> {
            self.replies.push((from, to, bytes.to_vec()));
            Ok(())
        }
        fn run_hook(&mut self, run: HookRun) {
            self.hooks.push(run);
        }
        fn hook_counts(&self) -> HookCounts {
            HookCounts {
                started: self.hooks.len() as u64,
                ..HookCounts::default()
            }
        }
        fn fake(&mut self) -> Option<&mut Fake> {
            Some(self)
        }
    }
}
