//! The one module that reads and writes the XDP program's maps.
//!
//! Everything the daemon tells the kernel fast path goes through
//! [`GuardMaps`]: which ports are protected or knock ports, who holds a grant,
//! the knock rate limit; and everything it learns back: the counters. The
//! knock ring buffer is handed out once, to the event reader.

use std::{
    net::{IpAddr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray, RingBuf},
    pin::PinError,
};
use knockd_common::{
    AllowKey, AllowValue, Counter, PORT_POLICY_ENTRIES, Settings, map_names, policy,
    port_policy_index,
};
use serde::Serialize;

/// An error from a map operation, naming the map.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The loaded object lacks a map: the daemon and the XDP program are out
    /// of step (a build problem, not a runtime one).
    #[error("the eBPF object has no map {0}")]
    Missing(&'static str),
    /// A lookup, update or type conversion failed.
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// Pinning a map into bpffs failed.
    #[error("pinning map {name} at {path}")]
    Pin {
        name: &'static str,
        path: PathBuf,
        #[source]
        source: PinError,
    },
    /// The pin directory is not on a bpffs mount, so nothing can be pinned.
    #[error(
        "bpffs_dir {0} is not on a bpffs mount. Mount one (`mount -t bpf bpf /sys/fs/bpf`) \
         or set bpffs_dir to a directory on one; under `ip netns exec`, /sys is a fresh \
         sysfs without it (see the README, \"In a network namespace\")"
    )]
    NotBpffs(PathBuf),
    /// The pin directory could not be prepared.
    #[error("{path} (is bpffs mounted there?)")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Whether `dir` is on a bpffs mount (its statfs magic is BPF_FS_MAGIC).
fn on_bpffs(dir: &Path) -> bool {
    const BPF_FS_MAGIC: u32 = 0xcafe_4a11;
    let Ok(path) = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    let mut stat = std::mem::MaybeUninit::<libc::statfs>::uninit();
    // SAFETY: a NUL-terminated path and a buffer for one statfs.
    let ok = unsafe { libc::statfs(path.as_ptr(), stat.as_mut_ptr()) } == 0;
    // SAFETY: statfs filled it when it returned 0. (f_type's type differs
    // between architectures; the magic fits 32 bits on all of them.)
    ok && unsafe { stat.assume_init() }.f_type as u32 == BPF_FS_MAGIC
}

fn map_err(name: &'static str) -> impl FnOnce(MapError) -> Error {
    move |source| Error::Map { name, source }
}

pub use crate::config::Proto;

/// `addr` as the kernel side stores it: 16 bytes, IPv4 mapped into IPv6.
pub fn addr_to_key(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    }
}

/// The inverse of [`addr_to_key`]: mapped addresses come back as IPv4.
pub fn addr_from_key(key: [u8; 16]) -> IpAddr {
    Ipv6Addr::from(key).to_canonical()
}

/// Nanoseconds on `CLOCK_MONOTONIC`, the clock `bpf_ktime_get_ns` reads, so
/// expiry times written to maps mean the same thing on both sides.
pub fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec; CLOCK_MONOTONIC always exists.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    debug_assert_eq!(rc, 0);
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Allow-map entries for `max_grants` grants: one for each grant's port,
/// and a quarter more for the ports probe rotations retire (each still
/// open to its holder until its deadline). Past that, probes stop moving
/// leases, as they do when one lease has retired its most ports.
pub fn allow_entries(max_grants: u32) -> u32 {
    max_grants.saturating_add(max_grants / 4)
}

/// Kernel memory an allow map of `entries` takes, in bytes: Linux
/// preallocates a hash map's elements (`struct htab_elem`, 48 bytes, then
/// the key and value, each rounded up to 8) and one 16-byte bucket for
/// each entry rounded up to a power of two. It is what the kernel reports
/// as the map's `memlock` in `/proc/PID/fdinfo` (Linux 6.4 and later count
/// it this way; the e2e test `the_allow_map_is_sized_from_max_grants`
/// compares the two), less a few elements per CPU.
pub fn allow_map_bytes(entries: u32) -> u64 {
    const ELEMENT: u64 = 48;
    const BUCKET: u64 = 16;
    let round8 = |n: usize| (n as u64).div_ceil(8) * 8;
    let element = ELEMENT + round8(size_of::<AllowKey>()) + round8(size_of::<AllowValue>());
    u64::from(entries) * element + u64::from(entries.max(1)).next_power_of_two() * BUCKET
}

/// The desired content of the port-policy array, computed from the config.
#[derive(Clone, PartialEq, Eq)]
pub struct PortPolicy(Vec<u8>);

impl PortPolicy {
    /// No port has a policy: everything passes.
    pub fn empty() -> Self {
        PortPolicy(vec![0; PORT_POLICY_ENTRIES as usize])
    }

    /// Marks the TCP ports grants use now, so SYNs to them from other
    /// sources are counted as probes.
    pub fn mark_granted(&mut self, ports: impl IntoIterator<Item = u16>) {
        for port in ports {
            let flags = self.get(Proto::Tcp, port);
            self.set(Proto::Tcp, port, flags | policy::GRANTED);
        }
    }

    /// The ports of `proto` that carry [`policy::PROTECTED`], as ranges of
    /// consecutive ports, in order: what nftables protects too.
    pub fn protected_ranges(&self, proto: Proto) -> Vec<std::ops::RangeInclusive<u16>> {
        let mut ranges: Vec<std::ops::RangeInclusive<u16>> = Vec::new();
        for port in 0..=u16::MAX {
            if self.get(proto, port) & policy::PROTECTED == 0 {
                continue;
            }
            match ranges.last_mut() {
                Some(last) if port > 0 && *last.end() == port - 1 => {
                    *last = *last.start()..=port;
                }
                _ => ranges.push(port..=port),
            }
        }
        ranges
    }

    /// Sets the flags of one port, replacing what was there.
    pub fn set(&mut self, proto: Proto, port: u16, flags: u8) {
        if let Some(i) = port_policy_index(proto.number(), port) {
            self.0[i as usize] = flags;
        }
    }

    /// How many (protocol, port) entries carry any flag.
    pub fn flagged(&self) -> usize {
        self.0.iter().filter(|f| **f != 0).count()
    }

    /// The flags of one port.
    pub fn get(&self, proto: Proto, port: u16) -> u8 {
        port_policy_index(proto.number(), port).map_or(0, |i| self.0[i as usize])
    }
}

/// Counter values summed over all CPUs, in [`Counter::ALL`] order.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters(pub [u64; Counter::COUNT as usize]);

impl Counters {
    /// The value of one counter.
    pub fn get(&self, counter: Counter) -> u64 {
        self.0[counter as usize]
    }

    /// Every packet the program has seen.
    pub fn total(&self) -> u64 {
        self.0.iter().sum()
    }

    /// (name, value) pairs in slot order.
    pub fn iter(&self) -> impl Iterator<Item = (&'static str, u64)> + '_ {
        Counter::ALL.iter().map(|c| (c.name(), self.get(*c)))
    }
}

impl Serialize for Counters {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_map(self.iter())
    }
}

/// Handles to the XDP program's maps, except the knock ring buffer.
pub struct GuardMaps {
    /// Protected / knock flags per (protocol, port).
    port_policy: Array<MapData, u8>,
    /// Live grants: (source, port, protocol) → expiry.
    allow: HashMap<MapData, AllowKey, AllowValue>,
    /// Knock rate limit.
    settings: Array<MapData, Settings>,
    /// Per-CPU verdict counters.
    counters: PerCpuArray<MapData, u64>,
    /// SYNs from non-granted sources to granted ports, by port.
    probes: HashMap<MapData, u32, u64>,
    /// What the port-policy array holds now, so an update writes only the
    /// entries that change instead of all 131,072.
    policy_mirror: PortPolicy,
}

/// The maps [`GuardMaps`] pins.
const PINNED: [&str; 5] = [
    map_names::PORT_POLICY,
    map_names::ALLOW,
    map_names::SETTINGS,
    map_names::COUNTERS,
    map_names::PROBES,
];

impl GuardMaps {
    /// Takes the maps out of a freshly loaded object and, given `pin_dir`,
    /// pins them there (created if missing; stale pins from an earlier run
    /// are replaced), so `knockd stats` and tests can reach the live maps.
    ///
    /// The policy mirror starts empty because a new object's arrays are zero.
    pub fn take(ebpf: &mut Ebpf, pin_dir: Option<&Path>) -> Result<Self, Error> {
        if let Some(dir) = pin_dir {
            // Only directories on bpffs hold pins: check where the path
            // already exists before creating the rest of it.
            let existing = dir.ancestors().find(|a| a.exists()).unwrap_or(dir);
            if !on_bpffs(existing) {
                return Err(Error::NotBpffs(dir.to_owned()));
            }
            std::fs::create_dir_all(dir).map_err(|source| Error::PinDir {
                path: dir.to_owned(),
                source,
            })?;
        }
        let mut take = |name: &'static str| -> Result<Map, Error> {
            let map = ebpf.take_map(name).ok_or(Error::Missing(name))?;
            let Some(dir) = pin_dir else { return Ok(map) };
            let path = dir.join(name);
            match std::fs::remove_file(&path) {
                Ok(()) => tracing::info!(path = %path.display(), "replaced a stale pin"),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => return Err(Error::PinDir { path, source }),
            }
            // Pin the untyped map: aya's typed maps consume themselves to pin.
            map.pin(&path)
                .map_err(|source| Error::Pin { name, path, source })?;
            Ok(map)
        };
        Self::from_maps(
            take(map_names::PORT_POLICY)?,
            take(map_names::ALLOW)?,
            take(map_names::SETTINGS)?,
            take(map_names::COUNTERS)?,
            take(map_names::PROBES)?,
            PortPolicy::empty(),
        )
    }

    /// Opens the maps a running daemon pinned under `dir`, for `knockd stats`
    /// and for tests that act on the kernel state directly.
    pub fn open_pinned(dir: &Path) -> Result<Self, Error> {
        let open = |name: &'static str| {
            let data = MapData::from_pin(dir.join(name)).map_err(map_err(name))?;
            Map::from_map_data(data).map_err(map_err(name))
        };
        let port_policy = open(map_names::PORT_POLICY)?;
        let mut maps = Self::from_maps(
            port_policy,
            open(map_names::ALLOW)?,
            open(map_names::SETTINGS)?,
            open(map_names::COUNTERS)?,
            open(map_names::PROBES)?,
            PortPolicy::empty(),
        )?;
        // Read back what the kernel holds so later updates diff against it.
        for (i, slot) in maps.policy_mirror.0.iter_mut().enumerate() {
            *slot = maps
                .port_policy
                .get(&(i as u32), 0)
                .map_err(map_err(map_names::PORT_POLICY))?;
        }
        Ok(maps)
    }

    fn from_maps(
        port_policy: Map,
        allow: Map,
        settings: Map,
        counters: Map,
        probes: Map,
        policy_mirror: PortPolicy,
    ) -> Result<Self, Error> {
        Ok(GuardMaps {
            port_policy: port_policy
                .try_into()
                .map_err(map_err(map_names::PORT_POLICY))?,
            allow: allow.try_into().map_err(map_err(map_names::ALLOW))?,
            settings: settings.try_into().map_err(map_err(map_names::SETTINGS))?,
            counters: counters.try_into().map_err(map_err(map_names::COUNTERS))?,
            probes: probes.try_into().map_err(map_err(map_names::PROBES))?,
            policy_mirror,
        })
    }

    /// Removes the pins [`take`](Self::take) made, and `dir` if that leaves it
    /// empty. Missing pins are not an error: this is cleanup.
    pub fn unpin(dir: &Path) {
        for name in PINNED {
            let _ = std::fs::remove_file(dir.join(name));
        }
        let _ = std::fs::remove_dir(dir);
    }

    /// Makes the kernel's port-policy array equal `desired`, writing only the
    /// entries that differ. Returns how many were written.
    ///
    /// Runs every tick, and nearly all of the 131,072 entries are equal:
    /// whole chunks are compared first (a memcmp) and only differing ones
    /// walked entry by entry. One port's change is [`add_port_flags`].
    ///
    /// [`add_port_flags`]: Self::add_port_flags
    pub fn apply_port_policy(&mut self, desired: &PortPolicy) -> Result<usize, Error> {
        const CHUNK: usize = 256;
        let mut written = 0;
        for (c, (want, have)) in desired
            .0
            .chunks(CHUNK)
            .zip(self.policy_mirror.0.chunks_mut(CHUNK))
            .enumerate()
        {
            if want == have {
                continue;
            }
            for (j, (&want, have)) in want.iter().zip(have.iter_mut()).enumerate() {
                if want != *have {
                    self.port_policy
                        .set((c * CHUNK + j) as u32, want, 0)
                        .map_err(map_err(map_names::PORT_POLICY))?;
                    *have = want;
                    written += 1;
                }
            }
        }
        Ok(written)
    }

    /// The port policy the kernel holds (as last written, or as read back
    /// by [`open_pinned`](Self::open_pinned)).
    pub fn policy(&self) -> &PortPolicy {
        &self.policy_mirror
    }

    /// Adds `flags` to one port's policy, writing that entry alone (an
    /// accepted knock marks its grant's port; a whole-table diff per knock
    /// would copy and compare 128 KiB).
    pub fn add_port_flags(&mut self, proto: Proto, port: u16, flags: u8) -> Result<(), Error> {
        let Some(index) = port_policy_index(proto.number(), port) else {
            return Ok(());
        };
        let have = self.policy_mirror.get(proto, port);
        if have | flags != have {
            self.port_policy
                .set(index, have | flags, 0)
                .map_err(map_err(map_names::PORT_POLICY))?;
            self.policy_mirror.set(proto, port, have | flags);
        }
        Ok(())
    }

    /// Sets the per-source knock rate limit.
    pub fn set_knock_rate(&mut self, rate_per_sec: u32, burst: u32) -> Result<(), Error> {
        let settings = Settings {
            knock_rate_per_sec: rate_per_sec,
            knock_burst: burst,
        };
        self.settings
            .set(0, settings, 0)
            .map_err(map_err(map_names::SETTINGS))
    }

    /// Lets new connections from `addr` to `port` through, for `ttl` (or
    /// until revoked when `None`). The kernel itself stops admitting new
    /// connections once `ttl` has passed.
    pub fn allow(
        &mut self,
        addr: IpAddr,
        proto: Proto,
        port: u16,
        ttl: Option<Duration>,
    ) -> Result<(), Error> {
        let expires_ns = ttl.map_or(0, |ttl| {
            monotonic_ns().saturating_add(ttl.as_nanos().min(u64::MAX as u128) as u64)
        });
        self.allow
            .insert(allow_key(addr, proto, port), AllowValue { expires_ns }, 0)
            .map_err(map_err(map_names::ALLOW))
    }

    /// Removes a grant. Removing one that is not there is not an error.
    pub fn revoke(&mut self, addr: IpAddr, proto: Proto, port: u16) -> Result<(), Error> {
        match self.allow.remove(&allow_key(addr, proto, port)) {
            Ok(()) | Err(MapError::KeyNotFound) => Ok(()),
            Err(source) => Err(Error::Map {
                name: map_names::ALLOW,
                source,
            }),
        }
    }

    /// Takes the probe counts: (granted port, SYNs from other sources since
    /// the last call). The map is emptied as it is read.
    pub fn drain_probes(&mut self) -> Result<Vec<(u16, u64)>, Error> {
        let ports: Vec<u32> = self
            .probes
            .keys()
            .collect::<Result<_, _>>()
            .map_err(map_err(map_names::PROBES))?;
        let mut out = Vec::with_capacity(ports.len());
        for port in ports {
            // A key can vanish (LRU eviction) between listing and reading.
            if let Ok(count) = self.probes.get(&port, 0) {
                out.push((port as u16, count));
            }
            let _ = self.probes.remove(&port);
        }
        Ok(out)
    }

    /// The counters, summed over CPUs.
    pub fn counters(&self) -> Result<Counters, Error> {
        let mut out = Counters::default();
        for counter in Counter::ALL {
            let per_cpu = self
                .counters
                .get(&(counter as u32), 0)
                .map_err(map_err(map_names::COUNTERS))?;
            out.0[counter as usize] = per_cpu.iter().sum();
        }
        Ok(out)
    }
}

fn allow_key(addr: IpAddr, proto: Proto, port: u16) -> AllowKey {
    AllowKey {
        addr: addr_to_key(addr),
        port,
        proto: proto.number(),
        _pad: [0],
    }
}

/// Takes the knock ring buffer out of a freshly loaded object. It can be
/// taken once; the event reader owns it from then on.
pub fn take_knock_events(ebpf: &mut Ebpf) -> Result<RingBuf<MapData>, Error> {
    ebpf.take_map(map_names::KNOCK_EVENTS)
        .ok_or(Error::Missing(map_names::KNOCK_EVENTS))?
        .try_into()
        .map_err(map_err(map_names::KNOCK_EVENTS))
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::*;

    #[test]
    fn addresses_round_trip_through_keys() {
        let v4 = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 2));
        let key = addr_to_key(v4);
        assert_eq!(&key[..12], &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff]);
        assert_eq!(&key[12..], &[198, 18, 0, 2]);
        assert_eq!(addr_from_key(key), v4);
        let v6: IpAddr = "2001:db8::2".parse().unwrap();
        assert_eq!(addr_from_key(addr_to_key(v6)), v6);
    }

    #[test]
    fn monotonic_clock_moves_forward() {
        let a = monotonic_ns();
        let b = monotonic_ns();
        assert!(a > 0 && b >= a);
    }
}
