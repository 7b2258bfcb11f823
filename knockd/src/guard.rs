//! Loading the XDP program and attaching it to interfaces.
//!
//! A [`Guard`] owns the loaded object. Dropping it detaches the program from
//! every interface it was attached to; that is the clean-shutdown path.

use aya::{
    Ebpf, EbpfLoader,
    programs::{ProgramError, Xdp, XdpMode},
};
use aya_log::EbpfLogger;
use knockd_common::XDP_PROGRAM;
use serde::Serialize;

use crate::config;

/// The compiled XDP program, built by `build.rs` and embedded at compile time.
pub static XDP_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/knockd-xdp"));

/// An error loading or attaching the program.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The object was rejected (a verifier error, or missing privileges).
    #[error("loading the XDP object")]
    Load(#[source] aya::EbpfError),
    /// The program was rejected by the verifier or could not be created.
    #[error("loading the XDP program into the kernel")]
    Program(#[source] ProgramError),
    /// Attaching to an interface failed in every mode allowed.
    #[error("attaching to {interface} in {mode} mode")]
    Attach {
        interface: String,
        mode: &'static str,
        #[source]
        source: ProgramError,
    },
}

/// The XDP mode an interface ended up in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AttachedMode {
    /// In the driver, before any socket buffer is allocated.
    Native,
    /// In the network stack, after the socket buffer is built.
    Generic,
}

/// One interface the program is attached to.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    /// The interface name, as configured.
    pub interface: String,
    /// The mode it runs in.
    pub mode: AttachedMode,
}

/// Forwards the XDP program's aya-log records to the `log` facade (and from
/// there to `tracing`).
pub type KernelLogger = EbpfLogger<&'static dyn log::Log>;

/// The loaded XDP program and its attachments.
pub struct Guard {
    /// Owns the program, its links and (until taken) its maps. Dropping it
    /// detaches from every interface.
    ebpf: Ebpf,
    /// Where the program is attached, for status and logs.
    attachments: Vec<Attachment>,
}

/// Level for the kernel side's aya-log statements. Levels above it are
/// compiled out by the verifier, so debug logging on the packet path costs
/// nothing unless it is asked for.
#[derive(Debug, Clone, Copy)]
pub enum KernelLogLevel {
    Warn = 2,
    Info = 3,
    Debug = 4,
}

impl Guard {
    /// Loads the object and the program into the kernel (through the
    /// verifier) without attaching it anywhere.
    ///
    /// The returned logger must be kept alive and drained: it owns the log
    /// ring buffer's fd. It is `None` if the program logs nothing.
    pub fn load(level: KernelLogLevel) -> Result<(Guard, Option<KernelLogger>), Error> {
        bump_memlock_rlimit();
        let level = level as u8;
        let mut ebpf = EbpfLoader::new()
            .override_global("AYA_LOG_LEVEL", &level, false)
            .load(XDP_OBJECT)
            .map_err(Error::Load)?;
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::debug!(error = %e, "the XDP program has no logs");
                None
            }
        };
        let mut guard = Guard {
            ebpf,
            attachments: Vec::new(),
        };
        guard.program_mut().load().map_err(Error::Program)?;
        Ok((guard, logger))
    }

    /// The object, for taking its maps (see [`crate::maps`]).
    pub fn ebpf_mut(&mut self) -> &mut Ebpf {
        &mut self.ebpf
    }

    /// The loaded program, for `BPF_PROG_TEST_RUN`.
    pub fn program(&self) -> &Xdp {
        self.ebpf
            .program(XDP_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("the object embedded at build time holds the XDP program")
    }

    fn program_mut(&mut self) -> &mut Xdp {
        self.ebpf
            .program_mut(XDP_PROGRAM)
            .and_then(|p| p.try_into().ok())
            .expect("the object embedded at build time holds the XDP program")
    }

    /// Attaches to `interface`. In [`config::XdpMode::Auto`] a driver without
    /// native XDP support gets generic mode, with a warning, because running
    /// unprotected is worse than running slower.
    pub fn attach(
        &mut self,
        interface: &str,
        mode: config::XdpMode,
    ) -> Result<AttachedMode, Error> {
        let attempt = |guard: &mut Guard, xdp_mode, mode_name| {
            guard
                .program_mut()
                .attach(interface, xdp_mode)
                .map_err(|source| Error::Attach {
                    interface: interface.to_owned(),
                    mode: mode_name,
                    source,
                })
        };
        let attached = match mode {
            config::XdpMode::Native => {
                attempt(self, XdpMode::Driver, "native")?;
                AttachedMode::Native
            }
            config::XdpMode::Generic => {
                attempt(self, XdpMode::Skb, "generic")?;
                AttachedMode::Generic
            }
            config::XdpMode::Auto => match attempt(self, XdpMode::Driver, "native") {
                Ok(_) => AttachedMode::Native,
                Err(native) => {
                    tracing::warn!(
                        interface,
                        error = %native,
                        "native XDP unavailable, falling back to generic mode (slower)"
                    );
                    attempt(self, XdpMode::Skb, "generic")?;
                    AttachedMode::Generic
                }
            },
        };
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            mode: attached,
        });
        Ok(attached)
    }

    /// Where the program is attached.
    pub fn attachments(&self) -> &[Attachment] {
        &self.attachments
    }
}

/// Forwards the kernel side's log records to `tracing` until the logger's
/// ring buffer fails, which only happens when the object is gone.
pub async fn drain_logger(logger: KernelLogger) {
    // SAFETY: the logger owns its ring buffer's fd for as long as it lives,
    // and as_raw_fd always returns that same fd.
    let registered = unsafe {
        tokio::io::unix::AsyncFd::register_with_interest(logger, tokio::io::Interest::READABLE)
    };
    let Ok(mut logger) = registered else {
        tracing::warn!("cannot poll the XDP program's log buffer; its logs are lost");
        return;
    };
    loop {
        let Ok(mut ready) = logger.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
}

/// Kernels before 5.11 charge BPF maps to RLIMIT_MEMLOCK; lift it so large
/// maps load there too. Newer kernels account to the cgroup and ignore it.
fn bump_memlock_rlimit() {
    let limit = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: `limit` is a valid rlimit for the duration of the call.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &limit) } != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "could not lift RLIMIT_MEMLOCK"
        );
    }
}
