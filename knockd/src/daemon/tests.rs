//! The daemon's decisions, against the recording kernel
//! ([`crate::kernel::Fake`]) and a clock the tests move: knocks to grants
//! and replies, counters, revokes, the tick (expiry, a flushed table,
//! session caps), reload, and fleet replication with the cluster task
//! replaced by a channel the tests read. No root, no sleeping.

use std::{
    net::{IpAddr, SocketAddr},
    time::{Duration, SystemTime},
};

use tokio::sync::{mpsc, oneshot};

use super::{Daemon, Fleet, Now};
use crate::{
    cluster::{Event, Link, Request, model::GrantRecord},
    config::Config,
    control::{Command, Response},
    cut,
    devices::{Devices, test_key as key},
    events::SeenKnock,
    grants::Holder,
    hooks::HookEvent,
    kernel::Fake,
    maps::Proto,
    proto::{DoorKeys, Kind, sequence},
    state::StateFile,
};

/// 2025-02-19T21:20:00Z: the start of a 30 s step.
const T0: u64 = 1_740_000_000_000;
const CLIENT: &str = "198.18.0.2:40000";
const OTHER: &str = "198.18.0.3:40000";
const SERVER: &str = "198.18.0.1";

/// One one-time door (ssh) and one static door (web); `extra` goes into
/// the ssh door's settings, `top` before `doors:`.
fn yaml(top: &str, extra: &str) -> String {
    format!(
        "interfaces: [eth0]\n\
         {top}\
         devices:\n\
         \x20 laptop: {{ key_file: /k/laptop, groups: [admins] }}\n\
         \x20 phone: {{ key_file: /k/phone, groups: [admins] }}\n\
         doors:\n\
         \x20 ssh: {{ service_port: 22, allow: {{ groups: [admins] }}, grant_ports: \"40000-40099\"{extra} }}\n\
         \x20 web: {{ service_port: 443, mode: static, sequence: [\"6000:udp\", \"6001:udp\"] }}\n"
    )
}

/// The configuration's key files in `dir`.
fn in_dir(yaml: &str, dir: &std::path::Path) -> String {
    yaml.replace("/k/", &format!("{}/", dir.display()))
}

fn devices(config: &Config) -> Devices {
    Devices::for_tests(config)
}

/// A daemon on the fake kernel, its state in a directory of its own,
/// with the clock at `t0`.
struct World {
    daemon: Daemon,
    now: Now,
    dir: tempfile::TempDir,
    nonce: u8,
}

impl World {
    fn new(top: &str, extra: &str) -> World {
        World::from_yaml(&yaml(top, extra))
    }

    /// A daemon on `yaml`, whose `/k/` key files are written for it.
    fn from_yaml(yaml: &str) -> World {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        for id in ["laptop", "phone"] {
            let file = dir.path().join(id);
            std::fs::write(&file, key(id).to_hex()).unwrap();
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        }
        let path = dir.path().join("knockd.yaml");
        let text = in_dir(yaml, dir.path());
        std::fs::write(&path, &text).unwrap();
        let config = Config::parse(&text, &path).unwrap();
        let devices = devices(&config);
        let state = StateFile::open(&dir.path().join("state")).unwrap();
        let now = Now {
            mono: std::time::Instant::now(),
            wall: SystemTime::UNIX_EPOCH + Duration::from_millis(T0),
            unix_ms: T0,
        };
        let mut daemon =
            Daemon::new(config, &devices, Box::new(Fake::default()), state, now).unwrap();
        daemon.set_origin(Some(path), Vec::new());
        World {
            daemon,
            now,
            dir,
            nonce: 0,
        }
    }

    fn kernel(&mut self) -> &mut Fake {
        self.daemon.kernel.fake().expect("the fake kernel")
    }

    fn later(&mut self, by: Duration) -> Now {
        self.now = self.now.after(by);
        self.now
    }

    /// A fresh sequence of `kind` by `device` to ssh, from `from`: its
    /// knocks, then the flush that follows a batch.
    fn knock(&mut self, device: &str, kind: Kind, from: &str) {
        self.nonce += 1;
        let knocks = self.sequence(device, kind, self.nonce);
        for (port, payload) in knocks {
            self.send(from, port, &payload);
        }
        self.daemon.flush(self.now).unwrap();
    }

    /// The knocks of a sequence of `kind` by `device` to ssh, now.
    fn sequence(&self, device: &str, kind: Kind, nonce: u8) -> Vec<(u16, [u8; 68])> {
        let params = self.daemon.config.doors["ssh"].one_time().unwrap().params();
        sequence(
            &DoorKeys::derive(&key(device), "ssh"),
            &params,
            kind,
            self.now.unix_ms,
            [nonce; 16],
            None,
        )
        .to_vec()
    }

    fn send(&mut self, from: &str, port: u16, payload: &[u8]) {
        let knock = SeenKnock {
            at_ns: 0,
            source: from.parse().unwrap(),
            destination: SocketAddr::new(SERVER.parse().unwrap(), port),
            proto: Proto::Udp,
            ifindex: 1,
            tcp_flags: 0,
            payload_len: payload.len() as u16,
            payload: payload.to_vec(),
        };
        self.daemon.on_knock(&knock, self.now).unwrap();
    }

    fn request(&mut self, command: Command) -> Response {
        let (reply, mut answer) = oneshot::channel();
        self.daemon.handle(command, reply, self.now);
        answer.try_recv().expect("answered at once")
    }

    fn count(&self, what: &str) -> u64 {
        self.daemon.tally().get(what).copied().unwrap_or(0)
    }

    /// The port of laptop's grant on ssh at `source`.
    fn port(&self, source: &str) -> Option<u16> {
        self.port_of("laptop", source)
    }

    /// The port of `device`'s grant on ssh at `source`.
    fn port_of(&self, device: &str, source: &str) -> Option<u16> {
        let holder = Holder::new("ssh", ip(source), Some(device));
        self.daemon.grants.get(&holder).map(|g| g.port)
    }
}

fn ip(addr: &str) -> IpAddr {
    addr.parse::<SocketAddr>().unwrap().ip()
}

#[test]
fn an_accepted_open_grants_in_both_kernel_places_then_replies() {
    let mut w = World::new("", "");
    w.knock("laptop", Kind::Open, CLIENT);
    let port = w.port(CLIENT).expect("a grant");
    assert!((40000..=40099).contains(&port));
    assert!(w.kernel().admits("ssh", ip(CLIENT), port));
    let replies = &w.kernel().replies;
    assert_eq!(replies.len(), 1, "one sealed reply");
    assert_eq!(replies[0].1, CLIENT.parse::<SocketAddr>().unwrap());
    assert_eq!(w.count("accepted"), 1);
    assert!(
        w.kernel().policy.get(Proto::Tcp, port) & knockd_common::policy::GRANTED != 0,
        "the port is marked for probe counting"
    );
}

#[test]
fn nothing_is_acted_on_before_its_sequence_is_on_disk() {
    let mut w = World::new("", "");
    let knocks = w.sequence("laptop", Kind::Open, 90);
    for (port, payload) in &knocks {
        w.send(CLIENT, *port, payload);
    }
    assert!(w.kernel().allowed.is_empty() && w.kernel().replies.is_empty());
    assert_eq!(w.count("accepted"), 0, "not final: not counted");
    let now = w.now;
    w.daemon.flush(now).unwrap();
    assert_eq!(w.kernel().replies.len(), 1);
    assert_eq!(w.count("accepted"), 1);
}

#[test]
fn a_replayed_sequence_is_refused_and_each_of_its_knocks_counted_once() {
    let mut w = World::new("", "");
    let knocks = w.sequence("laptop", Kind::Open, 70);
    for _ in 0..2 {
        for (port, payload) in &knocks {
            w.send(CLIENT, *port, payload);
        }
        let now = w.now;
        w.daemon.flush(now).unwrap();
    }
    assert_eq!(w.count("accepted"), 1);
    assert_eq!(w.kernel().replies.len(), 1, "no second reply");
    let rejected: u64 = w
        .daemon
        .decisions
        .iter()
        .filter(|((_, outcome, _), _)| *outcome == "rejected")
        .map(|(_, n)| n)
        .sum();
    assert_eq!(rejected, knocks.len() as u64, "{:?}", w.daemon.tally());
    assert_eq!(w.count("replay"), knocks.len() as u64);
}

#[test]
fn decision_counters_never_go_down() {
    let mut w = World::new("", "");
    let mut last = w.daemon.tally();
    let mut check = |w: &World| {
        let now = w.daemon.tally();
        for (k, v) in &last {
            assert!(now.get(k).copied().unwrap_or(0) >= *v, "{k} went down");
        }
        last = now;
    };
    w.knock("laptop", Kind::Open, CLIENT);
    check(&w);
    w.send(OTHER, 40000, b"garbage");
    check(&w);
    w.kernel().fail_grants = true;
    w.knock("phone", Kind::Open, OTHER);
    check(&w);
    w.kernel().fail_grants = false;
    w.knock("laptop", Kind::Close, CLIENT);
    check(&w);
    w.later(Duration::from_secs(3));
    let now = w.now;
    w.daemon.tick(now).unwrap();
    check(&w);
}

#[test]
fn a_kernel_that_refuses_the_grant_gets_no_reply_sent_and_an_error_kept() {
    let mut w = World::new("", "");
    w.kernel().fail_grants = true;
    w.knock("laptop", Kind::Open, CLIENT);
    assert!(w.kernel().replies.is_empty(), "no reply promises a port");
    assert!(w.port(CLIENT).is_none());
    assert!(
        w.daemon
            .recent_errors
            .iter()
            .any(|(_, e)| e.contains("could not act on an accepted knock")),
        "{:?}",
        w.daemon.recent_errors
    );
}

#[test]
fn a_static_sequence_opens_the_service_port_itself() {
    let mut w = World::new("", "");
    w.send(CLIENT, 6000, b"");
    assert!(w.kernel().elements.is_empty(), "one knock opens nothing");
    w.send(CLIENT, 6001, b"");
    assert!(
        w.kernel()
            .elements
            .contains_key(&("static".into(), ip(CLIENT), 443))
    );
    assert!(w.kernel().allowed.contains_key(&(ip(CLIENT), 443)));
    assert!(w.kernel().replies.is_empty(), "static doors never reply");
}

#[test]
fn a_reply_states_whole_seconds_under_the_grant() {
    let mut w = World::new("", ", open_for_secs: 30");
    w.knock("laptop", Kind::Open, CLIENT);
    let grants = w.daemon.grant_views();
    assert_eq!(
        grants[0].secs_left, 30,
        "status: the time left at the event"
    );
    // The reply is sealed: its length says it is there; its stated
    // seconds are checked end to end (29 for 30).
    assert_eq!(w.kernel().replies.len(), 1);
}

#[test]
fn revoking_a_device_ends_its_grant_and_cuts_its_connections() {
    let mut w = World::new("", "");
    w.knock("laptop", Kind::Open, CLIENT);
    let port = w.port(CLIENT).unwrap();
    let session = cut::Session::seen(
        0,
        CLIENT.parse().unwrap(),
        "198.18.0.1:22".parse().unwrap(),
        port,
        Some(w.now.wall),
    );
    w.kernel().live.push(session);
    let answer = w.request(Command::Revoke {
        target: "laptop".into(),
    });
    assert!(answer.ok, "{answer:?}");
    assert_eq!(answer.data.unwrap()["revoked"], 1);
    assert!(w.port(CLIENT).is_none());
    assert!(!w.kernel().admits("ssh", ip(CLIENT), port));
    assert!(w.kernel().live.is_empty(), "its connection is cut");
    assert_eq!(w.kernel().cuts.len(), 1);
}

/// Two devices behind one address (a NAT): a grant and a port each; one's
/// close, heartbeat or revoke acts on its own grant alone, and a revoke of
/// the address ends both.
#[test]
fn devices_behind_one_address_each_hold_their_own_grant() {
    let mut w = World::new("", "");
    w.knock("laptop", Kind::Open, CLIENT);
    w.knock("phone", Kind::Open, CLIENT);
    let laptop = w.port_of("laptop", CLIENT).unwrap();
    let phone = w.port_of("phone", CLIENT).unwrap();
    assert_ne!(laptop, phone);
    assert_eq!(w.kernel().replies.len(), 2, "a reply each");
    w.knock("phone", Kind::Heartbeat, CLIENT);
    w.knock("laptop", Kind::Close, CLIENT);
    assert!(w.port_of("laptop", CLIENT).is_none());
    assert!(!w.kernel().admits("ssh", ip(CLIENT), laptop));
    assert_eq!(w.port_of("phone", CLIENT), Some(phone));
    assert!(w.kernel().admits("ssh", ip(CLIENT), phone));
    // A revoke of the laptop finds nothing of the phone's to end.
    w.knock("laptop", Kind::Open, CLIENT);
    let answer = w.request(Command::Revoke {
        target: "laptop".into(),
    });
    assert_eq!(answer.data.unwrap()["revoked"], 1);
    assert_eq!(w.port_of("phone", CLIENT), Some(phone));
    // A revoke of the address ends every device's grant behind it.
    w.knock("laptop", Kind::Open, CLIENT);
    let answer = w.request(Command::Revoke {
        target: ip(CLIENT).to_string(),
    });
    assert_eq!(answer.data.unwrap()["revoked"], 2);
    assert!(w.daemon.grants.list().is_empty());
}

#[test]
fn revoking_an_unknown_name_changes_nothing() {
    let mut w = World::new("", "");
    w.knock("laptop", Kind::Open, CLIENT);
    let before = w.kernel().allowed.clone();
    let answer = w.request(Command::Revoke {
        target: "nobody".into(),
    });
    assert!(!answer.ok);
    assert!(answer.error.unwrap().contains("no device \"nobody\""));
    assert_eq!(w.kernel().allowed, before);
    assert!(w.kernel().cuts.is_empty());
}

#[test]
fn a_grant_ends_at_its_deadline_on_the_tick() {
    let mut w = World::new("", ", open_for_secs: 5");
    w.knock("laptop", Kind::Open, CLIENT);
    let now = w.later(Duration::from_secs(4));
    w.daemon.tick(now).unwrap();
    assert!(w.port(CLIENT).is_some(), "4 s of 5: still there");
    let now = w.later(Duration::from_secs(2));
    w.daemon.tick(now).unwrap();
    assert!(w.port(CLIENT).is_none(), "past its deadline");
}

#[test]
fn a_flushed_table_is_put_back_with_its_grants() {
    let mut w = World::new("", "");
    w.knock("laptop", Kind::Open, CLIENT);
    let port = w.port(CLIENT).unwrap();
    let installs = w.kernel().installs;
    w.kernel().table = false;
    w.kernel().elements.clear();
    let now = w.later(Duration::from_secs(3));
    w.daemon.tick(now).unwrap();
    assert_eq!(w.kernel().installs, installs + 1);
    assert!(w.kernel().admits("ssh", ip(CLIENT), port));
}

#[test]
fn a_session_past_its_cap_is_cut_at_the_tick_and_a_younger_one_is_not() {
    let mut w = World::new("", ", max_session_secs: 60");
    w.knock("laptop", Kind::Open, CLIENT);
    let port = w.port(CLIENT).unwrap();
    let wall = w.now.wall;
    let old = cut::Session::seen(
        0,
        CLIENT.parse().unwrap(),
        "198.18.0.1:22".parse().unwrap(),
        port,
        Some(wall - Duration::from_secs(61)),
    );
    let young = cut::Session::seen(
        0,
        "198.18.0.2:40001".parse().unwrap(),
        "198.18.0.1:22".parse().unwrap(),
        port,
        Some(wall - Duration::from_secs(30)),
    );
    w.kernel().live.extend([old.clone(), young.clone()]);
    let now = w.later(Duration::from_millis(100));
    w.daemon.tick(now).unwrap();
    assert_eq!(w.kernel().ended, vec![old]);
    assert_eq!(w.count("session_capped"), 1);
    // The young one is due at its deadline, not before.
    let now = w.later(Duration::from_secs(29));
    w.daemon.tick(now).unwrap();
    assert_eq!(w.kernel().ended.len(), 1);
    let now = w.later(Duration::from_secs(2));
    w.daemon.tick(now).unwrap();
    assert_eq!(w.kernel().ended.len(), 2, "cut at its cap");
}

#[test]
fn a_refused_reload_leaves_the_kernel_and_the_running_state_untouched() {
    let mut w = World::new("", "");
    w.knock("laptop", Kind::Open, CLIENT);
    let (installs, allowed) = (w.kernel().installs, w.kernel().allowed.clone());
    std::fs::write(w.dir.path().join("knockd.yaml"), "doors: [not, a, map]\n").unwrap();
    let answer = w.request(Command::Reload);
    assert!(!answer.ok);
    assert_eq!(w.kernel().installs, installs, "nothing was installed");
    assert_eq!(w.kernel().allowed, allowed);
    assert!(w.port(CLIENT).is_some());
    assert_eq!(w.daemon.reloads, (0, 1));
    assert!(w.daemon.last_reload().starts_with("reload refused"));
    // A valid file the kernel refuses to apply: the running door stays.
    let text = in_dir(&yaml("", ", open_for_secs: 60"), w.dir.path());
    std::fs::write(w.dir.path().join("knockd.yaml"), text).unwrap();
    w.kernel().fail_grants = true;
    let answer = w.request(Command::Reload);
    assert!(!answer.ok);
    assert_eq!(w.daemon.config.doors["ssh"].open_for_secs, 30);
    assert!(w.port(CLIENT).is_some());
    assert_eq!(w.daemon.reloads, (0, 2));
}

#[test]
fn a_reload_keeps_grants_and_the_running_interfaces() {
    let mut w = World::new("", "");
    w.knock("laptop", Kind::Open, CLIENT);
    let port = w.port(CLIENT).unwrap();
    let changed = yaml("", ", open_for_secs: 60").replace("[eth0]", "[eth0, eth1]");
    let changed = in_dir(&changed, w.dir.path());
    std::fs::write(w.dir.path().join("knockd.yaml"), changed).unwrap();
    let answer = w.request(Command::Reload);
    assert!(answer.ok, "{answer:?}");
    assert_eq!(
        w.daemon.config.interfaces,
        ["eth0"],
        "a restart's to change"
    );
    assert_eq!(w.daemon.config.doors["ssh"].open_for_secs, 60);
    assert_eq!(w.port(CLIENT), Some(port));
    assert!(w.kernel().admits("ssh", ip(CLIENT), port));
}

// Fleet mode: the cluster task is a channel the tests read.

const CLUSTER: &str = "cluster: { name: n1, endpoints: [\"http://198.18.0.21:2379\"] }\n";

struct FleetWorld {
    w: World,
    requests: mpsc::UnboundedReceiver<Request>,
}

impl FleetWorld {
    fn new(extra: &str) -> FleetWorld {
        let mut w = World::new(CLUSTER, &format!(", scope: cluster{extra}"));
        let (link, requests) = Link::fake("n1");
        let local = devices(&w.daemon.config);
        let state_dir = w.dir.path().join("state");
        let now = w.now;
        w.daemon
            .set_fleet(Fleet::new(link, local, None, state_dir, now));
        FleetWorld { w, requests }
    }

    fn event(&mut self, event: Event) {
        let now = self.w.now;
        self.w.daemon.on_fleet(event, now).unwrap();
    }

    fn synced(&mut self, grants: Vec<(Holder, GrantRecord, i64)>) {
        self.event(Event::Synced {
            revision: 10,
            devices: Vec::new(),
            grants,
            revokes: Vec::new(),
        });
    }

    /// What the daemon sent the cluster task since the last call, reports
    /// left out.
    fn sent(&mut self) -> Vec<Request> {
        let mut out = Vec::new();
        while let Ok(request) = self.requests.try_recv() {
            if !matches!(request, Request::Report(_)) {
                out.push(request);
            }
        }
        out
    }

    /// The token of the one request sent since: etcd's consume of a
    /// knock's sequence.
    fn consume_token(&mut self) -> u64 {
        match self.sent().as_slice() {
            [Request::Consume { token, .. }] => *token,
            other => panic!("{other:?}"),
        }
    }

    /// etcd's answer to consume `token`.
    fn consumed(&mut self, token: u64, result: Result<bool, String>) {
        self.event(Event::Consumed { token, result });
    }

    /// Knocks an open; etcd confirms the sequence is fresh.
    fn open_confirmed(&mut self) -> u16 {
        self.w.knock("laptop", Kind::Open, CLIENT);
        let token = self.consume_token();
        self.consumed(token, Ok(true));
        self.w.port(CLIENT).expect("granted once etcd agreed")
    }
}

fn record(port: u16, node: &str, now: Now, opened_at_ms: u64) -> GrantRecord {
    GrantRecord {
        mac: String::new(),
        version: crate::cluster::model::RECORD_VERSION,
        port,
        device: Some("laptop".into()),
        node: node.into(),
        expires_at_ms: now.unix_ms + 30_000,
        leased: false,
        opened_at_ms,
    }
}

fn key_of() -> Holder {
    Holder::new("ssh", ip(CLIENT), Some("laptop"))
}

#[test]
fn fleet_a_knock_waits_for_etcd_then_its_grant_is_published_pending_then_written() {
    let mut f = FleetWorld::new("");
    f.synced(Vec::new());
    f.w.knock("laptop", Kind::Open, CLIENT);
    assert!(f.w.port(CLIENT).is_none(), "nothing before etcd's word");
    assert_eq!(f.w.count("accepted"), 0);
    let token = f.consume_token();
    f.consumed(token, Ok(true));
    let port = f.w.port(CLIENT).unwrap();
    assert_eq!(f.w.count("accepted"), 1);
    match f.sent().as_slice() {
        [Request::PutGrant { holder, record }] => {
            assert_eq!((holder, record.port), (&key_of(), port));
            assert_eq!(record.node, "n1");
        }
        other => panic!("{other:?}"),
    }
    let replication = &f.w.daemon.fleet.as_ref().unwrap().replication;
    assert_eq!(
        replication.state(&key_of()),
        Some(crate::cluster::replication::State::Pending)
    );
    f.event(Event::GrantWritten {
        holder: key_of(),
        revision: 12,
    });
    let replication = &f.w.daemon.fleet.as_ref().unwrap().replication;
    assert_eq!(
        replication.state(&key_of()),
        Some(crate::cluster::replication::State::At(12))
    );
}

#[test]
fn fleet_a_sequence_etcd_has_is_a_replay_counted_once_and_never_accepted() {
    let mut f = FleetWorld::new("");
    f.synced(Vec::new());
    f.w.knock("laptop", Kind::Open, CLIENT);
    let token = f.consume_token();
    f.consumed(token, Ok(false));
    assert!(f.w.port(CLIENT).is_none());
    assert!(f.w.kernel().replies.is_empty());
    assert_eq!((f.w.count("accepted"), f.w.count("replay")), (0, 1));
}

#[test]
fn fleet_a_cluster_door_fails_closed_before_the_first_sync() {
    let mut f = FleetWorld::new("");
    f.w.knock("laptop", Kind::Open, CLIENT);
    assert!(f.w.port(CLIENT).is_none());
    assert!(f.sent().is_empty(), "etcd is not asked while unsynced");
    assert_eq!(f.w.count("cluster_unavailable"), 1);
}

#[test]
fn fleet_a_grant_made_without_etcd_is_published_at_the_resync() {
    let mut f = FleetWorld::new(", on_cluster_unavailable: local");
    f.w.knock("laptop", Kind::Open, CLIENT);
    let port = f.w.port(CLIENT).expect("local fallback acts");
    assert!(f.sent().is_empty(), "etcd is away: nothing to write to");
    f.synced(Vec::new());
    match f.sent().as_slice() {
        [Request::PutGrant { record, .. }] => assert_eq!(record.port, port),
        other => panic!("{other:?}"),
    }
    assert_eq!(
        f.w.port(CLIENT),
        Some(port),
        "not closed for etcd's silence"
    );
}

#[test]
fn fleet_a_refused_delete_is_carried_out_at_the_resync() {
    let mut f = FleetWorld::new("");
    f.synced(Vec::new());
    let port = f.open_confirmed();
    f.sent();
    f.w.knock("laptop", Kind::Close, CLIENT);
    // A close in fleet mode waits for etcd too.
    if let [Request::Consume { token, .. }] = f.sent().as_slice() {
        let token = *token;
        f.event(Event::Consumed {
            token,
            result: Ok(true),
        });
    }
    assert!(f.w.port(CLIENT).is_none());
    assert!(matches!(f.sent().as_slice(), [Request::DeleteGrant { .. }]));
    f.event(Event::WithdrawFailed {
        holder: key_of(),
        why: "etcd timed out".into(),
    });
    // etcd still lists it at the next sync: deleted again, not reopened.
    let now = f.w.now;
    f.synced(vec![(key_of(), record(port, "n1", now, T0), 11)]);
    assert!(f.w.port(CLIENT).is_none(), "not installed again");
    assert!(
        f.sent()
            .iter()
            .any(|r| matches!(r, Request::DeleteGrant { holder } if &*holder.door == "ssh"))
    );
}

#[test]
fn fleet_another_nodes_grant_is_installed_and_withdrawn_by_a_newer_delete_only() {
    let mut f = FleetWorld::new("");
    f.synced(Vec::new());
    let now = f.w.now;
    f.event(Event::Grant {
        holder: key_of(),
        record: Some(record(40042, "n2", now, T0)),
        revision: 20,
    });
    assert_eq!(f.w.port(CLIENT), Some(40042), "the same port on every node");
    assert!(f.w.kernel().admits("ssh", ip(CLIENT), 40042));
    f.event(Event::Grant {
        holder: key_of(),
        record: None,
        revision: 19,
    });
    assert_eq!(f.w.port(CLIENT), Some(40042), "an older delete is ignored");
    f.event(Event::Grant {
        holder: key_of(),
        record: None,
        revision: 21,
    });
    assert!(f.w.port(CLIENT).is_none());
    assert!(!f.w.kernel().admits("ssh", ip(CLIENT), 40042));
}

#[test]
fn fleet_a_grant_opened_before_a_known_revoke_is_refused() {
    let mut f = FleetWorld::new("");
    let now = f.w.now;
    f.event(Event::Synced {
        revision: 10,
        devices: Vec::new(),
        grants: Vec::new(),
        revokes: vec![(
            "r1".into(),
            crate::cluster::model::RevokeRecord {
                mac: String::new(),
                version: crate::cluster::model::RECORD_VERSION,
                target: "laptop".into(),
                node: "n2".into(),
                at_ms: now.unix_ms - 1_000,
            },
        )],
    });
    f.event(Event::Grant {
        holder: key_of(),
        record: Some(record(40042, "n2", now, now.unix_ms - 5_000)),
        revision: 20,
    });
    assert!(f.w.port(CLIENT).is_none(), "a replayed grant opens nothing");
    assert!(
        f.w.daemon
            .recent_errors
            .iter()
            .any(|(_, e)| e.contains("opened before revoke r1"))
    );
    // One opened after the revoke is a new grant.
    f.event(Event::Grant {
        holder: key_of(),
        record: Some(record(40043, "n2", now, now.unix_ms)),
        revision: 21,
    });
    assert_eq!(f.w.port(CLIENT), Some(40043));
}

#[test]
fn fleet_a_revoke_holds_here_when_etcd_refuses_it_and_is_published_at_resync() {
    let mut f = FleetWorld::new("");
    f.synced(Vec::new());
    f.open_confirmed();
    f.sent();
    let (reply, mut answer) = oneshot::channel();
    let now = f.w.now;
    f.w.daemon.handle(
        Command::Revoke {
            target: "laptop".into(),
        },
        reply,
        now,
    );
    assert!(f.w.port(CLIENT).is_none(), "ended here at once");
    let id = match f.sent().as_slice() {
        [Request::Revoke { id, .. }] => id.clone(),
        other => panic!("{other:?}"),
    };
    f.event(Event::RevokeNotPublished {
        id: id.clone(),
        why: "no quorum".into(),
    });
    let answer = answer.try_recv().unwrap();
    assert!(answer.ok);
    assert!(answer.data.unwrap()["pending"].is_string());
    assert_eq!(
        f.w.daemon.fleet.as_ref().unwrap().revokes.pending_count(),
        1
    );
    f.synced(Vec::new());
    assert!(
        f.sent()
            .iter()
            .any(|r| matches!(r, Request::Revoke { id: again, .. } if *again == id))
    );
}

#[test]
fn hooks_run_after_an_open_and_when_the_grant_ends_with_its_facts() {
    let hooks = ", hooks: { on_open: [/srv/up, \"%IP%\"], on_close: [/srv/down], user: nobody }";
    let mut w = World::new("", &format!(", open_for_secs: 5{hooks}"));
    w.knock("laptop", Kind::Open, CLIENT);
    let port = w.port(CLIENT).unwrap();
    let run = w.kernel().hooks[0].clone();
    assert_eq!(run.event, HookEvent::Open);
    assert_eq!((run.door.as_str(), run.port), ("ssh", port));
    assert_eq!(run.source, ip(CLIENT));
    assert_eq!(run.device.as_deref(), Some("laptop"));
    assert_eq!(run.argv().unwrap(), ["/srv/up", "198.18.0.2"]);
    assert!(w.kernel().replies.len() == 1, "the reply went out too");
    // Its deadline ends it: the close hook.
    let now = w.later(Duration::from_secs(6));
    w.daemon.tick(now).unwrap();
    let runs: Vec<HookEvent> = w.kernel().hooks.iter().map(|r| r.event).collect();
    assert_eq!(runs, [HookEvent::Open, HookEvent::Close]);
    assert_eq!(w.kernel().hooks[1].port, port);
    // A close knock and a revoke end grants too.
    w.knock("laptop", Kind::Open, CLIENT);
    w.knock("laptop", Kind::Close, CLIENT);
    w.knock("phone", Kind::Open, OTHER);
    let answer = w.request(Command::Revoke {
        target: "phone".into(),
    });
    assert!(answer.ok, "{answer:?}");
    let runs: Vec<(HookEvent, IpAddr)> = w.kernel().hooks[2..]
        .iter()
        .map(|r| (r.event, r.source))
        .collect();
    assert_eq!(
        runs,
        [
            (HookEvent::Open, ip(CLIENT)),
            (HookEvent::Close, ip(CLIENT)),
            (HookEvent::Open, ip(OTHER)),
            (HookEvent::Close, ip(OTHER)),
        ]
    );
}

#[test]
fn an_action_door_opens_nothing_and_runs_its_hooks_until_open_for_has_passed() {
    let mut w = World::from_yaml(&format!(
        "{}  wake: {{ mode: static, sequence: [\"6100:udp\"], open_for_secs: 5, \
         hooks: {{ on_open: [/srv/wake, \"%IP%\"], on_close: [/srv/sleep], user: nobody }} }}\n",
        yaml("", "")
    ));
    w.send(CLIENT, 6100, b"");
    let kernel = w.kernel();
    assert!(
        kernel.elements.is_empty() && kernel.allowed.is_empty(),
        "no port opened"
    );
    assert_eq!(kernel.hooks.len(), 1);
    let run = kernel.hooks[0].clone();
    assert_eq!((run.event, run.door.as_str()), (HookEvent::Open, "wake"));
    assert_eq!(run.argv().unwrap(), ["/srv/wake", "198.18.0.2"]);
    assert!(
        run.env().contains(&("KNOCKD_PORT", String::new())),
        "no port to tell"
    );
    // The sequence again renews the grant and runs the open hook again,
    // as classic knockd runs its start command on each sequence.
    w.later(Duration::from_secs(3));
    w.send(CLIENT, 6100, b"");
    let now = w.later(Duration::from_secs(4));
    w.daemon.tick(now).unwrap();
    assert_eq!(w.kernel().hooks.len(), 2, "5 s since the last: not over");
    let now = w.later(Duration::from_secs(2));
    w.daemon.tick(now).unwrap();
    let runs: Vec<HookEvent> = w.kernel().hooks.iter().map(|r| r.event).collect();
    assert_eq!(runs, [HookEvent::Open, HookEvent::Open, HookEvent::Close]);
    // A revoke of the address ends it too, and cuts nothing for it.
    w.send(CLIENT, 6100, b"");
    let answer = w.request(Command::Revoke {
        target: "198.18.0.2".into(),
    });
    assert!(answer.ok, "{answer:?}");
    assert_eq!(w.kernel().hooks.last().unwrap().event, HookEvent::Close);
    assert!(w.daemon.grant_views().is_empty());
}

#[test]
fn a_udp_door_admits_in_nftables_alone_and_a_revoke_cuts_its_udp_flows() {
    let mut w = World::from_yaml(&format!(
        "{}  vpn: {{ service_port: 51820, service_protocol: udp, mode: static, \
         sequence: [\"6200:udp\", \"6201:tcp\"] }}\n",
        yaml("", "")
    ));
    w.send(CLIENT, 6200, b"");
    let tcp = SeenKnock {
        at_ns: 0,
        source: CLIENT.parse().unwrap(),
        destination: SocketAddr::new(SERVER.parse().unwrap(), 6201),
        proto: Proto::Tcp,
        ifindex: 1,
        tcp_flags: 0x02,
        payload_len: 0,
        payload: Vec::new(),
    };
    w.daemon.on_knock(&tcp, w.now).unwrap();
    let kernel = w.kernel();
    assert!(
        kernel
            .elements
            .contains_key(&("static_udp".into(), ip(CLIENT), 51820)),
        "{:?}",
        kernel.elements
    );
    assert!(
        kernel.allowed.is_empty(),
        "XDP passes a UDP door's port: no allow entry"
    );
    let answer = w.request(Command::Revoke {
        target: "198.18.0.2".into(),
    });
    assert!(answer.ok, "{answer:?}");
    let kernel = w.kernel();
    assert!(kernel.elements.is_empty(), "the element is gone");
    let cut = kernel.cuts[0]
        .iter()
        .find(|c| c.service_port == 51820)
        .expect("the UDP door's flows are cut");
    assert!(cut.udp && cut.source == ip(CLIENT));
}

#[test]
fn a_door_without_hooks_and_a_refused_knock_run_none() {
    let mut w = World::new("", "");
    w.knock("laptop", Kind::Open, CLIENT);
    let hooks = ", hooks: { on_open: [/srv/up], user: nobody }";
    let mut h = World::new("", hooks);
    h.kernel().fail_grants = true;
    h.knock("laptop", Kind::Open, CLIENT);
    assert!(w.kernel().hooks.is_empty() && h.kernel().hooks.is_empty());
}
