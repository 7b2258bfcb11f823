//! Types shared between the knockd XDP program and the daemon.
//!
//! Every type here crosses the kernel/userspace boundary through a BPF map or
//! the knock ring buffer, so each one is `#[repr(C)]`, `Copy`, free of `bool`
//! and of implicit padding (padding bytes are explicit `_pad` fields, always
//! zero), and documents the byte order of its address and port fields.
#![no_std]

/// IP protocol number of TCP.
pub const IPPROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const IPPROTO_UDP: u8 = 17;

/// Number of entries in [`PORT_POLICY`](PortPolicy): one per (protocol slot,
/// port) pair, where slot 0 is TCP and slot 1 is UDP.
pub const PORT_POLICY_ENTRIES: u32 = 2 * 65536;

/// Index of `(proto, port)` in the port-policy array, or `None` for protocols
/// that have no policy (anything but TCP and UDP).
///
/// An array indexed by port, rather than a range check, lets the daemon load
/// any set of ports, for example only the one-time knock ports that are valid
/// in the current time step, and change it one entry at a time.
#[inline(always)]
pub const fn port_policy_index(proto: u8, port: u16) -> Option<u32> {
    let slot = match proto {
        IPPROTO_TCP => 0,
        IPPROTO_UDP => 1,
        _ => return None,
    };
    Some((slot << 16) | port as u32)
}

/// Bit flags stored per (protocol, port) in the port-policy array.
pub mod policy {
    /// New connections and datagrams to this port are dropped unless the
    /// source holds a grant for it in the allow map.
    pub const PROTECTED: u8 = 1 << 0;
    /// Packets to this port are knocks: they go to userspace, then are
    /// dropped. For TCP only a bare SYN counts as a knock.
    pub const KNOCK: u8 = 1 << 1;
    /// A grant currently uses this (protected) port: SYNs to it from other
    /// sources are probes, counted so the daemon can move the grant away.
    pub const GRANTED: u8 = 1 << 2;
    /// A one-time knock port: only datagrams shaped like a one-time knock
    /// ([`super::knock_wire`]) go to userspace; the rest are dropped in the
    /// kernel, so garbage never costs a ring-buffer slot, a rate-limit token
    /// or the daemon's time.
    pub const SHAPED: u8 = 1 << 3;
    /// The allow map may admit someone to this port (a one-time door's
    /// grant range, a static door's service port). Other protected ports
    /// drop without the lookup: it was a sixth of what the guard costs per
    /// dropped packet (`cargo xtask bench drop`).
    pub const ALLOWS: u8 = 1 << 4;
    /// A closed port of a dark host (`closed_ports: drop`): set together
    /// with [`PROTECTED`] on every TCP port nothing else claims, so a bare
    /// SYN to it is dropped, and counted apart from drops on ports the
    /// configuration protects by name.
    pub const CLOSED: u8 = 1 << 5;
    /// A port of a one-time door's knock range that no sequence uses now.
    /// A datagram shaped like a knock to one is still dropped, but counted
    /// ([`super::Counter::KnockUnmatched`]): that is what a device with a
    /// wrong key, a clock off by more than the window, or a profile with
    /// other door settings sends, and the daemon never sees it.
    pub const KNOCK_RANGE: u8 = 1 << 6;
}

/// The shape of a one-time knock on the wire (`docs/PROTOCOL.md` §6), as
/// far as the kernel checks it; `knockd::proto` builds and parses knocks
/// from these same numbers.
pub mod knock_wire {
    /// UDP payload length of a knock.
    pub const LEN: usize = 68;
    /// Protocol version, the first byte.
    pub const VERSION: u8 = 1;
    /// Message kinds, the second byte: 1 (open) to this (heartbeat).
    pub const KIND_MAX: u8 = 3;
    /// Most knocks in a sequence; bytes 3 and 4 are index < count <= this.
    pub const MAX_KNOCKS: u8 = 16;
}

/// Key of the allow map: one source address allowed to one destination port.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AllowKey {
    /// Source address in network byte order. IPv4 sources are stored as
    /// IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`) so one map serves both.
    pub addr: [u8; 16],
    /// Destination port, host byte order.
    pub port: u16,
    /// IP protocol number ([`IPPROTO_TCP`] or [`IPPROTO_UDP`]).
    pub proto: u8,
    /// Always zero; fills the struct to its 2-byte alignment so no byte of
    /// the hashed key is undefined.
    pub _pad: [u8; 1],
}

/// Value of the allow map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AllowValue {
    /// `CLOCK_MONOTONIC` nanoseconds (the clock of `bpf_ktime_get_ns`) after
    /// which the entry no longer admits new connections, or 0 for none. The
    /// kernel enforces it itself, so a grant closes on time even when the
    /// daemon is not running to remove it.
    pub expires_ns: u64,
}

/// Settings the daemon writes into the single-entry settings array.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// Knock events a single source may emit per second, on average.
    /// 0 disables knock forwarding entirely (knocks are dropped and counted).
    pub knock_rate_per_sec: u32,
    /// How many knock events a source may emit in a burst.
    pub knock_burst: u32,
}

/// Per-source token bucket, the value of the rate-limit LRU map (keyed by 16
/// bytes in network byte order: an IPv4 source, IPv4-mapped, or an IPv6
/// source's /64, its last 8 bytes zero).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TokenBucket {
    /// Tokens, scaled by [`TOKEN_SCALE`], so that refill needs no division.
    pub tokens: u64,
    /// `bpf_ktime_get_ns` of the last refill.
    pub last_ns: u64,
}

/// One token in [`TokenBucket::tokens`] units (nanoseconds per second, so that
/// `elapsed_ns * rate_per_sec` is the refill in the same units).
pub const TOKEN_SCALE: u64 = 1_000_000_000;

/// How many payload bytes a [`KnockEvent`] carries at most.
pub const KNOCK_PAYLOAD_MAX: usize = 128;

/// A knock as the XDP program saw it, sent to the daemon over the ring buffer.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct KnockEvent {
    /// `bpf_ktime_get_ns` (`CLOCK_MONOTONIC`) when the packet was seen.
    pub ts_ns: u64,
    /// Source address, network byte order, IPv4-mapped for IPv4.
    pub saddr: [u8; 16],
    /// Destination (knocked) address, network byte order, IPv4-mapped for
    /// IPv4. The sealed reply is sent from it so it crosses NAT.
    pub daddr: [u8; 16],
    /// Source port, host byte order.
    pub sport: u16,
    /// Destination (knock) port, host byte order.
    pub dport: u16,
    /// Interface index the packet arrived on.
    pub ifindex: u32,
    /// IP protocol number ([`IPPROTO_UDP`], or [`IPPROTO_TCP`] for SYN knocks).
    pub proto: u8,
    /// 4 or 6: the IP version of the packet.
    pub family: u8,
    /// TCP flags byte for TCP knocks, 0 for UDP.
    pub tcp_flags: u8,
    /// Always zero.
    pub _pad: u8,
    /// Length of the L4 payload as the headers state it, which may exceed
    /// what was captured.
    pub payload_len: u16,
    /// How many bytes of `payload` are valid (at most [`KNOCK_PAYLOAD_MAX`]).
    pub captured_len: u16,
    /// The first payload bytes.
    pub payload: [u8; KNOCK_PAYLOAD_MAX],
}

/// Per-CPU counters, one slot each in the counters array. Each is a verdict
/// reason, and every packet the program sees increments exactly one, so their
/// sum is the number of packets seen. `Pass*` reasons return `XDP_PASS`; all
/// others return `XDP_DROP`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Not IPv4 or IPv6 (ARP, LLDP, …): passed untouched.
    PassNotIp = 0,
    /// IP but not TCP or UDP (ICMP, ESP, …): passed untouched.
    PassOtherProto,
    /// TCP or UDP to a port with no policy: passed untouched.
    PassUnprotected,
    /// TCP without a bare SYN to a protected port: passed so conntrack can
    /// keep established flows alive across rotations and expiry.
    PassNotSyn,
    /// A non-first IP fragment: it carries no ports, and without its first
    /// fragment (which is checked) the datagram can never be reassembled.
    PassFragment,
    /// To a protected port from a source holding a live grant for it.
    PassGranted,
    /// To a protected port without a grant: dropped silently.
    DropProtected,
    /// Headers that could not be parsed where ports must be known (truncated,
    /// bad lengths, too many IPv6 extension headers): dropped, failing closed.
    DropMalformed,
    /// A knock forwarded to userspace on the ring buffer, then dropped.
    KnockForwarded,
    /// A knock over the source's rate limit: dropped without an event.
    KnockRateLimited,
    /// A knock whose ring-buffer reservation failed (userspace is behind):
    /// dropped without an event.
    KnockEventLost,
    /// A datagram to a one-time knock port that cannot be a knock (length,
    /// version, kind, index or count): dropped without an event.
    KnockMalformed,
    /// A bare SYN to a closed port of a dark host (`closed_ports: drop`):
    /// dropped silently.
    DropClosed,
    /// A datagram shaped like a one-time knock to a port of a knock range
    /// that no sequence uses now (wrong key, clock or door settings; or a
    /// forgery): dropped without an event, and counted.
    KnockUnmatched,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 14] = [
        Counter::PassNotIp,
        Counter::PassOtherProto,
        Counter::PassUnprotected,
        Counter::PassNotSyn,
        Counter::PassFragment,
        Counter::PassGranted,
        Counter::DropProtected,
        Counter::DropMalformed,
        Counter::KnockForwarded,
        Counter::KnockRateLimited,
        Counter::KnockEventLost,
        Counter::KnockMalformed,
        Counter::DropClosed,
        Counter::KnockUnmatched,
    ];

    /// Number of counter slots.
    pub const COUNT: u32 = Self::ALL.len() as u32;

    /// Whether packets counted here are passed to the network stack.
    pub const fn passes(self) -> bool {
        matches!(
            self,
            Counter::PassNotIp
                | Counter::PassOtherProto
                | Counter::PassUnprotected
                | Counter::PassNotSyn
                | Counter::PassFragment
                | Counter::PassGranted
        )
    }

    /// Stable snake_case name, used in logs, status output and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::PassNotIp => "pass_not_ip",
            Counter::PassOtherProto => "pass_other_proto",
            Counter::PassUnprotected => "pass_unprotected",
            Counter::PassNotSyn => "pass_not_syn",
            Counter::PassFragment => "pass_fragment",
            Counter::PassGranted => "pass_granted",
            Counter::DropProtected => "drop_protected",
            Counter::DropMalformed => "drop_malformed",
            Counter::KnockForwarded => "knock_forwarded",
            Counter::KnockRateLimited => "knock_rate_limited",
            Counter::KnockEventLost => "knock_event_lost",
            Counter::KnockMalformed => "knock_malformed",
            Counter::DropClosed => "drop_closed",
            Counter::KnockUnmatched => "knock_unmatched",
        }
    }
}

/// Names of the maps in the eBPF object, shared so that the two sides cannot
/// drift apart.
pub mod map_names {
    /// `Array<u8>` of [`super::policy`] flags, [`super::PORT_POLICY_ENTRIES`] long.
    pub const PORT_POLICY: &str = "PORT_POLICY";
    /// `HashMap<AllowKey, AllowValue>`.
    pub const ALLOW: &str = "ALLOW";
    /// `Array<Settings>` with one entry.
    pub const SETTINGS: &str = "SETTINGS";
    /// `LruHashMap<[u8; 16], TokenBucket>`, keyed by IPv4 source or IPv6 /64.
    pub const KNOCK_RATE: &str = "KNOCK_RATE";
    /// `PerCpuArray<u64>`, indexed by [`super::Counter`].
    pub const COUNTERS: &str = "COUNTERS";
    /// `RingBuf` of [`super::KnockEvent`].
    pub const KNOCK_EVENTS: &str = "KNOCK_EVENTS";
    /// `LruHashMap<u32, u64>`: granted TCP port (host order) → SYNs to it
    /// from sources without a grant, since the daemon last drained it.
    pub const PROBES: &str = "PROBES";
}

/// Name of the XDP program in the eBPF object.
pub const XDP_PROGRAM: &str = "knockd";

/// Capacity of the allow map: the most grants that can be live at once.
pub const ALLOW_MAX_ENTRIES: u32 = 262_144;
/// Capacity of the per-source rate-limit LRU map. When full, the least
/// recently seen source is evicted, so its bucket restarts full: a flood from
/// many spoofed sources costs at most this many entries.
pub const KNOCK_RATE_MAX_ENTRIES: u32 = 65_536;
/// Capacity of the probe-count LRU map: ports under attack at once.
pub const PROBES_MAX_ENTRIES: u32 = 4096;
/// Size of the knock ring buffer in bytes (a power of two, page aligned).
pub const KNOCK_EVENTS_BYTES: u32 = 1 << 20;

#[cfg(feature = "user")]
mod pod {
    use super::{AllowKey, AllowValue, KnockEvent, Settings, TokenBucket};
    // SAFETY: all of these are #[repr(C)], Copy, and have no implicit padding
    // (checked by the size assertions below), so any byte pattern is valid.
    unsafe impl aya::Pod for AllowKey {}
    unsafe impl aya::Pod for AllowValue {}
    unsafe impl aya::Pod for Settings {}
    unsafe impl aya::Pod for TokenBucket {}
    unsafe impl aya::Pod for KnockEvent {}
}

// Layout checks: a change here changes the kernel ABI and must be deliberate.
const _: () = assert!(core::mem::size_of::<AllowKey>() == 20);
const _: () = assert!(core::mem::size_of::<AllowValue>() == 8);
const _: () = assert!(core::mem::size_of::<Settings>() == 8);
const _: () = assert!(core::mem::size_of::<TokenBucket>() == 16);
const _: () = assert!(core::mem::size_of::<KnockEvent>() == 56 + KNOCK_PAYLOAD_MAX);
