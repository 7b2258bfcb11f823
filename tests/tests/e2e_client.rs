//! End to end: `knockctl`, run as a user would, from the client namespace,
//! against the real daemon; provisioned with `knockctl device add` on the
//! server side; and OpenSSH going through it as a ProxyCommand.

use std::{
    io::Write as _,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use knockd_tests::{
    Daemon, Testbed, addrs, knockctl_bin, knockd_bin,
    probe::{self, Outcome},
    require_privileges, sh,
};

const SSH: u16 = 22;

/// The server's configuration: one door whose knock settings are none of
/// the defaults, with `door_extra` settings.
fn server_config_text(testbed: &Testbed, devices: &Path, door_extra: &str) -> String {
    format!(
        "interfaces: [{}]\nxdp_mode: native\ndevices_dir: {}\n\
         doors: {{ ssh: {{ service_port: {SSH}, allow: {{ groups: [admins] }}, \
         knock_ports: \"9000-9099\", knocks: 4, step_secs: 20{door_extra} }} }}\n",
        testbed.server_if,
        devices.display()
    )
}

/// A server with one door, whose knock settings are none of the defaults
/// (provisioned through `knockctl device add`), and the client's profiles
/// file (filled by `knockctl profile import`).
struct Setup {
    testbed: Testbed,
    dir: tempfile::TempDir,
    profiles: PathBuf,
    server: std::net::IpAddr,
}

impl Setup {
    fn new(v6: bool, echo: bool) -> Setup {
        let testbed = Testbed::new();
        let (server, _, _) = addrs::family(v6);
        if echo {
            testbed.server.run(|| {
                probe::echo_server(std::net::SocketAddr::new(server, SSH));
            });
        }
        let dir = tempfile::tempdir().unwrap();
        let devices = dir.path().join("devices.d");
        // A door whose knock settings are none of the defaults: the profile
        // `device add` prints must carry them, or no knock would land.
        let server_config = dir.path().join("server.yaml");
        std::fs::write(&server_config, server_config_text(&testbed, &devices, "")).unwrap();
        let added = Command::new(knockctl_bin())
            .args([
                "device", "add", "laptop", "--group", "admins", "--door", "ssh", "--host",
            ])
            .arg(server.to_string())
            .arg("--config")
            .arg(&server_config)
            .output()
            .unwrap();
        assert!(
            added.status.success(),
            "{}",
            String::from_utf8_lossy(&added.stderr)
        );
        let printed = String::from_utf8_lossy(&added.stdout);
        for line in [
            "version: 1",
            "knock_ports: 9000-9099",
            "knocks: 4",
            "step_secs: 20",
        ] {
            assert!(printed.contains(line), "{line:?} in:\n{printed}");
        }
        let key = devices.join("laptop.key");
        assert_eq!(
            std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        // The client takes it in with `profile import`, from standard input.
        let profiles = dir.path().join("client/profiles.yaml");
        let mut import = Command::new(knockctl_bin())
            .args(["profile", "import", "-", "--profiles"])
            .arg(&profiles)
            .stdin(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        import
            .stdin
            .take()
            .unwrap()
            .write_all(&added.stdout)
            .unwrap();
        let imported = import.wait_with_output().unwrap();
        assert!(
            imported.status.success(),
            "{}",
            String::from_utf8_lossy(&imported.stderr)
        );
        assert_eq!(
            std::fs::metadata(&profiles).unwrap().permissions().mode() & 0o777,
            0o600
        );
        Setup {
            testbed,
            dir,
            profiles,
            server,
        }
    }

    fn start(&self) -> Daemon {
        self.start_with("")
    }

    /// The daemon, with `door_extra` settings on its door.
    fn start_with(&self, door_extra: &str) -> Daemon {
        let devices = self.dir.path().join("devices.d");
        let config = server_config_text(&self.testbed, &devices, door_extra);
        Daemon::start(&self.testbed.server, &config)
    }

    /// `knockctl knock ARGS…` from the client namespace, bound to nothing in
    /// particular (it is the client's only address family route).
    fn knockctl(&self, args: &[&str]) -> Output {
        self.testbed
            .client
            .command(knockctl_bin())
            .arg("knock")
            .arg("--profiles")
            .arg(&self.profiles)
            .args(args)
            .output()
            .unwrap()
    }

    /// Connects from whichever source address the kernel picks, as
    /// knockctl's own socket does (the client has two per family).
    fn connect(&self, port: u16) -> Outcome {
        let to = std::net::SocketAddr::new(self.server, port);
        self.testbed
            .client
            .run(move || probe::tcp_connect(None, to, Duration::from_millis(1200)).0)
    }
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

fn print_port_exec_and_close(v6: bool) {
    let setup = Setup::new(v6, true);
    let _daemon = setup.start();
    let server = setup.server.to_string();

    let out = setup.knockctl(&["laptop", "--print-port"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port: u16 = stdout(&out).parse().unwrap();
    assert!((40000..=40999).contains(&port));
    assert_eq!(setup.connect(port), Outcome::Answered);

    // By host and door instead of profile name; --exec gets the port.
    let out = setup.knockctl(&[&server, "ssh", "--exec", "echo opened {host} {port}"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout(&out),
        format!("opened {server} {port}"),
        "the same grant, renewed"
    );

    let out = setup.knockctl(&["laptop", "--close"]);
    assert!(out.status.success());
    assert!(stdout(&out).starts_with("closed"));
    assert_eq!(setup.connect(port), Outcome::Silent);
}

#[test]
fn print_port_exec_and_close_v4() {
    require_privileges!();
    print_port_exec_and_close(false);
}

#[test]
fn print_port_exec_and_close_v6() {
    require_privileges!();
    print_port_exec_and_close(true);
}

/// Runs `cmd`, killing it after `limit`: a hung emulator fails the test
/// instead of stalling the suite.
fn output_within(mut cmd: Command, limit: Duration) -> Output {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if start.elapsed() > limit {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "{cmd:?} still running after {limit:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child.wait_with_output().unwrap()
}

/// knockctl built for another system, run there (emulated) from the
/// client namespace: `runner` starts it with `args`. It knocks the door
/// open, the port it prints answers, and its close shuts it.
fn foreign_knockctl_opens_and_closes(
    runner: &[&str],
    env: &[(&str, &Path)],
    profiles: impl Fn(&Path) -> String,
    setup: &Setup,
) {
    let _daemon = setup.start();
    let run = |args: &[&str]| {
        let mut cmd = setup.testbed.client.command(runner[0]);
        cmd.args(&runner[1..])
            .args(["knock", "--profiles", &profiles(&setup.profiles)])
            .args(args);
        for (name, value) in env {
            cmd.env(name, value);
        }
        output_within(cmd, Duration::from_secs(120))
    };
    let out = run(&["laptop", "--print-port"]);
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let port: u16 = stdout(&out).parse().unwrap();
    assert!((40000..=40999).contains(&port));
    assert_eq!(setup.connect(port), Outcome::Answered);
    let out = run(&["laptop", "--close"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout(&out).starts_with("closed"), "{}", stdout(&out));
    assert_eq!(setup.connect(port), Outcome::Silent);
}

/// A Wine prefix of its own, its wineserver ended when the test ends
/// (panic included): that server creates Wine's sockets, so it must start
/// inside the client namespace, from this test.
struct WinePrefix(tempfile::TempDir);

impl Drop for WinePrefix {
    fn drop(&mut self) {
        let _ = Command::new("/usr/lib/wine/wineserver")
            .arg("-k")
            .env("WINEPREFIX", self.0.path())
            .status();
    }
}

/// knockctl.exe for Windows (x86_64-pc-windows-gnu, mingw-w64) under
/// Debian's Wine: the laptop an operator knocks from. Its profiles path is
/// given as Windows sees it (Wine's Z: is the host's root).
#[test]
fn knockctl_for_windows_opens_a_grant_under_wine() {
    require_privileges!();
    let Some(exe) = knockd_tests::foreign_knockctl("x86_64-pc-windows-gnu") else {
        return;
    };
    let setup = Setup::new(false, true);
    let prefix = WinePrefix(tempfile::tempdir().unwrap());
    let exe = exe.to_str().unwrap().to_owned();
    let wine_debug = Path::new("-all");
    foreign_knockctl_opens_and_closes(
        &["/usr/lib/wine/wine64", &exe],
        &[("WINEPREFIX", prefix.0.path()), ("WINEDEBUG", wine_debug)],
        |p| format!("Z:{}", p.display()).replace('/', "\\"),
        &setup,
    );
}

/// knockctl for Linux on `target`, under `qemu` with Debian's libraries
/// for it in `sysroot`.
fn knockctl_under_qemu_user(target: &str, qemu: &str, sysroot: &str) {
    let Some(bin) = knockd_tests::foreign_knockctl(target) else {
        return;
    };
    let setup = Setup::new(false, true);
    foreign_knockctl_opens_and_closes(
        &[qemu, "-L", sysroot, bin.to_str().unwrap()],
        &[],
        |p| p.display().to_string(),
        &setup,
    );
}

/// knockctl for 64-bit ARM Linux (a Raspberry Pi gateway).
#[test]
fn knockctl_for_aarch64_linux_opens_a_grant_under_qemu_user() {
    require_privileges!();
    knockctl_under_qemu_user(
        "aarch64-unknown-linux-gnu",
        "qemu-aarch64",
        "/usr/aarch64-linux-gnu",
    );
}

/// knockctl for 32-bit ARM Linux (armv7, hard float).
#[test]
fn knockctl_for_armv7_linux_opens_a_grant_under_qemu_user() {
    require_privileges!();
    knockctl_under_qemu_user(
        "armv7-unknown-linux-gnueabihf",
        "qemu-arm",
        "/usr/arm-linux-gnueabihf",
    );
}

#[test]
fn errors_are_clear_and_have_exit_codes() {
    require_privileges!();
    let setup = Setup::new(false, true);
    let _daemon = setup.start();
    // A profile with another key: the server stays silent; exit 2.
    let text = std::fs::read_to_string(&setup.profiles).unwrap();
    let other = knockd::proto::DeviceKey::generate().to_hex();
    let key_line = text
        .lines()
        .find(|l| l.trim_start().starts_with("key:"))
        .unwrap();
    let forged = setup.dir.path().join("forged.yaml");
    std::fs::write(
        &forged,
        text.replace(key_line, &format!("    key: {other}")),
    )
    .unwrap();
    std::fs::set_permissions(&forged, std::fs::Permissions::from_mode(0o600)).unwrap();
    let start = Instant::now();
    let out = setup
        .testbed
        .client
        .command(knockctl_bin())
        .args(["knock", "--timeout", "3", "--profiles"])
        .arg(&forged)
        .arg("laptop")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no answer from") && stderr.contains("attempts"),
        "{stderr}"
    );
    assert!(start.elapsed() < Duration::from_secs(6));
    // A profile file others can read is refused (it holds a key), naming
    // the file and the fix.
    std::fs::set_permissions(&forged, std::fs::Permissions::from_mode(0o644)).unwrap();
    let out = setup
        .testbed
        .client
        .command(knockctl_bin())
        .args(["knock", "--profiles"])
        .arg(&forged)
        .arg("laptop")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("mode 0644 lets group or others read") && stderr.contains("chmod 600"),
        "{stderr}"
    );
    // Importing it where a different "laptop" exists is refused (made
    // private first: a source others can read is refused before that).
    std::fs::set_permissions(&forged, std::fs::Permissions::from_mode(0o600)).unwrap();
    let out = Command::new(knockctl_bin())
        .args(["profile", "import", "--profiles"])
        .arg(&setup.profiles)
        .arg(&forged)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("exists with other settings"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // An unknown profile: exit 1, naming the file and the profiles known.
    let out = setup.knockctl(&["nowhere"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("no profile named \"nowhere\"") && stderr.contains("laptop"),
        "{stderr}"
    );
}

/// `knockctl knock --lease` follows three rotations: printing each new
/// port, or (with `exec`) starting `--exec`'s command for it.
fn a_lease_follows_rotations(exec: bool) {
    let setup = Setup::new(false, true);
    let _daemon = setup.start_with(", rotate_every_secs: 2");
    let mut command = setup.testbed.client.command(knockctl_bin());
    command
        .args(["knock", "--lease", "--heartbeat-every", "1", "--profiles"])
        .arg(&setup.profiles)
        .arg("laptop");
    if exec {
        // The runs write to knockctl's stdout, which they inherit.
        command.args(["--exec", "echo run {port} {host}"]);
    }
    let mut lease: Child = command.stdout(Stdio::piped()).spawn().unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(lease.stdout.take().unwrap()));
    let mut ports = Vec::new();
    while ports.len() < 3 {
        let line = lines.next().unwrap().unwrap();
        let port = if exec {
            let server = setup.server.to_string();
            let fields: Vec<&str> = line.split_whitespace().collect();
            assert!(
                matches!(fields[..], ["run", _, host] if host == server),
                "{line:?}"
            );
            fields[1]
        } else {
            line.trim()
        };
        ports.push(port.parse::<u16>().unwrap());
    }
    let _ = lease.kill();
    let _ = lease.wait();
    assert!(
        ports.windows(2).all(|w| w[0] != w[1]),
        "each line is a new port: {ports:?}"
    );
    assert_eq!(setup.connect(ports[2]), Outcome::Answered);
}

#[test]
fn a_lease_prints_each_new_port() {
    require_privileges!();
    a_lease_follows_rotations(false);
}

#[test]
fn a_lease_runs_its_command_on_each_new_port() {
    require_privileges!();
    a_lease_follows_rotations(true);
}

/// sshd in the server namespace on the server's port 22, with a fresh
/// host key and one authorized client key; returns (sshd, client key path).
fn sshd(setup: &Setup) -> (Child, PathBuf) {
    let (ns, dir) = (&setup.testbed.server, setup.dir.path());
    let listen = format!("{}:{SSH}", setup.server);
    let host_key = dir.join("host_ed25519");
    let client_key = dir.join("client_ed25519");
    for key in [&host_key, &client_key] {
        sh(Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-f"])
            .arg(key));
    }
    std::fs::copy(
        client_key.with_extension("pub"),
        dir.join("authorized_keys"),
    )
    .unwrap();
    std::fs::create_dir_all("/run/sshd").unwrap();
    let config = dir.join("sshd_config");
    std::fs::write(
        &config,
        format!(
            "ListenAddress {listen}\nHostKey {}\nAuthorizedKeysFile {}\nPermitRootLogin prohibit-password\n\
             PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\nPidFile none\n",
            host_key.display(),
            dir.join("authorized_keys").display()
        ),
    )
    .unwrap();
    let child = ns
        .command("/usr/sbin/sshd")
        .args(["-D", "-e", "-f"])
        .arg(&config)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    (child, client_key)
}

/// `ssh root@SERVER COMMAND` from the client namespace, with knockctl as
/// its ProxyCommand (knock, then ride the granted port), not yet started.
fn ssh_through_knockctl(setup: &Setup, key: &Path, command: &str) -> Command {
    let proxy = format!(
        "{} knock --profiles {} --proxy %h ssh",
        knockctl_bin().display(),
        setup.profiles.display()
    );
    let mut ssh = setup.testbed.client.command("ssh");
    ssh.args([
        "-F",
        "/dev/null",
        "-o",
        "BatchMode=yes",
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-i",
    ])
    .arg(key)
    .arg("-o")
    .arg(format!("ProxyCommand={proxy}"))
    .arg(format!("root@{}", setup.server))
    .arg(command);
    ssh
}

#[test]
fn ssh_goes_through_knockctl_as_its_proxy_command() {
    require_privileges!();
    let setup = Setup::new(false, false);
    let (mut sshd, key) = sshd(&setup);
    let _daemon = setup.start();
    // Direct ssh finds nothing.
    let direct = setup
        .testbed
        .client
        .command("ssh")
        .args([
            "-F",
            "/dev/null",
            "-o",
            "BatchMode=yes",
            "-o",
            "ConnectTimeout=2",
            "-o",
            "StrictHostKeyChecking=no",
        ])
        .arg(format!("root@{}", setup.server))
        .arg("true")
        .output()
        .unwrap();
    assert!(!direct.status.success());
    // Through knockctl: knock, then the session rides the granted port.
    let out = ssh_through_knockctl(&setup, &key, "echo through-the-door")
        .output()
        .unwrap();
    let _ = sshd.kill();
    let _ = sshd.wait();
    assert!(
        out.status.success(),
        "ssh failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out), "through-the-door");
}

/// `knockctl revoke` ends a live ssh session: the one the device's grant let
/// in, seconds into a command that would run for a minute.
#[test]
fn revoke_ends_a_live_ssh_session() {
    require_privileges!();
    let setup = Setup::new(false, false);
    let (mut sshd, key) = sshd(&setup);
    let daemon = setup.start();
    let mut session = ssh_through_knockctl(&setup, &key, "echo in; exec sleep 60")
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait for the session to be up: its first line.
    let mut first = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(session.stdout.as_mut().unwrap()),
        &mut first,
    )
    .unwrap();
    assert_eq!(first.trim(), "in");

    let revoked = Command::new(knockctl_bin())
        .args(["revoke", "laptop", "--socket"])
        .arg(daemon.control_socket())
        .output()
        .unwrap();
    let started = Instant::now();
    assert_eq!(
        stdout(&revoked),
        "revoked 1 grant(s), cut 1 connection(s)",
        "{}",
        String::from_utf8_lossy(&revoked.stderr)
    );
    let status = loop {
        if let Some(status) = session.try_wait().unwrap() {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(10) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // sshd's end went at once too (SOCK_DESTROY), not at its next send.
    let established = setup
        .testbed
        .server
        .command("ss")
        .args(["-Htn", "state", "established", "sport", "=", ":22"])
        .output()
        .unwrap();
    let _ = session.kill();
    let _ = session.wait();
    let _ = sshd.kill();
    let _ = sshd.wait();
    let status = status.expect("the ssh session outlived its revoke by 10 s");
    assert_eq!(stdout(&established), "", "sshd still holds the session");
    assert!(!status.success(), "ssh ended with {status}, not an error");
    eprintln!("ssh ended {:?} after the revoke", started.elapsed());
}

#[test]
fn device_list_remove_check_config_and_completions() {
    require_privileges!();
    let dir = tempfile::tempdir().unwrap();
    let devices = dir.path().join("devices.d");
    let ctl = |args: &[&str]| Command::new(knockctl_bin()).args(args).output().unwrap();
    let devices_arg = devices.display().to_string();
    for name in ["laptop", "sensor-17"] {
        let out = ctl(&[
            "device",
            "add",
            name,
            "--group",
            "fleet",
            "--devices-dir",
            &devices_arg,
        ]);
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let again = ctl(&["device", "add", "laptop", "--devices-dir", &devices_arg]);
    assert_eq!(again.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists already"));
    let bad = ctl(&["device", "add", "../evil", "--devices-dir", &devices_arg]);
    assert_eq!(bad.status.code(), Some(1));

    let list = stdout(&ctl(&["device", "list", "--devices-dir", &devices_arg]));
    assert!(
        list.contains("laptop\tgroups: fleet\tkey: laptop.key (0600)"),
        "{list}"
    );
    assert!(list.contains("sensor-17"), "{list}");

    // The server's config validates with these devices, from knockctl too.
    let config = dir.path().join("knockd.yaml");
    std::fs::write(
        &config,
        format!(
            "interfaces: [lo]\ndevices_dir: {}\ndoors: {{ ssh: {{ service_port: 22, allow: {{ groups: [fleet] }} }} }}\n",
            devices.display()
        ),
    )
    .unwrap();
    let checked = ctl(&["check-config", &config.display().to_string()]);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );
    assert!(stdout(&checked).ends_with("ok (doors: 1, devices: 2)"));

    let removed = ctl(&[
        "device",
        "remove",
        "sensor-17",
        "--devices-dir",
        &devices_arg,
    ]);
    assert!(removed.status.success());
    assert!(!devices.join("sensor-17.key").exists() && !devices.join("sensor-17.yaml").exists());
    assert!(
        !stdout(&ctl(&["device", "list", "--devices-dir", &devices_arg])).contains("sensor-17")
    );
    let missing = ctl(&[
        "device",
        "remove",
        "sensor-17",
        "--devices-dir",
        &devices_arg,
    ]);
    assert_eq!(missing.status.code(), Some(1));

    // A broken config is named, with exit code 1.
    std::fs::write(
        &config,
        "interfaces: [lo]\ndoors: { ssh: { service_port: 0 } }\n",
    )
    .unwrap();
    let broken = ctl(&["check-config", &config.display().to_string()]);
    assert_eq!(broken.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&broken.stderr).contains("doors.ssh.service_port: port 0"));

    for shell in ["bash", "zsh", "fish"] {
        let completions = ctl(&["completions", shell]);
        assert!(completions.status.success());
        assert!(stdout(&completions).contains("knockctl"));
    }
}

/// Provisioning never leaves a device key where others can read it, and a
/// server configuration's devices_dir serves every `device` subcommand.
#[test]
fn provisioning_keeps_keys_private_and_every_device_command_takes_the_config() {
    let dir = tempfile::tempdir().unwrap();
    let devices = dir.path().join("custom.d");
    let config = dir.path().join("knockd.yaml");
    std::fs::write(
        &config,
        format!(
            "interfaces: [lo]\ndevices_dir: {}\ndoors: {{ ssh: {{ service_port: 22, allow: {{ groups: [fleet] }} }} }}\n",
            devices.display()
        ),
    )
    .unwrap();
    let config_arg = config.display().to_string();
    let ctl = |args: &[&str]| Command::new(knockctl_bin()).args(args).output().unwrap();
    let mode =
        |path: &std::path::Path| std::fs::metadata(path).unwrap().permissions().mode() & 0o7777;

    // -o: a new file, 0600, never an existing one.
    let profile = dir.path().join("laptop.yaml");
    let profile_arg = profile.display().to_string();
    let add = |name: &str, out: &str| {
        ctl(&[
            "device",
            "add",
            name,
            "--group",
            "fleet",
            "--config",
            &config_arg,
            "-o",
            out,
        ])
    };
    let out = add("laptop", &profile_arg);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout(&out), "", "the profile went to the file, not stdout");
    assert_eq!(mode(&profile), 0o600);
    let written = std::fs::read_to_string(&profile).unwrap();
    assert!(
        written.contains("laptop:") && written.contains("key: "),
        "{written}"
    );
    assert!(
        devices.join("laptop.key").exists(),
        "the config's devices_dir was used"
    );
    let again = add("desk", &profile_arg);
    assert_eq!(again.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("an existing file is never overwritten"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    assert_eq!(std::fs::read_to_string(&profile).unwrap(), written);

    // > FILE under a 0022 umask: the file is made 0600, and the operator told.
    let redirected = dir.path().join("sensor.yaml");
    let file = std::fs::File::create(&redirected).unwrap();
    file.set_permissions(std::fs::Permissions::from_mode(0o644))
        .unwrap();
    let out = Command::new(knockctl_bin())
        .args([
            "device",
            "add",
            "sensor",
            "--group",
            "fleet",
            "--config",
            &config_arg,
        ])
        .stdout(file)
        .output()
        .unwrap();
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("(mode 0644)") && stderr.contains("knockctl made it 0600"),
        "{stderr}"
    );
    assert_eq!(mode(&redirected), 0o600);
    assert!(
        std::fs::read_to_string(&redirected)
            .unwrap()
            .contains("sensor:")
    );

    // list and remove read the same devices_dir from the config.
    let list = stdout(&ctl(&["device", "list", "--config", &config_arg]));
    assert!(
        list.contains("laptop\t") && list.contains("sensor\t"),
        "{list}"
    );
    let removed = ctl(&["device", "remove", "sensor", "--config", &config_arg]);
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert!(!devices.join("sensor.key").exists());
    assert!(!stdout(&ctl(&["device", "list", "--config", &config_arg])).contains("sensor"));

    // profile import refuses a source others can read, naming the fix.
    let profiles = dir.path().join("profiles.yaml");
    let import = || {
        ctl(&[
            "profile",
            "import",
            &profile_arg,
            "--profiles",
            &profiles.display().to_string(),
        ])
    };
    std::fs::set_permissions(&profile, std::fs::Permissions::from_mode(0o644)).unwrap();
    let refused = import();
    assert_eq!(refused.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(
        stderr.contains("mode 0644 lets group or others read the device key")
            && stderr.contains(&format!("chmod 600 {profile_arg}")),
        "{stderr}"
    );
    assert!(!profiles.exists(), "nothing was imported");
    std::fs::set_permissions(&profile, std::fs::Permissions::from_mode(0o600)).unwrap();
    let imported = import();
    assert!(
        imported.status.success(),
        "{}",
        String::from_utf8_lossy(&imported.stderr)
    );
    assert_eq!(mode(&profiles), 0o600);
}

/// UDP knock ports in the host's ephemeral range are named by check-config,
/// and gen-sequence, left to its default, draws below that range.
#[test]
fn the_ephemeral_range_is_guarded() {
    let ephemeral = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").unwrap();
    let mut bounds = ephemeral
        .split_whitespace()
        .map(|n| n.parse::<u16>().unwrap());
    let (low, high) = (bounds.next().unwrap(), bounds.next().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("knockd.yaml");
    let inside = format!("{}-{}", low, low + 99);
    std::fs::write(
        &config,
        format!("interfaces: [lo]\ndoors: {{ ssh: {{ service_port: 22, knock_ports: \"{inside}\" }} }}\n"),
    )
    .unwrap();
    let out = Command::new(knockd_bin())
        .args(["check-config", &config.display().to_string()])
        .output()
        .unwrap();
    assert!(out.status.success(), "a warning, not an error");
    let report = stdout(&out);
    assert!(
        report.contains(&format!(
            "warning: doors.ssh.knock_ports: UDP {inside} lies in the ephemeral range {low}-{high} (net.ipv4.ip_local_port_range)"
        )),
        "{report}"
    );

    let out = Command::new(knockd_bin())
        .args(["gen-sequence", "--length", "16"])
        .output()
        .unwrap();
    assert!(out.status.success());
    let printed = stdout(&out);
    let line = printed.lines().next().unwrap();
    let ports: Vec<u16> = line
        .split('"')
        .filter_map(|s| s.strip_suffix(":udp"))
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(ports.len(), 16, "{printed}");
    assert!(
        ports.iter().all(|p| !(low..=high).contains(p)),
        "{ports:?} in {low}-{high}"
    );
}
