//! The deployment: the systemd unit verifies, the install script lays out a
//! complete, idempotent installation, and the daemon speaks the service
//! manager's notify protocol (checked against a fake NOTIFY_SOCKET, since
//! systemd is not PID 1 on the machines this runs on).

use std::{
    os::unix::{fs::PermissionsExt as _, net::UnixDatagram},
    path::Path,
    process::Command,
    time::{Duration, Instant},
};

use knockd_tests::{Daemon, bed::Bed, knockd_bin, require_privileges, sh};

fn workspace() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap()
}

#[test]
fn the_unit_verifies_without_a_warning() {
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(workspace().join("deploy/knockd.service")).unwrap();
    // systemd-analyze checks that ExecStart's binary exists.
    let unit = unit
        .replace(
            "/usr/local/sbin/knockd",
            &knockd_bin().display().to_string(),
        )
        .replace(
            "/usr/local/bin/knockctl",
            &knockd_tests::knockctl_bin().display().to_string(),
        );
    let path = dir.path().join("knockd.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    // It exits 0 on unknown keys too; a clean unit prints nothing.
    assert!(
        text.trim().is_empty(),
        "systemd-analyze verify said:\n{text}"
    );
}

#[test]
fn install_stages_everything_and_keeps_an_existing_config() {
    let dest = tempfile::tempdir().unwrap();
    let bin_dir = knockd_bin().parent().unwrap().to_owned();
    let install = || {
        sh(Command::new(workspace().join("deploy/install.sh"))
            .env("DESTDIR", dest.path())
            .env("KNOCKD_BIN_DIR", &bin_dir));
    };
    install();
    let mode = |p: &str| {
        std::fs::metadata(dest.path().join(p))
            .unwrap()
            .permissions()
            .mode()
            & 0o7777
    };
    assert_eq!(mode("usr/local/sbin/knockd"), 0o755);
    assert_eq!(mode("usr/local/bin/knockctl"), 0o755);
    assert_eq!(mode("etc/systemd/system/knockd.service"), 0o644);
    assert_eq!(mode("etc/knockd"), 0o700);
    assert_eq!(mode("etc/knockd/devices.d"), 0o700);
    assert_eq!(mode("etc/knockd/knockd.yaml"), 0o600);
    assert!(
        dest.path()
            .join("usr/local/share/doc/knockd/PROTOCOL.md")
            .exists()
    );
    // The installed example parses.
    let config = dest.path().join("etc/knockd/knockd.yaml");
    knockd::config::Config::load(&config).unwrap();
    // Idempotent, and an edited config is never overwritten.
    std::fs::write(&config, "interfaces: [edited0]\n").unwrap();
    install();
    assert_eq!(
        std::fs::read_to_string(&config).unwrap(),
        "interfaces: [edited0]\n"
    );
}

/// Reads notify datagrams until one contains `want`, returning all seen.
fn expect(socket: &UnixDatagram, want: &str, seen: &mut Vec<String>) {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut buf = [0u8; 4096];
    while Instant::now() < deadline {
        if let Ok(n) = socket.recv(&mut buf) {
            let message = String::from_utf8_lossy(&buf[..n]).into_owned();
            seen.push(message.clone());
            if message.lines().any(|l| l == want || l.starts_with(want)) {
                return;
            }
        }
    }
    panic!("no {want:?} from the daemon; got {seen:?}");
}

#[test]
fn notify_ready_watchdog_reload_and_stop_reach_the_service_manager() {
    require_privileges!();
    let bed = Bed::new(false);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let env = [
        ("NOTIFY_SOCKET", path.display().to_string()),
        // One second: pings every half second.
        ("WATCHDOG_USEC", "1000000".to_owned()),
    ];
    let mut daemon = Daemon::start_with_env(&bed.testbed.server, &bed.config(""), &env);
    let mut seen = Vec::new();
    expect(&socket, "READY=1", &mut seen);
    // READY means the guard is already up.
    assert!(
        bed.testbed
            .server
            .ip(&["link", "show", &bed.testbed.server_if])
            .contains("xdp")
    );
    assert!(bed.table().is_some());
    assert!(
        seen.iter()
            .any(|m| m.contains("STATUS=guarding 1 interface(s), 1 door(s)")),
        "{seen:?}"
    );
    for _ in 0..3 {
        expect(&socket, "WATCHDOG=1", &mut seen);
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.pid() as i32, libc::SIGHUP) };
    expect(&socket, "RELOADING=1", &mut seen);
    assert!(seen.last().unwrap().contains("MONOTONIC_USEC="), "{seen:?}");
    expect(&socket, "READY=1", &mut seen);
    assert!(
        seen.last()
            .unwrap()
            .contains("STATUS=configuration reloaded"),
        "{seen:?}"
    );
    assert!(daemon.stop().success());
    expect(&socket, "STOPPING=1", &mut seen);
}
