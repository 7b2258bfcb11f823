//! Leaving classic knockd the way the README says, step by step, on
//! Debian's own /etc/knockd.conf (from the knockd package setup installs)
//! with a section that runs a command, and the DROP of the service port
//! the old setup relied on: import with `-o`, read the reports, set the
//! interface, check-config (which names the DROP), start knockd, only then
//! remove the DROP, and knock with the stock `knock` client. The service
//! door opens for the knocking source alone, and the section that ran a
//! command runs it as its action door's hook.

use std::{
    net::{IpAddr, SocketAddr},
    os::unix::fs::PermissionsExt as _,
    path::Path,
    time::Duration,
};

use knockd_tests::{
    Daemon, NetNs, Testbed, addrs, knockctl_bin, knockd_bin,
    probe::{self, Outcome},
    require_privileges, sh, wait_for_file,
};

const SILENCE: Duration = Duration::from_millis(1200);

fn connect(ns: &NetNs, from: IpAddr, to: SocketAddr) -> Outcome {
    ns.run(|| probe::tcp_connect(Some(from), to, SILENCE).0)
}

/// The old firewall's rule: `op` (-A, -D) a DROP of TCP to port 22.
fn old_drop(testbed: &Testbed, op: &str) {
    sh(testbed
        .server
        .command("iptables")
        .args([op, "INPUT", "-p", "tcp", "--dport", "22", "-j", "DROP"]));
}

/// Debian's `knock` client, from the client's namespace.
fn stock_knock(testbed: &Testbed, server: IpAddr, args: &[&str]) {
    sh(testbed
        .client
        .command("knock")
        .arg("-v")
        .arg(server.to_string())
        .args(args));
}

#[test]
fn the_readmes_way_from_classic_knockd_works_as_written() {
    require_privileges!();
    let stock = Path::new("/etc/knockd.conf");
    assert!(
        stock.exists(),
        "/etc/knockd.conf is missing: `cargo xtask setup` installs Debian's knockd"
    );
    let testbed = Testbed::new();
    let (server, client, other) = addrs::family(false);
    testbed.server.run(|| {
        for port in [22, 443] {
            probe::echo_server(SocketAddr::new(server, port));
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let woken = dir.path().join("woken");
    let conf = dir.path().join("knockd.conf");
    let mut text = std::fs::read_to_string(stock).unwrap();
    text.push_str(&format!(
        "\n[wake]\n    sequence    = 7100:udp,7200:udp\n    seq_timeout = 5\n    \
         command     = echo %IP% > {}\n",
        woken.display()
    ));
    std::fs::write(&conf, text).unwrap();
    // The old setup: the service port dropped for everyone, classic
    // knockd's rules opening it per source.
    old_drop(&testbed, "-A");

    // 1. Import to a file, and read every report.
    let yaml_path = dir.path().join("knockd.yaml");
    let out = std::process::Command::new(knockctl_bin())
        .arg("import")
        .arg(&conf)
        .arg("-o")
        .arg(&yaml_path)
        .output()
        .unwrap();
    let reports = String::from_utf8_lossy(&out.stderr);
    eprintln!("{reports}");
    assert!(out.status.success(), "{reports}");
    for expected in [
        "[openSSH]: imported as door openSSH",
        "[openHTTPS]: imported as door openHTTPS",
        "[closeSSH]: skipped",
        "[wake]: imported as door wake",
        "an action door",
        "eth0 written",
    ] {
        assert!(reports.contains(expected), "{expected:?} in\n{reports}");
    }
    let mode = std::fs::metadata(&yaml_path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "the configuration is written 0600");

    // 2. The interface it guessed, then check-config: it names the DROP.
    let yaml = std::fs::read_to_string(&yaml_path).unwrap().replace(
        "interfaces: [eth0]",
        &format!("interfaces: [{}]", testbed.server_if),
    );
    std::fs::write(&yaml_path, &yaml).unwrap();
    let said = sh(testbed
        .server
        .command(knockd_bin())
        .arg("check-config")
        .arg(&yaml_path));
    assert!(
        said.contains("chain INPUT")
            && said.contains("drops TCP to the service port 22 of door openSSH"),
        "{said}"
    );

    // 3. Start knockd: the service port is shut to everyone.
    let _daemon = Daemon::start(&testbed.server, &yaml);
    let ssh = SocketAddr::new(server, 22);
    assert_eq!(connect(&testbed.client, client, ssh), Outcome::Silent);

    // 4. Only now remove the old DROP: knockd's guard holds the port.
    old_drop(&testbed, "-D");
    assert_eq!(connect(&testbed.client, client, ssh), Outcome::Silent);

    // 5. Knock with the stock client and connect; strangers still meet
    // silence.
    stock_knock(&testbed, server, &["7000", "8000", "9000"]);
    assert_eq!(connect(&testbed.client, client, ssh), Outcome::Answered);
    assert_eq!(connect(&testbed.client, other, ssh), Outcome::Silent);
    let https = SocketAddr::new(server, 443);
    assert_eq!(connect(&testbed.client, client, https), Outcome::Silent);
    stock_knock(
        &testbed,
        server,
        &["12345:tcp", "54321:tcp", "24680:tcp", "13579:tcp"],
    );
    assert_eq!(connect(&testbed.client, client, https), Outcome::Answered);

    // The section that ran a command: its knock runs it, with the source.
    stock_knock(&testbed, server, &["-u", "7100", "7200"]);
    assert_eq!(wait_for_file(&woken, 5).trim(), client.to_string());
}
