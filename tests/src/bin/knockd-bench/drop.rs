//! Drop cost: what the guard costs per packet it drops, beside a bare
//! XDP_DROP and nftables drops, on the same kind of veth, in one run.
//!
//! Each receiver is the server end of its own veth pair, with threaded NAPI
//! pinned to CPU 1; the generator ([`knockd_tests::livegen`], `XDP_TX` of
//! live frames, `FRAMES` a call) runs in the client namespace, in two
//! placements:
//! - `split`: pinned to CPU 0. It pushes faster than any receiver drains,
//!   so each receiver runs flat out; but the frames' pages cross CPUs both
//!   ways, and on this 2-vCPU VM the slower a receiver, the more of its
//!   time goes to contended locks and cache lines of the generator's page
//!   pool and the veth ring (a third of the receiving CPU's samples in
//!   `__pv_queued_spin_lock_slowpath` under `veth_xdp_rcv_one`, `perf
//!   record -g -C 1`), which inflates slow receivers' ns/packet from round
//!   to round;
//! - `shared`: on CPU 1 with the NAPI thread, which then takes turns with
//!   it: no cross-CPU traffic, so ns/packet is the receive path's own cost,
//!   stable to a few percent.
//!
//! Per call:
//! - Mpps: the frames the receiver took off its ring (veth's
//!   `rx_queue_0_xdp_packets`) over the call's wall time;
//! - ns/packet: the NAPI thread's CPU time (`/proc/PID/schedstat`) over
//!   those frames, which holds whether or not the receiver was saturated.
//!
//! Variants, interleaved in a random order in each of `ROUNDS` rounds:
//! - the guard as the daemon attaches it, with one live grant: a SYN to the
//!   service port, a SYN to the granted port from a stranger, and a UDP
//!   datagram to a knock port not valid now;
//! - a bare XDP_DROP;
//! - xdp-tools' `xdp-filter` (Debian's `xdp-tools`), the program operators
//!   already run to drop by port at XDP: loaded native with its defaults
//!   (every feature, policy allow), dropping TCP to the service port. Its
//!   port list is an array indexed by port, so one port costs a lookup as
//!   the guard's set of ranges would;
//! - an nftables `inet` input drop, and a `netdev` ingress drop (GRO on, so
//!   the veth hands frames to the stack from NAPI).

use std::{
    collections::BTreeSet,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::OwnedFd,
    process::Command,
    time::{Duration, Instant},
};

use knockd::{client, maps::Proto, proto::Kind};
use knockd_common::policy;
use knockd_tests::{
    Daemon, Testbed, addrs,
    frames::{self, CLIENT_MAC, SERVER_MAC, SYN},
    livegen, probe, sh,
};
use rand::seq::SliceRandom as _;

use crate::{bench_daemon, bench_target};

/// Frames per generator call.
const FRAMES: u32 = 4_000_000;
/// Rounds; every variant runs once per round.
const ROUNDS: usize = 5;
const SSH: u16 = 22;
const NAPI_CPU: usize = 1;

/// Where the generator runs: (name, CPU).
const PLACEMENTS: [(&str, usize); 2] = [("split", 0), ("shared", NAPI_CPU)];

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Variant {
    GuardService,
    GuardStranger,
    GuardKnock,
    BareDrop,
    XdpFilter,
    NftInput,
    NftIngress,
}

impl Variant {
    const ALL: [Variant; 7] = [
        Variant::GuardService,
        Variant::GuardStranger,
        Variant::GuardKnock,
        Variant::BareDrop,
        Variant::XdpFilter,
        Variant::NftInput,
        Variant::NftIngress,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::GuardService => "guard: SYN to the service port",
            Variant::GuardStranger => "guard: SYN to a granted port, stranger",
            Variant::GuardKnock => "guard: UDP to a knock port not valid now",
            Variant::BareDrop => "bare XDP_DROP",
            Variant::XdpFilter => "xdp-filter (xdp-tools, ports mode): SYN to the service port",
            Variant::NftInput => "nftables inet input drop",
            Variant::NftIngress => "nftables netdev ingress drop",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Variant::GuardService => "guard_syn_service",
            Variant::GuardStranger => "guard_syn_granted_stranger",
            Variant::GuardKnock => "guard_udp_knock_not_valid",
            Variant::BareDrop => "bare_xdp_drop",
            Variant::XdpFilter => "xdp_filter_syn_service",
            Variant::NftInput => "nft_inet_input_drop",
            Variant::NftIngress => "nft_netdev_ingress_drop",
        }
    }
}

/// One receiver: a veth pair whose server end drops, and its NAPI thread.
struct Stand {
    testbed: Testbed,
    napi: libc::pid_t,
    client_ifindex: u32,
    /// Keep the receiver's bare XDP_DROP and the sender's XDP_PASS
    /// attached.
    _links: [Option<OwnedFd>; 2],
}

/// The pids of the kernel's NAPI threads now.
fn napi_threads() -> BTreeSet<libc::pid_t> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let pid: libc::pid_t = e.file_name().to_str()?.parse().ok()?;
            let comm = std::fs::read_to_string(e.path().join("comm")).ok()?;
            comm.starts_with("napi/").then_some(pid)
        })
        .collect()
}

/// Gives both ends of `testbed`'s veth the MACs the frames module
/// addresses frames to and from. Do it before any traffic (neighbour
/// caches).
pub fn fixed_macs(testbed: &Testbed) {
    let mac = |m: [u8; 6]| {
        m.iter()
            .map(|b| format!("{b:02x}"))
            .collect::<Vec<_>>()
            .join(":")
    };
    testbed.server.ip(&[
        "link",
        "set",
        &testbed.server_if,
        "address",
        &mac(SERVER_MAC),
    ]);
    testbed.client.ip(&[
        "link",
        "set",
        &testbed.client_if,
        "address",
        &mac(CLIENT_MAC),
    ]);
}

/// Makes the server veth's NAPI threaded (it must have NAPI: XDP attached,
/// or GRO on) and pins the thread to `cpu`. Returns its pid.
pub fn threaded_napi(testbed: &Testbed, cpu: usize) -> libc::pid_t {
    let before = napi_threads();
    // `ip netns exec` mounts the namespace's own /sys (nsenter does not).
    sh(Command::new("ip").args([
        "netns",
        "exec",
        testbed.server.name(),
        "sh",
        "-c",
        &format!("echo 1 > /sys/class/net/{}/threaded", testbed.server_if),
    ]));
    let new: Vec<libc::pid_t> = napi_threads().difference(&before).copied().collect();
    assert_eq!(
        new.len(),
        1,
        "one NAPI thread for {}: {new:?}",
        testbed.server_if
    );
    livegen::pin_to_cpu(new[0], cpu).unwrap();
    new[0]
}

/// The client veth's index, for the generator, and an XDP_PASS attached
/// to it (kept while the returned descriptor lives): a live-frames run
/// starts from the named interface's receive queue, which veth sets up
/// for XDP while a program is attached.
pub fn generator_side(testbed: &Testbed) -> (u32, OwnedFd) {
    let client_if = testbed.client_if.clone();
    testbed.client.run(|| {
        let index = livegen::ifindex(&client_if).unwrap();
        let prog = livegen::xdp_returning(livegen::XDP_PASS, "client_pass").unwrap();
        (index, livegen::attach_xdp(&prog, index).unwrap())
    })
}

/// Frames the server veth has taken off its ring.
pub fn received(testbed: &Testbed) -> u64 {
    let out = sh(testbed
        .server
        .command("ethtool")
        .args(["-S", &testbed.server_if]));
    out.lines()
        .find_map(|l| l.trim().strip_prefix("rx_queue_0_xdp_packets:"))
        .and_then(|v| v.trim().parse().ok())
        .expect("veth reports rx_queue_0_xdp_packets")
}

impl Stand {
    /// `testbed` with fixed MACs (the frames are addressed to them), its
    /// receiver already set up (which must give the veth NAPI: XDP
    /// attached, or GRO on), and its NAPI thread made threaded and pinned.
    fn new(testbed: Testbed, link: Option<OwnedFd>) -> Stand {
        fixed_macs(&testbed);
        Stand::with_napi(testbed, link)
    }

    fn with_napi(testbed: Testbed, link: Option<OwnedFd>) -> Stand {
        let napi = threaded_napi(&testbed, NAPI_CPU);
        let (client_ifindex, pass) = generator_side(&testbed);
        Stand {
            testbed,
            napi,
            client_ifindex,
            _links: [link, Some(pass)],
        }
    }

    fn gro_on(testbed: &Testbed) {
        sh(testbed
            .server
            .command("ethtool")
            .args(["-K", &testbed.server_if, "gro", "on"]));
    }

    fn received(&self) -> u64 {
        received(&self.testbed)
    }

    /// The NAPI thread's CPU time so far.
    fn napi_cpu(&self) -> Duration {
        let text = std::fs::read_to_string(format!("/proc/{}/schedstat", self.napi)).unwrap();
        let ns: u64 = text.split_whitespace().next().unwrap().parse().unwrap();
        Duration::from_nanos(ns)
    }

    /// One generator call of `frame`: (Mpps received, ns of NAPI CPU per
    /// packet).
    fn round(&self, tx: &OwnedFd, frame: &[u8], gen_cpu: usize) -> (f64, f64) {
        let (received, cpu) = (self.received(), self.napi_cpu());
        let ifindex = self.client_ifindex;
        let wall = self.testbed.client.run(|| {
            livegen::pin_to_cpu(0, gen_cpu).unwrap();
            let start = Instant::now();
            livegen::transmit(tx, ifindex, frame, FRAMES).expect("live-frames test run");
            start.elapsed()
        });
        // Let the receiver drain its ring before reading its counters.
        std::thread::sleep(Duration::from_millis(50));
        let packets = (self.received() - received) as f64;
        let cpu = (self.napi_cpu() - cpu).as_nanos() as f64;
        assert!(packets > 0.0, "the receiver got nothing");
        (packets / wall.as_secs_f64() / 1e6, cpu / packets)
    }
}

/// A SYN from `src` to `dst:dport` (IPv4), as the drop and flood benches
/// send it.
pub fn tcp_syn(src: IpAddr, dst: IpAddr, dport: u16) -> Vec<u8> {
    let (IpAddr::V4(src), IpAddr::V4(dst)) = (src, dst) else {
        unreachable!("IPv4 frames")
    };
    frames::eth4(frames::ipv4(
        src.octets(),
        dst.octets(),
        frames::tcp(40000, dport, SYN),
        &[],
        (false, 0),
    ))
}

/// A UDP datagram from `src` to `dst:dport`, IPv4 or IPv6.
pub fn udp(src: IpAddr, dst: IpAddr, dport: u16, payload: &[u8]) -> Vec<u8> {
    let l4 = frames::udp(40000, dport, payload);
    match (src, dst) {
        (IpAddr::V4(src), IpAddr::V4(dst)) => frames::eth4(frames::ipv4(
            src.octets(),
            dst.octets(),
            l4,
            &[],
            (false, 0),
        )),
        (IpAddr::V6(src), IpAddr::V6(dst)) => {
            frames::eth6(frames::ipv6(src.octets(), dst.octets(), &[], l4))
        }
        _ => unreachable!("one family"),
    }
}

/// One variant's results over the rounds.
pub struct Measured {
    pub placement: &'static str,
    pub key: &'static str,
    pub name: &'static str,
    pub mpps: Vec<f64>,
    pub ns: Vec<f64>,
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spread(values: &[f64]) -> (f64, f64) {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    (min, max)
}

/// The guard's stand: the real daemon, one grant for the client's second
/// address. Returns it with the three frames and the daemon.
fn guard_stand() -> (Stand, Daemon, Vec<(Variant, Vec<u8>)>, tempfile::TempDir) {
    let testbed = Testbed::new();
    let (server, client, other) = addrs::family(false);
    testbed
        .server
        .run(|| probe::echo_server(SocketAddr::new(server, SSH)));
    // MACs first: the daemon's knock and reply go over this link too.
    fixed_macs(&testbed);
    let (daemon, keys, dir) = bench_daemon(&testbed);
    let target = bench_target(server, &keys[0]);
    let granted = testbed.client.run(|| {
        let socket = UdpSocket::bind(SocketAddr::new(other, 0)).unwrap();
        client::knock_from(&socket, &target, Kind::Open, Duration::from_secs(5))
            .unwrap()
            .reply
            .port
    });
    let policy = daemon.maps();
    let knock_port = (7000..=7999u16)
        .find(|&p| {
            let flags = policy.policy().get(Proto::Udp, p);
            flags & policy::PROTECTED != 0 && flags & policy::KNOCK == 0
        })
        .expect("a knock-range port not valid now");
    let frames = vec![
        (Variant::GuardService, tcp_syn(client, server, SSH)),
        (Variant::GuardStranger, tcp_syn(client, server, granted)),
        (
            Variant::GuardKnock,
            udp(client, server, knock_port, &[0; 68]),
        ),
    ];
    (Stand::with_napi(testbed, None), daemon, frames, dir)
}

/// xdp-filter loaded on a stand's server veth; unloaded (its pinned maps
/// removed with it) when dropped, before the stand's namespaces go, panic
/// included.
struct XdpFilter {
    /// The server namespace's file, for nsenter.
    netns: std::path::PathBuf,
    dev: String,
}

impl Drop for XdpFilter {
    fn drop(&mut self) {
        let _ = Command::new("nsenter")
            .arg(format!("--net={}", self.netns.display()))
            .args(["--", "xdp-filter", "unload", &self.dev])
            .status();
    }
}

/// A stand whose server veth runs xdp-filter, dropping TCP to `port`.
fn xdp_filter_stand(port: u16) -> (Stand, XdpFilter) {
    let testbed = Testbed::new();
    let dev = testbed.server_if.clone();
    // nsenter (not `ip netns exec`, whose fresh /sys has no bpffs, where
    // xdp-filter pins its maps).
    let xdp_filter = |args: &[&str]| {
        sh(testbed.server.command("xdp-filter").args(args));
    };
    xdp_filter(&["load", "--mode", "native", &dev]);
    let loaded = XdpFilter {
        netns: testbed.server.path(),
        dev,
    };
    xdp_filter(&["port", "--proto", "tcp", "--mode", "dst", &port.to_string()]);
    (Stand::new(testbed, None), loaded)
}

pub fn run() -> Vec<Measured> {
    println!(
        "\n== drop cost: live XDP frames into a veth, {FRAMES} per call, {ROUNDS} rounds per \
         placement, receiver's NAPI thread on CPU {NAPI_CPU}, generator on CPU 0 (split) or \
         on CPU {NAPI_CPU} with it (shared)"
    );
    let (server, client, _) = addrs::family(false);
    let (guard, _daemon, guard_frames, _dir) = guard_stand();

    let bare = {
        let testbed = Testbed::new();
        let server_if = testbed.server_if.clone();
        let link = testbed.server.run(|| {
            let prog = livegen::xdp_returning(livegen::XDP_DROP, "bare_drop").unwrap();
            livegen::attach_xdp(&prog, livegen::ifindex(&server_if).unwrap()).unwrap()
        });
        Stand::new(testbed, Some(link))
    };
    // Declared after the others so it drops first: xdp-filter is unloaded
    // while its namespace still exists.
    let (xdp_filter, _xdp_filter_loaded) = xdp_filter_stand(SSH);
    let nft = |ruleset: &dyn Fn(&str) -> String| {
        let testbed = Testbed::new();
        Stand::gro_on(&testbed);
        let rules = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(rules.path(), ruleset(&testbed.server_if)).unwrap();
        sh(testbed.server.command("nft").arg("-f").arg(rules.path()));
        Stand::new(testbed, None)
    };
    let input = nft(&|_| {
        format!(
            "table inet kbench {{ chain input {{ type filter hook input priority 0; tcp dport {SSH} drop; }}; }}"
        )
    });
    let ingress = nft(&|dev| {
        format!(
            "table netdev kbench {{ chain ingress {{ type filter hook ingress device \"{dev}\" priority 0; tcp dport {SSH} drop; }}; }}"
        )
    });
    let syn = tcp_syn(client, server, SSH);
    let tx = livegen::xdp_returning(livegen::XDP_TX, "knockd_gen").unwrap();

    let mut results: Vec<Measured> = PLACEMENTS
        .iter()
        .flat_map(|&(placement, _)| {
            Variant::ALL.iter().map(move |v| Measured {
                placement,
                key: v.key(),
                name: v.name(),
                mpps: Vec::new(),
                ns: Vec::new(),
            })
        })
        .collect();
    let mut order = Variant::ALL;
    let mut rng = rand::rng();
    // KNOCKD_BENCH_DROP=KEY runs one variant only, for a profile.
    let only = std::env::var("KNOCKD_BENCH_DROP").ok();
    for (p, &(_, gen_cpu)) in PLACEMENTS.iter().enumerate() {
        for _ in 0..ROUNDS {
            order.shuffle(&mut rng);
            for variant in order {
                if only.as_deref().is_some_and(|k| k != variant.key()) {
                    continue;
                }
                let (stand, frame) = match variant {
                    Variant::BareDrop => (&bare, &syn),
                    Variant::XdpFilter => (&xdp_filter, &syn),
                    Variant::NftInput => (&input, &syn),
                    Variant::NftIngress => (&ingress, &syn),
                    guard_variant => (
                        &guard,
                        &guard_frames
                            .iter()
                            .find(|(v, _)| *v == guard_variant)
                            .unwrap()
                            .1,
                    ),
                };
                let (mpps, ns) = stand.round(&tx, frame, gen_cpu);
                let slot = &mut results[p * Variant::ALL.len() + variant as usize];
                slot.mpps.push(mpps);
                slot.ns.push(ns);
            }
        }
    }
    let counters = _daemon.maps().counters().unwrap();
    println!(
        "(the guard counted {} drops to protected ports, {} passed: every guard frame was dropped)",
        counters.get(knockd_common::Counter::DropProtected),
        counters.get(knockd_common::Counter::PassUnprotected)
    );
    results
}

/// The drop-cost table, with ratios to a bare XDP_DROP, to xdp-filter and
/// to nft input in the same placement.
pub fn table(results: &[Measured]) -> String {
    let results: Vec<&Measured> = results.iter().filter(|m| !m.ns.is_empty()).collect();
    let ns_of = |placement: &str, key: &str| {
        results
            .iter()
            .find(|m| m.placement == placement && m.key == key)
            .map_or(f64::NAN, |m| median(&m.ns))
    };
    let mut md = String::from(
        "| drop | generator | Mpps (median, min-max) | ns/packet (median, min-max) | ÷ bare XDP_DROP | ÷ xdp-filter | nft input ÷ this |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for m in &results {
        let bare = ns_of(m.placement, Variant::BareDrop.key());
        let input = ns_of(m.placement, Variant::NftInput.key());
        let xdp_filter = ns_of(m.placement, Variant::XdpFilter.key());
        let (mpps_lo, mpps_hi) = spread(&m.mpps);
        let (ns_lo, ns_hi) = spread(&m.ns);
        let ns = median(&m.ns);
        md.push_str(&format!(
            "| {} | {} | {:.2} ({:.2}-{:.2}) | {:.0} ({:.0}-{:.0}) | {:.2}× | {:.2}× | {:.2}× |\n",
            m.name,
            m.placement,
            median(&m.mpps),
            mpps_lo,
            mpps_hi,
            ns,
            ns_lo,
            ns_hi,
            ns / bare,
            ns / xdp_filter,
            input / ns,
        ));
    }
    md
}

/// The JSON objects of the drop-cost measurement.
pub fn json(results: &[Measured]) -> Vec<serde_json::Value> {
    results
        .iter()
        .filter(|m| !m.ns.is_empty())
        .map(|m| {
            let (mpps_lo, mpps_hi) = spread(&m.mpps);
            let (ns_lo, ns_hi) = spread(&m.ns);
            serde_json::json!({
                "measurement": "drop_cost",
                "variant": m.key,
                "generator": m.placement,
                "n": m.ns.len(),
                "frames_per_round": FRAMES,
                "mpps": median(&m.mpps),
                "mpps_min": mpps_lo,
                "mpps_max": mpps_hi,
                "ns_per_pkt": median(&m.ns),
                "ns_per_pkt_min": ns_lo,
                "ns_per_pkt_max": ns_hi,
            })
        })
        .collect()
}
