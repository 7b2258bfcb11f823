//! A million random knocks, some forged, some static, a few genuine, leave
//! the authentication engine's state within its bounds. The heap is measured
//! with a counting allocator, not estimated.

use std::{
    alloc::{GlobalAlloc, Layout, System},
    net::SocketAddr,
    path::Path,
    sync::atomic::{AtomicUsize, Ordering},
};

use knockd::{
    auth::{Engine, KnockIn, Outcome, PENDING_MAX, STATIC_MAX},
    config::{Config, KnockPort, Proto},
    devices::{Device, Devices},
    proto::{DeviceKey, DoorKeys, DoorParams, Kind, sequence},
};
use rand::{Rng as _, SeedableRng as _, rngs::StdRng};

/// Counts live heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: delegates to the system allocator and only adds bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: same contract as ours.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const T0: u64 = 1_740_000_000_000;
const EVENTS: u64 = 1_000_000;
/// What the engine may grow by: the LRU tables at their caps plus the port
/// index, with room to spare. A leak of even a few bytes per event (1M
/// events) would exceed it.
const HEAP_BUDGET: usize = 16 << 20;

const CONFIG: &str = "interfaces: [eth0]\n\
    devices:\n\
    \x20 a: { key_file: /k/a, groups: [g] }\n\
    \x20 b: { key_file: /k/b, groups: [g] }\n\
    \x20 c: { key_file: /k/c, groups: [g] }\n\
    doors:\n\
    \x20 ssh: { service_port: 22, allow: { groups: [g] } }\n\
    \x20 old: { service_port: 23, mode: static, sequence: [\"6000:udp\", \"6001:tcp\", \"6002:udp\", \"6003:udp\"] }\n";

#[test]
fn a_million_random_knocks_leave_bounded_state() {
    let config = Config::parse(CONFIG, Path::new("t.yaml")).unwrap();
    let mut devices = Devices::default();
    for (i, id) in ["a", "b", "c"].into_iter().enumerate() {
        devices.by_id.insert(
            id.into(),
            Device {
                id: id.into(),
                key: DeviceKey([i as u8 + 1; 32]),
                groups: vec!["g".into()],
                declared_in: "t.yaml".into(),
                doors: Vec::new(),
            },
        );
    }
    let door = config.doors["ssh"].one_time().expect("a one-time door");
    let params = DoorParams {
        knock_ports: door.knock_ports.start..=door.knock_ports.end,
        knocks: door.knocks,
        step_secs: door.step_secs,
    };
    let keys = DoorKeys::derive(&devices.by_id["a"].key, "ssh");
    let statics: Vec<KnockPort> = door_sequence(&config);

    let baseline = LIVE.load(Ordering::Relaxed);
    let mut engine = Engine::new(&config, &devices, &[], T0);
    let mut ports: Vec<u16> = udp_ports(&engine);
    let mut rng = StdRng::seed_from_u64(0x6b6e_6f63_6b64);
    let mut payload = vec![0u8; 256];
    let mut opened = 0u64;
    for i in 0..EVENTS {
        // A millisecond per event: 1000 s in all, 33 time steps.
        let now = T0 + i;
        if engine.tick(now) {
            ports = udp_ports(&engine);
        }
        let source = SocketAddr::from(([198, 18, rng.random(), rng.random()], rng.random()));
        let server = SocketAddr::from(([198, 18, 0, 1], 0));
        let roll: u8 = rng.random_range(0..100);
        let (port, proto, len) = if roll < 60 {
            // Random bytes to a loaded one-time port.
            (
                ports[rng.random_range(0..ports.len())],
                Proto::Udp,
                rng.random_range(0..200),
            )
        } else if roll < 80 {
            // Well-formed knocks with forged MACs, to reach verification.
            let len = 68;
            rng.fill(&mut payload[..len]);
            payload[0] = 1;
            payload[1] = rng.random_range(1..=3);
            payload[3] = 3;
            payload[2] = rng.random_range(0..3);
            payload[4..12].copy_from_slice(&(now / 30_000).to_be_bytes());
            (ports[rng.random_range(0..ports.len())], Proto::Udp, len)
        } else {
            // Static knocks from many sources.
            let knock = statics[rng.random_range(0..statics.len())];
            (knock.port, knock.proto, 0)
        };
        if roll < 60 {
            rng.fill(&mut payload[..len]);
        }
        let decision = engine.on_knock(
            &KnockIn {
                source,
                destination: SocketAddr::new(server.ip(), port),
                proto,
                payload: &payload[..len],
            },
            now,
        );
        assert!(
            roll >= 80 || matches!(decision.outcome(), Outcome::Rejected(_)),
            "a random knock was not rejected: {decision:?}"
        );
        // Now and then a genuine device opens the door.
        if i % 10_000 == 0 {
            let client = SocketAddr::from(([198, 18, 0, 2], 40000));
            for (port, knock) in sequence(
                &keys,
                &params,
                Kind::Open,
                now,
                [i as u8; 16].map(|b| b ^ (i >> 8) as u8),
                None,
            ) {
                let d = engine.on_knock(
                    &KnockIn {
                        source: client,
                        destination: SocketAddr::new(server.ip(), port),
                        proto: Proto::Udp,
                        payload: &knock,
                    },
                    now,
                );
                opened += u64::from(matches!(d.outcome(), Outcome::Accepted(_)));
            }
        }
    }
    let sizes = engine.state_sizes();
    let grown = LIVE.load(Ordering::Relaxed).saturating_sub(baseline);
    let peak = PEAK.load(Ordering::Relaxed).saturating_sub(baseline);
    eprintln!(
        "after {EVENTS} events: {sizes:?}; engine heap {grown} bytes (peak {peak}); {opened} genuine opens"
    );
    assert_eq!(opened, EVENTS / 10_000, "every genuine sequence opened");
    assert_eq!(sizes.pending, 0, "forged knocks store nothing");
    assert!(sizes.pending <= PENDING_MAX);
    assert!(sizes.statics <= STATIC_MAX);
    // Consumed records live only while their step could be accepted: 11
    // steps × at most one genuine open per 10 s of this test.
    assert!(sizes.consumed <= 11 * 30_000 / 10_000 + 1, "{sizes:?}");
    assert!(grown < HEAP_BUDGET, "engine grew by {grown} bytes");
    assert!(peak < HEAP_BUDGET, "engine peaked at {peak} bytes");
}

fn udp_ports(engine: &Engine) -> Vec<u16> {
    engine
        .knock_ports()
        .into_iter()
        .filter(|k| k.proto == Proto::Udp && k.port >= 7000)
        .map(|k| k.port)
        .collect()
}

fn door_sequence(config: &Config) -> Vec<KnockPort> {
    config.doors["old"]
        .static_door()
        .expect("a static door")
        .sequence
        .clone()
}
