//! Fleet mode end to end: a real 3-member etcd cluster and three knockd
//! nodes, each in its own namespace, with a client on the same segment.
//! Every promise of `docs/CLUSTER.md` is checked with real knocks, real TCP
//! connects and the real nftables table.

use std::time::{Duration, Instant};

use knockd::proto::{self, DoorKeys, Kind};
use knockd_tests::{fleet::Fleet, knockctl, knockctl_json, privileged, probe, probe::Outcome};

fn fleet(tls: bool) -> Option<Fleet> {
    if !privileged() {
        return None;
    }
    let mut fleet = Fleet::new(3, tls);
    fleet.start_all("");
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
    let Some(fleet) = fleet(false) else { return };
    // A device added on node B is admitted by node A within a second.
    let key = fleet.add_device(1, "laptop");
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
}

#[test]
fn a_sequence_used_on_one_node_is_a_replay_on_another() {
    let Some(mut fleet) = fleet(false) else {
        return;
    };
    let key = fleet.add_device(0, "laptop");
    std::thread::sleep(Duration::from_millis(500));
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
}

#[test]
fn revoke_on_one_node_cuts_sessions_on_every_node() {
    let Some(fleet) = fleet(false) else { return };
    let key = fleet.add_device(0, "laptop");
    std::thread::sleep(Duration::from_millis(500));
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
