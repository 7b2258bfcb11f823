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

/// One journal entry in the native protocol (systemd's "Native Journal
/// Protocol"): `KEY=VALUE\n`, or `KEY\n`, a little-endian u64 length, the
/// value and `\n` for values that may hold newlines.
fn journal_fields(mut data: &[u8]) -> std::collections::BTreeMap<String, String> {
    let mut fields = std::collections::BTreeMap::new();
    while !data.is_empty() {
        let Some(end) = data.iter().position(|&b| b == b'\n' || b == b'=') else {
            break;
        };
        let key = String::from_utf8_lossy(&data[..end]).into_owned();
        let value;
        if data[end] == b'=' {
            let rest = &data[end + 1..];
            let len = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            value = &rest[..len];
            data = rest.get(len + 1..).unwrap_or(&[]);
        } else {
            let rest = &data[end + 1..];
            let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
            value = &rest[8..8 + len];
            data = rest.get(8 + len + 1..).unwrap_or(&[]);
        }
        fields.insert(key, String::from_utf8_lossy(value).into_owned());
    }
    fields
}

/// Kills the process on drop, so a failing test leaves no daemon behind.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Under systemd, stderr is the journal's stream, read at one priority.
/// knockd then speaks the journal's native protocol: each event at its
/// priority, its fields as journal fields. Checked against a socket in
/// journald's place (`/run/systemd/journal/socket`, in a private mount
/// namespace), since systemd is not PID 1 here.
#[test]
fn logs_reach_the_journal_at_their_priority_with_fields() {
    require_privileges!();
    let bed = Bed::new(false);
    let journal_dir = tempfile::tempdir().unwrap();
    let journal = UnixDatagram::bind(journal_dir.path().join("socket")).unwrap();
    journal
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let state = tempfile::tempdir().unwrap();
    let pins = knockd_tests::Pins::new("j");
    let bpffs_dir = pins.dir().display().to_string();
    // A second door nobody may open yet: a warning at start.
    let config = format!(
        "{}bpffs_dir: {bpffs_dir}\ncontrol_socket: {}\n",
        bed.config(
            " }, ghost: { service_port: 2200, knock_ports: \"8000-8999\", \
             grant_ports: \"41000-41099\", allow: { groups: [nobody] }"
        ),
        state.path().join("control.sock").display()
    );
    let config_path = state.path().join("knockd.yaml");
    std::fs::write(&config_path, config).unwrap();
    let script = format!(
        "mount -t tmpfs tmpfs /run && mkdir -p /run/systemd/journal && \
         mount --bind {} /run/systemd/journal && exec {} --log-format journal run --config {}",
        journal_dir.path().display(),
        knockd_bin().display(),
        config_path.display()
    );
    let mut daemon = KillOnDrop(
        Command::new("nsenter")
            .arg(format!("--net={}", bed.testbed.server.path().display()))
            .args([
                "--",
                "unshare",
                "--mount",
                "--propagation",
                "private",
                "sh",
                "-c",
                &script,
            ])
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap(),
    );
    let mut entries = Vec::new();
    let read_until =
        |entries: &mut Vec<std::collections::BTreeMap<String, String>>,
         want: &dyn Fn(&std::collections::BTreeMap<String, String>) -> bool| {
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                let mut buf = vec![0u8; 65536];
                if let Ok(n) = journal.recv(&mut buf) {
                    let entry = journal_fields(&buf[..n]);
                    let done = want(&entry);
                    entries.push(entry);
                    if done {
                        return;
                    }
                }
            }
            panic!("no such journal entry; got:\n{entries:#?}");
        };
    let message = |e: &std::collections::BTreeMap<String, String>, m: &str| {
        e.get("MESSAGE").is_some_and(|v| v == m)
    };
    read_until(&mut entries, &|e| message(e, "ready"));
    // An authenticated reject: a knock with the wrong count.
    let mut target = bed.target(bed.key.clone());
    target.params.knocks = 2;
    let _ = knockd::client::knock_from(
        &bed.socket(),
        &target,
        knockd::proto::Kind::Open,
        Duration::from_secs(1),
    );
    read_until(&mut entries, &|e| {
        e.get("REASON").is_some_and(|r| r == "wrong_count")
    });
    let _ = Command::new("kill").arg(daemon.0.id().to_string()).status();
    let mut stderr = String::new();
    std::io::Read::read_to_string(daemon.0.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    drop(pins);
    let find = |pred: &dyn Fn(&std::collections::BTreeMap<String, String>) -> bool| {
        entries
            .iter()
            .find(|e| pred(e))
            .unwrap_or_else(|| panic!("not in:\n{entries:#?}"))
            .clone()
    };
    let warning = find(&|e| message(e, "doors.ghost: no device may open this door yet"));
    assert_eq!(warning["PRIORITY"], "4", "{warning:#?}");
    let ready = find(&|e| message(e, "ready"));
    assert_eq!(ready["PRIORITY"], "5", "{ready:#?}");
    assert!(ready.contains_key("INTERFACES"), "{ready:#?}");
    let reject = find(&|e| e.get("REASON").is_some_and(|r| r == "wrong_count"));
    assert_eq!(reject["PRIORITY"], "4", "{reject:#?}");
    assert_eq!(reject["DOOR"], "ssh");
    assert_eq!(reject["DEVICE"], "laptop");
    assert!(
        reject["SOURCE"].starts_with(&bed.client.to_string()),
        "{reject:#?}"
    );
    assert_eq!(reject["SYSLOG_IDENTIFIER"], "knockd");
    eprintln!("journal entry of a reject: {reject:?}");
    // Nothing went to stderr meanwhile: no line twice, no colour codes.
    assert!(
        !stderr.contains("ready") && !stderr.contains('\u{1b}'),
        "{stderr}"
    );
}
