//! Sessions in progress when knockd starts: the operator's own ssh session
//! survives knockd's start, a reload, a switch to a dark host
//! (`closed_ports: drop`) and a restart, whether or not conntrack tracked
//! the session before, and no stranger's probe is answered meanwhile.
//!
//! The "did not track" case is a fresh namespace: no rule needs conntrack
//! there until knockd's table loads, so the session's next segment would be
//! a mid-stream pickup (state NEW) that the guard drops. The daemon's log
//! line saying it adopted a connection proves the flow was untracked; in
//! the "tracked" case a table of the host's own made conntrack follow the
//! session from its handshake, and nothing needs adopting.

use std::net::{SocketAddr, TcpStream};

use knockd_tests::{
    Daemon,
    bed::{Bed, SSH},
    knockctl,
    probe::{self, Outcome},
    require_privileges, sh,
};

/// A service the dark host closes (in no rule, not public).
const OTHER: u16 = 8080;

fn session(bed: &Bed, port: u16) -> TcpStream {
    let (outcome, stream) = bed.connect(port);
    assert_eq!(outcome, Outcome::Answered, "port {port} before knockd");
    let mut stream = stream.unwrap();
    assert!(probe::echo_round_trip(&mut stream, b"hello"));
    stream
}

fn alive(what: &str, sessions: &mut [(&str, TcpStream)]) {
    for (name, stream) in sessions.iter_mut() {
        assert!(
            probe::echo_round_trip(stream, what.as_bytes()),
            "the session to {name} stalled after {what}"
        );
    }
}

/// Nothing answers a stranger: a new connection to the service port, and
/// (on a dark host) to the other service.
fn no_probe_answered(bed: &Bed, dark: bool) {
    assert_eq!(
        bed.connect(SSH).0,
        Outcome::Silent,
        "a new connection to 22"
    );
    if dark {
        assert_eq!(
            bed.connect(OTHER).0,
            Outcome::Silent,
            "a new connection to {OTHER}"
        );
    }
}

fn reload(daemon: &Daemon) {
    let out = knockctl(&daemon.control_socket(), &["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn adopted(daemon: &Daemon) -> u64 {
    daemon
        .messages(
            "adopted connections in progress that conntrack did not track, so the guard keeps them",
            |_| true,
        )
        .iter()
        .map(|line| line["connections"].as_u64().unwrap())
        .sum()
}

fn sessions_survive(tracked_before: bool) {
    let bed = Bed::new(false);
    let server = bed.server;
    bed.testbed
        .server
        .run(|| probe::echo_server(SocketAddr::new(server, OTHER)));
    if tracked_before {
        // The host's own firewall: any rule with a conntrack match makes
        // conntrack follow every flow of the namespace from its SYN.
        sh(bed.testbed.server.command("nft").args([
            "add table inet host; add chain inet host input { type filter hook input priority 10; }; \
             add rule inet host input ct state established counter",
        ]));
    }
    let mut sessions = [("22", session(&bed, SSH)), ("8080", session(&bed, OTHER))];

    let mut daemon = bed.start("");
    alive("start", &mut sessions);
    no_probe_answered(&bed, false);
    let adopted_at_start = adopted(&daemon);
    if tracked_before {
        assert_eq!(
            adopted_at_start, 0,
            "conntrack tracked both sessions already"
        );
    } else {
        assert_eq!(
            adopted_at_start, 2,
            "both sessions were untracked and adopted"
        );
    }

    reload(&daemon);
    alive("reload", &mut sessions);

    let config = daemon.config_path();
    let plain = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{plain}closed_ports: drop\n")).unwrap();
    reload(&daemon);
    alive("the switch to a dark host", &mut sessions);
    no_probe_answered(&bed, true);

    daemon.stop();
    let daemon = daemon.restart(&bed.testbed.server);
    alive("restart", &mut sessions);
    no_probe_answered(&bed, true);
    drop(daemon);
}

#[test]
fn sessions_conntrack_did_not_track_survive_start_reload_dark_and_restart() {
    require_privileges!();
    sessions_survive(false);
}

#[test]
fn sessions_conntrack_tracked_survive_start_reload_dark_and_restart() {
    require_privileges!();
    sessions_survive(true);
}
