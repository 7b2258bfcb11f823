use std::path::Path;

use super::*;
use crate::proto::{DoorParams, Status, sequence};

/// 2025-02-19T21:20:00Z: the start of step 58_000_000 with 30 s steps.
const T0: u64 = 1_740_000_000_000;
const STEP_MS: u64 = 30_000;

const CONFIG: &str = "interfaces: [eth0]\n\
    devices:\n\
    \x20 laptop: { key_file: /k/laptop, groups: [admins] }\n\
    \x20 sensor: { key_file: /k/sensor, groups: [fleet] }\n\
    \x20 intern: { key_file: /k/intern }\n\
    doors:\n\
    \x20 ssh: { service_port: 22, allow: { groups: [admins, fleet] } }\n\
    \x20 web: { service_port: 443, mode: static, seq_timeout_secs: 5, sequence: [\"6000:udp\", \"6001:tcp\", \"6002:udp\"] }\n";

struct World {
    config: Config,
    devices: Devices,
    engine: Engine,
}

fn world(now_ms: u64) -> World {
    let config = Config::parse(CONFIG, Path::new("t.yaml")).unwrap();
    let devices = Devices::for_tests(&config);
    let engine = Engine::new(&config, &devices, &[], now_ms);
    World {
        config,
        devices,
        engine,
    }
}

const CLIENT: &str = "198.18.0.2:40000";
const SERVER: &str = "198.18.0.1";

fn params(config: &Config, door: &str) -> DoorParams {
    config.doors[door]
        .one_time()
        .expect("a one-time door")
        .params()
}

impl World {
    fn keys(&self, device: &str, door: &str) -> DoorKeys {
        DoorKeys::derive(&self.devices.by_id[device].key, door)
    }

    /// The knocks of a fresh sequence by `device` at client time `client_ms`.
    fn knocks(&self, device: &str, kind: Kind, client_ms: u64, nonce: u8) -> Vec<(u16, [u8; 68])> {
        sequence(
            &self.keys(device, "ssh"),
            &params(&self.config, "ssh"),
            kind,
            client_ms,
            [nonce; 16],
            None,
        )
        .to_vec()
    }

    fn send(&mut self, from: &str, knock: &(u16, [u8; 68]), now_ms: u64) -> Verdict {
        self.send_raw(from, knock.0, &knock.1, now_ms)
    }

    fn send_raw(&mut self, from: &str, port: u16, payload: &[u8], now_ms: u64) -> Verdict {
        self.engine.on_knock(
            &KnockIn {
                source: from.parse().unwrap(),
                destination: SocketAddr::new(SERVER.parse().unwrap(), port),
                proto: Proto::Udp,
                payload,
            },
            now_ms,
        )
    }

    fn send_static(&mut self, from: &str, knock: &str, now_ms: u64) -> Outcome {
        let knock: KnockPort = knock.parse().unwrap();
        self.engine
            .on_knock(
                &KnockIn {
                    source: from.parse().unwrap(),
                    destination: SocketAddr::new(SERVER.parse().unwrap(), knock.port),
                    proto: knock.proto,
                    payload: b"",
                },
                now_ms,
            )
            .outcome()
    }
}

fn outcomes(decisions: &[Verdict]) -> Vec<Outcome> {
    decisions.iter().map(|d| d.outcome().clone()).collect()
}

const OPEN: Outcome = Outcome::Accepted(Action::Open);

fn progress(have: u8) -> Outcome {
    Outcome::Progress { have, need: 3 }
}

#[test]
fn a_sequence_in_order_opens_and_the_reply_authenticates_the_daemon() {
    let mut w = world(T0 + 1000);
    let knocks = w.knocks("laptop", Kind::Open, T0 + 900, 1);
    let decisions: Vec<Verdict> = knocks
        .iter()
        .map(|k| w.send(CLIENT, k, T0 + 1000))
        .collect();
    assert_eq!(outcomes(&decisions), [progress(1), progress(2), OPEN]);
    let accepted = &decisions[2];
    assert_eq!(accepted.door(), Some("ssh"));
    assert_eq!(accepted.device(), Some("laptop"));
    let Verdict::Accepted(a) = accepted else {
        panic!("{accepted:?}")
    };
    assert_eq!(a.grant_to, "198.18.0.2".parse::<IpAddr>().unwrap());
    let reply = accepted.reply().unwrap();
    assert_eq!(reply.to, CLIENT.parse().unwrap());
    assert_eq!(
        reply.from,
        SocketAddr::new(SERVER.parse().unwrap(), knocks[2].0)
    );
    let sealed = reply.seal(Status::Granted, 40123, 30, T0 + 1000);
    let opened = proto::Reply::open(&sealed, &w.keys("laptop", "ssh"), &[1; 16]).unwrap();
    assert_eq!(
        (opened.status, opened.port, opened.expires_in_secs),
        (Status::Granted, 40123, 30)
    );
    // Another device's keys cannot open it: the reply proves the daemon's key.
    assert!(proto::Reply::open(&sealed, &w.keys("sensor", "ssh"), &[1; 16]).is_err());
}

#[test]
fn reordering_duplicates_and_a_resent_loss_still_open() {
    let mut w = world(T0);
    let k = w.knocks("laptop", Kind::Open, T0, 2);
    let order = [&k[2], &k[2], &k[0], &k[0], &k[1]];
    let verdicts: Vec<Verdict> = order
        .iter()
        .map(|knock| w.send(CLIENT, knock, T0))
        .collect();
    // A resend is authenticated before it is found a duplicate: its line
    // names the device, as every authenticated line does (§7).
    assert_eq!(verdicts[1].device(), Some("laptop"));
    let got = outcomes(&verdicts);
    assert_eq!(
        got,
        [
            progress(1),
            Outcome::Duplicate,
            progress(2),
            Outcome::Duplicate,
            OPEN
        ]
    );

    // Knock 1 is lost; the client resends the whole sequence.
    let k = w.knocks("laptop", Kind::Open, T0, 3);
    assert_eq!(w.send(CLIENT, &k[0], T0).outcome(), progress(1));
    assert_eq!(w.send(CLIENT, &k[2], T0).outcome(), progress(2));
    let resent: Vec<Outcome> = k
        .iter()
        .map(|knock| w.send(CLIENT, knock, T0 + 500).outcome())
        .collect();
    assert_eq!(
        resent,
        [Outcome::Duplicate, OPEN, Outcome::Rejected(Reason::Replay)]
    );
}

#[test]
fn skew_of_one_step_is_accepted_two_is_reported() {
    for (offset_steps, accepted) in [
        (-1i64, true),
        (1, true),
        (-2, false),
        (2, false),
        (5, false),
    ] {
        let now = T0 + 10_000;
        let client = (now as i64 + offset_steps * STEP_MS as i64) as u64;
        let mut w = world(now);
        let knocks = w.knocks("laptop", Kind::Open, client, 4);
        // The ports of skewed clients are loaded, so they are told, not ignored.
        assert!(w.engine.knock_ports().contains(&KnockPort {
            port: knocks[0].0,
            proto: Proto::Udp
        }));
        let last = knocks
            .iter()
            .map(|k| w.send(CLIENT, k, now))
            .last()
            .unwrap();
        if accepted {
            assert_eq!(last.outcome(), OPEN, "offset {offset_steps}");
        } else {
            assert_eq!(
                last.outcome(),
                Outcome::Rejected(Reason::ClockSkew),
                "offset {offset_steps}"
            );
            let detail = last.detail().unwrap();
            let direction = if offset_steps > 0 { "ahead" } else { "behind" };
            let secs = format!(
                "{:.1} s {direction}",
                (offset_steps.unsigned_abs() * STEP_MS) as f64 / 1000.0
            );
            assert!(detail.contains(&secs), "{detail}");
            assert_eq!(last.device(), Some("laptop"));
        }
    }
    // Beyond the reporting margin the ports are not loaded at all.
    let mut w = world(T0);
    let far = w.knocks("laptop", Kind::Open, T0 + 6 * STEP_MS, 4);
    assert_eq!(
        w.send(CLIENT, &far[0], T0).outcome(),
        Outcome::Rejected(Reason::NoDoor)
    );
}

/// §7 rule 1: a knock for a step outside the window cannot be matched to
/// a device, even on a port that happens to be valid now; it is reported
/// as clock skew, unauthenticated (no device named), as the rules say.
#[test]
fn a_knock_beyond_the_window_on_a_valid_port_is_clock_skew() {
    let mut w = world(T0);
    let now_port = w.knocks("laptop", Kind::Open, T0, 1)[0].0;
    for offset in [6i64, 7, -7] {
        let client = (T0 as i64 + offset * STEP_MS as i64) as u64;
        let far = w.knocks("laptop", Kind::Open, client, 2);
        let decision = w.send_raw(CLIENT, now_port, &far[0].1, T0);
        assert_eq!(
            decision.outcome(),
            Outcome::Rejected(Reason::ClockSkew),
            "offset {offset}"
        );
        assert_eq!(decision.device(), None, "unauthenticated");
        assert_eq!(decision.door(), Some("ssh"));
        let detail = decision.detail().unwrap();
        assert!(
            detail.contains(&format!("{offset} steps from the server's"))
                && detail.contains("only ±5"),
            "{detail}"
        );
    }
}

/// The `time` field must fall in the knock's `step`: it is what the skew
/// report measures the offset with.
#[test]
fn a_time_outside_its_step_is_malformed() {
    let mut w = world(T0);
    let keys = w.keys("laptop", "ssh");
    let step = crate::proto::step_of(T0, 30);
    let knock = crate::proto::Knock {
        kind: Kind::Close,
        index: 0,
        count: 1,
        step,
        time_ms: T0 + 3 * STEP_MS,
        nonce: [9; 16],
        bind: None,
    };
    let port = keys.port(step, 0, &(7000..=7999));
    let decision = w.send_raw(CLIENT, port, &knock.encode(&keys), T0);
    assert_eq!(decision.outcome(), Outcome::Rejected(Reason::Malformed));
    assert_eq!(decision.device(), Some("laptop"));
    assert!(
        decision
            .detail()
            .unwrap()
            .contains(&format!("says step {step}")),
        "the detail names the step"
    );
    let fine = crate::proto::Knock {
        time_ms: T0 + STEP_MS - 1,
        ..knock
    };
    assert_eq!(
        w.send_raw(CLIENT, port, &fine.encode(&keys), T0).outcome(),
        Outcome::Accepted(Action::Close)
    );
}

#[test]
fn a_replay_fails_within_the_step_and_after_a_restart() {
    let mut w = world(T0);
    let k = w.knocks("laptop", Kind::Open, T0, 5);
    for knock in &k {
        w.send(CLIENT, knock, T0);
    }
    for knock in &k {
        let d = w.send(CLIENT, knock, T0 + 1000);
        assert_eq!(d.outcome(), Outcome::Rejected(Reason::Replay));
        assert!(d.reply().is_none());
    }
    // A replay from another address fails the same way.
    assert_eq!(
        w.send("198.18.0.66:1", &k[0], T0).outcome(),
        Outcome::Rejected(Reason::Replay)
    );

    let saved = w.engine.consumed();
    assert_eq!(saved.len(), 1);
    let json = serde_json::to_string(&saved).unwrap();
    let restored: Vec<Consumed> = serde_json::from_str(&json).unwrap();
    let mut after = world(T0 + 2000);
    after.engine = Engine::new(&after.config, &after.devices, &restored, T0 + 2000);
    for knock in &k {
        assert_eq!(
            after.send(CLIENT, knock, T0 + 2000).outcome(),
            Outcome::Rejected(Reason::Replay)
        );
    }
    // The record is dropped once its step can no longer be accepted.
    let later = T0 + 20 * STEP_MS;
    after.engine.tick(later);
    assert!(after.engine.consumed().is_empty());
}

#[test]
fn forged_truncated_and_oversized_knocks_are_rejected() {
    let mut w = world(T0);
    let k = w.knocks("laptop", Kind::Open, T0, 6);
    let mut forged = k[0].1;
    forged[60] ^= 1;
    let d = w.send_raw(CLIENT, k[0].0, &forged, T0);
    assert_eq!(d.outcome(), Outcome::Rejected(Reason::BadMac));
    assert_eq!(d.device(), None, "an unauthenticated knock names no device");
    for bad in [&k[0].1[..67], &[0u8; 0][..], &[0u8; 1500][..]] {
        let d = w.send_raw(CLIENT, k[0].0, bad, T0);
        assert_eq!(d.outcome(), Outcome::Rejected(Reason::Malformed));
        assert!(d.detail().unwrap().contains("bytes"));
    }
    // Right port, but no sequence uses it at that index or step.
    let mut knock = proto::Knock::parse(&k[1].1).unwrap().0;
    knock.index = 0;
    let moved = knock.encode(&w.keys("laptop", "ssh"));
    assert_eq!(
        w.send_raw(CLIENT, k[1].0, &moved, T0).outcome(),
        Outcome::Rejected(Reason::UnknownDevice)
    );
    // A device the door does not allow has no ports; with its own key it
    // only ever reaches UnknownDevice or BadMac, never a grant.
    let intern = sequence(
        &w.keys("intern", "ssh"),
        &params(&w.config, "ssh"),
        Kind::Open,
        T0,
        [7; 16],
        None,
    );
    for knock in &intern {
        assert!(matches!(
            w.send(CLIENT, knock, T0).outcome(),
            Outcome::Rejected(_)
        ));
    }
    // Nothing was stored for any of it.
    assert_eq!(w.engine.state_sizes().pending, 0);
}

#[test]
fn a_sequence_is_bound_to_its_source_and_requested_address() {
    let mut w = world(T0);
    let k = w.knocks("laptop", Kind::Open, T0, 8);
    w.send(CLIENT, &k[0], T0);
    let d = w.send("198.18.0.3:40000", &k[1], T0);
    assert_eq!(d.outcome(), Outcome::Rejected(Reason::SourceMismatch));
    // A knock asking the grant for another address than it came from.
    let bound = sequence(
        &w.keys("laptop", "ssh"),
        &params(&w.config, "ssh"),
        Kind::Open,
        T0,
        [9; 16],
        Some("203.0.113.7".parse().unwrap()),
    );
    assert_eq!(
        w.send(CLIENT, &bound[0], T0).outcome(),
        Outcome::Rejected(Reason::SourceMismatch)
    );
    let bound = sequence(
        &w.keys("laptop", "ssh"),
        &params(&w.config, "ssh"),
        Kind::Open,
        T0,
        [10; 16],
        Some("198.18.0.2".parse().unwrap()),
    );
    let last = bound.iter().map(|k| w.send(CLIENT, k, T0)).last().unwrap();
    assert_eq!(last.outcome(), OPEN);
}

#[test]
fn close_and_heartbeat_are_single_authenticated_knocks() {
    let mut w = world(T0);
    for (kind, action) in [
        (Kind::Close, Action::Close),
        (Kind::Heartbeat, Action::Heartbeat),
    ] {
        let k = w.knocks("sensor", kind, T0, kind as u8 + 20);
        assert_eq!(k.len(), 1);
        let d = w.send(CLIENT, &k[0], T0);
        assert_eq!(d.outcome(), Outcome::Accepted(action));
        assert_eq!(d.reply().unwrap().kind, kind);
        assert_eq!(
            w.send(CLIENT, &k[0], T0).outcome(),
            Outcome::Rejected(Reason::Replay)
        );
    }
    // An open sequence with the wrong knock count.
    let short = sequence(
        &w.keys("sensor", "ssh"),
        &DoorParams {
            knocks: 2,
            ..params(&w.config, "ssh")
        },
        Kind::Open,
        T0,
        [30; 16],
        None,
    );
    assert_eq!(
        w.send(CLIENT, &short[0], T0).outcome(),
        Outcome::Rejected(Reason::WrongCount)
    );
}

#[test]
fn a_device_completing_too_many_sequences_is_rate_limited() {
    let mut w = world(T0);
    for n in 0..ACCEPTS_PER_DEVICE_STEP + 1 {
        let k = w.knocks("laptop", Kind::Heartbeat, T0, 100 + n as u8);
        let outcome = w.send(CLIENT, &k[0], T0).outcome();
        if n < ACCEPTS_PER_DEVICE_STEP {
            assert_eq!(outcome, Outcome::Accepted(Action::Heartbeat));
        } else {
            assert_eq!(outcome, Outcome::Rejected(Reason::RateLimited));
        }
    }
    // Other devices are unaffected.
    let k = w.knocks("sensor", Kind::Heartbeat, T0, 1);
    assert_eq!(
        w.send(CLIENT, &k[0], T0).outcome(),
        Outcome::Accepted(Action::Heartbeat)
    );
}

#[test]
fn partial_sequences_are_capped_per_device() {
    let mut w = world(T0);
    for n in 0..20 {
        let k = w.knocks("laptop", Kind::Open, T0, 200 + n);
        w.send(CLIENT, &k[0], T0);
    }
    assert_eq!(w.engine.state_sizes().pending, PENDING_PER_DEVICE);
    // The newest partial sequence survives and completes.
    let k = w.knocks("laptop", Kind::Open, T0, 219);
    assert_eq!(w.send(CLIENT, &k[1], T0).outcome(), progress(2));
    assert_eq!(w.send(CLIENT, &k[2], T0).outcome(), OPEN);
}

#[test]
fn knock_ports_follow_the_clock() {
    let mut w = world(T0);
    let before = w.engine.knock_ports();
    // 2 devices × 11 steps × 3 knocks, less collisions, plus 3 static knocks.
    assert!(
        before.len() > 40 && before.len() <= 2 * 11 * 3 + 3,
        "{}",
        before.len()
    );
    assert!(!w.engine.tick(T0 + 1000), "same step: nothing to reload");
    assert!(w.engine.tick(T0 + STEP_MS), "new step: reload");
    assert_ne!(w.engine.knock_ports(), before);
}

#[test]
fn static_sequences_follow_knockd_rules() {
    let mut w = world(T0);
    let a = "198.18.0.2:1";
    let b = "198.18.0.3:1";
    let p = |have| Outcome::Progress { have, need: 3 };
    // In order, with a tolerated repeat.
    assert_eq!(w.send_static(a, "6000:udp", T0), p(1));
    assert_eq!(w.send_static(a, "6000:udp", T0), Outcome::Duplicate);
    assert_eq!(w.send_static(a, "6001:tcp", T0), p(2));
    assert_eq!(w.send_static(a, "6001:tcp", T0), Outcome::Duplicate);
    assert_eq!(w.send_static(a, "6002:udp", T0), OPEN);
    // A wrong knock resets that source only.
    assert_eq!(w.send_static(a, "6000:udp", T0), p(1));
    assert_eq!(w.send_static(b, "6000:udp", T0), p(1));
    assert_eq!(
        w.send_static(a, "6002:udp", T0),
        Outcome::Rejected(Reason::WrongKnock)
    );
    assert_eq!(
        w.send_static(a, "6001:tcp", T0),
        Outcome::Rejected(Reason::WrongKnock)
    );
    assert_eq!(w.send_static(b, "6001:tcp", T0), p(2));
    assert_eq!(w.send_static(b, "6002:udp", T0), OPEN);
    // The protocol matters: 6001/udp is not 6001/tcp (and is not a knock).
    assert_eq!(w.send_static(a, "6000:udp", T0), p(1));
    assert_eq!(
        w.send_static(a, "6001:udp", T0),
        Outcome::Rejected(Reason::NoDoor)
    );
    // A wrong knock that is the first knock starts a new attempt.
    assert_eq!(w.send_static(a, "6000:udp", T0), Outcome::Duplicate);
    assert_eq!(w.send_static(a, "6001:tcp", T0), p(2));
    assert_eq!(
        w.send_static(a, "6000:udp", T0),
        Outcome::Rejected(Reason::WrongKnock)
    );
    assert_eq!(w.send_static(a, "6001:tcp", T0), p(2));
    // Too slow: the timeout (5 s) resets.
    assert_eq!(
        w.send_static(a, "6002:udp", T0 + 6000),
        Outcome::Rejected(Reason::Timeout)
    );
    assert_eq!(w.engine.static_progress().len(), 0);
}
