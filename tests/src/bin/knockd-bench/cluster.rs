//! `knockd-bench cluster`: fleet mode against single-node mode, in one run
//! and one topology (a bridge, a 3-member etcd, three fleet nodes and a
//! fourth node without `cluster:`):
//! - knock-to-open: from the knock's first datagram to a connect that is
//!   answered; single node: knock and connect the same node; fleet: knock
//!   node A, connect node C;
//! - revoke propagation: from `knockctl revoke` to the client's session
//!   ending; single node: on the node itself; fleet: revoke on B, the
//!   session on C;
//! - etcd writes per knock: raft proposals etcd committed, less the
//!   heartbeats' rate measured alone just before.

use std::{
    io::{Read as _, Write as _},
    time::{Duration, Instant},
};

use knockd::proto::{DeviceKey, Kind};
use knockd_tests::{Daemon, fleet::Fleet, knockctl};

use crate::summary;

const DEVICES: usize = 16;
const OPENS: usize = 30;
const REVOKES: usize = 20;
const WRITE_KNOCKS: usize = 10;
/// The fleet nodes; node 3 is the single-node baseline.
const SINGLE: usize = 3;

pub fn run() {
    println!(
        "== cluster: fleet mode (3-member etcd, 3 nodes) against single-node mode, {OPENS} opens, {REVOKES} revokes"
    );
    let mut fleet = Fleet::new(4, false);
    // One client makes every knock, faster than the default per-source
    // limit (20/s, burst 40) allows: lift it, or the benchmark measures
    // the limiter's drops and the client's 1.5 s resend.
    fleet.extra = "knock: { rate_per_sec: 10000, burst: 10000 }\n".into();
    for i in 0..3 {
        fleet.start(i, "");
    }
    let keys: Vec<(String, DeviceKey)> = (0..DEVICES)
        .map(|d| {
            let id = format!("dev{d}");
            let key = fleet.add_device(d % 3, &id);
            (id, key)
        })
        .collect();
    let config = fleet.local_config(SINGLE, &keys);
    fleet.nodes[SINGLE].daemon = Some(Daemon::start(&fleet.nodes[SINGLE].ns, &config));
    std::thread::sleep(Duration::from_millis(500));
    let mut device = 0;
    let mut next = || {
        device = (device + 1) % DEVICES;
        device
    };

    // Knock-to-open.
    let open = |knocked: usize, connected: usize, next: &mut dyn FnMut() -> usize| {
        (0..OPENS)
            .map(|_| {
                let key = &keys[next()].1;
                let start = Instant::now();
                let port = fleet
                    .knock(knocked, key, Kind::Open)
                    .expect("knock")
                    .reply
                    .port;
                fleet
                    .wait_open(connected, port, Duration::from_secs(5))
                    .expect("the granted port opens");
                let took = start.elapsed();
                fleet.knock(knocked, key, Kind::Close).expect("close");
                took
            })
            .collect::<Vec<_>>()
    };
    let baseline = summary(
        "knock-to-open, single node",
        open(SINGLE, SINGLE, &mut next),
        None,
    );
    summary(
        "knock-to-open, knock A, connect C",
        open(0, 2, &mut next),
        Some(baseline),
    );

    // Revoke propagation.
    let revoke =
        |knocked: usize, connected: usize, revoked_on: usize, next: &mut dyn FnMut() -> usize| {
            (0..REVOKES)
                .map(|_| {
                    let (id, key) = &keys[next()];
                    let port = fleet
                        .knock(knocked, key, Kind::Open)
                        .expect("knock")
                        .reply
                        .port;
                    let (_, mut stream) = fleet
                        .wait_open(connected, port, Duration::from_secs(5))
                        .expect("the granted port opens");
                    stream
                        .set_read_timeout(Some(Duration::from_secs(5)))
                        .unwrap();
                    let start = Instant::now();
                    let out = knockctl(&fleet.nodes[revoked_on].socket(), &["revoke", id]);
                    assert!(
                        out.status.success(),
                        "{}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                    // The session ends when a write is reset or a read sees the
                    // end: poll with one byte each millisecond.
                    loop {
                        let mut buf = [0u8; 16];
                        let alive = stream.write_all(b"x").is_ok()
                            && matches!(stream.read(&mut buf), Ok(n) if n > 0);
                        if !alive {
                            break start.elapsed();
                        }
                        assert!(
                            start.elapsed() < Duration::from_secs(5),
                            "the session outlived the revoke"
                        );
                        std::thread::sleep(Duration::from_millis(1));
                    }
                })
                .collect::<Vec<_>>()
        };
    let baseline = summary(
        "revoke to session cut, single node",
        revoke(SINGLE, SINGLE, SINGLE, &mut next),
        None,
    );
    summary(
        "revoke on B to session cut on C",
        revoke(0, 2, 1, &mut next),
        Some(baseline),
    );

    // Writes per knock: proposals during knocks, less the background.
    let idle = {
        let before = fleet.etcd.proposals();
        let start = Instant::now();
        std::thread::sleep(Duration::from_secs(5));
        (fleet.etcd.proposals() - before) as f64 / start.elapsed().as_secs_f64()
    };
    let writes = |kind: Kind, label: &str, next: &mut dyn FnMut() -> usize| {
        let before = fleet.etcd.proposals();
        let start = Instant::now();
        for _ in 0..WRITE_KNOCKS {
            let key = &keys[next()].1;
            fleet.knock(0, key, Kind::Open).expect("knock");
            if kind == Kind::Close {
                fleet.knock(0, key, Kind::Close).expect("close");
            }
        }
        std::thread::sleep(Duration::from_millis(500));
        let spent = (fleet.etcd.proposals() - before) as f64 - idle * start.elapsed().as_secs_f64();
        let per = spent / WRITE_KNOCKS as f64;
        println!("{label:<44} {per:>6.2} etcd writes (raft proposals) per knock");
        per
    };
    println!("(background: {idle:.2} proposals/s, the nodes' heartbeats; subtracted below)");
    let open_writes = writes(Kind::Open, "open on a cluster door", &mut next);
    let both = writes(Kind::Close, "open then close on a cluster door", &mut next);
    println!(
        "{:<44} {:>6.2} etcd writes per close",
        "close on a cluster door",
        both - open_writes
    );
    println!("single-node mode: 0 etcd writes per knock (a local fsync'd record)");
}
