//! The kernel suite: the smoke tests (`tests/tests/kernel.rs`) on the
//! kernels users run, each booted in a virtual machine.
//!
//! A kernel is a Debian package, fetched with `apt-get download` and
//! unpacked into `target/kernels/` (never installed on this host). QEMU
//! boots it with a tiny initramfs (busybox and the virtio and 9p modules),
//! which mounts this host's root read-only over 9p and runs the smoke test
//! binary built here, with the kernel's own modules for everything else
//! (the kernel's modprobe helper points into the unpacked tree). The guest
//! prints its results on the serial console, which this module reads.
//!
//! KVM is tried first when `/dev/kvm` exists, but nested KVM can hang the
//! guest in its decompressor or refuse the CPU model, so a guest that has
//! not booted within [`KVM_BOOT_TIMEOUT`] is killed and booted again under
//! TCG (emulation: slower, always there). `KNOCKD_VM_ACCEL=tcg|kvm` forces
//! one.

use std::{
    io::{BufRead as _, BufReader, Write as _},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};

/// A kernel the suite runs on.
pub struct Kernel {
    /// How the summary names it.
    pub label: &'static str,
    pub source: Source,
}

/// Where a kernel comes from.
pub enum Source {
    /// A Debian package: an image package, or a metapackage such as
    /// `linux-image-amd64`, which names the current build of its series.
    Debian(&'static str),
    /// The kernel this machine runs: the smoke suite runs here directly,
    /// with the rest of the privileged tests.
    Host,
}

/// The kernels the suite covers. To add one, add a line: any Debian kernel
/// image package (or metapackage) that `apt-get download` can fetch here.
pub const KERNELS: &[Kernel] = &[
    Kernel {
        label: "Debian 12 (bookworm), current",
        source: Source::Debian("linux-image-amd64"),
    },
    Kernel {
        label: "this machine",
        source: Source::Host,
    },
];

/// The verifier gives up at 1,000,000 processed instructions; every kernel
/// must accept the program with a 4x margin (the smoke suite asserts it,
/// and the summary prints it).
pub const VERIFIER_BUDGET: u64 = 250_000;

/// How long a KVM guest may take to say it booted before it is taken for
/// hung (nested KVM stalling in the decompressor) and TCG is used instead.
const KVM_BOOT_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a whole guest run may take (TCG, a 2-core machine).
const GUEST_TIMEOUT: Duration = Duration::from_secs(20 * 60);

/// What one kernel's run found.
pub struct Outcome {
    pub label: &'static str,
    /// `uname -r` where the suite ran.
    pub release: String,
    /// The verifier's processed-instruction count there.
    pub verified: Option<u64>,
    /// Smoke tests passed and failed (None: run with the privileged suite).
    pub smoke: Option<(u64, u64)>,
    /// "kvm", "tcg", or "host".
    pub accel: &'static str,
    pub seconds: f64,
}

impl Outcome {
    /// One line of the summary.
    pub fn line(&self) -> String {
        let verified = match self.verified {
            Some(n) => format!(
                "verifier {n} instructions ({:.1}x under the limit)",
                1_000_000.0 / n.max(1) as f64
            ),
            None => "verifier count not reported".to_owned(),
        };
        let smoke = match self.smoke {
            Some((passed, failed)) => format!("smoke {passed} passed, {failed} failed"),
            None => "smoke in the privileged suite".to_owned(),
        };
        format!(
            "{} (Linux {}): {verified}; {smoke}; {}, {:.0}s",
            self.label, self.release, self.accel, self.seconds
        )
    }

    /// Whether this kernel passes: the program verified within budget and
    /// every smoke test passed.
    pub fn ok(&self) -> bool {
        self.verified.is_some_and(|n| n <= VERIFIER_BUDGET)
            && self
                .smoke
                .is_none_or(|(passed, failed)| passed > 0 && failed == 0)
    }
}

/// Runs the suite on every kernel of [`KERNELS`]: `knockd` and `knockctl`
/// built beside the smoke test binary `smoke`.
pub fn run_all(root: &Path, knockd: &Path, smoke: &Path) -> Result<Vec<Outcome>> {
    KERNELS
        .iter()
        .map(|kernel| match kernel.source {
            Source::Debian(package) => guest(root, kernel.label, package, knockd, smoke),
            Source::Host => host(kernel.label, knockd),
        })
        .collect()
}

/// This machine's kernel: only the count here (the smoke tests run with
/// the privileged suite on this kernel anyway).
fn host(label: &'static str, knockd: &Path) -> Result<Outcome> {
    let start = Instant::now();
    let out = Command::new(knockd)
        .arg("verify")
        .output()
        .with_context(|| format!("running {} verify", knockd.display()))?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "this machine's kernel rejects the XDP program: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(Outcome {
        label,
        release: std::fs::read_to_string("/proc/sys/kernel/osrelease")?
            .trim()
            .to_owned(),
        verified: verified_count(&text),
        smoke: None,
        accel: "host",
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The count from `knockd verify`'s line.
fn verified_count(text: &str) -> Option<u64> {
    let line = text
        .lines()
        .find(|l| l.contains("instructions processed"))?;
    let (_, after) = line.split_once(": ")?;
    after.split_whitespace().next()?.parse().ok()
}

/// A kernel unpacked under `target/kernels/NAME/`: its image, its modules
/// (with a modules.dep), and an initramfs that boots it into the host root.
struct Unpacked {
    release: String,
    vmlinuz: PathBuf,
    initrd: PathBuf,
    /// The unpacked tree: `lib/modules/RELEASE` is under it.
    root: PathBuf,
}

/// The image package a (meta)package names: itself if it is one.
fn image_package(package: &str) -> Result<String> {
    let depends = |package: &str| {
        Command::new("apt-cache")
            .args(["depends", package])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    let found = depends(package).filter(|d| !d.trim().is_empty());
    let text = match found {
        Some(text) => text,
        None => {
            // A machine whose package lists were never fetched.
            super::run(
                Command::new("apt-get")
                    .args(["update", "-qq"])
                    .env("DEBIAN_FRONTEND", "noninteractive"),
            )?;
            depends(package).with_context(|| format!("apt-cache knows no package {package}"))?
        }
    };
    let image = text.lines().find_map(|line| {
        let name = line.trim().strip_prefix("Depends: ")?;
        (name.starts_with("linux-image-") && !name.contains("unsigned")).then(|| name.to_owned())
    });
    Ok(image.unwrap_or_else(|| package.to_owned()))
}

/// Fetches and unpacks `package` once; later runs reuse the tree.
fn unpack(root: &Path, package: &str) -> Result<Unpacked> {
    let image = image_package(package)?;
    let dir = root.join("target/kernels").join(&image);
    let done = dir.join(".unpacked");
    if !done.exists() {
        println!("kernel suite: fetching {image} (not installed: unpacked under target/kernels)");
        let _ = std::fs::remove_dir_all(&dir);
        let download = dir.join("download");
        std::fs::create_dir_all(&download)?;
        super::run(
            Command::new("apt-get")
                .args(["download", "-qq", &image])
                .current_dir(&download),
        )?;
        let deb = std::fs::read_dir(&download)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| p.extension().is_some_and(|e| e == "deb"))
            .context("apt-get download left no .deb")?;
        super::run(
            Command::new("dpkg-deb")
                .arg("-x")
                .arg(&deb)
                .arg(dir.join("tree")),
        )?;
        std::fs::remove_dir_all(&download)?;
        let release = release_of(&dir.join("tree"))?;
        // The package's postinst would run depmod; we unpacked it instead.
        super::run(
            Command::new("depmod")
                .arg("-b")
                .arg(dir.join("tree"))
                .arg(&release),
        )?;
        initramfs(&dir, &release)?;
        std::fs::write(&done, &release)?;
    }
    let release = std::fs::read_to_string(&done)?;
    Ok(Unpacked {
        vmlinuz: dir.join(format!("tree/boot/vmlinuz-{release}")),
        initrd: dir.join("initrd.gz"),
        root: dir.join("tree"),
        release,
    })
}

/// The one release under `tree/lib/modules`.
fn release_of(tree: &Path) -> Result<String> {
    let modules = tree.join("lib/modules");
    let mut releases: Vec<String> = std::fs::read_dir(&modules)
        .with_context(|| format!("reading {}", modules.display()))?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    ensure!(
        releases.len() == 1,
        "{} holds {releases:?}, not one release",
        modules.display()
    );
    Ok(releases.remove(0))
}

/// Modules the initramfs loads to reach the host root: virtio PCI, 9p over
/// virtio, and the virtio RNG (the guest's entropy).
const BOOT_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p", "virtio_rng"];

/// The guest's first process: mounts the host root read-only over 9p, with
/// tmpfs where the suite writes (/run, which also holds TMPDIR), then runs
/// the script named on the kernel command line and powers off.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do insmod /modules/$m || echo "VM: insmod $m failed"; done
if ! mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000,cache=loose hostroot /newroot; then
  echo "VM-RESULT: 125 (the host root could not be mounted)"; poweroff -f
fi
echo VM-BOOTED
for d in proc sys dev; do mount --move /$d /newroot/$d; done
mount -t tmpfs tmpfs /newroot/run
for arg in $(cat /newroot/proc/cmdline); do
  case $arg in knockd.run=*) run=${arg#knockd.run=};; knockd.modprobe=*) modprobe=${arg#knockd.modprobe=};; esac
done
exec switch_root /newroot /bin/busybox sh -c "
  export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin TMPDIR=/run/tmp
  mkdir -p /run/tmp /dev/pts /dev/shm
  mount -t devpts devpts /dev/pts; mount -t tmpfs tmpfs /dev/shm; mount -t bpf bpf /sys/fs/bpf
  echo $modprobe > /proc/sys/kernel/modprobe
  ip link set lo up
  sh $run; echo VM-RESULT: \$?
  /bin/busybox poweroff -f"
"#;

/// Builds `dir/initrd.gz`: busybox, the boot modules in load order, INIT.
fn initramfs(dir: &Path, release: &str) -> Result<()> {
    let staging = dir.join("initramfs");
    let _ = std::fs::remove_dir_all(&staging);
    for sub in ["bin", "modules", "proc", "sys", "dev", "newroot"] {
        std::fs::create_dir_all(staging.join(sub))?;
    }
    std::fs::copy("/bin/busybox", staging.join("bin/busybox"))
        .context("copying /bin/busybox (Debian's busybox-static)")?;
    let tree = dir.join("tree");
    let mut order = Vec::new();
    for module in BOOT_MODULES {
        let out = Command::new("modprobe")
            .arg("-d")
            .arg(&tree)
            .args(["-S", release, "--show-depends", module])
            .output()
            .context("modprobe --show-depends")?;
        ensure!(
            out.status.success(),
            "{release} has no module {module}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let Some(path) = line.strip_prefix("insmod ") else {
                continue; // built in
            };
            let path = PathBuf::from(path.trim());
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            if !order.contains(&name) {
                std::fs::copy(&path, staging.join("modules").join(&name))?;
                order.push(name);
            }
        }
    }
    std::fs::write(staging.join("modules/order"), order.join("\n") + "\n")?;
    let init = staging.join("init");
    std::fs::write(&init, INIT)?;
    std::fs::set_permissions(&init, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    let archive = dir.join("initrd.gz");
    super::run(
        Command::new("sh")
            .arg("-c")
            .arg("find . | cpio -o -H newc --quiet | gzip -1 > \"$0\"")
            .arg(&archive)
            .current_dir(&staging),
    )?;
    Ok(())
}

/// Boots `package`'s kernel and runs the smoke suite in it.
fn guest(
    root: &Path,
    label: &'static str,
    package: &str,
    knockd: &Path,
    smoke: &Path,
) -> Result<Outcome> {
    let start = Instant::now();
    let kernel = unpack(root, package)?;
    let scripts = root.join("target/vm");
    std::fs::create_dir_all(&scripts)?;
    // The kernel runs this to load its own modules (nf_tables, veth, ...)
    // from the unpacked tree.
    let modprobe = scripts.join(format!("modprobe-{}", kernel.release));
    std::fs::write(
        &modprobe,
        format!(
            "#!/bin/sh\nexec /sbin/modprobe -d '{}' -S '{}' \"$@\"\n",
            kernel.root.display(),
            kernel.release
        ),
    )?;
    std::fs::set_permissions(
        &modprobe,
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )?;
    let run = scripts.join(format!("run-{}.sh", kernel.release));
    std::fs::write(
        &run,
        format!(
            "echo \"VM-KERNEL: $(uname -r)\"\n\
             '{knockd}' verify || exit 1\n\
             CI=true KNOCKD_BIN='{knockd}' '{smoke}' --test-threads=1 --color never\n",
            knockd = knockd.display(),
            smoke = smoke.display(),
        ),
    )?;
    let forced = std::env::var("KNOCKD_VM_ACCEL").ok();
    let kvm_usable = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    let tries: &[&'static str] = match forced.as_deref() {
        Some("kvm") => &["kvm"],
        Some("tcg") => &["tcg"],
        Some(other) => bail!("KNOCKD_VM_ACCEL={other}: kvm or tcg"),
        None if kvm_usable => &["kvm", "tcg"],
        None => &["tcg"],
    };
    let mut last_error = None;
    for &accel in tries {
        println!("kernel suite: booting {} ({accel})", kernel.release);
        match boot(&kernel, accel, &run, &modprobe) {
            Ok(Boot::Ran(console)) => {
                return Ok(Outcome {
                    label,
                    release: kernel.release.clone(),
                    verified: verified_count(&console),
                    smoke: smoke_tally(&console),
                    accel,
                    seconds: start.elapsed().as_secs_f64(),
                });
            }
            Ok(Boot::NoBoot(why)) => {
                println!("kernel suite: {accel} did not boot the guest ({why}); trying the next");
                last_error = Some(why);
            }
            Err(e) => return Err(e),
        }
    }
    bail!(
        "the guest for {} never booted: {}",
        kernel.release,
        last_error.unwrap_or_default()
    )
}

/// How a boot went.
enum Boot {
    /// The guest booted and ran the script; its console.
    Ran(String),
    /// It never reached the marker (a hung or refused accelerator).
    NoBoot(String),
}

/// Boots the guest once, echoing its console, until it powers off.
fn boot(kernel: &Unpacked, accel: &str, run: &Path, modprobe: &Path) -> Result<Boot> {
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-machine", &format!("q35,accel={accel}")])
        .args(["-cpu", if accel == "kvm" { "host" } else { "max" }])
        .args(["-smp", "2", "-m", "2048"])
        .args(["-nographic", "-no-reboot", "-nic", "none"])
        .arg("-kernel")
        .arg(&kernel.vmlinuz)
        .arg("-initrd")
        .arg(&kernel.initrd)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 panic=-1 quiet knockd.run={} knockd.modprobe={}",
            run.display(),
            modprobe.display()
        ))
        .args([
            "-fsdev",
            "local,id=root,path=/,security_model=none,readonly=on,multidevs=remap",
            "-device",
            "virtio-9p-pci,fsdev=root,mount_tag=hostroot",
            "-device",
            "virtio-rng-pci",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let (tx, lines) = mpsc::channel();
    for stream in [
        Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ] {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let start = Instant::now();
    let mut console = String::new();
    let mut booted = false;
    let mut stdout = std::io::stdout();
    loop {
        let limit = if booted || accel != "kvm" {
            GUEST_TIMEOUT
        } else {
            KVM_BOOT_TIMEOUT
        };
        let left = limit.saturating_sub(start.elapsed());
        match lines.recv_timeout(left) {
            Ok(line) => {
                // The console has terminal escapes from the firmware.
                let line: String = line.chars().filter(|c| !c.is_control()).collect();
                booted |= line.contains("VM-BOOTED");
                let _ = writeln!(stdout, "vm| {line}");
                console.push_str(&line);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                if !booted {
                    return Ok(Boot::NoBoot(format!("no boot within {limit:?}")));
                }
                bail!("the guest ran past {GUEST_TIMEOUT:?}");
            }
        }
    }
    let status = child.wait()?;
    if !booted {
        return Ok(Boot::NoBoot(format!(
            "qemu exited with {status} before the guest booted"
        )));
    }
    let result = console
        .lines()
        .find_map(|l| l.trim().strip_prefix("VM-RESULT: "))
        .map(str::to_owned);
    match result {
        Some(_) => Ok(Boot::Ran(console)),
        None => bail!("the guest stopped without a result ({status})"),
    }
}

/// Passed and failed from the smoke binary's `test result:` line.
fn smoke_tally(console: &str) -> Option<(u64, u64)> {
    let line = console.lines().find(|l| l.contains("test result:"))?;
    let number_before = |word: &str| {
        let at = line.find(word)?;
        line[..at].split_whitespace().last()?.parse().ok()
    };
    Some((number_before(" passed")?, number_before(" failed")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_count_is_read_from_knockd_verify() {
        assert_eq!(
            verified_count(
                "the XDP program verified on Linux 6.1.0-57-amd64: 26505 instructions processed (limit 1000000)\n"
            ),
            Some(26505)
        );
        assert_eq!(verified_count("rejected\n"), None);
    }

    #[test]
    fn the_tally_is_read_from_the_console() {
        let console = "vm junk\ntest result: ok. 4 passed; 0 failed; 0 ignored; 0 measured\n";
        assert_eq!(smoke_tally(console), Some((4, 0)));
        let failed = "test result: FAILED. 3 passed; 1 failed; 0 ignored\n";
        assert_eq!(smoke_tally(failed), Some((3, 1)));
        assert_eq!(smoke_tally("VM-RESULT: 1\n"), None);
    }

    #[test]
    fn a_kernel_over_budget_or_with_a_failure_fails() {
        let outcome = |verified, smoke| Outcome {
            label: "k",
            release: "6.1".into(),
            verified,
            smoke,
            accel: "tcg",
            seconds: 1.0,
        };
        assert!(outcome(Some(26_505), Some((4, 0))).ok());
        assert!(outcome(Some(26_505), None).ok());
        assert!(!outcome(Some(VERIFIER_BUDGET + 1), Some((4, 0))).ok());
        assert!(!outcome(None, Some((4, 0))).ok());
        assert!(!outcome(Some(1), Some((3, 1))).ok());
        assert!(!outcome(Some(1), Some((0, 0))).ok());
    }
}
