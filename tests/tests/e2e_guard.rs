//! End to end: the real `knockd` binary attached to a veth between two fresh
//! network namespaces, probed with real sockets and nmap from the client
//! side. Every scenario runs over IPv4 and IPv6.

use std::{
    net::{IpAddr, SocketAddr},
    process::Command,
    time::{Duration, Instant},
};

use knockd::{
    maps::{Counters, Proto},
    nft::{self, GrantKey},
};
use knockd_common::Counter;
use knockd_tests::{
    Daemon, NetNs, Testbed, addrs, knock_source,
    probe::{self, Outcome},
    require_privileges, sh,
};

/// Long enough for a SYN or datagram to be answered on a veth many times
/// over; short enough that "silent" checks keep the suite quick.
const SILENCE: Duration = Duration::from_millis(1200);
const LOG_WAIT: Duration = Duration::from_secs(10);

const SSH: u16 = 22;
const ALT: u16 = 2222;
const PROTECTED_UDP: u16 = 5353;
const KNOCK_UDP: u16 = 7000;
const KNOCK_TCP: u16 = 8000;
const OPEN_TCP: u16 = 8080;
const CLOSED: u16 = 9999;

fn config(testbed: &Testbed, rate_per_sec: u32, burst: u32) -> String {
    format!(
        "interfaces: [{}]\n\
         xdp_mode: native\n\
         protect: {{ tcp: [{SSH}, {ALT}, \"40000-40010\"], udp: [{PROTECTED_UDP}] }}\n\
         knock: {{ udp: [{KNOCK_UDP}], tcp: [{KNOCK_TCP}], rate_per_sec: {rate_per_sec}, burst: {burst} }}\n",
        testbed.server_if
    )
}

/// The testbed, with echo services on the server's SSH, ALT and OPEN_TCP
/// ports, and the daemon started.
fn setup(v6: bool) -> (Testbed, Daemon, (IpAddr, IpAddr, IpAddr)) {
    let testbed = Testbed::new();
    let family = addrs::family(v6);
    let server = family.0;
    testbed.server.run(|| {
        for port in [SSH, ALT, OPEN_TCP] {
            probe::echo_server(SocketAddr::new(server, port));
        }
    });
    let daemon = Daemon::start(&testbed.server, &config(&testbed, 1000, 1000));
    (testbed, daemon, family)
}

fn connect(ns: &NetNs, from: IpAddr, to: SocketAddr) -> Outcome {
    ns.run(|| probe::tcp_connect(Some(from), to, SILENCE).0)
}

fn protected_ports_never_answer(v6: bool) {
    let testbed = Testbed::new();
    let (server, client, _) = addrs::family(v6);
    let at = |port| SocketAddr::new(server, port);
    testbed.server.run(|| {
        probe::echo_server(at(SSH));
        probe::echo_server(at(OPEN_TCP));
    });
    // Without the guard the ports answer as usual, so the checks below can
    // tell the difference.
    assert_eq!(connect(&testbed.client, client, at(SSH)), Outcome::Answered);
    assert_eq!(connect(&testbed.client, client, at(ALT)), Outcome::Refused);
    assert_eq!(
        testbed
            .client
            .run(|| probe::udp_probe(client, at(PROTECTED_UDP), SILENCE)),
        Outcome::Refused
    );

    let _daemon = Daemon::start(&testbed.server, &config(&testbed, 1000, 1000));
    // Protected: no SYN-ACK, no RST (with or without a listener), no ICMP.
    assert_eq!(connect(&testbed.client, client, at(SSH)), Outcome::Silent);
    assert_eq!(connect(&testbed.client, client, at(ALT)), Outcome::Silent);
    assert_eq!(
        testbed
            .client
            .run(|| probe::udp_probe(client, at(PROTECTED_UDP), SILENCE)),
        Outcome::Silent
    );
    // Unprotected ports still answer: open, closed with RST, closed with ICMP.
    assert_eq!(
        connect(&testbed.client, client, at(OPEN_TCP)),
        Outcome::Answered
    );
    assert_eq!(
        connect(&testbed.client, client, at(CLOSED)),
        Outcome::Refused
    );
    assert_eq!(
        testbed
            .client
            .run(|| probe::udp_probe(client, at(CLOSED), SILENCE)),
        Outcome::Refused
    );
}

#[test]
fn protected_ports_never_answer_v4() {
    require_privileges!();
    protected_ports_never_answer(false);
}

#[test]
fn protected_ports_never_answer_v6() {
    require_privileges!();
    protected_ports_never_answer(true);
}

/// nmap's verdict per port, from its grepable output.
fn nmap(ns: &NetNs, target: IpAddr, ports: &[u16]) -> Vec<(u16, String)> {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    let mut cmd = ns.command("nmap");
    cmd.args([
        "-n",
        "-Pn",
        "-sS",
        "--max-retries",
        "1",
        "--host-timeout",
        "60s",
        "-oG",
        "-",
        "-p",
    ])
    .arg(ports.join(","));
    if target.is_ipv6() {
        cmd.arg("-6");
    }
    let out = sh(cmd.arg(target.to_string()));
    let line = out
        .lines()
        .find(|l| l.contains("Ports:"))
        .unwrap_or_else(|| panic!("no Ports line in nmap output:\n{out}"));
    let list = line.split("Ports: ").nth(1).unwrap();
    list.split(", ")
        .map(|entry| {
            let mut fields = entry.split('/');
            let port = fields.next().unwrap().trim().parse().unwrap();
            (port, fields.next().unwrap().to_owned())
        })
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect()
}

fn nmap_sees_protected_ports_as_filtered(v6: bool) {
    let (testbed, _daemon, (server, _, _)) = setup(v6);
    let verdicts = nmap(
        &testbed.client,
        server,
        &[SSH, ALT, 40005, OPEN_TCP, CLOSED],
    );
    assert_eq!(
        verdicts,
        [
            (SSH, "filtered".to_owned()),
            (ALT, "filtered".to_owned()),
            (OPEN_TCP, "open".to_owned()),
            (CLOSED, "closed".to_owned()),
            (40005, "filtered".to_owned()),
        ]
        .into_iter()
        .collect::<std::collections::BTreeMap<_, _>>()
        .into_iter()
        .collect::<Vec<_>>(),
    );
}

#[test]
fn nmap_sees_protected_ports_as_filtered_v4() {
    require_privileges!();
    nmap_sees_protected_ports_as_filtered(false);
}

#[test]
fn nmap_sees_protected_ports_as_filtered_v6() {
    require_privileges!();
    nmap_sees_protected_ports_as_filtered(true);
}

/// Marks TCP `port` as one the allow map may admit to, as the daemon does
/// for a static door's service port (this config has only `protect`
/// ports). The daemon leaves the mark alone: its own view of the port does
/// not change.
fn may_grant(maps: &mut knockd::maps::GuardMaps, port: u16) {
    maps.add_port_flags(Proto::Tcp, port, knockd_common::policy::ALLOWS)
        .unwrap();
}

/// Admits `source` to TCP `port` in both layers, as a static door's grant
/// does: the XDP allow map and knockd's nftables table.
fn admit(testbed: &Testbed, daemon: &Daemon, source: IpAddr, port: u16) {
    let mut maps = daemon.maps();
    may_grant(&mut maps, port);
    maps.allow(source, Proto::Tcp, port, None).unwrap();
    testbed
        .server
        .run(|| {
            nft::update_static_grant(
                GrantKey { source, port },
                false,
                Some(Duration::from_secs(600)),
                false,
            )
        })
        .unwrap();
}

fn allow_entry_admits_exactly_that_source_and_port(v6: bool) {
    let (testbed, daemon, (server, client, other)) = setup(v6);
    // One layer alone admits nothing: the XDP allow entry without the
    // nftables element, and the element without the entry.
    may_grant(&mut daemon.maps(), SSH);
    daemon.maps().allow(client, Proto::Tcp, SSH, None).unwrap();
    assert_eq!(
        connect(&testbed.client, client, SocketAddr::new(server, SSH)),
        Outcome::Silent
    );
    daemon.maps().revoke(client, Proto::Tcp, SSH).unwrap();
    let key = GrantKey {
        source: client,
        port: SSH,
    };
    testbed
        .server
        .run(|| nft::update_static_grant(key, false, Some(Duration::from_secs(600)), false))
        .unwrap();
    assert_eq!(
        connect(&testbed.client, client, SocketAddr::new(server, SSH)),
        Outcome::Silent
    );
    admit(&testbed, &daemon, client, SSH);
    let (outcome, stream) = testbed
        .client
        .run(|| probe::tcp_connect(Some(client), SocketAddr::new(server, SSH), SILENCE));
    assert_eq!(outcome, Outcome::Answered);
    assert!(probe::echo_round_trip(
        &mut stream.unwrap(),
        b"through the guard"
    ));
    // Another source, or another protected port: still nothing.
    assert_eq!(
        connect(&testbed.client, other, SocketAddr::new(server, SSH)),
        Outcome::Silent
    );
    assert_eq!(
        connect(&testbed.client, client, SocketAddr::new(server, ALT)),
        Outcome::Silent
    );
    // The counter saw the granted SYN.
    assert!(daemon.maps().counters().unwrap().get(Counter::PassGranted) >= 1);
}

#[test]
fn allow_entry_admits_exactly_that_source_and_port_v4() {
    require_privileges!();
    allow_entry_admits_exactly_that_source_and_port(false);
}

#[test]
fn allow_entry_admits_exactly_that_source_and_port_v6() {
    require_privileges!();
    allow_entry_admits_exactly_that_source_and_port(true);
}

fn established_connection_survives_allow_removal(v6: bool) {
    let (testbed, daemon, (server, client, _)) = setup(v6);
    let ssh = SocketAddr::new(server, SSH);
    let mut maps = daemon.maps();
    admit(&testbed, &daemon, client, SSH);
    let (outcome, stream) = testbed
        .client
        .run(|| probe::tcp_connect(Some(client), ssh, SILENCE));
    assert_eq!(outcome, Outcome::Answered);
    let mut stream = stream.unwrap();
    assert!(probe::echo_round_trip(&mut stream, b"before"));
    maps.revoke(client, Proto::Tcp, SSH).unwrap();
    testbed
        .server
        .run(|| {
            nft::update_static_grant(
                GrantKey {
                    source: client,
                    port: SSH,
                },
                false,
                None,
                true,
            )
        })
        .unwrap();
    // New connections are refused, the established one carries on.
    assert_eq!(connect(&testbed.client, client, ssh), Outcome::Silent);
    for i in 0..20 {
        let msg = format!("after revoke {i}");
        assert!(
            probe::echo_round_trip(&mut stream, msg.as_bytes()),
            "round trip {i}"
        );
    }
}

#[test]
fn established_connection_survives_allow_removal_v4() {
    require_privileges!();
    established_connection_survives_allow_removal(false);
}

#[test]
fn established_connection_survives_allow_removal_v6() {
    require_privileges!();
    established_connection_survives_allow_removal(true);
}

fn knocks_reach_userspace_with_correct_fields(v6: bool) {
    let (testbed, mut daemon, (server, client, _)) = setup(v6);
    let from = SocketAddr::new(client, 41234);
    let to = SocketAddr::new(server, KNOCK_UDP);
    testbed
        .client
        .run(|| probe::udp_send(from, to, &[b"knock-e2e"]));
    let line = daemon.wait_for("knock", LOG_WAIT, |v| v["proto"] == "udp");
    assert_eq!(line["source"], from.to_string());
    assert_eq!(line["destination"], to.to_string());
    assert_eq!(line["payload_len"], 9);
    assert_eq!(line["payload"], "6b6e6f636b2d653265");
    // A TCP knock is a bare SYN: the client sees nothing, the daemon a knock.
    let tcp_knock = SocketAddr::new(server, KNOCK_TCP);
    assert_eq!(connect(&testbed.client, client, tcp_knock), Outcome::Silent);
    let line = daemon.wait_for("knock", LOG_WAIT, |v| v["proto"] == "tcp");
    assert_eq!(line["destination"], tcp_knock.to_string());
    assert_eq!(knock_source(&line), Some(client));
    assert_eq!(line["payload_len"], 0);
}

#[test]
fn knocks_reach_userspace_with_correct_fields_v4() {
    require_privileges!();
    knocks_reach_userspace_with_correct_fields(false);
}

#[test]
fn knocks_reach_userspace_with_correct_fields_v6() {
    require_privileges!();
    knocks_reach_userspace_with_correct_fields(true);
}

fn delta(after: &Counters, before: &Counters, counter: Counter) -> u64 {
    after.get(counter) - before.get(counter)
}

fn counters_equal_packets_sent(v6: bool) {
    let (testbed, mut daemon, (server, client, _)) = setup(v6);
    let maps = daemon.maps();
    let before = maps.counters().unwrap();
    const PROTECTED: usize = 25;
    const UNPROTECTED: usize = 13;
    const KNOCKS: usize = 7;
    testbed.client.run(|| {
        let from = SocketAddr::new(client, 0);
        probe::udp_send(
            from,
            SocketAddr::new(server, PROTECTED_UDP),
            &[b"p"; PROTECTED],
        );
        probe::udp_send(from, SocketAddr::new(server, CLOSED), &[b"u"; UNPROTECTED]);
        probe::udp_send(from, SocketAddr::new(server, KNOCK_UDP), &[b"k"; KNOCKS]);
    });
    daemon.wait_for_count("knock", KNOCKS, LOG_WAIT, |_| true);
    // The datagrams cross the veth asynchronously; wait until all are seen.
    let deadline = Instant::now() + LOG_WAIT;
    let after = loop {
        let now = maps.counters().unwrap();
        let seen = delta(&now, &before, Counter::DropProtected) as usize >= PROTECTED
            && delta(&now, &before, Counter::PassUnprotected) as usize >= UNPROTECTED;
        if seen || Instant::now() > deadline {
            break now;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(
        delta(&after, &before, Counter::DropProtected),
        PROTECTED as u64
    );
    assert_eq!(
        delta(&after, &before, Counter::PassUnprotected),
        UNPROTECTED as u64
    );
    assert_eq!(
        delta(&after, &before, Counter::KnockForwarded),
        KNOCKS as u64
    );
    for counter in [
        Counter::KnockRateLimited,
        Counter::KnockEventLost,
        Counter::DropMalformed,
        Counter::PassGranted,
    ] {
        assert_eq!(delta(&after, &before, counter), 0, "{}", counter.name());
    }
    // `knockd stats --json` reads the same pinned counters.
    let json = sh(Command::new(knockd_tests::knockd_bin())
        .args(["stats", "--json", "--bpffs-dir"])
        .arg(daemon.bpffs_dir()));
    let stats: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert!(stats["drop_protected"].as_u64().unwrap() >= PROTECTED as u64);
    assert!(stats["knock_forwarded"].as_u64().unwrap() >= KNOCKS as u64);
}

#[test]
fn counters_equal_packets_sent_v4() {
    require_privileges!();
    counters_equal_packets_sent(false);
}

#[test]
fn counters_equal_packets_sent_v6() {
    require_privileges!();
    counters_equal_packets_sent(true);
}

fn rate_limit_caps_one_source_without_affecting_another(v6: bool) {
    let testbed = Testbed::new();
    let (server, client, other) = addrs::family(v6);
    // One knock a second, bursts of five.
    let mut daemon = Daemon::start(&testbed.server, &config(&testbed, 1, 5));
    let maps = daemon.maps();
    let before = maps.counters().unwrap();
    let to = SocketAddr::new(server, KNOCK_UDP);
    testbed
        .client
        .run(|| probe::udp_send(SocketAddr::new(client, 0), to, &[b"flood"; 30]));
    testbed
        .client
        .run(|| probe::udp_send(SocketAddr::new(other, 0), to, &[b"legit"; 3]));
    daemon.wait_for_count("knock", 3, LOG_WAIT, |v| knock_source(v) == Some(other));
    let deadline = Instant::now() + LOG_WAIT;
    while delta(
        &maps.counters().unwrap(),
        &before,
        Counter::KnockRateLimited,
    ) < 25
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(50));
    }
    let after = maps.counters().unwrap();
    let from_client = daemon.messages("knock", |v| knock_source(v) == Some(client));
    assert_eq!(from_client.len(), 5, "the burst, then nothing");
    assert_eq!(delta(&after, &before, Counter::KnockForwarded), 8);
    assert_eq!(delta(&after, &before, Counter::KnockRateLimited), 25);
}

#[test]
fn rate_limit_caps_one_source_without_affecting_another_v4() {
    require_privileges!();
    rate_limit_caps_one_source_without_affecting_another(false);
}

#[test]
fn rate_limit_caps_one_source_without_affecting_another_v6() {
    require_privileges!();
    rate_limit_caps_one_source_without_affecting_another(true);
}

#[test]
fn sigterm_keeps_the_guard_and_uninstall_removes_it() {
    require_privileges!();
    let (testbed, mut daemon, (server, client, _)) = setup(false);
    let pins = daemon.bpffs_dir().to_owned();
    let link = || testbed.server.ip(&["link", "show", &testbed.server_if]);
    assert!(pins.join("COUNTERS").exists());
    assert!(pins.join(format!("link_{}", testbed.server_if)).exists());
    assert!(link().contains("xdp"));
    let status = daemon.stop();
    assert!(status.success(), "{status}");
    // Fail closed: the daemon is gone, the guard is not.
    assert!(link().contains("xdp"));
    let ssh = SocketAddr::new(server, SSH);
    assert_eq!(connect(&testbed.client, client, ssh), Outcome::Silent);
    // Its counters are still readable.
    let stats = sh(Command::new(knockd_tests::knockd_bin())
        .args(["stats", "--json", "--bpffs-dir"])
        .arg(&pins));
    assert!(stats.contains("drop_protected"), "{stats}");
    // Removing everything is a deliberate act.
    sh(testbed
        .server
        .command(knockd_tests::knockd_bin())
        .args(["uninstall", "--bpffs-dir"])
        .arg(&pins));
    assert!(!pins.exists(), "pins removed");
    assert!(!link().contains("xdp"));
    assert_eq!(
        connect(&testbed.client, client, ssh),
        Outcome::Answered,
        "the guard is gone"
    );
}

#[test]
fn generic_mode_is_the_fallback_where_native_is_missing() {
    require_privileges!();
    let ns = NetNs::new("g");
    // A bridge has no native XDP support (and this kernel has no dummy driver).
    ns.ip(&["link", "add", "kdbr0", "type", "bridge"]);
    ns.ip(&["link", "set", "kdbr0", "up"]);
    let mut daemon = Daemon::start(&ns, "interfaces: [kdbr0]\nxdp_mode: auto\n");
    let attached = daemon.wait_for("XDP guard attached", LOG_WAIT, |_| true);
    assert_eq!(attached["mode"], "Generic");
    assert_eq!(
        daemon
            .messages(
                "native XDP unavailable, falling back to generic mode (slower)",
                |_| true
            )
            .len(),
        1
    );
    assert!(ns.ip(&["link", "show", "kdbr0"]).contains("xdpgeneric"));
}

#[test]
fn a_missing_interface_is_named_and_leaves_nothing_behind() {
    require_privileges!();
    let ns = NetNs::new("m");
    let dir = tempfile::tempdir().unwrap();
    let bpffs_dir = std::path::Path::new("/sys/fs/bpf").join(knockd_tests::unique_name("p"));
    let config = dir.path().join("knockd.yaml");
    std::fs::write(
        &config,
        format!(
            "interfaces: [kdnothere0]\nbpffs_dir: {}\n",
            bpffs_dir.display()
        ),
    )
    .unwrap();
    let out = ns
        .command(knockd_tests::knockd_bin())
        .arg("run")
        .arg("--config")
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("kdnothere0"), "{stderr}");
    assert!(!bpffs_dir.exists(), "no pins left behind");
}
