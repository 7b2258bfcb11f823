//! The one module that ends established connections: those the doors let
//! in for an address or device being revoked.
//!
//! A grant only admits new connections. Once a flow is established, its
//! conntrack entry carries it: the entry holds the redirect from the random
//! port to the service, and nftables' `ct state established` rule lets its
//! packets in. That is why a rotation or an expiry never cuts a session, and
//! why revoking a grant alone would not either. `knockctl revoke` means
//! "this address or device must lose access now", so the daemon also cuts
//! the flows the grant let in, in two steps:
//!
//! 1. The service's end of each flow is a local socket (a grant always
//!    redirects to a port on this host). It is aborted through sock_diag
//!    (`SOCK_DESTROY`, what `ss -K` does): the service sees the connection
//!    fail at once (sshd ends the session), and the kernel's reset, still
//!    translated by the flow's conntrack entry, reaches the client.
//! 2. The flow's conntrack entry is deleted (ctnetlink). Should the client
//!    send anything more, its packet starts a new entry that no redirect
//!    matches (the grant is gone) and meets a reset from a port nothing
//!    listens on. This step alone cuts the flow even on a kernel without
//!    `SOCK_DESTROY`, though the service then learns of it only when it next
//!    sends.
//!
//! Finding the flows never walks the conntrack table, whose size the
//! daemon does not control (a busy host, or a flood of half-open entries,
//! holds hundreds of thousands). The service's sockets are the short list:
//! one sock_diag dump per family lists the connected TCP sockets of this
//! namespace, those whose local port is a door's service port and whose
//! peer is the revoked address are kept, and each one's conntrack entry is
//! fetched by its exact reply tuple (service end → client end, which the
//! socket names) and checked against the grant. With 100,000 unrelated
//! conntrack entries a revoke then costs what it does with none (`cargo
//! xtask bench revoke`); a conntrack dump filtered by source took 13-34 ms.
//!
//! Message layouts come from netlink-packet-netfilter and
//! netlink-packet-sock-diag; the sockets are libmnl's, as in the nft module.

use std::{
    io,
    net::{IpAddr, SocketAddr},
    ops::RangeInclusive,
};

use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST, NetlinkBuffer, NetlinkHeader,
    NetlinkMessage, NetlinkPayload, NetlinkSerializable,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterMessageInner, NetfilterProtoFamily,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
        Protocol, Status, Tuple,
    },
};
use netlink_packet_sock_diag::{
    SockDiagMessage,
    inet::{ExtensionFlags, InetRequest, SocketId, StateFlags},
    message::SockDiagDestroy,
};

/// Most flows one revoke deletes. Each is one source's connection, so a
/// real client holds a handful; the cap keeps a flood of half-open entries
/// from one address from holding the daemon in this loop.
const MAX_FLOWS: usize = 65_536;

/// Bytes per receive: a dump fills up to 32 KiB per datagram.
const RECV_BUFFER: usize = 64 * 1024;

/// An error, naming the netlink step that failed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{what}: opening a netlink socket")]
    Open {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what}: sending")]
    Send {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what}: receiving")]
    Receive {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{what}: the kernel refused")]
    Refused {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

/// Which flows to cut: TCP from `source` to one of `ports`, that conntrack
/// sends on to `service_port` (the redirect a grant sets up; for a static
/// door, where nothing is redirected, `ports` is the service port itself).
/// With `udp` (a UDP door's), UDP flows from `source` to `service_port`:
/// only their conntrack entries go, since a UDP service's one socket
/// serves every peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cut {
    pub source: IpAddr,
    pub ports: RangeInclusive<u16>,
    pub service_port: u16,
    pub udp: bool,
}

/// One flow as conntrack reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Flow {
    source: IpAddr,
    protocol: u8,
    dport: u16,
    /// The reply direction's source: the service's end, after a redirect.
    local: SocketAddr,
    /// The reply direction's destination: the client's end.
    remote: SocketAddr,
    /// Conntrack's TCP state, when it reports one.
    tcp_state: Option<u8>,
    /// When conntrack created the entry (`CLOCK_REALTIME` nanoseconds), if
    /// the kernel keeps timestamps (`nf_conntrack_timestamp`).
    started_ns: Option<u64>,
}

/// Conntrack's TCP states in which a connection is over: no data can flow,
/// the entry only waits out stray segments. Such flows are not cut (nor
/// counted as cut).
const TCP_TIME_WAIT: u8 = 7;
const TCP_CLOSE: u8 = 8;

impl Cut {
    fn matches(&self, flow: &Flow) -> bool {
        if self.udp {
            return flow.source == self.source
                && flow.protocol == libc::IPPROTO_UDP as u8
                && flow.dport == self.service_port
                && flow.local.port() == self.service_port;
        }
        flow.source == self.source && self.scope().admitted(flow)
    }

    fn scope(&self) -> DoorPorts {
        DoorPorts {
            ports: self.ports.clone(),
            service_port: self.service_port,
        }
    }
}

/// The flows a door lets in, whatever their source: TCP to one of `ports`
/// that conntrack sends on to `service_port` (for a static door `ports`
/// is the service port itself).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoorPorts {
    pub ports: RangeInclusive<u16>,
    pub service_port: u16,
}

impl DoorPorts {
    /// Whether `flow` came in through this door and is not over yet.
    fn admitted(&self, flow: &Flow) -> bool {
        flow.protocol == libc::IPPROTO_TCP as u8
            && self.ports.contains(&flow.dport)
            && flow.local.port() == self.service_port
            && !matches!(flow.tcp_state, Some(TCP_TIME_WAIT | TCP_CLOSE))
    }
}

/// A connection some door let in, as [`sessions`] finds it.
#[derive(Debug, Clone)]
pub struct Session {
    /// Index of the [`DoorPorts`] it came in through.
    pub scope: usize,
    /// The client's end and the service's end.
    pub client: SocketAddr,
    pub service: SocketAddr,
    /// The port the client connected to (the grant's).
    pub granted_port: u16,
    /// When conntrack created the entry, if the kernel keeps timestamps.
    pub started: Option<std::time::SystemTime>,
    doomed: Doomed,
}

/// Turns on conntrack's entry timestamps in this network namespace
/// (`net.netfilter.nf_conntrack_timestamp`), which session caps age
/// connections by. `Ok(true)` when they are on.
pub fn enable_timestamps() -> io::Result<bool> {
    const SYSCTL: &str = "/proc/sys/net/netfilter/nf_conntrack_timestamp";
    if std::fs::read_to_string(SYSCTL)?.trim() == "1" {
        return Ok(true);
    }
    std::fs::write(SYSCTL, "1")?;
    Ok(std::fs::read_to_string(SYSCTL)?.trim() == "1")
}

/// Every connection in progress that one of `scopes` let in, found the way
/// a revoke finds them (service sockets, then each one's conntrack entry).
pub fn sessions(scopes: &[DoorPorts]) -> Result<Vec<Session>, Error> {
    if scopes.is_empty() {
        return Ok(Vec::new());
    }
    with_sockets(|diag, conntrack| {
        let flows = matching_flows(
            diag,
            conntrack,
            |local, _| scopes.iter().any(|s| s.service_port == local.port()),
            |flow| scopes.iter().position(|s| s.admitted(flow)),
        )?;
        Ok(flows
            .into_iter()
            .map(|(scope, flow, doomed)| Session {
                scope,
                client: flow.remote,
                service: flow.local,
                granted_port: flow.dport,
                started: flow
                    .started_ns
                    .map(|ns| std::time::UNIX_EPOCH + std::time::Duration::from_nanos(ns)),
                doomed,
            })
            .collect())
    })
}

/// Ends `sessions` the way a revoke ends a flow: aborts the service's
/// socket, then deletes the conntrack entry.
pub fn end(sessions: &[Session]) -> Result<Ended, Error> {
    if sessions.is_empty() {
        return Ok(Ended::default());
    }
    let doomed: Vec<&Doomed> = sessions.iter().map(|s| &s.doomed).collect();
    with_sockets(|diag, conntrack| end_on(diag, conntrack, &doomed))
}

/// The (source, destination) addresses and the protocol and ports of one
/// direction's tuple.
#[derive(Default)]
struct Parts {
    source: Option<IpAddr>,
    destination: Option<IpAddr>,
    protocol: Option<u8>,
    sport: Option<u16>,
    dport: Option<u16>,
}

fn parts_of(tuples: &[Tuple]) -> Parts {
    let mut parts = Parts::default();
    for tuple in tuples {
        match tuple {
            Tuple::Ip(ips) => {
                for ip in ips {
                    match ip {
                        IPTuple::SourceAddress(a) => parts.source = Some(*a),
                        IPTuple::DestinationAddress(a) => parts.destination = Some(*a),
                        _ => {}
                    }
                }
            }
            Tuple::Proto(fields) => {
                for field in fields {
                    match field {
                        ProtoTuple::Protocol(p) => parts.protocol = Some(u8::from(*p)),
                        ProtoTuple::SourcePort(p) => parts.sport = Some(*p),
                        ProtoTuple::DestinationPort(p) => parts.dport = Some(*p),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    parts
}

/// Reads a flow from its attributes; `None` when a part is missing (an
/// entry of a protocol without ports, say).
fn flow_of(attributes: &[ConntrackAttribute]) -> Option<Flow> {
    let (mut orig, mut reply, mut tcp_state) = (Parts::default(), Parts::default(), None);
    let mut started_ns = None;
    for attribute in attributes {
        match attribute {
            // The kernel flags it nested, and this crate keeps the flag.
            ConntrackAttribute::Other(nla)
                if netlink_packet_core::Nla::kind(nla) & netlink_packet_core::NLA_TYPE_MASK
                    == CTA_TIMESTAMP =>
            {
                let mut value = vec![0u8; netlink_packet_core::Nla::value_len(nla)];
                netlink_packet_core::Nla::emit_value(nla, &mut value);
                started_ns = timestamp_start(&value);
            }
            ConntrackAttribute::CtaTupleOrig(tuples) => orig = parts_of(tuples),
            ConntrackAttribute::CtaTupleReply(tuples) => reply = parts_of(tuples),
            ConntrackAttribute::CtaProtoInfo(infos) => {
                for info in infos {
                    if let ProtoInfo::TCP(fields) = info {
                        for field in fields {
                            if let ProtoInfoTCP::State(state) = field {
                                tcp_state = Some(*state);
                            }
                        }
                    }
                }
            }
            _ => {}
        }
    }
    Some(Flow {
        source: orig.source?,
        protocol: orig.protocol?,
        dport: orig.dport?,
        local: SocketAddr::new(reply.source?, reply.sport?),
        remote: SocketAddr::new(reply.destination?, reply.dport?),
        tcp_state,
        started_ns,
    })
}

/// CTA_TIMESTAMP, from the kernel's nfnetlink_conntrack.h, and its nested
/// CTA_TIMESTAMP_START (a big-endian u64 of nanoseconds).
const CTA_TIMESTAMP: u16 = 20;
const CTA_TIMESTAMP_START: u16 = 1;

/// The start time in a CTA_TIMESTAMP attribute's nested attributes.
fn timestamp_start(mut nested: &[u8]) -> Option<u64> {
    while nested.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([nested[0], nested[1]]));
        let kind = u16::from_ne_bytes([nested[2], nested[3]]) & 0x3fff;
        if len < 4 || len > nested.len() {
            return None;
        }
        if kind == CTA_TIMESTAMP_START && len == 12 {
            return Some(u64::from_be_bytes(nested[4..12].try_into().ok()?));
        }
        nested = nested.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    None
}

/// What identifies an entry for deletion: its original tuple, and its zone
/// when it has one (conntrack looks entries up per zone).
fn delete_key(attributes: &[ConntrackAttribute]) -> Vec<ConntrackAttribute> {
    const CTA_ZONE: u16 = 18;
    attributes
        .iter()
        .filter(|a| match a {
            ConntrackAttribute::CtaTupleOrig(_) => true,
            ConntrackAttribute::Other(nla) => netlink_packet_core::Nla::kind(nla) == CTA_ZONE,
            _ => false,
        })
        .cloned()
        .collect()
}

/// One request, serialized.
fn encode<I: NetlinkSerializable>(inner: I, flags: u16, seq: u32) -> Vec<u8> {
    let mut header = NetlinkHeader::default();
    header.flags = flags;
    header.sequence_number = seq;
    let mut packet = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(inner));
    packet.finalize();
    let mut bytes = vec![0; packet.buffer_len()];
    packet.serialize(&mut bytes);
    bytes
}

fn conntrack(family: NetfilterProtoFamily, message: ConntrackMessage) -> NetfilterMessage {
    NetfilterMessage::new(NetfilterHeader::new(family, 0, 0), message)
}

/// The messages in one datagram, each decoded on its own so that one entry
/// this crate cannot read does not hide the rest. `Err` for an error
/// acknowledgement.
fn messages(datagram: &[u8]) -> impl Iterator<Item = Result<Reply, io::Error>> + '_ {
    split_messages(datagram).map(|this| {
        match NetlinkMessage::<NetfilterMessage>::deserialize(this) {
            Ok(message) => match message.payload {
                NetlinkPayload::Done(_) => Ok(Reply::Done),
                NetlinkPayload::Error(e) => match e.code {
                    None => Ok(Reply::Ack),
                    Some(code) => Err(io::Error::from_raw_os_error(-code.get())),
                },
                NetlinkPayload::InnerMessage(NetfilterMessage {
                    inner: NetfilterMessageInner::Conntrack(ConntrackMessage::New(attributes)),
                    ..
                }) => Ok(Reply::Entry(attributes)),
                _ => Ok(Reply::Other),
            },
            Err(_) => Ok(Reply::Other),
        }
    })
}

enum Reply {
    Entry(Vec<ConntrackAttribute>),
    Ack,
    Done,
    Other,
}

impl PartialEq for Session {
    /// The same connection: the same two ends.
    fn eq(&self, other: &Session) -> bool {
        (self.client, self.service) == (other.client, other.service)
    }
}

#[cfg(test)]
impl Session {
    /// A session as a test's fake kernel shows it (nothing to cut by).
    pub fn seen(
        scope: usize,
        client: SocketAddr,
        service: SocketAddr,
        granted_port: u16,
        started: Option<std::time::SystemTime>,
    ) -> Session {
        Session {
            scope,
            client,
            service,
            granted_port,
            started,
            doomed: Doomed {
                family: NetfilterProtoFamily::IPv4,
                key: Vec::new(),
                socket: Some(InetRequest {
                    family: libc::AF_INET as u8,
                    protocol: libc::IPPROTO_TCP as u8,
                    extensions: ExtensionFlags::empty(),
                    states: StateFlags::empty(),
                    socket_id: SocketId::new_v4(),
                }),
            },
        }
    }
}

/// What [`connections`] ended.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Ended {
    /// Flows whose conntrack entry was deleted: the connections cut.
    pub flows: usize,
    /// Of those, the ones whose service-side socket was aborted too.
    pub sockets: usize,
    /// The kernel has no `SOCK_DESTROY` (CONFIG_INET_DIAG_DESTROY): flows
    /// were cut in conntrack only.
    pub sockets_unsupported: bool,
    /// More flows matched than one call cuts (`MAX_FLOWS`); calling again
    /// cuts the next ones.
    pub more_left: bool,
}

/// A flow to cut, and how to name its conntrack entry.
#[derive(Debug, Clone)]
struct Doomed {
    family: NetfilterProtoFamily,
    key: Vec<ConntrackAttribute>,
    /// The service's socket of the flow (none for a UDP flow: the
    /// service's socket is everyone's).
    socket: Option<InetRequest>,
}

/// What [`adopt`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Adopted {
    /// Connections conntrack did not know, now entered as established.
    pub adopted: usize,
    /// Connections conntrack already tracked (left as they were).
    pub tracked: usize,
}

/// The socket states of a connection whose data may still flow: the ones
/// adopted. Handshakes under way are left out: conntrack follows a
/// handshake from its SYN, and the guard decides on a new one.
fn flowing_states() -> StateFlags {
    StateFlags::ESTABLISHED
        | StateFlags::FIN_WAIT1
        | StateFlags::FIN_WAIT2
        | StateFlags::CLOSE_WAIT
        | StateFlags::LAST_ACK
        | StateFlags::CLOSING
}

/// Enters every connection of this namespace that conntrack does not track
/// yet into conntrack as ESTABLISHED, so that the guard chain's `ct state
/// established` rule keeps carrying it.
///
/// Why: on a host where nothing needed conntrack before knockd (a fresh
/// server with no firewall), the sessions already open (the operator's ssh
/// session among them) have no entry. Once knockd's table loads, their next
/// segment is a mid-stream pickup, state NEW, and the guard drops it: the
/// session started from goes silent. The sockets themselves say which
/// connections exist (sock_diag), so nothing is guessed and no probe is
/// let in: an entry names one connection's exact four-tuple.
///
/// The entries are created with window tracking liberal in both
/// directions, as conntrack's own mid-stream pickup does, because the
/// window scale the peers agreed on at the handshake is not known.
/// An entry that exists already (EEXIST) is left untouched.
pub fn adopt() -> Result<Adopted, Error> {
    with_sockets(|diag, conntrack| {
        let sockets = service_sockets(diag, flowing_states(), |_, _| true)?;
        let what = "entering established connections into conntrack";
        let mut adopted = Adopted::default();
        for (seq, socket) in (1 << 21..).zip(&sockets) {
            let message = conntrack_new(socket.remote, socket.local);
            let create = NLM_F_CREATE | NLM_F_EXCL;
            match acknowledged(conntrack, message, create, seq, what, &[libc::EEXIST])? {
                true => adopted.adopted += 1,
                false => adopted.tracked += 1,
            }
        }
        Ok(adopted)
    })
}

/// The request that creates an ESTABLISHED entry for the TCP connection
/// between `peer` and `local`, original direction from the peer.
fn conntrack_new(peer: SocketAddr, local: SocketAddr) -> NetfilterMessage {
    /// IP_CT_TCP_FLAG_SACK_PERM | IP_CT_TCP_FLAG_BE_LIBERAL.
    const LIBERAL: [u8; 2] = [0x02 | 0x08, 0x02 | 0x08];
    /// TCP_CONNTRACK_ESTABLISHED.
    const ESTABLISHED: u8 = 3;
    /// Conntrack's own default for an established entry (5 days); the
    /// next segment sets it again from the state anyway.
    const TIMEOUT_SECS: u32 = 432_000;
    let flags = || {
        netlink_packet_netfilter::conntrack::TCPFlags::parse(&LIBERAL)
            .expect("two bytes are a TCP flags attribute")
    };
    conntrack(
        family_of(local.ip()),
        ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tcp_tuple(peer, local)),
            ConntrackAttribute::CtaTupleReply(tcp_tuple(local, peer)),
            ConntrackAttribute::CtaTimeout(TIMEOUT_SECS),
            // SEEN_REPLY makes the original direction's segments
            // ESTABLISHED too (without it they count as NEW). CONFIRMED
            // because the kernel marks a created entry so before it applies
            // the status, and refuses a status that would clear it (EBUSY).
            ConntrackAttribute::CtaStatus(Status::Confirmed | Status::SeenReply | Status::Assured),
            ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![
                ProtoInfoTCP::State(ESTABLISHED),
                ProtoInfoTCP::OriginalFlags(flags()),
                ProtoInfoTCP::ReplyFlags(flags()),
            ])]),
        ]),
    )
}

/// Ends every flow a `Cut` describes, in the caller's network namespace:
/// aborts its local socket, then deletes its conntrack entry. A flow that
/// ended on its own meanwhile is not counted.
pub fn connections(cuts: &[Cut]) -> Result<Ended, Error> {
    let (udp, tcp): (Vec<Cut>, Vec<Cut>) = cuts.iter().cloned().partition(|c| c.udp);
    let mut ended = Ended::default();
    if !tcp.is_empty() {
        ended = with_sockets(|diag, conntrack| cut_on(diag, conntrack, &tcp))?;
    }
    if !udp.is_empty() {
        let (flows, more_left) = with_sockets(|_, conntrack| cut_udp_on(conntrack, &udp))?;
        ended.flows += flows;
        ended.more_left |= more_left;
    }
    Ok(ended)
}

/// Deletes the conntrack entries of the UDP flows `cuts` describe. UDP has
/// no connected socket per peer to look them up by, so the table of each
/// source's family is walked (at most `MAX_FLOWS` matches a call). Returns
/// the entries deleted, and whether more matched.
fn cut_udp_on(socket: &mnl::Socket, cuts: &[Cut]) -> Result<(usize, bool), Error> {
    let what = "listing UDP flows (conntrack)";
    let mut families: Vec<NetfilterProtoFamily> = Vec::new();
    for cut in cuts {
        let family = family_of(cut.source);
        if !families.contains(&family) {
            families.push(family);
        }
    }
    let mut buffer = vec![0u8; RECV_BUFFER];
    let mut doomed = Vec::new();
    for (seq, family) in (1 << 22..).zip(families) {
        let request = conntrack(family, ConntrackMessage::Get(Vec::new()));
        conntrack_answer(
            socket,
            &mut buffer,
            request,
            NLM_F_DUMP,
            seq,
            what,
            |attributes| {
                if doomed.len() < MAX_FLOWS
                    && flow_of(&attributes).is_some_and(|f| cuts.iter().any(|c| c.matches(&f)))
                {
                    doomed.push(Doomed {
                        family,
                        key: delete_key(&attributes),
                        socket: None,
                    });
                }
            },
        )?;
    }
    let doomed: Vec<&Doomed> = doomed.iter().collect();
    Ok((delete_entries(socket, &doomed)?, doomed.len() == MAX_FLOWS))
}

thread_local! {
    /// The sock_diag and ctnetlink sockets, kept per thread (a socket
    /// belongs to the namespace it was opened in) like the nft module's:
    /// closing a ctnetlink socket that has sent a request costs about 12 ms
    /// here, most of a revoke's time when it was opened per call (`cargo
    /// xtask bench revoke`).
    static SOCKETS: std::cell::RefCell<Option<(mnl::Socket, mnl::Socket)>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `f` with this thread's sockets. After an error they are dropped, so
/// replies left unread cannot be taken for the next request's.
fn with_sockets<T>(
    f: impl FnOnce(&mnl::Socket, &mnl::Socket) -> Result<T, Error>,
) -> Result<T, Error> {
    SOCKETS.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.is_none() {
            let open =
                |bus, what| mnl::Socket::new(bus).map_err(|source| Error::Open { what, source });
            *slot = Some((
                open(mnl::Bus::SockDiag, "opening a sock_diag socket")?,
                open(mnl::Bus::Netfilter, "opening a ctnetlink socket")?,
            ));
        }
        let (diag, conntrack) = slot.as_ref().expect("just opened");
        let result = f(diag, conntrack);
        if result.is_err() {
            *slot = None;
        }
        result
    })
}

fn cut_on(diag: &mnl::Socket, conntrack: &mnl::Socket, cuts: &[Cut]) -> Result<Ended, Error> {
    let flows = matching_flows(
        diag,
        conntrack,
        |local, remote| {
            cuts.iter()
                .any(|c| c.source == remote.ip() && c.service_port == local.port())
        },
        |flow| cuts.iter().any(|c| c.matches(flow)).then_some(()),
    )?;
    let doomed: Vec<&Doomed> = flows.iter().map(|(_, _, d)| d).collect();
    let mut ended = end_on(diag, conntrack, &doomed)?;
    ended.more_left = doomed.len() == MAX_FLOWS;
    Ok(ended)
}

/// Aborts each flow's socket, then deletes its conntrack entry.
fn end_on(diag: &mnl::Socket, conntrack: &mnl::Socket, doomed: &[&Doomed]) -> Result<Ended, Error> {
    let mut ended = Ended::default();
    match abort_sockets(diag, doomed) {
        Ok(aborted) => ended.sockets = aborted,
        Err(Error::Refused { source, .. }) if source.raw_os_error() == Some(libc::EOPNOTSUPP) => {
            ended.sockets_unsupported = true;
        }
        Err(e) => return Err(e),
    }
    ended.flows = delete_entries(conntrack, doomed)?;
    Ok(ended)
}

/// The family of `addr`'s entries. The kernel reads a tuple's addresses by
/// the message's family, so filters and deletes must name it.
fn family_of(addr: IpAddr) -> NetfilterProtoFamily {
    match addr {
        IpAddr::V4(_) => NetfilterProtoFamily::IPv4,
        IpAddr::V6(_) => NetfilterProtoFamily::IPv6,
    }
}

/// Every state a connection the service holds can be in, but listening
/// (a listener serves everyone) and the states of one already over.
/// SYN_RECV brings the handshakes still under way (request sockets): a
/// revoked client must not complete one after the revoke.
fn connected_states() -> StateFlags {
    StateFlags::all() - StateFlags::LISTEN - StateFlags::TIME_WAIT - StateFlags::CLOSE
}

/// One service-side socket as sock_diag lists it.
#[derive(Debug, Clone)]
struct ServiceSocket {
    /// The request that names exactly this socket (its family, four-tuple
    /// and cookie), for `SOCK_DESTROY`.
    id: InetRequest,
    /// Its ends, IPv4-mapped addresses made plain: a dual-stack service
    /// (sshd on `::`) holds IPv4 clients in IPv6 sockets.
    local: SocketAddr,
    remote: SocketAddr,
}

/// The connected TCP sockets of this namespace that `keep` (given their
/// local and remote ends) keeps.
fn service_sockets(
    socket: &mnl::Socket,
    states: StateFlags,
    keep: impl Fn(SocketAddr, SocketAddr) -> bool,
) -> Result<Vec<ServiceSocket>, Error> {
    let what = "listing the service's sockets (sock_diag)";
    let mut buffer = vec![0u8; RECV_BUFFER];
    let mut found = Vec::new();
    for (seq, family) in [(1, libc::AF_INET), (2, libc::AF_INET6)] {
        let request = InetRequest {
            family: family as u8,
            protocol: libc::IPPROTO_TCP as u8,
            extensions: ExtensionFlags::empty(),
            states: states.clone(),
            socket_id: if family == libc::AF_INET {
                SocketId::new_v4()
            } else {
                SocketId::new_v6()
            },
        };
        socket
            .send(&encode(
                SockDiagMessage::InetRequest(request),
                NLM_F_REQUEST | NLM_F_DUMP,
                seq,
            ))
            .map_err(|source| Error::Send { what, source })?;
        'dump: loop {
            let n = socket
                .recv_raw(&mut buffer)
                .map_err(|source| Error::Receive { what, source })?;
            if n == 0 {
                break;
            }
            for message in split_messages(&buffer[..n]) {
                let Ok(message) = NetlinkMessage::<SockDiagMessage>::deserialize(message) else {
                    continue;
                };
                match message.payload {
                    NetlinkPayload::Done(_) => break 'dump,
                    NetlinkPayload::Error(e) => {
                        return Err(Error::Refused {
                            what,
                            source: e.to_io(),
                        });
                    }
                    NetlinkPayload::InnerMessage(SockDiagMessage::InetResponse(response)) => {
                        let header = &response.header;
                        let id = &header.socket_id;
                        let local =
                            SocketAddr::new(id.source_address.to_canonical(), id.source_port);
                        let remote = SocketAddr::new(
                            id.destination_address.to_canonical(),
                            id.destination_port,
                        );
                        if header.state != TCP_LISTEN
                            && found.len() < MAX_FLOWS
                            && keep(local, remote)
                        {
                            found.push(ServiceSocket {
                                id: InetRequest {
                                    family: header.family,
                                    protocol: libc::IPPROTO_TCP as u8,
                                    extensions: ExtensionFlags::empty(),
                                    states: StateFlags::all(),
                                    socket_id: id.clone(),
                                },
                                local,
                                remote,
                            });
                        }
                    }
                    _ => {}
                }
            }
        }
    }
    Ok(found)
}

/// The messages of one datagram, 4-byte aligned, each left undecoded.
fn split_messages(datagram: &[u8]) -> impl Iterator<Item = &[u8]> + '_ {
    let mut rest = datagram;
    std::iter::from_fn(move || {
        let buffer = NetlinkBuffer::new_checked(rest).ok()?;
        let len = (buffer.length() as usize).min(rest.len());
        if len == 0 {
            return None;
        }
        let (this, next) = rest.split_at(len);
        rest = next.get(len.next_multiple_of(4) - len..).unwrap_or(&[]);
        Some(this)
    })
}

/// A TCP tuple, for a conntrack request.
fn tcp_tuple(from: SocketAddr, to: SocketAddr) -> Vec<Tuple> {
    vec![
        Tuple::Ip(vec![
            IPTuple::SourceAddress(from.ip()),
            IPTuple::DestinationAddress(to.ip()),
        ]),
        Tuple::Proto(vec![
            ProtoTuple::Protocol(Protocol::Tcp),
            ProtoTuple::SourcePort(from.port()),
            ProtoTuple::DestinationPort(to.port()),
        ]),
    ]
}

/// The flows a door let in: each service socket `keep_socket` keeps whose
/// conntrack entry, fetched by its exact reply tuple, `keep_flow` maps to
/// something (it came in through a grant's ports). A socket without an
/// entry is no flow a grant let in.
fn matching_flows<T>(
    diag: &mnl::Socket,
    socket: &mnl::Socket,
    keep_socket: impl Fn(SocketAddr, SocketAddr) -> bool,
    keep_flow: impl Fn(&Flow) -> Option<T>,
) -> Result<Vec<(T, Flow, Doomed)>, Error> {
    let sockets = service_sockets(diag, connected_states(), keep_socket)?;
    if sockets.is_empty() {
        return Ok(Vec::new());
    }
    let what = "looking up conntrack entries";
    let mut buffer = vec![0u8; RECV_BUFFER];
    let mut doomed = Vec::new();
    for (seq, service) in (1..).zip(sockets) {
        let family = family_of(service.local.ip());
        let request = conntrack(
            family,
            ConntrackMessage::Get(vec![ConntrackAttribute::CtaTupleReply(tcp_tuple(
                service.local,
                service.remote,
            ))]),
        );
        conntrack_answer(
            socket,
            &mut buffer,
            request,
            NLM_F_ACK,
            seq,
            what,
            |attributes| {
                let Some(flow) = flow_of(&attributes) else {
                    return;
                };
                if let Some(tag) = keep_flow(&flow) {
                    let key = delete_key(&attributes);
                    doomed.push((
                        tag,
                        flow,
                        Doomed {
                            family,
                            key,
                            socket: Some(service.id.clone()),
                        },
                    ));
                }
            },
        )?;
    }
    Ok(doomed)
}

/// Sends one conntrack request (with `flags` besides REQUEST: ACK for a
/// lookup, DUMP for the whole table) and hands each entry of the answer to
/// `entry`, until the kernel says it is done. ENOENT ends the answer
/// quietly: a lookup found nothing (the flow did not pass conntrack here).
/// `buffer` (`RECV_BUFFER` long) is the caller's, so a revoke's many
/// lookups share one.
fn conntrack_answer(
    socket: &mnl::Socket,
    buffer: &mut [u8],
    request: NetfilterMessage,
    flags: u16,
    seq: u32,
    what: &'static str,
    mut entry: impl FnMut(Vec<ConntrackAttribute>),
) -> Result<(), Error> {
    socket
        .send(&encode(request, NLM_F_REQUEST | flags, seq))
        .map_err(|source| Error::Send { what, source })?;
    loop {
        let n = socket
            .recv_raw(buffer)
            .map_err(|source| Error::Receive { what, source })?;
        if n == 0 {
            return Ok(());
        }
        for reply in messages(&buffer[..n]) {
            match reply {
                Ok(Reply::Entry(attributes)) => entry(attributes),
                Ok(Reply::Ack | Reply::Done) => return Ok(()),
                Ok(Reply::Other) => {}
                Err(e) if e.raw_os_error() == Some(libc::ENOENT) => return Ok(()),
                Err(source) => return Err(Error::Refused { what, source }),
            }
        }
    }
}

/// Sends one request (with `flags` besides REQUEST and ACK) that expects
/// an acknowledgement; `Ok(false)` when the kernel answers with one of
/// `absent`: the thing is gone (ENOENT, or ESTALE for a cookie that now
/// names no socket: one a destroy found in the meantime is not ours to
/// abort), or there already (EEXIST, for a create).
fn acknowledged<I: NetlinkSerializable>(
    socket: &mnl::Socket,
    message: I,
    flags: u16,
    seq: u32,
    what: &'static str,
    absent: &[i32],
) -> Result<bool, Error> {
    socket
        .send(&encode(message, NLM_F_REQUEST | NLM_F_ACK | flags, seq))
        .map_err(|source| Error::Send { what, source })?;
    let mut buffer = vec![0u8; RECV_BUFFER];
    let n = socket
        .recv_raw(&mut buffer)
        .map_err(|source| Error::Receive { what, source })?;
    match mnl::cb_run(&buffer[..n], seq, socket.portid()) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error().is_some_and(|code| absent.contains(&code)) => Ok(false),
        Err(source) => Err(Error::Refused { what, source }),
    }
}

/// What a destroy or delete answers for a socket or entry already gone.
const GONE: &[i32] = &[libc::ENOENT, libc::ESTALE];

/// TCP_LISTEN, from the kernel's tcp_states.h.
const TCP_LISTEN: u8 = 10;

/// Aborts the service-side socket of each flow (`SOCK_DESTROY`), named by
/// its cookie, so a socket that has since closed and whose four-tuple a new
/// one took is not touched. Returns how many it aborted.
fn abort_sockets(socket: &mnl::Socket, doomed: &[&Doomed]) -> Result<usize, Error> {
    let what = "aborting the service's socket (sock_diag)";
    let mut aborted = 0;
    let ids = doomed.iter().filter_map(|d| d.socket.as_ref());
    for (seq, id) in (100..).zip(ids) {
        let message = SockDiagDestroy::new(SockDiagMessage::InetRequest(id.clone()));
        if acknowledged(socket, message, 0, seq, what, GONE)? {
            aborted += 1;
        }
    }
    Ok(aborted)
}

/// Deletes each flow's conntrack entry. Returns how many it deleted.
fn delete_entries(socket: &mnl::Socket, doomed: &[&Doomed]) -> Result<usize, Error> {
    let what = "deleting conntrack entries";
    let mut deleted = 0;
    // Past the lookups' sequence numbers on the same socket.
    for (seq, Doomed { family, key, .. }) in (1 << 20..).zip(doomed) {
        let message = conntrack(*family, ConntrackMessage::Delete(key.clone()));
        if acknowledged(socket, message, 0, seq, what, GONE)? {
            deleted += 1;
        }
    }
    Ok(deleted)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TCP_ESTABLISHED: u8 = 3;

    fn entry(
        source: &str,
        protocol: Protocol,
        dport: u16,
        reply_sport: u16,
    ) -> Vec<ConntrackAttribute> {
        with_state(source, protocol, dport, reply_sport, TCP_ESTABLISHED)
    }

    fn with_state(
        source: &str,
        protocol: Protocol,
        dport: u16,
        reply_sport: u16,
        state: u8,
    ) -> Vec<ConntrackAttribute> {
        let source: IpAddr = source.parse().unwrap();
        let server: IpAddr = if source.is_ipv4() {
            "198.18.0.1".parse().unwrap()
        } else {
            "2001:db8::1".parse().unwrap()
        };
        vec![
            ConntrackAttribute::CtaTupleOrig(vec![
                Tuple::Ip(vec![
                    IPTuple::SourceAddress(source),
                    IPTuple::DestinationAddress(server),
                ]),
                Tuple::Proto(vec![
                    ProtoTuple::Protocol(protocol),
                    ProtoTuple::SourcePort(50000),
                    ProtoTuple::DestinationPort(dport),
                ]),
            ]),
            ConntrackAttribute::CtaTupleReply(vec![
                Tuple::Ip(vec![
                    IPTuple::SourceAddress(server),
                    IPTuple::DestinationAddress(source),
                ]),
                Tuple::Proto(vec![
                    ProtoTuple::Protocol(protocol),
                    ProtoTuple::SourcePort(reply_sport),
                    ProtoTuple::DestinationPort(50000),
                ]),
            ]),
            ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(
                state,
            )])]),
            ConntrackAttribute::CtaMark(0),
        ]
    }

    #[test]
    fn a_udp_cut_matches_the_sources_udp_flows_to_the_service_port() {
        let cut = Cut {
            source: "198.18.0.2".parse().unwrap(),
            ports: 51820..=51820,
            service_port: 51820,
            udp: true,
        };
        let yes = |a: Vec<ConntrackAttribute>| cut.matches(&flow_of(&a).unwrap());
        assert!(yes(entry("198.18.0.2", Protocol::Udp, 51820, 51820)));
        assert!(!yes(entry("198.18.0.3", Protocol::Udp, 51820, 51820)));
        assert!(!yes(entry("198.18.0.2", Protocol::Tcp, 51820, 51820)));
        assert!(!yes(entry("198.18.0.2", Protocol::Udp, 51821, 51821)));
    }

    #[test]
    fn only_redirected_flows_of_the_source_match() {
        let cut = Cut {
            source: "198.18.0.2".parse().unwrap(),
            ports: 40000..=40999,
            service_port: 22,
            udp: false,
        };
        let yes = |a: Vec<ConntrackAttribute>| cut.matches(&flow_of(&a).unwrap());
        assert!(yes(entry("198.18.0.2", Protocol::Tcp, 40500, 22)));
        // The socket to abort is the reply direction's: service to client.
        let flow = flow_of(&entry("198.18.0.2", Protocol::Tcp, 40500, 22)).unwrap();
        assert_eq!(flow.local, "198.18.0.1:22".parse().unwrap());
        assert_eq!(flow.remote, "198.18.0.2:50000".parse().unwrap());
        // Another source, another protocol, a port outside the range, or a
        // flow not sent on to the service: left alone.
        assert!(!yes(entry("198.18.0.3", Protocol::Tcp, 40500, 22)));
        assert!(!yes(entry("198.18.0.2", Protocol::Udp, 40500, 22)));
        assert!(!yes(entry("198.18.0.2", Protocol::Tcp, 39999, 22)));
        assert!(!yes(entry("198.18.0.2", Protocol::Tcp, 40500, 40500)));
        // A connection already over is left to expire; a half-closed one
        // can still carry data and is cut.
        assert!(!yes(with_state(
            "198.18.0.2",
            Protocol::Tcp,
            40500,
            22,
            TCP_TIME_WAIT
        )));
        assert!(!yes(with_state(
            "198.18.0.2",
            Protocol::Tcp,
            40500,
            22,
            TCP_CLOSE
        )));
        assert!(yes(with_state("198.18.0.2", Protocol::Tcp, 40500, 22, 5)));
        // An entry without ports is no flow to cut.
        assert_eq!(flow_of(&[ConntrackAttribute::CtaMark(1)]), None);
    }

    #[test]
    fn the_start_time_is_read_from_the_nested_timestamp() {
        // A pad attribute (CTA_TIMESTAMP_PAD, 3) first, as 32-bit kernels
        // put one; then CTA_TIMESTAMP_START, big-endian.
        let mut nested = vec![4, 0, 3, 0];
        nested.extend_from_slice(&[12, 0, 1, 0]);
        nested.extend_from_slice(&1_700_000_000_123_456_789u64.to_be_bytes());
        assert_eq!(timestamp_start(&nested), Some(1_700_000_000_123_456_789));
        assert_eq!(timestamp_start(&nested[..10]), None);
        assert_eq!(timestamp_start(&[0, 0, 1, 0]), None);
        // The whole attribute, flagged nested as the kernel sends it.
        let mut attribute = vec![(4 + nested.len()) as u8, 0, 20, 0x80];
        attribute.extend_from_slice(&nested);
        let nla = netlink_packet_core::NlaBuffer::new_checked(&attribute[..]).unwrap();
        let parsed =
            <netlink_packet_core::DefaultNla as netlink_packet_core::Parseable<_>>::parse(&nla)
                .unwrap();
        let mut attributes = entry("198.18.0.2", Protocol::Tcp, 40500, 22);
        attributes.push(ConntrackAttribute::Other(parsed));
        assert_eq!(
            flow_of(&attributes).unwrap().started_ns,
            Some(1_700_000_000_123_456_789)
        );
    }

    #[test]
    fn delete_key_is_the_original_tuple() {
        let attributes = entry("2001:db8::2", Protocol::Tcp, 40500, 22);
        let key = delete_key(&attributes);
        assert_eq!(key.len(), 1);
        assert!(matches!(key[0], ConntrackAttribute::CtaTupleOrig(_)));
    }

    #[test]
    fn replies_decode_one_by_one() {
        // An error acknowledgement (ENOENT) followed by a done message.
        let mut datagram = Vec::new();
        for (kind, payload) in [
            (2u16, (-libc::ENOENT).to_ne_bytes()),
            (3u16, 0i32.to_ne_bytes()),
        ] {
            let mut message = vec![0u8; 16];
            let len = if kind == 2 { 16 + 4 + 16 } else { 16 + 4 };
            message[..4].copy_from_slice(&(len as u32).to_ne_bytes());
            message[4..6].copy_from_slice(&kind.to_ne_bytes());
            message.extend_from_slice(&payload);
            message.resize(len, 0);
            datagram.extend_from_slice(&message);
        }
        let replies: Vec<_> = messages(&datagram).collect();
        assert_eq!(replies.len(), 2);
        assert_eq!(
            replies[0].as_ref().err().and_then(io::Error::raw_os_error),
            Some(libc::ENOENT)
        );
        assert!(matches!(replies[1], Ok(Reply::Done)));
        // Truncated garbage ends the iteration instead of looping.
        assert_eq!(messages(&[1, 2, 3]).count(), 0);
    }
}
