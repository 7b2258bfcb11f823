//! knockctl: knock on a door from a client, and manage devices on a server.
//!
//! It needs no root and links no eBPF or nftables code, so the client part
//! builds anywhere (`cargo build -p knockd --no-default-features --bin
//! knockctl`).
//!
//! Exit codes scripts can rely on: 0 done; 1 usage, configuration or I/O
//! error; 2 no answer before the timeout; 3 an answer that did not verify;
//! 4 a heartbeat for which the server holds no grant.

use std::{
    io::{Read as _, Write as _},
    net::{IpAddr, TcpStream, ToSocketAddrs as _},
    path::{Path, PathBuf},
    process::ExitCode,
    time::Duration,
};

use anyhow::{Context as _, anyhow, bail};
use clap::{CommandFactory as _, Parser, Subcommand};
use knockd::{
    client::{self, Answer, Target},
    config::PortRange,
    control::{
        Command as Request,
        wire::{
            ClusterDevice, ClusterStatus, DeviceChanged, GrantPage, GrantView, Reloaded, Secret,
            StatusReport,
        },
    },
    devices::DeviceFile,
    profile::{Profile, Profiles},
    proto::{DeviceKey, Kind, Status},
};

#[derive(Parser)]
#[command(
    name = "knockctl",
    version,
    about = "Knock on knockd doors; manage devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Knock on a door and report the port it opened (or act on it).
    Knock(KnockArgs),
    /// Manage the devices of a knockd server (run it there).
    #[command(subcommand)]
    Device(DeviceCommand),
    /// Manage this client's profiles.
    #[command(subcommand)]
    Profile(ProfileCommand),
    /// Turn a classic knockd configuration (knockd.conf) into static doors:
    /// prints knockd.yaml, and on stderr one report per section (the door
    /// it became, an action door for a command that is not a firewall
    /// rule, or why it was skipped), naming its line.
    Import {
        /// The knockd.conf to read.
        #[arg(default_value = "/etc/knockd.conf")]
        file: PathBuf,
        /// Write the configuration here (0600) instead of to stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Show the running daemon: interfaces, counters and rates, grants and
    /// leases, sequences in progress, configuration, recent errors.
    Status {
        #[command(flatten)]
        socket: SocketArg,
        /// Print the daemon's JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Fleet mode: every node's health, watch lag and grants, from
        /// their heartbeats in etcd.
        #[arg(long)]
        cluster: bool,
    },
    /// List the live grants.
    Grants {
        #[command(flatten)]
        socket: SocketArg,
        #[arg(long)]
        json: bool,
    },
    /// End every grant of an address or a device now, and cut the
    /// connections they let in. In fleet mode every node does; exit 4 when
    /// etcd did not take the revoke: it took effect on this node only,
    /// which keeps it and publishes it when etcd is back.
    Revoke {
        /// An IP address or a device id.
        target: String,
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Make the daemon read its configuration again (a bad one is refused
    /// and the running one stays).
    Reload {
        #[command(flatten)]
        socket: SocketArg,
    },
    /// Validate a configuration file, its devices and key files.
    CheckConfig {
        #[arg(default_value = "/etc/knockd/knockd.yaml")]
        config: PathBuf,
    },
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), for packaging.
    #[command(hide = true)]
    Man,
}

#[derive(clap::Args)]
struct KnockArgs {
    /// A profile name, or the server's host (with DOOR, or its only profile).
    target: String,
    /// The door, when TARGET is a host with several profiles.
    door: Option<String>,
    /// The profiles file.
    #[arg(long, env = "KNOCKCTL_PROFILES", default_value_os_t = default_profiles())]
    profiles: PathBuf,
    /// Give up after this many seconds (fresh knocks are sent meanwhile).
    #[arg(long, default_value_t = 10)]
    timeout: u64,
    /// Ask for the grant for this address (your public one, behind NAT).
    #[arg(long)]
    bind_ip: Option<IpAddr>,
    /// Print the opened port (the default).
    #[arg(long, group = "mode")]
    print_port: bool,
    /// Run this command once the door is open; {port} and {host} are
    /// replaced (example: 'ssh -p {port} {host}'). With --lease: start it
    /// again, in the background, on each new port.
    #[arg(long, value_name = "COMMAND", conflicts_with_all = ["print_port", "proxy", "close"])]
    exec: Option<String>,
    /// Connect to the opened port and pipe stdin and stdout through it, for
    /// ssh: -o ProxyCommand='knockctl knock --proxy %h ssh'.
    #[arg(long, group = "mode")]
    proxy: bool,
    /// Keep the grant alive with heartbeats, printing the port whenever it
    /// changes (rotation), or starting --exec's command for it, until
    /// interrupted.
    #[arg(long, conflicts_with_all = ["print_port", "proxy", "close"])]
    lease: bool,
    /// Seconds between heartbeats with --lease.
    #[arg(long, default_value_t = 20)]
    heartbeat_every: u64,
    /// Close the door now.
    #[arg(long, group = "mode")]
    close: bool,
}

#[derive(clap::Args)]
struct SocketArg {
    /// The daemon's control socket.
    #[arg(long, default_value = "/run/knockd/control.sock")]
    socket: PathBuf,
}

#[derive(Subcommand)]
enum DeviceCommand {
    /// Create a device: a fresh 256-bit key (0600) and its device file, and
    /// print the client's profile.
    Add {
        /// The device id.
        name: String,
        /// Groups the device belongs to (repeatable).
        #[arg(long = "group")]
        groups: Vec<String>,
        /// The server's configuration: the door's knock settings go into
        /// the profile from it, and its devices_dir is the default.
        #[arg(long, default_value = "/etc/knockd/knockd.yaml")]
        config: PathBuf,
        /// The server's devices directory (default: the configuration's
        /// devices_dir, else /etc/knockd/devices.d).
        #[arg(long)]
        devices_dir: Option<PathBuf>,
        /// The host clients reach the server at, for the printed profile.
        #[arg(long, default_value = "SERVER")]
        host: String,
        /// The door the profile opens (in fleet mode, the door's device
        /// list in etcd gets the device too).
        #[arg(long, default_value = "ssh")]
        door: String,
        /// Fleet mode: the daemon's control socket (default: the
        /// configuration's control_socket).
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Write the client's profile (it holds the key) to this new file,
        /// mode 0600, instead of to standard output. An existing file is
        /// never overwritten.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// List the devices in the devices directory (fleet mode: in etcd).
    List {
        /// The server's devices directory (default: the configuration's
        /// devices_dir, else /etc/knockd/devices.d).
        #[arg(long)]
        devices_dir: Option<PathBuf>,
        /// The server's configuration: its devices_dir is the default, and
        /// with a cluster: section the devices are etcd's.
        #[arg(long, default_value = "/etc/knockd/knockd.yaml")]
        config: PathBuf,
    },
    /// Remove a device (its key and device file; fleet mode: from etcd,
    /// and so from every node).
    Remove {
        name: String,
        /// The server's devices directory (default: the configuration's
        /// devices_dir, else /etc/knockd/devices.d).
        #[arg(long)]
        devices_dir: Option<PathBuf>,
        /// The server's configuration: its devices_dir is the default, and
        /// with a cluster: section the device is removed from etcd.
        #[arg(long, default_value = "/etc/knockd/knockd.yaml")]
        config: PathBuf,
    },
    /// Fleet mode: vouch for a device record in etcd as it stands, signing
    /// every field under the cluster key. For records an older knockd
    /// wrote (`device list` marks them): check their groups and doors
    /// first. Only a record whose key a node of this fleet sealed for this
    /// id can be signed.
    Sign {
        name: String,
        /// The server's configuration (its cluster: section).
        #[arg(long, default_value = "/etc/knockd/knockd.yaml")]
        config: PathBuf,
    },
}

#[derive(Subcommand)]
enum ProfileCommand {
    /// Merge profiles (what `knockctl device add` printed) into the
    /// profiles file, creating it 0600.
    Import {
        /// Files of profiles, or - for standard input.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// The profiles file.
        #[arg(long, env = "KNOCKCTL_PROFILES", default_value_os_t = default_profiles())]
        profiles: PathBuf,
        /// Replace a profile of the same name with other settings (else
        /// that is refused).
        #[arg(long)]
        replace: bool,
    },
}

/// `$XDG_CONFIG_HOME/knockctl/profiles.yaml` (`~/.config/…`) on Unix;
/// `%APPDATA%\knockctl\profiles.yaml` on Windows, the user's roaming
/// profile, whose ACL keeps other users out (see knockd::platform).
fn default_profiles() -> PathBuf {
    let base = if cfg!(windows) {
        std::env::var_os("APPDATA").map(PathBuf::from)
    } else {
        std::env::var_os("XDG_CONFIG_HOME")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))
    };
    base.unwrap_or_else(|| PathBuf::from("."))
        .join("knockctl")
        .join("profiles.yaml")
}

/// An error with the exit code it maps to.
struct Failure(u8, anyhow::Error);

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(e: E) -> Self {
        Failure(1, e.into())
    }
}

/// Asks the daemon for `request` and prints its answer: as JSON, or
/// through `table` for people.
fn show<T: serde::de::DeserializeOwned + serde::Serialize>(
    socket: &SocketArg,
    request: Request,
    json: bool,
    table: fn(&T),
) -> Result<(), Failure> {
    let data: T = control(&socket.socket, &request)?;
    if json {
        println!("{:#}", serde_json::to_value(&data)?);
    } else {
        table(&data);
    }
    Ok(())
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so a closed stdout (`knockctl grants | head`)
    // turns every later println! into a panic. A command-line tool should
    // end quietly instead, as cat and ls do.
    // SAFETY: restoring a signal's default disposition at start-up, before
    // any other thread exists.
    #[cfg(unix)]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL)
    };
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Knock(args) => knock(&args),
        Command::Device(command) => device(command).map_err(Failure::from),
        Command::Profile(command) => profile(command).map_err(Failure::from),
        Command::Import { file, output } => {
            import_classic(&file, output.as_deref()).map_err(Failure::from)
        }
        Command::Status {
            socket,
            json,
            cluster: true,
        } => show(&socket, Request::ClusterStatus, json, print_cluster),
        Command::Status { socket, json, .. } => show(&socket, Request::Status, json, print_status),
        Command::Grants { socket, json } => list_grants(&socket, json),
        Command::Revoke { target, socket } => {
            control::<RevokeReply>(&socket.socket, &Request::Revoke { target })
                .map_err(Failure::from)
                .and_then(|r| {
                    println!(
                        "revoked {} grant(s), cut {} connection(s)",
                        r.revoked, r.connections_cut
                    );
                    if let Some(key) = r.published {
                        println!(
                            "fleet: published as {key}; every node ends its grants and cuts its connections ({} cluster grant(s) withdrawn)",
                            r.fleet_grants.unwrap_or(0)
                        );
                    }
                    match r.pending {
                        // Not what was asked: the fleet still admits the
                        // target. Exit 4 says so to scripts.
                        Some(why) => Err(Failure(
                            4,
                            anyhow!(
                                "revoked here only: etcd did not take the revoke ({why}); this node keeps it and publishes it when etcd is back, and until then other nodes still admit the target"
                            ),
                        )),
                        None => Ok(()),
                    }
                })
        }
        Command::Reload { socket } => control::<Reloaded>(&socket.socket, &Request::Reload)
            .map(|r| println!("reloaded {}", r.reloaded))
            .map_err(Failure::from),
        Command::CheckConfig { config } => check_config(&config).map_err(Failure::from),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "knockctl",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Man => clap_mangen::Man::new(Cli::command())
            .render(&mut std::io::stdout())
            .map_err(Failure::from),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure(code, e)) => {
            eprintln!("knockctl: {e:#}");
            ExitCode::from(code)
        }
    }
}

/// Sends one request to the control socket and reads the reply as `T`;
/// the daemon's error is ours.
#[cfg(not(unix))]
fn control<T: serde::de::DeserializeOwned>(path: &Path, _: &Request) -> anyhow::Result<T> {
    bail!(
        "{} is knockd's control socket, a Unix socket on the server: run this command there (over ssh), not on this system",
        path.display()
    )
}

/// See the Unix [`control`].
#[cfg(unix)]
fn control<T: serde::de::DeserializeOwned>(path: &Path, request: &Request) -> anyhow::Result<T> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "connecting to {} (is knockd running, and are you root?)",
            path.display()
        )
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    writeln!(stream, "{}", request.line())?;
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(&stream), &mut line)?;
    let response: knockd::control::Response = serde_json::from_str(&line).with_context(|| {
        format!(
            "a reply that is not the control protocol: {:?}",
            line.chars().take(200).collect::<String>()
        )
    })?;
    response.into_data().map_err(|e| anyhow!("knockd: {e}"))
}

/// The server configuration at `path`, read when the file exists (a
/// device may be managed away from the server, with --devices-dir alone).
fn server_config(path: &Path) -> anyhow::Result<Option<knockd::config::Config>> {
    if !path.exists() {
        return Ok(None);
    }
    Ok(Some(knockd::config::Config::load(path)?))
}

/// The control socket of a server in fleet mode.
fn fleet_socket(server: Option<&knockd::config::Config>) -> Option<PathBuf> {
    server
        .filter(|c| c.cluster.is_some())
        .map(|c| c.control_socket.clone())
}

/// The devices directory every `device` subcommand uses, so a device added
/// with a --config can be listed and removed with the same --config:
/// --devices-dir, else the configuration's devices_dir, else the default.
fn devices_dir_of(explicit: Option<PathBuf>, server: Option<&knockd::config::Config>) -> PathBuf {
    explicit
        .or_else(|| server.and_then(|c| c.devices_dir.clone()))
        .unwrap_or_else(|| PathBuf::from("/etc/knockd/devices.d"))
}

/// Writes a client profile, which holds a device key, where only its owner
/// can read it: a new file created 0600 (`output`), or standard output.
/// Standard output redirected to a file (`> laptop.yaml`) gets the shell's
/// umask, usually 0644: that file is made 0600 and the operator told.
fn write_profile(profiles: &Profiles, output: Option<&Path>) -> anyhow::Result<()> {
    let yaml = profiles.to_yaml();
    if let Some(path) = output {
        let mut out = knockd::platform::create_private_file(path).with_context(|| {
            format!(
                "creating {} (an existing file is never overwritten)",
                path.display()
            )
        })?;
        out.write_all(yaml.as_bytes())?;
        eprintln!("wrote the profile to {} (0600)", path.display());
        return Ok(());
    }
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(yaml.as_bytes())?;
    stdout.flush()?;
    if let Some(note) = knockd::profile::protect_stdout() {
        eprintln!("knockctl: warning: {note}");
    }
    Ok(())
}

/// A `revoke` reply, alone or in fleet mode.
#[derive(serde::Deserialize)]
struct RevokeReply {
    revoked: usize,
    connections_cut: usize,
    published: Option<String>,
    fleet_grants: Option<usize>,
    #[serde(default)]
    pending: Option<String>,
}

/// `status`'s cluster section: this node's view of etcd.
fn print_fleet_view(c: &knockd::control::wire::FleetView) {
    println!("\ncluster: node {}", c.name);
    if c.synced {
        println!(
            "  synced: yes, at etcd revision {}{}",
            c.revision,
            c.watch_lag_ms
                .map_or(String::new(), |ms| format!(", watch lag {ms} ms"))
        );
    } else {
        println!("  synced: NO: cluster doors refuse knocks (fail closed) until it is");
    }
    if let Some(e) = &c.etcd_error {
        println!("  last etcd error: {e}");
    }
    println!(
        "  devices from etcd: {}; knocks waiting for etcd: {}; refused for want of etcd: {}",
        c.devices_from_etcd, c.waiting_for_etcd, c.cluster_unavailable
    );
    if c.revokes_pending > 0 {
        println!(
            "  revokes made here that etcd does not have yet: {} (other nodes still admit their targets)",
            c.revokes_pending
        );
    }
    println!("  the whole fleet: knockctl status --cluster");
}

fn print_cluster(s: &ClusterStatus) {
    println!("fleet at etcd revision {} (asked {})", s.revision, s.asked);
    println!(
        "{:<16} {:<6} {:>8} {:>7} {:>10} {:>8} {:>7}",
        "node", "health", "report", "synced", "revision", "lag", "grants"
    );
    for node in &s.nodes {
        let r = node.report.as_ref();
        println!(
            "{:<16} {:<6} {:>8} {:>7} {:>10} {:>8} {:>7}",
            node.name,
            node.health,
            node.report_age_ms
                .map_or("-".into(), |a| format!("{:.1}s", a as f64 / 1000.0)),
            r.map_or("-".into(), |r| r.synced.to_string()),
            r.map_or("-".into(), |r| r.revision.to_string()),
            r.and_then(|r| r.watch_lag_ms)
                .map_or("-".into(), |l| format!("{l}ms")),
            r.map_or("-".into(), |r| r.grants_total.to_string()),
        );
    }
    for node in &s.nodes {
        for g in node.report.iter().flat_map(|r| &r.grants) {
            println!(
                "  {:<14} {:<10} {:<12} {:<28} port {:>5}  {:>5}s left{}",
                node.name,
                g.door,
                g.device.as_deref().unwrap_or("-"),
                g.source,
                g.port,
                g.secs_left,
                if g.lease { "  lease" } else { "" }
            );
        }
    }
}

fn check_config(path: &Path) -> anyhow::Result<()> {
    println!("{}", knockd::check::check_config(path)?);
    Ok(())
}

/// `knockctl grants`: the grants page by page (`grants_page`), each page
/// printed as it comes, so a million grants are never one reply nor held
/// here at once. `--json` prints one JSON array, a grant a line. A daemon
/// from before `grants_page` is asked for all of them at once.
fn list_grants(socket: &SocketArg, json: bool) -> Result<(), Failure> {
    use std::io::Write as _;
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    let mut after = None;
    let mut first = true;
    if json {
        writeln!(out, "[")?;
    } else {
        print_grants_header(&mut out)?;
    }
    loop {
        let request = Request::GrantsPage {
            after: after.take(),
            limit: None,
        };
        let page: GrantPage = match control(&socket.socket, &request) {
            Ok(page) => page,
            Err(e) if first && format!("{e:#}").contains("grants_page") => {
                let grants: Vec<GrantView> = control(&socket.socket, &Request::Grants)?;
                GrantPage {
                    total: grants.len() as u64,
                    grants,
                    next: None,
                }
            }
            Err(e) => return Err(e.into()),
        };
        for g in &page.grants {
            if json {
                let comma = if first { "" } else { "," };
                writeln!(out, "{comma}{}", serde_json::to_string(g)?)?;
            } else {
                print_grant_row(&mut out, g)?;
            }
            first = false;
        }
        first = false;
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    if json {
        writeln!(out, "]")?;
    }
    out.flush()?;
    Ok(())
}

fn print_grants_header(out: &mut impl std::io::Write) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<12} {:<12} {:<28} {:>6} {:>6} {:>9} {:>8}",
        "door", "device", "source", "port", "lease", "time left", "rotated"
    )
}

fn print_grant_row(out: &mut impl std::io::Write, g: &GrantView) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<12} {:<12} {:<28} {:>6} {:>6} {:>8}s {:>8}",
        g.door,
        g.device.as_deref().unwrap_or("-"),
        g.source.to_string(),
        // An action door's grant opens no port.
        if g.port == 0 {
            "-".to_owned()
        } else {
            g.port.to_string()
        },
        if g.lease { "yes" } else { "no" },
        g.secs_left,
        g.rotations
    )
}

fn print_grants(grants: &[GrantView]) {
    let mut out = std::io::stdout().lock();
    // A closed stdout ends knockctl (SIGPIPE); nothing else fails here.
    let _ = print_grants_header(&mut out);
    for g in grants {
        let _ = print_grant_row(&mut out, g);
    }
}

fn print_status(s: &StatusReport) {
    println!("knockd {}", s.version);
    let loaded = std::time::UNIX_EPOCH + Duration::from_millis(s.config.loaded_at_ms);
    let age = std::time::SystemTime::now()
        .duration_since(loaded)
        .map(|d| Duration::from_secs(d.as_secs()))
        .unwrap_or_default();
    println!(
        "config: {}, loaded {} ({} ago), doors: {:?}",
        s.config
            .path
            .as_deref()
            .map_or("-".into(), |p| p.display().to_string()),
        humantime::format_rfc3339_seconds(loaded),
        humantime::format_duration(age),
        s.config.doors
    );
    for i in &s.interfaces {
        match &i.error {
            Some(why) => println!(
                "interface {}: {} (no XDP: {why}; nftables alone guards it)",
                i.interface, i.mode
            ),
            None => println!("interface {}: XDP {}", i.interface, i.mode),
        }
    }
    println!("\n{:<20} {:>12} {:>12}", "counter", "packets", "per second");
    for (name, value) in s.counters.iter().flatten() {
        let rate = s
            .rates_per_sec
            .as_ref()
            .and_then(|r| r.get(name))
            .map_or("-".into(), |r| format!("{r:.1}"));
        println!("{name:<20} {value:>12} {rate:>12}");
    }
    println!(
        "\ndecisions: {}",
        serde_json::to_string(&s.decisions).unwrap_or_default()
    );
    for hint in &s.hints {
        println!("\nhint: {hint}");
    }
    if s.grants_total > s.grants.len() as u64 {
        println!(
            "\ngrants: {} live (max_grants {}), the first {} here; `knockctl grants` lists them all:",
            s.grants_total,
            s.max_grants,
            s.grants.len()
        );
    } else {
        println!("\ngrants:");
    }
    print_grants(&s.grants);
    println!("\nsessions (connections grants let in):");
    println!(
        "{:<12} {:<46} {:>6} {:>9} {:>10}",
        "door", "client", "port", "age", "cap in"
    );
    for session in &s.sessions {
        println!(
            "{:<12} {:<46} {:>6} {:>8}s {:>10}{}",
            session.door,
            session.client.to_string(),
            session.granted_port,
            session.age_secs,
            session
                .secs_left
                .map_or("no cap".to_owned(), |left| format!("{left}s")),
            if session.stamped {
                ""
            } else {
                " (age since first seen)"
            }
        );
    }
    let seq = &s.sequences_in_progress;
    println!(
        "\nsequences in progress: {} one-time (partial), {} static",
        seq.one_time_pending,
        seq.static_doors.len()
    );
    for p in &seq.static_doors {
        println!(
            "  {} on {}: {} of {} knocks",
            p.source, p.door, p.knocks, p.of
        );
    }
    if let Some(c) = &s.cluster {
        print_fleet_view(c);
    }
    println!(
        "\nrecent errors: {}",
        if s.recent_errors.is_empty() {
            "none".to_owned()
        } else {
            s.recent_errors.len().to_string()
        }
    );
    for e in &s.recent_errors {
        println!("  {} {}", e.at_ms, e.error);
    }
}

fn resolve(host: &str) -> anyhow::Result<IpAddr> {
    (host, 0)
        .to_socket_addrs()
        .with_context(|| format!("resolving {host}"))?
        .map(|a| a.ip())
        .next()
        .ok_or_else(|| anyhow!("{host} has no address"))
}

/// Knocks, mapping client errors to their exit codes, and warns about skew.
fn send(
    target: &Target,
    profile: &Profile,
    kind: Kind,
    timeout: Duration,
) -> Result<Answer, Failure> {
    let answer = client::knock(target, kind, timeout).map_err(|e| {
        let code = match e {
            client::Error::Timeout { .. } => 2,
            client::Error::BadReply(_) => 3,
            client::Error::Io(_) | client::Error::Door { .. } => 1,
        };
        let hint = match code {
            2 => " (are the key and the profile's knock_ports, knocks and step_secs the door's, is UDP to it allowed, and is this clock right? `knockctl status` on the server counts such knocks as knock_unmatched)",
            _ => "",
        };
        Failure(code, anyhow!("{e}{hint}"))
    })?;
    let step_ms = i64::from(profile.params().step_secs) * 1000;
    if answer.server_offset_ms.abs() > step_ms / 2 {
        eprintln!(
            "knockctl: warning: this clock is {:.1} s {} the server's; past the door's skew the server rejects knocks",
            answer.server_offset_ms.abs() as f64 / 1000.0,
            if answer.server_offset_ms > 0 {
                "behind"
            } else {
                "ahead of"
            }
        );
    }
    Ok(answer)
}

fn knock(args: &KnockArgs) -> Result<(), Failure> {
    let profiles = Profiles::load(&args.profiles)?;
    let (_, profile) = profiles.find(&args.profiles, &args.target, args.door.as_deref())?;
    let server = resolve(&profile.host)?;
    let target = Target {
        server,
        door: profile.door.clone(),
        params: profile.params(),
        key: profile
            .device_key()
            .map_err(|e| anyhow!("{}: {e}", args.profiles.display()))?,
        bind: args.bind_ip,
    };
    let timeout = Duration::from_secs(args.timeout.max(1));
    if args.close {
        let answer = send(&target, profile, Kind::Close, timeout)?;
        println!("closed ({:?})", answer.reply.status);
        return Ok(());
    }
    let answer = send(&target, profile, Kind::Open, timeout)?;
    if answer.reply.status != Status::Granted {
        return Err(Failure(
            1,
            anyhow!("the server answered {:?}", answer.reply.status),
        ));
    }
    let port = answer.reply.port;
    if args.lease {
        let on_port = OnPort {
            exec: args.exec.as_deref(),
            host: &profile.host,
            running: Vec::new(),
        };
        return lease(
            &target,
            profile,
            port,
            on_port,
            Duration::from_secs(args.heartbeat_every.max(1)),
            timeout,
        );
    }
    if let Some(command) = &args.exec {
        let command = fill(command, port, &profile.host);
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .status()
            .with_context(|| format!("running {command}"))?;
        std::process::exit(status.code().unwrap_or(1));
    }
    if args.proxy {
        return proxy(server, port).map_err(Failure::from);
    }
    println!("{port}");
    Ok(())
}

/// Pipes stdin and stdout through a connection to the opened port.
fn proxy(server: IpAddr, port: u16) -> anyhow::Result<()> {
    let stream = TcpStream::connect_timeout(&(server, port).into(), Duration::from_secs(10))
        .with_context(|| format!("connecting to {server} port {port}"))?;
    let mut upstream = stream.try_clone()?;
    let to_server = std::thread::spawn(move || {
        let _ = std::io::copy(&mut std::io::stdin().lock(), &mut upstream);
        let _ = upstream.shutdown(std::net::Shutdown::Write);
    });
    let mut downstream = stream;
    let mut stdout = std::io::stdout().lock();
    let mut buf = [0u8; 16 * 1024];
    loop {
        let n = downstream.read(&mut buf)?;
        if n == 0 {
            break;
        }
        stdout.write_all(&buf[..n])?;
        stdout.flush()?;
    }
    drop(to_server);
    Ok(())
}

/// `--exec`'s command with {port} and {host} filled in.
fn fill(command: &str, port: u16, host: &str) -> String {
    command
        .replace("{port}", &port.to_string())
        .replace("{host}", host)
}

/// What `--lease` does with each new port: prints it, or starts `--exec`'s
/// command for it. Earlier runs are not stopped: connections they made
/// survive the rotation.
struct OnPort<'a> {
    exec: Option<&'a str>,
    host: &'a str,
    running: Vec<std::process::Child>,
}

impl OnPort<'_> {
    fn new_port(&mut self, port: u16) -> Result<(), Failure> {
        // Reap the runs that ended, so none lingers as a zombie.
        self.running
            .retain_mut(|child| matches!(child.try_wait(), Ok(None)));
        let Some(command) = self.exec else {
            println!("{port}");
            return Ok(());
        };
        let command = fill(command, port, self.host);
        let child = std::process::Command::new("sh")
            .arg("-c")
            .arg(&command)
            .spawn()
            .with_context(|| format!("running {command}"))?;
        self.running.push(child);
        Ok(())
    }
}

/// Heartbeats until interrupted, handing each new port to `on_port`.
fn lease(
    target: &Target,
    profile: &Profile,
    mut port: u16,
    mut on_port: OnPort,
    every: Duration,
    timeout: Duration,
) -> Result<(), Failure> {
    on_port.new_port(port)?;
    loop {
        std::thread::sleep(every);
        let answer = send(target, profile, Kind::Heartbeat, timeout)?;
        match answer.reply.status {
            Status::Granted if answer.reply.port != port => {
                port = answer.reply.port;
                on_port.new_port(port)?;
            }
            Status::Granted => {}
            // The grant ended (lease idle, a restart, a close): open again.
            _ => {
                let reopened = send(target, profile, Kind::Open, timeout)?;
                if reopened.reply.status != Status::Granted {
                    return Err(Failure(
                        4,
                        anyhow!("the server holds no grant and granted none"),
                    ));
                }
                port = reopened.reply.port;
                on_port.new_port(port)?;
            }
        }
    }
}

/// The knock settings of one-time door `door` in the server configuration
/// at `path`, and its devices_dir. Without the file (a device made away
/// from the server), the defaults, with a warning.
fn door_settings(
    path: &Path,
    door: &str,
) -> anyhow::Result<(knockd::proto::DoorParams, Option<knockd::config::Config>)> {
    if !path.exists() {
        eprintln!(
            "knockctl: warning: no {}: the profile carries the default door settings \
             (knock_ports 7000-7999, knocks 3, step_secs 30); use --config",
            path.display()
        );
        return Ok((knockd::config::door_defaults::params(), None));
    }
    let config = knockd::config::Config::load(path)?;
    let Some(found) = config.doors.get(door) else {
        bail!(
            "{}: no door {door:?} (doors: {})",
            path.display(),
            config.doors.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    };
    let Some(one_time) = found.one_time() else {
        bail!(
            "{}: door {door:?} is static: it takes no device keys",
            path.display()
        );
    };
    Ok((one_time.params(), Some(config.clone())))
}

/// `knockctl import`: a knockd.conf to knockd.yaml. Every section's fate
/// is printed, whether or not any door survives; nothing is written when
/// none does.
fn import_classic(file: &Path, output: Option<&Path>) -> anyhow::Result<()> {
    let text =
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    // Service names in commands (`--dport ssh`); a host without the file
    // resolves none, and says so per section.
    let services = std::fs::read_to_string("/etc/services")
        .map(|text| knockd::classic::read_services(&text))
        .unwrap_or_default();
    let imported = knockd::classic::import(&text, &file.display().to_string(), &services)
        .with_context(|| format!("{}", file.display()))?;
    for note in imported.notes() {
        eprintln!("knockctl import: {note}");
    }
    if imported.doors == 0 {
        anyhow::bail!(
            "{}: nothing imported: no section could become a door (each one's reason is above)",
            file.display()
        );
    }
    // import checks each door as it adds it; this is the last word.
    knockd::config::Config::parse(&imported.yaml, Path::new("(imported)"))
        .context("the imported configuration does not validate (a bug: please report it)")?;
    match output {
        Some(path) => {
            let mut out = knockd::platform::create_private_file(path)
                .with_context(|| format!("creating {}", path.display()))?;
            out.write_all(imported.yaml.as_bytes())?;
            eprintln!(
                "knockctl import: wrote {} door(s) to {}; check it with `knockd check-config`",
                imported.doors,
                path.display()
            );
        }
        None => print!("{}", imported.yaml),
    }
    Ok(())
}

fn profile(command: ProfileCommand) -> anyhow::Result<()> {
    match command {
        ProfileCommand::Import {
            files,
            profiles: path,
            replace,
        } => {
            let mut mine = if path.exists() {
                Profiles::load(&path)?
            } else {
                Profiles::default()
            };
            for file in &files {
                let (text, name) = if file.as_os_str() == "-" {
                    (
                        std::io::read_to_string(std::io::stdin())?,
                        PathBuf::from("(stdin)"),
                    )
                } else {
                    (knockd::profile::read_private(file)?, file.clone())
                };
                let theirs = Profiles::parse(&text, &name)?;
                let merged = mine
                    .merge(theirs, replace)
                    .map_err(|e| anyhow!("{}: {e}", name.display()))?;
                for (what, names) in [
                    ("added", &merged.added),
                    ("replaced", &merged.replaced),
                    ("already there", &merged.unchanged),
                ] {
                    if !names.is_empty() {
                        eprintln!("{}: {what}: {}", name.display(), names.join(", "));
                    }
                }
            }
            mine.save(&path)?;
            eprintln!("wrote {} (0600)", path.display());
            Ok(())
        }
    }
}

fn device(command: DeviceCommand) -> anyhow::Result<()> {
    match command {
        DeviceCommand::Add {
            name,
            groups,
            config,
            devices_dir,
            host,
            door,
            socket,
            output,
        } => {
            let (params, server) = door_settings(&config, &door)?;
            let profile = |key: &DeviceKey| Profiles {
                profiles: [(
                    name.clone(),
                    Profile {
                        host: host.clone(),
                        door: door.clone(),
                        key: key.to_hex(),
                        knock_ports: Some(PortRange {
                            start: *params.knock_ports.start(),
                            end: *params.knock_ports.end(),
                        }),
                        knocks: Some(params.knocks),
                        step_secs: Some(params.step_secs),
                    },
                )]
                .into(),
            };
            if let Some(server) = server.as_ref().filter(|c| c.cluster.is_some()) {
                let key = DeviceKey::generate();
                let socket = socket.unwrap_or_else(|| server.control_socket.clone());
                let changed: DeviceChanged = control(
                    &socket,
                    &Request::DeviceAdd {
                        id: name.clone(),
                        groups,
                        doors: vec![door.clone()],
                        key: Secret(key.to_hex()),
                    },
                )?;
                eprintln!(
                    "added {name} to etcd (revision {}), its key sealed under the cluster key; every node admits it within a second. The client's profile (keep it secret, mode 0600):",
                    changed.revision
                );
                return write_profile(&profile(&key), output.as_deref());
            }
            let devices_dir = devices_dir_of(devices_dir, server.as_ref());
            let file = DeviceFile {
                id: name.clone(),
                key_file: PathBuf::from(format!("{name}.key")),
                groups,
            };
            let yaml_path = devices_dir.join(format!("{name}.yaml"));
            let key_path = devices_dir.join(&file.key_file);
            if !knockd::config::is_valid_name(&name, knockd::config::DEVICE_ID_MAX) {
                bail!("{name:?} is not a valid device id (1-64 of A-Z a-z 0-9 . _ -)");
            }
            if yaml_path.exists() || key_path.exists() {
                bail!("device {name} exists already in {}", devices_dir.display());
            }
            std::fs::create_dir_all(&devices_dir)
                .with_context(|| format!("creating {}", devices_dir.display()))?;
            let key = DeviceKey::generate();
            // Created 0600 from the start: the key is never readable by others.
            let mut out = knockd::platform::create_private_file(&key_path)
                .with_context(|| format!("creating {}", key_path.display()))?;
            writeln!(out, "{}", key.to_hex())?;
            std::fs::write(&yaml_path, serde_yaml::to_string(&file)?)
                .with_context(|| format!("writing {}", yaml_path.display()))?;
            eprintln!(
                "created {} and {}; reload knockd to admit it. The client's profile (keep it secret, mode 0600):",
                yaml_path.display(),
                key_path.display()
            );
            write_profile(&profile(&key), output.as_deref())
        }
        DeviceCommand::List {
            devices_dir,
            config,
        } => {
            let server = server_config(&config)?;
            if let Some(socket) = fleet_socket(server.as_ref()) {
                let devices: Vec<ClusterDevice> = control(&socket, &Request::DeviceList)?;
                let mut refused = 0;
                for d in devices {
                    let mark = match &d.refused {
                        None => "etcd".to_owned(),
                        Some(why) => {
                            refused += 1;
                            format!("etcd, REFUSED by every node: {why}")
                        }
                    };
                    println!(
                        "{}\tgroups: {}\tdoors: {}\tadded by {}\t{mark}",
                        d.id,
                        d.groups.join(","),
                        d.doors.join(","),
                        d.added_by
                    );
                }
                if refused > 0 {
                    eprintln!(
                        "{refused} record(s) in etcd are refused by every node and open nothing"
                    );
                }
                return Ok(());
            }
            let devices_dir = devices_dir_of(devices_dir, server.as_ref());
            for (path, file) in knockd::devices::read_device_files(&devices_dir)? {
                let mode = std::fs::metadata(devices_dir.join(&file.key_file))
                    .map(|m| {
                        knockd::platform::owner_and_mode(&m).map_or_else(
                            || "-".into(),
                            |(_, mode)| format!("{:04o}", mode & 0o7777),
                        )
                    })
                    .unwrap_or_else(|_| "missing".into());
                println!(
                    "{}\tgroups: {}\tkey: {} ({mode})\t{}",
                    file.id,
                    file.groups.join(","),
                    file.key_file.display(),
                    path.display()
                );
            }
            Ok(())
        }
        DeviceCommand::Remove {
            name,
            devices_dir,
            config,
        } => {
            let server = server_config(&config)?;
            if let Some(socket) = fleet_socket(server.as_ref()) {
                let changed: DeviceChanged =
                    control(&socket, &Request::DeviceRemove { id: name.clone() })?;
                eprintln!(
                    "removed {name} from etcd (revision {}); every node forgets it within a second",
                    changed.revision
                );
                return Ok(());
            }
            let devices_dir = devices_dir_of(devices_dir, server.as_ref());
            let (path, file) = knockd::devices::read_device_files(&devices_dir)?
                .into_iter()
                .find(|(_, f)| f.id == name)
                .ok_or_else(|| anyhow!("no device {name} in {}", devices_dir.display()))?;
            std::fs::remove_file(devices_dir.join(&file.key_file))
                .with_context(|| format!("removing {}", file.key_file.display()))?;
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            eprintln!("removed {name}; reload knockd to forget it");
            Ok(())
        }
        DeviceCommand::Sign { name, config } => {
            let server = server_config(&config)?;
            let socket = fleet_socket(server.as_ref()).ok_or_else(|| {
                anyhow!(
                    "{} has no cluster: section; device sign is for fleet mode",
                    config.display()
                )
            })?;
            let d: ClusterDevice = control(&socket, &Request::DeviceSign { id: name })?;
            eprintln!(
                "signed {}: groups [{}], doors [{}]; every node accepts it within a second",
                d.id,
                d.groups.join(", "),
                d.doors.join(", ")
            );
            Ok(())
        }
    }
}
