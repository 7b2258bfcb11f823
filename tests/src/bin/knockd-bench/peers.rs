//! `cargo xtask bench peers`: knockd side by side with the tools people use
//! today, in one run, on namespaces made for it.
//!
//! Knock-to-open: from the first knock sent to the first successful TCP
//! connect through what it opened, N trials per variant, the variants
//! interleaved in a random order each round:
//! - `knockd one-time`: our client's sequence, the sealed reply, a connect to
//!   the granted port;
//! - `knockd static`: the stock `knock` client's packets (three empty UDP
//!   datagrams) to a static door, then connects until one succeeds;
//! - `classic knockd`: Debian's knockd 0.8 on the same veth (libpcap), whose
//!   command adds the source to an nftables set;
//! - `fwknopd`: Debian's fwknopd 2.6 (libpcap, iptables), sent an SPA packet
//!   that Debian's `fwknop` client built.
//!
//! Where the client cannot learn when the port opens (every variant but the
//! one-time door), it polls with fresh connects every 100 µs; the peers'
//! closed ports answer RST, so their polls cost nothing, and ours (dropped
//! in XDP) time out after 100 µs. Results go to `target/bench/peers.json`,
//! `peers.md` and `peers.svg`, and the table is printed.

use std::{
    fmt::Write as _,
    net::{IpAddr, SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use knockd::{client, proto::Kind};
use knockd_tests::{Testbed, addrs, probe};
use rand::seq::SliceRandom as _;

use crate::{bench_daemon_with, bench_target, percentile};

mod flood;

/// Trials per variant.
const TRIALS: usize = 100;
/// Trials for a quick look: KNOCKD_BENCH_TRIALS overrides TRIALS.
fn trials() -> usize {
    std::env::var("KNOCKD_BENCH_TRIALS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(TRIALS)
}
/// How long one trial may take before it counts as failed.
const TRIAL_TIMEOUT: Duration = Duration::from_secs(3);
/// The ports each variant opens.
const SSH: u16 = 22;
const OURS_STATIC: u16 = 2224;
const CLASSIC: u16 = 2222;
const FWKNOP: u16 = 2223;
/// Classic knockd's sequence: ports our guard does not protect, so its
/// packets reach libpcap.
const CLASSIC_SEQUENCE: [u16; 3] = [9001, 9002, 9003];
const OURS_STATIC_SEQUENCE: [u16; 3] = [6000, 6001, 6002];
const SPA_PORT: u16 = 62201;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Variant {
    OneTime,
    Static,
    Classic,
    Fwknop,
}

impl Variant {
    const ALL: [Variant; 4] = [
        Variant::OneTime,
        Variant::Static,
        Variant::Classic,
        Variant::Fwknop,
    ];

    fn name(self) -> &'static str {
        match self {
            Variant::OneTime => "knockd one-time door",
            Variant::Static => "knockd static door",
            Variant::Classic => "classic knockd 0.8",
            Variant::Fwknop => "fwknopd 2.6",
        }
    }

    fn key(self) -> &'static str {
        match self {
            Variant::OneTime => "knockd_one_time",
            Variant::Static => "knockd_static",
            Variant::Classic => "classic_knockd",
            Variant::Fwknop => "fwknopd",
        }
    }
}

/// A process killed (and reaped) on drop.
struct Peer(Child);

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn sh(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Installs the peers' packages if missing (Debian's knockd and fwknop).
fn install_peers() {
    let missing: Vec<&str> = ["knockd", "fwknop-server", "fwknop-client", "iptables"]
        .into_iter()
        .filter(|pkg| {
            !Command::new("dpkg-query")
                .args(["-W", "-f=${db:Status-Abbrev}", pkg])
                .output()
                .is_ok_and(|o| o.stdout.starts_with(b"ii"))
        })
        .collect();
    if missing.is_empty() {
        return;
    }
    println!("installing {}", missing.join(" "));
    // As in `cargo xtask setup`: packages with services must not start them
    // on this host.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let had_policy = policy.exists();
    if !had_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n").unwrap();
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
    }
    sh(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if !had_policy {
        let _ = std::fs::remove_file(policy);
    }
}

/// Connects to `to` from `from` with fresh sockets, each given 100 µs,
/// until one succeeds or `deadline` passes.
fn connect_until(from: IpAddr, to: SocketAddr, deadline: Instant) -> bool {
    use socket2::{Domain, SockAddr, Socket, Type};
    while Instant::now() < deadline {
        let socket = Socket::new(Domain::for_address(to), Type::STREAM, None).unwrap();
        socket
            .bind(&SockAddr::from(SocketAddr::new(from, 0)))
            .unwrap();
        socket.set_nonblocking(true).unwrap();
        match socket.connect(&to.into()) {
            Ok(()) => return true,
            Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
            Err(_) => continue,
        }
        let mut fds = libc::pollfd {
            fd: socket.as_raw_fd(),
            events: libc::POLLOUT,
            revents: 0,
        };
        let wait = libc::timespec {
            tv_sec: 0,
            tv_nsec: 100_000,
        };
        // SAFETY: one valid pollfd, a valid timespec, no signal mask.
        let ready = unsafe { libc::ppoll(&mut fds, 1, &wait, std::ptr::null()) };
        if ready == 1 && socket.take_error().ok().flatten().is_none() {
            return true;
        }
    }
    false
}

/// The peers' configuration and processes, in the server namespace.
struct Peers {
    _classic: Peer,
    _fwknopd: Peer,
    dir: tempfile::TempDir,
    fwknop_keys: (String, String),
}

/// A Rijndael and an HMAC key, base64, from Debian's `fwknop --key-gen`.
fn fwknop_keys(home: &Path) -> (String, String) {
    let out = Command::new("fwknop")
        .arg("--key-gen")
        .env("HOME", home)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or_else(|| panic!("fwknop --key-gen printed no {name}: {text}"))
            .trim()
            .to_owned()
    };
    (field("KEY_BASE64:"), field("HMAC_KEY_BASE64:"))
}

impl Peers {
    /// Classic knockd's pid.
    fn classic_pid(&self) -> u32 {
        self._classic.0.id()
    }

    fn start(testbed: &Testbed) -> Peers {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        // Classic knockd: its command adds the source to a set that opens
        // CLASSIC; without it the port answers RST.
        let nft = format!(
            "table inet kbench {{\n\
             set allowed {{ type ipv4_addr; flags timeout; timeout 30s; }}\n\
             chain input {{ type filter hook input priority 10; policy accept;\n\
             tcp dport {CLASSIC} ip saddr @allowed accept\n\
             tcp dport {CLASSIC} reject with tcp reset\n\
             }}\n}}\n"
        );
        std::fs::write(path("kbench.nft"), nft).unwrap();
        sh(testbed
            .server
            .command("nft")
            .arg("-f")
            .arg(path("kbench.nft")));
        let sequence: Vec<String> = CLASSIC_SEQUENCE
            .iter()
            .map(|p| format!("{p}:udp"))
            .collect();
        std::fs::write(
            path("knockd.conf"),
            format!(
                "[options]\n\tLogFile = {}\n\tInterface = {}\n[open]\n\tsequence = {}\n\
                 \tseq_timeout = 5\n\tcommand = /usr/sbin/nft add element inet kbench allowed {{ %IP% }}\n",
                path("knockd.log").display(),
                testbed.server_if,
                sequence.join(",")
            ),
        )
        .unwrap();
        let classic = Peer(
            testbed
                .server
                .command("knockd")
                .arg("-c")
                .arg(path("knockd.conf"))
                .args(["-i", &testbed.server_if])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // fwknopd: SPA with Rijndael and HMAC keys; it opens FWKNOP with an
        // iptables rule in its FWKNOP_INPUT chain, jumped to first from
        // INPUT (iptables-nft, so it runs before the reject above).
        let keys = fwknop_keys(dir.path());
        std::fs::create_dir_all(path("run")).unwrap();
        std::fs::write(
            path("fwknopd.conf"),
            format!(
                "PCAP_INTF {};\nENABLE_PCAP_PROMISC N;\nPCAP_FILTER udp port {SPA_PORT};\n\
                 ENABLE_DIGEST_PERSISTENCE N;\nFWKNOP_RUN_DIR {};\n",
                testbed.server_if,
                path("run").display()
            ),
        )
        .unwrap();
        std::fs::write(
            path("access.conf"),
            format!(
                "SOURCE ANY\nOPEN_PORTS tcp/{FWKNOP}\nKEY_BASE64 {}\nHMAC_KEY_BASE64 {}\nFW_ACCESS_TIMEOUT 30\n",
                keys.0, keys.1
            ),
        )
        .unwrap();
        for file in ["fwknopd.conf", "access.conf"] {
            std::fs::set_permissions(
                path(file),
                std::os::unix::fs::PermissionsExt::from_mode(0o600),
            )
            .unwrap();
        }
        let fwknopd = Peer(
            testbed
                .server
                .command("fwknopd")
                .arg("-f")
                .arg("-c")
                .arg(path("fwknopd.conf"))
                .arg("-a")
                .arg(path("access.conf"))
                .arg("-d")
                .arg(path("run/digest.cache"))
                .arg("-p")
                .arg(path("run/fwknopd.pid"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // fwknopd's closed port answers RST from iptables itself: an accept
        // in one base chain does not spare a packet another chain rejects,
        // so the reject must sit after fwknopd's jump in the same chain.
        sh(testbed.server.command("iptables").args([
            "-A",
            "INPUT",
            "-p",
            "tcp",
            "--dport",
            &FWKNOP.to_string(),
            "-j",
            "REJECT",
            "--reject-with",
            "tcp-reset",
        ]));
        // Both sniff with libpcap; give them a moment to open it.
        std::thread::sleep(Duration::from_millis(1500));
        Peers {
            _classic: classic,
            _fwknopd: fwknopd,
            dir,
            fwknop_keys: keys,
        }
    }

    /// SPA packets from Debian's fwknop client, one per trial (each is
    /// accepted once: fwknopd keeps a digest of every one it saw).
    fn spa_packets(&self, client: IpAddr, server: IpAddr, n: usize) -> Vec<Vec<u8>> {
        let file = self.dir.path().join("spa.pkt");
        (0..n)
            .map(|_| {
                sh(Command::new("fwknop")
                    .args(["-A", &format!("tcp/{FWKNOP}"), "-a", &client.to_string()])
                    .args([
                        "-D",
                        &server.to_string(),
                        "--use-hmac",
                        "-T",
                        "--no-rc-file",
                    ])
                    .args([
                        "--no-save-args",
                        "--key-base64-rijndael",
                        &self.fwknop_keys.0,
                    ])
                    .args(["--key-base64-hmac", &self.fwknop_keys.1, "-B"])
                    .arg(&file)
                    .env("HOME", self.dir.path()));
                std::fs::read_to_string(&file)
                    .unwrap()
                    .trim()
                    .as_bytes()
                    .to_vec()
            })
            .collect()
    }
}

/// One knock-to-open trial of `variant`, for at most `timeout`; `None` if
/// nothing opened in time. A client that learns nothing (all but the
/// one-time door's) resends its sequence every `client::ATTEMPT_WAIT`, as
/// the one-time client starts a fresh one. Afterwards the access is taken
/// back, so the next trial starts closed.
fn trial(
    variant: Variant,
    ctx: &Context,
    spa: Option<&[u8]>,
    timeout: Duration,
) -> Option<Duration> {
    let server = ctx.server;
    // Our doors are knocked from many addresses in turn (the default rate
    // limit is per source); the peers', from the one their setup names.
    let client = match variant {
        Variant::OneTime | Variant::Static => ctx.next_source(),
        Variant::Classic | Variant::Fwknop => ctx.client,
    };
    let socket = UdpSocket::bind(SocketAddr::new(client, 0)).unwrap();
    let start = Instant::now();
    let deadline = start + timeout;
    let send_all = |ports: &[u16]| {
        for port in ports {
            socket.send_to(&[], SocketAddr::new(server, *port)).unwrap();
        }
    };
    // Sends with `send`, then polls for the port until the next resend.
    let poll = |send: &dyn Fn(), port: u16| loop {
        send();
        let attempt_end = (Instant::now() + client::ATTEMPT_WAIT).min(deadline);
        if connect_until(client, SocketAddr::new(server, port), attempt_end) {
            break true;
        }
        if Instant::now() >= deadline {
            break false;
        }
    };
    let opened = match variant {
        Variant::OneTime => {
            let target = bench_target(server, &ctx.keys[ctx.next_key()]);
            match client::knock_from(&socket, &target, Kind::Open, timeout) {
                Ok(answer) => {
                    let to = SocketAddr::new(server, answer.reply.port);
                    // TCP retries the SYN for as long as the client waits.
                    let wait = deadline
                        .saturating_duration_since(Instant::now())
                        .max(Duration::from_secs(1));
                    let outcome = probe::tcp_connect(Some(client), to, wait).0;
                    if outcome != probe::Outcome::Answered {
                        eprintln!("one-time trial: connect to {to}: {outcome:?}");
                    }
                    outcome == probe::Outcome::Answered
                }
                Err(e) => {
                    eprintln!("one-time trial: {e}");
                    false
                }
            }
        }
        Variant::Static => poll(&|| send_all(&OURS_STATIC_SEQUENCE), OURS_STATIC),
        Variant::Classic => poll(&|| send_all(&CLASSIC_SEQUENCE), CLASSIC),
        Variant::Fwknop => {
            let spa = spa.expect("an SPA packet");
            // fwknopd refuses a replayed SPA packet: it is sent once.
            socket
                .send_to(spa, SocketAddr::new(server, SPA_PORT))
                .unwrap();
            connect_until(client, SocketAddr::new(server, FWKNOP), deadline)
        }
    };
    let took = start.elapsed();
    if !opened && variant != Variant::OneTime {
        eprintln!("{} trial: nothing opened in {timeout:?}", variant.name());
    }
    (ctx.close)(variant, client);
    opened.then_some(took)
}

/// How many trials of `variant` opened, and their percentiles in µs (NaN
/// when none did).
fn outcomes(
    samples: &[(Variant, Option<Duration>)],
    variant: Variant,
) -> (usize, impl Fn(f64) -> f64) {
    let mut took: Vec<Duration> = samples
        .iter()
        .filter(|(v, _)| *v == variant)
        .filter_map(|(_, d)| *d)
        .collect();
    took.sort();
    let ok = took.len();
    let us = move |p| {
        if took.is_empty() {
            f64::NAN
        } else {
            percentile(&took, p).as_secs_f64() * 1e6
        }
    };
    (ok, us)
}

/// What the trials share.
struct Context<'a> {
    server: IpAddr,
    client: IpAddr,
    /// Where our doors are knocked from, in turn.
    sources: Vec<IpAddr>,
    keys: &'a [knockd::proto::DeviceKey],
    key_index: std::sync::atomic::AtomicUsize,
    source_index: std::sync::atomic::AtomicUsize,
    close: &'a (dyn Fn(Variant, IpAddr) + Sync),
}

impl Context<'_> {
    /// A device per trial in turn: each completes at most 16 sequences per
    /// time step.
    fn next_key(&self) -> usize {
        let i = self
            .key_index
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        i % self.keys.len()
    }

    /// The next source address for our doors' clients.
    fn next_source(&self) -> IpAddr {
        let i = self
            .source_index
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.sources[i % self.sources.len()]
    }
}

/// One row of results.
pub struct Row {
    pub measurement: &'static str,
    pub variant: String,
    pub n: usize,
    pub ok: usize,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
}

impl Row {
    fn json(&self) -> serde_json::Value {
        serde_json::json!({
            "measurement": self.measurement,
            "variant": self.variant,
            "n": self.n,
            "ok": self.ok,
            "p50_us": self.p50_us,
            "p90_us": self.p90_us,
            "p99_us": self.p99_us,
        })
    }
}

pub fn run() {
    install_peers();
    println!(
        "== peers: knock-to-open, {} trials per variant, interleaved",
        trials()
    );
    let testbed = Testbed::new();
    // The flood generator's frames are addressed to these.
    crate::drop::fixed_macs(&testbed);
    let (server, client, _) = addrs::family(false);
    testbed.server.run(|| {
        for port in [SSH, OURS_STATIC, CLASSIC, FWKNOP] {
            probe::echo_server(SocketAddr::new(server, port));
        }
    });
    let static_door = format!(
        ", legacy: {{ service_port: {OURS_STATIC}, mode: static, seq_timeout_secs: 5, sequence: [{}] }}",
        OURS_STATIC_SEQUENCE
            .iter()
            .map(|p| format!("\"{p}:udp\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (daemon, keys, _keydir) = bench_daemon_with(&testbed, &static_door);
    let peers = Peers::start(&testbed);
    let spa = peers.spa_packets(client, server, trials());
    let control = daemon.control_socket();
    let server_ns = &testbed.server;
    let close = |variant: Variant, source: IpAddr| match variant {
        // Our grants end by revoke. A trial that failed (a knock lost to
        // the flood) left nothing to revoke: that answer is fine too, the
        // trial is counted failed already.
        Variant::OneTime | Variant::Static => {
            let (_, reply) = crate::control_raw(
                &control,
                serde_json::json!({"command": "revoke", "target": source.to_string()}),
            );
            let nothing = reply["error"]
                .as_str()
                .is_some_and(|e| e.contains("nothing revoked"));
            assert!(reply["ok"] == true || nothing, "{reply}");
        }
        Variant::Classic => sh(server_ns
            .command("nft")
            .args(["flush", "set", "inet", "kbench", "allowed"])),
        Variant::Fwknop => sh(server_ns.command("iptables").args(["-F", "FWKNOP_INPUT"])),
    };
    let ctx = Context {
        server,
        client,
        sources: crate::client_sources(&testbed, 64),
        keys: &keys,
        key_index: std::sync::atomic::AtomicUsize::new(0),
        source_index: std::sync::atomic::AtomicUsize::new(0),
        close: &close,
    };
    let mut samples: Vec<(Variant, Option<Duration>)> = Vec::new();
    let mut order = Variant::ALL;
    testbed.client.run(|| {
        let mut rng = rand::rng();
        for round in 0..trials() {
            order.shuffle(&mut rng);
            for variant in order {
                let spa = (variant == Variant::Fwknop).then(|| spa[round].as_slice());
                samples.push((variant, trial(variant, &ctx, spa, TRIAL_TIMEOUT)));
            }
        }
    });
    let rows: Vec<Row> = Variant::ALL
        .iter()
        .map(|&variant| {
            let (ok, us) = outcomes(&samples, variant);
            Row {
                measurement: "knock_to_open",
                variant: variant.key().to_owned(),
                n: trials(),
                ok,
                p50_us: us(0.5),
                p90_us: us(0.9),
                p99_us: us(0.99),
            }
        })
        .collect();
    let idle = |variant: Variant| {
        rows.iter()
            .find(|r| r.variant == variant.key())
            .map_or((f64::NAN, f64::NAN), |r| (r.p50_us, r.p99_us))
    };
    let floods = flood::run(&testbed, &daemon, peers.classic_pid(), &ctx);
    let flood_md = flood::table(&floods, &idle);
    println!("\n{flood_md}");
    drop(peers);
    drop(daemon);
    drop(testbed);
    let drops = crate::drop::run();
    let drop_md = crate::drop::table(&drops);
    println!("\n{drop_md}");
    let figures = crate::footprint::run();
    let footprint_md = crate::footprint::table(&figures);
    println!("\n{footprint_md}");
    let mut json: Vec<serde_json::Value> = rows.iter().map(Row::json).collect();
    json.extend(flood::json(&floods));
    json.extend(crate::drop::json(&drops));
    json.extend(crate::footprint::json(&figures));
    report(
        &rows,
        &json,
        &[
            ("Knock under flood", flood_md),
            ("Drop cost", drop_md),
            ("Footprint", footprint_md),
        ],
    );
}

/// Prints the knock-to-open table and writes peers.json (`json`: every
/// measurement), peers.md (the knock-to-open table, then `sections`) and
/// peers.svg under target/bench.
fn report(rows: &[Row], json: &[serde_json::Value], sections: &[(&str, String)]) {
    let classic = rows
        .iter()
        .find(|r| r.variant == Variant::Classic.key())
        .map_or(f64::NAN, |r| r.p50_us);
    let name = |key: &str| {
        Variant::ALL
            .iter()
            .find(|v| v.key() == key)
            .map_or(key.to_owned(), |v| v.name().to_owned())
    };
    let mut md = String::new();
    md.push_str("| knock → open | ok | p50 | p90 | p99 | classic knockd p50 ÷ this p50 |\n");
    md.push_str("|---|---|---|---|---|---|\n");
    for r in rows {
        let _ = writeln!(
            md,
            "| {} | {}/{} | {:.2} ms | {:.2} ms | {:.2} ms | {:.2}× |",
            name(&r.variant),
            r.ok,
            r.n,
            r.p50_us / 1e3,
            r.p90_us / 1e3,
            r.p99_us / 1e3,
            classic / r.p50_us
        );
    }
    println!("\n{md}");
    for (title, table) in sections {
        let _ = write!(md, "\n### {title}\n\n{table}");
    }
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("peers.json"),
        serde_json::to_string_pretty(json).unwrap(),
    )
    .unwrap();
    std::fs::write(dir.join("peers.md"), &md).unwrap();
    std::fs::write(dir.join("peers.svg"), svg(rows, &name)).unwrap();
    println!("wrote {}/peers.{{json,md,svg}}", dir.display());
}

/// A horizontal bar chart of p50 (bar) and p99 (tick), on a log scale.
fn svg(rows: &[Row], name: &dyn Fn(&str) -> String) -> String {
    let (width, left, bar_h, gap) = (720.0, 190.0, 22.0, 14.0);
    let max = rows
        .iter()
        .map(|r| r.p99_us)
        .filter(|v| v.is_finite())
        .fold(1.0f64, f64::max);
    let (lo, hi) = (100f64.log10(), (max * 2.0).log10());
    // Room on the right for the label after the p99 tick.
    let x = |us: f64| left + (us.max(100.0).log10() - lo) / (hi - lo) * (width - left - 110.0);
    let height = rows.len() as f64 * (bar_h + gap) + 60.0;
    let mut out = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <text x=\"{left}\" y=\"16\">knock → open, p50 (bar) and p99 (tick), log scale</text>\n"
    );
    for (i, r) in rows.iter().enumerate() {
        let y = 30.0 + i as f64 * (bar_h + gap);
        let _ = writeln!(
            out,
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}</text>\
             <rect x=\"{left}\" y=\"{y}\" width=\"{:.1}\" height=\"{bar_h}\" fill=\"#4a7fb5\"/>\
             <line x1=\"{p99:.1}\" x2=\"{p99:.1}\" y1=\"{y}\" y2=\"{}\" stroke=\"#222\" stroke-width=\"2\"/>\
             <text x=\"{:.1}\" y=\"{}\">{:.2} ms</text>",
            left - 8.0,
            y + 15.0,
            name(&r.variant),
            (x(r.p50_us) - left).max(1.0),
            y + bar_h,
            x(r.p99_us) + 6.0,
            y + 15.0,
            r.p50_us / 1e3,
            p99 = x(r.p99_us),
        );
    }
    for us in [100.0f64, 1_000.0, 10_000.0, 100_000.0, 1_000_000.0] {
        if us.log10() <= hi {
            let _ = writeln!(
                out,
                "<text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\" fill=\"#666\">{}</text>",
                x(us),
                height - 10.0,
                if us >= 1_000.0 {
                    format!("{} ms", us / 1e3)
                } else {
                    format!("{us} µs")
                }
            );
        }
    }
    out.push_str("</svg>\n");
    out
}
