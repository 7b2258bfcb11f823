//! knockd's XDP guard.
//!
//! For every frame on an attached interface it decides, in this order:
//! 1. not IP, or IP but neither TCP nor UDP: pass untouched;
//! 2. a port with no policy: pass untouched (the host's own firewall rules);
//! 3. TCP that is not a bare SYN: pass, so conntrack keeps established flows
//!    alive across port rotations and grant expiry (knockd's nftables table
//!    drops whatever of these is not part of a known flow, so probes with
//!    other flags still get no answer);
//! 4. a knock port: drop what cannot be a knock (on one-time knock ports:
//!    the length, version, kind, index and count), rate-limit per source,
//!    send the knock to userspace over the ring buffer, drop;
//! 5. a protected port: pass if the port may be granted (`policy::ALLOWS`)
//!    and the exact (source, port, protocol) holds a live grant in the
//!    allow map, else drop silently (no RST, no ICMP). On a dark host
//!    (`closed_ports: drop`) every TCP port nothing else claims is
//!    protected too (`policy::CLOSED`), so a bare SYN to it drops here.
//!
//! # Which header shapes are walked, dropped and passed
//!
//! The reference is what the kernel's receive path would deliver to a local
//! socket. Whatever could still reach a protected port and is not fully
//! understood here is dropped (fail closed); the network stack would drop a
//! truncated packet anyway, so nothing legitimate is lost.
//!
//! - **Ethernet**: up to [`MAX_VLAN_TAGS`] 802.1Q or 802.1ad tags, any VID,
//!   in any order, are walked and the inner packet judged (the stack strips
//!   priority tags, and delivers other VIDs through VLAN devices). A deeper
//!   stack is dropped. Other ethertypes (ARP, LLDP, 802.3 length frames,
//!   MPLS, PPPoE) pass: the stack delivers none of them to a TCP or UDP
//!   socket without a tunnel device, which is outside the guard's scope.
//! - **IPv4**: the header length comes from IHL (options skipped); IHL < 5
//!   or a version other than 4 is dropped. A non-first fragment passes: it
//!   carries no ports, and the kernel reassembles it only with its first
//!   fragment, which is judged like an unfragmented packet. A first fragment
//!   too short to hold the ports and TCP flags is dropped. Overlapping
//!   fragments that would rewrite the judged bytes are discarded by the
//!   kernel's reassembly (RFC 5722 for IPv6, and IPv4 since Linux 4.19),
//!   and nftables sees the reassembled packet in any case.
//! - **IPv6**: up to [`MAX_IPV6_EXT_HEADERS`] hop-by-hop, routing,
//!   destination-options, fragment and AH headers are walked. A longer chain
//!   is dropped. A non-first fragment passes, as for IPv4. Other next
//!   headers (ICMPv6, ESP, no-next-header, mobility) pass: the stack
//!   delivers no TCP or UDP from them without IPsec or a tunnel configured.
//! - **TCP and UDP**: judged only by bytes inside the IP packet as its
//!   length field states it (bytes past it are padding, or a lie, and the
//!   stack trims them). A header that ends before the destination port
//!   (and, for TCP to a port with policy, the flags) is dropped: for a first
//!   fragment that is RFC 1858's tiny-fragment attack, where the flags would
//!   come from a later, unjudged fragment. An IPv6 payload length of 0
//!   (jumbogram) bounds nothing, so TCP and UDP in one are dropped.
//!
//! # The verifier's budget
//!
//! Each kernel's verifier walks every path through the program and gives up
//! at 1,000,000 processed instructions; Linux 6.1 (Debian 12) prunes far
//! less than current kernels. The program keeps a 4x margin on every kernel
//! the suite boots (`tests/tests/kernel.rs`, run in a VM by `cargo xtask
//! test`; `knockd verify` prints the count on any host) by two choices:
//! - the transport half is a global function ([`knockd_transport`]),
//!   verified once rather than once per parse path (per VLAN depth and
//!   IPv6 extension chain);
//! - the knock payload is copied by one helper call with a bounded length,
//!   not a loop of power-of-two chunks (2^8 paths on every knock path).
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::{xdp_action, xdp_md},
    helpers::{bpf_ktime_get_ns, generated::bpf_xdp_load_bytes},
    macros::{map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::XdpContext,
};
use aya_log_ebpf::debug;
use knockd_common::{
    ALLOW_MAX_ENTRIES, AllowKey, AllowValue, Counter, IPPROTO_TCP, IPPROTO_UDP, KNOCK_EVENTS_BYTES,
    KNOCK_PAYLOAD_MAX, KNOCK_RATE_MAX_ENTRIES, KnockEvent, PORT_POLICY_ENTRIES, PROBES_MAX_ENTRIES,
    Settings, TOKEN_SCALE, TokenBucket, knock_wire, policy, port_policy_index,
};

#[map]
static PORT_POLICY: Array<u8> = Array::with_max_entries(PORT_POLICY_ENTRIES, 0);
#[map]
static ALLOW: HashMap<AllowKey, AllowValue> = HashMap::with_max_entries(ALLOW_MAX_ENTRIES, 0);
#[map]
static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);
#[map]
static KNOCK_RATE: LruHashMap<[u8; 16], TokenBucket> =
    LruHashMap::with_max_entries(KNOCK_RATE_MAX_ENTRIES, 0);
#[map]
static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(Counter::COUNT, 0);
#[map]
static KNOCK_EVENTS: RingBuf = RingBuf::with_byte_size(KNOCK_EVENTS_BYTES, 0);
#[map]
static PROBES: LruHashMap<u32, u64> = LruHashMap::with_max_entries(PROBES_MAX_ENTRIES, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// VLAN tags (802.1Q or 802.1ad, any VID, in any order) we look through.
/// Linux strips any number of priority tags (VID 0) and delivers what is
/// inside, so a stack deeper than this is dropped rather than passed as
/// "not IP": otherwise three tags would carry a SYN past the guard. Real
/// traffic carries one or two; eight leaves room for odd provider stacks.
const MAX_VLAN_TAGS: usize = 8;

const IPV6_HLEN: usize = 40;
const NEXTHDR_HOP: u8 = 0;
const NEXTHDR_ROUTING: u8 = 43;
const NEXTHDR_FRAGMENT: u8 = 44;
const NEXTHDR_AUTH: u8 = 51;
const NEXTHDR_DEST: u8 = 60;
/// IPv6 extension headers we skip before giving up (and dropping). Real
/// traffic carries one or two; the bound keeps the verifier's work finite.
const MAX_IPV6_EXT_HEADERS: usize = 6;

const TCP_FLAG_SYN: u8 = 0x02;
const TCP_FLAG_ACK: u8 = 0x10;
const UDP_HLEN: u16 = 8;

/// A refill gap longer than this is treated as this long: the bucket is full
/// by then for any sane rate, and it keeps `elapsed * rate` far from overflow.
const MAX_REFILL_NS: u64 = 10_000_000_000;

/// A header could not be read: the packet is shorter than its headers claim,
/// or a field is out of range.
struct Malformed;

#[xdp]
pub fn knockd(ctx: XdpContext) -> u32 {
    match try_knockd(&ctx) {
        Ok(IpVerdict::Transport(ip)) => {
            let (offsets, info) = ip.pack();
            knockd_transport(ctx.ctx, offsets, info)
        }
        Ok(IpVerdict::Done(reason)) => verdict(&ctx, Ok(reason)),
        Err(malformed) => verdict(&ctx, Err(malformed)),
    }
}

/// Counts the frame under its reason, once, and turns the reason into the
/// XDP action.
#[inline(always)]
fn verdict(ctx: &XdpContext, reason: Result<Counter, Malformed>) -> u32 {
    let reason = reason.unwrap_or_else(|Malformed| {
        debug!(ctx, "malformed packet dropped");
        Counter::DropMalformed
    });
    count(reason);
    if reason.passes() {
        xdp_action::XDP_PASS
    } else {
        xdp_action::XDP_DROP
    }
}

/// The transport layer's verdict (ports, grants, knocks), as a *global*
/// BPF function: the kernel verifies it once, on its own, for any
/// arguments, instead of once for every path that reaches it. The parse
/// before it has dozens of paths (0 to 8 VLAN tags, each with its own
/// constant header offset, times IPv4 and every IPv6 extension chain), and
/// walking this half again on each of them is what made Linux 6.1's
/// verifier give up at a million instructions. The price is that nothing
/// the parse proved carries over: [`Ip::unpack`] checks every offset again.
///
/// `#[no_mangle]` keeps it global through bpf-linker (which internalises
/// what it does not export), and the BTF it emits then says so.
#[unsafe(no_mangle)]
#[inline(never)]
pub extern "C" fn knockd_transport(ctx: *mut xdp_md, offsets: u64, info: u64) -> u32 {
    let ctx = XdpContext::new(ctx);
    let reason = Ip::unpack(&ctx, offsets, info).and_then(|ip| transport(&ctx, &ip));
    verdict(&ctx, reason)
}

#[inline(always)]
fn count(counter: Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter as u32) {
        // SAFETY: per-CPU slot, and XDP programs do not preempt each other
        // on one CPU, so nothing else writes it concurrently.
        unsafe { *slot += 1 };
    }
}

/// The one place that reads packet bytes: returns a pointer to a `T` at
/// `offset`, or `Malformed` if the packet does not hold all of it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Result<*const T, Malformed> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + offset + core::mem::size_of::<T>() > end {
        return Err(Malformed);
    }
    Ok((start + offset) as *const T)
}

/// The two bytes at `offset`.
///
/// There is deliberately no single-byte reader: LLVM folds a one-byte bounds
/// check (`p + 1 > end`) into `p >= end`, which the verifier cannot use for a
/// pointer with a variable offset. Every byte we need sits inside a header
/// longer than two bytes, so reading the pair that holds it is always valid.
#[inline(always)]
fn bytes2_at(ctx: &XdpContext, offset: usize) -> Result<[u8; 2], Malformed> {
    // SAFETY: ptr_at checked both bytes are inside the packet; packet data
    // has no alignment guarantee, hence the unaligned read.
    Ok(unsafe { ptr_at::<[u8; 2]>(ctx, offset)?.read_unaligned() })
}

/// A big-endian (network order) `u16` at `offset`, in host order.
#[inline(always)]
fn be16_at(ctx: &XdpContext, offset: usize) -> Result<u16, Malformed> {
    Ok(u16::from_be_bytes(bytes2_at(ctx, offset)?))
}

#[inline(always)]
fn addr16_at(ctx: &XdpContext, offset: usize) -> Result<[u8; 16], Malformed> {
    // SAFETY: ptr_at checked all 16 bytes are inside the packet.
    Ok(unsafe { ptr_at::<[u8; 16]>(ctx, offset)?.read_unaligned() })
}

/// An IPv4 address at `offset`, as an IPv4-mapped IPv6 address.
#[inline(always)]
fn addr4_mapped_at(ctx: &XdpContext, offset: usize) -> Result<[u8; 16], Malformed> {
    // SAFETY: ptr_at checked all 4 bytes are inside the packet.
    let v4 = unsafe { ptr_at::<[u8; 4]>(ctx, offset)?.read_unaligned() };
    Ok([
        0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, v4[0], v4[1], v4[2], v4[3],
    ])
}

/// What the IP layer tells the transport layer.
struct Ip {
    saddr: [u8; 16],
    daddr: [u8; 16],
    /// 4 or 6.
    family: u8,
    proto: u8,
    /// Offset of the IP header.
    l3_offset: usize,
    /// Offset of the TCP or UDP header.
    l4_offset: usize,
    /// Offset just past the IP packet, as its header states it. Bytes past
    /// it (Ethernet padding, or a lie) are not the packet's: the stack trims
    /// them, so the guard must not judge by them.
    end: usize,
    /// This is the first fragment of a fragmented datagram.
    first_fragment: bool,
}

/// A mask that bounds the header offsets [`Ip::unpack`] receives, so that
/// packet-pointer arithmetic on them stays inside what the verifier allows
/// for arguments it knows nothing about (it wants the largest offset plus
/// the access under 64 KiB). It changes no offset the parse produces: eight
/// VLAN tags and six IPv6 extension headers of the largest size (2 KiB
/// each) end before 12.5 KiB. A mask and not a comparison, because LLVM
/// folds `a > M || b > M` into `(a | b) > M`, from which the verifier
/// learns no bound.
const OFFSET_MASK: u64 = 0x7fff;

impl Ip {
    /// The IP layer's findings as two scalars, the only kind of argument a
    /// global BPF function may take besides its context: the header offset,
    /// the transport offset and the end in `offsets`; the protocol, the
    /// family and the first-fragment flag in `info`. The addresses are read
    /// again from the packet.
    #[inline(always)]
    fn pack(&self) -> (u64, u64) {
        let offsets =
            self.l3_offset as u64 | (self.l4_offset as u64) << 16 | (self.end as u64) << 32;
        let info =
            self.proto as u64 | (self.family as u64) << 8 | (self.first_fragment as u64) << 16;
        (offsets, info)
    }

    /// The reverse of [`Ip::pack`], checking everything again: the
    /// verifier knows nothing of a global function's arguments.
    #[inline(always)]
    fn unpack(ctx: &XdpContext, offsets: u64, info: u64) -> Result<Ip, Malformed> {
        let l3_offset = (offsets & OFFSET_MASK) as usize;
        let l4_offset = ((offsets >> 16) & OFFSET_MASK) as usize;
        // Only ever compared with other offsets, never added to a pointer.
        let end = (offsets >> 32) as usize;
        let proto = (info & 0xff) as u8;
        let family = ((info >> 8) & 0xff) as u8;
        let (saddr, daddr) = match family {
            4 => (
                addr4_mapped_at(ctx, l3_offset + 12)?,
                addr4_mapped_at(ctx, l3_offset + 16)?,
            ),
            6 => (
                addr16_at(ctx, l3_offset + 8)?,
                addr16_at(ctx, l3_offset + 24)?,
            ),
            _ => return Err(Malformed),
        };
        Ok(Ip {
            saddr,
            daddr,
            family,
            proto,
            l3_offset,
            l4_offset,
            end,
            first_fragment: (info >> 16) & 1 != 0,
        })
    }
}

/// The TPIDs the stack treats as VLAN tags (`eth_type_vlan` in the kernel).
#[inline(always)]
fn is_vlan(ethertype: u16) -> bool {
    ethertype == ETH_P_8021Q || ethertype == ETH_P_8021AD
}

/// Walks the link and IP layers: either a verdict, or where the TCP or UDP
/// header is for [`knockd_transport`] to judge.
fn try_knockd(ctx: &XdpContext) -> Result<IpVerdict, Malformed> {
    let mut ethertype = be16_at(ctx, ETH_HLEN - 2)?;
    let mut offset = ETH_HLEN;
    for _ in 0..MAX_VLAN_TAGS {
        if !is_vlan(ethertype) {
            break;
        }
        // A tag is 2 bytes of TCI, then the inner ethertype.
        ethertype = be16_at(ctx, offset + 2)?;
        offset += 4;
    }
    // Still a tag after the walk: the stack would peel it and may find a
    // SYN to a protected port inside. We cannot tell, so fail closed.
    if is_vlan(ethertype) {
        return Err(Malformed);
    }
    match ethertype {
        ETH_P_IP => ipv4(ctx, offset),
        ETH_P_IPV6 => ipv6(ctx, offset),
        _ => Ok(IpVerdict::Done(Counter::PassNotIp)),
    }
}

enum IpVerdict {
    /// A TCP or UDP header follows.
    Transport(Ip),
    /// Decided at the IP layer.
    Done(Counter),
}

fn ipv4(ctx: &XdpContext, offset: usize) -> Result<IpVerdict, Malformed> {
    let [version_ihl, _tos] = bytes2_at(ctx, offset)?;
    if version_ihl >> 4 != 4 {
        return Err(Malformed);
    }
    // IHL counts 32-bit words and covers options; the mask bounds it to 60
    // bytes, which the verifier needs to see.
    let header_len = ((version_ihl & 0x0f) as usize) * 4;
    if header_len < 20 {
        return Err(Malformed);
    }
    let total_len = be16_at(ctx, offset + 2)? as usize;
    if total_len < header_len {
        return Err(Malformed);
    }
    let frag = be16_at(ctx, offset + 6)?;
    let more_fragments = frag & 0x2000 != 0;
    let fragment_offset = frag & 0x1fff;
    let [_ttl, proto] = bytes2_at(ctx, offset + 8)?;
    if proto != IPPROTO_TCP && proto != IPPROTO_UDP {
        return Ok(IpVerdict::Done(Counter::PassOtherProto));
    }
    // Check the fragment offset before reading ports: a non-first fragment
    // has no transport header, and its bytes would be read as ports.
    if fragment_offset != 0 {
        return Ok(IpVerdict::Done(Counter::PassFragment));
    }
    Ok(IpVerdict::Transport(Ip {
        saddr: addr4_mapped_at(ctx, offset + 12)?,
        daddr: addr4_mapped_at(ctx, offset + 16)?,
        family: 4,
        proto,
        l3_offset: offset,
        l4_offset: offset + header_len,
        end: offset + total_len,
        first_fragment: more_fragments,
    }))
}

fn ipv6(ctx: &XdpContext, offset: usize) -> Result<IpVerdict, Malformed> {
    if bytes2_at(ctx, offset)?[0] >> 4 != 6 {
        return Err(Malformed);
    }
    let saddr = addr16_at(ctx, offset + 8)?;
    let daddr = addr16_at(ctx, offset + 24)?;
    // 0 means a jumbogram, which no XDP frame here can be: with no length
    // to bound the transport header by, TCP and UDP are dropped below.
    let payload_len = be16_at(ctx, offset + 4)? as usize;
    let end = offset + IPV6_HLEN + payload_len;
    let [mut next, _hop_limit] = bytes2_at(ctx, offset + 6)?;
    let mut cursor = offset + IPV6_HLEN;
    let mut first_fragment = false;
    // One iteration per extension header, plus one to meet the transport
    // header after the last allowed extension header.
    for _ in 0..=MAX_IPV6_EXT_HEADERS {
        // Every extension header starts with (next header, length).
        let [following, len_field] = match next {
            IPPROTO_TCP | IPPROTO_UDP => [0, 0],
            _ => bytes2_at(ctx, cursor)?,
        };
        let header_len = match next {
            IPPROTO_TCP | IPPROTO_UDP => {
                return Ok(IpVerdict::Transport(Ip {
                    saddr,
                    daddr,
                    family: 6,
                    proto: next,
                    l3_offset: offset,
                    l4_offset: cursor,
                    end,
                    first_fragment,
                }));
            }
            // Length in 8-octet units, not counting the first 8.
            NEXTHDR_HOP | NEXTHDR_ROUTING | NEXTHDR_DEST => (len_field as usize + 1) * 8,
            // Length in 4-octet units, not counting the first 2.
            NEXTHDR_AUTH => (len_field as usize + 2) * 4,
            NEXTHDR_FRAGMENT => {
                let offset_flags = be16_at(ctx, cursor + 2)?;
                if offset_flags >> 3 != 0 {
                    return Ok(IpVerdict::Done(Counter::PassFragment));
                }
                first_fragment = offset_flags & 1 != 0;
                8
            }
            // ICMPv6, ESP, no-next-header, …: not ours to judge.
            _ => return Ok(IpVerdict::Done(Counter::PassOtherProto)),
        };
        next = following;
        cursor += header_len;
    }
    // Still inside extension headers: the stack would find the transport
    // header, we did not, so fail closed.
    Err(Malformed)
}

/// Bytes of the TCP header the guard reads: up to and including the flags.
const TCP_FLAGS_END: usize = 14;

fn transport(ctx: &XdpContext, ip: &Ip) -> Result<Counter, Malformed> {
    let l4 = ip.l4_offset;
    // The ports must lie inside the IP packet, not in bytes after it.
    if l4 + 4 > ip.end {
        return Err(Malformed);
    }
    let dport = be16_at(ctx, l4 + 2)?;
    let Some(index) = port_policy_index(ip.proto, dport) else {
        return Ok(Counter::PassOtherProto);
    };
    let flags = PORT_POLICY.get(index).copied().unwrap_or(0);
    if flags == 0 {
        return Ok(Counter::PassUnprotected);
    }
    let mut tcp_flags = 0;
    if ip.proto == IPPROTO_TCP {
        // A first fragment that ends before the flags (RFC 1858's tiny
        // fragment) would get them from the next fragment, which is not
        // judged; and flags read from past the packet's end are not its
        // flags. Either way, fail closed.
        if l4 + TCP_FLAGS_END > ip.end {
            return Err(Malformed);
        }
        // Data offset, then the flags byte.
        [_, tcp_flags] = bytes2_at(ctx, l4 + 12)?;
        // Only a bare SYN opens a connection. Everything else belongs to a
        // flow conntrack already knows (or will reject): established flows
        // must survive rotation and expiry, and SYN-ACKs answer connections
        // this host made from a port that happens to be protected.
        if tcp_flags & TCP_FLAG_SYN == 0 || tcp_flags & TCP_FLAG_ACK != 0 {
            return Ok(Counter::PassNotSyn);
        }
    }
    // A fragmented knock is never legitimate (knocks are tiny); treat it as
    // a packet to a protected port.
    if flags & policy::KNOCK != 0 && !ip.first_fragment {
        return knock(ctx, ip, dport, tcp_flags, flags);
    }
    // Only ports the daemon may grant are looked up: on the others (a
    // one-time door's service port, its knock range) the drop costs no hash.
    if flags & policy::ALLOWS != 0 {
        let key = AllowKey {
            addr: ip.saddr,
            port: dport,
            proto: ip.proto,
            _pad: [0],
        };
        // SAFETY: the value is copied out at once; a concurrent update can
        // at worst give a stale expiry, which the next packet corrects.
        if let Some(grant) = unsafe { ALLOW.get(key) } {
            let expires = grant.expires_ns;
            // SAFETY: bpf_ktime_get_ns has no preconditions.
            if expires == 0 || unsafe { bpf_ktime_get_ns() } < expires {
                return Ok(Counter::PassGranted);
            }
        }
    }
    // A new connection to a port some grant uses, from someone else: a probe.
    if ip.proto == IPPROTO_TCP && flags & policy::GRANTED != 0 {
        count_probe(u32::from(dport));
    }
    if flags & policy::CLOSED != 0 {
        return Ok(Counter::DropClosed);
    }
    if flags & policy::KNOCK_RANGE != 0 && ip.proto == IPPROTO_UDP && unmatched_knock(ctx, ip)? {
        return Ok(Counter::KnockUnmatched);
    }
    Ok(Counter::DropProtected)
}

fn count_probe(port: u32) {
    match PROBES.get_ptr_mut(port) {
        // SAFETY: valid for this run; concurrent CPUs may lose an increment,
        // which only delays a rotation by a probe.
        Some(count) => unsafe { *count += 1 },
        None => {
            let _ = PROBES.insert(port, 1, 0);
        }
    }
}

/// The rate-limit key of a source: its IPv4 address, or its IPv6 /64. One
/// host holds a whole /64, so a bucket per /128 let a single attacker knock
/// from as many "sources" as it liked.
#[inline(always)]
fn rate_key(ip: &Ip) -> [u8; 16] {
    let mut key = ip.saddr;
    if ip.family == 6 {
        key[8..].fill(0);
    }
    key
}

/// Takes one token from the source's bucket; `false` means over the limit.
fn take_token(saddr: &[u8; 16], now: u64) -> bool {
    let Some(settings) = SETTINGS.get(0) else {
        return false;
    };
    let rate = settings.knock_rate_per_sec as u64;
    let burst = settings.knock_burst as u64;
    if rate == 0 || burst == 0 {
        return false;
    }
    let capacity = burst * TOKEN_SCALE;
    match KNOCK_RATE.get_ptr_mut(saddr) {
        Some(bucket) => {
            // SAFETY: the pointer is valid for this program run. Two CPUs may
            // race on one source's bucket; the loser's update is lost, which
            // at worst lets a few extra knocks through. Userspace applies its
            // own limits, so that approximation is deliberate.
            let bucket = unsafe { &mut *bucket };
            let elapsed = now.saturating_sub(bucket.last_ns).min(MAX_REFILL_NS);
            let tokens = (bucket.tokens + elapsed * rate).min(capacity);
            bucket.last_ns = now;
            if tokens >= TOKEN_SCALE {
                bucket.tokens = tokens - TOKEN_SCALE;
                true
            } else {
                bucket.tokens = tokens;
                false
            }
        }
        None => {
            let bucket = TokenBucket {
                tokens: capacity - TOKEN_SCALE,
                last_ns: now,
            };
            // If the insert fails the knock still goes through once; the
            // LRU map evicts rather than fills, so this is not a bypass.
            let _ = KNOCK_RATE.insert(saddr, bucket, 0);
            true
        }
    }
}

/// Whether the UDP payload at `offset`, `len` bytes long, has the shape of
/// a one-time knock. Checked before the rate limit, so garbage spends no
/// token of the source's.
#[inline(always)]
fn knock_shaped(ctx: &XdpContext, offset: usize, len: u16) -> Result<bool, Malformed> {
    if len as usize != knock_wire::LEN {
        return Ok(false);
    }
    let [version, kind] = bytes2_at(ctx, offset)?;
    let [index, count] = bytes2_at(ctx, offset + 2)?;
    Ok(version == knock_wire::VERSION
        && (1..=knock_wire::KIND_MAX).contains(&kind)
        && count <= knock_wire::MAX_KNOCKS
        && index < count)
}

/// Whether a UDP datagram to a knock-range port is shaped like a knock.
#[inline(always)]
fn unmatched_knock(ctx: &XdpContext, ip: &Ip) -> Result<bool, Malformed> {
    knock_shaped(
        ctx,
        ip.l4_offset + UDP_HLEN as usize,
        udp_payload_len(ctx, ip)?,
    )
}

/// The UDP payload's length as the UDP header states it: authoritative,
/// since Ethernet may pad short frames. A datagram longer than its IP
/// packet, or shorter than its header, is one the stack drops.
#[inline(always)]
fn udp_payload_len(ctx: &XdpContext, ip: &Ip) -> Result<u16, Malformed> {
    let l4 = ip.l4_offset;
    let udp_len = be16_at(ctx, l4 + 4)?;
    if l4 + udp_len as usize > ip.end {
        return Err(Malformed);
    }
    udp_len.checked_sub(UDP_HLEN).ok_or(Malformed)
}

fn knock(
    ctx: &XdpContext,
    ip: &Ip,
    dport: u16,
    tcp_flags: u8,
    flags: u8,
) -> Result<Counter, Malformed> {
    let l4 = ip.l4_offset;
    let sport = be16_at(ctx, l4)?;
    // TCP knocks are bare SYNs whose payload does not matter.
    let payload_len = if ip.proto == IPPROTO_UDP {
        udp_payload_len(ctx, ip)?
    } else {
        0
    };
    let payload_offset = l4 + UDP_HLEN as usize;
    if flags & policy::SHAPED != 0
        && (ip.proto != IPPROTO_UDP || !knock_shaped(ctx, payload_offset, payload_len)?)
    {
        return Ok(Counter::KnockMalformed);
    }
    // SAFETY: bpf_ktime_get_ns has no preconditions.
    let now = unsafe { bpf_ktime_get_ns() };
    if !take_token(&rate_key(ip), now) {
        return Ok(Counter::KnockRateLimited);
    }
    let Some(mut entry) = KNOCK_EVENTS.reserve::<KnockEvent>(0) else {
        debug!(ctx, "knock ring buffer full, event lost");
        return Ok(Counter::KnockEventLost);
    };
    let captured = (payload_len as usize).min(KNOCK_PAYLOAD_MAX);
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at reserved ring-buffer memory the size of a
    // KnockEvent (8-byte aligned, as the ring buffer aligns every record),
    // which we own until submit or discard.
    unsafe {
        // The payload is zeroed as sixteen 8-byte words: written as part of
        // a KnockEvent value, LLVM emits a byte-wise memset loop, 128
        // iterations that the verifier walks again on every path here.
        (&raw mut (*event).payload)
            .cast::<[u64; KNOCK_PAYLOAD_MAX / 8]>()
            .write([0; KNOCK_PAYLOAD_MAX / 8]);
        (&raw mut (*event).ts_ns).write(now);
        (&raw mut (*event).saddr).write(ip.saddr);
        (&raw mut (*event).daddr).write(ip.daddr);
        (&raw mut (*event).sport).write(sport);
        (&raw mut (*event).dport).write(dport);
        (&raw mut (*event).ifindex).write(ctx.ingress_ifindex() as u32);
        (&raw mut (*event).proto).write(ip.proto);
        (&raw mut (*event).family).write(ip.family);
        (&raw mut (*event).tcp_flags).write(tcp_flags);
        (&raw mut (*event)._pad).write(0);
        (&raw mut (*event).payload_len).write(payload_len);
        (&raw mut (*event).captured_len).write(captured as u16);
    }
    // One helper call with a length the verifier can bound, not a loop: a
    // loop of constant-size chunks multiplied the paths the verifier walks
    // by the 2^8 ways `captured` splits into them, and Linux 6.1's verifier
    // gave up at a million instructions. The helper wants a length it can
    // prove is 1 to KNOCK_PAYLOAD_MAX, and LLVM folds a plain range check
    // into arithmetic on a copy of the register, which the verifier cannot
    // follow. So the length is read back from the event (a volatile load,
    // which LLVM knows nothing about) and bounded by construction:
    // `((n - 1) & (MAX - 1)) + 1` is n itself for every n in 1..=MAX, and
    // the verifier sees 1..=MAX. bpf_xdp_load_bytes also reads
    // multi-buffer frames, and fails rather than read past the packet.
    const _: () = assert!(KNOCK_PAYLOAD_MAX.is_power_of_two());
    // SAFETY: `event` is reserved ring-buffer memory, written just above.
    let n = u32::from(unsafe { core::ptr::read_volatile(&raw const (*event).captured_len) });
    if n > 0 {
        let len = ((n - 1) & (KNOCK_PAYLOAD_MAX as u32 - 1)) + 1;
        // SAFETY: len <= KNOCK_PAYLOAD_MAX, so the destination stays inside
        // `payload`; the helper checks the packet side.
        let ret = unsafe {
            bpf_xdp_load_bytes(
                ctx.ctx,
                payload_offset as u32,
                (&raw mut (*event).payload).cast(),
                len,
            )
        };
        if ret != 0 {
            entry.discard(0);
            return Err(Malformed);
        }
    }
    entry.submit(0);
    Ok(Counter::KnockForwarded)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
