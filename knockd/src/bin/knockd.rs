//! The knockd daemon binary: command line, logging, signals; the work is in
//! [`knockd::run`].

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::Context as _;
use clap::{Parser, Subcommand, ValueEnum};
use knockd::{
    RunOptions,
    config::{Config, DEFAULT_BPFFS_DIR},
    guard::KernelLogLevel,
    maps::GuardMaps,
};
use tokio::signal::unix::{SignalKind, signal};

const DEFAULT_CONFIG: &str = "/etc/knockd/knockd.yaml";

#[derive(Parser)]
#[command(version, about = "Port-knocking daemon with an XDP guard")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Log format: text for a terminal, json for machines.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
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
    /// Validate a configuration file and exit: 0 if valid, 1 with the
    /// offending key if not.
    CheckConfig {
        /// Configuration file.
        #[arg(default_value = DEFAULT_CONFIG)]
        config: PathBuf,
    },
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

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format, &cli.log_level);
    match real_main(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("knockd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn real_main(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::CheckConfig { config } => {
            Config::load(&config)?;
            println!("{}: ok", config.display());
            Ok(())
        }
        Command::Stats {
            bpffs_dir,
            json,
            watch,
        } => stats(&bpffs_dir, json, watch),
        Command::Run { config } => {
            let config = Config::load(&config)?;
            let kernel_log_level =
                if cli.log_level.contains("debug") || cli.log_level.contains("trace") {
                    KernelLogLevel::Debug
                } else {
                    KernelLogLevel::Info
                };
            let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
            runtime.block_on(async {
                let shutdown = shutdown_signal()?;
                knockd::run(config, RunOptions { kernel_log_level }, shutdown).await?;
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

fn init_logging(format: LogFormat, level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}
