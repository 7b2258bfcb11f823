//! knockd's benchmarks, run by `cargo xtask bench` (root, namespaces).
//!
//! Every number is printed beside a baseline measured in the same run, as a
//! ratio: timing on a shared machine varies, ratios much less.
//!
//! - `grants`: installs 100,000 grants (nftables elements and XDP allow
//!   entries, as the daemon does), reports the install rate, and the
//!   connect latency of a granted client at 1 and at 100,000 grants against
//!   a plain socket on the same veth.
//! - `knock`: knock-to-open latency of the real daemon (knocks sent → first
//!   successful connect through the granted port), p50/p99 over 100 trials,
//!   against a plain connect.
//! - `revoke`: a revoke request to the real daemon that cuts one established
//!   connection, with an empty conntrack table and with 100,000 other
//!   flows in it (revoke looks its flows up by exact tuple, so the table's
//!   size should not show), against a `grants` request on the same control
//!   socket.
//! - `drop`: what a dropped packet costs the guard, beside a bare XDP_DROP
//!   and nftables drops, with live XDP frames (see `drop.rs`);
//! - `footprint`: start → ready, RSS, opens, heartbeats, status and
//!   listing with 1,000,000 grants (`KNOCKD_BENCH_GRANTS` for another
//!   count), revoke with 100,000 other flows (see `footprint.rs`);
//! - `peers`: knock-to-open side by side with Debian's knockd and fwknopd,
//!   then knock under floods, drop cost and footprint, all written to
//!   target/bench/peers.{json,md,svg} (see `peers.rs`).

use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket},
    os::unix::{fs::PermissionsExt as _, net::UnixStream},
    path::Path,
    time::{Duration, Instant},
};

use knockd::{
    client::{self, Target},
    guard::{Guard, KernelLogLevel},
    maps::{GuardMaps, PortPolicy, Proto},
    nft::{self, DoorRules, Element, GrantKey},
    proto::{DeviceKey, Kind},
};
use knockd_common::policy;
use knockd_tests::{Daemon, Testbed, addrs, probe};
use netlink_packet_core::{
    NLM_F_ACK, NLM_F_CREATE, NLM_F_REQUEST, NetlinkHeader, NetlinkMessage, NetlinkPayload,
};
use netlink_packet_netfilter::{
    NetfilterHeader, NetfilterMessage, NetfilterProtoFamily,
    conntrack::{
        ConntrackAttribute, ConntrackMessage, IPTuple, ProtoInfo, ProtoInfoTCP, ProtoTuple,
        Protocol, Tuple,
    },
};

mod cluster;
mod drop;
mod footprint;
mod peers;

const SSH: u16 = 22;
const PLAIN: u16 = 8080;
const GRANTS: u32 = 100_000;
const CONNECTS: usize = 300;
const TRIALS: usize = 100;
/// Other flows in the conntrack table for the revoke benchmark.
const FLOWS: u32 = 100_000;
/// Revokes per table size: each needs a fresh one-time sequence, and a
/// device completes at most 16 per time step (16 devices here).
const REVOKES: usize = 30;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn summary(
    name: &str,
    mut samples: Vec<Duration>,
    baseline: Option<(Duration, Duration)>,
) -> (Duration, Duration) {
    samples.sort();
    let (p50, p99) = (percentile(&samples, 0.5), percentile(&samples, 0.99));
    let ratio = baseline.map_or(String::new(), |(b50, b99)| {
        format!(
            "   ({:.2}x / {:.2}x the baseline)",
            p50.as_secs_f64() / b50.as_secs_f64(),
            p99.as_secs_f64() / b99.as_secs_f64()
        )
    });
    println!(
        "{name:<44} p50 {:>8.1} µs   p99 {:>8.1} µs{ratio}",
        p50.as_secs_f64() * 1e6,
        p99.as_secs_f64() * 1e6
    );
    (p50, p99)
}

/// Connect latencies from the client namespace to `to`, from `from`.
fn connects(testbed: &Testbed, from: IpAddr, to: SocketAddr) -> Vec<Duration> {
    testbed.client.run(move || {
        (0..CONNECTS)
            .map(|_| {
                let start = Instant::now();
                let (outcome, stream) = probe::tcp_connect(Some(from), to, Duration::from_secs(2));
                let took = start.elapsed();
                assert_eq!(outcome, probe::Outcome::Answered, "connect to {to}");
                drop(stream);
                took
            })
            .collect()
    })
}

/// The `n`th synthetic grant source: distinct addresses, the first
/// 110,000 in 198.18.0.0/15 (from 198.18.16.0), the rest in
/// 2001:db8:1::/64, so a million stay inside the test ranges.
fn source(n: u32) -> IpAddr {
    const V4: u32 = 110_000;
    if n < V4 {
        let base = u32::from(Ipv4Addr::new(198, 18, 16, 0));
        IpAddr::V4(Ipv4Addr::from(base + n))
    } else {
        let base = u128::from(std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 0));
        IpAddr::V6(std::net::Ipv6Addr::from(base + u128::from(n - V4)))
    }
}

/// Grants `first..first + n` of door `door`: source [`source`]`(i)`, port
/// `base + i % span`, each for `ttl`.
fn synthetic_grants(
    door: &str,
    first: u32,
    n: u32,
    base: u16,
    span: u32,
    ttl: Duration,
) -> Vec<Element> {
    (first..first + n)
        .map(|i| Element {
            door: door.into(),
            key: GrantKey {
                source: source(i),
                port: base + (i % span) as u16,
            },
            timeout: ttl,
            // A device each, as a fleet of sensors would hold them: the
            // daemon indexes them by device too.
            device: Some(format!("sensor-{i}")),
        })
        .collect()
}

fn bench_grants() {
    println!("== grants: install rate and connect latency at 1 and {GRANTS} grants");
    let testbed = Testbed::new();
    let (server, client, _) = addrs::family(false);
    testbed.server.run(|| {
        probe::echo_server(SocketAddr::new(server, SSH));
        probe::echo_server(SocketAddr::new(server, PLAIN));
    });
    let door = DoorRules {
        name: "ssh".into(),
        grant_ports: 40000..=40999,
        service_port: SSH,
    };
    // The XDP guard, as the daemon loads it.
    let (mut guard, _logger) = Guard::load(KernelLogLevel::Warn).unwrap();
    let mut maps = GuardMaps::take(guard.ebpf_mut(), None).unwrap();
    let mut table = PortPolicy::empty();
    for port in door.grant_ports.clone() {
        table.set(Proto::Tcp, port, policy::PROTECTED | policy::ALLOWS);
    }
    table.set(Proto::Tcp, SSH, policy::PROTECTED);
    maps.apply_port_policy(&table).unwrap();
    let server_if = testbed.server_if.clone();
    testbed.server.run(|| {
        let rules = nft::TableRules {
            doors: vec![door.clone()],
            interfaces: vec![server_if.clone()],
            guarded_tcp: vec![SSH..=SSH, door.grant_ports.clone()],
            guarded_udp: Vec::new(),
            dark: None,
        };
        nft::install(&rules).unwrap();
        guard
            .attach(&server_if, knockd::config::XdpMode::Native)
            .unwrap();
    });

    let baseline = summary(
        "plain socket (baseline)",
        connects(&testbed, client, SocketAddr::new(server, PLAIN)),
        None,
    );
    let ttl = Duration::from_secs(600);
    let granted = GrantKey {
        source: client,
        port: 40001,
    };
    testbed.server.run(|| {
        nft::update_grants(
            &[Element {
                door: "ssh".into(),
                key: granted,
                timeout: ttl,
                device: None,
            }],
            &[],
        )
        .unwrap();
    });
    maps.allow(client, Proto::Tcp, granted.port, Some(ttl))
        .unwrap();
    summary(
        "granted port, 1 grant",
        connects(&testbed, client, SocketAddr::new(server, granted.port)),
        Some(baseline),
    );

    // One grant at a time, as a knock adds it: one nftables transaction
    // each, timed on the thread that runs it (as the daemon's own thread
    // would), not around the thread that enters the namespace.
    let singles: Vec<Duration> = testbed.server.run(|| {
        (0..50u32)
            .map(|n| {
                let element = Element {
                    door: "ssh".into(),
                    key: GrantKey {
                        source: source(GRANTS + n),
                        port: 40500,
                    },
                    timeout: ttl,
                    device: None,
                };
                let start = Instant::now();
                nft::update_grants(std::slice::from_ref(&element), &[]).unwrap();
                let took = start.elapsed();
                nft::update_grants(&[], &[element]).unwrap();
                took
            })
            .collect()
    });
    summary("one grant, one nftables transaction", singles, None);

    // 100k more grants, in batches, as a daemon under load would add them.
    let batch = 1000;
    let start = Instant::now();
    let mut nft_time = Duration::ZERO;
    for chunk in 0..GRANTS / batch {
        let elements = synthetic_grants("ssh", chunk * batch, batch, 40002, 998, ttl);
        let t = Instant::now();
        testbed
            .server
            .run(|| nft::update_grants(&elements, &[]).unwrap());
        nft_time += t.elapsed();
        for e in &elements {
            maps.allow(e.key.source, Proto::Tcp, e.key.port, Some(ttl))
                .unwrap();
        }
    }
    let total = start.elapsed();
    let listed = testbed
        .server
        .run(|| nft::list_grants(&["ssh"]).unwrap())
        .len();
    assert_eq!(listed, GRANTS as usize + 1, "every grant is in the table");
    println!(
        "installed {GRANTS} grants in {:.2} s: {:.0} grants/s (nftables alone {:.0}/s, in batches of {batch})",
        total.as_secs_f64(),
        f64::from(GRANTS) / total.as_secs_f64(),
        f64::from(GRANTS) / nft_time.as_secs_f64(),
    );
    let plain_again = summary(
        "plain socket (baseline, again)",
        connects(&testbed, client, SocketAddr::new(server, PLAIN)),
        None,
    );
    summary(
        &format!("granted port, {GRANTS} grants"),
        connects(&testbed, client, SocketAddr::new(server, granted.port)),
        Some(plain_again),
    );
    testbed.server.run(|| nft::uninstall().unwrap());
}

fn bench_knock() {
    println!("== knock-to-open: knocks sent -> first successful connect, {TRIALS} trials");
    let testbed = Testbed::new();
    let (server, client, _) = addrs::family(false);
    testbed.server.run(|| {
        probe::echo_server(SocketAddr::new(server, SSH));
        probe::echo_server(SocketAddr::new(server, PLAIN));
    });
    let (_daemon, keys, _dir) = bench_daemon(&testbed);
    let sources = client_sources(&testbed, 64);
    let baseline = summary(
        "plain connect (baseline)",
        connects(&testbed, client, SocketAddr::new(server, PLAIN)),
        None,
    );
    let samples: Vec<(Duration, Duration)> = testbed.client.run(|| {
        (0..TRIALS)
            .map(|trial| {
                let client = sources[trial % sources.len()];
                let socket = UdpSocket::bind(SocketAddr::new(client, 0)).unwrap();
                let target = bench_target(server, &keys[trial % keys.len()]);
                let start = Instant::now();
                let answer =
                    client::knock_from(&socket, &target, Kind::Open, Duration::from_secs(10))
                        .unwrap();
                let replied = start.elapsed();
                let to = SocketAddr::new(server, answer.reply.port);
                let (outcome, _) = probe::tcp_connect(Some(client), to, Duration::from_secs(2));
                let took = start.elapsed();
                assert_eq!(outcome, probe::Outcome::Answered);
                client::knock_from(&socket, &target, Kind::Close, Duration::from_secs(10)).unwrap();
                (replied, took)
            })
            .collect()
    });
    summary(
        "knock -> sealed reply",
        samples.iter().map(|s| s.0).collect(),
        None,
    );
    summary(
        "knock -> reply -> connect (ours)",
        samples.iter().map(|s| s.1).collect(),
        Some(baseline),
    );
}

/// The real daemon on `testbed`'s server with door "ssh" on the echo
/// service, and sixteen devices (a device may complete 16 sequences per
/// time step), with the default knock rate limit: benchmarks that knock
/// hundreds of times knock from many addresses ([`client_sources`]), as
/// many clients would. Returns the daemon, the devices' keys, and the
/// directory holding their files.
fn bench_daemon(testbed: &Testbed) -> (Daemon, Vec<DeviceKey>, tempfile::TempDir) {
    bench_daemon_with(testbed, "")
}

/// [`bench_daemon`] with more doors: `more_doors` follows the ssh door in
/// the `doors` map (`, name: { … }`).
fn bench_daemon_with(
    testbed: &Testbed,
    more_doors: &str,
) -> (Daemon, Vec<DeviceKey>, tempfile::TempDir) {
    bench_daemon_config(testbed, more_doors, "")
}

/// [`bench_daemon_with`], with `top` (top-level YAML lines) in its
/// configuration.
fn bench_daemon_config(
    testbed: &Testbed,
    more_doors: &str,
    top: &str,
) -> (Daemon, Vec<DeviceKey>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let keys: Vec<DeviceKey> = (0..16).map(|_| DeviceKey::generate()).collect();
    let mut devices = String::new();
    for (i, key) in keys.iter().enumerate() {
        let path = dir.path().join(format!("d{i}.key"));
        std::fs::write(&path, key.to_hex()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        devices.push_str(&format!(
            "  d{i}: {{ key_file: {}, groups: [bench] }}\n",
            path.display()
        ));
    }
    let config = format!(
        "interfaces: [{}]\nxdp_mode: native\ndevices:\n{devices}\
         doors: {{ ssh: {{ service_port: {SSH}, allow: {{ groups: [bench] }} }}{more_doors} }}\n{top}",
        testbed.server_if
    );
    (Daemon::start(&testbed.server, &config), keys, dir)
}

/// A process's resident set size, in KiB (`field`: `VmRSS:`, or `VmHWM:`
/// for the peak).
pub fn rss_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

/// Addresses the client can knock from: 198.18.0.100 on, `n` of them,
/// added to the client's veth. Each knocks rarely enough to stay inside
/// the default per-source rate limit (20 a second, bursts of 40).
pub fn client_sources(testbed: &Testbed, n: u8) -> Vec<IpAddr> {
    (0..n)
        .map(|i| {
            let addr = IpAddr::V4(Ipv4Addr::new(198, 18, 0, 100 + i));
            testbed.client.ip(&[
                "addr",
                "replace",
                &format!("{addr}/24"),
                "dev",
                &testbed.client_if,
            ]);
            addr
        })
        .collect()
}

/// The bench door ("ssh", the default knock settings) at `server`, knocked
/// with `key`.
fn bench_target(server: IpAddr, key: &DeviceKey) -> Target {
    knockd_tests::bed::default_target(server, key.clone())
}

/// Adds `n` established TCP flows to `server`'s port 22 from synthetic
/// sources to the conntrack table of this thread's namespace, through
/// ctnetlink as `conntrack -I` would, one acknowledged message each. No
/// packet is sent.
fn fill_conntrack(server: IpAddr, n: u32) {
    let socket = mnl::Socket::new(mnl::Bus::Netfilter).unwrap();
    let mut buffer = vec![0u8; 8192];
    for i in 0..n {
        let (from, sport) = (source(i), 10_000 + (i % 50_000) as u16);
        let tuple = |src: IpAddr, dst: IpAddr, sport: u16, dport: u16| {
            vec![
                Tuple::Ip(vec![
                    IPTuple::SourceAddress(src),
                    IPTuple::DestinationAddress(dst),
                ]),
                Tuple::Proto(vec![
                    ProtoTuple::Protocol(Protocol::Tcp),
                    ProtoTuple::SourcePort(sport),
                    ProtoTuple::DestinationPort(dport),
                ]),
            ]
        };
        let entry = ConntrackMessage::New(vec![
            ConntrackAttribute::CtaTupleOrig(tuple(from, server, sport, SSH)),
            ConntrackAttribute::CtaTupleReply(tuple(server, from, SSH, sport)),
            ConntrackAttribute::CtaProtoInfo(vec![ProtoInfo::TCP(vec![ProtoInfoTCP::State(3)])]),
            ConntrackAttribute::CtaTimeout(600),
        ]);
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_ACK;
        header.sequence_number = i + 1;
        let mut message = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(NetfilterMessage::new(
                NetfilterHeader::new(NetfilterProtoFamily::IPv4, 0, 0),
                entry,
            )),
        );
        message.finalize();
        let mut bytes = vec![0; message.buffer_len()];
        message.serialize(&mut bytes);
        socket.send(&bytes).unwrap();
        let len = socket.recv_raw(&mut buffer).unwrap();
        mnl::cb_run(&buffer[..len], i + 1, socket.portid()).expect("conntrack took the entry");
    }
}

/// One control-socket request's round trip; returns the reply's data.
fn control(socket: &Path, request: serde_json::Value) -> (Duration, serde_json::Value) {
    let (took, reply) = control_raw(socket, request);
    assert_eq!(reply["ok"], true, "{reply}");
    (took, reply["data"].clone())
}

/// [`control`], whatever the answer: the reply itself.
fn control_raw(socket: &Path, mut request: serde_json::Value) -> (Duration, serde_json::Value) {
    request["version"] = 1.into();
    let mut line = serde_json::to_vec(&request).unwrap();
    line.push(b'\n');
    let start = Instant::now();
    let mut stream = UnixStream::connect(socket).unwrap();
    stream.write_all(&line).unwrap();
    let mut reply = String::new();
    BufReader::new(&stream).read_line(&mut reply).unwrap();
    let took = start.elapsed();
    let reply: serde_json::Value = serde_json::from_str(&reply).unwrap();
    (took, reply)
}

/// `REVOKES` revokes of a fresh one-time grant, each cutting the one
/// connection its client made, from `sources` in turn: the time of each
/// revoke request.
fn revoke_trials(
    testbed: &Testbed,
    daemon: &Daemon,
    keys: &[DeviceKey],
    sources: &[IpAddr],
    trial: &mut usize,
) -> Vec<Duration> {
    let (server, _, _) = addrs::family(false);
    let socket = daemon.control_socket();
    (0..REVOKES)
        .map(|_| {
            let target = bench_target(server, &keys[*trial % keys.len()]);
            let client = sources[*trial % sources.len()];
            *trial += 1;
            let knocks = testbed
                .client
                .run(move || UdpSocket::bind(SocketAddr::new(client, 0)).unwrap());
            let answer =
                client::knock_from(&knocks, &target, Kind::Open, Duration::from_secs(10)).unwrap();
            let to = SocketAddr::new(server, answer.reply.port);
            let (outcome, stream) = testbed
                .client
                .run(move || probe::tcp_connect(Some(client), to, Duration::from_secs(2)));
            assert_eq!(outcome, probe::Outcome::Answered);
            let mut stream = stream.unwrap();
            assert!(probe::echo_round_trip(&mut stream, b"up"));
            let (took, data) = control(
                &socket,
                serde_json::json!({"command": "revoke", "target": client.to_string()}),
            );
            assert_eq!(data["connections_cut"], 1, "{data}");
            took
        })
        .collect()
}

fn bench_revoke() {
    println!(
        "== revoke: a revoke that cuts one established connection, {REVOKES} trials per conntrack table size"
    );
    let testbed = Testbed::new();
    let (server, _, _) = addrs::family(false);
    testbed.server.run(|| {
        probe::echo_server(SocketAddr::new(server, SSH));
    });
    let (daemon, keys, _dir) = bench_daemon(&testbed);
    let socket = daemon.control_socket();
    let sources = client_sources(&testbed, 64);
    let mut trial = 0;
    for flows in [0, FLOWS] {
        if flows > 0 {
            let start = Instant::now();
            testbed.server.run(|| fill_conntrack(server, flows));
            println!(
                "(conntrack filled with {flows} flows in {:.1} s)",
                start.elapsed().as_secs_f64()
            );
        }
        let baseline = summary(
            &format!("grants request, {flows} flows (baseline)"),
            (0..REVOKES)
                .map(|_| control(&socket, serde_json::json!({"command": "grants"})).0)
                .collect(),
            None,
        );
        let samples = revoke_trials(&testbed, &daemon, &keys, &sources, &mut trial);
        summary(
            &format!("revoke request, {flows} flows"),
            samples,
            Some(baseline),
        );
    }
}

fn main() {
    assert!(knockd_tests::privileged(), "benchmarks need root");
    let which = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let known = [
        "grants",
        "knock",
        "revoke",
        "drop",
        "footprint",
        "peers",
        "cluster",
        "all",
    ];
    assert!(
        known.contains(&which.as_str()),
        "unknown benchmark {which:?}; one of {known:?}"
    );
    // Measure what ships: the daemon logs at info, not the tests' debug
    // (a line per knock).
    if std::env::var_os("KNOCKD_TEST_LOG_LEVEL").is_none() {
        // SAFETY: no other thread exists yet to read the environment.
        unsafe { std::env::set_var("KNOCKD_TEST_LOG_LEVEL", "info") };
    }
    if which == "grants" || which == "all" {
        bench_grants();
    }
    if which == "knock" || which == "all" {
        bench_knock();
    }
    if which == "revoke" || which == "all" {
        bench_revoke();
    }
    if which == "footprint" {
        let figures = footprint::run();
        println!("\n{}", footprint::table(&figures));
    }
    if which == "cluster" {
        cluster::run();
    }
    if which == "drop" {
        let results = drop::run();
        println!("\n{}", drop::table(&results));
    }
    if which == "peers" || which == "all" {
        peers::run();
    }
}
