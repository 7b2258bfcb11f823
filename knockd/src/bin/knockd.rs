//! The knockd daemon binary: command line, logging, signals; the work is in
//! [`knockd::run`].

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use knockd::{
    RunOptions,
    config::{Config, DEFAULT_BPFFS_DIR, KnockPort, PortRange, STATIC_SEQUENCE_MAX},
    devices::Devices,
    guard::KernelLogLevel,
    maps::{GuardMaps, Proto},
};
use tokio::signal::unix::{SignalKind, signal};

const DEFAULT_CONFIG: &str = "/etc/knockd/knockd.yaml";

#[derive(Parser)]
#[command(version, about = "Port-knocking daemon with an XDP guard")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: auto (the journal's native protocol when stderr is the
    /// journal, as under systemd; else text), text, json, or journal.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Auto)]
    log_format: LogFormat,
    /// Log filter (tracing-subscriber syntax); RUST_LOG overrides it.
    #[arg(long, global = true, default_value = "info")]
    log_level: String,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the XDP guard and run until SIGTERM or SIGINT.
    Run {
        /// Configuration file.
        #[arg(short, long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Validate a configuration file, its devices and key files, and that
    /// its interfaces exist, and exit: 0 if valid, 78 (EX_CONFIG) naming the
    /// offending key or file if not.
    CheckConfig {
        /// Configuration file.
        #[arg(default_value = DEFAULT_CONFIG)]
        config: PathBuf,
        /// Fleet mode: also connect to every etcd endpoint as the daemon
        /// would (TLS, user, password), list the prefix and write and delete
        /// a key under it; exit 1 if no endpoint answers in full.
        #[arg(long)]
        cluster: bool,
    },
    /// Generate a random static knock sequence (unique ports) for a static
    /// door, and optionally export it for clients.
    GenSequence {
        /// Knocks in the sequence.
        #[arg(long, default_value_t = 20)]
        length: usize,
        /// Port range to draw from (default: from 10000 up to the host's
        /// ephemeral range, net.ipv4.ip_local_port_range, where replies
        /// to the host's own queries arrive).
        #[arg(long)]
        range: Option<String>,
        /// Protocol of the knocks: udp, tcp, or mixed (each drawn at random).
        #[arg(long, value_enum, default_value_t = SequenceProto::Udp)]
        proto: SequenceProto,
        /// Also write the sequence to this file, one knock per line, for
        /// clients (`knock HOST $(cat FILE)` works too).
        #[arg(long)]
        export: Option<PathBuf>,
    },
    /// Remove everything knockd leaves in the kernel on purpose: its
    /// nftables table (and so every grant) and its bpffs pins, which detaches
    /// the XDP guard. Stopping the daemon leaves both in place (fail
    /// closed); run this after stopping it to take knockd off a host.
    Uninstall {
        /// bpffs directory the daemon pinned its maps under (default: the
        /// configuration's bpffs_dir, else /sys/fs/bpf/knockd).
        #[arg(long)]
        bpffs_dir: Option<PathBuf>,
        /// The configuration whose bpffs_dir to use.
        #[arg(long, default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
    /// Load the XDP program through this kernel's verifier without
    /// attaching it anywhere, and print how many instructions the verifier
    /// processed (the limit is 1,000,000). Exit 0 if the kernel accepts the
    /// program, 1 with the verifier's reason if not.
    Verify,
    /// Print shell completions.
    Completions {
        /// bash, zsh, fish, elvish or powershell.
        shell: clap_complete::Shell,
    },
    /// Print the manual page (roff), for packaging.
    #[command(hide = true)]
    Man,
    /// Print the XDP guard's counters from a running daemon's pinned maps.
    Stats {
        /// bpffs directory the daemon pinned its maps under.
        #[arg(long, default_value = DEFAULT_BPFFS_DIR)]
        bpffs_dir: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Keep printing, every this many seconds, with per-second rates.
        #[arg(long)]
        watch: Option<u64>,
    },
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum SequenceProto {
    Udp,
    Tcp,
    Mixed,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum LogFormat {
    Auto,
    Text,
    Json,
    Journal,
}

fn main() -> ExitCode {
    // `knockd --uninstall` (the spelling the product documents) is the
    // `uninstall` subcommand.
    let args = std::env::args_os().map(|arg| {
        if arg == "--uninstall" {
            "uninstall".into()
        } else {
            arg
        }
    });
    let cli = Cli::parse_from(args);
    let to_journal = init_logging(cli.log_format, &cli.log_level);
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // In the journal at priority err, once; on a terminal, plainly.
            if to_journal {
                tracing::error!("{e:#}");
            } else {
                eprintln!("knockd: {e:#}");
            }
            exit_code(&e)
        }
    }
}

/// EX_CONFIG (sysexits.h): the configuration, a device or key file is
/// wrong. The unit lists it in RestartPreventExitStatus=, so systemd does
/// not restart into the same error forever.
const EX_CONFIG: u8 = 78;

/// EX_UNAVAILABLE (sysexits.h): the guard cannot be had on this kernel and
/// nothing else guards the ports (see `without_xdp`). Retrying runs into
/// the same kernel, so the unit does not restart on it either.
const EX_UNAVAILABLE: u8 = 69;

/// 78 for an error in the configuration (or its devices and key files),
/// 69 when the guard cannot be had on this kernel, 1 for anything else (a
/// missing interface may yet appear; retrying is right there).
fn exit_code(e: &anyhow::Error) -> ExitCode {
    if e.chain()
        .any(|cause| matches!(cause.downcast_ref(), Some(knockd::Error::Unprotected(_))))
    {
        return ExitCode::from(EX_UNAVAILABLE);
    }
    let config_error = e.chain().any(|cause| {
        cause.is::<knockd::config::Error>()
            || cause.is::<knockd::devices::Error>()
            || cause.is::<knockd::check::CheckError>()
    });
    if config_error {
        ExitCode::from(EX_CONFIG)
    } else {
        ExitCode::FAILURE
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig {
            config: path,
            cluster,
        } => {
            println!("{}", knockd::check::check_config(&path)?);
            if cluster {
                let config = Config::load(&path)?;
                let section = config.cluster.as_ref().with_context(|| {
                    format!("--cluster: {} has no cluster: section", path.display())
                })?;
                let settings = knockd::cluster::Membership::load(section)?;
                match knockd::cluster::probe(&settings) {
                    Ok(lines) => lines.iter().for_each(|l| println!("{l}")),
                    Err(lines) => {
                        lines.iter().for_each(|l| println!("{l}"));
                        anyhow::bail!("--cluster: no etcd endpoint answered in full");
                    }
                }
            }
            Ok(())
        }
        Command::Uninstall { bpffs_dir, config } => {
            // The configuration's pins, if it can be read: a package's
            // removal runs this without options.
            let bpffs_dir = bpffs_dir.unwrap_or_else(|| {
                Config::load(&config)
                    .map(|c| c.bpffs_dir)
                    .unwrap_or_else(|_| PathBuf::from(DEFAULT_BPFFS_DIR))
            });
            knockd::nft::uninstall()?;
            knockd::guard::remove_pins(&bpffs_dir)
                .with_context(|| format!("removing the pins under {}", bpffs_dir.display()))?;
            println!(
                "removed the nftables table inet knockd and the pins under {}",
                bpffs_dir.display()
            );
            Ok(())
        }
        Command::Verify => {
            let (guard, _logger) = knockd::guard::Guard::load(KernelLogLevel::Info)?;
            let release = knockd::host::kernel_release();
            match guard.verified_instructions() {
                Some(n) => println!(
                    "the XDP program verified on Linux {release}: {n} instructions processed (limit 1000000)"
                ),
                None => println!(
                    "the XDP program verified on Linux {release} (this kernel does not report the instruction count)"
                ),
            }
            Ok(())
        }
        Command::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "knockd", &mut std::io::stdout());
            Ok(())
        }
        Command::Man => Ok(clap_mangen::Man::new(Cli::command())
            .section("8")
            .render(&mut std::io::stdout())?),
        Command::GenSequence {
            length,
            range,
            proto,
            export,
        } => gen_sequence(length, range.as_deref(), proto, export.as_deref()),
        Command::Stats {
            bpffs_dir,
            json,
            watch,
        } => stats(&bpffs_dir, json, watch),
        Command::Run { config: path } => {
            let config = Config::load(&path)?;
            let devices = Devices::load(&config, &path)?;
            let kernel_log_level =
                if cli.log_level.contains("debug") || cli.log_level.contains("trace") {
                    KernelLogLevel::Debug
                } else {
                    KernelLogLevel::Info
                };
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let shutdown = shutdown_signal()?;
                let options = RunOptions {
                    kernel_log_level,
                    config_path: Some(path.clone()),
                };
                knockd::run(config, devices, options, shutdown).await?;
                Ok(())
            })
        }
    }
}

/// SIGTERM (what systemd sends) and SIGINT both end the daemon through the
/// same path.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM received"),
            _ = int.recv() => tracing::info!("SIGINT received"),
        }
    })
}

fn stats(bpffs_dir: &std::path::Path, json: bool, watch: Option<u64>) -> anyhow::Result<()> {
    let maps = GuardMaps::open_pinned(bpffs_dir)
        .with_context(|| format!("is knockd running with bpffs_dir {}?", bpffs_dir.display()))?;
    let mut previous = maps.counters()?;
    if json {
        println!("{}", serde_json::to_string(&previous)?);
    } else {
        print_table(&previous, None);
    }
    let Some(every) = watch else { return Ok(()) };
    let every = Duration::from_secs(every.max(1));
    loop {
        std::thread::sleep(every);
        let now = maps.counters()?;
        if json {
            println!("{}", serde_json::to_string(&now)?);
        } else {
            println!();
            print_table(&now, Some((&previous, every)));
        }
        previous = now;
    }
}

fn print_table(now: &knockd::maps::Counters, since: Option<(&knockd::maps::Counters, Duration)>) {
    println!("{:<20} {:>14} {:>12}", "counter", "packets", "per second");
    for (i, (name, value)) in now.iter().enumerate() {
        let rate = since.map_or(String::from("-"), |(before, span)| {
            let delta = value.saturating_sub(before.0[i]);
            format!("{:.1}", delta as f64 / span.as_secs_f64())
        });
        println!("{name:<20} {value:>14} {rate:>12}");
    }
    println!("{:<20} {:>14}", "total", now.total());
}

fn gen_sequence(
    length: usize,
    range: Option<&str>,
    proto: SequenceProto,
    export: Option<&std::path::Path>,
) -> anyhow::Result<()> {
    use rand::{Rng as _, seq::index::sample};
    let ephemeral = knockd::host::ephemeral_ports().unwrap_or(knockd::host::DEFAULT_EPHEMERAL);
    let range: PortRange = match range {
        Some(range) => range
            .parse()
            .map_err(|e| anyhow::anyhow!("--range {range}: {e}"))?,
        None => knockd::host::sequence_range(ephemeral),
    };
    if proto != SequenceProto::Tcp && range.start <= ephemeral.end && ephemeral.start <= range.end {
        eprintln!(
            "knockd gen-sequence: warning: --range {range} overlaps the ephemeral range \
             {ephemeral} (net.ipv4.ip_local_port_range): UDP knocks there share ports with \
             replies to the host's own queries; `knockd check-config` will warn about them"
        );
    }
    let span = usize::from(range.end - range.start) + 1;
    anyhow::ensure!(
        (1..=STATIC_SEQUENCE_MAX).contains(&length) && length <= span,
        "--length {length}: must be 1-{STATIC_SEQUENCE_MAX} and at most the {span} ports of --range"
    );
    // ThreadRng is a CSPRNG seeded from the operating system.
    let mut rng = rand::rng();
    let sequence: Vec<KnockPort> = sample(&mut rng, span, length)
        .into_iter()
        .map(|offset| KnockPort {
            port: range.start + offset as u16,
            proto: match proto {
                SequenceProto::Udp => Proto::Udp,
                SequenceProto::Tcp => Proto::Tcp,
                SequenceProto::Mixed if rng.random() => Proto::Udp,
                SequenceProto::Mixed => Proto::Tcp,
            },
        })
        .collect();
    let knocks: Vec<String> = sequence.iter().map(ToString::to_string).collect();
    println!(
        "sequence: [{}]",
        knocks
            .iter()
            .map(|k| format!("\"{k}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some(path) = export {
        // Knocks only, one per line, so `knock HOST $(cat FILE)` works.
        let text = format!("{}\n", knocks.join("\n"));
        std::fs::write(path, text).with_context(|| format!("writing {}", path.display()))?;
        eprintln!("exported to {}", path.display());
    }
    Ok(())
}

/// Sets up logging; returns whether it goes to the journal natively.
///
/// Under systemd, stderr is a stream the journal reads at one priority,
/// so WARN and ERROR would be indistinguishable from INFO (`journalctl -p
/// warning` would find nothing). When `JOURNAL_STREAM` says stderr is that
/// stream, knockd speaks the journal's own protocol instead: each event at
/// its priority (ERROR err, WARN warning, INFO notice, DEBUG info), its
/// fields as journal fields (DOOR, DEVICE, REASON, SOURCE, …). Text goes
/// without colour unless stderr is a terminal.
fn init_logging(format: LogFormat, level: &str) -> bool {
    use std::io::IsTerminal as _;
    use tracing_subscriber::{layer::SubscriberExt as _, util::SubscriberInitExt as _};
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let journal = match format {
        LogFormat::Journal => true,
        LogFormat::Auto => stderr_is_the_journal(),
        LogFormat::Text | LogFormat::Json => false,
    };
    if journal {
        match tracing_journald::layer() {
            Ok(layer) => {
                tracing_subscriber::registry()
                    .with(filter)
                    .with(layer.with_field_prefix(None))
                    .init();
                return true;
            }
            Err(e) => eprintln!("knockd: cannot log to the journal ({e}); logging text to stderr"),
        }
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        _ => builder.init(),
    }
    false
}

/// Whether stderr is the journal's stream: `JOURNAL_STREAM` (set by
/// systemd) names its device and inode, and stderr's must match, as
/// systemd.exec(5) asks (a child with redirected stderr inherits the
/// variable but not the stream).
fn stderr_is_the_journal() -> bool {
    let Some(value) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = value.to_str().and_then(|v| v.split_once(':')) else {
        return false;
    };
    let mut stat = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: fstat on stderr's descriptor into a buffer for one stat.
    if unsafe { libc::fstat(2, stat.as_mut_ptr()) } != 0 {
        return false;
    }
    // SAFETY: fstat returned 0, so it filled the buffer.
    let stat = unsafe { stat.assume_init() };
    dev.parse() == Ok(stat.st_dev) && ino.parse() == Ok(stat.st_ino)
}
