//! A real systemd, booted as PID 1 of its own PID, mount and cgroup
//! namespaces, in a network namespace a test made: what a host running
//! knockd's package looks like, on machines where systemd is not PID 1.
//!
//! The machine's root is an overlay over the host's `/` (writes go to a
//! tmpfs; the host's files are never touched), with a fresh `proc` (its
//! `sys` read-only), a read-only `sysfs`, its own cgroup2 subtree, the
//! host's bpffs bound in, and its own tmpfs on `/dev`, `/run` and `/tmp`:
//! without a private `/tmp`, `systemd-tmpfiles --remove` at boot would
//! empty the host's. Timers and the sysinit units that touch hardware,
//! clocks or the firewall are masked, and systemd boots to a target that
//! wants only the journal. Commands go in with `nsenter -t PID -a`.
//!
//! Dropping the machine kills its PID 1, which ends every process in it,
//! and removes its cgroup.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use crate::{NetNs, unique_name};

/// Units masked in the machine: timers, and sysinit or basic units that
/// would reach for hardware, the clock, the firewall or the host's files.
const MASKED: &[&str] = &[
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "systemd-modules-load.service",
    "systemd-sysctl.service",
    "systemd-remount-fs.service",
    "systemd-timesyncd.service",
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.service",
    "systemd-random-seed.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "dev-mqueue.mount",
    "kmod-static-nodes.service",
    "systemd-hwdb-update.service",
    "systemd-journal-catalog-update.service",
    "ldconfig.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    "systemd-pstore.service",
    "systemd-update-utmp.service",
    "systemd-ask-password-console.path",
    "systemd-ask-password-wall.path",
    "systemd-pcrphase-sysinit.service",
    "systemd-boot-system-token.service",
    "systemd-repart.service",
    "systemd-sysusers.service",
    "nftables.service",
    "networking.service",
    "ssh.service",
    "cron.service",
    "systemd-logind.service",
    "getty.target",
    "console-getty.service",
    "e2scrub_reap.service",
];

/// What PID 1 of the machine runs, as its shell script (run by the host's
/// `sh` inside the new namespaces, before it becomes systemd).
fn boot_script(root: &Path, masked: &[String]) -> String {
    let r = root.display();
    format!(
        r#"set -e
mkdir -p {r}/upper {r}/merged
mount -t tmpfs -o mode=755 tmpfs {r}/upper
mkdir -p {r}/upper/u {r}/upper/w
mount -t overlay overlay -o lowerdir=/,upperdir={r}/upper/u,workdir={r}/upper/w {r}/merged
M={r}/merged
mount -t proc proc $M/proc
mount --bind $M/proc/sys $M/proc/sys
mount -o remount,bind,ro $M/proc/sys
mount -t sysfs -o ro sysfs $M/sys
mount -t cgroup2 cgroup2 $M/sys/fs/cgroup
mount --bind /sys/fs/bpf $M/sys/fs/bpf
mount -t tmpfs -o mode=755 tmpfs $M/dev
for d in null zero full random urandom tty; do touch $M/dev/$d; mount --bind /dev/$d $M/dev/$d; done
mkdir -p $M/dev/pts $M/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=620 devpts $M/dev/pts
ln -s pts/ptmx $M/dev/ptmx
mount -t tmpfs -o mode=1777 tmpfs $M/dev/shm
ln -s /proc/self/fd $M/dev/fd
ln -s /proc/self/fd/0 $M/dev/stdin
ln -s /proc/self/fd/1 $M/dev/stdout
ln -s /proc/self/fd/2 $M/dev/stderr
mount -t tmpfs -o mode=755 tmpfs $M/run
mount -t tmpfs -o mode=1777 tmpfs $M/tmp
mkdir -p $M/etc/systemd/system
for u in $(cd $M/lib/systemd/system && ls *.timer) {masked}; do ln -sf /dev/null $M/etc/systemd/system/$u; done
printf '[Unit]\nDescription=knockd test machine\nWants=systemd-journald.service\n' > $M/etc/systemd/system/knockd-test.target
cd $M
mkdir -p oldroot
pivot_root . oldroot
umount -l /oldroot
exec /lib/systemd/systemd --system --unit=knockd-test.target
"#,
        masked = masked.join(" ")
    )
}

/// See the module documentation.
pub struct Machine {
    /// `unshare`, whose child is the machine's PID 1.
    child: Child,
    /// systemd's PID on the host.
    pid: u32,
    /// Where the overlay is mounted from (kept until the machine is gone).
    _root: tempfile::TempDir,
    cgroup: PathBuf,
}

impl Machine {
    /// Boots systemd in `netns` and waits until it is running.
    pub fn boot(netns: &NetNs) -> Machine {
        let root = tempfile::tempdir().unwrap();
        let cgroup = Path::new("/sys/fs/cgroup/unified").join(unique_name("sd"));
        let masked: Vec<String> = MASKED.iter().map(|u| (*u).to_owned()).collect();
        let script = boot_script(root.path(), &masked);
        // The cgroup first (systemd needs a cgroup2 subtree of its own to
        // manage), then the namespaces; `sh -c` runs as their PID 1.
        let outer = format!(
            "set -e; mkdir -p {cg}; echo $$ > {cg}/cgroup.procs; \
             exec unshare --pid --mount --cgroup --fork --propagation private sh -c \"$0\"",
            cg = cgroup.display()
        );
        let child = Command::new("nsenter")
            .arg(format!("--net={}", netns.path().display()))
            .args(["--", "sh", "-c", &outer, &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut machine = Machine {
            pid: 0,
            child,
            _root: root,
            cgroup,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        machine.pid = loop {
            if let Some(pid) = machine.systemd_pid() {
                break pid;
            }
            if let Some(status) = machine.child.try_wait().unwrap() {
                panic!("the machine did not boot: its PID 1 exited with {status}");
            }
            assert!(Instant::now() < deadline, "systemd did not start");
            std::thread::sleep(Duration::from_millis(50));
        };
        loop {
            let state = machine.sh("systemctl is-system-running 2>/dev/null || true");
            let state = String::from_utf8_lossy(&state.stdout).trim().to_owned();
            if matches!(state.as_str(), "running" | "degraded") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "systemd is {state:?}, not running, after 30 s"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        machine
    }

    /// The host PID of the machine's PID 1 (systemd), once it is exec'd: a
    /// child of `unshare` whose comm is "systemd".
    fn systemd_pid(&self) -> Option<u32> {
        let unshare = self.child.id();
        let children =
            std::fs::read_to_string(format!("/proc/{unshare}/task/{unshare}/children")).ok()?;
        // nsenter execs sh, which execs unshare: the child's pid is unshare's.
        children
            .split_whitespace()
            .filter_map(|p| p.parse::<u32>().ok())
            .find(|p| {
                std::fs::read_to_string(format!("/proc/{p}/comm"))
                    .is_ok_and(|c| c.trim() == "systemd")
            })
    }

    /// Runs `script` with `sh -c` inside the machine (all its namespaces).
    pub fn sh(&self, script: &str) -> Output {
        Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-a", "sh", "-c", script])
            .output()
            .unwrap()
    }

    /// [`sh`](Self::sh), which must succeed; its stdout.
    #[track_caller]
    pub fn ok(&self, script: &str) -> String {
        let out = self.sh(script);
        if !out.status.success() {
            let journal = self.sh("journalctl --no-pager -n 40 -o short-iso");
            panic!(
                "{script}: {}\n{}{}\nthe machine's journal:\n{}",
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&journal.stdout)
            );
        }
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// Writes `contents` to `path` inside the machine, with `mode`.
    #[track_caller]
    pub fn write(&self, path: &str, contents: &str, mode: u32) {
        self.write_bytes(path, contents.as_bytes(), mode);
    }

    /// Copies the host's file `from` to `to` inside the machine (whose
    /// `/tmp` is its own: a host path there is not the host's file).
    #[track_caller]
    pub fn copy_in(&self, from: &Path, to: &str) {
        self.write_bytes(to, &std::fs::read(from).unwrap(), 0o644);
    }

    #[track_caller]
    fn write_bytes(&self, path: &str, contents: &[u8], mode: u32) {
        use std::io::Write as _;
        let mut child = Command::new("nsenter")
            .args(["-t", &self.pid.to_string(), "-a", "sh", "-c"])
            .arg(format!(
                "mkdir -p \"$(dirname {path})\" && cat > {path} && chmod {mode:o} {path}"
            ))
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(contents).unwrap();
        assert!(child.wait().unwrap().success(), "writing {path}");
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        if self.pid != 0 {
            // SAFETY: a kill(2) of a PID this machine owns.
            unsafe { libc::kill(self.pid as i32, libc::SIGKILL) };
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        // systemd's sub-cgroups, deepest first, once their processes are gone.
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.cgroup.exists() && Instant::now() < deadline {
            let _ = Command::new("find")
                .arg(&self.cgroup)
                .args(["-depth", "-type", "d", "-exec", "rmdir", "{}", ";"])
                .stderr(Stdio::null())
                .status();
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}
