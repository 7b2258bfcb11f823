//! `cargo xtask demo cluster`: a fleet on one machine, end to end. A real
//! 3-member etcd cluster and three knockd nodes, each in its own network
//! namespace, and a client; a device added on one node, a knock on
//! another, a connection through the third, a replay refused, a revoke
//! that cuts it, and `knockctl status --cluster`.

use std::{
    net::SocketAddr,
    process::Command,
    time::{Duration, Instant},
};

use knockd::proto::{self, DoorKeys, Kind};
use knockd_tests::{fleet::Fleet, knockctl, knockctl_bin, probe};

fn banner(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

fn main() {
    assert!(knockd_tests::privileged(), "the demo needs root");
    if std::env::var_os("KNOCKD_TEST_LOG_LEVEL").is_none() {
        // SAFETY: no other thread exists yet to read the environment.
        unsafe { std::env::set_var("KNOCKD_TEST_LOG_LEVEL", "info") };
    }
    banner("a 3-member etcd cluster and three knockd nodes, each in its own namespace");
    let mut fleet = Fleet::new(3, false);
    fleet.start_all("");
    println!("etcd: {}", fleet.etcd.endpoints().join(", "));
    for node in &fleet.nodes {
        println!(
            "node {}: {} (XDP on {}), sshd stand-in on :22",
            node.name, node.addr, node.interface
        );
    }
    println!("client: {}", fleet.client_addr);
    let config = fleet.nodes[0].daemon().config_path();
    println!(
        "node n1's configuration:\n{}",
        std::fs::read_to_string(&config).unwrap()
    );

    banner("knockctl device add laptop, on node n2: the key goes to etcd, sealed");
    let out = Command::new(knockctl_bin())
        .args([
            "device",
            "add",
            "laptop",
            "--group",
            "admins",
            "--door",
            "ssh",
            "--host",
            "198.18.0.11",
            "--config",
        ])
        .arg(fleet.nodes[1].daemon().config_path())
        .output()
        .unwrap();
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success());
    let profiles_path = fleet.dir.path().join("profiles.yaml");
    std::fs::write(&profiles_path, &out.stdout).unwrap();
    std::fs::set_permissions(
        &profiles_path,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let record = fleet.etcd.ctl_ok(&[
        "get",
        "--print-value-only",
        &format!("{}devices/laptop", fleet.prefix),
    ]);
    println!("etcd holds: {}", record.trim());
    std::thread::sleep(Duration::from_millis(300));

    banner("the client knocks on node n1 (knockctl knock, in the client namespace)");
    let started = Instant::now();
    let out = fleet
        .client
        .command(knockctl_bin())
        .args(["knock", "laptop", "--print-port", "--profiles"])
        .arg(&profiles_path)
        .output()
        .unwrap();
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "knock failed");
    let port: u16 = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    println!("n1 granted port {port} after {:?}", started.elapsed());

    banner(&format!(
        "the same port {port} is open on n2 and n3, for the client only"
    ));
    for i in [2, 1] {
        let (took, mut stream) = fleet
            .wait_open(i, port, Duration::from_secs(3))
            .expect("open");
        assert!(probe::echo_round_trip(&mut stream, b"hello"));
        println!(
            "connected to {}:{port} (node {}) {took:?} after asking; echo round trip ok",
            fleet.nodes[i].addr, fleet.nodes[i].name
        );
    }

    banner("a sequence used on n1 is a replay on n2");
    let key = knockd::profile::Profiles::load(&profiles_path)
        .unwrap()
        .profiles["laptop"]
        .device_key()
        .unwrap();
    let keys = DoorKeys::derive(&key, "ssh");
    let sequence = proto::sequence(
        &keys,
        &fleet.target(0, &key).params,
        Kind::Open,
        proto::unix_ms(),
        proto::fresh_nonce(),
        None,
    );
    let socket = fleet.socket();
    for node in [0, 1] {
        for (p, payload) in &sequence {
            socket
                .send_to(payload, SocketAddr::new(fleet.nodes[node].addr, *p))
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let line = fleet.nodes[1]
        .daemon_mut()
        .wait_for("decision", Duration::from_secs(3), |l| {
            l["reason"] == "replay"
        });
    println!(
        "n2: {} {} (device {}): {}",
        line["outcome"], line["reason"], line["device"], line["detail"]
    );

    banner("knockctl status --cluster (on n1)");
    std::thread::sleep(Duration::from_millis(1200));
    let out = knockctl(&fleet.nodes[0].socket(), &["status", "--cluster"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));

    banner("knockctl revoke laptop, on node n3: every node ends the grant and cuts the session");
    let (_, mut stream) = fleet
        .wait_open(0, port, Duration::from_secs(3))
        .expect("open on n1");
    let out = knockctl(&fleet.nodes[2].socket(), &["revoke", "laptop"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    stream
        .set_read_timeout(Some(Duration::from_secs(2)))
        .unwrap();
    let start = Instant::now();
    while probe::echo_round_trip(&mut stream, b"still there?")
        && start.elapsed() < Duration::from_secs(3)
    {
        std::thread::sleep(Duration::from_millis(5));
    }
    println!(
        "the client's session through n1 ended {:?} after the revoke on n3",
        start.elapsed()
    );
    // Reports are written every second from the second before.
    std::thread::sleep(Duration::from_millis(2200));
    let out = knockctl(&fleet.nodes[0].socket(), &["status", "--cluster"]);
    print!("{}", String::from_utf8_lossy(&out.stdout));
    banner("done: every process stopped, every namespace removed");
}
