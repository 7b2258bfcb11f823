//! Knock under flood: the live-frames generator ([`knockd_tests::livegen`])
//! floods the server's veth as fast as it can while legitimate clients open
//! doors, each with the client's own retries (the one-time client's
//! default 10 s, a fresh sequence every 1.5 s; a static client resends its
//! sequence every 1.5 s too).
//!
//! Floods, from CPU 0, with the server veth's NAPI thread on CPU 1:
//! - `syn`: SYNs to the service port from random sources in 198.18.0.0/16;
//! - `udp_v4`, `udp_v6`: 68-byte datagrams of random bytes to random ports
//!   of the knock range, from random sources in 198.18.0.0/16 and in
//!   2001:db8::/32 (65,536 /64s and more: every one its own rate bucket);
//! - `bad_mac_v6`: well-formed knocks (this step, a random nonce) with
//!   wrong MACs, to the ports valid now, from random sources in one /64:
//!   someone who sees the knocks on the wire, from one host;
//! - `classic_udp_v4`: the `udp_v4` flood aimed at classic knockd's port
//!   range (9000-9999, which our guard passes), to see what it does to
//!   classic knockd.
//!
//! For each: opens that succeeded, their p50/p99 beside the idle ones, the
//! daemon's CPU share and RSS over the flood, the frames the receiver took
//! per second, and the guard's counters (knocks lost to a full ring
//! buffer, rate-limited, malformed). The generator keeps the veth's ring
//! full, and the clients' packets share it, so some of theirs never reach
//! any program, as on a saturated NIC: a knock or a SYN lost there costs
//! the client a retry that no software on the host could have saved (the
//! high p99s), and TCP's own SYN retries count among the client's.

use std::{
    os::fd::{AsRawFd as _, OwnedFd},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use knockd::{
    maps::Proto,
    proto::{DeviceKey, DoorKeys, DoorParams, Kind},
};
use knockd_common::{Counter, policy};
use knockd_tests::{
    Daemon, Testbed, addrs,
    livegen::{self, Randomize},
};

use super::{Context, Variant, trial};

/// Frames per generator call; the generator loops until told to stop.
const FRAMES_PER_CALL: u32 = 1_000_000;
/// Opens per door and flood.
pub const OPENS: usize = 30;
/// How long a client keeps retrying (the one-time client's default).
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(10);
const GEN_CPU: usize = 0;
const NAPI_CPU: usize = 1;
/// The knock range of the bench door, and classic knockd's ports.
const KNOCK_BASE: u16 = 7000;
const CLASSIC_BASE: u16 = 9000;
const SPAN: u16 = 1000;
/// Frame offsets (untagged Ethernet).
const V4_SRC_LOW: i16 = 14 + 12 + 2;
const V4_UDP: i16 = 14 + 20;
const V6_SRC: i16 = 14 + 8;
const V6_UDP: i16 = 14 + 40;

/// One flood.
pub struct Flood {
    pub key: &'static str,
    /// Template frames, sent in turn, one generator call each.
    frames: Vec<Vec<u8>>,
    randomize: Randomize,
    /// The doors opened meanwhile.
    pub doors: &'static [Variant],
}

/// A running generator: a thread in the client namespace, pinned to
/// `GEN_CPU`, sending until dropped.
struct Generator {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

impl Generator {
    fn start(testbed: &Testbed, ifindex: u32, flood: &Flood) -> Generator {
        let stop = Arc::new(AtomicBool::new(false));
        let ns = testbed.client.path();
        let frames = flood.frames.clone();
        let randomize = flood.randomize.clone();
        let stopping = Arc::clone(&stop);
        let thread = std::thread::spawn(move || {
            let ns = std::fs::File::open(ns).unwrap();
            // SAFETY: a valid namespace descriptor; only this thread moves.
            assert_eq!(
                unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) },
                0
            );
            livegen::pin_to_cpu(0, GEN_CPU).unwrap();
            let prog: OwnedFd = livegen::randomizing_tx(&randomize, "knockd_flood").unwrap();
            let mut sent = 0u64;
            while !stopping.load(Ordering::Relaxed) {
                for frame in &frames {
                    livegen::transmit(&prog, ifindex, frame, FRAMES_PER_CALL)
                        .expect("live-frames test run");
                    sent += u64::from(FRAMES_PER_CALL);
                }
            }
            sent
        });
        Generator {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Generator {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The floods, against the door at `server` whose knock ports valid now
/// are `valid` (UDP), with a service on `service`.
pub fn floods(service: u16, valid: &[u16]) -> Vec<Flood> {
    let (server4, client4, _) = addrs::family(false);
    let (server6, client6, _) = addrs::family(true);
    let udp4 = |dport, payload: &[u8]| crate::drop::udp(client4, server4, dport, payload);
    let udp6 = |dport, payload: &[u8]| crate::drop::udp(client6, server6, dport, payload);
    let syn = crate::drop::tcp_syn(client4, server4, service);
    let random_payload = |udp: i16| vec![udp + 8, udp + 12, udp + 16, udp + 20];
    // 68 random bytes to random ports of `base`'s range, from random
    // sources in 198.18.0.0/16.
    let random_udp4 = |key, base, doors| Flood {
        key,
        frames: vec![udp4(base, &[0; 68])],
        randomize: Randomize {
            words: random_payload(V4_UDP),
            halves: vec![V4_SRC_LOW],
            port: Some((V4_UDP + 2, base, SPAN)),
        },
        doors,
    };
    // A well-formed knock of a device nobody enrolled: this step, the right
    // shape, a MAC no key here makes.
    let stranger = DoorKeys::derive(&DeviceKey::generate(), "ssh");
    let params = DoorParams {
        knock_ports: KNOCK_BASE..=KNOCK_BASE + SPAN - 1,
        knocks: 3,
        step_secs: 30,
    };
    let knock = knockd::proto::sequence(
        &stranger,
        &params,
        Kind::Open,
        knockd::proto::unix_ms(),
        knockd::proto::fresh_nonce(),
        None,
    )
    .into_iter()
    .next()
    .expect("a sequence")
    .1;
    vec![
        Flood {
            key: "syn",
            frames: vec![syn],
            randomize: Randomize {
                halves: vec![V4_SRC_LOW],
                ..Randomize::default()
            },
            doors: &[Variant::OneTime, Variant::Static],
        },
        random_udp4("udp_v4", KNOCK_BASE, &[Variant::OneTime, Variant::Static]),
        Flood {
            key: "udp_v6",
            frames: vec![udp6(KNOCK_BASE, &[0; 68])],
            randomize: Randomize {
                // Bytes 4-15 of the source: anywhere in 2001:db8::/32.
                words: [V6_SRC + 4, V6_SRC + 8, V6_SRC + 12]
                    .into_iter()
                    .chain(random_payload(V6_UDP))
                    .collect(),
                port: Some((V6_UDP + 2, KNOCK_BASE, SPAN)),
                ..Randomize::default()
            },
            doors: &[Variant::OneTime, Variant::Static],
        },
        Flood {
            key: "bad_mac_v6",
            frames: valid.iter().map(|&port| udp6(port, &knock)).collect(),
            randomize: Randomize {
                // The interface identifier (one /64), nonce and MAC words.
                words: vec![V6_SRC + 8, V6_SRC + 12, V6_UDP + 8 + 20, V6_UDP + 8 + 52],
                ..Randomize::default()
            },
            doors: &[Variant::OneTime, Variant::Static],
        },
        random_udp4("classic_udp_v4", CLASSIC_BASE, &[Variant::Classic]),
    ]
}

/// The UDP knock ports valid now in the daemon's policy.
pub fn valid_knock_ports(daemon: &Daemon) -> Vec<u16> {
    let maps = daemon.maps();
    (KNOCK_BASE..KNOCK_BASE + SPAN)
        .filter(|&p| maps.policy().get(Proto::Udp, p) & policy::KNOCK != 0)
        .collect()
}

/// A process's CPU time (user + system).
fn cpu_time(pid: u32) -> Duration {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name, which ends with ')'.
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
        .split_whitespace()
        .collect();
    let ticks: u64 = fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap();
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as u64;
    Duration::from_nanos(ticks * 1_000_000_000 / hz)
}

/// One door's results under one flood.
pub struct Result {
    pub flood: &'static str,
    pub variant: Variant,
    pub n: usize,
    pub ok: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    /// The process that judged the knocks (ours, or classic knockd).
    pub cpu_pct: f64,
    pub rss_kib: u64,
    pub rx_mpps: f64,
    pub events_lost: u64,
    pub rate_limited: u64,
    pub malformed: u64,
}

/// Runs every flood in turn with `OPENS` opens of each of its doors.
pub fn run(testbed: &Testbed, daemon: &Daemon, classic_pid: u32, ctx: &Context<'_>) -> Vec<Result> {
    // The index of the client veth, and the XDP_PASS that readies it.
    let (ifindex, _pass) = crate::drop::generator_side(testbed);
    let napi = crate::drop::threaded_napi(testbed, NAPI_CPU);
    let valid = valid_knock_ports(daemon);
    assert!(!valid.is_empty(), "knock ports valid now");
    println!(
        "\n== knock under flood: {OPENS} opens per door and flood, generator on CPU {GEN_CPU}, \
         the server veth's NAPI thread (pid {napi}) on CPU {NAPI_CPU}; {} knock ports valid now",
        valid.len()
    );
    let mut results = Vec::new();
    for flood in floods(super::SSH, &valid) {
        let judge = if flood.doors.contains(&Variant::Classic) {
            classic_pid
        } else {
            daemon.pid()
        };
        let counters = daemon.maps().counters().unwrap();
        let (cpu, rx) = (cpu_time(judge), crate::drop::received(testbed));
        let start = Instant::now();
        let generator = Generator::start(testbed, ifindex, &flood);
        std::thread::sleep(Duration::from_millis(500));
        let mut samples: Vec<(Variant, Option<Duration>)> = Vec::new();
        testbed.client.run(|| {
            for _ in 0..OPENS {
                for &variant in flood.doors {
                    samples.push((variant, trial(variant, ctx, None, CLIENT_TIMEOUT)));
                }
            }
        });
        let wall = start.elapsed();
        let (cpu, rx) = (cpu_time(judge) - cpu, crate::drop::received(testbed) - rx);
        let rss = crate::rss_kib(judge, "VmRSS:");
        drop(generator);
        let after = daemon.maps().counters().unwrap();
        let delta = |c: Counter| after.get(c) - counters.get(c);
        for &variant in flood.doors {
            let (ok, us) = super::outcomes(&samples, variant);
            results.push(Result {
                flood: flood.key,
                variant,
                n: OPENS,
                ok,
                p50_us: us(0.5),
                p99_us: us(0.99),
                cpu_pct: cpu.as_secs_f64() / wall.as_secs_f64() * 100.0,
                rss_kib: rss,
                rx_mpps: rx as f64 / wall.as_secs_f64() / 1e6,
                events_lost: delta(Counter::KnockEventLost),
                rate_limited: delta(Counter::KnockRateLimited),
                malformed: delta(Counter::KnockMalformed),
            });
        }
        let last = results.last().unwrap();
        println!(
            "{:<15} {:>5.2} Mpps received, judge CPU {:>5.1}%, RSS {} KiB, events lost {}, rate-limited {}, malformed {}",
            flood.key,
            last.rx_mpps,
            last.cpu_pct,
            last.rss_kib,
            last.events_lost,
            last.rate_limited,
            last.malformed
        );
    }
    results
}

/// The flood table: one row per flood and door, with the idle p50/p99 of
/// that door (`idle`: variant key → (p50, p99) in µs).
pub fn table(results: &[Result], idle: &dyn Fn(Variant) -> (f64, f64)) -> String {
    let mut md = String::from(
        "| flood | door | opens ok | p50 (idle) | p99 (idle) | judge CPU | judge RSS | received | knocks lost | rate-limited | malformed |\n\
         |---|---|---|---|---|---|---|---|---|---|---|\n",
    );
    for r in results {
        let (i50, i99) = idle(r.variant);
        md.push_str(&format!(
            "| {} | {} | {}/{} | {:.2} ms ({:.2}) | {:.2} ms ({:.2}) | {:.1}% | {:.1} MiB | {:.2} Mpps | {} | {} | {} |\n",
            r.flood,
            r.variant.name(),
            r.ok,
            r.n,
            r.p50_us / 1e3,
            i50 / 1e3,
            r.p99_us / 1e3,
            i99 / 1e3,
            r.cpu_pct,
            r.rss_kib as f64 / 1024.0,
            r.rx_mpps,
            r.events_lost,
            r.rate_limited,
            r.malformed,
        ));
    }
    md
}

/// The JSON objects of the flood measurement.
pub fn json(results: &[Result]) -> Vec<serde_json::Value> {
    results
        .iter()
        .map(|r| {
            serde_json::json!({
                "measurement": "knock_under_flood",
                "flood": r.flood,
                "variant": r.variant.key(),
                "n": r.n,
                "ok": r.ok,
                "p50_us": r.p50_us,
                "p99_us": r.p99_us,
                "judge_cpu_pct": r.cpu_pct,
                "judge_rss_kib": r.rss_kib,
                "rx_mpps": r.rx_mpps,
                "events_lost": r.events_lost,
                "rate_limited": r.rate_limited,
                "malformed": r.malformed,
            })
        })
        .collect()
}
