//! The XDP program's verdicts on crafted frames, through BPF_PROG_TEST_RUN:
//! the real program in the real kernel, with no interface attached.
//!
//! Every case asserts the returned action and that exactly one verdict
//! counter moved, by one; knock cases also check the event on the ring
//! buffer field by field.

use std::{net::IpAddr, time::Duration};

use aya::{
    maps::{MapData, RingBuf},
    programs::{TestRun as _, TestRunOptions},
};
use knockd::{
    events::{SeenKnock, decode},
    guard::{Guard, KernelLogLevel},
    maps::{Counters, GuardMaps, PortPolicy, Proto},
};
use knockd_common::{Counter, KNOCK_EVENTS_BYTES, KNOCK_PAYLOAD_MAX, KnockEvent, policy};
use knockd_tests::{
    frames::{self, ACK, DEST_OPTS, Ext, Flags, HOP_BY_HOP, ROUTING, SYN, SYN_ACK, eth4, eth6},
    require_privileges,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

const CLIENT4: [u8; 4] = [198, 18, 0, 2];
const OTHER4: [u8; 4] = [198, 18, 0, 3];
const SERVER4: [u8; 4] = [198, 18, 0, 1];
const CLIENT6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];
const SERVER6: [u8; 16] = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];

const SSH: u16 = 22;
const GRANT_RANGE: std::ops::RangeInclusive<u16> = 40000..=40010;
const KNOCK_UDP: u16 = 7000;
const KNOCK_TCP: u16 = 8000;
const PROTECTED_UDP: u16 = 5353;
const OPEN: u16 = 80;

/// The program loaded (not attached), its maps and its ring buffer.
struct Bench {
    guard: Guard,
    maps: GuardMaps,
    ring: RingBuf<MapData>,
}

impl Bench {
    fn new() -> Bench {
        let (mut guard, _logger) = Guard::load(KernelLogLevel::Warn).unwrap();
        let mut maps = GuardMaps::take(guard.ebpf_mut(), None).unwrap();
        let ring = knockd::maps::take_knock_events(guard.ebpf_mut()).unwrap();
        let mut policy_table = PortPolicy::empty();
        // SSH and the 40000s may be granted, as a static door's service
        // port and a grant range are.
        policy_table.set(Proto::Tcp, SSH, policy::PROTECTED | policy::ALLOWS);
        for port in GRANT_RANGE {
            policy_table.set(Proto::Tcp, port, policy::PROTECTED | policy::ALLOWS);
        }
        policy_table.set(Proto::Udp, PROTECTED_UDP, policy::PROTECTED);
        policy_table.set(Proto::Udp, KNOCK_UDP, policy::KNOCK | policy::PROTECTED);
        policy_table.set(Proto::Tcp, KNOCK_TCP, policy::KNOCK | policy::PROTECTED);
        maps.apply_port_policy(&policy_table).unwrap();
        maps.set_knock_rate(1_000_000, 1_000_000).unwrap();
        Bench { guard, maps, ring }
    }

    fn counters(&self) -> Counters {
        self.maps.counters().unwrap()
    }

    /// Runs the program once on `frame`; returns the action.
    fn run(&self, frame: &[u8]) -> u32 {
        self.run_repeat(frame, 1)
    }

    fn run_repeat(&self, frame: &[u8], repeat: u32) -> u32 {
        let mut out = vec![0u8; frame.len() + 256];
        let opts = TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            repeat,
            ..Default::default()
        };
        self.guard.program().test_run(opts).unwrap().return_value
    }

    /// Runs `frame` and asserts the action and that `reason`, and only
    /// `reason`, counted it.
    #[track_caller]
    fn expect(&self, frame: &[u8], reason: Counter) {
        let before = self.counters();
        let action = self.run(frame);
        let after = self.counters();
        let expected_action = if reason.passes() { XDP_PASS } else { XDP_DROP };
        assert_eq!(action, expected_action, "action for {}", reason.name());
        for counter in Counter::ALL {
            let delta = after.get(counter) - before.get(counter);
            let want = u64::from(counter == reason);
            assert_eq!(
                delta,
                want,
                "counter {} moved by {delta}, expected {want} ({} expected)",
                counter.name(),
                reason.name()
            );
        }
    }

    fn next_knock(&mut self) -> Option<SeenKnock> {
        self.ring.next().map(|record| decode(&record).unwrap())
    }

    /// Runs `frame`, expects a forwarded knock, and returns its event.
    #[track_caller]
    fn knock(&mut self, frame: &[u8]) -> SeenKnock {
        self.expect(frame, Counter::KnockForwarded);
        let knock = self.next_knock().expect("a knock event on the ring buffer");
        assert!(self.next_knock().is_none(), "exactly one event");
        knock
    }
}

fn v4_knock(payload: &[u8]) -> Vec<u8> {
    eth4(frames::ipv4(
        CLIENT4,
        SERVER4,
        frames::udp(40000, KNOCK_UDP, payload),
        &[],
        (false, 0),
    ))
}

/// A UDP datagram from the client to `dport`.
fn v4_udp(dport: u16, payload: &[u8]) -> Vec<u8> {
    eth4(frames::ipv4(
        CLIENT4,
        SERVER4,
        frames::udp(1234, dport, payload),
        &[],
        (false, 0),
    ))
}

fn v4_tcp(src: [u8; 4], dport: u16, flags: Flags) -> Vec<u8> {
    eth4(frames::ipv4(
        src,
        SERVER4,
        frames::tcp(41000, dport, flags),
        &[],
        (false, 0),
    ))
}

fn v6_tcp(dport: u16, flags: Flags) -> Vec<u8> {
    eth6(frames::ipv6(
        CLIENT6,
        SERVER6,
        &[],
        frames::tcp(41000, dport, flags),
    ))
}

fn ip(addr: [u8; 4]) -> IpAddr {
    IpAddr::from(addr)
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + 3) as u8).collect()
}

#[test]
fn ipv4_udp_knock_is_forwarded_with_its_fields() {
    require_privileges!();
    let mut bench = Bench::new();
    let knock = bench.knock(&v4_knock(b"open sesame"));
    assert_eq!(knock.source, "198.18.0.2:40000".parse().unwrap());
    assert_eq!(knock.destination, "198.18.0.1:7000".parse().unwrap());
    assert_eq!(knock.proto, Proto::Udp);
    assert_eq!(knock.tcp_flags, 0);
    assert_eq!(knock.payload_len, 11);
    assert_eq!(knock.payload, b"open sesame");
    let now = knockd::maps::monotonic_ns();
    assert!(knock.at_ns <= now && now - knock.at_ns < Duration::from_secs(5).as_nanos() as u64);
}

#[test]
fn ipv6_udp_knock_is_forwarded_with_its_fields() {
    require_privileges!();
    let mut bench = Bench::new();
    let frame = eth6(frames::ipv6(
        CLIENT6,
        SERVER6,
        &[],
        frames::udp(50000, KNOCK_UDP, b"v6"),
    ));
    let knock = bench.knock(&frame);
    assert_eq!(knock.source, "[2001:db8::2]:50000".parse().unwrap());
    assert_eq!(knock.destination, "[2001:db8::1]:7000".parse().unwrap());
    assert_eq!(
        (knock.payload_len, knock.payload.as_slice()),
        (2, &b"v6"[..])
    );
}

#[test]
fn tcp_syn_knock_is_forwarded_other_tcp_to_it_is_not() {
    require_privileges!();
    let mut bench = Bench::new();
    let knock = bench.knock(&v4_tcp(CLIENT4, KNOCK_TCP, SYN));
    assert_eq!(knock.proto, Proto::Tcp);
    assert_eq!(knock.destination.port(), KNOCK_TCP);
    assert_eq!(knock.tcp_flags & 0x12, 0x02, "SYN without ACK");
    assert_eq!((knock.payload_len, knock.payload.len()), (0, 0));
    bench.expect(&v4_tcp(CLIENT4, KNOCK_TCP, ACK), Counter::PassNotSyn);
    assert!(bench.next_knock().is_none());
}

#[test]
fn vlan_tagged_frames_are_judged_by_their_inner_headers() {
    require_privileges!();
    let mut bench = Bench::new();
    let knock_ip = frames::ipv4(
        CLIENT4,
        SERVER4,
        frames::udp(40000, KNOCK_UDP, b"tagged"),
        &[],
        (false, 0),
    );
    let knock = bench.knock(&frames::ether(
        &[frames::TPID_8021Q],
        frames::ETH_IPV4,
        &knock_ip,
    ));
    assert_eq!(knock.payload, b"tagged");
    let syn6 = frames::ipv6(CLIENT6, SERVER6, &[], frames::tcp(41000, SSH, SYN));
    let qinq = frames::ether(
        &[frames::TPID_8021AD, frames::TPID_8021Q],
        frames::ETH_IPV6,
        &syn6,
    );
    bench.expect(&qinq, Counter::DropProtected);
    let open4 = frames::ipv4(
        CLIENT4,
        SERVER4,
        frames::tcp(41000, OPEN, SYN),
        &[],
        (false, 0),
    );
    bench.expect(
        &frames::ether(&[frames::TPID_8021Q], frames::ETH_IPV4, &open4),
        Counter::PassUnprotected,
    );
    // A tag with nothing after it cannot be judged.
    bench.expect(
        &frames::ether(&[frames::TPID_8021Q], frames::ETH_IPV4, &[])[..16],
        Counter::DropMalformed,
    );
}

/// Issue 9, finding 1: a SYN inside three or more VLAN tags used to pass as
/// "not IP", and the kernel peeled the tags and completed the handshake.
/// Every depth the program walks is judged by the inner packet; deeper
/// stacks are dropped whatever they carry.
#[test]
fn vlan_stacks_are_walked_to_eight_tags_and_deeper_ones_dropped() {
    require_privileges!();
    let bench = Bench::new();
    let syn4 = frames::ipv4(
        CLIENT4,
        SERVER4,
        frames::tcp(41000, SSH, SYN),
        &[],
        (false, 0),
    );
    let syn6 = frames::ipv6(CLIENT6, SERVER6, &[], frames::tcp(41000, SSH, SYN));
    let open4 = frames::ipv4(
        CLIENT4,
        SERVER4,
        frames::tcp(41000, OPEN, SYN),
        &[],
        (false, 0),
    );
    let tpids = [frames::TPID_8021Q, frames::TPID_8021AD];
    for depth in 0..=12usize {
        for vid in [0u16, 42] {
            for outer in tpids {
                // Alternate the two TPIDs below the outermost tag.
                let tags: Vec<u16> = (0..depth)
                    .map(|i| if i == 0 { outer } else { tpids[i % 2] })
                    .collect();
                // Within the walk the inner packet decides; past it, even an
                // unprotected port or ARP is dropped: what is inside cannot
                // be known.
                let walked = depth <= 8;
                let judged = |inner| {
                    if walked {
                        inner
                    } else {
                        Counter::DropMalformed
                    }
                };
                for (ethertype, packet, inner) in [
                    (frames::ETH_IPV4, &syn4[..], Counter::DropProtected),
                    (frames::ETH_IPV6, &syn6[..], Counter::DropProtected),
                    (frames::ETH_IPV4, &open4[..], Counter::PassUnprotected),
                    (frames::ETH_ARP, &[0u8; 28][..], Counter::PassNotIp),
                ] {
                    bench.expect(
                        &frames::ether_vid(&tags, vid, ethertype, packet),
                        judged(inner),
                    );
                }
            }
        }
    }
}

#[test]
fn protected_ports_drop_new_connections_only() {
    require_privileges!();
    let bench = Bench::new();
    bench.expect(&v4_tcp(CLIENT4, SSH, SYN), Counter::DropProtected);
    bench.expect(&v4_tcp(CLIENT4, 40005, SYN), Counter::DropProtected);
    bench.expect(&v6_tcp(SSH, SYN), Counter::DropProtected);
    // Established flows and answers to our own connections pass to conntrack.
    bench.expect(&v4_tcp(CLIENT4, SSH, ACK), Counter::PassNotSyn);
    bench.expect(&v4_tcp(CLIENT4, SSH, SYN_ACK), Counter::PassNotSyn);
    bench.expect(&v6_tcp(SSH, ACK), Counter::PassNotSyn);
    let rst = Flags {
        rst: true,
        ..Flags::default()
    };
    bench.expect(&v4_tcp(CLIENT4, SSH, rst), Counter::PassNotSyn);
    // UDP has no handshake: every datagram to a protected port drops.
    let dgram = v4_udp(PROTECTED_UDP, b"x");
    bench.expect(&dgram, Counter::DropProtected);
    // Ports without policy, and the other protocol on a protected number, pass.
    bench.expect(&v4_tcp(CLIENT4, OPEN, SYN), Counter::PassUnprotected);
    bench.expect(&v4_tcp(CLIENT4, 40011, SYN), Counter::PassUnprotected);
    bench.expect(&v6_tcp(OPEN, SYN), Counter::PassUnprotected);
    let udp22 = eth4(frames::ipv4(
        CLIENT4,
        SERVER4,
        frames::udp(1234, SSH, b"x"),
        &[],
        (false, 0),
    ));
    bench.expect(&udp22, Counter::PassUnprotected);
}

#[test]
fn non_ip_and_other_protocols_pass() {
    require_privileges!();
    let bench = Bench::new();
    bench.expect(
        &frames::ether(&[], frames::ETH_ARP, &[0; 28]),
        Counter::PassNotIp,
    );
    let icmp = frames::ipv4(
        CLIENT4,
        SERVER4,
        (etherparse::IpNumber::ICMP, vec![8, 0, 0, 0, 0, 0, 0, 0]),
        &[],
        (false, 0),
    );
    bench.expect(&eth4(icmp), Counter::PassOtherProto);
    let icmp6 = frames::ipv6(
        CLIENT6,
        SERVER6,
        &[],
        (
            etherparse::IpNumber::IPV6_ICMP,
            vec![128, 0, 0, 0, 0, 0, 0, 0],
        ),
    );
    bench.expect(&eth6(icmp6), Counter::PassOtherProto);
}

#[test]
fn ipv4_options_shift_the_transport_header() {
    require_privileges!();
    let mut bench = Bench::new();
    // 12 bytes of options: NOPs and an end-of-list, the largest common case,
    // then the 40-byte maximum.
    for options in [vec![1u8; 12], vec![1u8; 40]] {
        let syn = frames::ipv4(
            CLIENT4,
            SERVER4,
            frames::tcp(41000, SSH, SYN),
            &options,
            (false, 0),
        );
        bench.expect(&eth4(syn), Counter::DropProtected);
        let knock = frames::ipv4(
            CLIENT4,
            SERVER4,
            frames::udp(40000, KNOCK_UDP, b"opts"),
            &options,
            (false, 0),
        );
        assert_eq!(bench.knock(&eth4(knock)).payload, b"opts");
    }
}

#[test]
fn ipv6_extension_headers_are_skipped() {
    require_privileges!();
    let mut bench = Bench::new();
    let exts = [
        Ext::Raw(HOP_BY_HOP, 6),
        Ext::Raw(DEST_OPTS, 14),
        Ext::Raw(ROUTING, 6),
    ];
    let knock = frames::ipv6(
        CLIENT6,
        SERVER6,
        &exts,
        frames::udp(50000, KNOCK_UDP, b"ext"),
    );
    let event = bench.knock(&eth6(knock));
    assert_eq!(event.payload, b"ext");
    assert_eq!(event.source.port(), 50000);
    let syn = frames::ipv6(CLIENT6, SERVER6, &exts, frames::tcp(41000, SSH, SYN));
    bench.expect(&eth6(syn), Counter::DropProtected);
    let open = frames::ipv6(CLIENT6, SERVER6, &exts, frames::tcp(41000, OPEN, SYN));
    bench.expect(&eth6(open), Counter::PassUnprotected);
}

#[test]
fn too_many_ipv6_extension_headers_fail_closed() {
    require_privileges!();
    let bench = Bench::new();
    // Six headers are within the bound; seven are not, whatever the port,
    // because the stack would still deliver what we could not see.
    let six = vec![Ext::Raw(DEST_OPTS, 6); 6];
    let syn = frames::ipv6(CLIENT6, SERVER6, &six, frames::tcp(41000, OPEN, SYN));
    bench.expect(&eth6(syn), Counter::PassUnprotected);
    let seven = vec![Ext::Raw(DEST_OPTS, 6); 7];
    let syn = frames::ipv6(CLIENT6, SERVER6, &seven, frames::tcp(41000, SSH, SYN));
    bench.expect(&eth6(syn), Counter::DropMalformed);
}

/// Headers are read only inside the IP packet as its length states it: a
/// first fragment holding 8 bytes of TCP (ports, sequence number), padded
/// in the frame with bytes that look like an ACK's flags, used to pass as
/// "not a SYN", while the real flags (SYN) came in the next fragment, which
/// passes unjudged, and the kernel reassembled a SYN to a protected port.
#[test]
fn headers_past_the_ip_length_are_not_judged() {
    require_privileges!();
    let bench = Bench::new();
    let ack = frames::tcp(41000, SSH, ACK).1;
    let syn = frames::tcp(41000, SSH, SYN).1;
    // IPv4: 8 bytes of a SYN's TCP header inside the packet, padded in the
    // frame with an ACK's bytes 8..20: as a first fragment (whose flags
    // would come from the next), and unfragmented (which the stack drops).
    for more_fragments in [true, false] {
        let mut padded = frames::ipv4(
            CLIENT4,
            SERVER4,
            (etherparse::IpNumber::TCP, syn[..8].to_vec()),
            &[],
            (more_fragments, 0),
        );
        padded.extend_from_slice(&ack[8..]);
        bench.expect(&eth4(padded), Counter::DropMalformed);
    }
    // A total length shorter than the header itself.
    let mut bad = v4_tcp(CLIENT4, SSH, SYN);
    bad[14 + 2..14 + 4].copy_from_slice(&19u16.to_be_bytes());
    bench.expect(&bad, Counter::DropMalformed);
    // An unprotected port needs only its ports inside the packet.
    let open = frames::ipv4(
        CLIENT4,
        SERVER4,
        (
            etherparse::IpNumber::TCP,
            frames::tcp(41000, OPEN, SYN).1[..8].to_vec(),
        ),
        &[],
        (true, 0),
    );
    bench.expect(&eth4(open), Counter::PassUnprotected);
    // Ethernet padding after a whole packet changes nothing.
    let mut padded = v4_tcp(CLIENT4, SSH, ACK);
    padded.extend_from_slice(&[0x02; 16]);
    bench.expect(&padded, Counter::PassNotSyn);
    // IPv6: the same tiny first fragment, and a payload length of 0.
    let mut tiny6 = frames::ipv6(
        CLIENT6,
        SERVER6,
        &[Ext::Fragment(0, true)],
        (etherparse::IpNumber::TCP, syn[..8].to_vec()),
    );
    tiny6.extend_from_slice(&ack[8..]);
    bench.expect(&eth6(tiny6), Counter::DropMalformed);
    let mut jumbo = frames::ipv6(CLIENT6, SERVER6, &[], frames::tcp(41000, SSH, ACK));
    jumbo[4..6].copy_from_slice(&0u16.to_be_bytes());
    bench.expect(&eth6(jumbo), Counter::DropMalformed);
    // A UDP length past the packet's end: dropped, no event.
    let mut knock = frames::ipv4(
        CLIENT4,
        SERVER4,
        frames::udp(40000, KNOCK_UDP, b"abcd"),
        &[],
        (false, 0),
    );
    knock.extend_from_slice(&[0; 8]);
    let udp_len = 8 + 4 + 8u16;
    knock[20 + 4..20 + 6].copy_from_slice(&udp_len.to_be_bytes());
    bench.expect(&eth4(knock), Counter::DropMalformed);
}

#[test]
fn fragments_are_judged_by_their_first_fragment() {
    require_privileges!();
    let mut bench = Bench::new();
    // IPv4: the first fragment carries the ports and is judged by them; a
    // later fragment has no ports and passes, useless without the first.
    let first = frames::ipv4(
        CLIENT4,
        SERVER4,
        frames::tcp(41000, SSH, SYN),
        &[],
        (true, 0),
    );
    bench.expect(&eth4(first), Counter::DropProtected);
    let first_open = frames::ipv4(
        CLIENT4,
        SERVER4,
        frames::udp(1, OPEN, &[0; 32]),
        &[],
        (true, 0),
    );
    bench.expect(&eth4(first_open), Counter::PassUnprotected);
    let later = frames::ipv4(
        CLIENT4,
        SERVER4,
        (etherparse::IpNumber::TCP, vec![0; 24]),
        &[],
        (false, 3),
    );
    bench.expect(&eth4(later), Counter::PassFragment);
    // A fragmented knock is dropped without an event.
    let knock_frag = frames::ipv4(
        CLIENT4,
        SERVER4,
        frames::udp(40000, KNOCK_UDP, &[1; 32]),
        &[],
        (true, 0),
    );
    bench.expect(&eth4(knock_frag), Counter::DropProtected);
    assert!(bench.next_knock().is_none());
    // IPv6, through the fragment header.
    let first6 = frames::ipv6(
        CLIENT6,
        SERVER6,
        &[Ext::Fragment(0, true)],
        frames::tcp(41000, SSH, SYN),
    );
    bench.expect(&eth6(first6), Counter::DropProtected);
    let later6 = frames::ipv6(
        CLIENT6,
        SERVER6,
        &[Ext::Fragment(5, false)],
        (etherparse::IpNumber::TCP, vec![0; 24]),
    );
    bench.expect(&eth6(later6), Counter::PassFragment);
    // An unfragmented packet with a fragment header (offset 0, no MF) is a
    // whole datagram: a knock.
    let atomic = frames::ipv6(
        CLIENT6,
        SERVER6,
        &[Ext::Fragment(0, false)],
        frames::udp(50000, KNOCK_UDP, b"atomic"),
    );
    assert_eq!(bench.knock(&eth6(atomic)).payload, b"atomic");
}

#[test]
fn truncated_and_garbage_headers_are_dropped() {
    require_privileges!();
    let bench = Bench::new();
    let syn = v4_tcp(CLIENT4, SSH, SYN);
    // An IPv4 ethertype and nothing after it. (Frames shorter than an
    // Ethernet header never reach XDP; BPF_PROG_TEST_RUN refuses them too.)
    bench.expect(&syn[..14], Counter::DropMalformed);
    // IPv4 header cut short.
    bench.expect(&syn[..14 + 12], Counter::DropMalformed);
    // Ports present, TCP flags missing: the port is protected, so it drops.
    bench.expect(&syn[..14 + 20 + 8], Counter::DropMalformed);
    // IPv6 header cut short.
    bench.expect(&v6_tcp(SSH, SYN)[..14 + 30], Counter::DropMalformed);
    // IHL below 5 words.
    let mut bad_ihl = syn.clone();
    bad_ihl[14] = 0x44;
    bench.expect(&bad_ihl, Counter::DropMalformed);
    // IPv4 ethertype, IPv6 version nibble.
    let mut bad_version = syn.clone();
    bad_version[14] = 0x65;
    bench.expect(&bad_version, Counter::DropMalformed);
    // IHL pointing past the end of the packet.
    let mut long_ihl = syn.clone();
    long_ihl[14] = 0x4f;
    bench.expect(&long_ihl, Counter::DropMalformed);
    // Random bytes after a valid Ethernet header, both families.
    let mut noise = knockd_tests::Noise::new(0x2545_f491_4f6c_dd1d);
    for ethertype in [frames::ETH_IPV4, frames::ETH_IPV6] {
        for len in [1usize, 19, 39, 60, 200] {
            let garbage = noise.bytes(len);
            let before = bench.counters().total();
            let action = bench.run(&frames::ether(&[], ethertype, &garbage));
            assert!(action == XDP_PASS || action == XDP_DROP);
            assert_eq!(
                bench.counters().total(),
                before + 1,
                "one verdict per packet"
            );
        }
    }
}

#[test]
fn knock_with_lying_udp_length_is_dropped_without_event() {
    require_privileges!();
    let mut bench = Bench::new();
    let mut frame = v4_knock(b"short");
    // UDP length claims 100 payload bytes; 5 are there.
    let udp_len = 14 + 20 + 4;
    frame[udp_len..udp_len + 2].copy_from_slice(&108u16.to_be_bytes());
    bench.expect(&frame, Counter::DropMalformed);
    // UDP length below the header size.
    frame[udp_len..udp_len + 2].copy_from_slice(&4u16.to_be_bytes());
    bench.expect(&frame, Counter::DropMalformed);
    assert!(bench.next_knock().is_none());
}

#[test]
fn knock_payload_sizes_from_empty_to_jumbo() {
    require_privileges!();
    let mut bench = Bench::new();
    for len in [0usize, 1, 63, 64, 127, 128, 129, 1472, 2000] {
        let data = payload(len);
        let knock = bench.knock(&v4_knock(&data));
        assert_eq!(knock.payload_len as usize, len, "payload_len for {len}");
        let captured = len.min(KNOCK_PAYLOAD_MAX);
        assert_eq!(knock.payload, &data[..captured], "payload bytes for {len}");
    }
}

#[test]
fn allow_map_admits_exactly_its_source_port_and_protocol() {
    require_privileges!();
    let mut bench = Bench::new();
    bench
        .maps
        .allow(ip(CLIENT4), Proto::Tcp, SSH, None)
        .unwrap();
    bench.expect(&v4_tcp(CLIENT4, SSH, SYN), Counter::PassGranted);
    bench.expect(&v4_tcp(OTHER4, SSH, SYN), Counter::DropProtected);
    bench.expect(&v4_tcp(CLIENT4, 40001, SYN), Counter::DropProtected);
    let udp = v4_udp(PROTECTED_UDP, b"");
    bench.expect(&udp, Counter::DropProtected);
    // IPv6 grants are separate entries.
    bench.expect(&v6_tcp(SSH, SYN), Counter::DropProtected);
    bench
        .maps
        .allow(IpAddr::from(CLIENT6), Proto::Tcp, SSH, None)
        .unwrap();
    bench.expect(&v6_tcp(SSH, SYN), Counter::PassGranted);
    // Revoked: dropped again.
    bench.maps.revoke(ip(CLIENT4), Proto::Tcp, SSH).unwrap();
    bench.expect(&v4_tcp(CLIENT4, SSH, SYN), Counter::DropProtected);
}

/// An allow entry counts only on a port the policy says may be granted: a
/// one-time door's service port or knock range never is, and drops without
/// looking.
#[test]
fn allow_entries_count_only_where_the_policy_allows_grants() {
    require_privileges!();
    let mut bench = Bench::new();
    bench
        .maps
        .allow(ip(CLIENT4), Proto::Udp, PROTECTED_UDP, None)
        .unwrap();
    let udp = v4_udp(PROTECTED_UDP, b"");
    bench.expect(&udp, Counter::DropProtected);
    let mut table = bench.maps.policy().clone();
    table.set(
        Proto::Udp,
        PROTECTED_UDP,
        policy::PROTECTED | policy::ALLOWS,
    );
    bench.maps.apply_port_policy(&table).unwrap();
    bench.expect(&udp, Counter::PassGranted);
}

#[test]
fn expired_grants_are_refused_by_the_kernel_itself() {
    require_privileges!();
    let mut bench = Bench::new();
    bench
        .maps
        .allow(
            ip(CLIENT4),
            Proto::Tcp,
            40002,
            Some(Duration::from_millis(300)),
        )
        .unwrap();
    bench.expect(&v4_tcp(CLIENT4, 40002, SYN), Counter::PassGranted);
    std::thread::sleep(Duration::from_millis(400));
    bench.expect(&v4_tcp(CLIENT4, 40002, SYN), Counter::DropProtected);
}

#[test]
fn rate_limit_caps_each_source_separately() {
    require_privileges!();
    let mut bench = Bench::new();
    // One knock a second on average, bursts of three.
    bench.maps.set_knock_rate(1, 3).unwrap();
    let from = |src: [u8; 4]| {
        eth4(frames::ipv4(
            src,
            SERVER4,
            frames::udp(40000, KNOCK_UDP, b"k"),
            &[],
            (false, 0),
        ))
    };
    for _ in 0..3 {
        bench.knock(&from(CLIENT4));
    }
    for _ in 0..5 {
        bench.expect(&from(CLIENT4), Counter::KnockRateLimited);
    }
    assert!(bench.next_knock().is_none());
    // Another source has its own bucket.
    let other = bench.knock(&from(OTHER4));
    assert_eq!(other.source.ip(), ip(OTHER4));
    // A rate of zero forwards nothing.
    bench.maps.set_knock_rate(0, 0).unwrap();
    bench.expect(&from([198, 18, 0, 9]), Counter::KnockRateLimited);
}

/// IPv6 sources share a bucket per /64: one host holds a whole /64, and a
/// bucket per address let it knock from as many sources as it liked.
#[test]
fn ipv6_sources_share_a_bucket_per_slash_64() {
    require_privileges!();
    let mut bench = Bench::new();
    bench.maps.set_knock_rate(1, 3).unwrap();
    let from = |src: [u8; 16]| {
        eth6(frames::ipv6(
            src,
            SERVER6,
            &[],
            frames::udp(40000, KNOCK_UDP, b"k"),
        ))
    };
    let host = |net: u8, host: u16| -> [u8; 16] {
        let mut a = [0x20, 0x01, 0x0d, 0xb8, 0, net, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        a[8..10].copy_from_slice(&host.to_be_bytes());
        a[15] = host as u8;
        a
    };
    // Three addresses of one /64 spend one burst of three.
    for i in 0..3 {
        bench.knock(&from(host(1, 100 + i)));
    }
    for i in 0..5 {
        bench.expect(&from(host(1, 200 + i)), Counter::KnockRateLimited);
    }
    // The next /64 has its own bucket, and so does an IPv4 address.
    let other = bench.knock(&from(host(2, 7)));
    assert_eq!(
        other.source.ip(),
        IpAddr::from(host(2, 7)),
        "the event names the full address"
    );
    bench.knock(&v4_knock(b"v4"));
}

/// On a one-time knock port (SHAPED) only a datagram shaped like a knock
/// reaches the ring buffer: 68 bytes, version 1, kind 1-3, index < count
/// <= 16. Garbage is dropped in the kernel without spending a token.
#[test]
fn one_time_knock_ports_forward_only_knock_shaped_datagrams() {
    require_privileges!();
    let mut bench = Bench::new();
    const SHAPED_PORT: u16 = 7100;
    let mut table = PortPolicy::empty();
    table.set(
        Proto::Udp,
        SHAPED_PORT,
        policy::KNOCK | policy::PROTECTED | policy::SHAPED,
    );
    table.set(Proto::Udp, KNOCK_UDP, policy::KNOCK | policy::PROTECTED);
    bench.maps.apply_port_policy(&table).unwrap();
    // A burst of one: garbage must not spend it.
    bench.maps.set_knock_rate(1, 1).unwrap();
    let datagram = |payload: &[u8]| {
        eth4(frames::ipv4(
            CLIENT4,
            SERVER4,
            frames::udp(40000, SHAPED_PORT, payload),
            &[],
            (false, 0),
        ))
    };
    let shaped = |version: u8, kind: u8, index: u8, count: u8| {
        let mut p = vec![0u8; 68];
        p[..4].copy_from_slice(&[version, kind, index, count]);
        p
    };
    for garbage in [
        vec![],
        vec![1u8; 10],
        vec![1u8; 67],
        vec![1u8; 69],
        vec![7u8; 500],
        shaped(2, 1, 0, 3),
        shaped(1, 0, 0, 3),
        shaped(1, 4, 0, 3),
        shaped(1, 1, 3, 3),
        shaped(1, 1, 0, 0),
        shaped(1, 1, 0, 17),
    ] {
        bench.expect(&datagram(&garbage), Counter::KnockMalformed);
    }
    assert!(
        bench.next_knock().is_none(),
        "garbage never reaches userspace"
    );
    // The burst of one is still there for a real knock.
    bench.knock(&datagram(&shaped(1, 1, 0, 1)));
    bench.maps.set_knock_rate(1_000_000, 1_000_000).unwrap();
    for kind in 1..=3 {
        let event = bench.knock(&datagram(&shaped(1, kind, 15, 16)));
        assert_eq!(event.payload.len(), 68);
    }
    // A knock port without SHAPED (a static sequence's) takes any payload.
    bench.knock(&v4_knock(b"static"));
}

#[test]
fn a_full_ring_buffer_counts_lost_events_and_still_drops() {
    require_privileges!();
    let mut bench = Bench::new();
    // Each record takes the event plus an 8-byte header, rounded to 8.
    let record = (std::mem::size_of::<KnockEvent>() + 8).next_multiple_of(8);
    let capacity = KNOCK_EVENTS_BYTES as usize / record;
    let runs = capacity as u32 + 500;
    let before = bench.counters();
    let action = bench.run_repeat(&v4_knock(b"flood"), runs);
    assert_eq!(action, XDP_DROP);
    let after = bench.counters();
    let forwarded = after.get(Counter::KnockForwarded) - before.get(Counter::KnockForwarded);
    let lost = after.get(Counter::KnockEventLost) - before.get(Counter::KnockEventLost);
    assert_eq!(forwarded + lost, u64::from(runs));
    assert_eq!(
        forwarded, capacity as u64,
        "the ring holds {capacity} records"
    );
    assert_eq!(lost, 500);
    let mut drained = 0;
    while bench.next_knock().is_some() {
        drained += 1;
    }
    assert_eq!(drained, capacity);
    // Drained, it takes events again.
    bench.knock(&v4_knock(b"after"));
}

#[test]
fn syns_to_a_granted_port_from_others_are_counted_as_probes() {
    require_privileges!();
    let mut bench = Bench::new();
    let mut table = PortPolicy::empty();
    table.set(Proto::Tcp, 40003, policy::PROTECTED | policy::ALLOWS);
    table.mark_granted([40003]);
    table.set(Proto::Tcp, SSH, policy::PROTECTED);
    bench.maps.apply_port_policy(&table).unwrap();
    bench
        .maps
        .allow(ip(CLIENT4), Proto::Tcp, 40003, None)
        .unwrap();
    bench.expect(&v4_tcp(CLIENT4, 40003, SYN), Counter::PassGranted);
    bench.expect(&v4_tcp(OTHER4, 40003, SYN), Counter::DropProtected);
    bench.expect(&v4_tcp(OTHER4, 40003, SYN), Counter::DropProtected);
    // A protected port that no grant uses is not probed, just closed.
    bench.expect(&v4_tcp(OTHER4, SSH, SYN), Counter::DropProtected);
    bench.expect(&v4_tcp(OTHER4, 40003, ACK), Counter::PassNotSyn);
    assert_eq!(bench.maps.drain_probes().unwrap(), [(40003, 2)]);
    assert!(bench.maps.drain_probes().unwrap().is_empty(), "drained");
}

/// A dark host's policy, as the daemon computes it from its configuration:
/// a bare SYN to any port no rule names drops (counted apart as
/// `drop_closed`), the rest of the handshake and public ports pass, and UDP
/// is left to nftables, which can tell a reply from a probe.
#[test]
fn a_dark_host_drops_syns_to_every_port_no_rule_names() {
    require_privileges!();
    let mut bench = Bench::new();
    let config = knockd::config::Config::parse(
        "interfaces: [eth0]\nclosed_ports: drop\npublic: { tcp: [443] }\n\
         doors: { ssh: { service_port: 22, grant_ports: \"40000-40015\" } }\n",
        std::path::Path::new("dark.yaml"),
    )
    .unwrap();
    let table = knockd::policy::port_policy(&config, &Default::default());
    bench.maps.apply_port_policy(&table).unwrap();
    for port in [OPEN, 1, 8080, 65535] {
        bench.expect(&v4_tcp(CLIENT4, port, SYN), Counter::DropClosed);
        bench.expect(&v4_tcp(CLIENT4, port, ACK), Counter::PassNotSyn);
        bench.expect(&v4_tcp(CLIENT4, port, SYN_ACK), Counter::PassNotSyn);
    }
    bench.expect(&v6_tcp(OPEN, SYN), Counter::DropClosed);
    bench.expect(&v4_tcp(CLIENT4, 443, SYN), Counter::PassUnprotected);
    bench.expect(&v6_tcp(443, SYN), Counter::PassUnprotected);
    // Named ports keep their own reason.
    bench.expect(&v4_tcp(CLIENT4, SSH, SYN), Counter::DropProtected);
    bench.expect(&v4_tcp(CLIENT4, 40005, SYN), Counter::DropProtected);
    bench.expect(&v4_udp(OPEN, b"x"), Counter::PassUnprotected);
}

/// A datagram shaped like a one-time knock, to a port of a knock range
/// that no sequence uses now (what a wrong key or a wrong clock sends), is
/// dropped like any other, but counted apart so the operator can see it;
/// garbage to the same port is a plain protected drop.
#[test]
fn knock_shaped_datagrams_to_unused_range_ports_are_counted() {
    require_privileges!();
    let mut bench = Bench::new();
    let config = knockd::config::Config::parse(
        "interfaces: [eth0]\ndoors: { ssh: { service_port: 22 } }\n",
        std::path::Path::new("range.yaml"),
    )
    .unwrap();
    let table = knockd::policy::port_policy(&config, &Default::default());
    bench.maps.apply_port_policy(&table).unwrap();
    let mut shaped = vec![0u8; knockd_common::knock_wire::LEN];
    shaped[..4].copy_from_slice(&[1, 1, 0, 3]);
    for port in [7000, 7100, 7999] {
        bench.expect(&v4_udp(port, &shaped), Counter::KnockUnmatched);
        bench.expect(&v4_udp(port, b"garbage"), Counter::DropProtected);
    }
    let mut bad_version = shaped.clone();
    bad_version[0] = 2;
    bench.expect(&v4_udp(7100, &bad_version), Counter::DropProtected);
    bench.expect(&v4_udp(8000, &shaped), Counter::PassUnprotected);
}
