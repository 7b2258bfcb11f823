//! The kernel smoke suite: what must hold on every kernel knockd supports.
//!
//! `cargo xtask test` runs this file twice: on this machine's kernel, with
//! the rest of the privileged tests, and inside a virtual machine booted
//! with Debian 12's own kernel (`xtask/src/vm.rs`), because the XDP program
//! is judged by each kernel's own verifier and a program that verifies on
//! one kernel may not on another. Each test is one whole story, so the
//! suite stays short under emulation: the program verifies with a 4x
//! margin, the service is silent before a knock, a knock opens it (IPv4
//! and IPv6), status shows it, revoke cuts a held connection, SIGTERM
//! leaves the port dropped, a restart adopts the grant, and uninstall
//! reopens the port.

use std::{net::SocketAddr, time::Duration};

use knockd::{
    guard::{Guard, KernelLogLevel},
    proto::Kind,
};
use knockd_tests::{
    bed::{Bed, SILENCE, SSH},
    knockctl, knockctl_json,
    probe::{self, Outcome},
    require_privileges, sh,
};

/// The verifier gives up at 1,000,000 processed instructions; the program
/// must stay 4x under that on every kernel in the suite, so a change that
/// eats the margin fails here before it fails on a user's kernel.
const VERIFIER_BUDGET: u32 = 250_000;

#[test]
fn the_program_verifies_with_a_fourfold_margin() {
    require_privileges!();
    let (guard, _logger) = Guard::load(KernelLogLevel::Info).unwrap();
    let release = knockd::host::kernel_release();
    let processed = guard
        .verified_instructions()
        .expect("every supported kernel (5.16+) reports verified_insns");
    println!("verifier: {processed} instructions processed on Linux {release}");
    assert!(
        processed <= VERIFIER_BUDGET,
        "Linux {release}: the verifier processed {processed} instructions, over the \
         {VERIFIER_BUDGET} budget (a 4x margin under its limit of 1,000,000)"
    );
}

fn knock_status_and_revoke(v6: bool) {
    let bed = Bed::new(v6);
    let daemon = bed.start("");
    let socket = daemon.control_socket();
    // Silent before a knock: the service port and a port of the grant range.
    assert_eq!(bed.connect(SSH).0, Outcome::Silent);
    assert_eq!(bed.connect(40000).0, Outcome::Silent);

    let (answer, mut held) = bed.open_and_connect();
    let port = answer.reply.port;
    assert_eq!(bed.connect(SSH).0, Outcome::Silent, "22 itself stays shut");

    let status = knockctl_json(&socket, &["status"]);
    assert_eq!(status["interfaces"][0]["interface"], bed.testbed.server_if);
    let grants = status["grants"].as_array().unwrap();
    assert_eq!(grants.len(), 1, "{status:#}");
    assert_eq!(grants[0]["port"], port, "{status:#}");

    let out = knockctl(&socket, &["revoke", &bed.client.to_string()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        probe::is_cut(&mut held),
        "revoke left the held connection alive"
    );
    assert_eq!(bed.connect(port).0, Outcome::Silent, "the grant is gone");
}

#[test]
fn a_knock_opens_the_door_status_shows_it_and_revoke_cuts_it_v4() {
    require_privileges!();
    knock_status_and_revoke(false);
}

#[test]
fn a_knock_opens_the_door_status_shows_it_and_revoke_cuts_it_v6() {
    require_privileges!();
    knock_status_and_revoke(true);
}

#[test]
fn sigterm_keeps_the_port_dropped_a_restart_adopts_the_grant_and_uninstall_reopens() {
    require_privileges!();
    let bed = Bed::new(false);
    let mut daemon = bed.start("");
    let answer = bed.knock(&bed.socket(), Kind::Open);
    let port = answer.reply.port;
    assert!(daemon.stop().success());
    assert_eq!(
        bed.connect(SSH).0,
        Outcome::Silent,
        "fail closed after SIGTERM"
    );
    assert_eq!(
        bed.connect(port).0,
        Outcome::Answered,
        "the grant outlives us"
    );

    let mut restarted = daemon.restart(&bed.testbed.server);
    let attached = restarted.wait_for("XDP guard attached", Duration::from_secs(30), |_| true);
    assert_eq!(attached["mode"], "Adopted", "the pinned link is taken over");
    restarted.wait_for(
        "adopted the grants the nftables table held",
        Duration::from_secs(30),
        |v| v["grants"] == 1,
    );
    assert_eq!(bed.connect(port).0, Outcome::Answered);
    assert_eq!(bed.connect(SSH).0, Outcome::Silent);

    assert!(restarted.stop().success());
    let pins = restarted.bpffs_dir().to_owned();
    sh(bed
        .testbed
        .server
        .command(knockd_tests::knockd_bin())
        .args(["uninstall", "--bpffs-dir"])
        .arg(&pins));
    let link = bed
        .testbed
        .server
        .ip(&["link", "show", &bed.testbed.server_if]);
    assert!(!link.contains("xdp"), "{link}");
    let (outcome, stream) = bed.connect(SSH);
    assert_eq!(outcome, Outcome::Answered, "uninstall reopens the service");
    assert!(probe::echo_round_trip(&mut stream.unwrap(), b"open"));
}

/// Debug builds of knockd refuse to load the XDP program when told so: a
/// stand-in for a kernel whose verifier rejects it.
const REFUSE_XDP: (&str, &str) = ("KNOCKD_TEST_XDP", "refused");

#[test]
fn a_kernel_that_refuses_the_program_leaves_nftables_guarding_and_knocks_working() {
    require_privileges!();
    let bed = Bed::new(false);
    let mut daemon = knockd_tests::Daemon::start_with_env(
        &bed.testbed.server,
        &bed.config(""),
        &[(REFUSE_XDP.0, REFUSE_XDP.1.to_owned())],
    );
    let said = daemon.wait_for(
        "running WITHOUT the XDP guard",
        Duration::from_secs(5),
        |_| true,
    );
    assert_eq!(said["level"], "ERROR", "{said}");
    let link = bed
        .testbed
        .server
        .ip(&["link", "show", &bed.testbed.server_if]);
    assert!(!link.contains("xdp"), "no XDP program is attached: {link}");
    // Never fail open: nftables alone keeps the service, the grant range
    // and the knock ports silent (no RST, no ICMP port unreachable).
    assert_eq!(bed.connect(SSH).0, Outcome::Silent);
    assert_eq!(bed.connect(40000).0, Outcome::Silent);
    let (client, knock_port) = (bed.client, SocketAddr::new(bed.server, 7000));
    let udp = bed
        .testbed
        .client
        .run(move || probe::udp_probe(client, knock_port, SILENCE));
    assert_eq!(udp, Outcome::Silent, "a knock port answered");
    // Knocks still get through (a packet socket reads them) and open the door.
    let (answer, mut stream) = bed.open_and_connect();
    assert!(probe::echo_round_trip(&mut stream, b"without xdp"));
    assert_eq!(bed.connect(SSH).0, Outcome::Silent, "22 itself stays shut");
    let status = knockctl_json(&daemon.control_socket(), &["status"]);
    let interface = &status["interfaces"][0];
    assert_eq!(interface["mode"], "nftables-only", "{status:#}");
    assert!(
        interface["error"].as_str().unwrap().contains("refused"),
        "{status:#}"
    );
    assert_eq!(status["grants"][0]["port"], answer.reply.port);
}

#[test]
fn without_xdp_refuse_exits_69_saying_the_ports_are_not_protected() {
    require_privileges!();
    let bed = Bed::new(false);
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("knockd.yaml");
    std::fs::write(
        &config,
        format!(
            "{}without_xdp: refuse\nbpffs_dir: /sys/fs/bpf/{}\ncontrol_socket: {}\n",
            bed.config(""),
            knockd_tests::unique_name("p"),
            dir.path().join("control.sock").display()
        ),
    )
    .unwrap();
    let out = bed
        .testbed
        .server
        .command(knockd_tests::knockd_bin())
        .args(["run", "--config"])
        .arg(&config)
        .env(REFUSE_XDP.0, REFUSE_XDP.1)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(69), "{stderr}");
    assert!(stderr.contains("NOT protected"), "{stderr}");
    // The unit does not restart into the same refusal.
    let unit = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/knockd.service"),
    )
    .unwrap();
    assert!(
        unit.lines()
            .any(|l| l.starts_with("RestartPreventExitStatus=") && l.contains("69")),
        "{unit}"
    );
}
