//! The adversarial suite (SPEC R-Q-4, issue 9): a live daemon in network
//! namespaces, attacked the way a stranger would, with tools and frames this
//! repository's client never sends.
//!
//! The gates, checked by every test that applies:
//! - 0 probes answered from a protected port, the grant range or a knock
//!   port (no RST, no SYN-ACK, no ICMP), whatever the flags or the shape;
//! - 0 connections accepted without a grant (the services count accepts);
//! - the legitimate client succeeds every time;
//! - the daemon stays up, with an RSS under 64 MiB.
//!
//! Each test also runs a control against an unprotected closed port, which
//! must answer: a probe that nothing answers proves nothing if the stack
//! would have dropped it anyway (a bad checksum, say).

use std::{
    net::{IpAddr, SocketAddr, TcpListener},
    process::Command,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use etherparse::{IpNumber, Ipv4Header, Ipv6Header, TcpHeader};
use knockd::proto::Kind;
use knockd_tests::{
    Daemon, addrs,
    bed::{Bed, SILENCE},
    capture::Capture,
    frames::{self, Ext},
    probe::{self, Outcome},
    require_privileges, sh,
};

/// The one-time door's service port (from the bed), its grant range and
/// knock range.
const SSH: u16 = 22;
const GRANT_RANGE: (u16, u16) = (40000, 40015);
/// A static door's service port, and its sequence's ports.
const LEGACY: u16 = 2222;
const LEGACY_TCP_KNOCK: u16 = 6001;
/// `protect` ports.
const PROTECTED_TCP: u16 = 8080;
const PROTECTED_UDP: u16 = 5353;
/// Unprotected, and nothing listens: the stack answers it (the control).
const CLOSED: u16 = 9999;
const METRICS: u16 = 9464;

/// The TCP ports nothing may answer without a grant.
/// Protected TCP ports a stranger's probes must never get an answer from;
/// `silent_tcp` adds a port of the grant range that no grant holds.
const SILENT_TCP: [u16; 4] = [SSH, LEGACY, PROTECTED_TCP, LEGACY_TCP_KNOCK];

/// [`SILENT_TCP`] and a grant-range port other than `granted` (the client's
/// own grant answers it, rightly: a fixed choice collided once in 16 runs).
fn silent_tcp(granted: u16) -> Vec<u16> {
    let free = if granted == 40005 { 40006 } else { 40005 };
    SILENT_TCP.iter().copied().chain([free]).collect()
}

/// Counts the connections a listener accepts, and echoes.
fn counting_server(addr: SocketAddr) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let listener = {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        if addr.is_ipv6() {
            socket.set_only_v6(true).unwrap();
        }
        socket.bind(&addr.into()).unwrap();
        socket.listen(1024).unwrap();
        TcpListener::from(socket)
    };
    let counter = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stream.is_ok() {
                counter.fetch_add(1, Ordering::SeqCst);
            }
        }
    });
    count
}

/// A bed with a one-time door (22), a static door (2222), `protect`
/// ports, the metrics endpoint, and services counting their accepts on
/// 2222 and 8080 (the bed's echo service holds 22).
struct Scene {
    bed: Bed,
    daemon: Daemon,
    accepts: Vec<(u16, Arc<AtomicUsize>)>,
}

impl Scene {
    fn new(v6: bool) -> Scene {
        let bed = Bed::new(v6);
        let server = bed.server;
        let accepts = bed.testbed.server.run(|| {
            [LEGACY, PROTECTED_TCP]
                .map(|port| (port, counting_server(SocketAddr::new(server, port))))
                .to_vec()
        });
        let config = format!(
            "{}protect: {{ tcp: [{PROTECTED_TCP}], udp: [{PROTECTED_UDP}] }}\n\
             metrics: {{ listen: \"127.0.0.1:{METRICS}\" }}\n",
            bed.config(&format!(
                ", grant_ports: \"{}-{}\" }}, legacy: {{ service_port: {LEGACY}, mode: static, \
                 sequence: [\"6000:udp\", \"{LEGACY_TCP_KNOCK}:tcp\", \"6002:udp\"]",
                GRANT_RANGE.0, GRANT_RANGE.1
            )),
        );
        let daemon = Daemon::start(&bed.testbed.server, &config);
        Scene {
            bed,
            daemon,
            accepts,
        }
    }

    fn v6(&self) -> bool {
        self.bed.server.is_ipv6()
    }

    /// No service accepted a connection.
    #[track_caller]
    fn assert_no_accepts(&self) {
        for (port, count) in &self.accepts {
            assert_eq!(count.load(Ordering::SeqCst), 0, "port {port} accepted");
        }
    }

    /// The daemon runs, and its RSS is under 64 MiB.
    #[track_caller]
    fn assert_daemon_healthy(&mut self) -> u64 {
        self.daemon.assert_running();
        let rss = rss_kib(self.daemon.pid());
        assert!(rss < 64 * 1024, "daemon RSS {rss} KiB");
        rss
    }

    /// The legitimate client opens the one-time door and talks through it.
    #[track_caller]
    fn legitimate_open(&self) {
        self.bed.open_and_connect();
    }
}

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// The MAC address of `ifname` in the namespace `ns`.
fn mac(ns: &knockd_tests::NetNs, ifname: &str) -> [u8; 6] {
    let out = ns.ip(&["-j", "link", "show", "dev", ifname]);
    let links: serde_json::Value = serde_json::from_str(&out).unwrap();
    let text = links[0]["address"].as_str().unwrap();
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16).unwrap())
        .collect();
    bytes.try_into().unwrap()
}

/// Builds frames from the client's side of the veth to the server, with
/// real checksums (the stack checks them; a probe it discards for a bad
/// checksum would be silent for the wrong reason).
struct Forge {
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
}

/// The TCP flag bits, FIN (0x01) to CWR (0x80).
fn tcp_header(sport: u16, dport: u16, flags: u8) -> TcpHeader {
    let mut tcp = TcpHeader::new(sport, dport, 0x1000_0000, 64240);
    tcp.fin = flags & 0x01 != 0;
    tcp.syn = flags & 0x02 != 0;
    tcp.rst = flags & 0x04 != 0;
    tcp.psh = flags & 0x08 != 0;
    tcp.ack = flags & 0x10 != 0;
    tcp.urg = flags & 0x20 != 0;
    tcp.ece = flags & 0x40 != 0;
    tcp.cwr = flags & 0x80 != 0;
    if tcp.ack {
        tcp.acknowledgment_number = 0x2000_0000;
    }
    tcp
}

fn octets4(ip: IpAddr) -> [u8; 4] {
    match ip {
        IpAddr::V4(v4) => v4.octets(),
        IpAddr::V6(_) => panic!("not IPv4"),
    }
}

fn octets6(ip: IpAddr) -> [u8; 16] {
    match ip {
        IpAddr::V6(v6) => v6.octets(),
        IpAddr::V4(_) => panic!("not IPv6"),
    }
}

impl Forge {
    fn new(scene: &Scene) -> Forge {
        let tb = &scene.bed.testbed;
        Forge {
            src_mac: mac(&tb.client, &tb.client_if),
            dst_mac: mac(&tb.server, &tb.server_if),
        }
    }

    /// An Ethernet frame around `ip`, inside `tags` VLAN tags of `vid`
    /// (each TPID given, outermost first).
    fn ether(&self, tags: &[u16], vid: u16, ethertype: u16, ip: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&self.dst_mac);
        out.extend_from_slice(&self.src_mac);
        for tpid in tags {
            out.extend_from_slice(&tpid.to_be_bytes());
            out.extend_from_slice(&vid.to_be_bytes());
        }
        out.extend_from_slice(&ethertype.to_be_bytes());
        out.extend_from_slice(ip);
        out
    }

    /// An IPv4 packet carrying `tcp` (no payload), with `options`.
    fn ipv4_tcp(&self, src: IpAddr, dst: IpAddr, mut tcp: TcpHeader, options: &[u8]) -> Vec<u8> {
        let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, octets4(src), octets4(dst)).unwrap();
        // Each datagram its own id, so fragments of different probes never
        // meet in the kernel's reassembly queue.
        static ID: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(1);
        ip.identification = ID.fetch_add(1, Ordering::SeqCst);
        ip.options = options.try_into().unwrap();
        ip.set_payload_len(tcp.header_len()).unwrap();
        tcp.checksum = tcp.calc_checksum_ipv4(&ip, &[]).unwrap();
        ip.header_checksum = ip.calc_header_checksum();
        let mut out = Vec::new();
        ip.write(&mut out).unwrap();
        tcp.write(&mut out).unwrap();
        out
    }

    /// An IPv6 packet carrying `tcp` after the extension headers `exts`.
    fn ipv6_tcp(&self, src: IpAddr, dst: IpAddr, mut tcp: TcpHeader, exts: &[Ext]) -> Vec<u8> {
        let base = Ipv6Header {
            source: octets6(src),
            destination: octets6(dst),
            next_header: IpNumber::TCP,
            hop_limit: 64,
            payload_length: tcp.header_len() as u16,
            ..Default::default()
        };
        tcp.checksum = tcp.calc_checksum_ipv6(&base, &[]).unwrap();
        let mut bytes = Vec::new();
        tcp.write(&mut bytes).unwrap();
        frames::ipv6(octets6(src), octets6(dst), exts, (IpNumber::TCP, bytes))
    }

    /// A TCP segment with `flags` from `src` to `dst:dport`, untagged.
    fn tcp(&self, src: IpAddr, dst: IpAddr, sport: u16, dport: u16, flags: u8) -> Vec<u8> {
        let tcp = tcp_header(sport, dport, flags);
        if dst.is_ipv4() {
            self.ether(&[], 0, 0x0800, &self.ipv4_tcp(src, dst, tcp, &[]))
        } else {
            self.ether(&[], 0, 0x86dd, &self.ipv6_tcp(src, dst, tcp, &[]))
        }
    }
}

/// What answered: (source port, what) of every TCP segment or ICMP error
/// that came back from the server.
fn answers(capture: &Capture) -> Vec<(u16, String)> {
    let frames = capture.incoming(|_| true);
    let mut out = Vec::new();
    for frame in frames {
        let Ok(sliced) = etherparse::SlicedPacket::from_ethernet(&frame) else {
            continue;
        };
        match sliced.transport {
            Some(etherparse::TransportSlice::Tcp(tcp)) => out.push((
                tcp.source_port(),
                format!(
                    "TCP{}{}",
                    if tcp.rst() { " RST" } else { "" },
                    if tcp.syn() { " SYN" } else { "" }
                ),
            )),
            Some(etherparse::TransportSlice::Icmpv4(icmp)) if icmp.type_u8() == 3 => {
                out.push((0, "ICMP unreachable".into()))
            }
            Some(etherparse::TransportSlice::Icmpv6(icmp)) if icmp.type_u8() == 1 => {
                out.push((0, "ICMPv6 unreachable".into()))
            }
            _ => {}
        }
    }
    out
}

fn every_tcp_flag_combination_gets_no_answer(v6: bool) {
    let mut scene = Scene::new(v6);
    let forge = Forge::new(&scene);
    let tb = &scene.bed.testbed;
    let (server, client, other) = addrs::family(v6);
    let capture = Capture::start(&tb.client, &tb.client_if);
    // The legitimate client holds a grant; the stranger probes its port.
    let answer = scene.bed.knock(&scene.bed.socket(), Kind::Open);
    let granted = answer.reply.port;
    let mut probes = Vec::new();
    let mut sport = 20000;
    for flags in 0..=255u8 {
        for port in silent_tcp(granted) {
            sport += 1;
            probes.push(forge.tcp(client, server, sport, port, flags));
        }
        sport += 1;
        probes.push(forge.tcp(other, server, sport, granted, flags));
    }
    let _ = capture.incoming(|_| true);
    capture.send(&probes, Duration::ZERO);
    std::thread::sleep(SILENCE);
    let answered = answers(&capture);
    assert!(
        answered.is_empty(),
        "{} of {} probes answered: {:?}",
        answered.len(),
        probes.len(),
        &answered[..answered.len().min(20)]
    );
    scene.assert_no_accepts();
    // The control: the same probes to a closed, unprotected port are
    // answered with a RST, each one without RST of its own.
    let control: Vec<Vec<u8>> = (0..=255u8)
        .map(|flags| forge.tcp(client, server, 30000 + u16::from(flags), CLOSED, flags))
        .collect();
    capture.send(&control, Duration::ZERO);
    std::thread::sleep(Duration::from_millis(300));
    let answered = answers(&capture);
    assert!(
        answered.len() >= 100 && answered.iter().all(|(port, _)| *port == CLOSED),
        "the control port answered {} of 256: {:?}",
        answered.len(),
        &answered[..answered.len().min(10)]
    );
    // And the holder still gets through.
    assert_eq!(scene.bed.connect(granted).0, Outcome::Answered);
    let rss = scene.assert_daemon_healthy();
    eprintln!(
        "gate: 0 of {} flag probes answered; control answered {} of 256; rss {rss} KiB",
        probes.len(),
        answered.len()
    );
}

#[test]
fn every_tcp_flag_combination_gets_no_answer_v4() {
    require_privileges!();
    every_tcp_flag_combination_gets_no_answer(false);
}

#[test]
fn every_tcp_flag_combination_gets_no_answer_v6() {
    require_privileges!();
    every_tcp_flag_combination_gets_no_answer(true);
}

/// nmap's port states from its greppable output: (port, proto, state).
fn nmap(scene: &Scene, args: &[&str], ports: &str) -> Vec<(u16, String, String)> {
    let server = scene.bed.server.to_string();
    let mut cmd = scene.bed.testbed.client.command("nmap");
    cmd.args([
        "-n",
        "-Pn",
        "--max-retries",
        "1",
        "--max-rtt-timeout",
        "300ms",
    ])
    .args(["--host-timeout", "120s", "-oG", "-", "-p", ports])
    .args(args);
    if scene.v6() {
        cmd.arg("-6");
    }
    let scan = knockd_tests::nmap::parse(&sh(cmd.arg(&server)));
    assert!(
        !scan.ports.is_empty(),
        "nmap listed no ports: {}",
        scan.line
    );
    scan.ports
}

fn nmap_finds_nothing_with_any_scan_type(v6: bool) {
    let mut scene = Scene::new(v6);
    let tcp_ports = format!(
        "T:{SSH},{LEGACY},{PROTECTED_TCP},{LEGACY_TCP_KNOCK},{}-{},{CLOSED}",
        GRANT_RANGE.0, GRANT_RANGE.1
    );
    // (scan, states a silent port may show, states the control shows)
    let scans: [(&[&str], &[&str], &[&str]); 11] = [
        (&["-sS"], &["filtered"], &["closed"]),
        (&["-sT"], &["filtered"], &["closed"]),
        (&["-sA"], &["filtered"], &["unfiltered"]),
        (&["-sW"], &["filtered"], &["closed", "open"]),
        (&["-sM"], &["open|filtered"], &["closed"]),
        (&["-sF"], &["open|filtered"], &["closed"]),
        (&["-sN"], &["open|filtered"], &["closed"]),
        (&["-sX"], &["open|filtered"], &["closed"]),
        (&["--scanflags", "SYNFIN"], &["filtered"], &["closed"]),
        (&["--scanflags", "URGPSHFIN"], &["filtered"], &["closed"]),
        (&["--scanflags", "SYNACKECE"], &["filtered"], &["closed"]),
    ];
    let mut probed = 0;
    for (scan, silent, control) in scans {
        for (port, _, state) in nmap(&scene, scan, &tcp_ports) {
            probed += 1;
            let allowed = if port == CLOSED { control } else { silent };
            assert!(
                allowed.contains(&state.as_str()),
                "nmap {scan:?}: port {port} is {state}, expected one of {allowed:?}"
            );
        }
    }
    // UDP: the protected port, the static door's UDP knocks and a stretch
    // of the knock range; the control answers with ICMP (closed).
    let udp_ports = format!("U:{PROTECTED_UDP},6000,6002,7000-7010,{CLOSED}");
    for (port, _, state) in nmap(&scene, &["-sU"], &udp_ports) {
        probed += 1;
        let allowed: &[&str] = if port == CLOSED {
            &["closed"]
        } else {
            &["open|filtered"]
        };
        assert!(
            allowed.contains(&state.as_str()),
            "nmap -sU: port {port} is {state}, expected one of {allowed:?}"
        );
    }
    assert!(probed >= 11 * 21 + 15);
    scene.assert_no_accepts();
    scene.legitimate_open();
    let rss = scene.assert_daemon_healthy();
    eprintln!(
        "gate: {probed} nmap port results, none open, closed or unfiltered but the control; rss {rss} KiB"
    );
}

#[test]
fn nmap_finds_nothing_with_any_scan_type_v4() {
    require_privileges!();
    nmap_finds_nothing_with_any_scan_type(false);
}

#[test]
fn nmap_finds_nothing_with_any_scan_type_v6() {
    require_privileges!();
    nmap_finds_nothing_with_any_scan_type(true);
}

/// A TCP segment split into IPv4 fragments at byte `cut` of the segment,
/// each with its own header and checksum: (first, second).
fn ipv4_fragments(packet: &[u8], cut: usize) -> (Vec<u8>, Vec<u8>) {
    let (header, _) = Ipv4Header::from_slice(packet).unwrap();
    let payload = &packet[header.header_len()..];
    let fragment = |offset: usize, bytes: &[u8], more: bool| {
        let mut h = header.clone();
        h.more_fragments = more;
        h.fragment_offset = etherparse::IpFragOffset::try_new((offset / 8) as u16).unwrap();
        h.set_payload_len(bytes.len()).unwrap();
        h.header_checksum = h.calc_header_checksum();
        let mut out = Vec::new();
        h.write(&mut out).unwrap();
        out.extend_from_slice(bytes);
        out
    };
    (
        fragment(0, &payload[..cut], true),
        fragment(cut, &payload[cut..], false),
    )
}

/// VLAN stacks of 0-8 tags and deeper (802.1Q, 802.1ad, VID 0 and not),
/// IPv4 options, tiny, reordered and overlapping fragments, and IPv6
/// extension chains past the limit: none reaches a protected service, and
/// the same shapes to the control port show the stack would have delivered
/// them.
fn odd_shapes_reach_nothing(v6: bool) {
    let mut scene = Scene::new(v6);
    let forge = Forge::new(&scene);
    let tb = &scene.bed.testbed;
    let (server, client, _) = addrs::family(v6);
    let capture = Capture::start(&tb.client, &tb.client_if);
    let ethertype = if v6 { 0x86dd } else { 0x0800 };
    let ip = |dport: u16, sport: u16, flags: u8| -> Vec<u8> {
        let tcp = tcp_header(sport, dport, flags);
        if v6 {
            forge.ipv6_tcp(client, server, tcp, &[])
        } else {
            forge.ipv4_tcp(client, server, tcp, &[])
        }
    };
    let mut sport = 21000;
    let mut next = || {
        sport += 1;
        sport
    };
    // (frames to protected ports, frames of the same shapes to CLOSED)
    let mut silent = Vec::new();
    let mut control = Vec::new();
    for depth in 0..=10usize {
        for vid in [0u16, 42] {
            for tpid in [frames::TPID_8021Q, frames::TPID_8021AD] {
                let tags = vec![tpid; depth];
                for port in [LEGACY, PROTECTED_TCP, SSH] {
                    silent.push(forge.ether(&tags, vid, ethertype, &ip(port, next(), 0x02)));
                }
                // Priority tags are what the stack peels; only those make
                // a control (another VID needs a VLAN device to deliver).
                if vid == 0 && depth <= 8 {
                    control.push(forge.ether(&tags, vid, ethertype, &ip(CLOSED, next(), 0x02)));
                }
            }
        }
    }
    if v6 {
        // Seven destination-options headers: past the walk, dropped.
        let seven = vec![Ext::Raw(frames::DEST_OPTS, 6); 7];
        for port in [LEGACY, PROTECTED_TCP] {
            let p = forge.ipv6_tcp(client, server, tcp_header(next(), port, 0x02), &seven);
            silent.push(forge.ether(&[], 0, ethertype, &p));
        }
        let six = vec![Ext::Raw(frames::DEST_OPTS, 6); 6];
        let p = forge.ipv6_tcp(client, server, tcp_header(next(), CLOSED, 0x02), &six);
        control.push(forge.ether(&[], 0, ethertype, &p));
    } else {
        // IPv4 options (40 bytes of NOPs) shift the header.
        for (port, list) in [(LEGACY, &mut silent), (CLOSED, &mut control)] {
            let p = forge.ipv4_tcp(client, server, tcp_header(next(), port, 0x02), &[1; 40]);
            list.push(forge.ether(&[], 0, ethertype, &p));
        }
        // Tiny fragments (8 bytes of TCP first), sent in order and reversed.
        for (port, list) in [(LEGACY, &mut silent), (CLOSED, &mut control)] {
            for reversed in [false, true] {
                let (first, second) = ipv4_fragments(&ip(port, next(), 0x02), 8);
                let (a, b) = if reversed {
                    (second, first)
                } else {
                    (first, second)
                };
                list.push(forge.ether(&[], 0, ethertype, &a));
                list.push(forge.ether(&[], 0, ethertype, &b));
            }
        }
        // Overlap: a SYN|ACK first fragment, and a second one at offset 8
        // whose bytes would turn the flags into a bare SYN.
        let sp = next();
        let synack = ip(LEGACY, sp, 0x12);
        let syn = ip(LEGACY, sp, 0x02);
        let (first, _) = ipv4_fragments(&synack, 16);
        let (_, overlap) = ipv4_fragments(&syn, 8);
        silent.push(forge.ether(&[], 0, ethertype, &first));
        silent.push(forge.ether(&[], 0, ethertype, &overlap));
    }
    let _ = capture.incoming(|_| true);
    capture.send(&silent, Duration::from_millis(1));
    std::thread::sleep(SILENCE);
    let answered = answers(&capture);
    assert!(
        answered.is_empty(),
        "{} answers to {} crafted frames: {answered:?}",
        answered.len(),
        silent.len()
    );
    scene.assert_no_accepts();
    capture.send(&control, Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(500));
    let answered = answers(&capture);
    // 18 VLAN shapes (depths 0-8, both TPIDs), then IPv6: six extension
    // headers; IPv4: options, and two tiny-fragment datagrams.
    let expected = if v6 { 19 } else { 21 };
    assert_eq!(
        answered.len(),
        expected,
        "the control shapes are delivered and answered: {answered:?}"
    );
    scene.legitimate_open();
    let rss = scene.assert_daemon_healthy();
    eprintln!(
        "gate: 0 answers to {} crafted frames; {expected} of {} control frames answered; rss {rss} KiB",
        silent.len(),
        control.len()
    );
}

#[test]
fn odd_shapes_reach_nothing_v4() {
    require_privileges!();
    odd_shapes_reach_nothing(false);
}

#[test]
fn odd_shapes_reach_nothing_v6() {
    require_privileges!();
    odd_shapes_reach_nothing(true);
}

/// A UDP datagram with random payload from `src` to the server's `dport`.
fn udp_frame(forge: &Forge, src: IpAddr, dst: IpAddr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let builder = etherparse::PacketBuilder::ethernet2(forge.src_mac, forge.dst_mac);
    let builder = match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => builder.ipv4(s.octets(), d.octets(), 64),
        (IpAddr::V6(s), IpAddr::V6(d)) => builder.ipv6(s.octets(), d.octets(), 64),
        _ => panic!("mixed families"),
    };
    let builder = builder.udp(40000, dport);
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).unwrap();
    out
}

/// A flood of knock-shaped garbage from random sources in the test ranges
/// (198.18.0.0/15, 2001:db8::/32) across the knock range, while the
/// legitimate client opens the door: every open succeeds, the daemon stays
/// small.
fn a_knock_flood_from_random_sources_leaves_legitimate_knocks_working(v6: bool) {
    let mut scene = Scene::new(v6);
    let forge = Forge::new(&scene);
    let server = scene.bed.server;
    let mut noise = knockd_tests::Noise::new(0x5eed);
    let frames: Vec<Vec<u8>> = (0..20_000)
        .map(|_| {
            let r = noise.bytes(24);
            let src: IpAddr = if v6 {
                let mut o = [0x20, 0x01, 0x0d, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
                o[4..].copy_from_slice(&r[..12]);
                o.into()
            } else {
                [198, 18 + (r[0] & 1), r[1], r[2].max(4)].into()
            };
            let port = 7000 + u16::from_be_bytes([r[3], r[4]]) % 1000;
            let payload = noise.bytes(68);
            udp_frame(&forge, src, server, port, &payload)
        })
        .collect();
    let tb = &scene.bed.testbed;
    let flooder = Capture::start(&tb.client, &tb.client_if);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let flood = {
        let (stop, sent) = (stop.clone(), sent.clone());
        std::thread::spawn(move || {
            let deadline = Instant::now() + Duration::from_secs(30);
            while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                flooder.send(&frames, Duration::ZERO);
                sent.fetch_add(frames.len(), Ordering::SeqCst);
            }
        })
    };
    std::thread::sleep(Duration::from_millis(500));
    for _ in 0..5 {
        scene.legitimate_open();
    }
    stop.store(true, Ordering::SeqCst);
    flood.join().unwrap();
    assert!(
        sent.load(Ordering::SeqCst) >= 20_000,
        "the flood ran: {} frames",
        sent.load(Ordering::SeqCst)
    );
    scene.assert_no_accepts();
    let rss = scene.assert_daemon_healthy();
    eprintln!(
        "gate: 5 of 5 opens during a flood of {} random knocks; rss {rss} KiB",
        sent.load(Ordering::SeqCst)
    );
}

#[test]
fn a_knock_flood_from_random_sources_leaves_legitimate_knocks_working_v4() {
    require_privileges!();
    a_knock_flood_from_random_sources_leaves_legitimate_knocks_working(false);
}

#[test]
fn a_knock_flood_from_random_sources_leaves_legitimate_knocks_working_v6() {
    require_privileges!();
    a_knock_flood_from_random_sources_leaves_legitimate_knocks_working(true);
}

/// CPU seconds (user + system) a process has used.
fn cpu_secs(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let fields: Vec<&str> = stat.rsplit_once(") ").unwrap().1.split(' ').collect();
    // utime and stime are fields 14 and 15, so 11 and 12 after the name.
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    ticks as f64 / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// `nobody`, with room for `count` sockets of its own, opening `count`
/// connections to the metrics endpoint in the server namespace and holding
/// them for `secs`. Returns the process (killed on drop) and how many it
/// holds.
fn local_attacker(scene: &Scene, count: usize, secs: u32) -> (Attacker, usize) {
    let script = "import socket,sys,time\n\
        socks=[]\n\
        for i in range(int(sys.argv[1])):\n\
        \x20   s=socket.socket(); s.setblocking(False)\n\
        \x20   try: s.connect(('127.0.0.1',int(sys.argv[2])))\n\
        \x20   except BlockingIOError: pass\n\
        \x20   except OSError: break\n\
        \x20   socks.append(s)\n\
        print(len(socks),flush=True)\n\
        time.sleep(float(sys.argv[3]))\n";
    let mut child = scene
        .bed
        .testbed
        .server
        .command("prlimit")
        .arg(format!("--nofile={0}:{0}", count + 64))
        .args([
            "setpriv",
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
        ])
        .args(["--", "/usr/bin/python3", "-c", script])
        .args([count.to_string(), METRICS.to_string(), secs.to_string()])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    let held = first.trim().parse().unwrap();
    (Attacker(child), held)
}

/// The local attacker's process, killed on drop.
struct Attacker(std::process::Child);

impl Drop for Attacker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Issue 9, finding 2: a non-root user holding thousands of connections to
/// the metrics endpoint used to exhaust the daemon's descriptors, spin its
/// accept loop and make the next knock's state write fail, which stopped
/// the daemon. Now the endpoint serves 64 at a time and the rest wait in
/// the kernel's backlog.
#[test]
fn a_local_user_cannot_exhaust_the_daemon_through_the_metrics_endpoint() {
    require_privileges!();
    let mut scene = Scene::new(false);
    let pid = scene.daemon.pid();
    let (attacker, held) = local_attacker(&scene, 3000, 12);
    assert!(held >= 2000, "the attacker holds {held} connections");
    std::thread::sleep(Duration::from_millis(500));
    let cpu_before = cpu_secs(pid);
    let measured = Instant::now();
    for _ in 0..5 {
        scene.legitimate_open();
    }
    std::thread::sleep(Duration::from_secs(2));
    let cpu = (cpu_secs(pid) - cpu_before) / measured.elapsed().as_secs_f64();
    let fds = open_fds(pid);
    drop(attacker);
    assert!(fds < 200, "the daemon holds {fds} descriptors");
    assert!(cpu < 0.3, "the daemon used {cpu:.2} of a core");
    let rss = scene.assert_daemon_healthy();
    eprintln!("held {held} connections: daemon fds {fds}, cpu {cpu:.3}, rss {rss} KiB");
    // Once the attacker is gone the endpoint answers again.
    let body = scene.bed.testbed.server.run(|| {
        use std::io::{Read as _, Write as _};
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let mut s = std::net::TcpStream::connect(("127.0.0.1", METRICS)).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(6))).unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n").unwrap();
            let mut body = String::new();
            let _ = s.read_to_string(&mut body);
            if body.starts_with("HTTP/1.1 200") || Instant::now() > deadline {
                return body;
            }
        }
    });
    assert!(body.starts_with("HTTP/1.1 200"), "{body}");
}

/// A mount of a tiny tmpfs, unmounted on drop.
struct TinyFs(std::path::PathBuf);

impl Drop for TinyFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// When the used-sequence record cannot be written (a full disk), the
/// knock is refused, the error shows in status, and the daemon goes on
/// serving; with room again, knocks work.
#[test]
fn a_failed_state_write_refuses_one_knock_and_keeps_serving() {
    require_privileges!();
    let bed = Bed::new(false);
    let state = bed.dir.path().join("tiny");
    std::fs::create_dir_all(&state).unwrap();
    sh(Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=64k", "knockd-test"])
        .arg(&state));
    let _mount = TinyFs(state.clone());
    let config = bed.config("").replace(
        &format!("state_dir: {}", bed.dir.path().join("state").display()),
        &format!("state_dir: {}", state.display()),
    );
    assert!(config.contains("tiny"));
    let mut daemon = Daemon::start(&bed.testbed.server, &config);
    // Fill the file system.
    let filler = state.join("filler");
    let _ = std::fs::write(&filler, vec![0u8; 128 * 1024]);
    let target = bed.target(bed.key.clone());
    let socket = bed.socket();
    let refused = knockd::client::knock_from(&socket, &target, Kind::Open, Duration::from_secs(2));
    assert!(refused.is_err(), "no reply while nothing can be recorded");
    daemon.assert_running();
    let status = sh(Command::new(knockd_tests::knockctl_bin())
        .args(["status", "--json", "--socket"])
        .arg(daemon.control_socket()));
    assert!(
        status.contains("recording the sequence as used failed"),
        "{status}"
    );
    // Counted once, as what it was: refused, never accepted (decision
    // counters only grow, so a knock counted accepted could not be taken
    // back).
    let decisions = |daemon: &Daemon| {
        knockd_tests::knockctl_json(&daemon.control_socket(), &["status"])["decisions"].clone()
    };
    let counted = decisions(&daemon);
    // The client sends the sequence again when no reply comes: each try
    // is one refusal.
    let refusals = counted["state_write_failed"].as_u64().unwrap_or(0);
    assert!(refusals >= 1, "{counted}");
    assert!(
        counted["accepted"].as_u64().unwrap_or(0) == 0,
        "a refused knock was counted accepted: {counted}"
    );
    std::fs::remove_file(&filler).unwrap();
    let answer = bed.knock(&socket, Kind::Open);
    assert_eq!(bed.connect(answer.reply.port).0, Outcome::Answered);
    let counted = decisions(&daemon);
    assert_eq!(
        (&counted["accepted"], &counted["state_write_failed"]),
        (&1.into(), &refusals.into()),
        "{counted}"
    );
    daemon.assert_running();
}

/// Traffic the host itself starts keeps working: a connection the server
/// makes from a port inside the guarded grant range gets its replies (a
/// SYN-ACK and data, which the guard chain admits as established), while
/// the same port stays silent to a stranger's new connection.
fn the_hosts_own_connections_from_guarded_ports_work(v6: bool) {
    let mut scene = Scene::new(v6);
    let (server, client, _) = addrs::family(v6);
    let tb = &scene.bed.testbed;
    let echo = tb
        .client
        .run(|| probe::echo_server(SocketAddr::new(client, 7777)));
    let local = SocketAddr::new(server, 40009);
    let mut stream = tb.server.run(|| {
        use socket2::{Domain, Socket, Type};
        let socket = Socket::new(Domain::for_address(local), Type::STREAM, None).unwrap();
        socket.set_reuse_address(true).unwrap();
        socket.bind(&local.into()).unwrap();
        socket
            .connect_timeout(&echo.into(), Duration::from_secs(3))
            .unwrap();
        std::net::TcpStream::from(socket)
    });
    for i in 0..10 {
        assert!(
            probe::echo_round_trip(&mut stream, format!("out {i}").as_bytes()),
            "round trip {i}"
        );
    }
    assert_eq!(scene.bed.connect(40010).0, Outcome::Silent);
    scene.assert_no_accepts();
    scene.assert_daemon_healthy();
}

#[test]
fn the_hosts_own_connections_from_guarded_ports_work_v4() {
    require_privileges!();
    the_hosts_own_connections_from_guarded_ports_work(false);
}

#[test]
fn the_hosts_own_connections_from_guarded_ports_work_v6() {
    require_privileges!();
    the_hosts_own_connections_from_guarded_ports_work(true);
}

/// The accept loop when the daemon is out of descriptors: its limit is cut
/// to 48 from outside (prlimit), and `nobody` holds 200 connections to the
/// metrics endpoint, so accept fails with EMFILE. The old loop retried at
/// once and spun a core; this one backs off. A knock that cannot record
/// its sequence is refused, the daemon stays up, and once the attacker is
/// gone knocks work again.
#[test]
fn out_of_descriptors_the_daemon_backs_off_and_survives() {
    require_privileges!();
    let mut scene = Scene::new(false);
    let pid = scene.daemon.pid();
    sh(Command::new("prlimit").args(["--pid", &pid.to_string(), "--nofile=48:48"]));
    let (attacker, held) = local_attacker(&scene, 200, 8);
    assert_eq!(held, 200);
    std::thread::sleep(Duration::from_millis(500));
    let cpu_before = cpu_secs(pid);
    let measured = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let cpu = (cpu_secs(pid) - cpu_before) / measured.elapsed().as_secs_f64();
    let fds = open_fds(pid);
    scene.daemon.assert_running();
    drop(attacker);
    // The limit binds new descriptors; the few the daemon held above it
    // before the cut stay.
    assert!(fds < 60, "{fds} descriptors under a limit of 48");
    assert!(
        !scene
            .daemon
            .messages("accept failed; backing off", |_| true)
            .is_empty(),
        "accept ran out of descriptors (the path under test)"
    );
    assert!(
        cpu < 0.1,
        "the daemon used {cpu:.2} of a core out of descriptors"
    );
    // The connections are gone: descriptors come back, knocks work.
    std::thread::sleep(Duration::from_secs(1));
    scene.legitimate_open();
    let rss = scene.assert_daemon_healthy();
    eprintln!(
        "gate: out of descriptors ({fds} of 48): cpu {cpu:.3}, rss {rss} KiB, then opens again"
    );
}
