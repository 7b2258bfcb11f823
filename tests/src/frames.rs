//! Ethernet frames for `BPF_PROG_TEST_RUN`, assembled from etherparse's
//! header types so the odd shapes (IPv4 options, IPv6 extension chains,
//! fragments, truncation) are easy to build. Checksums are left zero: XDP
//! does not verify them, and neither does the guard.

use etherparse::{
    EtherType, Ethernet2Header, IpFragOffset, IpNumber, Ipv4Header, Ipv6Header, Ipv6RawExtHeader,
    TcpHeader, UdpHeader,
};

pub const SERVER_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 2];

/// TCP flags for [`tcp`].
#[derive(Clone, Copy, Default)]
pub struct Flags {
    pub syn: bool,
    pub ack: bool,
    pub rst: bool,
}

pub const SYN: Flags = Flags {
    syn: true,
    ack: false,
    rst: false,
};
pub const SYN_ACK: Flags = Flags {
    syn: true,
    ack: true,
    rst: false,
};
pub const ACK: Flags = Flags {
    syn: false,
    ack: true,
    rst: false,
};

/// A UDP header and payload.
pub fn udp(sport: u16, dport: u16, payload: &[u8]) -> (IpNumber, Vec<u8>) {
    let header = UdpHeader {
        source_port: sport,
        destination_port: dport,
        length: (UdpHeader::LEN + payload.len()) as u16,
        checksum: 0,
    };
    let mut out = Vec::new();
    header.write(&mut out).unwrap();
    out.extend_from_slice(payload);
    (IpNumber::UDP, out)
}

/// A TCP header (no options, no payload).
pub fn tcp(sport: u16, dport: u16, flags: Flags) -> (IpNumber, Vec<u8>) {
    let mut header = TcpHeader::new(sport, dport, 1000, 64240);
    header.syn = flags.syn;
    header.ack = flags.ack;
    header.rst = flags.rst;
    if flags.ack {
        header.acknowledgment_number = 1;
    }
    let mut out = Vec::new();
    header.write(&mut out).unwrap();
    (IpNumber::TCP, out)
}

/// IPv4 fragmentation fields: (more fragments, offset in 8-byte units).
pub type Frag = (bool, u16);

/// An IPv4 packet around `l4`, with raw `options` (a multiple of 4 bytes).
pub fn ipv4(
    src: [u8; 4],
    dst: [u8; 4],
    l4: (IpNumber, Vec<u8>),
    options: &[u8],
    frag: Frag,
) -> Vec<u8> {
    let (proto, payload) = l4;
    let mut header = Ipv4Header::new(0, 64, proto, src, dst).unwrap();
    header.options = options.try_into().unwrap();
    header.set_payload_len(payload.len()).unwrap();
    header.more_fragments = frag.0;
    header.fragment_offset = IpFragOffset::try_new(frag.1).unwrap();
    let mut out = Vec::new();
    header.write(&mut out).unwrap();
    out.extend_from_slice(&payload);
    out
}

/// One IPv6 extension header before the transport header.
#[derive(Clone)]
pub enum Ext {
    /// Hop-by-hop, routing or destination options, with `len` bytes of
    /// (padding) payload; `len + 2` must be a multiple of 8.
    Raw(IpNumber, usize),
    /// A fragment header: (offset in 8-byte units, more fragments).
    Fragment(u16, bool),
}

pub const HOP_BY_HOP: IpNumber = IpNumber::IPV6_HEADER_HOP_BY_HOP;
pub const ROUTING: IpNumber = IpNumber::IPV6_ROUTE_HEADER;
pub const DEST_OPTS: IpNumber = IpNumber::IPV6_DESTINATION_OPTIONS;

/// An IPv6 packet around `l4`, after the extension headers `exts`.
pub fn ipv6(src: [u8; 16], dst: [u8; 16], exts: &[Ext], l4: (IpNumber, Vec<u8>)) -> Vec<u8> {
    let (proto, payload) = l4;
    // Serialize back to front: each header needs the number of the next.
    let mut next = proto;
    let mut chain: Vec<u8> = Vec::new();
    for ext in exts.iter().rev() {
        let mut bytes = Vec::new();
        let number = match ext {
            Ext::Raw(number, len) => {
                // PadN option filling the header, so it is well formed.
                let mut pad = vec![0u8; *len];
                pad[0] = 1;
                pad[1] = (*len - 2) as u8;
                Ipv6RawExtHeader::new_raw(next, &pad)
                    .unwrap()
                    .write(&mut bytes)
                    .unwrap();
                *number
            }
            Ext::Fragment(offset, more) => {
                // Written by hand: etherparse 0.19's Ipv6FragmentHeader puts
                // the M flag at 0x80 of byte 3, where RFC 8200 (and the
                // kernel's IP6_MF) has it at 0x01.
                assert!(*offset < 1 << 13);
                let offset_flags = (*offset << 3) | u16::from(*more);
                bytes.extend_from_slice(&[next.0, 0]);
                bytes.extend_from_slice(&offset_flags.to_be_bytes());
                bytes.extend_from_slice(&7u32.to_be_bytes());
                IpNumber::IPV6_FRAGMENTATION_HEADER
            }
        };
        bytes.extend_from_slice(&chain);
        chain = bytes;
        next = number;
    }
    let header = Ipv6Header {
        traffic_class: 0,
        flow_label: Default::default(),
        payload_length: (chain.len() + payload.len()) as u16,
        next_header: next,
        hop_limit: 64,
        source: src,
        destination: dst,
    };
    let mut out = Vec::new();
    header.write(&mut out).unwrap();
    out.extend_from_slice(&chain);
    out.extend_from_slice(&payload);
    out
}

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_IPV6: u16 = 0x86dd;
pub const ETH_ARP: u16 = 0x0806;
pub const TPID_8021Q: u16 = 0x8100;
pub const TPID_8021AD: u16 = 0x88a8;

/// An Ethernet frame carrying `payload` of `ethertype`, inside the VLAN tags
/// `tags` (outermost first, each a TPID; VLAN id 42).
pub fn ether(tags: &[u16], ethertype: u16, payload: &[u8]) -> Vec<u8> {
    ether_vid(tags, 42, ethertype, payload)
}

/// As [`ether`], with every tag carrying VLAN id `vid` (0: priority tags,
/// which the kernel strips and delivers whatever their depth).
pub fn ether_vid(tags: &[u16], vid: u16, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let first = tags.first().copied().unwrap_or(ethertype);
    let mut out = Vec::new();
    Ethernet2Header {
        source: CLIENT_MAC,
        destination: SERVER_MAC,
        ether_type: EtherType(first),
    }
    .write(&mut out)
    .unwrap();
    for (i, _) in tags.iter().enumerate() {
        let inner = tags.get(i + 1).copied().unwrap_or(ethertype);
        out.extend_from_slice(&vid.to_be_bytes());
        out.extend_from_slice(&inner.to_be_bytes());
    }
    out.extend_from_slice(payload);
    out
}

/// An untagged Ethernet frame around an IPv4 packet.
pub fn eth4(ip: Vec<u8>) -> Vec<u8> {
    ether(&[], ETH_IPV4, &ip)
}

/// An untagged Ethernet frame around an IPv6 packet.
pub fn eth6(ip: Vec<u8>) -> Vec<u8> {
    ether(&[], ETH_IPV6, &ip)
}
