//! The daemon's main loop: load and attach the guard, then serve knocks
//! until shutdown.

use std::{future::Future, path::PathBuf, time::Duration};

use crate::{
    config::Config,
    control, daemon,
    daemon::{Daemon, Now},
    devices::Devices,
    events::KnockReader,
    guard,
    guard::{Guard, KernelLogLevel},
    maps,
    maps::GuardMaps,
    state,
    state::StateFile,
};

/// How often the daemon logs its counters at debug level.
const STATS_INTERVAL: Duration = Duration::from_secs(10);
/// How often the clock moves the knock ports and expires grants.
const TICK_INTERVAL: Duration = Duration::from_secs(1);

/// Why the daemon stopped.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The guard could not be had, and nothing else guards the ports: the
    /// kernel could not even create the maps, or the configuration says
    /// `without_xdp: refuse`. Exits 69, which the unit does not restart.
    #[error("the protected ports are NOT protected: {0}")]
    Unprotected(String),
    #[error("interface {0} does not exist")]
    NoInterface(String),
    #[error("reading knocks from a packet socket")]
    Sniff(#[source] std::io::Error),
    #[error(transparent)]
    Maps(#[from] maps::Error),
    #[error("reading knock events")]
    Events(#[source] std::io::Error),
    #[error(transparent)]
    State(#[from] state::Error),
    #[error(transparent)]
    Daemon(#[from] daemon::Error),
    #[error(transparent)]
    Control(#[from] control::Error),
    #[error("control_group {0:?}: no such group")]
    ControlGroup(String),
    #[error("installing the SIGHUP handler")]
    Signal(#[source] std::io::Error),
    #[error(transparent)]
    Cluster(#[from] crate::cluster::Error),
    #[error("metrics endpoint on {listen}")]
    Metrics {
        listen: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
}

/// Tells systemd (when it started us with NOTIFY_SOCKET) about a state
/// change. Without systemd this does nothing; a failure is logged, never
/// fatal.
fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if let Err(e) = sd_notify::notify(states) {
        tracing::debug!(error = %e, "sd_notify failed");
    }
}

/// A control request for the daemon. A reload is told to systemd:
/// RELOADING with the monotonic time it requires, then READY again
/// whatever the outcome (a refused reload keeps the old configuration
/// running).
fn request(
    daemon: &mut Daemon,
    command: control::Command,
    reply: tokio::sync::oneshot::Sender<control::Response>,
) {
    let reload = matches!(command, control::Command::Reload);
    if reload {
        let mut states = vec![sd_notify::NotifyState::Reloading];
        if let Ok(now) = sd_notify::NotifyState::monotonic_usec_now() {
            states.push(now);
        }
        notify(&states);
    }
    daemon.handle(command, reply, Now::read());
    if reload {
        notify(&[
            sd_notify::NotifyState::Ready,
            sd_notify::NotifyState::Status(daemon.last_reload()),
        ]);
    }
}

/// The next fleet event; never, outside fleet mode.
async fn next_event(
    events: &mut Option<tokio::sync::mpsc::UnboundedReceiver<crate::cluster::Event>>,
) -> Option<crate::cluster::Event> {
    match events {
        Some(events) => events.recv().await,
        None => std::future::pending().await,
    }
}

/// The next knocks from the packet socket; never, where XDP runs everywhere.
async fn sniff(
    sniffer: &mut Option<crate::sniff::PacketKnocks>,
    policy: &crate::maps::PortPolicy,
) -> std::io::Result<Vec<crate::events::SeenKnock>> {
    match sniffer {
        Some(sniffer) => sniffer.read(policy).await,
        None => std::future::pending().await,
    }
}

/// The gid of group `name`.
fn group_id(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a valid C string; getgrnam's static result is read at once,
    // on this thread, before any other getgr* call.
    let group = unsafe { libc::getgrnam(name.as_ptr()) };
    // SAFETY: non-null pointers from getgrnam point to a valid group.
    (!group.is_null()).then(|| unsafe { (*group).gr_gid })
}

/// Lifts the soft limit on open files to the hard one (systemd's
/// `LimitNOFILE`), so the listeners' connection caps, not a default of
/// 1024, bound what local clients can make the daemon hold.
fn raise_nofile_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read and write the one struct given.
    let raised = unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && {
            let before = limit.rlim_cur;
            limit.rlim_cur = limit.rlim_max;
            before == limit.rlim_max || libc::setrlimit(libc::RLIMIT_NOFILE, &limit) == 0
        }
    };
    if raised {
        tracing::debug!(nofile = limit.rlim_cur, "open-file limit");
    } else {
        tracing::warn!(
            error = %std::io::Error::last_os_error(),
            "could not raise the open-file limit"
        );
    }
}

/// Options that are not part of the configuration file.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Level of the XDP program's own log statements.
    pub kernel_log_level: KernelLogLevel,
    /// The configuration file, so reloads (SIGHUP, `knockctl reload`) can
    /// read it again.
    pub config_path: Option<PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            kernel_log_level: KernelLogLevel::Info,
            config_path: None,
        }
    }
}

/// Removes this run's map pins if start-up fails before the guard is in
/// place. Once it is, the pins stay: they are how the guard outlives us.
/// Link pins of an earlier run are never touched here, so a failed restart
/// leaves the old guard up (fail closed).
struct StartupPins(Option<PathBuf>);

impl StartupPins {
    fn keep(mut self) {
        self.0 = None;
    }
}

impl Drop for StartupPins {
    fn drop(&mut self) {
        if let Some(dir) = &self.0 {
            GuardMaps::unpin(dir);
        }
    }
}

/// Runs the daemon until `shutdown` completes.
///
/// Order matters: the maps are filled before the program is attached, so the
/// guard protects from its first packet; "ready" is logged only once every
/// interface is attached.
pub async fn run(
    config: Config,
    devices: Devices,
    options: RunOptions,
    shutdown: impl Future<Output = ()>,
) -> Result<(), Error> {
    let (config, opened) = crate::lockout::prepare(config, &devices);
    raise_nofile_limit();
    let state = StateFile::open(&config.state_dir)?;
    let (mut guard, logger) = Guard::open_with(
        options.kernel_log_level,
        maps::allow_entries(config.max_grants),
    )
    .map_err(|e| {
        Error::Unprotected(format!(
            "the kernel could not create the XDP guard's maps, so knockd cannot run ({})",
            daemon::chain(&e)
        ))
    })?;
    // Never fail open: a kernel that refuses the program leaves nftables,
    // which enforces every protected port, as the guard (or, if the
    // configuration asks for XDP or nothing, a refusal that says so).
    let refused = guard.load_program().err().map(|e| daemon::chain(&e));
    if let Some(why) = &refused
        && config.without_xdp == crate::config::WithoutXdp::Refuse
    {
        return Err(Error::Unprotected(format!(
            "the kernel refused the XDP program and the configuration says without_xdp: refuse ({why})"
        )));
    }
    if let Some(logger) = logger {
        tokio::spawn(guard::drain_logger(logger));
    }
    let mut maps = GuardMaps::take(guard.ebpf_mut(), Some(&config.bpffs_dir))?;
    let pins = StartupPins(Some(config.bpffs_dir.clone()));
    let ring = maps::take_knock_events(guard.ebpf_mut())?;
    maps.set_knock_rate(config.knock.rate_per_sec, config.knock.burst)?;
    // Fleet mode: the key and password files are read now, so a bad one
    // stops start-up naming it; etcd itself may be down (fail closed).
    let fleet = match &config.cluster {
        Some(cluster) => Some(crate::cluster::Membership::load(cluster)?),
        None => None,
    };
    let kernel = Box::new(crate::kernel::Real::new(maps));
    let mut daemon = Daemon::new(config.clone(), &devices, kernel, state, Now::read())?;
    daemon.set_lockout_open(opened);
    crate::platform::release_free_memory();
    let mut fleet_events = match fleet {
        Some(settings) => {
            let book = crate::state::load_revokes(&config.state_dir)?;
            let (link, events) = crate::cluster::spawn(&settings);
            daemon.set_fleet(daemon::Fleet::new(
                link,
                devices.clone(),
                book,
                config.state_dir.clone(),
                Now::read(),
            ));
            Some(events)
        }
        None => None,
    };

    // Daemon::new installed the nftables table: every protected port is
    // closed from here on, XDP or not.
    let mut without_xdp = Vec::new();
    for interface in &config.interfaces {
        // A missing interface is the configuration's error, and nftables
        // could not guard it either.
        let Some(ifindex) = crate::platform::interface_index(interface) else {
            return Err(Error::NoInterface(interface.clone()));
        };
        let why = match &refused {
            Some(why) => format!("the kernel refused the XDP program: {why}"),
            None => match guard.attach_pinned(interface, config.xdp_mode, &config.bpffs_dir) {
                Ok(mode) => {
                    tracing::info!(interface, ?mode, "XDP guard attached");
                    continue;
                }
                Err(e) if config.without_xdp == crate::config::WithoutXdp::Refuse => {
                    return Err(Error::Unprotected(format!(
                        "XDP could not attach to {interface} and the configuration says without_xdp: refuse ({})",
                        daemon::chain(&e)
                    )));
                }
                Err(e) => format!("XDP could not attach: {}", daemon::chain(&e)),
            },
        };
        tracing::error!(
            interface,
            reason = %why,
            guard = "nftables alone drops the protected ports (no line-rate drop, no kernel rate limit on knocks); knocks are read from a packet socket",
            "running WITHOUT the XDP guard"
        );
        guard.run_without(interface, &config.bpffs_dir, why);
        without_xdp.push(ifindex);
    }
    let mut sniffer = if without_xdp.is_empty() {
        None
    } else {
        Some(crate::sniff::PacketKnocks::open(without_xdp).map_err(Error::Sniff)?)
    };
    pins.keep();
    daemon.set_origin(options.config_path.clone(), guard.attachments().to_vec());
    let group = match &config.control_group {
        Some(name) => Some(group_id(name).ok_or_else(|| Error::ControlGroup(name.clone()))?),
        None => None,
    };
    let (requests_tx, mut requests) = tokio::sync::mpsc::channel(16);
    // One shutdown signal for the listeners; their loops end on it.
    let (stop_listeners, listeners_stop) = tokio::sync::watch::channel(false);
    let mut listeners = Vec::new();
    if let Some(metrics) = &config.metrics {
        let handle =
            control::serve_metrics(metrics.listen, requests_tx.clone(), listeners_stop.clone())
                .await
                .map_err(|source| Error::Metrics {
                    listen: metrics.listen,
                    source,
                })?;
        listeners.push(handle);
        tracing::info!(listen = %metrics.listen, "metrics endpoint listening");
    }
    listeners.push(control::serve(
        &config.control_socket,
        group,
        requests_tx,
        listeners_stop,
    )?);
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .map_err(Error::Signal)?;
    // The watchdog is pinged from the main loop, so a loop that stops
    // turning stops pinging and systemd restarts us.
    let watchdog_timeout = sd_notify::watchdog_enabled();
    let watchdog_on = watchdog_timeout.is_some();
    let mut watchdog =
        tokio::time::interval(watchdog_timeout.map_or(Duration::from_secs(3600), |t| t / 2));
    let mut reader = KnockReader::new(ring).map_err(Error::Events)?;
    tracing::info!(
        interfaces = ?config.interfaces,
        doors = ?config.doors.keys().collect::<Vec<_>>(),
        devices = devices.by_id.len(),
        bpffs_dir = %config.bpffs_dir.display(),
        "ready"
    );

    // Only now is everything in place: XDP attached, nftables installed,
    // the control socket listening.
    let status = format!(
        "guarding {} interface(s), {} door(s)",
        config.interfaces.len(),
        config.doors.len()
    );
    notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&status),
    ]);
    let mut stats = tokio::time::interval(STATS_INTERVAL);
    let mut tick = tokio::time::interval(TICK_INTERVAL);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            knocks = sniff(&mut sniffer, daemon.kernel().port_policy()) => {
                let now = Now::read();
                for knock in knocks.map_err(Error::Sniff)? {
                    daemon.on_knock(&knock, now)?;
                }
                daemon.flush(now)?;
            }
            batch = reader.read() => {
                let now = Now::read();
                for knock in batch.map_err(Error::Events)? {
                    match knock {
                        Ok(knock) => {
                            tracing::debug!(
                                source = %knock.source,
                                destination = %knock.destination,
                                proto = %knock.proto,
                                payload_len = knock.payload_len,
                                payload = %hex::encode(&knock.payload),
                                "knock"
                            );
                            daemon.on_knock(&knock, now)?;
                        }
                        Err(e) => tracing::warn!(error = %e, "undecodable knock record"),
                    }
                }
                daemon.flush(now)?;
            }
            _ = tick.tick() => daemon.tick(Now::read())?,
            Some((command, reply)) = requests.recv() => request(&mut daemon, command, reply),
            Some(event) = next_event(&mut fleet_events) => daemon.on_fleet(event, Now::read())?,
            _ = hangup.recv() => {
                tracing::info!("SIGHUP: reloading the configuration");
                let (reply, _) = tokio::sync::oneshot::channel();
                request(&mut daemon, control::Command::Reload, reply);
            }
            _ = watchdog.tick(), if watchdog_on => notify(&[sd_notify::NotifyState::Watchdog]),
            _ = stats.tick() => {
                let counters = daemon.kernel().counters()?;
                tracing::debug!(counters = %serde_json::to_string(&counters).unwrap_or_default(), "counters");
            }
        }
    }

    notify(&[sd_notify::NotifyState::Stopping]);
    let _ = stop_listeners.send(true);
    for listener in listeners {
        let _ = listener.await;
    }
    let counters = daemon.kernel().counters()?;
    tracing::info!(
        counters = %serde_json::to_string(&counters).unwrap_or_default(),
        decisions = %serde_json::to_string(&daemon.tally()).unwrap_or_default(),
        "stopping; the XDP guard and the nftables table stay in place (fail closed); `knockd uninstall` removes them"
    );
    // The pinned links keep the guard attached after `guard` is dropped.
    drop(guard);
    Ok(())
}
