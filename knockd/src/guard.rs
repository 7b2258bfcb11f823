//! Loading the XDP program and attaching it to interfaces.
//!
//! A [`Guard`] owns the loaded object. Dropping it detaches the program from
//! every interface it was attached to; that is the clean-shutdown path.

use std::path::{Path, PathBuf};

use aya::{
    Ebpf, EbpfLoader,
    pin::PinError,
    programs::{
        ProgramError, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        xdp::{XdpLink, XdpLinkId},
    },
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
    /// The new link could not be pinned, so it would not outlive us.
    #[error("pinning the XDP link at {path}")]
    Pin {
        path: PathBuf,
        #[source]
        source: PinError,
    },
    /// The link could not be taken out of the program to be pinned.
    #[error("taking the XDP link of {interface} to pin it")]
    Link {
        interface: String,
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
    /// In the link an earlier run pinned (in the mode it chose then): the
    /// new program replaced the old one in it atomically.
    Adopted,
    /// Not attached: the kernel refused the program or the attachment, and
    /// nftables alone guards the interface (`without_xdp: nftables`). The
    /// daemon reads knocks from a packet socket instead of the ring buffer.
    NftablesOnly,
}

impl AttachedMode {
    /// The mode's name, as status reports it.
    pub fn name(self) -> &'static str {
        match self {
            AttachedMode::Native => "native",
            AttachedMode::Generic => "generic",
            AttachedMode::Adopted => "adopted",
            AttachedMode::NftablesOnly => "nftables-only",
        }
    }
}

/// Where the link of `interface` is pinned under `dir`.
pub fn link_pin(dir: &Path, interface: &str) -> PathBuf {
    dir.join(format!("link_{interface}"))
}

/// Removes every pin under `dir`, links included: the XDP guard detaches
/// once no process holds its link. `knockd uninstall` does this on purpose.
pub fn remove_pins(dir: &Path) -> std::io::Result<()> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// One interface the program is attached to.
#[derive(Debug, Clone, Serialize)]
pub struct Attachment {
    /// The interface name, as configured.
    pub interface: String,
    /// The mode it runs in.
    pub mode: AttachedMode,
    /// Why XDP is not there, in [`AttachedMode::NftablesOnly`].
    pub error: Option<String>,
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
        let (mut guard, logger) = Guard::open(level)?;
        guard.load_program()?;
        Ok((guard, logger))
    }

    /// Creates the object's maps, without loading the program: the daemon
    /// keeps its maps (and so its grants and port policy) even when the
    /// kernel refuses the program, and runs on nftables alone then.
    pub fn open(level: KernelLogLevel) -> Result<(Guard, Option<KernelLogger>), Error> {
        Guard::open_with(level, knockd_common::ALLOW_MAX_ENTRIES)
    }

    /// [`open`](Self::open), with an allow map of `allow_entries` (see
    /// [`crate::maps::allow_entries`]): the kernel reserves its memory
    /// now, so a full table costs nothing more later.
    pub fn open_with(
        level: KernelLogLevel,
        allow_entries: u32,
    ) -> Result<(Guard, Option<KernelLogger>), Error> {
        bump_memlock_rlimit();
        let level = level as u8;
        let mut ebpf = EbpfLoader::new()
            .override_global("AYA_LOG_LEVEL", &level, false)
            .map_max_entries(knockd_common::map_names::ALLOW, allow_entries)
            .load(XDP_OBJECT)
            .map_err(Error::Load)?;
        let logger = match EbpfLogger::init(&mut ebpf) {
            Ok(logger) => Some(logger),
            Err(e) => {
                tracing::debug!(error = %e, "the XDP program has no logs");
                None
            }
        };
        let guard = Guard {
            ebpf,
            attachments: Vec::new(),
        };
        Ok((guard, logger))
    }

    /// Loads the program into the kernel, through its verifier.
    ///
    /// Debug builds fail here on purpose when `KNOCKD_TEST_XDP=refused`, so
    /// tests can see what a kernel that refuses the program leads to.
    pub fn load_program(&mut self) -> Result<(), Error> {
        if cfg!(debug_assertions)
            && std::env::var_os("KNOCKD_TEST_XDP").is_some_and(|v| v == "refused")
        {
            return Err(Error::Program(ProgramError::IOError(
                std::io::Error::other("refused on purpose (KNOCKD_TEST_XDP=refused, a test)"),
            )));
        }
        self.program_mut().load().map_err(Error::Program)
    }

    /// How many instructions the kernel's verifier processed to accept the
    /// program (`bpf_prog_info.verified_insns`, Linux 5.16 and later). The
    /// verifier gives up at 1,000,000; the program is kept well under that
    /// on every supported kernel, and start-up logs the figure so a kernel
    /// that comes close is seen.
    pub fn verified_instructions(&self) -> Option<u32> {
        self.program()
            .info()
            .ok()
            .and_then(|info| info.verified_instruction_count())
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
        self.attach_link(interface, mode).map(|(mode, _)| mode)
    }

    fn attach_link(
        &mut self,
        interface: &str,
        mode: config::XdpMode,
    ) -> Result<(AttachedMode, XdpLinkId), Error> {
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
        let (attached, id) = match mode {
            config::XdpMode::Native => (
                AttachedMode::Native,
                attempt(self, XdpMode::Driver, "native")?,
            ),
            config::XdpMode::Generic => (
                AttachedMode::Generic,
                attempt(self, XdpMode::Skb, "generic")?,
            ),
            config::XdpMode::Auto => match attempt(self, XdpMode::Driver, "native") {
                Ok(id) => (AttachedMode::Native, id),
                Err(native) => {
                    tracing::warn!(
                        interface,
                        error = %native,
                        "native XDP unavailable, falling back to generic mode (slower)"
                    );
                    (
                        AttachedMode::Generic,
                        attempt(self, XdpMode::Skb, "generic")?,
                    )
                }
            },
        };
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            mode: attached,
            error: None,
        });
        Ok((attached, id))
    }

    /// Attaches to `interface` through a link pinned under `pin_dir`, so the
    /// guard outlives the daemon: a crash, a SIGKILL or a stop leaves the
    /// protected ports dropped. If an earlier run left its link pinned there,
    /// the new program replaces the old one in it atomically: no gap, and no
    /// second attachment.
    pub fn attach_pinned(
        &mut self,
        interface: &str,
        mode: config::XdpMode,
        pin_dir: &Path,
    ) -> Result<AttachedMode, Error> {
        let pin = link_pin(pin_dir, interface);
        if pin.exists() {
            let adopted = PinnedLink::from_pin(&pin)
                .map(FdLink::from)
                .and_then(XdpLink::try_from);
            match adopted {
                Ok(link) => match self.program_mut().attach_to_link(link) {
                    Ok(_) => {
                        self.attachments.push(Attachment {
                            interface: interface.to_owned(),
                            mode: AttachedMode::Adopted,
                            error: None,
                        });
                        return Ok(AttachedMode::Adopted);
                    }
                    Err(e) => {
                        tracing::warn!(interface, error = %e, "could not take over the pinned XDP link; attaching afresh")
                    }
                },
                Err(e) => {
                    tracing::warn!(interface, error = %e, "stale XDP link pin; attaching afresh")
                }
            }
            let _ = std::fs::remove_file(&pin);
        }
        let (mode, id) = self.attach_link(interface, mode)?;
        let link = self
            .program_mut()
            .take_link(id)
            .map_err(|source| Error::Link {
                interface: interface.to_owned(),
                source,
            })?;
        match FdLink::try_from(link) {
            Ok(fd) => {
                fd.pin(&pin)
                    .map_err(|source| Error::Pin { path: pin, source })?;
            }
            // Kernels without BPF links attach through netlink; such an
            // attachment cannot be pinned, but it outlives us all the same.
            Err(e) => tracing::warn!(interface, error = %e, "the XDP attachment cannot be pinned"),
        }
        Ok(mode)
    }

    /// Records that `interface` runs without XDP, and why. A link an
    /// earlier run pinned there is removed, which detaches its (older)
    /// program: call this only once nftables guards every protected port,
    /// since that program would otherwise drop the knocks the packet
    /// socket must see, against maps nothing reads any more.
    pub fn run_without(&mut self, interface: &str, pin_dir: &Path, why: String) {
        let pin = link_pin(pin_dir, interface);
        match std::fs::remove_file(&pin) {
            Ok(()) => {
                tracing::warn!(interface, pin = %pin.display(), "detached the XDP program an earlier run left")
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                tracing::warn!(interface, error = %e, "could not remove an earlier XDP link pin")
            }
        }
        self.attachments.push(Attachment {
            interface: interface.to_owned(),
            mode: AttachedMode::NftablesOnly,
            error: Some(why),
        });
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
