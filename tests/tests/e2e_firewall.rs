//! Coming from another firewall: the service-port DROP every classic
//! knockd setup relies on, here iptables-nft's, keeps a door shut after a
//! knock (a grant accepts only in knockd's own table). check-config,
//! start-up and reload name the rule; removing it as the README says opens
//! the door.

use std::time::Duration;

use knockd::proto::Kind;
use knockd_tests::{
    bed::{Bed, SSH},
    knockctl, knockd_bin,
    probe::Outcome,
    require_privileges, sh,
};

const CONFLICT: &str = "another table keeps a door shut";

fn iptables(bed: &Bed, op: &str) {
    sh(bed.testbed.server.command("iptables").args([
        op,
        "INPUT",
        "-p",
        "tcp",
        "--dport",
        &SSH.to_string(),
        "-j",
        "DROP",
    ]));
}

#[test]
fn an_iptables_drop_of_the_service_port_is_named_and_removing_it_opens_the_door() {
    require_privileges!();
    let bed = Bed::new(false);
    iptables(&bed, "-A");

    // check-config, in the server's namespace, names the rule.
    let config = bed.dir.path().join("check.yaml");
    std::fs::write(&config, bed.config("")).unwrap();
    let report = sh(bed
        .testbed
        .server
        .command(knockd_bin())
        .args(["check-config", &config.display().to_string()]));
    let expected = format!(
        "warning: table ip filter, chain INPUT, rule handle 2 drops TCP to the service port {SSH} of door ssh"
    );
    assert!(report.contains(&expected), "{report}");

    // Start-up names it too, and it does keep the door shut: the knock is
    // granted, the connection through the grant goes unanswered.
    let mut daemon = bed.start("");
    let line = daemon.wait_for(CONFLICT, Duration::from_secs(5), |_| true);
    assert!(
        line["conflict"]
            .as_str()
            .unwrap()
            .starts_with("table ip filter, chain INPUT, rule handle 2 drops"),
        "{line}"
    );
    let answer = bed.knock(&bed.socket(), Kind::Open);
    assert_eq!(bed.connect(answer.reply.port).0, Outcome::Silent);

    // The README's step: delete the rule. A reload finds nothing more,
    // and the grant now reaches the service.
    iptables(&bed, "-D");
    let out = knockctl(&daemon.control_socket(), &["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        daemon.messages(CONFLICT, |_| true).len(),
        1,
        "no new warning after the reload"
    );
    let answer = bed.knock(&bed.socket(), Kind::Open);
    assert_eq!(bed.connect(answer.reply.port).0, Outcome::Answered);
    // And the service port itself stays shut to strangers: knockd's guard
    // does what the old DROP did.
    assert_eq!(bed.connect(SSH).0, Outcome::Silent);
}
