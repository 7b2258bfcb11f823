//! End to end: the control socket and the knockctl commands that use it,
//! against the real daemon: status, grants, revoke (and the connections it
//! cuts), reload (knockctl and SIGHUP), and garbage on the socket.

use std::{
    io::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::Output,
    time::Duration,
};

use knockd::proto::Kind;
use knockd_tests::{
    Daemon, addrs,
    bed::{Bed, SILENCE, SSH},
    control_raw, knockctl,
    probe::{self, Outcome},
    require_privileges, sh,
};

/// `knockctl revoke ADDRESS`, which must end one grant and cut one
/// connection.
fn revoke_one(socket: &Path, address: std::net::IpAddr) {
    let out = knockctl(socket, &["revoke", &address.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "revoked 1 grant(s), cut 1 connection(s)"
    );
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn status_and_grants_show_the_daemon() {
    require_privileges!();
    let bed = Bed::new(false);
    let daemon = bed.start("");
    let socket = daemon.control_socket();
    let mode = std::fs::metadata(&socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "root only by default");
    let answer = bed.knock(&bed.socket(), Kind::Open);

    let status = json(&knockctl(&socket, &["status", "--json"]));
    assert_eq!(status["interfaces"][0]["interface"], bed.testbed.server_if);
    assert_eq!(status["interfaces"][0]["mode"], "native");
    assert_eq!(
        status["config"]["path"],
        daemon.config_path().display().to_string()
    );
    assert!(status["counters"]["knock_forwarded"].as_u64().unwrap() >= 3);
    assert_eq!(status["decisions"]["accepted"], 1);
    let grant = &status["grants"][0];
    assert_eq!(
        (grant["door"].as_str(), grant["device"].as_str()),
        (Some("ssh"), Some("laptop"))
    );
    assert_eq!(grant["port"], answer.reply.port);
    assert_eq!(grant["source"], bed.client.to_string());
    assert_eq!(status["recent_errors"].as_array().unwrap().len(), 0);
    // A second status has rates.
    let status = json(&knockctl(&socket, &["status", "--json"]));
    assert!(status["rates_per_sec"]["drop_protected"].is_number());

    let table = knockctl(&socket, &["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    for expected in [
        "interface",
        "XDP native",
        "knock_forwarded",
        "grants:",
        "laptop",
        "sequences in progress",
        "recent errors: none",
        " ago), doors: [\"ssh\"]",
    ] {
        assert!(table.contains(expected), "{expected:?} in:\n{table}");
    }
    let grants = json(&knockctl(&socket, &["grants", "--json"]));
    assert_eq!(grants.as_array().unwrap().len(), 1);
}

/// `grants_page` pages through the grants in address order, each page
/// starting after the last one's holder; `knockctl grants --json` prints
/// the same list, and `status` counts them all beside `max_grants`.
#[test]
fn grants_pages_follow_on_and_status_counts_every_grant() {
    require_privileges!();
    let bed = Bed::new(false);
    let daemon = bed.start("");
    let socket = daemon.control_socket();
    let mut sources = vec![bed.client];
    for i in 0..2u8 {
        let address = IpAddr::from([198, 18, 0, 130 + i]);
        bed.testbed.client.ip(&[
            "addr",
            "add",
            &format!("{address}/24"),
            "dev",
            &bed.testbed.client_if,
        ]);
        sources.push(address);
    }
    for &from in &sources {
        let udp = bed
            .testbed
            .client
            .run(move || UdpSocket::bind(SocketAddr::new(from, 0)).unwrap());
        assert_eq!(
            bed.knock(&udp, Kind::Open).reply.status,
            knockd::proto::Status::Granted
        );
    }
    sources.sort();
    let mut paged = Vec::new();
    let mut after = serde_json::Value::Null;
    for _ in 0..10 {
        let request = serde_json::json!({
            "version": 1, "command": "grants_page", "after": after, "limit": 1
        });
        let reply = control_raw(&socket, format!("{request}\n").as_bytes());
        assert_eq!(reply["ok"], true, "{reply}");
        let page = &reply["data"];
        assert_eq!(page["total"], 3);
        let grants = page["grants"].as_array().unwrap();
        assert!(grants.len() <= 1, "{page}");
        paged.extend(
            grants
                .iter()
                .map(|g| g["source"].as_str().unwrap().to_owned()),
        );
        after = page["next"].clone();
        if after.is_null() {
            break;
        }
    }
    let wanted: Vec<String> = sources.iter().map(ToString::to_string).collect();
    assert_eq!(paged, wanted, "every grant once, in address order");
    let listed = json(&knockctl(&socket, &["grants", "--json"]));
    let listed: Vec<String> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|g| g["source"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(listed, wanted);
    let status = json(&knockctl(&socket, &["status", "--json"]));
    assert_eq!(status["grants_total"], 3);
    assert_eq!(status["max_grants"], 200_000);
    assert_eq!(status["grants"].as_array().unwrap().len(), 3);
}

#[test]
fn revoke_ends_grants_by_device_and_by_address() {
    require_privileges!();
    let bed = Bed::new(false);
    let mut daemon = bed.start("");
    let socket = daemon.control_socket();
    let knocks = bed.socket();
    let answer = bed.knock(&knocks, Kind::Open);
    assert_eq!(bed.connect(answer.reply.port).0, Outcome::Answered);
    let out = knockctl(&socket, &["revoke", "laptop"]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "revoked 1 grant(s), cut 0 connection(s)"
    );
    assert_eq!(bed.connect(answer.reply.port).0, Outcome::Silent);
    // Nothing left: a revoke that ends nothing says so and fails.
    let out = knockctl(&socket, &["revoke", "laptop"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("laptop holds no grant"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A grant adopted after a restart still knows its device (the nft
    // element's comment), so revoking the device ends it.
    let adopted = bed.knock(&knocks, Kind::Open);
    daemon.stop();
    let _daemon = daemon.restart(&bed.testbed.server);
    let grants = json(&knockctl(&socket, &["grants", "--json"]));
    assert_eq!(grants[0]["device"], "laptop", "{grants:#}");
    let table = bed.table().unwrap();
    assert!(table.contains("comment \"laptop\""), "{table}");
    let out = knockctl(&socket, &["revoke", "laptop"]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "revoked 1 grant(s), cut 0 connection(s)"
    );
    assert_eq!(bed.connect(adopted.reply.port).0, Outcome::Silent);

    let again = bed.knock(&knocks, Kind::Open);
    let out = knockctl(&socket, &["revoke", &bed.client.to_string()]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "revoked 1 grant(s), cut 0 connection(s)"
    );
    assert_eq!(bed.connect(again.reply.port).0, Outcome::Silent);

    let out = knockctl(&socket, &["revoke", "nobody"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("no device \"nobody\""));
}

/// The server's conntrack entries from `source`, as conntrack-tools lists
/// them (an independent reader of the table revoke edits).
fn flows_from(bed: &Bed, source: IpAddr) -> String {
    let out = bed
        .testbed
        .server
        .command("conntrack")
        .args(["-L", "-p", "tcp", "--orig-src", &source.to_string()])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The service's established connections, as `ss` lists them.
fn service_sockets(bed: &Bed) -> String {
    let out = bed
        .testbed
        .server
        .command("ss")
        .args([
            "-Htn",
            "state",
            "established",
            "sport",
            "=",
            &format!(":{SSH}"),
        ])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Revoke cuts the established connections of the revoked address: the
/// client and the service see the connection end at once, conntrack no
/// longer holds the flow, and another address's connection through the same
/// door carries on.
fn revoke_cuts_established_connections(v6: bool) {
    let bed = Bed::new(v6);
    let daemon = bed.start("");
    let socket = daemon.control_socket();
    let (_, _, other) = addrs::family(v6);

    let (answer, mut revoked) = bed.open_and_connect();

    // The same device from a second address: a grant of its own.
    let other_knocks = bed
        .testbed
        .client
        .run(move || UdpSocket::bind(SocketAddr::new(other, 0)).unwrap());
    let kept_answer = bed.knock(&other_knocks, Kind::Open);
    let to = SocketAddr::new(bed.server, kept_answer.reply.port);
    let (outcome, stream) = bed
        .testbed
        .client
        .run(move || probe::tcp_connect(Some(other), to, SILENCE));
    assert_eq!(outcome, Outcome::Answered);
    let mut kept = stream.unwrap();
    assert!(probe::echo_round_trip(&mut kept, b"before"));

    let service = format!("sport={SSH} ");
    assert!(flows_from(&bed, bed.client).contains(&service));
    revoke_one(&socket, bed.client);
    let left = flows_from(&bed, bed.client);
    assert!(
        !left.contains(&service),
        "a redirected flow survived:\n{left}"
    );

    assert!(
        probe::is_cut(&mut revoked),
        "the revoked address's connection lives on"
    );
    let sockets = service_sockets(&bed);
    assert!(
        !sockets.contains(&bed.client.to_string()) && sockets.contains(&other.to_string()),
        "the service holds only the other address's connection:\n{sockets}"
    );
    assert!(
        probe::echo_round_trip(&mut kept, b"after"),
        "the other address's connection was cut too"
    );
    assert!(flows_from(&bed, other).contains(&service));
    // And nothing reopens: a new connection to the old port meets silence.
    assert_eq!(bed.connect(answer.reply.port).0, Outcome::Silent);
}

#[test]
fn revoke_cuts_established_connections_v4() {
    require_privileges!();
    revoke_cuts_established_connections(false);
}

#[test]
fn revoke_cuts_established_connections_v6() {
    require_privileges!();
    revoke_cuts_established_connections(true);
}

/// sshd listens on `[::]` for both families, so an IPv4 client's
/// connection is an IPv6 socket with an IPv4-mapped peer: revoke finds and
/// cuts it all the same.
#[test]
fn revoke_cuts_ipv4_clients_of_a_dual_stack_service() {
    require_privileges!();
    let bed = Bed::dual_stack();
    let daemon = bed.start("");
    let (_, mut stream) = bed.open_and_connect();
    revoke_one(&daemon.control_socket(), bed.client);
    assert!(probe::is_cut(&mut stream), "the connection lives on");
    assert!(!flows_from(&bed, bed.client).contains(&format!("sport={SSH} ")));
}

/// Revoking an address also cuts connections whose grant has already
/// expired: they outlive their grant (by design), not a revoke.
#[test]
fn revoke_by_address_cuts_connections_that_outlived_their_grant() {
    require_privileges!();
    let bed = Bed::new(false);
    let daemon = bed.start(", open_for_secs: 1");
    let socket = daemon.control_socket();
    let (_, mut stream) = bed.open_and_connect();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while json(&knockctl(&socket, &["grants", "--json"])) != serde_json::json!([]) {
        assert!(
            std::time::Instant::now() < deadline,
            "the grant did not expire"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        probe::echo_round_trip(&mut stream, b"after expiry"),
        "an established connection outlives its grant"
    );
    let out = knockctl(&socket, &["revoke", &bed.client.to_string()]);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "revoked 0 grant(s), cut 1 connection(s)",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(probe::is_cut(&mut stream));
}

/// A revoke whose conntrack entry outlived the connection's socket (the
/// flow closed a moment ago and conntrack still lists it, or an entry with
/// no socket at all) must not abort the service's *listening* socket,
/// which is what the kernel finds for that four-tuple once the connected
/// socket is gone. Seen in `bench peers`: after such a revoke, every new
/// connection to the service got a RST.
fn revoke_never_aborts_the_services_listener(v6: bool) {
    let bed = Bed::new(v6);
    let daemon = bed.start("");
    let socket = daemon.control_socket();
    let (answer, _stream) = bed.open_and_connect();
    // An entry as conntrack keeps it for a connection through the grant,
    // whose service-side socket no longer exists.
    let (client, server) = (bed.client.to_string(), bed.server.to_string());
    let port = answer.reply.port.to_string();
    sh(bed
        .testbed
        .server
        .command("conntrack")
        .args(["-I", "-p", "tcp", "-s", &client, "-d", &server])
        .args(["--sport", "45678", "--dport", &port])
        .args(["--reply-src", &server, "--reply-dst", &client])
        .args([
            "--reply-port-src",
            &SSH.to_string(),
            "--reply-port-dst",
            "45678",
        ])
        .args(["--state", "ESTABLISHED", "--timeout", "120"]));
    let out = knockctl(&socket, &["revoke", &client]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The service still listens: a new grant connects.
    let (_, mut again) = bed.open_and_connect();
    assert!(probe::echo_round_trip(&mut again, b"still listening"));
}

#[test]
fn revoke_never_aborts_the_services_listener_v4() {
    require_privileges!();
    revoke_never_aborts_the_services_listener(false);
}

#[test]
fn revoke_never_aborts_the_services_listener_v6() {
    require_privileges!();
    revoke_never_aborts_the_services_listener(true);
}

/// A reload that removes a door ends its grants: gone from status, from the
/// nftables table (the door's sets with it) and from the XDP allow map, so
/// the port is silent again. A connection made before carries on (reload
/// is not revoke).
#[test]
fn reload_that_removes_a_door_ends_its_grants() {
    require_privileges!();
    let bed = Bed::new(false);
    let daemon = bed.start("");
    let socket = daemon.control_socket();
    let config = daemon.config_path();
    let (answer, mut before) = bed.open_and_connect();
    assert!(bed.table().unwrap().contains("set ssh4"));

    // The same service behind a door of another name: "ssh" is gone.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, good.replace("doors: { ssh:", "doors: { admin:")).unwrap();
    let out = knockctl(&socket, &["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = json(&knockctl(&socket, &["status", "--json"]));
    assert_eq!(status["config"]["doors"], serde_json::json!(["admin"]));
    assert_eq!(status["grants"], serde_json::json!([]));
    let table = bed.table().unwrap();
    assert!(
        !table.contains("ssh4") && table.contains("set admin4"),
        "{table}"
    );
    // Silent, not refused: the XDP guard drops it (the allow entry went
    // with the grant), not merely a missing redirect.
    assert_eq!(bed.connect(answer.reply.port).0, Outcome::Silent);
    assert!(probe::echo_round_trip(&mut before, b"still here"));
}

#[test]
fn reload_takes_a_good_config_keeps_grants_and_refuses_a_bad_one() {
    require_privileges!();
    let bed = Bed::new(false);
    let mut daemon: Daemon = bed.start("");
    let socket = daemon.control_socket();
    let config = daemon.config_path();
    let knocks = bed.socket();
    let answer = bed.knock(&knocks, Kind::Open);

    // A bad config: refused, named, and the running one stays.
    let good = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        good.replace(
            &format!("service_port: {SSH}"),
            &format!("service_port: {SSH}, knocks: 99"),
        ),
    )
    .unwrap();
    let out = knockctl(&socket, &["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("doors.ssh.knocks: 99 is not in 1-16"),
        "{stderr}"
    );
    assert_eq!(
        bed.connect(answer.reply.port).0,
        Outcome::Answered,
        "still open"
    );
    let status = json(&knockctl(&socket, &["status", "--json"]));
    let error = status["recent_errors"][0]["error"].as_str().unwrap();
    assert!(
        error.contains("reload refused") && error.contains("doors.ssh.knocks"),
        "{error}"
    );

    // A good one with a new door: taken, and the grant survives.
    std::fs::write(
        &config,
        good.replace("doors: {", "doors: { web: { service_port: 8443, knock_ports: \"8000-8099\", allow: { groups: [admins] } }, "),
    )
    .unwrap();
    let out = knockctl(&socket, &["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let status = json(&knockctl(&socket, &["status", "--json"]));
    assert_eq!(status["config"]["doors"], serde_json::json!(["ssh", "web"]));
    assert_eq!(status["grants"][0]["port"], answer.reply.port);
    assert_eq!(
        status["grants"][0]["device"], "laptop",
        "what the daemon knew of the grant survives"
    );
    assert_eq!(bed.connect(answer.reply.port).0, Outcome::Answered);

    // SIGHUP does the same.
    std::fs::write(&config, &good).unwrap();
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    daemon.wait_for(
        "SIGHUP: reloading the configuration",
        Duration::from_secs(5),
        |_| true,
    );
    let status = json(&knockctl(&socket, &["status", "--json"]));
    assert_eq!(status["config"]["doors"], serde_json::json!(["ssh"]));
    assert_eq!(
        bed.knock(&knocks, Kind::Heartbeat).reply.port,
        answer.reply.port
    );
}

#[test]
fn garbage_on_the_socket_gets_an_error_and_the_daemon_carries_on() {
    require_privileges!();
    let bed = Bed::new(false);
    let mut daemon = bed.start("");
    let socket = daemon.control_socket();
    for request in [
        &b"not json\n"[..],
        b"{}\n",
        b"{\"version\":1,\"command\":\"rm -rf\"}\n",
        b"{\"version\":7,\"command\":\"status\"}\n",
        b"{\"version\":1,\"command\":\"status\",\"extra\":1}\n",
        b"{\"version\":1,\"command\":\"revoke\"}\n",
        b"\x00\xff\xfe\n",
    ] {
        let reply = control_raw(&socket, request);
        assert_eq!(reply["ok"], false, "{reply}");
        assert!(reply["error"].is_string());
    }
    let huge = vec![b'{'; 100_000];
    let reply = control_raw(&socket, &huge);
    assert_eq!(reply["ok"], false);
    // A pseudo-random stream of bytes, many connections.
    let mut noise = knockd_tests::Noise::new(0x9e37_79b9_7f4a_7c15);
    for _ in 0..200 {
        let mut bytes = noise.bytes(64);
        bytes.push(b'\n');
        let reply = control_raw(&socket, &bytes);
        assert_eq!(reply["ok"], false);
    }
    daemon.assert_running();
    let status = control_raw(&socket, b"{\"version\":1,\"command\":\"status\"}\n");
    assert_eq!(status["ok"], true);
    assert_eq!(
        bed.knock(&bed.socket(), Kind::Open).reply.status,
        knockd::proto::Status::Granted
    );
}

#[test]
fn metrics_are_off_by_default_and_served_on_loopback_when_on() {
    require_privileges!();
    let bed = Bed::new(false);
    let off = bed.start("");
    assert!(
        off.messages("metrics endpoint listening", |_| true)
            .is_empty()
    );
    drop(off);

    let config = format!(
        "{}metrics: {{ listen: \"127.0.0.1:19477\" }}\n",
        bed.config("")
    );
    let mut daemon = Daemon::start(&bed.testbed.server, &config);
    daemon.wait_for("metrics endpoint listening", Duration::from_secs(5), |_| {
        true
    });
    bed.knock(&bed.socket(), Kind::Open);
    let socket = daemon.control_socket();
    assert!(knockctl(&socket, &["reload"]).status.success());
    let get_with = |path: &str, accept: &str| -> String {
        let request = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\n{accept}\r\n");
        bed.testbed.server.run(move || {
            use std::io::Read as _;
            let mut stream = std::net::TcpStream::connect("127.0.0.1:19477").unwrap();
            stream.write_all(request.as_bytes()).unwrap();
            let mut reply = String::new();
            stream.read_to_string(&mut reply).unwrap();
            reply
        })
    };
    let get = |path: &str| get_with(path, "");
    // What Prometheus sends: OpenMetrics first, its own text as fallback.
    let reply = get_with(
        "/metrics",
        "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5\r\n",
    );
    assert!(reply.starts_with("HTTP/1.1 200 OK"), "{reply}");
    assert!(reply.contains("application/openmetrics-text"), "{reply}");
    eprintln!("{reply}");
    for expected in [
        "knockd_build_info{version=\"",
        "knockd_xdp_packets_total{verdict=\"knock_forwarded\"}",
        "knockd_decisions_total{door=\"ssh\",outcome=\"accepted\",reason=\"\"} 1",
        "knockd_reloads_total{result=\"ok\"} 1",
        "knockd_reloads_total{result=\"refused\"} 0",
        "knockd_config_loaded_timestamp_seconds ",
        "knockd_grants{door=\"ssh\"} 1",
        "knockd_leases{door=\"ssh\"} 0",
    ] {
        assert!(reply.contains(expected), "{expected:?} in:\n{reply}");
    }
    assert!(reply.ends_with("# EOF\n"), "{reply}");
    // A scraper that asks for nothing in particular gets the Prometheus
    // text format 0.0.4.
    let plain = get("/metrics");
    assert!(
        plain.contains("Content-Type: text/plain; version=0.0.4"),
        "{plain}"
    );
    assert!(
        plain.contains("# TYPE knockd_decisions_total counter") && !plain.contains("# EOF"),
        "{plain}"
    );
    assert!(get("/other").starts_with("HTTP/1.1 404"));
}

/// A client with a wrong key gets no answer, and its knocks never reach
/// the daemon (XDP drops them: their ports are not valid now); status
/// counts them and says what that usually means.
#[test]
fn status_hints_at_a_wrong_key() {
    require_privileges!();
    let bed = Bed::new(false);
    let daemon = bed.start("");
    let socket = daemon.control_socket();
    let quiet = json(&knockctl(&socket, &["status", "--json"]));
    assert_eq!(quiet["counters"]["knock_unmatched"], 0);
    assert!(quiet["hints"].as_array().unwrap().is_empty());
    let target = bed.target(knockd::proto::DeviceKey::generate());
    let sock = bed.socket();
    let answer = knockd::client::knock_from(&sock, &target, Kind::Open, Duration::from_secs(2));
    assert!(answer.is_err(), "a wrong key is never answered");
    let status = json(&knockctl(&socket, &["status", "--json"]));
    let unmatched = status["counters"]["knock_unmatched"].as_u64().unwrap();
    assert!(unmatched >= 3, "{status:#}");
    let hint = status["hints"][0].as_str().unwrap();
    assert!(hint.contains("wrong key"), "{hint}");
    let table = knockctl(&socket, &["status"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("hint: ") && table.contains("knock_unmatched"),
        "{table}"
    );
}

/// The lockout guard: a one-time door no device may open leaves its
/// service port open, says so loudly (log and status), and a reload that
/// admits a device closes it. Someone who starts knockd over ssh before
/// provisioning a device keeps the host.
#[test]
fn a_door_nobody_can_open_stays_open_until_a_device_can() {
    require_privileges!();
    let bed = Bed::new(false);
    let nobody = bed
        .config("")
        .replace("allow: { groups: [admins] }", "allow: { groups: [staff] }");
    assert_ne!(nobody, bed.config(""));
    let daemon = knockd_tests::Daemon::start(&bed.testbed.server, &nobody);
    let warning = daemon
        .log()
        .into_iter()
        .find(|v| {
            v["message"]
                .as_str()
                .is_some_and(|m| m.contains("stays OPEN to everyone (lockout guard)"))
        })
        .expect("the lockout guard's warning");
    assert_eq!(warning["level"], "WARN");
    let (outcome, _) = bed.connect(22);
    assert_eq!(outcome, Outcome::Answered, "the service port is open");
    let socket = daemon.control_socket();
    let status = json(&knockctl(&socket, &["status", "--json"]));
    assert!(
        status["hints"][0]
            .as_str()
            .unwrap()
            .contains("doors.ssh: no device may open this door"),
        "{status:#}"
    );
    // A device may open it now: the reload closes the port.
    let path = daemon.config_path();
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("allow: { groups: [staff] }", "allow: { groups: [admins] }");
    std::fs::write(&path, text).unwrap();
    let out = knockctl(&socket, &["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(bed.connect(22).0, Outcome::Silent);
    let status = json(&knockctl(&socket, &["status", "--json"]));
    assert!(status["hints"].as_array().unwrap().is_empty(), "{status:#}");
    bed.open_and_connect();
}

/// A reload whose file changes `interfaces` keeps both layers on the
/// running ones (the XDP guard cannot move without a restart, so the
/// nftables guard chain must not either), and says the change waits for a
/// restart.
#[test]
fn reload_that_changes_interfaces_keeps_both_layers_on_the_running_ones() {
    require_privileges!();
    let bed = Bed::new(false);
    let daemon = bed.start("");
    let socket = daemon.control_socket();
    let config = daemon.config_path();
    let text = std::fs::read_to_string(&config).unwrap();
    let line = text
        .lines()
        .find(|l| l.starts_with("interfaces: ["))
        .unwrap()
        .to_owned();
    let running = line
        .trim_start_matches("interfaces: [")
        .trim_end_matches(']')
        .to_owned();
    let table = bed.table().unwrap();
    assert!(table.contains(&format!("iifname \"{running}\"")), "{table}");
    std::fs::write(
        &config,
        text.replace(&line, &format!("interfaces: [{running}, lo]")),
    )
    .unwrap();
    let out = knockctl(&socket, &["reload"]);
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(said.contains("change only on restart"), "{said}");
    let table = bed.table().unwrap();
    assert!(
        table.contains(&format!("iifname \"{running}\"")) && !table.contains("iifname \"lo\""),
        "the nftables guard chain followed the file, not the running interfaces: {table}"
    );
    let status = json(&knockctl(&socket, &["status", "--json"]));
    let attached: Vec<&str> = status["interfaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["interface"].as_str().unwrap())
        .collect();
    assert_eq!(attached, [running.as_str()], "{status:#}");
    // The service still works through the running interface.
    let (answer, _) = bed.open_and_connect();
    assert_ne!(answer.reply.port, 0);
}
