//! End to end: knocks authenticated by the real daemon between two fresh
//! namespaces. One-time knocks come from our client code; static ones from
//! Debian's stock `knock` client. Replays are captured off the wire and sent
//! again byte for byte.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    path::PathBuf,
    time::Duration,
};

use knockd::{
    client::{self, Target},
    proto::{DeviceKey, DoorKeys, DoorParams, Kind, Status},
};
use knockd_common::Counter;
use knockd_tests::{
    Daemon, NetNs, Testbed, addrs,
    capture::{Capture, udp_dport},
    probe::{self, Outcome},
    require_privileges, sh,
};

const SILENCE: Duration = Duration::from_millis(1200);
const LOG_WAIT: Duration = Duration::from_secs(10);
const SSH: u16 = 22;
const LEGACY_UDP: u16 = 2222;
const LEGACY_TCP: u16 = 2223;
const KNOCK_RANGE: std::ops::RangeInclusive<u16> = 7000..=7999;
const GRANT_RANGE: std::ops::RangeInclusive<u16> = 40000..=40999;

/// Keys on disk (root-owned, 0600, as the daemon demands) and the config.
struct Setup {
    dir: tempfile::TempDir,
    laptop: DeviceKey,
}

impl Setup {
    fn new() -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let laptop = DeviceKey::generate();
        for (name, key) in [("laptop", &laptop), ("intern", &DeviceKey::generate())] {
            let path = dir.path().join(format!("{name}.key"));
            std::fs::write(&path, key.to_hex()).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        Setup { dir, laptop }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }

    fn config(&self, testbed: &Testbed) -> String {
        let keys = self.dir.path().display();
        format!(
            "interfaces: [{}]\n\
             xdp_mode: native\n\
             state_dir: {}\n\
             devices:\n\
             \x20 laptop: {{ key_file: {keys}/laptop.key, groups: [admins] }}\n\
             \x20 intern: {{ key_file: {keys}/intern.key }}\n\
             doors:\n\
             \x20 ssh: {{ service_port: {SSH}, allow: {{ groups: [admins] }} }}\n\
             \x20 legacy: {{ service_port: {LEGACY_UDP}, mode: static, sequence: [\"6000:udp\", \"6001:udp\", \"6002:udp\"] }}\n\
             \x20 legacy_tcp: {{ service_port: {LEGACY_TCP}, mode: static, sequence: [\"6100:tcp\", \"6101:tcp\", \"6102:tcp\"] }}\n",
            testbed.server_if,
            self.state_dir().display(),
        )
    }

    fn target(&self, server: IpAddr, key: &DeviceKey) -> Target {
        Target {
            server,
            door: "ssh".into(),
            params: DoorParams {
                knock_ports: KNOCK_RANGE,
                knocks: 3,
                step_secs: 30,
            },
            key: key.clone(),
            bind: None,
        }
    }
}

fn start(v6: bool) -> (Testbed, Setup, Daemon, (IpAddr, IpAddr, IpAddr)) {
    start_with_env(v6, &[])
}

/// [`start`], with extra environment for the daemon.
fn start_with_env(
    v6: bool,
    env: &[(&str, String)],
) -> (Testbed, Setup, Daemon, (IpAddr, IpAddr, IpAddr)) {
    let testbed = Testbed::new();
    let family = addrs::family(v6);
    let server = family.0;
    testbed.server.run(|| {
        for port in [SSH, LEGACY_UDP, LEGACY_TCP] {
            probe::echo_server(SocketAddr::new(server, port));
        }
    });
    let setup = Setup::new();
    let daemon = Daemon::start_with_env(&testbed.server, &setup.config(&testbed), env);
    (testbed, setup, daemon, family)
}

fn connect(ns: &NetNs, from: IpAddr, to: SocketAddr) -> Outcome {
    ns.run(|| probe::tcp_connect(Some(from), to, SILENCE).0)
}

/// A UDP socket in the client namespace, bound to `from`.
fn client_socket(ns: &NetNs, from: IpAddr) -> UdpSocket {
    ns.run(|| UdpSocket::bind(SocketAddr::new(from, 0)).unwrap())
}

/// Waits `SILENCE` for any datagram on `socket`.
fn silent(socket: &UdpSocket) -> bool {
    socket.set_read_timeout(Some(SILENCE)).unwrap();
    socket.recv_from(&mut [0; 512]).is_err()
}

fn decisions(daemon: &Daemon, outcome: &str, reason: Option<&str>) -> usize {
    daemon
        .messages("decision", |v| {
            v["outcome"] == outcome && reason.is_none_or(|r| v["reason"] == r)
        })
        .len()
}

fn one_time_knock_opens_the_service_for_that_source_only(v6: bool) {
    let (testbed, setup, mut daemon, (server, client, other)) = start(v6);
    let ssh = SocketAddr::new(server, SSH);
    assert_eq!(connect(&testbed.client, client, ssh), Outcome::Silent);

    let socket = client_socket(&testbed.client, client);
    let answer = client::knock_from(
        &socket,
        &setup.target(server, &setup.laptop),
        Kind::Open,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(answer.reply.status, Status::Granted);
    assert!(
        GRANT_RANGE.contains(&answer.reply.port),
        "a random port: {}",
        answer.reply.port
    );
    assert!((29..=30).contains(&answer.reply.expires_in_secs));
    assert!(
        answer.server_offset_ms.abs() < 5000,
        "same machine, same clock"
    );
    assert_eq!(answer.attempts, 1);

    let line = daemon.wait_for("decision", LOG_WAIT, |v| v["outcome"] == "accepted");
    assert_eq!(line["device"], "laptop");
    assert_eq!(line["door"], "ssh");
    assert_eq!(line["grant_to"], client.to_string());

    assert_eq!(line["port"], answer.reply.port);

    // The granted port leads to the service, for this source only; the
    // service port itself stays shut.
    let granted = SocketAddr::new(server, answer.reply.port);
    let (outcome, stream) = testbed
        .client
        .run(|| probe::tcp_connect(Some(client), granted, SILENCE));
    let table = knockd_tests::sh(
        testbed
            .server
            .command("nft")
            .args(["list", "table", "inet", "knockd"]),
    );
    assert_eq!(outcome, Outcome::Answered, "{table}");
    assert!(probe::echo_round_trip(
        &mut stream.unwrap(),
        b"authenticated"
    ));
    assert_eq!(connect(&testbed.client, other, granted), Outcome::Silent);
    assert_eq!(connect(&testbed.client, client, ssh), Outcome::Silent);
    let element = format!("{client} . {}", answer.reply.port);
    assert!(table.contains(&element), "{element} in\n{table}");
}

#[test]
fn one_time_knock_opens_the_service_for_that_source_only_v4() {
    require_privileges!();
    one_time_knock_opens_the_service_for_that_source_only(false);
}

#[test]
fn one_time_knock_opens_the_service_for_that_source_only_v6() {
    require_privileges!();
    one_time_knock_opens_the_service_for_that_source_only(true);
}

/// Knocks once while capturing; returns the knock socket and the frames.
fn knock_and_capture(
    testbed: &Testbed,
    setup: &Setup,
    server: IpAddr,
    client: IpAddr,
) -> (UdpSocket, Vec<Vec<u8>>) {
    let capture = Capture::start(&testbed.client, &testbed.client_if);
    let socket = client_socket(&testbed.client, client);
    client::knock_from(
        &socket,
        &setup.target(server, &setup.laptop),
        Kind::Open,
        Duration::from_secs(10),
    )
    .unwrap();
    let frames = capture.outgoing(|f| udp_dport(f).is_some_and(|p| KNOCK_RANGE.contains(&p)));
    assert_eq!(frames.len(), 3, "one attempt, three knocks on the wire");
    (socket, frames)
}

fn a_replayed_capture_is_rejected_and_answered_with_silence(v6: bool) {
    let (testbed, setup, mut daemon, (server, client, _)) = start(v6);
    let (socket, frames) = knock_and_capture(&testbed, &setup, server, client);
    daemon.wait_for("decision", LOG_WAIT, |v| v["outcome"] == "accepted");

    Capture::start(&testbed.client, &testbed.client_if).replay(&frames);
    daemon.wait_for_count("decision", 3, LOG_WAIT, |v| v["reason"] == "replay");
    assert!(silent(&socket), "a replay gets no reply");
    assert_eq!(decisions(&daemon, "accepted", None), 1);
    let line = &daemon.messages("decision", |v| v["reason"] == "replay")[0];
    assert_eq!(
        line["device"], "laptop",
        "a replay authenticates, so it names the device"
    );
}

#[test]
fn a_replayed_capture_is_rejected_and_answered_with_silence_v4() {
    require_privileges!();
    a_replayed_capture_is_rejected_and_answered_with_silence(false);
}

#[test]
fn a_replayed_capture_is_rejected_and_answered_with_silence_v6() {
    require_privileges!();
    a_replayed_capture_is_rejected_and_answered_with_silence(true);
}

/// `frames` as a classic pcap file (what tcpdump writes, tcpreplay reads).
fn write_pcap(path: &std::path::Path, frames: &[Vec<u8>]) {
    let mut out = Vec::new();
    // Magic, version 2.4, zone, accuracy, snaplen, LINKTYPE_ETHERNET.
    out.extend_from_slice(&0xa1b2_c3d4u32.to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&4u16.to_le_bytes());
    for word in [0u32, 0, 65535, 1] {
        out.extend_from_slice(&word.to_le_bytes());
    }
    for (i, frame) in frames.iter().enumerate() {
        for word in [
            1_700_000_000u32,
            i as u32 * 1000,
            frame.len() as u32,
            frame.len() as u32,
        ] {
            out.extend_from_slice(&word.to_le_bytes());
        }
        out.extend_from_slice(frame);
    }
    std::fs::write(path, out).unwrap();
}

/// The same UDP datagram from another source address, checksums redone.
fn from_source(frame: &[u8], source: IpAddr) -> Vec<u8> {
    let sliced = etherparse::SlicedPacket::from_ethernet(frame).unwrap();
    let Some(etherparse::TransportSlice::Udp(udp)) = &sliced.transport else {
        panic!("not UDP");
    };
    let payload = udp.payload();
    let eth = etherparse::Ethernet2Header::from_slice(frame).unwrap().0;
    let builder = etherparse::PacketBuilder::ethernet2(eth.source, eth.destination);
    let builder = match (source, &sliced.net) {
        (IpAddr::V4(s), Some(etherparse::NetSlice::Ipv4(ip))) => {
            builder.ipv4(s.octets(), ip.header().destination(), 64)
        }
        (IpAddr::V6(s), Some(etherparse::NetSlice::Ipv6(ip))) => {
            builder.ipv6(s.octets(), ip.header().destination(), 64)
        }
        _ => panic!("family mismatch"),
    };
    let builder = builder.udp(udp.source_port(), udp.destination_port());
    let mut out = Vec::with_capacity(builder.size(payload.len()));
    builder.write(&mut out, payload).unwrap();
    out
}

/// A captured sequence replayed with Debian's tcpreplay, as captured and
/// with the source rewritten to another address (a spoofed replay): both
/// are replays (the sequence was used), neither gets a reply, and nothing
/// opens for the spoofed address.
fn tcpreplay_and_spoofed_replays_are_rejected(v6: bool) {
    let (testbed, setup, mut daemon, (server, client, other)) = start(v6);
    let (socket, frames) = knock_and_capture(&testbed, &setup, server, client);
    daemon.wait_for("decision", LOG_WAIT, |v| v["outcome"] == "accepted");
    let spoofed: Vec<Vec<u8>> = frames.iter().map(|f| from_source(f, other)).collect();
    for (name, set) in [("captured", &frames), ("spoofed", &spoofed)] {
        let pcap = setup.dir.path().join(format!("{name}.pcap"));
        write_pcap(&pcap, set);
        sh(testbed
            .client
            .command("tcpreplay")
            .args(["-q", "-i", &testbed.client_if])
            .arg(&pcap));
    }
    daemon.wait_for_count("decision", 6, LOG_WAIT, |v| v["reason"] == "replay");
    let spoofed_replays = daemon.messages("decision", |v| {
        v["reason"] == "replay" && knockd_tests::knock_source(v) == Some(other)
    });
    assert_eq!(spoofed_replays.len(), 3, "each spoofed knock is a replay");
    assert!(silent(&socket), "a replay gets no reply");
    assert_eq!(decisions(&daemon, "accepted", None), 1);
    assert_eq!(
        connect(&testbed.client, other, SocketAddr::new(server, SSH)),
        Outcome::Silent
    );
}

#[test]
fn tcpreplay_and_spoofed_replays_are_rejected_v4() {
    require_privileges!();
    tcpreplay_and_spoofed_replays_are_rejected(false);
}

#[test]
fn tcpreplay_and_spoofed_replays_are_rejected_v6() {
    require_privileges!();
    tcpreplay_and_spoofed_replays_are_rejected(true);
}

#[test]
fn a_replay_after_a_restart_is_rejected() {
    require_privileges!();
    let (testbed, setup, mut daemon, (server, client, _)) = start(false);
    let (socket, frames) = knock_and_capture(&testbed, &setup, server, client);
    assert!(daemon.stop().success());
    assert!(setup.state_dir().join("consumed.log").exists());

    let mut restarted = daemon.restart(&testbed.server);
    Capture::start(&testbed.client, &testbed.client_if).replay(&frames);
    restarted.wait_for_count("decision", 3, LOG_WAIT, |v| v["reason"] == "replay");
    assert_eq!(decisions(&restarted, "accepted", None), 0);
    assert!(silent(&socket));
}

/// Power cut or SIGKILL at any step between judging a knock and answering
/// it, or while compacting the record at start-up: the restarted daemon
/// starts, and refuses a byte-for-byte replay of the knock. (A crash before
/// the record's write leaves a sequence nobody was answered for; the
/// record's own unit tests cut the log at every byte for power loss.)
#[test]
fn a_crash_at_any_step_never_readmits_a_replay() {
    require_privileges!();
    for point in ["after_append", "after_sync", "after_grant", "after_reply"] {
        let (testbed, setup, mut daemon, (server, client, _)) =
            start_with_env(false, &[("KNOCKD_CRASH_AT", point.to_owned())]);
        let capture = Capture::start(&testbed.client, &testbed.client_if);
        let socket = client_socket(&testbed.client, client);
        let answered = client::knock_from(
            &socket,
            &setup.target(server, &setup.laptop),
            Kind::Open,
            Duration::from_secs(1),
        );
        daemon.wait_killed(LOG_WAIT);
        assert_eq!(
            answered.is_ok(),
            point == "after_reply",
            "{point}: only a crash after the reply leaves an answer"
        );
        let mut frames =
            capture.outgoing(|f| udp_dport(f).is_some_and(|p| KNOCK_RANGE.contains(&p)));
        frames.truncate(3);
        assert_eq!(frames.len(), 3, "{point}");

        let mut restarted = daemon.restart(&testbed.server);
        Capture::start(&testbed.client, &testbed.client_if).replay(&frames);
        restarted.wait_for_count("decision", 3, LOG_WAIT, |v| v["reason"] == "replay");
        assert_eq!(decisions(&restarted, "accepted", None), 0, "{point}");
        assert!(silent(&socket), "{point}");
    }
}

#[test]
fn a_crash_while_compacting_the_record_never_readmits_a_replay() {
    require_privileges!();
    for point in [
        "after_load",
        "after_snapshot_write",
        "after_snapshot_rename",
        "after_snapshot_sync",
        "after_log_truncate",
    ] {
        let (testbed, setup, mut daemon, (server, client, _)) = start(false);
        let (socket, frames) = knock_and_capture(&testbed, &setup, server, client);
        assert!(daemon.stop().success());
        let log = setup.state_dir().join("consumed.log");
        assert!(std::fs::metadata(&log).unwrap().len() > 0, "{point}");

        let crashed = daemon.restart_to_crash(&testbed.server, point);
        let mut restarted = crashed.restart(&testbed.server);
        Capture::start(&testbed.client, &testbed.client_if).replay(&frames);
        restarted.wait_for_count("decision", 3, LOG_WAIT, |v| v["reason"] == "replay");
        assert_eq!(decisions(&restarted, "accepted", None), 0, "{point}");
        assert!(silent(&socket), "{point}");
        assert_eq!(
            std::fs::metadata(&log).unwrap().len(),
            0,
            "{point}: the restart compacted the log"
        );
    }
}

#[test]
fn forged_knocks_get_no_reply_and_open_nothing() {
    require_privileges!();
    let (testbed, setup, mut daemon, (server, client, _)) = start(false);
    let socket = client_socket(&testbed.client, client);
    // Another device's key on the laptop's ports: right ports, wrong MAC.
    let wrong = DeviceKey::generate();
    let laptop = DoorKeys::derive(&setup.laptop, "ssh");
    let forger = DoorKeys::derive(&wrong, "ssh");
    let params = setup.target(server, &setup.laptop).params;
    let now = knockd::proto::unix_ms();
    let real = knockd::proto::sequence(&laptop, &params, Kind::Open, now, [1; 16], None);
    let forged = knockd::proto::sequence(&forger, &params, Kind::Open, now, [1; 16], None);
    for ((port, _), (_, payload)) in real.iter().zip(&forged) {
        socket
            .send_to(payload, SocketAddr::new(server, *port))
            .unwrap();
    }
    // And garbage of every length class: the kernel drops it on a one-time
    // knock port, before the daemon or the rate limit sees it.
    let maps = daemon.maps();
    let malformed = || maps.counters().unwrap().get(Counter::KnockMalformed);
    let before = malformed();
    for payload in [&[][..], &[1u8; 10][..], &[0xffu8; 68][..], &[7u8; 500][..]] {
        socket
            .send_to(payload, SocketAddr::new(server, real[0].0))
            .unwrap();
    }
    daemon.wait_for_count("decision", 3, LOG_WAIT, |v| v["reason"] == "bad_mac");
    let deadline = std::time::Instant::now() + LOG_WAIT;
    while malformed() < before + 4 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(malformed(), before + 4);
    assert!(
        daemon
            .messages("decision", |v| v["reason"] == "malformed")
            .is_empty()
    );
    assert!(
        silent(&socket),
        "nothing is ever sent in reply to an invalid knock"
    );
    assert_eq!(decisions(&daemon, "accepted", None), 0);
    let bad = &daemon.messages("decision", |v| v["reason"] == "bad_mac")[0];
    assert!(
        bad["device"].is_null(),
        "an unauthenticated knock names no device"
    );
    assert_eq!(
        connect(&testbed.client, client, SocketAddr::new(server, SSH)),
        Outcome::Silent
    );
}

#[test]
fn a_close_knock_ends_the_grant() {
    require_privileges!();
    let (testbed, setup, _daemon, (server, client, _)) = start(false);
    let ssh = SocketAddr::new(server, SSH);
    let target = setup.target(server, &setup.laptop);
    let socket = client_socket(&testbed.client, client);
    let knock = |kind| client::knock_from(&socket, &target, kind, Duration::from_secs(10)).unwrap();
    let opened = knock(Kind::Open);
    let granted = SocketAddr::new(server, opened.reply.port);
    assert_eq!(connect(&testbed.client, client, granted), Outcome::Answered);
    let heartbeat = knock(Kind::Heartbeat);
    assert_eq!(
        (heartbeat.reply.status, heartbeat.reply.port),
        (Status::Granted, opened.reply.port)
    );
    // The same device also holds a grant over IPv6.
    let (server6, client6, _) = addrs::family(true);
    let target6 = setup.target(server6, &setup.laptop);
    let socket6 = client_socket(&testbed.client, client6);
    let opened6 =
        client::knock_from(&socket6, &target6, Kind::Open, Duration::from_secs(10)).unwrap();
    let granted6 = SocketAddr::new(server6, opened6.reply.port);
    // (The service listens on IPv4 only: the grant shows as a RST from
    // the service port, where without it there is silence.)
    assert_eq!(
        connect(&testbed.client, client6, granted6),
        Outcome::Refused
    );
    // One close, over IPv4, ends the device's grants in both families.
    let closed = knock(Kind::Close);
    assert_eq!(closed.reply.status, Status::Closed);
    assert_eq!(connect(&testbed.client, client, granted), Outcome::Silent);
    assert_eq!(connect(&testbed.client, client, ssh), Outcome::Silent);
    assert_eq!(connect(&testbed.client, client6, granted6), Outcome::Silent);
    assert_eq!(knock(Kind::Heartbeat).reply.status, Status::NoGrant);
    // A close with nothing to close says so.
    assert_eq!(knock(Kind::Close).reply.status, Status::NoGrant);
}

/// Debian's `knock` client, from the client's namespace, sends `args`
/// (`-u`, knocks) to `server`; afterwards `to` answers the client.
fn stock_knock_opens(
    testbed: &Testbed,
    (server, client): (IpAddr, IpAddr),
    to: SocketAddr,
    args: &[&str],
) {
    let status = testbed
        .client
        .command("knock")
        .arg("-v")
        .arg(server.to_string())
        .args(args)
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(
        connect(&testbed.client, client, to),
        Outcome::Answered,
        "after knock {args:?}"
    );
}

#[test]
fn the_stock_knock_client_opens_static_doors_over_udp_and_tcp() {
    require_privileges!();
    let (testbed, _setup, daemon, (server, client, other)) = start(false);
    assert_eq!(
        daemon
            .messages("door uses a static knock sequence: anyone who observes it can replay it; prefer mode: one_time", |_| true)
            .len(),
        2,
        "static doors are announced as replayable"
    );
    for (service, args) in [
        (LEGACY_UDP, vec!["-u", "6000", "6001", "6002"]),
        (LEGACY_TCP, vec!["6100", "6101", "6102"]),
    ] {
        let to = SocketAddr::new(server, service);
        assert_eq!(connect(&testbed.client, client, to), Outcome::Silent);
        stock_knock_opens(&testbed, (server, client), to, &args);
        assert_eq!(connect(&testbed.client, other, to), Outcome::Silent);
    }
}

#[test]
fn check_config_names_an_unsafe_key_file() {
    require_privileges!();
    let testbed = Testbed::new();
    let setup = Setup::new();
    let config = setup.dir.path().join("knockd.yaml");
    std::fs::write(&config, setup.config(&testbed)).unwrap();
    let check = || {
        // In the server's namespace: its interface must exist.
        testbed
            .server
            .command(knockd_tests::knockd_bin())
            .arg("check-config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let ok = check();
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok (doors: 3, devices: 2)"));
    let key = setup.dir.path().join("laptop.key");
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let bad = check();
    assert_eq!(bad.status.code(), Some(78), "EX_CONFIG");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains(&format!("key file {}: mode 0644", key.display())),
        "{stderr}"
    );
    // The daemon refuses the same configuration with EX_CONFIG, which the
    // unit lists in RestartPreventExitStatus=.
    let run = testbed
        .server
        .command(knockd_tests::knockd_bin())
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(
        run.status.code(),
        Some(78),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    // An interface this host does not have is refused, by check-config and
    // by `knockd run` alike.
    std::fs::write(
        &config,
        setup
            .config(&testbed)
            .replace(&testbed.server_if, "kdnosuch0"),
    )
    .unwrap();
    let missing = check();
    assert_eq!(missing.status.code(), Some(78));
    let stderr = String::from_utf8_lossy(&missing.stderr);
    assert!(
        stderr.contains("interfaces[0]: no interface \"kdnosuch0\" on this host"),
        "{stderr}"
    );
}
