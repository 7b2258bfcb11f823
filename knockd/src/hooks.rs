//! A door's hooks ([`crate::config::Hooks`]): the command line and
//! environment of one run (pure, unit-tested), and, in the daemon, running
//! it off the knock path.
//!
//! Security model: hooks are written in the configuration, which only
//! root may write (the daemon refuses to start otherwise, as for key
//! files); each names the user it runs as. A command runs without a shell
//! and with a clean environment, so nothing a knocker sends reaches it but
//! the source address (`%IP%` and `KNOCKD_SOURCE`, an address the kernel
//! parsed, never text) and the door, device and port knockd chose.

use std::{fmt, net::IpAddr};

use crate::config::Hooks;

/// When a hook runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookEvent {
    /// A grant opened.
    Open,
    /// A grant ended.
    Close,
}

impl HookEvent {
    pub fn name(self) -> &'static str {
        match self {
            HookEvent::Open => "open",
            HookEvent::Close => "close",
        }
    }
}

/// One run of a door's hook, with the grant's facts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HookRun {
    pub event: HookEvent,
    pub door: String,
    pub source: IpAddr,
    pub device: Option<String>,
    /// The granted port (a static door's service port).
    pub port: u16,
    pub hooks: Hooks,
}

/// The PATH a hook sees (its environment is otherwise knockd's own facts).
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

impl HookRun {
    /// The argv for this event, `%IP%` replaced by the source address;
    /// `None` when the door has no command for it.
    pub fn argv(&self) -> Option<Vec<String>> {
        let argv = match self.event {
            HookEvent::Open => &self.hooks.on_open,
            HookEvent::Close => &self.hooks.on_close,
        };
        if argv.is_empty() {
            return None;
        }
        let ip = self.source.to_string();
        Some(argv.iter().map(|a| a.replace("%IP%", &ip)).collect())
    }

    /// The whole environment of the command.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        let family = if self.source.is_ipv4() {
            "ipv4"
        } else {
            "ipv6"
        };
        let mut env = vec![
            ("PATH", PATH.to_owned()),
            ("KNOCKD_EVENT", self.event.name().to_owned()),
            ("KNOCKD_DOOR", self.door.clone()),
            ("KNOCKD_SOURCE", self.source.to_string()),
            ("KNOCKD_FAMILY", family.to_owned()),
            // Empty for an action door's grant, which opens no port.
            (
                "KNOCKD_PORT",
                if self.port == 0 {
                    String::new()
                } else {
                    self.port.to_string()
                },
            ),
        ];
        if let Some(device) = &self.device {
            env.push(("KNOCKD_DEVICE", device.clone()));
        }
        env
    }
}

/// How hooks went, since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HookCounts {
    pub started: u64,
    /// Could not start, or exited other than 0.
    pub failed: u64,
    /// Killed at their timeout (counted in `failed` too).
    pub timed_out: u64,
}

impl fmt::Display for HookEvent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

#[cfg(feature = "daemon")]
pub use runner::{Runner, resolve};

#[cfg(feature = "daemon")]
mod runner {
    use std::{
        process::Stdio,
        sync::{
            Arc,
            atomic::{AtomicU64, Ordering},
        },
        time::Duration,
    };

    use nix::{
        sys::signal::{Signal, killpg},
        unistd::{Group, Pid, User},
    };
    use tokio::io::AsyncReadExt as _;

    use super::{HookCounts, HookRun};

    /// The user and group ids of `hooks`' user and group (the group: the
    /// user's own unless named), or why not.
    pub fn resolve(user: &str, group: Option<&str>) -> Result<(u32, u32), String> {
        let found = User::from_name(user)
            .map_err(|e| format!("looking up user {user:?}: {e}"))?
            .ok_or_else(|| format!("no user {user:?} on this host"))?;
        let gid = match group {
            None => found.gid.as_raw(),
            Some(name) => Group::from_name(name)
                .map_err(|e| format!("looking up group {name:?}: {e}"))?
                .ok_or_else(|| format!("no group {name:?} on this host"))?
                .gid
                .as_raw(),
        };
        Ok((found.uid.as_raw(), gid))
    }

    /// Bytes of a hook's output that reach the log.
    const OUTPUT_MAX: u64 = 4096;

    /// Starts hooks as tasks of the daemon's runtime and counts how they
    /// end. Running one never waits: the knock path goes on at once.
    #[derive(Default, Clone)]
    pub struct Runner {
        started: Arc<AtomicU64>,
        failed: Arc<AtomicU64>,
        timed_out: Arc<AtomicU64>,
    }

    impl Runner {
        pub fn counts(&self) -> HookCounts {
            HookCounts {
                started: self.started.load(Ordering::Relaxed),
                failed: self.failed.load(Ordering::Relaxed),
                timed_out: self.timed_out.load(Ordering::Relaxed),
            }
        }

        /// Runs `run` in the background (outside a runtime, as in unit
        /// tests, it is only counted as failed).
        pub fn start(&self, run: HookRun) {
            let Some(argv) = run.argv() else { return };
            self.started.fetch_add(1, Ordering::Relaxed);
            let this = self.clone();
            match tokio::runtime::Handle::try_current() {
                Ok(handle) => {
                    handle.spawn(async move { this.run(run, argv).await });
                }
                Err(_) => this.failed(&run, "no runtime to run it on".into()),
            }
        }

        fn failed(&self, run: &HookRun, why: String) {
            self.failed.fetch_add(1, Ordering::Relaxed);
            tracing::warn!(door = %run.door, event = %run.event, source = %run.source, %why, "hook failed");
        }

        async fn run(self, run: HookRun, argv: Vec<String>) {
            let (uid, gid) = match resolve(&run.hooks.user, run.hooks.group.as_deref()) {
                Ok(ids) => ids,
                Err(why) => return self.failed(&run, why),
            };
            let mut command = tokio::process::Command::new(&argv[0]);
            command
                .args(&argv[1..])
                .env_clear()
                .envs(run.env())
                .current_dir("/")
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                // Dropping from root clears the supplementary groups too.
                .uid(uid)
                .gid(gid)
                // A group of its own, so a timeout kills what it started
                // too (a shell's children).
                .process_group(0)
                .kill_on_drop(true);
            let mut child = match command.spawn() {
                Ok(child) => child,
                Err(e) => return self.failed(&run, format!("{}: {e}", argv[0])),
            };
            let read = |pipe: Option<Box<dyn tokio::io::AsyncRead + Unpin + Send>>| async move {
                let mut text = Vec::new();
                if let Some(pipe) = pipe {
                    let _ = pipe.take(OUTPUT_MAX).read_to_end(&mut text).await;
                }
                String::from_utf8_lossy(&text).into_owned()
            };
            let pid = child.id();
            let stdout = child.stdout.take().map(|p| Box::new(p) as Box<_>);
            let stderr = child.stderr.take().map(|p| Box::new(p) as Box<_>);
            let timeout = Duration::from_secs(u64::from(run.hooks.timeout_secs));
            let waited = tokio::time::timeout(timeout, async {
                let (out, err) = tokio::join!(read(stdout), read(stderr));
                (child.wait().await, out, err)
            })
            .await;
            let (status, out, err) = match waited {
                Ok(done) => done,
                Err(_) => {
                    if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
                        let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
                    }
                    self.timed_out.fetch_add(1, Ordering::Relaxed);
                    return self.failed(
                        &run,
                        format!("still running after {} s: killed", run.hooks.timeout_secs),
                    );
                }
            };
            for line in out.lines().chain(err.lines()).filter(|l| !l.is_empty()) {
                tracing::info!(door = %run.door, event = %run.event, output = line, "hook");
            }
            match status {
                Ok(status) if status.success() => {
                    tracing::info!(door = %run.door, event = %run.event, source = %run.source, "hook ran");
                }
                Ok(status) => self.failed(&run, format!("exited with {status}")),
                Err(e) => self.failed(&run, format!("waiting for it: {e}")),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(event: HookEvent, source: &str) -> HookRun {
        HookRun {
            event,
            door: "game".into(),
            source: source.parse().unwrap(),
            device: Some("laptop".into()),
            port: 25565,
            hooks: Hooks {
                on_open: vec!["/srv/wake".into(), "--for=%IP%".into(), "%IP%%IP%".into()],
                on_close: Vec::new(),
                user: "nobody".into(),
                group: None,
                timeout_secs: 10,
            },
        }
    }

    #[test]
    fn the_command_line_has_the_source_for_ip_and_nothing_else_is_substituted() {
        let open = run(HookEvent::Open, "198.18.0.2");
        assert_eq!(
            open.argv().unwrap(),
            ["/srv/wake", "--for=198.18.0.2", "198.18.0.2198.18.0.2"]
        );
        assert_eq!(
            run(HookEvent::Close, "198.18.0.2").argv(),
            None,
            "no on_close"
        );
    }

    #[test]
    fn the_environment_holds_the_grants_facts_only() {
        let env = run(HookEvent::Open, "2001:db8::2").env();
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("KNOCKD_EVENT"), Some("open"));
        assert_eq!(get("KNOCKD_DOOR"), Some("game"));
        assert_eq!(get("KNOCKD_SOURCE"), Some("2001:db8::2"));
        assert_eq!(get("KNOCKD_FAMILY"), Some("ipv6"));
        assert_eq!(get("KNOCKD_PORT"), Some("25565"));
        assert_eq!(get("KNOCKD_DEVICE"), Some("laptop"));
        assert_eq!(env.len(), 7, "PATH and the six facts");
    }
}
