//! The one module that talks to nf_tables (through libnftnl and libmnl,
//! never the `nft` command).
//!
//! knockd owns one `inet` table, `knockd`, and touches nothing else:
//!
//! ```text
//! table inet knockd {
//!   # per one-time door (DOOR4, DOOR6):
//!   set ssh4 { type ipv4_addr . inet_service; flags timeout; }
//!   set ssh6 { type ipv6_addr . inet_service; flags timeout; }
//!   # static doors' grants: the service port itself, for one source
//!   set static_ipv4_grants { type ipv4_addr . inet_service; flags timeout; }
//!   set static_ipv6_grants { type ipv6_addr . inet_service; flags timeout; }
//!   # UDP doors' grants (a WireGuard server's port, say)
//!   set static_udp_ipv4_grants { type ipv4_addr . inet_service; flags timeout; }
//!   set static_udp_ipv6_grants { type ipv6_addr . inet_service; flags timeout; }
//!   chain prerouting { type nat hook prerouting priority dstnat; policy accept;
//!     # per one-time door:
//!     tcp dport START-END ip saddr . tcp dport @ssh4 dnat ip to ip daddr:SERVICE
//!     tcp dport START-END ip6 saddr . tcp dport @ssh6 dnat ip6 to ip6 daddr:SERVICE
//!   }
//!   chain input { type filter hook input priority filter; policy accept;
//!     iifname "eth0" jump guard        # per guarded interface
//!   }
//!   chain guard {
//!     ct state established,related accept
//!     ct status dnat accept            # redirected by a grant, above
//!     ip saddr . tcp dport @static_ipv4_grants accept
//!     ip6 saddr . tcp dport @static_ipv6_grants accept
//!     ip saddr . udp dport @static_udp_ipv4_grants accept
//!     ip6 saddr . udp dport @static_udp_ipv6_grants accept
//!     # per range of protected ports, the same ports XDP protects, and
//!     # UDP doors' service ports, which XDP passes (only conntrack, above,
//!     # tells a datagram of a granted flow from a new one):
//!     meta l4proto tcp tcp dport START-END drop
//!     meta l4proto udp udp dport START-END drop
//!     # a dark host (closed_ports: drop) only; its closed TCP ports are
//!     # among the protected ranges above:
//!     meta l4proto udp udp dport PUBLIC accept
//!     meta l4proto udp drop
//!     icmp type echo-request drop
//!     icmpv6 type echo-request drop
//!   }
//! }
//! ```
//!
//! The guard chain is the second of two independent layers: every port the
//! XDP program protects is dropped here too unless a grant or a known flow
//! admits the packet, so a bug in either layer alone exposes nothing. It
//! also silences what XDP passes on purpose: TCP segments that are not a
//! bare SYN (ACK, FIN, Xmas, Maimon scans; conntrack-INVALID and mid-stream
//! segments, which have no established entry) reach it and are dropped,
//! where the stack would have answered them with a RST.
//!
//! A grant is one element, (source, granted port), of its door's set, with a
//! kernel timeout: it expires on time even if the daemon is dead.
//! Established connections outlive it through conntrack. Sets per door let
//! doors share a grant range and tell a restarted daemon whose grant is
//! whose.
//!
//! Every change is one atomic batch, and every message in it is
//! acknowledged or the change fails. The safe nftnl API has no concatenated
//! sets or timeouts, and loads payload into register 1 only; those few
//! pieces use `nftnl::sys` here, and nowhere else.

use std::{
    ffi::{CStr, CString, c_void},
    net::IpAddr,
    ops::RangeInclusive,
    ptr::NonNull,
    time::Duration,
};

use crate::conflicts::{ForeignChain, ForeignRule};
use nftnl::{
    Batch, Chain, FinalizedBatch, MsgType, NlMsg, ProtoFamily, Rule, Table,
    expr::{Expression, Immediate, Register},
    nft_expr,
    nftnl_sys::{self as sys, libc},
};

/// The table knockd owns.
pub const TABLE: &CStr = c"knockd";
const PREROUTING: &CStr = c"prerouting";
const INPUT: &CStr = c"input";
/// The chain that enforces protected ports on guarded interfaces.
const GUARD: &CStr = c"guard";
/// Static doors' grant sets. Door sets are named `DOOR4`/`DOOR6`, so these
/// names, which end in neither digit, cannot collide with a door's.
const STATIC_SET4: &CStr = c"static_ipv4_grants";
const STATIC_SET6: &CStr = c"static_ipv6_grants";
/// Same-batch ids of the static sets, above any door's (`set_id`).
const STATIC_SET_ID4: u32 = 0x4000_0001;
const STATIC_SET_ID6: u32 = 0x4000_0002;
/// UDP doors' grants: (source, service port) admitted to a UDP service.
const STATIC_UDP_SET4: &CStr = c"static_udp_ipv4_grants";
const STATIC_UDP_SET6: &CStr = c"static_udp_ipv6_grants";
const STATIC_UDP_SET_ID4: u32 = 0x4000_0003;
const STATIC_UDP_SET_ID6: u32 = 0x4000_0004;
/// Most grant elements per netlink message (each is under 100 bytes).
const ELEMS_PER_MSG: usize = 256;

// Registers and data types not in the safe API.
const NFT_REG32_00: u32 = 8;
const TYPE_IPV4_ADDR: u32 = 7;
const TYPE_IPV6_ADDR: u32 = 8;
const TYPE_INET_SERVICE: u32 = 13;
/// nft's encoding of a concatenated type: each part shifted by 6 bits.
const fn concat_type(a: u32, b: u32) -> u32 {
    (a << 6) | b
}

/// An error, naming the netlink step that failed and what it was for.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("opening a netfilter netlink socket")]
    Open(#[source] std::io::Error),
    #[error("sending the nftables batch ({what})")]
    Send {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("receiving nftables acknowledgements ({what})")]
    Receive {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("nftables refused the change ({what})")]
    Process {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// What the rules need to know about a one-time door.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoorRules {
    /// The door's name; its sets are named after it.
    pub name: String,
    /// The ports grants are drawn from.
    pub grant_ports: RangeInclusive<u16>,
    /// The service the granted ports lead to.
    pub service_port: u16,
}

/// Everything the table is built from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TableRules {
    /// One-time doors: their grant sets and redirects.
    pub doors: Vec<DoorRules>,
    /// The interfaces the XDP guard is attached to: the guard chain applies
    /// to traffic arriving on them, as the XDP program does, and leaves
    /// loopback and other interfaces to the host's own rules.
    pub interfaces: Vec<String>,
    /// Protected TCP ports, as ranges: the same ports the XDP program
    /// protects (service ports, grant ranges, knock ports, `protect.tcp`).
    pub guarded_tcp: Vec<RangeInclusive<u16>>,
    /// Protected UDP ports, as ranges (knock ranges, `protect.udp`).
    pub guarded_udp: Vec<RangeInclusive<u16>>,
    /// A dark host (`closed_ports: drop`): UDP that starts no known flow,
    /// except to these public ports, and ICMP echo requests are dropped
    /// too. (Closed TCP ports are in `guarded_tcp` already.)
    pub dark: Option<Vec<RangeInclusive<u16>>>,
}

/// A grant element: who, on which port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct GrantKey {
    pub source: IpAddr,
    pub port: u16,
}

/// The grant set of `door` for one address family.
fn set_name(door: &str, v6: bool) -> CString {
    CString::new(format!("{door}{}", if v6 { 6 } else { 4 })).expect("door names hold no NUL")
}

/// The static doors' grant set for one protocol and address family.
fn static_set(udp: bool, v6: bool) -> (&'static CStr, u32) {
    match (udp, v6) {
        (false, false) => (STATIC_SET4, STATIC_SET_ID4),
        (false, true) => (STATIC_SET6, STATIC_SET_ID6),
        (true, false) => (STATIC_UDP_SET4, STATIC_UDP_SET_ID4),
        (true, true) => (STATIC_UDP_SET6, STATIC_UDP_SET_ID6),
    }
}

/// Every static set: TCP and UDP, each family.
const STATIC_SETS: [(bool, bool); 4] = [(false, false), (false, true), (true, false), (true, true)];

/// Set ids tie rules to sets created in the same batch.
fn set_id(door_index: usize, v6: bool) -> u32 {
    door_index as u32 * 2 + 1 + u32::from(v6)
}

impl GrantKey {
    /// The set key: the address, then the port in network order, padded to
    /// a 32-bit register as concatenations are.
    fn bytes(&self) -> Vec<u8> {
        let mut key = match self.source {
            IpAddr::V4(v4) => v4.octets().to_vec(),
            IpAddr::V6(v6) => v6.octets().to_vec(),
        };
        key.extend_from_slice(&self.port.to_be_bytes());
        key.extend_from_slice(&[0, 0]);
        key
    }

    fn from_bytes(v6: bool, key: &[u8]) -> Option<GrantKey> {
        let (addr_len, source) = if v6 {
            let octets: [u8; 16] = key.get(..16)?.try_into().ok()?;
            (16, IpAddr::from(octets))
        } else {
            let octets: [u8; 4] = key.get(..4)?.try_into().ok()?;
            (4, IpAddr::from(octets))
        };
        let port = u16::from_be_bytes(key.get(addr_len..addr_len + 2)?.try_into().ok()?);
        Some(GrantKey { source, port })
    }
}

/// A payload load into any register (the safe API always uses register 1).
struct PayloadTo {
    base: u32,
    offset: u32,
    len: u32,
    dreg: u32,
}

impl Expression for PayloadTo {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: a freshly allocated expression, given valid attributes; the
        // rule takes ownership of it.
        unsafe {
            let expr =
                NonNull::new(sys::nftnl_expr_alloc(c"payload".as_ptr())).expect("out of memory");
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_PAYLOAD_BASE as u16,
                self.base,
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_PAYLOAD_OFFSET as u16,
                self.offset,
            );
            sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_PAYLOAD_LEN as u16, self.len);
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_PAYLOAD_DREG as u16,
                self.dreg,
            );
            expr
        }
    }
}

/// A set lookup from any register, by name and (same-batch) id.
struct LookupAt {
    set: CString,
    set_id: u32,
    sreg: u32,
}

impl Expression for LookupAt {
    fn to_expr(&self, _rule: &Rule) -> NonNull<sys::nftnl_expr> {
        // SAFETY: as for PayloadTo; the set name is a 'static C string.
        unsafe {
            let expr =
                NonNull::new(sys::nftnl_expr_alloc(c"lookup".as_ptr())).expect("out of memory");
            sys::nftnl_expr_set_u32(expr.as_ptr(), sys::NFTNL_EXPR_LOOKUP_SREG as u16, self.sreg);
            sys::nftnl_expr_set_str(
                expr.as_ptr(),
                sys::NFTNL_EXPR_LOOKUP_SET as u16,
                self.set.as_ptr(),
            );
            sys::nftnl_expr_set_u32(
                expr.as_ptr(),
                sys::NFTNL_EXPR_LOOKUP_SET_ID as u16,
                self.set_id,
            );
            expr
        }
    }
}

/// A grant set, created if missing (its elements are kept when it exists).
struct GrantSet {
    name: CString,
    id: u32,
    v6: bool,
}

// SAFETY: writes one NEWSET/DELSET message into a buffer of at least
// nft_nlmsg_maxsize() bytes, as the trait requires of its callers.
unsafe impl NlMsg for GrantSet {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (key_len, addr_type) = if self.v6 {
            (20, TYPE_IPV6_ADDR)
        } else {
            (8, TYPE_IPV4_ADDR)
        };
        let msg = match msg_type {
            MsgType::Add => libc::NFT_MSG_NEWSET,
            MsgType::Del => libc::NFT_MSG_DELSET,
        };
        // SAFETY: a fresh set object, filled with valid attributes, used to
        // build the message and freed before returning.
        unsafe {
            let set = sys::nftnl_set_alloc();
            assert!(!set.is_null(), "out of memory");
            sys::nftnl_set_set_str(set, sys::NFTNL_SET_TABLE as u16, TABLE.as_ptr());
            sys::nftnl_set_set_str(set, sys::NFTNL_SET_NAME as u16, self.name.as_ptr());
            sys::nftnl_set_set_u32(set, sys::NFTNL_SET_FAMILY as u16, ProtoFamily::Inet as u32);
            sys::nftnl_set_set_u32(set, sys::NFTNL_SET_ID as u16, self.id);
            sys::nftnl_set_set_u32(set, sys::NFTNL_SET_KEY_LEN as u16, key_len);
            sys::nftnl_set_set_u32(
                set,
                sys::NFTNL_SET_KEY_TYPE as u16,
                concat_type(addr_type, TYPE_INET_SERVICE),
            );
            sys::nftnl_set_set_u32(
                set,
                sys::NFTNL_SET_FLAGS as u16,
                libc::NFT_SET_TIMEOUT as u32,
            );
            // No size: a sized set refuses elements past it (ENFILE), and
            // the daemon already bounds the grants (`max_grants`). An
            // unsized set with timeouts is a resizable hash in the kernel.
            let header = sys::nftnl_nlmsg_build_hdr(
                buf.cast(),
                msg as u16,
                ProtoFamily::Inet as u16,
                (libc::NLM_F_CREATE | libc::NLM_F_ACK) as u16,
                seq,
            );
            sys::nftnl_set_nlmsg_build_payload(header, set);
            sys::nftnl_set_free(set);
        }
    }
}

/// Elements to add to (with timeouts and the device they are for) or
/// delete from one grant set.
struct GrantElems<'a> {
    set: CString,
    elems: &'a [(GrantKey, Duration, Option<&'a str>)],
}

/// `nftnl_udata` type of an element's comment (NFTNL_UDATA_SET_ELEM_COMMENT),
/// the userdata `nft` itself writes and shows as `comment "…"`.
const UDATA_ELEM_COMMENT: u8 = 0;

/// An element's userdata holding `device` as its comment: one TLV, the
/// string NUL-terminated, as nft writes comments.
fn device_udata(device: &str) -> Vec<u8> {
    let mut value = device.as_bytes()[..device.len().min(126)].to_vec();
    value.push(0);
    let mut udata = vec![UDATA_ELEM_COMMENT, value.len() as u8];
    udata.extend_from_slice(&value);
    udata
}

/// The device an element's userdata names, if it holds a comment.
fn device_of_udata(mut udata: &[u8]) -> Option<String> {
    while udata.len() >= 2 {
        let (kind, len) = (udata[0], usize::from(udata[1]));
        let value = udata.get(2..2 + len)?;
        if kind == UDATA_ELEM_COMMENT {
            let text = value.split(|&b| b == 0).next()?;
            return String::from_utf8(text.to_vec())
                .ok()
                .filter(|d| !d.is_empty());
        }
        udata = &udata[2 + len..];
    }
    None
}

// SAFETY: as for GrantSet; ELEMS_PER_MSG keeps the message within bounds.
unsafe impl NlMsg for GrantElems<'_> {
    unsafe fn write(&self, buf: *mut c_void, seq: u32, msg_type: MsgType) {
        let (msg, flags) = match msg_type {
            MsgType::Add => (
                libc::NFT_MSG_NEWSETELEM,
                libc::NLM_F_CREATE | libc::NLM_F_ACK,
            ),
            MsgType::Del => (libc::NFT_MSG_DELSETELEM, libc::NLM_F_ACK),
        };
        // SAFETY: as for GrantSet; elements are owned by the set once added.
        unsafe {
            let set = sys::nftnl_set_alloc();
            assert!(!set.is_null(), "out of memory");
            sys::nftnl_set_set_str(set, sys::NFTNL_SET_TABLE as u16, TABLE.as_ptr());
            sys::nftnl_set_set_str(set, sys::NFTNL_SET_NAME as u16, self.set.as_ptr());
            for (key, timeout, device) in self.elems {
                let elem = sys::nftnl_set_elem_alloc();
                assert!(!elem.is_null(), "out of memory");
                let bytes = key.bytes();
                sys::nftnl_set_elem_set(
                    elem,
                    sys::NFTNL_SET_ELEM_KEY as u16,
                    bytes.as_ptr().cast(),
                    bytes.len() as u32,
                );
                if msg_type == MsgType::Add {
                    // At least a millisecond: 0 would mean "the set's default".
                    let ms = timeout.as_millis().clamp(1, u128::from(u64::MAX)) as u64;
                    sys::nftnl_set_elem_set_u64(elem, sys::NFTNL_SET_ELEM_TIMEOUT as u16, ms);
                    // The device rides along in the kernel, so a restarted
                    // daemon knows whose grant it adopts (revoke by device).
                    if let Some(device) = device {
                        let udata = device_udata(device);
                        sys::nftnl_set_elem_set(
                            elem,
                            sys::NFTNL_SET_ELEM_USERDATA as u16,
                            udata.as_ptr().cast(),
                            udata.len() as u32,
                        );
                    }
                }
                sys::nftnl_set_elem_add(set, elem);
            }
            let header = sys::nftnl_nlmsg_build_hdr(
                buf.cast(),
                msg as u16,
                ProtoFamily::Inet as u16,
                flags as u16,
                seq,
            );
            sys::nftnl_set_elems_nlmsg_build_payload(header, set);
            sys::nftnl_set_free(set);
        }
    }
}

thread_local! {
    /// One netfilter socket per thread, reused: opening and closing one per
    /// change cost about half a millisecond per grant here (knock-to-open
    /// p50 1.37 ms without reuse, 0.80 ms with; `cargo xtask bench knock`).
    /// Per thread, because a socket belongs to the network namespace it was
    /// opened in.
    static SOCKET: std::cell::RefCell<Option<mnl::Socket>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's netfilter socket. After an error the socket
/// is dropped, so replies left unread in it cannot be taken for the next
/// request's.
fn with_socket<T>(f: impl FnOnce(&mnl::Socket) -> Result<T, Error>) -> Result<T, Error> {
    SOCKET.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            *slot = Some(mnl::Socket::new(mnl::Bus::Netfilter).map_err(Error::Open)?);
        }
        let result = f(slot.as_ref().expect("just opened"));
        if result.is_err() {
            *slot = None;
        }
        result
    })
}

/// Sends a batch and checks the acknowledgement of every message in it.
fn send_and_process(batch: &FinalizedBatch, what: &'static str) -> Result<(), Error> {
    with_socket(|socket| send_and_process_on(socket, batch, what))
}

fn send_and_process_on(
    socket: &mnl::Socket,
    batch: &FinalizedBatch,
    what: &'static str,
) -> Result<(), Error> {
    let portid = socket.portid();
    socket
        .send_all(batch)
        .map_err(|source| Error::Send { what, source })?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    let mut expected = batch.sequence_numbers();
    while !expected.is_empty() {
        let messages = socket
            .recv(&mut buffer[..])
            .map_err(|source| Error::Receive { what, source })?;
        for message in messages {
            let message = message.map_err(|source| Error::Receive { what, source })?;
            let seq = expected.next().ok_or_else(|| Error::Receive {
                what,
                source: std::io::Error::other("an acknowledgement nobody asked for"),
            })?;
            // Ordering: each ACK must match the next sequence number; an
            // error ACK fails the whole change (the batch was atomic).
            mnl::cb_run(message, seq, portid).map_err(|source| Error::Process { what, source })?;
        }
    }
    Ok(())
}

/// `meta l4proto PROTO`
fn l4proto(rule: &mut Rule, proto: u8) {
    rule.add_expr(&nft_expr!(meta l4proto));
    rule.add_expr(&nft_expr!(cmp == proto));
}

/// `th dport START-END` (the transport header's destination port, which
/// sits at the same offset in TCP and UDP). Check the protocol first.
fn dport_in(rule: &mut Rule, ports: &RangeInclusive<u16>) {
    rule.add_expr(&PayloadTo {
        base: libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
        offset: 2,
        len: 2,
        dreg: Register::Reg1.to_raw(),
    });
    let (start, end) = (ports.start().to_be_bytes(), ports.end().to_be_bytes());
    if start == end {
        rule.add_expr(&nft_expr!(cmp == &start[..]));
    } else {
        rule.add_expr(&nft_expr!(cmp >= &start[..]));
        rule.add_expr(&nft_expr!(cmp <= &end[..]));
    }
}

/// `meta nfproto F saddr . th dport @set`: the source and destination port
/// of the packet are a member of a grant set of family `v6`. Check the
/// transport protocol first.
fn grant_lookup(rule: &mut Rule, set: &CStr, set_id: u32, v6: bool) {
    let (nfproto, saddr_offset, saddr_len) = if v6 {
        (libc::NFPROTO_IPV6, 8, 16)
    } else {
        (libc::NFPROTO_IPV4, 12, 4)
    };
    // Check the network protocol before loading its payload: the source
    // address offset depends on it.
    rule.add_expr(&nft_expr!(meta nfproto));
    rule.add_expr(&nft_expr!(cmp == nfproto as u8));
    rule.add_expr(&PayloadTo {
        base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
        offset: saddr_offset,
        len: saddr_len,
        dreg: NFT_REG32_00,
    });
    rule.add_expr(&PayloadTo {
        base: libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
        offset: 2,
        len: 2,
        dreg: NFT_REG32_00 + saddr_len / 4,
    });
    rule.add_expr(&LookupAt {
        set: set.to_owned(),
        set_id,
        sreg: NFT_REG32_00,
    });
}

/// `meta nfproto F tcp dport RANGE saddr . tcp dport @set dnat to daddr:SERVICE`
///
/// The destination address stays what the client connected to; only the
/// port changes. `redirect` would do the same on a host with one address,
/// but it rewrites the address to the interface's first one, which on a
/// host with several (any IPv6 host with SLAAC) is not always the address
/// the service listens on.
fn redirect_rule<'a>(chain: &'a Chain<'a>, door: &DoorRules, index: usize, v6: bool) -> Rule<'a> {
    let mut rule = Rule::new(chain);
    // The range first: it rules out most packets before the set lookup.
    l4proto(&mut rule, libc::IPPROTO_TCP as u8);
    dport_in(&mut rule, &door.grant_ports);
    grant_lookup(&mut rule, &set_name(&door.name, v6), set_id(index, v6), v6);
    // The lookup is done with the registers; reuse them for the target.
    let (family, daddr_offset, daddr_len) = if v6 {
        (ProtoFamily::Ipv6, 24, 16)
    } else {
        (ProtoFamily::Ipv4, 16, 4)
    };
    rule.add_expr(&PayloadTo {
        base: libc::NFT_PAYLOAD_NETWORK_HEADER as u32,
        offset: daddr_offset,
        len: daddr_len,
        dreg: Register::Reg1.to_raw(),
    });
    // Immediate copies its value's in-memory bytes: hand it the port already
    // in network order (a slice would copy the slice's pointer instead).
    rule.add_expr(&Immediate::new(door.service_port.to_be(), Register::Reg2));
    rule.add_expr(&nftnl::expr::Nat {
        nat_type: nftnl::expr::NatType::DNat,
        family,
        ip_register: Register::Reg1,
        port_register: Some(Register::Reg2),
    });
    rule
}

/// The guard chain's rules, in order: known flows and grants are accepted,
/// then every protected port is dropped.
fn guard_rules<'a>(chain: &'a Chain<'a>, table: &TableRules) -> Vec<Rule<'a>> {
    let mut rules = Vec::new();
    // Established flows (the grantee's open connections, which outlive
    // their grant; replies to connections this host made) keep working.
    // INVALID packets have no conntrack entry and match nothing here.
    let mut established = Rule::new(chain);
    established.add_expr(&nft_expr!(ct state));
    let states = nftnl::expr::ct::States::ESTABLISHED | nftnl::expr::ct::States::RELATED;
    established.add_expr(&nft_expr!(bitwise mask states.bits(), xor 0u32));
    established.add_expr(&nft_expr!(cmp != 0u32));
    established.add_expr(&nft_expr!(verdict accept));
    rules.push(established);
    // A new connection a grant redirected (prerouting) to its service.
    let mut redirected = Rule::new(chain);
    redirected.add_expr(&nft_expr!(ct status));
    let dnat = nftnl::expr::ct::ConntrackStatus::DST_NAT.bits();
    redirected.add_expr(&nft_expr!(bitwise mask dnat, xor 0u32));
    redirected.add_expr(&nft_expr!(cmp != 0u32));
    redirected.add_expr(&nft_expr!(verdict accept));
    rules.push(redirected);
    for (udp, v6) in STATIC_SETS {
        let (set, id) = static_set(udp, v6);
        let mut rule = Rule::new(chain);
        let proto = if udp {
            libc::IPPROTO_UDP
        } else {
            libc::IPPROTO_TCP
        };
        l4proto(&mut rule, proto as u8);
        grant_lookup(&mut rule, set, id, v6);
        rule.add_expr(&nft_expr!(verdict accept));
        rules.push(rule);
    }
    let guarded = [
        (libc::IPPROTO_TCP as u8, &table.guarded_tcp),
        (libc::IPPROTO_UDP as u8, &table.guarded_udp),
    ];
    for (proto, ranges) in guarded {
        for ports in ranges {
            let mut rule = Rule::new(chain);
            l4proto(&mut rule, proto);
            dport_in(&mut rule, ports);
            rule.add_expr(&nft_expr!(verdict drop));
            rules.push(rule);
        }
    }
    if let Some(public_udp) = &table.dark {
        rules.extend(dark_rules(chain, public_udp));
    }
    rules
}

/// A dark host's last rules, after known flows and grants were accepted:
/// public UDP ports accept, any other UDP drops (a new datagram to a
/// closed port would draw an ICMP port unreachable), and so do ICMP echo
/// requests. Other ICMP passes: errors about the host's own flows are
/// RELATED (accepted above) and IPv6 neighbour discovery is untracked.
fn dark_rules<'a>(chain: &'a Chain<'a>, public_udp: &[RangeInclusive<u16>]) -> Vec<Rule<'a>> {
    let mut rules = Vec::new();
    let udp = libc::IPPROTO_UDP as u8;
    for ports in public_udp {
        let mut rule = Rule::new(chain);
        l4proto(&mut rule, udp);
        dport_in(&mut rule, ports);
        rule.add_expr(&nft_expr!(verdict accept));
        rules.push(rule);
    }
    let mut closed = Rule::new(chain);
    l4proto(&mut closed, udp);
    closed.add_expr(&nft_expr!(verdict drop));
    rules.push(closed);
    // ICMP type 8 and ICMPv6 type 128: echo request.
    for (proto, echo_request) in [
        (libc::IPPROTO_ICMP as u8, 8u8),
        (libc::IPPROTO_ICMPV6 as u8, 128),
    ] {
        let mut rule = Rule::new(chain);
        l4proto(&mut rule, proto);
        rule.add_expr(&PayloadTo {
            base: libc::NFT_PAYLOAD_TRANSPORT_HEADER as u32,
            offset: 0,
            len: 1,
            dreg: Register::Reg1.to_raw(),
        });
        rule.add_expr(&nft_expr!(cmp == echo_request));
        rule.add_expr(&nft_expr!(verdict drop));
        rules.push(rule);
    }
    rules
}

/// Creates the table, or brings an existing one (say, after a restart) to
/// `rules`, keeping the grants it holds.
pub fn install(rules: &TableRules) -> Result<(), Error> {
    let doors = &rules.doors;
    let table = Table::new(TABLE, ProtoFamily::Inet);
    let mut prerouting = Chain::new(PREROUTING, &table);
    prerouting.set_hook(nftnl::Hook::PreRouting, -100);
    prerouting.set_type(nftnl::ChainType::Nat);
    prerouting.set_policy(nftnl::Policy::Accept);
    let mut input = Chain::new(INPUT, &table);
    input.set_hook(nftnl::Hook::In, 0);
    input.set_type(nftnl::ChainType::Filter);
    input.set_policy(nftnl::Policy::Accept);
    let guard = Chain::new(GUARD, &table);

    let mut batch = Batch::new();
    batch.add(&table, MsgType::Add);
    for (index, door) in doors.iter().enumerate() {
        for v6 in [false, true] {
            let set = GrantSet {
                name: set_name(&door.name, v6),
                id: set_id(index, v6),
                v6,
            };
            batch.add(&set, MsgType::Add);
        }
    }
    for (udp, v6) in STATIC_SETS {
        let (name, id) = static_set(udp, v6);
        let set = GrantSet {
            name: name.to_owned(),
            id,
            v6,
        };
        batch.add(&set, MsgType::Add);
    }
    for chain in [&prerouting, &input, &guard] {
        batch.add(chain, MsgType::Add);
    }
    // Replace the rules (deleting a chain's rules by chain flushes it), so
    // a changed door list takes effect; the sets and their grants stay.
    for chain in [&prerouting, &input, &guard] {
        batch.add(&Rule::new(chain), MsgType::Del);
    }
    // Sets of doors that are gone (a reload, or a restart with another
    // configuration) go too: the table holds what the configuration says
    // and nothing more. The flush above already dropped the rules that used
    // them, in this same transaction.
    let wanted: Vec<CString> = doors
        .iter()
        .flat_map(|d| [set_name(&d.name, false), set_name(&d.name, true)])
        .chain(STATIC_SETS.map(|(udp, v6)| static_set(udp, v6).0.to_owned()))
        .collect();
    for name in list_sets()?.into_iter().filter(|n| !wanted.contains(n)) {
        let stale = GrantSet {
            name,
            id: 0,
            v6: false,
        };
        batch.add(&stale, MsgType::Del);
    }
    for (index, door) in doors.iter().enumerate() {
        for v6 in [false, true] {
            batch.add(&redirect_rule(&prerouting, door, index, v6), MsgType::Add);
        }
    }
    // The guard rules go in before the jumps to them, so the chain is
    // complete when it starts to be used (the batch is atomic anyway).
    for rule in guard_rules(&guard, rules) {
        batch.add(&rule, MsgType::Add);
    }
    for interface in &rules.interfaces {
        let name = CString::new(interface.as_str()).expect("interface names hold no NUL");
        let mut jump = Rule::new(&input);
        jump.add_expr(&nft_expr!(meta iifname));
        jump.add_expr(&nft_expr!(cmp == nftnl::expr::InterfaceName::Exact(name)));
        jump.add_expr(&nft_expr!(verdict jump GUARD.to_owned()));
        batch.add(&jump, MsgType::Add);
    }
    send_and_process(&batch.finalize(), "installing the knockd table")
}

/// Removes the table and everything in it.
pub fn uninstall() -> Result<(), Error> {
    let table = Table::new(TABLE, ProtoFamily::Inet);
    let mut batch = Batch::new();
    // Adding first makes the delete succeed whether or not it existed.
    batch.add(&table, MsgType::Add);
    batch.add(&table, MsgType::Del);
    send_and_process(&batch.finalize(), "removing the knockd table")
}

/// One grant element: a door's, with its timeout when added.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Element {
    pub door: String,
    pub key: GrantKey,
    pub timeout: Duration,
    /// The device the grant is for, kept in the element's comment.
    pub device: Option<String>,
}

/// Adds `elems` (set, key, timeout) to, or removes them from, their sets,
/// one message per set and chunk.
fn batch_elements(
    batch: &mut Batch,
    elems: &[(CString, GrantKey, Duration, Option<&str>)],
    msg_type: MsgType,
) {
    let mut sets: Vec<&CString> = elems.iter().map(|(set, ..)| set).collect();
    sets.sort();
    sets.dedup();
    for set in sets {
        let mine: Vec<(GrantKey, Duration, Option<&str>)> = elems
            .iter()
            .filter(|(s, ..)| s == set)
            .map(|(_, key, timeout, device)| (*key, *timeout, *device))
            .collect();
        for chunk in mine.chunks(ELEMS_PER_MSG) {
            let msg = GrantElems {
                set: set.clone(),
                elems: chunk,
            };
            batch.add(&msg, msg_type);
        }
    }
}

/// Adds grants, each with its kernel timeout, and removes others, in one
/// atomic change (a rotation is exactly that). An element that is added
/// while it exists is first removed, so its timeout restarts.
pub fn update_grants(add: &[Element], remove: &[Element]) -> Result<(), Error> {
    fn in_set(elems: &[Element]) -> Vec<(CString, GrantKey, Duration, Option<&str>)> {
        elems
            .iter()
            .map(|e| {
                (
                    set_name(&e.door, e.key.source.is_ipv6()),
                    e.key,
                    e.timeout,
                    e.device.as_deref(),
                )
            })
            .collect()
    }
    let mut batch = Batch::new();
    batch_elements(&mut batch, &in_set(remove), MsgType::Del);
    batch_elements(&mut batch, &in_set(add), MsgType::Add);
    send_and_process(&batch.finalize(), "updating grants")
}

/// Admits `key.source` to the TCP (or, `udp`, UDP) port `key.port` itself
/// (a static door's service port) for `timeout`, or, with `None`, ends
/// that admission.
/// `exists` says whether the caller holds the element live: only then is
/// it removed first (so its timeout restarts). A removal of an element
/// that is not there fails the whole transaction, and the kernel's abort
/// of it costs about 15 ms (seen in `bench peers`), so it is not tried
/// blindly; if the element expired a moment ago anyway, the add is retried
/// alone.
pub fn update_static_grant(
    key: GrantKey,
    udp: bool,
    timeout: Option<Duration>,
    exists: bool,
) -> Result<(), Error> {
    let (set, _) = static_set(udp, key.source.is_ipv6());
    let elem = [(set.to_owned(), key, timeout.unwrap_or_default(), None)];
    let batch_of = |remove: bool| {
        let mut batch = Batch::new();
        if remove {
            batch_elements(&mut batch, &elem, MsgType::Del);
        }
        if timeout.is_some() {
            batch_elements(&mut batch, &elem, MsgType::Add);
        }
        batch.finalize()
    };
    if !exists && timeout.is_none() {
        return Ok(());
    }
    match send_and_process(&batch_of(exists), "updating a static grant") {
        Err(Error::Process { source, .. })
            if exists && source.raw_os_error() == Some(libc::ENOENT) =>
        {
            if timeout.is_none() {
                return Ok(());
            }
            send_and_process(&batch_of(false), "updating a static grant")
        }
        other => other,
    }
}

/// The grants the kernel holds for `doors`, with the time each has left.
pub fn list_grants(doors: &[&str]) -> Result<Vec<Element>, Error> {
    let mut out = Vec::new();
    for door in doors {
        for v6 in [false, true] {
            for (key, timeout, device) in list_set(&set_name(door, v6), v6)? {
                out.push(Element {
                    door: (*door).to_owned(),
                    key,
                    timeout,
                    device,
                });
            }
        }
    }
    Ok(out)
}

struct DumpState {
    set: *mut sys::nftnl_set,
}

fn parse_elems(header: &libc::nlmsghdr, state: &mut DumpState) -> libc::c_int {
    // SAFETY: `header` is a valid netlink message from mnl; the set object
    // lives until the dump is over.
    unsafe { sys::nftnl_set_elems_nlmsg_parse(header, state.set) };
    mnl::mnl_sys::MNL_CB_OK
}

fn list_set(name: &CStr, v6: bool) -> Result<Vec<(GrantKey, Duration, Option<String>)>, Error> {
    with_socket(|socket| list_set_on(socket, name, v6))
}

fn list_set_on(
    socket: &mnl::Socket,
    name: &CStr,
    v6: bool,
) -> Result<Vec<(GrantKey, Duration, Option<String>)>, Error> {
    let mut out = Vec::new();
    const WHAT: &str = "listing grants";
    // SAFETY: a fresh set object (table and name only) builds the dump
    // request and collects the reply; it is freed below.
    let (set, request) = unsafe {
        let set = sys::nftnl_set_alloc();
        assert!(!set.is_null(), "out of memory");
        sys::nftnl_set_set_str(set, sys::NFTNL_SET_TABLE as u16, TABLE.as_ptr());
        sys::nftnl_set_set_str(set, sys::NFTNL_SET_NAME as u16, name.as_ptr());
        let request = set_dump_request(
            set,
            libc::NFT_MSG_GETSETELEM as u16,
            sys::nftnl_set_elems_nlmsg_build_payload,
        );
        (set, request)
    };
    let result = dump(socket, &request, WHAT, parse_elems, &mut DumpState { set });
    // SAFETY: iterating the set's parsed elements, then freeing the set once.
    unsafe {
        if result.is_ok() {
            let iter = sys::nftnl_set_elems_iter_create(set);
            if !iter.is_null() {
                let mut elem = sys::nftnl_set_elems_iter_next(iter);
                while !elem.is_null() {
                    let mut len = 0u32;
                    let key =
                        sys::nftnl_set_elem_get(elem, sys::NFTNL_SET_ELEM_KEY as u16, &mut len);
                    let expires =
                        sys::nftnl_set_elem_get_u64(elem, sys::NFTNL_SET_ELEM_EXPIRATION as u16);
                    let mut udata_len = 0u32;
                    let udata = sys::nftnl_set_elem_get(
                        elem,
                        sys::NFTNL_SET_ELEM_USERDATA as u16,
                        &mut udata_len,
                    );
                    let device = (!udata.is_null())
                        .then(|| {
                            device_of_udata(std::slice::from_raw_parts(
                                udata.cast::<u8>(),
                                udata_len as usize,
                            ))
                        })
                        .flatten();
                    if !key.is_null() {
                        let bytes = std::slice::from_raw_parts(key.cast::<u8>(), len as usize);
                        if let Some(grant) = GrantKey::from_bytes(v6, bytes) {
                            out.push((grant, Duration::from_millis(expires), device));
                        }
                    }
                    elem = sys::nftnl_set_elems_iter_next(iter);
                }
                sys::nftnl_set_elems_iter_destroy(iter);
            }
        }
        sys::nftnl_set_free(set);
    }
    result.map(|()| out)
}

/// The names of the sets in knockd's table (none when there is no table).
fn list_sets() -> Result<Vec<CString>, Error> {
    with_socket(list_sets_on)
}

fn set_name_of(header: &libc::nlmsghdr, names: &mut Vec<CString>) -> libc::c_int {
    // SAFETY: `header` is a valid netlink message from mnl; the set object
    // is freed before returning, after its strings were copied.
    unsafe {
        let set = sys::nftnl_set_alloc();
        assert!(!set.is_null(), "out of memory");
        if sys::nftnl_set_nlmsg_parse(header, set) >= 0 {
            let table = sys::nftnl_set_get_str(set, sys::NFTNL_SET_TABLE as u16);
            let name = sys::nftnl_set_get_str(set, sys::NFTNL_SET_NAME as u16);
            if !table.is_null() && !name.is_null() && CStr::from_ptr(table) == TABLE {
                names.push(CStr::from_ptr(name).to_owned());
            }
        }
        sys::nftnl_set_free(set);
    }
    mnl::mnl_sys::MNL_CB_OK
}

fn list_sets_on(socket: &mnl::Socket) -> Result<Vec<CString>, Error> {
    // SAFETY: a set object naming only the table builds the dump request
    // (the kernel then lists that table's sets); it is freed at once.
    let request = unsafe {
        let set = sys::nftnl_set_alloc();
        assert!(!set.is_null(), "out of memory");
        sys::nftnl_set_set_str(set, sys::NFTNL_SET_TABLE as u16, TABLE.as_ptr());
        let request = set_dump_request(
            set,
            libc::NFT_MSG_GETSET as u16,
            sys::nftnl_set_nlmsg_build_payload,
        );
        sys::nftnl_set_free(set);
        request
    };
    let mut names = Vec::new();
    match dump(socket, &request, "listing sets", set_name_of, &mut names) {
        Ok(()) => Ok(names),
        // No table yet: no sets.
        Err(Error::Process { source, .. }) if source.raw_os_error() == Some(libc::ENOENT) => {
            Ok(Vec::new())
        }
        Err(e) => Err(e),
    }
}

/// Whether the knockd table exists (it is gone after a third party's
/// `nft flush ruleset`).
pub fn table_exists() -> Result<bool, Error> {
    Ok(!list_tables()?.is_empty())
}

fn list_tables() -> Result<Vec<CString>, Error> {
    with_socket(list_tables_on)
}

fn list_tables_on(socket: &mnl::Socket) -> Result<Vec<CString>, Error> {
    let request = nftnl::table::get_tables_nlmsg(DUMP_SEQ);
    let mut tables = std::collections::HashSet::new();
    dump(
        socket,
        &request,
        "listing tables",
        nftnl::table::get_tables_cb,
        &mut tables,
    )?;
    Ok(tables
        .into_iter()
        .filter(|t| t.as_c_str() == TABLE)
        .collect())
}

/// Every chain and rule of the host's ruleset but knockd's own table, as
/// [`crate::conflicts`] judges them: the other tables (iptables-nft's,
/// ufw's, firewalld's, the operator's) whose drops knockd's grants cannot
/// override.
pub fn host_ruleset() -> Result<(Vec<ForeignChain>, Vec<ForeignRule>), Error> {
    with_socket(|socket| {
        let mut chains = Vec::new();
        let request = dump_everything(libc::NFT_MSG_GETCHAIN as u16);
        dump(socket, &request, "listing chains", chain_of, &mut chains)?;
        let mut rules = Vec::new();
        let request = dump_everything(libc::NFT_MSG_GETRULE as u16);
        dump(socket, &request, "listing rules", rule_of, &mut rules)?;
        Ok((chains, rules))
    })
}

/// A dump request of `msg_type` over every family and table.
fn dump_everything(msg_type: u16) -> Vec<u8> {
    let mut request = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize];
    // SAFETY: the buffer holds the largest message nftnl builds; the
    // request is a header alone.
    unsafe {
        let header = sys::nftnl_nlmsg_build_hdr(
            request.as_mut_ptr().cast(),
            msg_type,
            libc::NFPROTO_UNSPEC as u16,
            (libc::NLM_F_DUMP | libc::NLM_F_ACK) as u16,
            DUMP_SEQ,
        );
        request.truncate((*header).nlmsg_len as usize);
    }
    request
}

/// A string attribute, or empty when unset.
///
/// # Safety
/// `ptr` is null or a NUL-terminated string libnftnl owns.
unsafe fn owned(ptr: *const libc::c_char) -> String {
    if ptr.is_null() {
        String::new()
    } else {
        // SAFETY: the caller's promise.
        unsafe { CStr::from_ptr(ptr) }
            .to_string_lossy()
            .into_owned()
    }
}

/// Whether a dumped object is knockd's own table's.
fn ours(family: u32, table: &str) -> bool {
    family == libc::NFPROTO_INET as u32 && table.as_bytes() == TABLE.to_bytes()
}

fn chain_of(header: &libc::nlmsghdr, chains: &mut Vec<ForeignChain>) -> libc::c_int {
    // SAFETY: `header` is a valid netlink message from mnl; the chain
    // object is freed before returning, after its fields were copied.
    unsafe {
        let chain = sys::nftnl_chain_alloc();
        assert!(!chain.is_null(), "out of memory");
        if sys::nftnl_chain_nlmsg_parse(header, chain) >= 0 {
            let attr = |a: u32| a as u16;
            let family = sys::nftnl_chain_get_u32(chain, attr(sys::NFTNL_CHAIN_FAMILY));
            let table = owned(sys::nftnl_chain_get_str(
                chain,
                attr(sys::NFTNL_CHAIN_TABLE),
            ));
            if !ours(family, &table) {
                let hooked = sys::nftnl_chain_is_set(chain, attr(sys::NFTNL_CHAIN_HOOKNUM));
                let policy = sys::nftnl_chain_is_set(chain, attr(sys::NFTNL_CHAIN_POLICY))
                    .then(|| sys::nftnl_chain_get_u32(chain, attr(sys::NFTNL_CHAIN_POLICY)));
                chains.push(ForeignChain {
                    family,
                    table,
                    name: owned(sys::nftnl_chain_get_str(chain, attr(sys::NFTNL_CHAIN_NAME))),
                    hook: hooked
                        .then(|| sys::nftnl_chain_get_u32(chain, attr(sys::NFTNL_CHAIN_HOOKNUM))),
                    priority: sys::nftnl_chain_get_s32(chain, attr(sys::NFTNL_CHAIN_PRIO)),
                    policy_drop: policy == Some(libc::NF_DROP as u32),
                });
            }
        }
        sys::nftnl_chain_free(chain);
    }
    mnl::mnl_sys::MNL_CB_OK
}

fn rule_of(header: &libc::nlmsghdr, rules: &mut Vec<ForeignRule>) -> libc::c_int {
    // SAFETY: as in chain_of; snprintf writes at most the buffer's size,
    // NUL-terminated.
    unsafe {
        let rule = sys::nftnl_rule_alloc();
        assert!(!rule.is_null(), "out of memory");
        if sys::nftnl_rule_nlmsg_parse(header, rule) >= 0 {
            let attr = |a: u32| a as u16;
            let family = sys::nftnl_rule_get_u32(rule, attr(sys::NFTNL_RULE_FAMILY));
            let table = owned(sys::nftnl_rule_get_str(rule, attr(sys::NFTNL_RULE_TABLE)));
            if !ours(family, &table) {
                let mut text = vec![0u8; 16 * 1024];
                sys::nftnl_rule_snprintf(
                    text.as_mut_ptr().cast(),
                    text.len(),
                    rule,
                    sys::NFTNL_OUTPUT_DEFAULT,
                    0,
                );
                rules.push(ForeignRule {
                    family,
                    table,
                    chain: owned(sys::nftnl_rule_get_str(rule, attr(sys::NFTNL_RULE_CHAIN))),
                    handle: sys::nftnl_rule_get_u64(rule, attr(sys::NFTNL_RULE_HANDLE)),
                    expressions: owned(text.as_ptr().cast()),
                });
            }
        }
        sys::nftnl_rule_free(rule);
    }
    mnl::mnl_sys::MNL_CB_OK
}

/// The sequence number of dump requests (one at a time per socket).
const DUMP_SEQ: u32 = 1;

/// A dump request about knockd's sets, of type `msg_type`, whose payload
/// `build` writes from `set`.
///
/// # Safety
/// `set` must be a valid set object.
unsafe fn set_dump_request(
    set: *mut sys::nftnl_set,
    msg_type: u16,
    build: unsafe extern "C" fn(*mut libc::nlmsghdr, *mut sys::nftnl_set),
) -> Vec<u8> {
    let mut request = vec![0u8; nftnl::nft_nlmsg_maxsize() as usize];
    // SAFETY: the buffer holds the largest message nftnl builds; `set` is
    // valid (the caller's promise).
    unsafe {
        let header = sys::nftnl_nlmsg_build_hdr(
            request.as_mut_ptr().cast(),
            msg_type,
            ProtoFamily::Inet as u16,
            (libc::NLM_F_DUMP | libc::NLM_F_ACK) as u16,
            DUMP_SEQ,
        );
        build(header, set);
        request.truncate((*header).nlmsg_len as usize);
    }
    request
}

/// Sends a dump request and hands every message of the answer to `cb`,
/// until the dump is done.
fn dump<T>(
    socket: &mnl::Socket,
    request: &[u8],
    what: &'static str,
    cb: fn(&libc::nlmsghdr, &mut T) -> libc::c_int,
    state: &mut T,
) -> Result<(), Error> {
    socket
        .send(request)
        .map_err(|source| Error::Send { what, source })?;
    let mut buffer = vec![0; nftnl::nft_nlmsg_maxsize() as usize];
    loop {
        let len = socket
            .recv_raw(&mut buffer)
            .map_err(|source| Error::Receive { what, source })?;
        match mnl::cb_run2(&buffer[..len], DUMP_SEQ, socket.portid(), cb, state) {
            Ok(mnl::CbResult::Stop) => return Ok(()),
            Ok(mnl::CbResult::Ok) => continue,
            Err(source) => return Err(Error::Process { what, source }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_rides_in_the_elements_comment() {
        let udata = device_udata("laptop");
        // What nft writes for `comment "laptop"`: type 0, length, NUL-terminated.
        assert_eq!(udata, b"\x00\x07laptop\x00");
        assert_eq!(device_of_udata(&udata).as_deref(), Some("laptop"));
        // Another TLV first, a truncated one, an empty comment.
        let mut other = vec![5, 2, 1, 2];
        other.extend_from_slice(&udata);
        assert_eq!(device_of_udata(&other).as_deref(), Some("laptop"));
        assert_eq!(device_of_udata(&[0, 9, b'a']), None);
        assert_eq!(device_of_udata(&[0, 1, 0]), None);
    }

    #[test]
    fn grant_keys_round_trip() {
        for (source, v6) in [("198.18.0.2", false), ("2001:db8::2", true)] {
            let key = GrantKey {
                source: source.parse().unwrap(),
                port: 40123,
            };
            let bytes = key.bytes();
            assert_eq!(bytes.len(), if v6 { 20 } else { 8 });
            assert_eq!(GrantKey::from_bytes(v6, &bytes), Some(key));
        }
        assert_eq!(GrantKey::from_bytes(false, &[1, 2]), None);
    }
}
