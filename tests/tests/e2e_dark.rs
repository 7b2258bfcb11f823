//! A dark host (`closed_ports: drop`, R-XDP-6), scanned from outside with
//! nmap over every TCP and UDP port: nothing answers but the public ports
//! and, through a grant, the door. Inside, the host's own connections
//! (TCP and UDP, each way of starting them) keep working.
//!
//! Each test first scans a few ports with the default `closed_ports:
//! pass`, where a closed port answers RST or ICMP and the unlisted
//! services answer: the control that proves the scan could see them.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use knockd::proto::Kind;
use knockd_common::Counter;
use knockd_tests::{
    addrs,
    bed::Bed,
    probe::{self, Outcome},
    require_privileges, sh,
};

/// Public: a web server and a UDP service.
const WEB: u16 = 443;
const PUBLIC_UDP: u16 = 5300;
/// Listening, but in no rule: a dark host hides them.
const UNLISTED_TCP: u16 = 8080;
const UNLISTED_UDP: u16 = 5301;
/// Nothing listens.
const CLOSED: u16 = 9999;

/// nmap from the client namespace: every port it saw in a state other
/// than the one it leaves out as "ignored", and that ignored state with
/// its count.
struct Scan {
    /// (port, protocol) to state.
    listed: BTreeMap<(u16, &'static str), String>,
    ignored: Option<(String, usize)>,
}

fn nmap(bed: &Bed, args: &[&str]) -> Scan {
    let mut cmd = bed.testbed.client.command("nmap");
    cmd.args(["-n", "-Pn", "-oG", "-", "--host-timeout", "300s"])
        .args(args);
    if bed.server.is_ipv6() {
        cmd.arg("-6");
    }
    let scan = knockd_tests::nmap::parse(&sh(cmd.arg(bed.server.to_string())));
    eprintln!("nmap {}: {}", args.join(" "), scan.line);
    let listed = scan
        .ports
        .into_iter()
        .map(|(port, proto, state)| {
            let proto = if proto == "udp" { "udp" } else { "tcp" };
            ((port, proto), state)
        })
        .collect();
    Scan {
        listed,
        ignored: scan.ignored,
    }
}

fn dark_host(v6: bool) {
    let bed = Bed::new(v6);
    let server = bed.server;
    bed.testbed.server.run(|| {
        for port in [WEB, UNLISTED_TCP] {
            probe::echo_server(SocketAddr::new(server, port));
        }
        for port in [PUBLIC_UDP, UNLISTED_UDP] {
            probe::udp_echo_server(SocketAddr::new(server, port));
        }
    });
    let targeted =
        format!("T:{WEB},{UNLISTED_TCP},{CLOSED},U:{PUBLIC_UDP},{UNLISTED_UDP},{CLOSED}");
    let targeted = ["-sS", "-sU", "--max-retries", "3", "-p", &targeted];

    // The control: with closed_ports: pass, the scan sees every service
    // and the closed port's RST and ICMP.
    let mut daemon = bed.start("");
    let open = nmap(&bed, &targeted).listed;
    let expected: BTreeMap<(u16, &str), String> = [
        ((WEB, "tcp"), "open"),
        ((UNLISTED_TCP, "tcp"), "open"),
        ((CLOSED, "tcp"), "closed"),
        ((PUBLIC_UDP, "udp"), "open"),
        ((UNLISTED_UDP, "udp"), "open"),
        ((CLOSED, "udp"), "closed"),
    ]
    .into_iter()
    .map(|(k, v)| (k, v.to_owned()))
    .collect();
    assert_eq!(open, expected, "closed_ports: pass");
    // A reload turns the host dark; no restart is needed.
    let path = daemon.config_path();
    let mut config = std::fs::read_to_string(&path).unwrap();
    config.push_str(&format!(
        "closed_ports: drop\npublic: {{ tcp: [{WEB}], udp: [{PUBLIC_UDP}] }}\n"
    ));
    std::fs::write(&path, config).unwrap();
    let out = knockd_tests::knockctl(&daemon.control_socket(), &["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Every TCP port, then every UDP port, once each at a high rate: all
    // that answers is public. Then the few ports that matter, with retries,
    // so a probe lost to the rate cannot pass for silence.
    let fast = ["--max-retries", "0", "--min-rate", "20000", "-p-"];
    let tcp = nmap(&bed, &[&["-sS"][..], &fast].concat());
    let answered: Vec<_> = tcp
        .listed
        .iter()
        .filter(|(_, s)| *s != "filtered")
        .collect();
    assert!(
        answered
            .iter()
            .all(|((port, _), state)| *port == WEB && *state == "open"),
        "TCP ports that answered a dark host's scan: {answered:?}"
    );
    assert_eq!(
        tcp.ignored,
        Some(("filtered".into(), 65534)),
        "{:?}",
        tcp.listed
    );
    let udp = nmap(&bed, &[&["-sU"][..], &fast].concat());
    let answered: Vec<_> = udp
        .listed
        .iter()
        .filter(|(_, s)| *s != "open|filtered")
        .collect();
    assert!(
        answered
            .iter()
            .all(|((port, _), state)| *port == PUBLIC_UDP && *state == "open"),
        "UDP ports that answered a dark host's scan: {answered:?}"
    );
    let udp_silent = udp.ignored.as_ref().map_or(0, |(_, n)| *n);
    assert!(udp_silent >= 65534, "{:?}", udp.ignored);
    let dark = nmap(&bed, &targeted).listed;
    assert_eq!(dark.get(&(WEB, "tcp")).map(String::as_str), Some("open"));
    assert_eq!(
        dark.get(&(PUBLIC_UDP, "udp")).map(String::as_str),
        Some("open")
    );
    for ((port, _), state) in &dark {
        if ![WEB, PUBLIC_UDP].contains(port) {
            assert!(
                state == "filtered" || state == "open|filtered",
                "port {port} is {state} on a dark host"
            );
        }
    }
    let closed_drops = daemon.maps().counters().unwrap().get(Counter::DropClosed);
    assert!(closed_drops >= 64000, "drop_closed counted {closed_drops}");

    // Silent to ping too.
    let ping = bed
        .testbed
        .client
        .command("ping")
        .args(["-c", "2", "-W", "1", &server.to_string()])
        .output()
        .unwrap();
    assert!(!ping.status.success(), "a dark host answered ping");

    // The door still opens, through a grant.
    bed.open_and_connect();

    // The host's own traffic: a TCP connection and a UDP exchange it
    // starts get their replies.
    let (_, client, _) = addrs::family(v6);
    bed.testbed.client.run(|| {
        probe::echo_server(SocketAddr::new(client, 7777));
        probe::udp_echo_server(SocketAddr::new(client, 5353));
    });
    bed.testbed.server.run(|| {
        let (outcome, stream) = probe::tcp_connect(
            Some(server),
            SocketAddr::new(client, 7777),
            Duration::from_secs(3),
        );
        assert_eq!(outcome, Outcome::Answered, "the host's own TCP connection");
        assert!(probe::echo_round_trip(&mut stream.unwrap(), b"out"));
        assert_eq!(
            probe::udp_probe(
                server,
                SocketAddr::new(client, 5353),
                Duration::from_secs(3)
            ),
            Outcome::Answered,
            "the reply to the host's own UDP query"
        );
    });
    // And from a port nobody else may start a flow to: the same client
    // port, unasked, is dropped.
    let from = SocketAddr::new(client, 5353);
    let to = SocketAddr::new(server, UNLISTED_UDP);
    let outcome = bed
        .testbed
        .client
        .run(|| probe::udp_probe(from.ip(), to, Duration::from_millis(800)));
    assert_eq!(outcome, Outcome::Silent, "an unlisted UDP service answered");
    daemon.assert_running();
    let knock = bed.knock(&bed.socket(), Kind::Open);
    assert!(knock.reply.port >= 40000);
    eprintln!(
        "dark host ({}): TCP {} filtered, UDP {udp_silent} open|filtered, drop_closed {closed_drops}",
        if v6 { "IPv6" } else { "IPv4" },
        tcp.ignored.unwrap().1
    );
}

#[test]
fn a_dark_host_shows_a_scan_only_its_public_ports_v4() {
    require_privileges!();
    dark_host(false);
}

#[test]
fn a_dark_host_shows_a_scan_only_its_public_ports_v6() {
    require_privileges!();
    dark_host(true);
}

/// `check-config` names a session the configuration would lock out: an
/// established connection to a port that a dark host closes.
#[test]
fn check_config_warns_of_a_session_it_would_lock_out() {
    require_privileges!();
    let bed = Bed::new(false);
    let server = bed.server;
    bed.testbed
        .server
        .run(|| probe::echo_server(SocketAddr::new(server, UNLISTED_TCP)));
    let to = SocketAddr::new(server, UNLISTED_TCP);
    let client: IpAddr = bed.client;
    let (outcome, _session) = bed
        .testbed
        .client
        .run(move || probe::tcp_connect(Some(client), to, Duration::from_secs(3)));
    assert_eq!(outcome, Outcome::Answered);
    let config = format!("{}closed_ports: drop\n", bed.config(""));
    let path = bed.dir.path().join("knockd.yaml");
    std::fs::write(&path, config).unwrap();
    let out = bed
        .testbed
        .server
        .command(knockd_tests::knockd_bin())
        .arg("check-config")
        .arg(&path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "warning: closed_ports: drop: a session from {client} is in progress on port {UNLISTED_TCP}"
        )),
        "{stdout}"
    );
}
