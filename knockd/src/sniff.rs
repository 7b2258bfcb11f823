//! Knocks read from a packet socket, for interfaces where the kernel
//! refused the XDP guard (`without_xdp: nftables`).
//!
//! Without XDP nothing forwards knocks to the daemon, and nftables drops
//! them (knock ports are protected). An `AF_PACKET` socket sees each frame
//! as it arrives, before netfilter, so the daemon still gets them. A
//! classic BPF filter lets only IPv4 and IPv6 TCP and UDP into the socket;
//! [`admits`] then applies what the XDP program would have (a knock port,
//! a bare SYN for TCP, a knock's shape on one-time knock ports). What is
//! lost against XDP: the kernel's per-source rate limit (the socket's
//! receive buffer bounds what queues instead), VLAN-tagged frames the
//! driver did not untag, and IPv6 extension headers.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use knockd_common::{KNOCK_PAYLOAD_MAX, knock_wire, policy};
use tokio::io::unix::AsyncFd;

use crate::{
    events::SeenKnock,
    maps::{PortPolicy, Proto},
};

/// Frames handled per wake-up, as for the ring buffer.
const BATCH_MAX: usize = 256;
/// Bytes kept of each frame: headers (Ethernet, IPv4 with options, TCP or
/// UDP) and the captured payload.
const SNAP_LEN: u32 = 14 + 60 + 60 + KNOCK_PAYLOAD_MAX as u32;

/// A packet socket bound to the interfaces XDP could not guard.
pub struct PacketKnocks {
    socket: AsyncFd<OwnedFd>,
    /// The interfaces it reads; frames from others are ignored.
    ifindexes: Vec<u32>,
}

impl PacketKnocks {
    /// Opens the socket for `ifindexes`.
    pub fn open(ifindexes: Vec<u32>) -> std::io::Result<PacketKnocks> {
        let protocol = (libc::ETH_P_ALL as u16).to_be();
        // SAFETY: plain socket creation; the fd is owned below.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                i32::from(protocol),
            )
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a fresh fd nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let code = filter();
        let program = libc::sock_fprog {
            len: code.len() as u16,
            filter: code.as_ptr().cast_mut(),
        };
        // SAFETY: `program` points at `code`, alive for the call; the
        // kernel copies it.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_ATTACH_FILTER,
                (&raw const program).cast(),
                std::mem::size_of::<libc::sock_fprog>() as u32,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: the OwnedFd is moved into the AsyncFd, which owns it (and
        // so its raw fd) for as long as it is registered.
        let socket = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }?;
        Ok(PacketKnocks { socket, ifindexes })
    }

    /// Waits for frames and returns the knocks among them (up to
    /// [`BATCH_MAX`] frames per call), as the XDP program would have
    /// forwarded them under `policy`.
    pub async fn read(&mut self, policy: &PortPolicy) -> std::io::Result<Vec<SeenKnock>> {
        loop {
            let mut ready = self.socket.readable().await?;
            let mut knocks = Vec::new();
            let mut frame = [0u8; SNAP_LEN as usize];
            let mut drained = false;
            for _ in 0..BATCH_MAX {
                // SAFETY: zeroed sockaddr_ll is a valid value to be filled.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut from_len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: the buffers are valid for their stated lengths.
                let n = unsafe {
                    libc::recvfrom(
                        self.socket.get_ref().as_raw_fd(),
                        frame.as_mut_ptr().cast(),
                        frame.len(),
                        // The frame's whole length, not what fits.
                        libc::MSG_TRUNC,
                        (&raw mut from).cast(),
                        &mut from_len,
                    )
                };
                if n < 0 {
                    let e = std::io::Error::last_os_error();
                    if e.kind() == std::io::ErrorKind::WouldBlock {
                        ready.clear_ready();
                        drained = true;
                        break;
                    }
                    return Err(e);
                }
                let ifindex = from.sll_ifindex as u32;
                // Our own outgoing frames (a reply, say) are not knocks.
                if from.sll_pkttype == libc::PACKET_OUTGOING || !self.ifindexes.contains(&ifindex) {
                    continue;
                }
                let wire_len = n as usize;
                if let Some(knock) = parse(&frame[..wire_len.min(frame.len())], wire_len, ifindex)
                    && admits(policy, &knock)
                {
                    knocks.push(knock);
                }
            }
            // A full batch returns even without knocks, so a flood of other
            // traffic cannot keep the daemon's loop from its other work.
            if !knocks.is_empty() || !drained {
                return Ok(knocks);
            }
        }
    }
}

/// Classic BPF: IPv4 or IPv6 (no extension headers), TCP or UDP, kept to
/// [`SNAP_LEN`] bytes; everything else never reaches the socket.
fn filter() -> Vec<libc::sock_filter> {
    let op = |code: u16, jt: u8, jf: u8, k: u32| libc::sock_filter { code, jt, jf, k };
    const LDH_ABS: u16 = 0x28;
    const LDB_ABS: u16 = 0x30;
    const JEQ_K: u16 = 0x15;
    const RET_K: u16 = 0x06;
    // Jumps are relative to the next instruction.
    vec![
        op(LDH_ABS, 0, 0, 12),     // 0: ethertype
        op(JEQ_K, 0, 2, 0x0800),   // 1: IPv4? else 4
        op(LDB_ABS, 0, 0, 23),     // 2: IPv4 protocol
        op(0x05, 0, 0, 2),         // 3: ja 6
        op(JEQ_K, 0, 4, 0x86dd),   // 4: IPv6? else drop (9)
        op(LDB_ABS, 0, 0, 20),     // 5: IPv6 next header
        op(JEQ_K, 1, 0, 6),        // 6: TCP -> accept (8)
        op(JEQ_K, 0, 1, 17),       // 7: UDP -> accept (8), else drop (9)
        op(RET_K, 0, 0, SNAP_LEN), // 8: accept
        op(RET_K, 0, 0, 0),        // 9: drop
    ]
}

/// A TCP or UDP packet in an Ethernet frame, as a [`Knock`] (not yet
/// judged); `None` for anything else or anything cut short. `frame` is what
/// the socket kept of it, `wire_len` the frame's length on the wire.
pub fn parse(frame: &[u8], wire_len: usize, ifindex: u32) -> Option<SeenKnock> {
    let ethertype = u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]);
    let ip = frame.get(14..)?;
    let (source, destination, proto, l4, ip_len) = match ethertype {
        0x0800 => {
            let ihl = usize::from(ip.first()? & 0x0f) * 4;
            if ip.first()? >> 4 != 4 || ihl < 20 {
                return None;
            }
            // A non-first fragment has no ports; a first one is no knock.
            let frag = u16::from_be_bytes([*ip.get(6)?, *ip.get(7)?]);
            if frag & 0x3fff != 0 {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([*ip.get(2)?, *ip.get(3)?]));
            let src: [u8; 4] = ip.get(12..16)?.try_into().ok()?;
            let dst: [u8; 4] = ip.get(16..20)?.try_into().ok()?;
            (
                IpAddr::V4(Ipv4Addr::from(src)),
                IpAddr::V4(Ipv4Addr::from(dst)),
                *ip.get(9)?,
                ihl,
                total,
            )
        }
        0x86dd => {
            if ip.first()? >> 4 != 6 {
                return None;
            }
            let payload = usize::from(u16::from_be_bytes([*ip.get(4)?, *ip.get(5)?]));
            let src: [u8; 16] = ip.get(8..24)?.try_into().ok()?;
            let dst: [u8; 16] = ip.get(24..40)?.try_into().ok()?;
            let (src, dst) = (Ipv6Addr::from(src), Ipv6Addr::from(dst));
            // As the ring buffer's decoder: an IPv4-mapped address in an
            // IPv6 packet would open a door for an IPv4 address.
            if src.to_ipv4_mapped().is_some() || dst.to_ipv4_mapped().is_some() {
                return None;
            }
            (
                IpAddr::V6(src),
                IpAddr::V6(dst),
                *ip.get(6)?,
                40,
                40 + payload,
            )
        }
        _ => return None,
    };
    let proto = Proto::from_number(proto)?;
    // A frame that does not hold its whole IP packet is one the stack
    // drops (a longer one is padding). What we kept of it may still be
    // shorter: SNAP_LEN keeps the headers and the captured payload only.
    if ip_len < l4 || wire_len < 14 + ip_len {
        return None;
    }
    let header = ip.get(l4..ip_len.min(ip.len()))?;
    let sport = u16::from_be_bytes([*header.first()?, *header.get(1)?]);
    let dport = u16::from_be_bytes([*header.get(2)?, *header.get(3)?]);
    let (tcp_flags, payload_len, payload) = match proto {
        Proto::Tcp => (*header.get(13)?, 0, Vec::new()),
        Proto::Udp => {
            let udp_len = usize::from(u16::from_be_bytes([*header.get(4)?, *header.get(5)?]));
            let payload_len = udp_len.checked_sub(8)?;
            // Longer than its IP packet: the stack drops it.
            if udp_len > ip_len - l4 {
                return None;
            }
            let captured = payload_len.min(KNOCK_PAYLOAD_MAX);
            (0, payload_len as u16, header.get(8..8 + captured)?.to_vec())
        }
    };
    Some(SeenKnock {
        at_ns: crate::maps::monotonic_ns(),
        source: SocketAddr::new(source, sport),
        destination: SocketAddr::new(destination, dport),
        proto,
        ifindex,
        tcp_flags,
        payload_len,
        payload,
    })
}

/// Whether the XDP program would have forwarded `knock` under `policy`: a
/// knock port; for TCP a bare SYN; on one-time knock ports, a knock's shape.
pub fn admits(policy: &PortPolicy, knock: &SeenKnock) -> bool {
    let flags = policy.get(knock.proto, knock.destination.port());
    if flags & policy::KNOCK == 0 {
        return false;
    }
    if knock.proto == Proto::Tcp {
        return knock.tcp_flags & 0x02 != 0 && knock.tcp_flags & 0x10 == 0;
    }
    if flags & policy::SHAPED == 0 {
        return true;
    }
    let p = &knock.payload;
    usize::from(knock.payload_len) == knock_wire::LEN
        && p.len() >= 4
        && p[0] == knock_wire::VERSION
        && (1..=knock_wire::KIND_MAX).contains(&p[1])
        && p[3] <= knock_wire::MAX_KNOCKS
        && p[2] < p[3]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn udp4(dport: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; 14];
        f[12..14].copy_from_slice(&0x0800u16.to_be_bytes());
        let total = 20 + 8 + payload.len();
        let mut ip = vec![
            0x45, 0, 0, 0, 0, 0, 0, 0, 64, 17, 0, 0, 198, 18, 0, 2, 198, 18, 0, 1,
        ];
        ip[2..4].copy_from_slice(&(total as u16).to_be_bytes());
        f.extend(ip);
        f.extend(40000u16.to_be_bytes());
        f.extend(dport.to_be_bytes());
        f.extend(((8 + payload.len()) as u16).to_be_bytes());
        f.extend([0, 0]);
        f.extend(payload);
        f
    }

    fn knock_payload() -> Vec<u8> {
        let mut p = vec![0u8; knock_wire::LEN];
        p[..4].copy_from_slice(&[knock_wire::VERSION, 1, 0, 3]);
        p
    }

    #[test]
    fn a_udp_knock_is_parsed_with_its_addresses_and_payload() {
        let frame = udp4(7001, &knock_payload());
        let k = parse(&frame, frame.len(), 3).unwrap();
        assert_eq!(k.source, "198.18.0.2:40000".parse().unwrap());
        assert_eq!(k.destination, "198.18.0.1:7001".parse().unwrap());
        assert_eq!(k.proto, Proto::Udp);
        assert_eq!(usize::from(k.payload_len), knock_wire::LEN);
        assert_eq!(k.payload, knock_payload());
        assert_eq!(k.ifindex, 3);
    }

    #[test]
    fn truncated_and_foreign_frames_are_not_knocks() {
        let frame = udp4(7001, &knock_payload());
        let whole = |f: &[u8]| parse(f, f.len(), 1);
        // Cut short on the wire: the stack would drop every one of them.
        for cut in 0..frame.len() {
            assert!(whole(&frame[..cut]).is_none(), "cut at {cut}");
        }
        let mut arp = frame.clone();
        arp[12..14].copy_from_slice(&0x0806u16.to_be_bytes());
        assert!(whole(&arp).is_none());
        let mut fragment = frame.clone();
        fragment[14 + 6] = 0x20; // more fragments
        assert!(whole(&fragment).is_none());
        // A UDP length past the IP packet.
        let mut long = frame.clone();
        long[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&500u16.to_be_bytes());
        assert!(whole(&long).is_none());
        // Ethernet padding past the IP packet is not the packet's.
        let mut padded = frame;
        padded.extend([0; 16]);
        assert_eq!(whole(&padded).unwrap().payload, knock_payload());
    }

    #[test]
    fn a_long_datagram_is_captured_up_to_what_the_ring_buffer_carries() {
        // The socket keeps SNAP_LEN bytes of a 300-byte datagram; the knock
        // carries its first KNOCK_PAYLOAD_MAX bytes and its real length,
        // as the XDP program's event would.
        let payload: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
        let frame = udp4(9000, &payload);
        let kept = &frame[..SNAP_LEN as usize];
        let k = parse(kept, frame.len(), 1).unwrap();
        assert_eq!(k.payload_len, 300);
        assert_eq!(k.payload, payload[..KNOCK_PAYLOAD_MAX]);
    }

    #[test]
    fn only_what_the_xdp_program_would_forward_is_admitted() {
        let mut policy = PortPolicy::empty();
        policy.set(
            Proto::Udp,
            7001,
            policy::PROTECTED | policy::KNOCK | policy::SHAPED,
        );
        policy.set(Proto::Udp, 9000, policy::PROTECTED | policy::KNOCK);
        policy.set(Proto::Udp, 22, policy::PROTECTED);
        let knock = |port, payload: &[u8]| {
            let frame = udp4(port, payload);
            parse(&frame, frame.len(), 1).unwrap()
        };
        assert!(admits(&policy, &knock(7001, &knock_payload())));
        assert!(!admits(&policy, &knock(7001, b"garbage")), "shape");
        let mut bad_index = knock_payload();
        bad_index[2] = 3;
        assert!(!admits(&policy, &knock(7001, &bad_index)), "index < count");
        assert!(
            admits(&policy, &knock(9000, b"anything")),
            "static: any payload"
        );
        assert!(
            !admits(&policy, &knock(22, &knock_payload())),
            "not a knock port"
        );
        assert!(
            !admits(&policy, &knock(7002, &knock_payload())),
            "no policy"
        );
    }

    #[test]
    fn no_frame_makes_the_parser_panic() {
        // Network input: random bytes, and random bytes behind a real
        // header, of every length and claimed wire length.
        let mut seed = 0x5eed_f00d_u64;
        let base = udp4(7001, &knock_payload());
        for round in 0..20_000 {
            let len = (crate::xorshift(&mut seed) % 200) as usize;
            let mut frame: Vec<u8> = (0..len).map(|_| crate::xorshift(&mut seed) as u8).collect();
            if round % 2 == 0 {
                let keep = base.len().min(len).min(14 + 20 + (round % 30));
                frame[..keep].copy_from_slice(&base[..keep]);
            }
            let wire_len = len + (crate::xorshift(&mut seed) % 3000) as usize;
            let _ = parse(&frame, wire_len, 1);
            let _ = parse(&frame, len, 1);
        }
    }

    #[test]
    fn the_filter_jumps_stay_inside_the_program() {
        let code = filter();
        for (i, op) in code.iter().enumerate() {
            if op.code & 0x07 == 0x05 {
                let (jt, jf) = if op.code == 0x05 {
                    (op.k as usize, op.k as usize)
                } else {
                    (usize::from(op.jt), usize::from(op.jf))
                };
                assert!(i + 1 + jt.max(jf) < code.len(), "jump out of bounds at {i}");
            }
        }
    }
}
