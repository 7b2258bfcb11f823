//! Harness for knockd's privileged tests.
//!
//! - [`privileged`] gates every test: without root it skips loudly, and under
//!   `CI=true` it fails instead, so CI can never pass on skipped tests.
//! - [`NetNs`] and [`Testbed`] build uniquely named network namespaces joined
//!   by a veth pair, and tear them down on drop, panics included.
//! - [`Daemon`] runs the real `knockd` binary inside a namespace and collects
//!   its JSON log.
//! - [`probe`] makes real TCP and UDP attempts from inside a namespace.
//! - [`frames`] builds Ethernet frames for `BPF_PROG_TEST_RUN`.
//!
//! Tests `unwrap()` rather than return `Result`, so a failure shows its line.

pub mod bed;
pub mod capture;
pub mod fleet;
pub mod frames;
pub mod livegen;
pub mod machine;
pub mod nmap;
pub mod probe;

use std::{
    fs::File,
    io::{BufRead as _, BufReader},
    net::IpAddr,
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicU32, Ordering},
    },
    time::{Duration, Instant},
};

use serde_json::Value;

/// True when privileged tests can run. Without root: under `CI=true` this
/// panics, because a CI run that skips is a CI run that proves nothing;
/// elsewhere it prints that the test is skipped and returns false.
pub fn privileged() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("this privileged test cannot run: not root (CI=true forbids skipping)");
    }
    eprintln!("SKIPPED: this test needs root (set CI=true to make that a failure)");
    false
}

/// Returns from the test early, loudly, when [`privileged`] says so.
#[macro_export]
macro_rules! require_privileges {
    () => {
        if !$crate::privileged() {
            return;
        }
    };
}

/// A name no other test, in this process or another, is using: the pid plus
/// a per-process counter. Short enough for an interface name (15 bytes).
pub fn unique_name(tag: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let name = format!("kd{tag}{}x{n}", std::process::id() % 1_000_000);
    assert!(name.len() <= 15, "name {name} too long for an interface");
    name
}

/// Runs `cmd`, panicking with its output if it fails.
pub fn sh(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A named network namespace (`ip netns add`), deleted on drop.
pub struct NetNs {
    name: String,
}

impl NetNs {
    /// Creates a namespace with a unique name and its loopback up.
    pub fn new(tag: &str) -> NetNs {
        let name = unique_name(tag);
        sh(Command::new("ip").args(["netns", "add", &name]));
        let ns = NetNs { name };
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, for `setns` and `nsenter`.
    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// Runs `ip -n NAME ARGS…`.
    pub fn ip(&self, args: &[&str]) -> String {
        sh(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    /// A command that runs `program` inside the namespace. It uses
    /// `nsenter --net` rather than `ip netns exec`, because the latter
    /// remounts /sys and so hides bpffs from the program.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `f` on a thread that has entered the namespace, so the sockets
    /// it opens live there.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = self.path();
        std::thread::scope(|scope| {
            scope
                .spawn(move || {
                    let ns = File::open(&path).unwrap();
                    // SAFETY: a valid namespace fd; setns affects only this
                    // thread, which exists just to run `f`.
                    let rc = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                    assert_eq!(
                        rc,
                        0,
                        "setns {}: {}",
                        path.display(),
                        std::io::Error::last_os_error()
                    );
                    f()
                })
                .join()
                .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Never panic here: we may already be unwinding from a failed test.
        let status = Command::new("ip")
            .args(["netns", "del", &self.name])
            .stderr(Stdio::null())
            .status();
        if !matches!(status, Ok(s) if s.success()) && !std::thread::panicking() {
            eprintln!("warning: could not delete netns {}", self.name);
        }
    }
}

/// Server-side and client-side addresses of a [`Testbed`].
pub mod addrs {
    use std::net::IpAddr;

    pub const SERVER_V4: &str = "198.18.0.1";
    pub const CLIENT_V4: &str = "198.18.0.2";
    /// A second client address on the same link, to tell sources apart.
    pub const OTHER_V4: &str = "198.18.0.3";
    pub const SERVER_V6: &str = "2001:db8::1";
    pub const CLIENT_V6: &str = "2001:db8::2";
    /// In a /64 of its own: the kernel rate-limits knocks per IPv6 /64, so
    /// a second source in the client's /64 would share its bucket.
    pub const OTHER_V6: &str = "2001:db8:1::3";
    /// The server's address in OTHER_V6's /64, which makes that prefix
    /// on-link for the server's replies.
    pub const SERVER_V6_OTHER_NET: &str = "2001:db8:1::1";

    /// (server, client, other client) for one address family.
    pub fn family(v6: bool) -> (IpAddr, IpAddr, IpAddr) {
        let parse = |s: &str| s.parse().unwrap();
        if v6 {
            (parse(SERVER_V6), parse(CLIENT_V6), parse(OTHER_V6))
        } else {
            (parse(SERVER_V4), parse(CLIENT_V4), parse(OTHER_V4))
        }
    }
}

/// Two namespaces, server and client, joined by a veth pair, with IPv4 and
/// IPv6 addresses from the documentation/benchmark ranges. The client side
/// also holds a second address, so tests can knock or connect from two
/// sources.
pub struct Testbed {
    /// Dropped after `client`, but the veth lives inside the namespaces, so
    /// deleting either one removes it: a half-built testbed cleans up too.
    pub server: NetNs,
    pub client: NetNs,
    /// The server end of the veth, where the XDP guard attaches.
    pub server_if: String,
    pub client_if: String,
}

impl Testbed {
    pub fn new() -> Testbed {
        let server = NetNs::new("s");
        let client = NetNs::new("c");
        let server_if = unique_name("v");
        let client_if = unique_name("v");
        sh(Command::new("ip").args([
            "link",
            "add",
            &server_if,
            "netns",
            server.name(),
            "type",
            "veth",
            "peer",
            "name",
            &client_if,
            "netns",
            client.name(),
        ]));
        server.ip(&["link", "set", &server_if, "up"]);
        client.ip(&["link", "set", &client_if, "up"]);
        server.ip(&[
            "addr",
            "add",
            &format!("{}/24", addrs::SERVER_V4),
            "dev",
            &server_if,
        ]);
        for addr in [addrs::SERVER_V6, addrs::SERVER_V6_OTHER_NET] {
            server.ip(&[
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                &server_if,
                "nodad",
            ]);
        }
        for addr in [addrs::CLIENT_V4, addrs::OTHER_V4] {
            client.ip(&["addr", "add", &format!("{addr}/24"), "dev", &client_if]);
        }
        for addr in [addrs::CLIENT_V6, addrs::OTHER_V6] {
            client.ip(&[
                "addr",
                "add",
                &format!("{addr}/64"),
                "dev",
                &client_if,
                "nodad",
            ]);
        }
        Testbed {
            server,
            client,
            server_if,
            client_if,
        }
    }
}

impl Default for Testbed {
    fn default() -> Self {
        Testbed::new()
    }
}

/// Path of the `knockd` binary: `$KNOCKD_BIN`, or the one cargo built next
/// to this test executable.
/// `file`'s text once something (a hook, say) has written it, within
/// `secs`.
pub fn wait_for_file(file: &Path, secs: u64) -> String {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Ok(text) = std::fs::read_to_string(file)
            && !text.is_empty()
        {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "{} never written",
            file.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn knockd_bin() -> PathBuf {
    std::env::var_os("KNOCKD_BIN").map_or_else(|| workspace_bin("knockd"), PathBuf::from)
}

/// Path of the `knockctl` binary cargo built next to this test executable.
pub fn knockctl_bin() -> PathBuf {
    workspace_bin("knockctl")
}

/// `knockctl ARGS… --socket SOCKET`, run from the host (the control socket
/// is a file; no namespace needed).
pub fn knockctl(socket: &Path, args: &[&str]) -> std::process::Output {
    Command::new(knockctl_bin())
        .args(args)
        .arg("--socket")
        .arg(socket)
        .output()
        .unwrap()
}

/// [`knockctl`] with `--json`, which must succeed: its answer.
#[track_caller]
pub fn knockctl_json(socket: &Path, args: &[&str]) -> Value {
    let out = knockctl(socket, &[args, &["--json"]].concat());
    assert!(
        out.status.success(),
        "knockctl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// One request written straight to the control socket (as bytes, so a
/// test can send anything), then the write side shut: the reply line.
pub fn control_raw(socket: &Path, request: &[u8]) -> Value {
    use std::io::Write as _;
    let mut stream = std::os::unix::net::UnixStream::connect(socket).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let _ = stream.write_all(request);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line).unwrap();
    serde_json::from_str(&line).unwrap()
}

/// knockctl as `cargo xtask test` builds it for another system `target`
/// (`target/TARGET/debug/knockctl`, `.exe` for Windows), when it is there.
/// Missing: under `CI=true` this panics (a CI run that skips proves
/// nothing); elsewhere it says the test is skipped and returns None.
pub fn foreign_knockctl(target: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().unwrap();
    let target_dir = exe
        .ancestors()
        .find(|d| d.file_name().is_some_and(|n| n == "target"))
        .expect("tests run from under target/")
        .to_owned();
    let name = if target.contains("windows") {
        "knockctl.exe"
    } else {
        "knockctl"
    };
    let bin = target_dir.join(target).join("debug").join(name);
    if bin.exists() {
        return Some(bin);
    }
    let why = format!(
        "{} is missing: `cargo xtask test` builds it (or `cargo build -p knockd --no-default-features --bin knockctl --target {target}`)",
        bin.display()
    );
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("{why} (CI=true forbids skipping)");
    }
    eprintln!("SKIPPED: {why}");
    None
}

fn workspace_bin(name: &str) -> PathBuf {
    // target/<profile>/deps/<test> or target/<profile>/<bench> →
    // target/<profile>/<name>
    let exe = std::env::current_exe().unwrap();
    let dir = exe.parent().unwrap();
    let bin = [dir.join(name), dir.parent().unwrap().join(name)]
        .into_iter()
        .find(|p| p.exists())
        .unwrap_or_else(|| dir.join(name));
    assert!(
        bin.exists(),
        "{} not found: build it first (`cargo build -p knockd --features cluster`)",
        bin.display()
    );
    bin
}

/// The daemon's log, shared with the thread that reads it.
#[derive(Default)]
struct Log {
    lines: Mutex<Vec<Value>>,
    grew: Condvar,
}

/// The real `knockd` binary running in a namespace, with its JSON log
/// collected. Dropping it kills the daemon and removes its pins.
pub struct Daemon {
    child: Option<Child>,
    log: Arc<Log>,
    bpffs_dir: PathBuf,
    /// Holds the config file for as long as the daemon runs.
    dir: Arc<tempfile::TempDir>,
    /// Whether dropping this value removes the pins (a restart hands them on).
    owns_pins: bool,
}

/// How long a daemon may take to attach and say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

impl Daemon {
    /// Starts `knockd run` in `ns` with `config` (YAML; `bpffs_dir` is
    /// appended, unique per daemon, and so is `state_dir` unless `config`
    /// has one) and waits until it logs "ready".
    pub fn start(ns: &NetNs, config: &str) -> Daemon {
        Daemon::start_with_env(ns, config, &[])
    }

    /// [`start`](Self::start) with extra environment for the daemon (the
    /// systemd variables, say).
    pub fn start_with_env(ns: &NetNs, config: &str, env: &[(&str, String)]) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let bpffs_dir = Path::new("/sys/fs/bpf").join(unique_name("p"));
        let config_path = dir.path().join("knockd.yaml");
        let mut text = format!("{config}\nbpffs_dir: {}\n", bpffs_dir.display());
        if !config.contains("control_socket:") {
            text.push_str(&format!(
                "control_socket: {}\n",
                dir.path().join("control.sock").display()
            ));
        }
        if !config.contains("state_dir:") {
            text.push_str(&format!(
                "state_dir: {}\n",
                dir.path().join("state").display()
            ));
        }
        std::fs::write(&config_path, text).unwrap();
        Daemon::spawn(ns, Arc::new(dir), bpffs_dir, env)
    }

    /// Starts the daemon again with the same config, pins and state, as a
    /// restart would (stop or kill it first).
    pub fn restart(self, ns: &NetNs) -> Daemon {
        self.restart_within(ns, READY_TIMEOUT)
    }

    /// [`restart`](Self::restart), waiting up to `timeout` for "ready" (a
    /// benchmark's daemon adopting a million grants).
    pub fn restart_within(mut self, ns: &NetNs, timeout: Duration) -> Daemon {
        assert!(
            self.child.is_none(),
            "stop or kill the daemon before restarting it"
        );
        self.owns_pins = false;
        let mut daemon =
            Daemon::spawn_child(ns, Arc::clone(&self.dir), self.bpffs_dir.clone(), &[]);
        daemon.wait_for("ready", timeout, |_| true);
        daemon.assert_running();
        daemon
    }

    /// Starts the daemon again with `KNOCKD_CRASH_AT=point` (honoured by
    /// debug builds), expecting it to kill itself there before it is
    /// ready, and reaps it: a crash during start-up. Restart it after.
    pub fn restart_to_crash(mut self, ns: &NetNs, point: &str) -> Daemon {
        assert!(self.child.is_none(), "stop or kill the daemon first");
        self.owns_pins = false;
        let mut daemon = Daemon::spawn_child(
            ns,
            Arc::clone(&self.dir),
            self.bpffs_dir.clone(),
            &[("KNOCKD_CRASH_AT", point.to_owned())],
        );
        daemon.wait_killed(READY_TIMEOUT);
        daemon
    }

    /// Waits until the daemon has died of SIGKILL (a crash point it was
    /// started with), and reaps it.
    pub fn wait_killed(&mut self, timeout: Duration) {
        use std::os::unix::process::ExitStatusExt as _;
        let child = self.child.as_mut().expect("running");
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            assert!(
                Instant::now() < deadline,
                "the daemon did not crash; log:\n{:#?}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        self.child = None;
        assert_eq!(
            status.signal(),
            Some(libc::SIGKILL),
            "{status}; log:\n{:#?}",
            self.log()
        );
    }

    fn spawn(
        ns: &NetNs,
        dir: Arc<tempfile::TempDir>,
        bpffs_dir: PathBuf,
        env: &[(&str, String)],
    ) -> Daemon {
        let mut daemon = Daemon::spawn_child(ns, dir, bpffs_dir, env);
        daemon.wait_for("ready", READY_TIMEOUT, |_| true);
        daemon.assert_running();
        daemon
    }

    fn spawn_child(
        ns: &NetNs,
        dir: Arc<tempfile::TempDir>,
        bpffs_dir: PathBuf,
        env: &[(&str, String)],
    ) -> Daemon {
        let config_path = dir.path().join("knockd.yaml");
        let mut child = ns
            .command(knockd_bin())
            // knockd=debug: tests read the per-knock lines. Benchmarks
            // set KNOCKD_TEST_LOG_LEVEL=info, the level that ships.
            .args([
                "run",
                "--log-format",
                "json",
                "--log-level",
                &std::env::var("KNOCKD_TEST_LOG_LEVEL")
                    .unwrap_or_else(|_| "info,knockd=debug".to_owned()),
                "--config",
            ])
            .arg(&config_path)
            .envs(env.iter().map(|(k, v)| (*k, v)))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Log::default());
        let stderr = child.stderr.take().unwrap();
        let reader_log = Arc::clone(&log);
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let value = serde_json::from_str(&line)
                    .unwrap_or_else(|_| serde_json::json!({ "raw": line }));
                reader_log.lines.lock().unwrap().push(value);
                reader_log.grew.notify_all();
            }
        });
        Daemon {
            child: Some(child),
            log,
            bpffs_dir,
            dir,
            owns_pins: true,
        }
    }

    /// Where the daemon pinned its maps.
    pub fn bpffs_dir(&self) -> &Path {
        &self.bpffs_dir
    }

    /// The daemon's control socket.
    pub fn control_socket(&self) -> PathBuf {
        self.dir.path().join("control.sock")
    }

    /// The daemon's configuration file (tests edit it to try reloads).
    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("knockd.yaml")
    }

    /// The daemon's pid.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The live maps, opened through the daemon's pins.
    pub fn maps(&self) -> knockd::maps::GuardMaps {
        knockd::maps::GuardMaps::open_pinned(&self.bpffs_dir).unwrap()
    }

    /// Every log line so far.
    pub fn log(&self) -> Vec<Value> {
        self.log.lines.lock().unwrap().clone()
    }

    /// Log lines with `message` that satisfy `pred`.
    pub fn messages(&self, message: &str, pred: impl Fn(&Value) -> bool) -> Vec<Value> {
        self.log()
            .into_iter()
            .filter(|v| v["message"] == message && pred(v))
            .collect()
    }

    /// Waits for a log line with `message` that satisfies `pred`, panicking
    /// with the whole log after `timeout`.
    pub fn wait_for(
        &mut self,
        message: &str,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Value {
        self.wait_for_count(message, 1, timeout, pred).remove(0)
    }

    /// Waits until `count` log lines with `message` satisfy `pred`.
    pub fn wait_for_count(
        &mut self,
        message: &str,
        count: usize,
        timeout: Duration,
        pred: impl Fn(&Value) -> bool,
    ) -> Vec<Value> {
        let deadline = Instant::now() + timeout;
        let mut lines = self.log.lines.lock().unwrap();
        loop {
            let found: Vec<Value> = lines
                .iter()
                .filter(|v| v["message"] == message && pred(v))
                .cloned()
                .collect();
            if found.len() >= count {
                return found;
            }
            let now = Instant::now();
            if now >= deadline {
                let dump: Vec<String> = lines.iter().map(Value::to_string).collect();
                drop(lines);
                panic!(
                    "timed out waiting for {count} × {message:?} (saw {}); daemon log:\n{}",
                    found.len(),
                    dump.join("\n")
                );
            }
            lines = self.log.grew.wait_timeout(lines, deadline - now).unwrap().0;
        }
    }

    /// Panics if the daemon has exited.
    pub fn assert_running(&mut self) {
        if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
            panic!("knockd exited early ({status}); log:\n{:#?}", self.log());
        }
    }

    /// Sends SIGTERM and waits for the daemon to exit. The pins stay until
    /// this value is dropped.
    pub fn stop(&mut self) -> ExitStatus {
        let mut child = self.child.take().unwrap();
        terminate(&mut child)
    }

    /// Kills the daemon with SIGKILL, as a crash would, and reaps it.
    pub fn kill(&mut self) {
        let mut child = self.child.take().unwrap();
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
        child.wait().unwrap();
    }
}

/// SIGTERM, then SIGKILL if the process is still there after 10 s.
fn terminate(child: &mut Child) -> ExitStatus {
    // SAFETY: plain kill(2) on our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    child.wait().unwrap()
}

/// A bpffs directory of a test's own (under the host's bpffs), removed
/// when dropped, so a test that fails midway leaves no pins behind.
pub struct Pins(PathBuf);

impl Pins {
    /// A fresh directory name for `tag` (not created: the daemon does).
    pub fn new(tag: &str) -> Pins {
        Pins(Path::new("/sys/fs/bpf").join(unique_name(tag)))
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }
}

impl Drop for Pins {
    fn drop(&mut self) {
        let _ = knockd::guard::remove_pins(&self.0);
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            terminate(&mut child);
        }
        // The guard outlives the daemon by design; the test removes it.
        if self.owns_pins {
            let _ = knockd::guard::remove_pins(&self.bpffs_dir);
        }
        if std::thread::panicking() {
            eprintln!("--- knockd log ---");
            for line in self.log.lines.lock().map(|l| l.clone()).unwrap_or_default() {
                eprintln!("{line}");
            }
        }
    }
}

/// Deterministic pseudo-random bytes (xorshift64) for garbage inputs, so a
/// failing case can be reproduced from its seed.
pub struct Noise(u64);

impl Noise {
    /// A generator starting from `seed` (not zero).
    pub fn new(seed: u64) -> Noise {
        Noise(seed.max(1))
    }

    /// The next `len` bytes.
    pub fn bytes(&mut self, len: usize) -> Vec<u8> {
        (0..len)
            .map(|_| {
                self.0 ^= self.0 << 13;
                self.0 ^= self.0 >> 7;
                self.0 ^= self.0 << 17;
                self.0 as u8
            })
            .collect()
    }
}

/// A knock log line's source address.
pub fn knock_source(line: &Value) -> Option<IpAddr> {
    let source: std::net::SocketAddr = line["source"].as_str()?.parse().ok()?;
    Some(source.ip())
}
