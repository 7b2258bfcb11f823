//! Fleet mode end to end: a real 3-member etcd cluster and three knockd
//! nodes, each in its own namespace, with a client on the same segment.
//! Every promise of `docs/CLUSTER.md` is checked with real knocks, real TCP
//! connects and the real nftables table.

use std::time::{Duration, Instant};

use knockd::proto::DeviceKey;
use knockd::proto::{self, DoorKeys, Kind};
use knockd_tests::{
    control_raw,
    fleet::{Fleet, LOST, v6_of},
    knockctl, knockctl_json, privileged, probe,
    probe::Outcome,
};
use serde_json::{Value, json};

fn fleet(tls: bool) -> Option<Fleet> {
    fleet_with(3, tls, "")
}

/// `nodes` nodes whose door has `door_extra`, on a 3-member etcd; `None`
/// without root (outside CI: the test is skipped, and says so).
fn fleet_with(nodes: usize, tls: bool, door_extra: &str) -> Option<Fleet> {
    if !privileged() {
        return None;
    }
    let mut fleet = Fleet::new(nodes, tls);
    fleet.start_all(door_extra);
    Some(fleet)
}

/// Waits until `pred` holds, or panics with `what`.
#[track_caller]
fn eventually(what: &str, timeout: Duration, mut pred: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while start.elapsed() < timeout {
        if pred() {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("{what}: not within {timeout:?}");
}

#[test]
fn a_knock_on_one_node_opens_the_door_on_every_node() {
    let Some(mut fleet) = fleet(false) else {
        return;
    };
    // The service port itself stays shut on every node: fleet nodes start
    // with no local device, and that must not open it to everyone.
    for i in 0..3 {
        assert_ne!(
            fleet.connect(i, knockd_tests::fleet::SSH).0,
            Outcome::Answered,
            "node {}'s service port is open without a grant",
            i + 1
        );
    }
    // A device added on node B reaches every node within a second, and
    // node A admits it.
    let added = Instant::now();
    let key = fleet.add_device(1, "laptop");
    let took = added.elapsed();
    eprintln!("device add on B reached every node in {took:?}");
    assert!(took < Duration::from_secs(1), "{took:?}");
    let started = Instant::now();
    let answer = loop {
        match fleet.knock(0, &key, Kind::Open) {
            Ok(answer) => break answer,
            Err(e) => assert!(started.elapsed() < Duration::from_secs(8), "knock A: {e}"),
        }
    };
    let port = answer.reply.port;
    eprintln!(
        "device added on B, knock on A answered after {:?}: port {port}",
        started.elapsed()
    );
    // The same port opens on A, B and C, for the client only.
    for i in 0..3 {
        let (took, mut stream) = fleet
            .wait_open(i, port, Duration::from_secs(3))
            .unwrap_or_else(|| panic!("port {port} on node {} never opened", i + 1));
        assert!(probe::echo_round_trip(&mut stream, b"fleet"));
        eprintln!("node {}: port {port} answered after {took:?}", i + 1);
    }
    // Every node's table holds the element, with a kernel deadline.
    for node in &fleet.nodes {
        let table = knockd_tests::sh(
            node.ns
                .command("nft")
                .args(["list", "table", "inet", "knockd"]),
        );
        assert!(
            table.contains(&format!("{} . {port}", fleet.client_addr)),
            "{}:\n{table}",
            node.name
        );
        assert!(table.contains("expires"), "{table}");
    }
    // status --cluster shows three nodes up, each with the grant.
    let status = knockctl_json(&fleet.nodes[2].socket(), &["status", "--cluster"]);
    let nodes = status["nodes"].as_array().unwrap();
    assert_eq!(nodes.len(), 3, "{status:#}");
    eventually(
        "every node reports the grant",
        Duration::from_secs(3),
        || {
            let status = knockctl_json(&fleet.nodes[2].socket(), &["status", "--cluster"]);
            status["nodes"].as_array().unwrap().iter().all(|n| {
                n["health"] == "up"
                    && n["report"]["grants"]
                        .as_array()
                        .is_some_and(|g| g.len() == 1)
            })
        },
    );
    let table = knockctl(&fleet.nodes[0].socket(), &["status", "--cluster"]);
    eprintln!("{}", String::from_utf8_lossy(&table.stdout));
    // The metrics say so too.
    let metrics = control_metrics(&fleet.nodes[0].socket());
    assert!(metrics.contains("knockd_fleet_synced 1"), "{metrics}");
    assert!(
        metrics.contains("knockd_fleet_watch_lag_seconds"),
        "{metrics}"
    );
}

/// The metrics text, asked on the control socket.
fn control_metrics(socket: &std::path::Path) -> String {
    let reply = knockd_tests::control_raw(socket, b"{\"version\":1,\"command\":\"metrics\"}\n");
    reply["data"].as_str().unwrap().to_owned()
}

#[test]
fn a_sequence_used_on_one_node_is_a_replay_on_another() {
    let Some(mut fleet) = fleet(false) else {
        return;
    };
    let key = fleet.add_device(0, "laptop");
    // One sequence, sent to A, then the same datagrams to B.
    let keys = DoorKeys::derive(&key, "ssh");
    let params = fleet.target(0, &key).params;
    let sequence = proto::sequence(
        &keys,
        &params,
        Kind::Open,
        proto::unix_ms(),
        proto::fresh_nonce(),
        None,
    );
    let socket = fleet.socket();
    for (port, payload) in &sequence {
        socket
            .send_to(payload, (fleet.nodes[0].addr, *port))
            .unwrap();
    }
    fleet.nodes[0]
        .daemon_mut()
        .wait_for("decision", Duration::from_secs(5), |l| {
            l["outcome"] == "accepted"
        });
    for (port, payload) in &sequence {
        socket
            .send_to(payload, (fleet.nodes[1].addr, *port))
            .unwrap();
    }
    let line = fleet.nodes[1]
        .daemon_mut()
        .wait_for("decision", Duration::from_secs(5), |l| {
            l["outcome"] == "rejected" && l["reason"] == "replay"
        });
    assert_eq!(line["device"], "laptop", "{line}");
    assert!(
        fleet.nodes[1]
            .daemon()
            .messages("decision", |l| l["outcome"] == "accepted")
            .is_empty(),
        "B acted on a replayed sequence"
    );
    // Counted once, as a replay: never accepted first and taken back (a
    // counter that goes down reads as a restart to Prometheus).
    let metrics = control_metrics(&fleet.nodes[1].socket());
    let count = |outcome: &str, reason: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with(&format!(
                    "knockd_decisions_total{{door=\"ssh\",outcome=\"{outcome}\",reason=\"{reason}\"}}"
                ))
            })
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
    };
    assert_eq!(count("rejected", "replay"), Some(1), "{metrics}");
    assert_eq!(
        count("accepted", ""),
        None,
        "B counted the replay accepted at some point: {metrics}"
    );
}

#[test]
fn revoke_on_one_node_cuts_sessions_on_every_node() {
    let Some(mut fleet) = fleet(false) else {
        return;
    };
    let key = fleet.add_device(0, "laptop");
    let port = fleet.knock(0, &key, Kind::Open).unwrap().reply.port;
    let mut streams: Vec<_> = (0..2)
        .map(|i| {
            fleet
                .wait_open(i, port, Duration::from_secs(3))
                .expect("open")
                .1
        })
        .collect();
    for s in &mut streams {
        assert!(probe::echo_round_trip(s, b"before"));
    }
    let revoked = Instant::now();
    let out = knockctl(&fleet.nodes[2].socket(), &["revoke", "laptop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
    // The other nodes hear of it through their watch: each session ends
    // within a second (an echo stops coming back).
    for (i, s) in streams.iter_mut().enumerate() {
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        eventually(
            &format!("node {}'s session is cut", i + 1),
            Duration::from_secs(2),
            || !probe::echo_round_trip(s, b"after"),
        );
        eprintln!(
            "node {}: session cut {:?} after the revoke began",
            i + 1,
            revoked.elapsed()
        );
    }
    // And no node admits a new connection.
    for i in 0..3 {
        eventually("the port closes", Duration::from_secs(2), || {
            fleet.connect(i, port).0 != Outcome::Answered
        });
    }
}

#[test]
fn etcd_holds_no_device_key_in_the_clear() {
    let Some(mut fleet) = fleet(false) else {
        return;
    };
    let key = fleet.add_device(0, "laptop");
    let dump = fleet
        .etcd
        .ctl_ok(&["get", "--prefix", &fleet.prefix, "-w", "json"]);
    let record = fleet.etcd.ctl_ok(&[
        "get",
        "--print-value-only",
        &format!("{}devices/laptop", fleet.prefix),
    ]);
    assert!(record.contains("sealed_key"), "{record}");
    assert!(
        !record.contains(&key.to_hex()),
        "the key is in etcd in the clear: {record}"
    );
    // etcdctl's JSON has values in base64: check those too.
    let value: serde_json::Value = serde_json::from_str(&dump).unwrap();
    for kv in value["kvs"].as_array().unwrap() {
        let raw = kv["value"].as_str().unwrap();
        let decoded = base64_decode(raw);
        assert!(!decoded.contains(&key.to_hex()), "{decoded}");
    }
}

/// Standard base64, for etcdctl's JSON output.
fn base64_decode(text: &str) -> String {
    let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut n = 0;
    let mut out = Vec::new();
    for c in text.bytes().filter(|&c| c != b'=') {
        bits = (bits << 6) | table.iter().position(|&t| t == c).unwrap() as u32;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[test]
fn with_one_etcd_member_down_everything_still_works() {
    let Some(mut fleet) = fleet(false) else {
        return;
    };
    fleet.etcd.kill(0);
    // Nodes whose connection was to the dead member find another.
    let key = fleet.add_device_within(1, "laptop", Duration::from_secs(10));
    let started = Instant::now();
    let answer = fleet
        .knock(0, &key, Kind::Open)
        .unwrap_or_else(|e| panic!("knock A with one member down: {e}\n{}", fleet.etcd.logs()));
    eprintln!(
        "knock answered {:?} after the device add",
        started.elapsed()
    );
    for i in 0..3 {
        fleet
            .wait_open(i, answer.reply.port, Duration::from_secs(3))
            .unwrap_or_else(|| panic!("node {} never opened", i + 1));
    }
    // Every node reports again (one may still be on its way back from
    // the dead member).
    let mut last = serde_json::Value::Null;
    let all_up = (0..50).any(|_| {
        std::thread::sleep(Duration::from_millis(200));
        last = knockctl_json(&fleet.nodes[1].socket(), &["status", "--cluster"]);
        last["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["health"] == "up" && n["report"]["synced"] == true)
    });
    assert!(all_up, "not every node is up and synced: {last:#}");
}

#[test]
fn without_quorum_cluster_doors_fail_closed_and_grants_still_expire_on_time() {
    let Some(mut fleet) = fleet_with(3, false, ", open_for_secs: 5") else {
        return;
    };
    let key = fleet.add_device(0, "laptop");
    let answer = fleet.knock(0, &key, Kind::Open).unwrap();
    let granted = Instant::now();
    let port = answer.reply.port;
    for i in 0..3 {
        fleet
            .wait_open(i, port, Duration::from_secs(2))
            .expect("open everywhere");
    }
    fleet.etcd.kill(0);
    fleet.etcd.kill(1);
    // Every node notices (its heartbeat cannot be written without quorum).
    for node in &mut fleet.nodes {
        node.daemon_mut()
            .wait_for(LOST, Duration::from_secs(10), |_| true);
    }
    eprintln!(
        "all nodes fail closed {:?} after the grant",
        granted.elapsed()
    );
    // The grant in place still admits the client until its deadline...
    assert!(
        granted.elapsed() < Duration::from_secs(5),
        "too slow to check the grant before its deadline"
    );
    for i in 0..3 {
        assert_eq!(
            fleet.connect(i, port).0,
            Outcome::Answered,
            "node {} dropped a live grant",
            i + 1
        );
    }
    // ...and closes at it, on every node: the kernel's deadline, no etcd.
    let left = Duration::from_secs(5).saturating_sub(granted.elapsed());
    std::thread::sleep(left + Duration::from_millis(300));
    for i in 0..3 {
        assert_ne!(
            fleet.connect(i, port).0,
            Outcome::Answered,
            "node {}: the grant outlived its deadline",
            i + 1
        );
    }
    // A new knock is refused, logged and counted: fail closed.
    let refused = fleet.knock(1, &key, Kind::Open);
    assert!(refused.is_err(), "a knock was answered without quorum");
    let line = fleet.nodes[1]
        .daemon_mut()
        .wait_for("decision", Duration::from_secs(2), |l| {
            l["reason"] == "cluster_unavailable"
        });
    assert_eq!(line["device"], "laptop");
    let status = knockctl_json(&fleet.nodes[1].socket(), &["status"]);
    assert!(
        status["cluster"]["cluster_unavailable"].as_u64().unwrap() >= 1,
        "{status:#}"
    );
    assert_eq!(status["cluster"]["synced"], false);
    // Quorum back: the nodes resynchronise and serve again.
    fleet.etcd.restart(0);
    for i in 0..3 {
        fleet.wait_synced_count(i, 2);
    }
    let answer = fleet
        .knock(2, &key, Kind::Open)
        .expect("served again once quorum is back");
    fleet
        .wait_open(0, answer.reply.port, Duration::from_secs(3))
        .expect("and the grant reaches A");
}

#[test]
fn a_door_may_choose_to_act_locally_without_etcd() {
    let Some(mut fleet) = fleet_with(2, false, ", on_cluster_unavailable: local") else {
        return;
    };
    let key = fleet.add_device(0, "laptop");
    fleet.nodes[0].partition(&fleet.etcd, true);
    fleet.nodes[0]
        .daemon_mut()
        .wait_for(LOST, Duration::from_secs(10), |_| true);
    let answer = fleet.knock(0, &key, Kind::Open).expect("local fallback");
    fleet
        .wait_open(0, answer.reply.port, Duration::from_secs(2))
        .expect("open on A");
    assert_ne!(
        fleet.connect(1, answer.reply.port).0,
        Outcome::Answered,
        "B cannot know of A's local grant"
    );
    // Back in touch, A publishes what it granted alone.
    fleet.nodes[0].partition(&fleet.etcd, false);
    fleet.wait_synced_count(0, 2);
    fleet
        .wait_open(1, answer.reply.port, Duration::from_secs(3))
        .expect("B learns of it after the partition heals");
}

#[test]
fn a_restarted_node_catches_up_before_it_serves() {
    let Some(mut fleet) = fleet(false) else {
        return;
    };
    let mut c = fleet.nodes[2].daemon.take().unwrap();
    c.kill();
    // Meanwhile: a device added, a grant made.
    let key = fleet.add_device(0, "laptop");
    let answer = fleet.knock(0, &key, Kind::Open).unwrap();
    fleet.nodes[2].daemon = Some(c.restart(&fleet.nodes[2].ns));
    fleet.wait_synced(2);
    fleet
        .wait_open(2, answer.reply.port, Duration::from_secs(2))
        .expect("the restarted node installs the grant made while it was down");
    // It knows the device too: a knock on it opens the door everywhere.
    let again = fleet
        .knock(2, &key, Kind::Open)
        .expect("knock the restarted node");
    fleet
        .wait_open(1, again.reply.port, Duration::from_secs(2))
        .expect("B");
}

#[test]
fn a_node_cut_off_from_etcd_fails_closed_and_resynchronises() {
    let Some(mut fleet) = fleet(false) else {
        return;
    };
    let key = fleet.add_device(0, "laptop");
    let health_of_c = |fleet: &Fleet| {
        let status = knockctl_json(&fleet.nodes[0].socket(), &["status", "--cluster"]);
        status["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|n| n["name"] == "n3")
            .map_or("absent".to_owned(), |n| {
                n["health"].as_str().unwrap_or("?").to_owned()
            })
    };
    // C reports once a second from its first tick on.
    eventually("C shows as up", Duration::from_secs(5), || {
        health_of_c(&fleet) == "up"
    });
    fleet.nodes[2].partition(&fleet.etcd, true);
    // The others see C go stale (heartbeats missed), then down (its
    // heartbeat key expired).
    let mut seen: Vec<String> = Vec::new();
    eventually("C shows as down", Duration::from_secs(15), || {
        let health = health_of_c(&fleet);
        if seen.last() != Some(&health) {
            seen.push(health.clone());
        }
        health == "down"
    });
    assert!(
        seen.contains(&"stale".to_owned()),
        "C went {seen:?}, never stale"
    );
    fleet.nodes[2]
        .daemon_mut()
        .wait_for(LOST, Duration::from_secs(10), |_| true);
    // C refuses: it cannot tell whether the sequence was used elsewhere.
    assert!(fleet.knock(2, &key, Kind::Open).is_err());
    fleet.nodes[2]
        .daemon_mut()
        .wait_for("decision", Duration::from_secs(2), |l| {
            l["reason"] == "cluster_unavailable"
        });
    // The rest of the fleet goes on; C cannot hear of A's grant.
    let answer = fleet.knock(0, &key, Kind::Open).unwrap();
    let port = answer.reply.port;
    fleet.wait_open(1, port, Duration::from_secs(2)).expect("B");
    assert_ne!(fleet.connect(2, port).0, Outcome::Answered);

    // Healed: C lists etcd again, installs the grant, serves again.
    fleet.nodes[2].partition(&fleet.etcd, false);
    fleet.wait_synced_count(2, 2);
    fleet
        .wait_open(2, port, Duration::from_secs(3))
        .expect("C catches up");
    fleet.knock(2, &key, Kind::Open).expect("C serves again");
}

#[test]
fn etcd_with_tls_and_user_authentication() {
    let Some(mut fleet) = fleet(true) else { return };
    assert!(fleet.etcd.endpoints()[0].starts_with("https://"));
    let key = fleet.add_device(1, "laptop");
    let answer = fleet.knock(0, &key, Kind::Open).unwrap();
    fleet
        .wait_open(2, answer.reply.port, Duration::from_secs(3))
        .expect("C");
    // The knockd user may touch its prefix only.
    let out = fleet
        .etcd
        .ctl(&["--user=knockd:knockd-secret", "put", "/elsewhere", "x"]);
    assert!(
        !out.status.success(),
        "the knockd role reaches outside its prefix"
    );
}

/// Takes the knockd role's write access to the fleet's `grants/` away
/// (`false`) or gives it back (`true`): it may still read the prefix and
/// consume sequences. Should the change end a node's session, this waits
/// for the node to be back.
fn grant_writes(fleet: &mut Fleet, allowed: bool) {
    let before: Vec<(usize, usize)> = (0..fleet.nodes.len())
        .map(|i| (fleet.synced_count(i), fleet.lost_count(i)))
        .collect();
    let prefix = fleet.prefix.clone();
    let role = |args: &[&str]| {
        fleet.etcd.ctl_ok(&[&["role"], args].concat());
    };
    if allowed {
        let grants = format!("{prefix}grants/");
        role(&[
            "grant-permission",
            "knockd",
            "--prefix=true",
            "readwrite",
            &grants,
        ]);
    } else {
        // The ranges it keeps writing first, then the prefix's own
        // permission turned from readwrite to read in one step: at no
        // moment may it not write its heartbeat.
        for sub in ["consumed/", "nodes/", "members/", "devices/", "revokes/"] {
            let range = format!("{prefix}{sub}");
            role(&[
                "grant-permission",
                "knockd",
                "--prefix=true",
                "readwrite",
                &range,
            ]);
        }
        role(&[
            "grant-permission",
            "knockd",
            "--prefix=true",
            "read",
            &prefix,
        ]);
    }
    // A heartbeat a second: a node the change disturbed has said so by
    // then; wait for it to be back.
    std::thread::sleep(Duration::from_millis(1500));
    for (i, (synced, lost)) in before.into_iter().enumerate() {
        let lost_since = fleet.lost_count(i) - lost;
        fleet.wait_synced_count(i, synced + lost_since);
    }
}

/// Cuts node `i` off from etcd until it notices, then lets it resync.
fn resync(fleet: &mut Fleet, i: usize) {
    let synced = fleet.synced_count(i);
    let lost = fleet.lost_count(i);
    fleet.nodes[i].partition(&fleet.etcd, true);
    fleet.nodes[i]
        .daemon_mut()
        .wait_for_count(LOST, lost + 1, Duration::from_secs(10), |_| true);
    fleet.nodes[i].partition(&fleet.etcd, false);
    fleet.wait_synced_count(i, synced + 1);
}

/// Whether node `i`'s `status` lists a recent error containing `text`.
fn has_error(fleet: &Fleet, i: usize, text: &str) -> bool {
    knockctl_json(&fleet.nodes[i].socket(), &["status"])["recent_errors"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e.to_string().contains(text))
}

#[test]
fn a_grant_etcd_refused_is_published_when_the_node_resynchronises() {
    let Some(mut fleet) = fleet(true) else { return };
    let key = fleet.add_device(0, "laptop");
    // A accepts, installs, and fails to publish.
    grant_writes(&mut fleet, false);
    let answer = fleet
        .knock(0, &key, Kind::Open)
        .expect("A accepts: consuming is allowed");
    let port = answer.reply.port;
    fleet.wait_open(0, port, Duration::from_secs(2)).expect("A");
    eventually(
        "A records the refused publication",
        Duration::from_secs(5),
        || has_error(&fleet, 0, "could not publish the grant"),
    );
    assert_ne!(
        fleet.connect(1, port).0,
        Outcome::Answered,
        "B opened a grant etcd never had"
    );
    // etcd takes grants again; A's next resync publishes the one it holds.
    grant_writes(&mut fleet, true);
    resync(&mut fleet, 0);
    for i in 1..3 {
        fleet
            .wait_open(i, port, Duration::from_secs(3))
            .unwrap_or_else(|| panic!("node {} never heard of A's grant", i + 1));
    }
}

#[test]
fn a_close_etcd_refused_is_carried_out_when_the_node_resynchronises() {
    // Grants long enough that only a withdrawal can end them in the test.
    let Some(mut fleet) = fleet_with(3, true, ", open_for_secs: 300") else {
        return;
    };
    let key = fleet.add_device(0, "laptop");
    let port = fleet.knock(0, &key, Kind::Open).unwrap().reply.port;
    for i in 0..3 {
        fleet
            .wait_open(i, port, Duration::from_secs(3))
            .expect("open");
    }
    // The device closes on A; etcd refuses the delete, so B and C keep the
    // grant for now.
    grant_writes(&mut fleet, false);
    fleet.knock(0, &key, Kind::Close).expect("close on A");
    eventually(
        "A records the refused withdrawal",
        Duration::from_secs(5),
        || has_error(&fleet, 0, "could not withdraw the grant"),
    );
    assert_ne!(fleet.connect(0, port).0, Outcome::Answered, "A closed");
    assert_eq!(fleet.connect(1, port).0, Outcome::Answered);
    // Once A resynchronises, it withdraws the grant instead of taking it
    // back from etcd: every node closes.
    grant_writes(&mut fleet, true);
    resync(&mut fleet, 0);
    eventually("every node closes", Duration::from_secs(15), || {
        (0..3).all(|i| fleet.connect(i, port).0 != Outcome::Answered)
    });
}

#[test]
fn a_device_removed_on_one_node_is_refused_by_every_node() {
    let Some(mut fleet) = fleet(false) else {
        return;
    };
    let key = fleet.add_device(0, "laptop");
    fleet.knock(1, &key, Kind::Open).expect("admitted before");
    let removed = Instant::now();
    let out = fleet.knockctl_config(2, &["device", "remove", "laptop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for node in &mut fleet.nodes {
        node.daemon_mut()
            .wait_for("fleet: device removed", Duration::from_secs(1), |l| {
                l["device"] == "laptop"
            });
    }
    eprintln!(
        "every node forgot the device {:?} after the remove began",
        removed.elapsed()
    );
    let refused = knockd::client::knock_from(
        &fleet.socket(),
        &fleet.target(0, &key),
        Kind::Open,
        Duration::from_secs(2),
    );
    assert!(refused.is_err(), "a removed device was admitted");
    // And device list (through any node) no longer has it.
    let out = fleet.knockctl_config(1, &["device", "list"]);
    assert!(out.status.success());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("laptop"));
}

#[test]
fn a_lease_renewed_on_another_node_moves_there_and_rotates_everywhere() {
    let Some(mut fleet) = fleet_with(3, false, ", rotate_every_secs: 2, lease_idle_secs: 30")
    else {
        return;
    };
    let key = fleet.add_device(0, "laptop");
    let first = fleet.knock(0, &key, Kind::Open).unwrap().reply.port;
    // Once B has the grant (its watch brings it a few ms after A
    // answered), a heartbeat on B: B now owns the lease (same port), A and
    // C follow.
    fleet
        .wait_open(1, first, Duration::from_secs(2))
        .expect("B has the grant");
    let renewed = fleet.knock(1, &key, Kind::Heartbeat).unwrap().reply;
    assert_eq!(renewed.port, first, "a heartbeat keeps the port");
    // B rotates it within 2 s; the new port opens on A and C too, and the
    // old one closes to new connections everywhere.
    let mut rotated = first;
    eventually("B rotates the lease", Duration::from_secs(5), || {
        // A device completes at most 16 sequences a step: pace them.
        std::thread::sleep(Duration::from_millis(400));
        rotated = fleet.knock(1, &key, Kind::Heartbeat).unwrap().reply.port;
        rotated != first
    });
    for i in [0, 2] {
        fleet
            .wait_open(i, rotated, Duration::from_secs(2))
            .unwrap_or_else(|| panic!("node {} follows the rotation", i + 1));
        eventually("the old port closes", Duration::from_secs(2), || {
            fleet.connect(i, first).0 != Outcome::Answered
        });
    }
    // Only the owner rotates: A logged no rotation of its own.
    assert!(
        fleet.nodes[0]
            .daemon()
            .messages("lease rotated", |_| true)
            .is_empty()
    );
}

#[test]
fn check_config_names_a_cluster_key_that_is_unsafe_or_missing() {
    if !privileged() {
        return;
    }
    use std::os::unix::fs::PermissionsExt as _;
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("cluster.key");
    std::fs::write(&key, knockd::proto::DeviceKey::generate().to_hex()).unwrap();
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = dir.path().join("knockd.yaml");
    std::fs::write(
        &config,
        format!(
            "interfaces: [lo]\ncluster: {{ name: n1, endpoints: [\"http://198.18.0.21:2379\"], key_file: {} }}\n",
            key.display()
        ),
    )
    .unwrap();
    let check = || {
        std::process::Command::new(knockd_tests::knockctl_bin())
            .arg("check-config")
            .arg(&config)
            .output()
            .unwrap()
    };
    let out = check();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("cluster.key_file") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = check();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("and those in etcd"));
    std::fs::remove_file(&key).unwrap();
    let stderr = String::from_utf8_lossy(&check().stderr).into_owned();
    assert!(stderr.contains("cluster.key_file"), "{stderr}");
}

#[test]
fn etcd_write_access_alone_opens_nothing() {
    let Some(fleet) = fleet(false) else { return };
    // Someone with etcd credentials but not the cluster key writes a
    // grant for the client, and a device with a key of their own.
    let port = 40123;
    let forged = serde_json::json!({
        "version": 2, "port": port, "device": "laptop", "node": "n1",
        "expires_at_ms": knockd::proto::unix_ms() + 600_000, "leased": false, "mac": "00"
    });
    fleet.etcd.ctl_ok(&[
        "put",
        &format!("{}grants/ssh/{}/laptop", fleet.prefix, fleet.client_addr),
        &forged.to_string(),
    ]);
    let stranger = knockd::proto::DeviceKey::generate();
    let device = serde_json::json!({
        "version": 2, "id": "mallory", "groups": ["admins"], "doors": ["ssh"],
        "sealed_key": stranger.to_hex(), "added_by": "n1", "added_at_ms": 0
    });
    fleet.etcd.ctl_ok(&[
        "put",
        &format!("{}devices/mallory", fleet.prefix),
        &device.to_string(),
    ]);
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..3 {
        assert_ne!(
            fleet.connect(i, port).0,
            Outcome::Answered,
            "node {} installed a forged grant",
            i + 1
        );
    }
    assert!(
        fleet.knock(0, &stranger, Kind::Open).is_err(),
        "a forged device was admitted"
    );
    let errors = knockctl_json(&fleet.nodes[0].socket(), &["status"])["recent_errors"].to_string();
    assert!(
        errors.contains("not signed by a node of this fleet"),
        "{errors}"
    );
    assert!(errors.contains("device mallory"), "{errors}");
}

#[test]
fn a_knock_over_ipv6_opens_the_door_on_every_node_for_that_address() {
    use std::net::{IpAddr, SocketAddr, UdpSocket};
    let Some(mut fleet) = fleet(false) else {
        return;
    };
    let key = fleet.add_device(0, "laptop");
    let client: IpAddr = v6_of("198.18.0.2").into();
    let node = |i: usize| -> IpAddr { v6_of(&fleet.nodes[i].addr.to_string()).into() };
    let socket = fleet
        .client
        .run(move || UdpSocket::bind(SocketAddr::new(client, 0)).unwrap());
    let target = knockd_tests::bed::default_target(node(0), key.clone());
    let port = knockd::client::knock_from(&socket, &target, Kind::Open, Duration::from_secs(6))
        .expect("knock A over IPv6")
        .reply
        .port;
    // Every node admits the IPv6 client on that port, and only it.
    for i in 0..3 {
        let to = SocketAddr::new(node(i), port);
        let opened = (0..200).any(|_| {
            let (outcome, stream) = fleet
                .client
                .run(move || probe::tcp_connect(Some(client), to, Duration::from_millis(10)));
            outcome == Outcome::Answered && stream.is_some()
        });
        assert!(opened, "node {} never opened [{}]:{port}", i + 1, node(i));
        assert_ne!(
            fleet.connect(i, port).0,
            Outcome::Answered,
            "node {}: the IPv6 grant admitted the client's IPv4 address",
            i + 1
        );
    }
    let grants = knockctl_json(&fleet.nodes[2].socket(), &["grants"]);
    assert_eq!(grants[0]["source"], client.to_string(), "{grants:#}");
}

/// A knock that must go unanswered (a short wait: a refused knock gets no
/// reply at all).
#[track_caller]
fn assert_refused(fleet: &Fleet, i: usize, key: &DeviceKey, what: &str) {
    let answer = knockd::client::knock_from(
        &fleet.socket(),
        &fleet.target(i, key),
        Kind::Open,
        Duration::from_millis(1500),
    );
    assert!(
        answer.is_err(),
        "node {}: {what}: the knock was answered",
        i + 1
    );
}

/// Waits until node `i` logs that it ignores a record in etcd whose
/// description contains `record` and whose reason contains `why`.
#[track_caller]
fn wait_ignored(fleet: &mut Fleet, i: usize, record: &str, why: &str) {
    fleet.nodes[i].daemon_mut().wait_for(
        "fleet: a record in etcd is ignored",
        Duration::from_secs(5),
        |l| {
            l["record"].as_str().is_some_and(|r| r.contains(record))
                && l["why"].as_str().is_some_and(|w| w.contains(why))
        },
    );
}

/// An echo session from the client through node `i`'s `port`.
fn session(fleet: &Fleet, i: usize, port: u16) -> std::net::TcpStream {
    let mut s = fleet
        .wait_open(i, port, Duration::from_secs(3))
        .unwrap_or_else(|| panic!("node {} never opened {port}", i + 1))
        .1;
    s.set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    assert!(probe::echo_round_trip(&mut s, b"hello"));
    s
}

/// docs/CLUSTER.md's table of what an etcd writer without the cluster key
/// can and cannot do, row by row: each "cannot" tried as that writer
/// (etcdctl as etcd's root) against two nodes.
#[test]
fn an_etcd_writer_without_the_cluster_key_cannot_widen_move_or_replay_records() {
    let Some(mut fleet) = fleet_with(2, false, "") else {
        return;
    };
    let p = fleet.prefix.clone();
    let get = |fleet: &Fleet, key: &str| -> Value {
        serde_json::from_str(
            fleet
                .etcd
                .ctl_ok(&["get", "--print-value-only", key])
                .trim(),
        )
        .unwrap_or_else(|e| panic!("{key}: {e}"))
    };
    let put = |fleet: &Fleet, key: &str, value: &Value| {
        fleet.etcd.ctl_ok(&["put", key, &value.to_string()]);
    };

    // Row: widen a device's groups or doors. `low` is a guest, which no
    // door allows (added through the control protocol, as a node writes
    // it: signed).
    let low = DeviceKey::generate();
    let added = control_raw(
        &fleet.nodes[0].socket(),
        json!({"version": 1, "command": "device_add", "id": "low", "groups": ["guests"], "key": low.to_hex()})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(added["ok"], true, "{added}");
    for node in &mut fleet.nodes {
        node.daemon_mut()
            .wait_for("fleet: device added", Duration::from_secs(5), |l| {
                l["device"] == "low"
            });
    }
    assert_refused(&fleet, 0, &low, "a guest");
    let mut widened = get(&fleet, &format!("{p}devices/low"));
    widened["groups"] = json!(["admins"]);
    widened["doors"] = json!(["ssh"]);
    put(&fleet, &format!("{p}devices/low"), &widened);
    for i in 0..2 {
        wait_ignored(
            &mut fleet,
            i,
            "device low",
            "not signed by a node of this fleet",
        );
        fleet.nodes[i].daemon_mut().wait_for(
            "fleet: device removed",
            Duration::from_secs(2),
            |l| l["device"] == "low",
        );
        assert_refused(&fleet, i, &low, "a guest whose record was widened in etcd");
    }
    let list = fleet.knockctl_config(0, &["device", "list"]);
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed
            .lines()
            .any(|l| l.starts_with("low\t") && l.contains("REFUSED by every node")),
        "device list does not mark the edited record: {listed}"
    );

    // Row: copy a real record under another id.
    let laptop = fleet.add_device(0, "laptop");
    put(
        &fleet,
        &format!("{p}devices/copy"),
        &get(&fleet, &format!("{p}devices/laptop")),
    );
    for i in 0..2 {
        wait_ignored(&mut fleet, i, "device copy", "names device \"laptop\"");
    }

    // Row: move a grant to another address, or to another device at its
    // address.
    let port = fleet.knock(0, &laptop, Kind::Open).unwrap().reply.port;
    let grant_key = format!("{p}grants/ssh/{}/laptop", fleet.client_addr);
    std::thread::sleep(Duration::from_millis(300));
    let grant = get(&fleet, &grant_key);
    assert_eq!(grant["port"], port);
    put(
        &fleet,
        &format!("{p}grants/ssh/198.18.200.1/laptop"),
        &grant,
    );
    for i in 0..2 {
        wait_ignored(
            &mut fleet,
            i,
            "grant (door ssh, source 198.18.200.1, device laptop)",
            "not signed",
        );
    }
    put(
        &fleet,
        &format!("{p}grants/ssh/{}/intern", fleet.client_addr),
        &grant,
    );
    for i in 0..2 {
        wait_ignored(&mut fleet, i, "device intern)", "not signed");
    }

    // Row: put a revoked grant back.
    let out = knockctl(&fleet.nodes[1].socket(), &["revoke", "laptop"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for i in 0..2 {
        eventually("the revoked port closes", Duration::from_secs(2), || {
            fleet.connect(i, port).0 != Outcome::Answered
        });
    }
    let revokes = fleet
        .etcd
        .ctl_ok(&["get", "--prefix", "--keys-only", &format!("{p}revokes/")]);
    let revoke_key = revokes.lines().find(|l| !l.is_empty()).unwrap().to_owned();
    let revoke = get(&fleet, &revoke_key);
    put(&fleet, &grant_key, &grant);
    for i in 0..2 {
        wait_ignored(&mut fleet, i, "grant (door ssh", "opened before revoke");
        assert_ne!(
            fleet.connect(i, port).0,
            Outcome::Answered,
            "node {}: a revoked grant written back opened its port",
            i + 1
        );
    }

    // Row: replay a revoke. The device knocks again (a grant opened after
    // the revoke) and holds a session through each node; the old revoke
    // written again cuts nothing.
    let port = fleet.knock(0, &laptop, Kind::Open).unwrap().reply.port;
    let mut sessions: Vec<_> = (0..2).map(|i| session(&fleet, i, port)).collect();
    put(&fleet, &revoke_key, &revoke);
    for i in 0..2 {
        wait_ignored(&mut fleet, i, "revoke", "carried it out already");
    }
    std::thread::sleep(Duration::from_millis(500));
    for (i, s) in sessions.iter_mut().enumerate() {
        assert!(
            probe::echo_round_trip(s, b"still here"),
            "node {}: a replayed revoke cut a session opened after it",
            i + 1
        );
        assert_eq!(fleet.connect(i, port).0, Outcome::Answered);
    }

    // And the operator sees all of it in `status`, text included.
    let status = knockctl(&fleet.nodes[0].socket(), &["status"]);
    let text = String::from_utf8_lossy(&status.stdout);
    assert!(text.contains("cluster: node n1"), "{text}");
    assert!(text.contains("synced: yes, at etcd revision"), "{text}");
    assert!(text.contains("in etcd is ignored"), "{text}");
}

/// A revoke issued while etcd has no quorum takes effect on the issuing
/// node at once, says it reached only that node (exit 4), survives the
/// node's restart and its resynchronisation, and reaches every node once
/// quorum is back.
#[test]
fn a_revoke_without_quorum_holds_here_and_reaches_the_fleet_when_etcd_is_back() {
    let Some(mut fleet) = fleet(false) else {
        return;
    };
    let key = fleet.add_device(0, "laptop");
    let port = fleet.knock(0, &key, Kind::Open).unwrap().reply.port;
    let mut sessions: Vec<_> = (0..3).map(|i| session(&fleet, i, port)).collect();
    fleet.etcd.kill(1);
    fleet.etcd.kill(2);
    let out = knockctl(&fleet.nodes[0].socket(), &["revoke", "laptop"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(out.status.code(), Some(4), "{stdout}{stderr}");
    assert!(stdout.contains("revoked 1 grant(s)"), "{stdout}");
    assert!(stderr.contains("revoked here only"), "{stderr}");
    assert!(
        !probe::echo_round_trip(&mut sessions[0], b"after"),
        "A's session lives on"
    );
    assert_ne!(fleet.connect(0, port).0, Outcome::Answered);
    // Documented: the others admit the target until etcd is back.
    assert!(probe::echo_round_trip(&mut sessions[1], b"meanwhile"));
    // A's resynchronisations and a restart do not undo it.
    fleet.nodes[0]
        .daemon_mut()
        .wait_for(LOST, Duration::from_secs(10), |_| true);
    let mut a = fleet.nodes[0].daemon.take().unwrap();
    a.kill();
    fleet.nodes[0].daemon = Some(a.restart(&fleet.nodes[0].ns));
    let status = knockctl_json(&fleet.nodes[0].socket(), &["status"]);
    assert_eq!(status["cluster"]["revokes_pending"], 1, "{status:#}");
    let started = Instant::now();
    fleet.etcd.restart(1);
    fleet.wait_synced(0);
    for (i, s) in sessions.iter_mut().enumerate().skip(1) {
        eventually(
            &format!("node {}'s session is cut once quorum is back", i + 1),
            Duration::from_secs(15),
            || !probe::echo_round_trip(s, b"after"),
        );
    }
    for i in 0..3 {
        eventually(
            "the port is shut everywhere",
            Duration::from_secs(5),
            || fleet.connect(i, port).0 != Outcome::Answered,
        );
    }
    eprintln!(
        "every node carried out the revoke {:?} after quorum came back",
        started.elapsed()
    );
    eventually("A has published it", Duration::from_secs(5), || {
        knockctl_json(&fleet.nodes[0].socket(), &["status"])["cluster"]["revokes_pending"] == 0
    });
}

/// A revoke the moment an etcd member dies: whichever way it goes, the
/// exit status and message say where it took effect, and every node
/// ends in the documented state within seconds.
#[test]
fn a_revoke_as_an_etcd_member_dies_ends_the_grant_everywhere() {
    let Some(mut fleet) = fleet(false) else {
        return;
    };
    let key = fleet.add_device(0, "laptop");
    let port = fleet.knock(0, &key, Kind::Open).unwrap().reply.port;
    let mut sessions: Vec<_> = (0..3).map(|i| session(&fleet, i, port)).collect();
    // Every member serves some node; the one killed serves A or not.
    fleet.etcd.kill(0);
    let out = knockctl(&fleet.nodes[0].socket(), &["revoke", "laptop"]);
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    match out.status.code() {
        Some(0) => assert!(stdout.contains("fleet: published as"), "{stdout}"),
        Some(4) => assert!(stderr.contains("revoked here only"), "{stderr}"),
        other => panic!("revoke exited {other:?}: {stdout}{stderr}"),
    }
    eprintln!("revoke as a member died: exit {:?}", out.status.code());
    for (i, s) in sessions.iter_mut().enumerate() {
        eventually(
            &format!("node {}'s session is cut", i + 1),
            Duration::from_secs(15),
            || !probe::echo_round_trip(s, b"after"),
        );
    }
    for i in 0..3 {
        assert_ne!(
            fleet.connect(i, port).0,
            Outcome::Answered,
            "node {}",
            i + 1
        );
    }
}

/// A wrong etcd password is the operator's to fix: an error line, a
/// `status` entry and a metric within seconds of start, and the text
/// status says the node is not synced.
#[test]
fn a_wrong_etcd_password_is_reported_within_seconds() {
    if !privileged() {
        return;
    }
    let fleet = Fleet::new(1, true);
    let wrong = fleet.dir.path().join("wrong.password");
    std::fs::write(&wrong, "not-the-password\n").unwrap();
    std::fs::set_permissions(&wrong, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let right = fleet.dir.path().join("etcd.password");
    let config = fleet
        .config(0, "")
        .replace(&right.display().to_string(), &wrong.display().to_string());
    assert!(config.contains("wrong.password"), "{config}");
    let started = Instant::now();
    let mut daemon = knockd_tests::Daemon::start(&fleet.nodes[0].ns, &config);
    let line = daemon.wait_for(
        "fleet: etcd refuses this node; cluster doors refuse knocks until it is fixed",
        Duration::from_secs(5),
        |_| true,
    );
    eprintln!("reported {:?} after start: {line}", started.elapsed());
    assert_eq!(line["level"], "ERROR", "{line}");
    assert_eq!(line["kind"], "authentication", "{line}");
    let socket = daemon.control_socket();
    let status = knockctl_json(&socket, &["status"]);
    assert!(
        status["recent_errors"]
            .to_string()
            .contains("authentication"),
        "{status:#}"
    );
    let text = String::from_utf8_lossy(&knockctl(&socket, &["status"]).stdout).into_owned();
    assert!(text.contains("synced: NO"), "{text}");
    assert!(text.contains("last etcd error:"), "{text}");
    let metrics = control_metrics(&socket);
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("knockd_fleet_etcd_errors_total{kind=\"authentication\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert_ne!(failures.rsplit(' ').next(), Some("0"), "{failures}");
    // check-config --cluster says the same before anything runs, and
    // passes with the right password.
    let check = |config: &std::path::Path| {
        fleet.nodes[0]
            .ns
            .command(knockd_tests::knockd_bin())
            .args(["check-config", "--cluster"])
            .arg(config)
            .output()
            .unwrap()
    };
    let out = check(&daemon.config_path());
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(text.contains("authentication failed"), "{text}");
    let right_config = fleet.dir.path().join("right.yaml");
    std::fs::write(
        &right_config,
        std::fs::read_to_string(daemon.config_path())
            .unwrap()
            .replace(&wrong.display().to_string(), &right.display().to_string()),
    )
    .unwrap();
    let out = check(&right_config);
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches(": read and wrote ").count(), 3, "{text}");
}

/// Device records an older knockd wrote (version 1: groups and doors
/// signed by nothing) are refused after an upgrade, marked in `device
/// list`, and taken again once the operator vouches for them with `device
/// sign`; a record whose key this fleet did not seal cannot be vouched for.
#[test]
fn device_sign_vouches_for_a_record_an_older_knockd_wrote() {
    let Some(mut fleet) = fleet_with(1, false, "") else {
        return;
    };
    let p = fleet.prefix.clone();
    let key = fleet.add_device(0, "laptop");
    // The record as version 1 wrote it: no mac.
    let path = format!("{p}devices/laptop");
    let mut old: Value = serde_json::from_str(
        fleet
            .etcd
            .ctl_ok(&["get", "--print-value-only", &path])
            .trim(),
    )
    .unwrap();
    old["version"] = 1.into();
    old.as_object_mut().unwrap().remove("mac");
    fleet.etcd.ctl_ok(&["put", &path, &old.to_string()]);
    wait_ignored(&mut fleet, 0, "device laptop", "knockctl device sign");
    assert_refused(&fleet, 0, &key, "an unsigned record");
    let list = fleet.knockctl_config(0, &["device", "list"]);
    let listed = String::from_utf8_lossy(&list.stdout);
    assert!(
        listed.contains("REFUSED by every node: record version 1"),
        "{listed}"
    );

    let out = fleet.knockctl_config(0, &["device", "sign", "laptop"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(said.contains("groups [admins], doors [ssh]"), "{said}");
    fleet.nodes[0].daemon_mut().wait_for_count(
        "fleet: device added",
        2,
        Duration::from_secs(5),
        |l| l["device"] == "laptop",
    );
    fleet
        .knock(0, &key, Kind::Open)
        .expect("the vouched-for device opens again");

    // A stranger's record (a key no node sealed) cannot be vouched for.
    let stranger = json!({
        "version": 1, "id": "mallory", "groups": ["admins"], "doors": ["ssh"],
        "sealed_key": DeviceKey::generate().to_hex(), "added_by": "n1", "added_at_ms": 0
    });
    fleet
        .etcd
        .ctl_ok(&["put", &format!("{p}devices/mallory"), &stranger.to_string()]);
    let out = fleet.knockctl_config(0, &["device", "sign", "mallory"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    assert!(said.contains("cannot be vouched for"), "{said}");
}
