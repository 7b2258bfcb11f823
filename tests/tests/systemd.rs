//! knockd's Debian package under a real systemd (252, booted as PID 1 of
//! its own namespaces: [`knockd_tests::machine`]), in a network namespace
//! joined by veth to a client namespace. One machine, one life cycle, in
//! the order an operator lives it: Debian's knockd gives way, the package
//! installs (not enabled), the daemon starts to READY with exactly the
//! capabilities the unit grants, logs to the journal at its priorities,
//! takes a good reload and fails a bad one, opens a door, survives a
//! restart with its grants, leaves the guard when stopped, is restarted by
//! the watchdog when frozen, upgrades keeping its grants, and purges clean.

use std::{
    net::SocketAddr,
    path::PathBuf,
    time::{Duration, Instant},
};

use knockd_tests::{
    Pins, Testbed, addrs, knockctl_bin,
    machine::Machine,
    probe::{self, Outcome},
    require_privileges, sh,
};

const SSH: u16 = 22;
const LEGACY: u16 = 2222;
/// Where the test's hook writes, inside the machine.
const HOOK_DIR: &str = "/run/knockd-hook-test";

/// The two packages `cargo xtask test` builds: the version, and the same
/// with a bumped version, for the upgrade.
fn debs() -> (PathBuf, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/deb");
    let find = |upgrade: bool| {
        std::fs::read_dir(&dir)
            .ok()
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .map(|e| e.path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.ends_with(".deb") && name.contains("+upgrade") == upgrade
            })
            .unwrap_or_else(|| {
                panic!(
                    "no package in {}: run `cargo xtask deb` and \
                     `cargo xtask deb --version 0.1.0+upgrade` (cargo xtask test does)",
                    dir.display()
                )
            })
    };
    (find(false), find(true))
}

/// The capabilities the unit's CapabilityBoundingSet= grants, as the bit
/// mask /proc/PID/status prints: CAP_CHOWN (0), CAP_NET_BIND_SERVICE (10),
/// CAP_NET_ADMIN (12), CAP_NET_RAW (13, the packet socket knocks are read
/// from where the kernel refuses XDP), CAP_SYS_RESOURCE (24), CAP_PERFMON
/// (38), CAP_BPF (39).
const UNIT_CAPS: u64 = 1 | 1 << 10 | 1 << 12 | 1 << 13 | 1 << 24 | 1 << 38 | 1 << 39;

/// Whether `knockctl grants --json` printed a grant of `port` (and of
/// `device`, when given).
fn holds(grants: &str, port: u16, device: Option<&str>) -> bool {
    let grants: serde_json::Value = serde_json::from_str(grants).expect("a JSON array");
    grants
        .as_array()
        .expect("an array")
        .iter()
        .any(|g| g["port"] == port && device.is_none_or(|d| g["device"] == d))
}

fn wait_until(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn the_package_lives_its_whole_life_under_a_real_systemd() {
    require_privileges!();
    let (deb, upgrade) = debs();
    let testbed = Testbed::new();
    let (server, client, _) = addrs::family(false);
    testbed.server.run(|| {
        for port in [SSH, LEGACY] {
            probe::echo_server(SocketAddr::new(server, port));
        }
    });
    let connect = |port: u16| {
        testbed.client.run(move || {
            probe::tcp_connect(
                Some(client),
                SocketAddr::new(server, port),
                Duration::from_millis(1200),
            )
            .0
        })
    };
    let machine = Machine::boot(&testbed.server);

    // Debian's knockd gives way (the package conflicts with it), then the
    // package installs, and is not enabled or started.
    machine.ok("dpkg --purge knockd >/dev/null 2>&1 || true");
    machine.copy_in(&deb, "/root/knockd-xdp.deb");
    machine.copy_in(&upgrade, "/root/knockd-xdp-upgrade.deb");
    let installed = machine.ok("dpkg -i /root/knockd-xdp.deb 2>&1");
    eprintln!("dpkg -i:\n{installed}");
    assert_eq!(
        machine.ok("systemctl is-enabled knockd || true").trim(),
        "disabled"
    );
    assert_eq!(
        machine.ok("systemctl is-active knockd || true").trim(),
        "inactive"
    );
    for path in [
        "/usr/share/man/man8/knockd.8.gz",
        "/usr/share/man/man1/knockctl.1.gz",
        "/usr/share/bash-completion/completions/knockctl",
        "/usr/share/zsh/vendor-completions/_knockctl",
        "/usr/share/fish/vendor_completions.d/knockctl.fish",
    ] {
        machine.ok(&format!("test -s {path}"));
    }

    // Configure: the veth, a bpffs directory of its own, a one-time door
    // and a static one (whose replayability knockd warns about), a device;
    // a short watchdog, so freezing the daemon shows within seconds.
    // The machine shares the host's bpffs; removed even when the test
    // fails before the purge does it.
    let pins = Pins::new("sd");
    let bpffs_dir = pins.dir().display().to_string();
    let config = format!(
        "interfaces: [{}]\nxdp_mode: native\nbpffs_dir: {bpffs_dir}\n\
         devices_dir: /etc/knockd/devices.d\n\
         doors:\n  ssh: {{ service_port: {SSH}, allow: {{ groups: [admins] }} }}\n  \
         legacy: {{ service_port: {LEGACY}, mode: static, sequence: [\"6000:udp\", \"6001:udp\"] }}\n  \
         wake: {{ mode: static, sequence: [\"6100:udp\"], hooks: {{ user: nobody, \
         on_open: [/bin/sh, -c, \"id -u > {HOOK_DIR}/woken\"] }} }}\n",
        testbed.server_if
    );
    machine.write("/etc/knockd/knockd.yaml", &config, 0o600);
    let profile = machine.ok(&format!(
        "knockctl device add laptop --group admins --host {server}"
    ));
    let client_dir = tempfile::tempdir().unwrap();
    let profiles = client_dir.path().join("profiles.yaml");
    std::fs::write(&profiles, &profile).unwrap();
    std::fs::set_permissions(
        &profiles,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    machine.write(
        "/etc/systemd/system/knockd.service.d/test.conf",
        "[Service]\nWatchdogSec=4s\nTimeoutAbortSec=2s\n",
        0o644,
    );
    machine.ok("systemctl daemon-reload");

    // Start: `systemctl start` of a Type=notify unit returns once READY.
    machine.ok("systemctl start knockd");
    assert_eq!(machine.ok("systemctl is-active knockd").trim(), "active");
    let main_pid = || {
        machine
            .ok("systemctl show -p MainPID --value knockd")
            .trim()
            .to_owned()
    };
    let caps = |pid: &str, field: &str| -> u64 {
        let status = machine.ok(&format!("cat /proc/{pid}/status"));
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{field}:\t")))
            .unwrap()
            .to_owned();
        u64::from_str_radix(&value, 16).unwrap()
    };
    // What the unit grants, of what the machine has to give (a container
    // may itself lack some, as this one lacks CAP_SYS_RESOURCE).
    let machine_caps = caps("1", "CapBnd");
    let expected = UNIT_CAPS & machine_caps;
    let pid = main_pid();
    for field in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(
            caps(&pid, field),
            expected,
            "{field}: {:#x}, the unit grants {expected:#x} of the machine's {machine_caps:#x}",
            caps(&pid, field)
        );
    }
    eprintln!(
        "capabilities: knockd {expected:#x} = unit {UNIT_CAPS:#x} & machine {machine_caps:#x}"
    );
    assert_eq!(connect(SSH), Outcome::Silent, "the guard is up");

    // A door opens for the device's profile.
    let knock = || {
        sh(testbed
            .client
            .command(knockctl_bin())
            .args(["knock", "--profiles"])
            .arg(&profiles)
            .arg("laptop"))
        .trim()
        .parse::<u16>()
        .unwrap()
    };
    let port = knock();
    assert_eq!(connect(port), Outcome::Answered);

    // The journal has the warnings at their priority.
    let warnings = machine.ok("journalctl -u knockd -p warning --no-pager -o short-iso");
    eprintln!("journalctl -u knockd -p warning:\n{warnings}");
    assert!(
        warnings.contains("door uses a static knock sequence"),
        "{warnings}"
    );
    let fields = machine.ok("journalctl -u knockd --no-pager -o verbose MESSAGE=decision");
    assert!(
        fields.contains("DEVICE=laptop") && fields.contains("DOOR=ssh"),
        "{fields}"
    );

    // Reloads: a good one succeeds; a bad one fails `systemctl reload`,
    // says why, and the running configuration stays.
    machine.ok("systemctl reload knockd");
    machine.write(
        "/etc/knockd/knockd.yaml",
        &config.replace("service_port: 22,", "service_port: 0,"),
        0o600,
    );
    let bad = machine.sh("systemctl reload knockd 2>&1");
    assert!(!bad.status.success(), "a refused reload must fail");
    let why = machine.ok("journalctl -u knockd -p err --no-pager -o cat");
    assert!(why.contains("doors.ssh.service_port"), "{why}");
    assert_eq!(machine.ok("systemctl is-active knockd").trim(), "active");
    machine.write("/etc/knockd/knockd.yaml", &config, 0o600);
    assert_eq!(connect(port), Outcome::Answered, "the grant survived");

    // A restart adopts the grants, device included.
    let before = main_pid();
    machine.ok("systemctl restart knockd");
    assert_ne!(main_pid(), before);
    let grants = machine.ok("knockctl grants --json");
    assert!(holds(&grants, port, Some("laptop")), "{grants}");
    assert_eq!(connect(port), Outcome::Answered);

    // Hooks: under the shipped unit they fail (no CAP_SETUID/SETGID, a
    // read-only file system), logged and counted; with the README's
    // drop-in they run as their user.
    machine.ok(&format!("mkdir -m 0777 {HOOK_DIR}"));
    let wake = || {
        sh(testbed
            .client
            .command("knock")
            .args([&server.to_string(), "-u", "6100"]))
    };
    let hooks = |field: &str| {
        let status = machine.ok("knockctl status --json");
        let status: serde_json::Value = serde_json::from_str(&status).unwrap();
        status["decisions"][field].as_u64().unwrap_or(0)
    };
    wake();
    wait_until("the hook to fail", Duration::from_secs(10), || {
        hooks("hooks_failed") == 1
    });
    machine.ok(&format!("test ! -e {HOOK_DIR}/woken"));
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).unwrap();
    let drop_in = readme
        .split("## Hooks")
        .nth(1)
        .and_then(|hooks| hooks.split("```ini\n").nth(1))
        .and_then(|ini| ini.split("```").next())
        .expect("the README's hooks drop-in")
        .replace("/the/paths/your/hooks/write", HOOK_DIR);
    machine.write(
        "/etc/systemd/system/knockd.service.d/hooks.conf",
        &drop_in,
        0o644,
    );
    machine.ok("systemctl daemon-reload");
    machine.ok("systemctl restart knockd");
    wake();
    wait_until("the hook to run", Duration::from_secs(10), || {
        machine
            .sh(&format!("test -s {HOOK_DIR}/woken"))
            .status
            .success()
    });
    assert_eq!(
        machine.ok(&format!("cat {HOOK_DIR}/woken")).trim(),
        "65534",
        "the hook runs as nobody"
    );
    assert_eq!(hooks("hooks_failed"), 0, "a fresh daemon, no failure");

    // Stopping leaves the guard: the table, the pins, the silence.
    machine.ok("systemctl stop knockd");
    machine.ok("nft list table inet knockd >/dev/null");
    machine.ok(&format!("ls {bpffs_dir} | grep -q link_"));
    assert_eq!(connect(SSH), Outcome::Silent);
    machine.ok("systemctl start knockd");

    // The watchdog: a frozen daemon is killed and started again.
    let frozen = main_pid();
    machine.ok(&format!("kill -STOP {frozen}"));
    wait_until(
        "the watchdog to restart knockd",
        Duration::from_secs(20),
        || {
            let pid = main_pid();
            pid != frozen
                && pid != "0"
                && machine.ok("systemctl is-active knockd || true").trim() == "active"
        },
    );
    let log = machine.ok("journalctl -u knockd --no-pager -o cat");
    assert!(log.contains("Watchdog timeout"), "{log}");

    // An upgrade restarts the running daemon, which keeps the grants.
    let port = knock();
    let before = main_pid();
    let upgraded = machine.ok("dpkg -i /root/knockd-xdp-upgrade.deb 2>&1");
    eprintln!("dpkg -i (upgrade):\n{upgraded}");
    assert!(machine.ok("dpkg-query -W knockd-xdp").contains("+upgrade"));
    assert_ne!(main_pid(), before, "the upgrade restarted the daemon");
    assert_eq!(machine.ok("systemctl is-active knockd").trim(), "active");
    let grants = machine.ok("knockctl grants --json");
    assert!(holds(&grants, port, None), "{grants}");
    assert_eq!(connect(port), Outcome::Answered);

    // Purge: the daemon, the guard, the keys and the unit are gone.
    machine.ok("systemctl enable knockd 2>/dev/null");
    let purged = machine.ok("dpkg --purge knockd-xdp 2>&1");
    eprintln!("dpkg --purge:\n{purged}");
    assert!(!machine.sh("nft list table inet knockd").status.success());
    assert!(
        !std::path::Path::new(&bpffs_dir).exists(),
        "the pins are gone"
    );
    machine.ok("test ! -e /etc/knockd && test ! -e /var/lib/knockd");
    machine.ok("test ! -e /lib/systemd/system/knockd.service");
    machine.ok("test ! -e /etc/systemd/system/multi-user.target.wants/knockd.service");
    assert_eq!(connect(SSH), Outcome::Answered, "the host is open again");
}

/// The package `cargo xtask test` builds from an older commit, whose pinned
/// maps differ from today's (13 counters, not 14): see xtask's
/// `OLD_LAYOUT_COMMIT`.
fn old_layout_deb() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/deb-old-layout");
    std::fs::read_dir(&dir)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .unwrap_or_else(|| {
            panic!(
                "no package in {}: `cargo xtask test` builds it",
                dir.display()
            )
        })
}

/// An upgrade from the last release whose map layout differs: the newer
/// daemon starts anyway, swapping its maps and program in with no moment
/// where a protected port answers, keeps the live grant (and the session
/// through it), and runs with its own layout after.
#[test]
fn an_upgrade_from_an_older_map_layout_keeps_the_host_closed_and_the_grants() {
    require_privileges!();
    let (deb, _) = debs();
    let old = old_layout_deb();
    let testbed = Testbed::new();
    let (server, client, _) = addrs::family(false);
    testbed
        .server
        .run(|| probe::echo_server(SocketAddr::new(server, SSH)));
    let connect = |port: u16| {
        testbed.client.run(move || {
            probe::tcp_connect(
                Some(client),
                SocketAddr::new(server, port),
                Duration::from_millis(1200),
            )
        })
    };
    let machine = Machine::boot(&testbed.server);
    machine.ok("dpkg --purge knockd >/dev/null 2>&1 || true");
    machine.copy_in(&old, "/root/knockd-xdp-old.deb");
    machine.copy_in(&deb, "/root/knockd-xdp.deb");
    machine.ok("dpkg -i /root/knockd-xdp-old.deb 2>&1");
    let pins = Pins::new("up");
    let config = format!(
        "interfaces: [{}]\nxdp_mode: native\nbpffs_dir: {}\n\
         devices_dir: /etc/knockd/devices.d\n\
         doors:\n  ssh: {{ service_port: {SSH}, allow: {{ groups: [admins] }} }}\n",
        testbed.server_if,
        pins.dir().display()
    );
    machine.write("/etc/knockd/knockd.yaml", &config, 0o600);
    let profile = machine.ok(&format!(
        "knockctl device add laptop --group admins --host {server}"
    ));
    let client_dir = tempfile::tempdir().unwrap();
    let profiles = client_dir.path().join("profiles.yaml");
    std::fs::write(&profiles, &profile).unwrap();
    std::fs::set_permissions(
        &profiles,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    machine.ok("systemctl start knockd");
    let counters = |machine: &Machine| -> serde_json::Value {
        serde_json::from_str(&machine.ok(&format!(
            "knockd stats --json --bpffs-dir {}",
            pins.dir().display()
        )))
        .unwrap()
    };
    assert!(
        counters(&machine).get("knock_unmatched").is_none(),
        "the old layout has no knock_unmatched slot: {}",
        counters(&machine)
    );

    // A live grant, and a session through it.
    let port: u16 = sh(testbed
        .client
        .command(knockctl_bin())
        .args(["knock", "--profiles"])
        .arg(&profiles)
        .arg("laptop"))
    .trim()
    .parse()
    .unwrap();
    let (outcome, stream) = connect(port);
    assert_eq!(outcome, Outcome::Answered);
    let mut session = stream.unwrap();
    assert!(probe::echo_round_trip(&mut session, b"before"));
    assert_eq!(connect(SSH).0, Outcome::Silent);

    // Probes of the service port all through the upgrade.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (tried, answered) = std::thread::scope(|scope| {
        let prober = scope.spawn(|| {
            let (mut tried, mut answered) = (0, 0);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let outcome = testbed.client.run(|| {
                    probe::tcp_connect(
                        Some(client),
                        SocketAddr::new(server, SSH),
                        Duration::from_millis(300),
                    )
                    .0
                });
                tried += 1;
                if outcome == Outcome::Answered {
                    answered += 1;
                }
            }
            (tried, answered)
        });
        // The prober stops even if the upgrade fails (a panic here would
        // otherwise wait on it forever).
        // The older example configuration differs from today's, and the
        // operator edited theirs: keep it, as an unattended upgrade does.
        let upgraded =
            machine.sh("dpkg --force-confdef --force-confold -i /root/knockd-xdp.deb 2>&1");
        std::thread::sleep(Duration::from_millis(600));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let probes = prober.join().unwrap();
        let output = String::from_utf8_lossy(&upgraded.stdout);
        eprintln!("dpkg -i (upgrade from the old layout):\n{output}");
        assert!(
            upgraded.status.success(),
            "the upgrade failed: {output}\n{}",
            machine.ok("journalctl -u knockd --no-pager -n 40 -o cat")
        );
        probes
    });
    eprintln!("probes during the upgrade: {tried}, answered: {answered}");
    assert!(tried >= 2, "the prober ran during the upgrade ({tried})");
    assert_eq!(answered, 0, "a protected port answered during the upgrade");

    assert_eq!(machine.ok("systemctl is-active knockd").trim(), "active");
    let log = machine.ok("journalctl -u knockd --no-pager -o cat");
    assert!(log.contains("replaced a stale pin"), "{log}");
    assert!(
        counters(&machine).get("knock_unmatched").is_some(),
        "the new layout is pinned: {}",
        counters(&machine)
    );
    let grants = machine.ok("knockctl grants --json");
    assert!(holds(&grants, port, None), "{grants}");
    assert!(probe::echo_round_trip(&mut session, b"after"));
    assert_eq!(connect(port).0, Outcome::Answered, "the grant still opens");
    assert_eq!(connect(SSH).0, Outcome::Silent, "the guard is up");
    machine.ok("dpkg --purge knockd-xdp >/dev/null 2>&1");
}
