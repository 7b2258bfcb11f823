//! End to end: a UDP door (a WireGuard-like service on UDP 51820) on the
//! real daemon. Before a knock its port is silent: no answer and no ICMP
//! port unreachable. Debian's stock `knock` client opens it for its source
//! alone; a flow the grant let in carries on past `open_for_secs` (conntrack
//! knows it), while a new flow after the deadline meets silence; a revoke
//! ends the flow at once. check-config names an iptables-nft DROP of the
//! UDP port, as it does a TCP one.

use std::{
    net::{IpAddr, SocketAddr, UdpSocket},
    time::Duration,
};

use knockd_tests::{
    Daemon, Testbed, addrs, knockctl, knockd_bin,
    probe::{self, Outcome},
    require_privileges, sh,
};

const VPN: u16 = 51820;
const WAIT: Duration = Duration::from_millis(1200);

/// A connected UDP socket of the client namespace, from `from`.
fn flow(testbed: &Testbed, from: IpAddr, to: SocketAddr) -> UdpSocket {
    let socket = testbed
        .client
        .run(move || UdpSocket::bind(SocketAddr::new(from, 0)).unwrap());
    socket.connect(to).unwrap();
    socket.set_read_timeout(Some(WAIT)).unwrap();
    socket
}

/// One datagram on `socket` and what came back.
fn exchange(socket: &UdpSocket) -> Outcome {
    socket.send(b"handshake").unwrap();
    let mut buf = [0; 64];
    match socket.recv(&mut buf) {
        Ok(_) => Outcome::Answered,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => Outcome::Refused,
        Err(_) => Outcome::Silent,
    }
}

/// The first exchange of a flow, retried as a VPN client retries its
/// handshake: the stock client returns once its knocks are sent, maybe
/// before the daemon has opened the door.
fn handshake(socket: &UdpSocket) -> Outcome {
    for _ in 0..2 {
        if exchange(socket) == Outcome::Answered {
            return Outcome::Answered;
        }
    }
    exchange(socket)
}

#[test]
fn a_udp_door_opens_for_the_knocker_keeps_its_flow_and_a_revoke_ends_it() {
    require_privileges!();
    let testbed = Testbed::new();
    let (server, client, other) = addrs::family(false);
    testbed
        .server
        .run(|| probe::udp_echo_server(SocketAddr::new(server, VPN)));
    let config = format!(
        "interfaces: [{}]\ndoors:\n  vpn: {{ service_port: {VPN}, service_protocol: udp, \
         mode: static, sequence: [\"6300:udp\", \"6301:udp\"], open_for_secs: 3 }}\n",
        testbed.server_if
    );

    // The old firewall's UDP drop of the port is named, as a TCP one is.
    let iptables = |op: &str| {
        sh(testbed.server.command("iptables").args([
            op,
            "INPUT",
            "-p",
            "udp",
            "--dport",
            &VPN.to_string(),
            "-j",
            "DROP",
        ]))
    };
    iptables("-A");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("knockd.yaml");
    std::fs::write(&file, &config).unwrap();
    // A warning, not a refusal: `sh` checks it exits 0.
    let said = sh(testbed
        .server
        .command(knockd_bin())
        .arg("check-config")
        .arg(&file));
    assert!(
        said.contains("drops UDP to the service port 51820 of door vpn"),
        "{said}"
    );
    iptables("-D");

    let daemon = Daemon::start(&testbed.server, &config);
    let to = SocketAddr::new(server, VPN);
    let probe = |from| testbed.client.run(move || probe::udp_probe(from, to, WAIT));
    assert_eq!(probe(client), Outcome::Silent, "no answer, no ICMP");

    let knock = || {
        sh(testbed
            .client
            .command("knock")
            .args([&server.to_string(), "6300:udp", "6301:udp"]))
    };
    knock();
    let tunnel = flow(&testbed, client, to);
    assert_eq!(handshake(&tunnel), Outcome::Answered);
    assert_eq!(probe(other), Outcome::Silent, "another source");

    // Past open_for_secs the flow carries on; a new one does not.
    for _ in 0..10 {
        std::thread::sleep(Duration::from_millis(500));
        assert_eq!(exchange(&tunnel), Outcome::Answered, "the flow lives on");
    }
    assert_eq!(
        probe(client),
        Outcome::Silent,
        "a new flow after the deadline"
    );

    // A revoke ends the flow at once.
    knock();
    let tunnel = flow(&testbed, client, to);
    assert_eq!(handshake(&tunnel), Outcome::Answered);
    let out = knockctl(&daemon.control_socket(), &["revoke", &client.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(exchange(&tunnel), Outcome::Silent, "the revoked flow");
    assert_eq!(probe(client), Outcome::Silent);
}
