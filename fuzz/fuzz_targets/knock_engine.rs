//! The knock path as the daemon runs it: the wire parser, the
//! authentication engine and the sealed reply, fed a sequence of knocks.
//!
//! Each record of the input is a header byte, two bytes of source-port and
//! time noise, and a 68-byte payload. When the header's low bit is set the
//! harness re-signs a payload that parses with the device's real key, and
//! sends it to the port the protocol derives for it, so the fuzzer reaches
//! the code behind the MAC check (replays, skew, sequences in progress,
//! leases). Every accepted knock's reply is sealed and opened again by the
//! client's code. Nothing may panic.
#![no_main]

use std::{
    net::SocketAddr,
    path::Path,
    sync::{Mutex, OnceLock},
};

use knockd::{
    auth::{Engine, KnockIn},
    config::{Config, Proto},
    devices::{Device, Devices},
    proto::{DeviceKey, DoorKeys, KNOCK_LEN, Knock, Reply, Status},
};
use libfuzzer_sys::fuzz_target;

const CONFIG: &str = "interfaces: [eth0]\n\
    devices:\n\
    \x20 laptop: { key_file: /k/laptop, groups: [admins] }\n\
    doors:\n\
    \x20 ssh: { service_port: 22, knock_ports: \"7000-7999\", allow: { groups: [admins] } }\n\
    \x20 web: { service_port: 443, mode: static, seq_timeout_secs: 5, sequence: [\"6000:udp\", \"6001:tcp\", \"6002:udp\"] }\n";

/// 2025-02-19T21:20:00Z.
const T0: u64 = 1_740_000_000_000;
const RECORD: usize = 3 + KNOCK_LEN;

struct World {
    engine: Engine,
    keys: DoorKeys,
    now_ms: u64,
}

fn world() -> World {
    static FIXED: OnceLock<(Config, Devices, DoorKeys)> = OnceLock::new();
    let (config, devices, keys) = FIXED.get_or_init(|| {
        let config =
            Config::parse(CONFIG, Path::new("fuzz.yaml")).expect("the fixed config parses");
        let key = DeviceKey([7; 32]);
        let mut devices = Devices::default();
        devices.by_id.insert(
            "laptop".into(),
            Device {
                id: "laptop".into(),
                key: key.clone(),
                groups: vec!["admins".into()],
                doors: Vec::new(),
                declared_in: "fuzz.yaml".into(),
            },
        );
        (config, devices, DoorKeys::derive(&key, "ssh"))
    });
    World {
        engine: Engine::new(config, devices, &[], T0),
        keys: keys.clone(),
        now_ms: T0,
    }
}

/// One engine for the run: building one costs milliseconds (its bounded
/// caches are allocated up front), too slow to do per input. Each input
/// starts an hour after the last, so whatever earlier inputs left behind is
/// outside every time window and the engine acts as if fresh; crashes
/// reproduce from their input.
static WORLD: Mutex<Option<World>> = Mutex::new(None);

fuzz_target!(|data: &[u8]| {
    let mut guard = WORLD.lock().unwrap_or_else(|p| p.into_inner());
    let world = guard.get_or_insert_with(world);
    world.now_ms += 3_600_000;
    for record in data.chunks(RECORD) {
        let (header, noise, payload) = match record {
            [header, a, b, payload @ ..] => (*header, [*a, *b], payload),
            _ => return,
        };
        world.now_ms += u64::from(noise[1]) * 250;
        let mut payload = payload.to_vec();
        let source: SocketAddr = if header & 2 == 0 {
            SocketAddr::new("198.18.0.2".parse().unwrap(), 40000 + u16::from(noise[0]))
        } else {
            SocketAddr::new("2001:db8::2".parse().unwrap(), 40000 + u16::from(noise[0]))
        };
        let mut port = 6000 + u16::from(header >> 4);
        if header & 1 != 0
            && let Ok((mut knock, _)) = Knock::parse(&payload)
        {
            // Near the engine's clock: within a few steps and minutes, so
            // skew, window and replay checks all get exercised.
            let now_step = world.now_ms / 30_000;
            knock.step = (now_step + knock.step % 16).saturating_sub(8);
            knock.time_ms = (world.now_ms + knock.time_ms % 600_000).saturating_sub(300_000);
            payload = knock.encode(&world.keys).to_vec();
            port = world.keys.port(knock.step, knock.index, &(7000..=7999));
        }
        let destination = SocketAddr::new(
            if source.is_ipv4() {
                "198.18.0.1".parse().unwrap()
            } else {
                "2001:db8::1".parse().unwrap()
            },
            port,
        );
        let proto = if header & 4 == 0 {
            Proto::Udp
        } else {
            Proto::Tcp
        };
        let verdict = world.engine.on_knock(
            &KnockIn {
                source,
                destination,
                proto,
                payload: &payload,
            },
            world.now_ms,
        );
        if let Some(reply) = verdict.reply() {
            let sealed = reply.seal(Status::Granted, 40123, 30, world.now_ms);
            let opened = Reply::open(&sealed, &reply.keys, &reply.nonce)
                .expect("a sealed reply opens with its own keys");
            assert_eq!((opened.port, opened.nonce), (40123, reply.nonce));
        }
        // Replies a hostile server, or the network, could send the client.
        let _ = Reply::open(&payload, &world.keys, &[0; 16]);
    }
});
