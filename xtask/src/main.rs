//! knockd's project tasks.
//!
//! - `cargo xtask setup`: installs, idempotently, what a fresh machine lacks.
//! - `cargo xtask test`: what CI runs: setup, lints, unit tests, privileged tests.
//! - `cargo xtask demo`: the daemon between two namespaces, with live traffic.
//! - `cargo xtask deb`: the Debian package.
//!
//! xtask depends on nothing that needs the toolchain it installs, so it
//! builds on a bare machine.

use std::{
    ffi::OsStr,
    io::{BufRead as _, BufReader},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail, ensure};
use clap::{Parser, Subcommand};

mod clib;
mod clients;
mod mcu;
mod vm;
#[path = "../../knockd/xdp_stamp.rs"]
mod xdp_stamp;

/// Files the build reads from the [`Need::Build`] packages: checked after
/// installing, since a package name can be there (an earlier hand install,
/// a different version) without the file the build needs.
const BUILD_FILES: &[(&str, &str)] = &[
    ("/usr/include/libnftnl/rule.h", "libnftnl-dev"),
    ("/usr/include/libmnl/libmnl.h", "libmnl-dev"),
    ("/usr/bin/protoc", "protobuf-compiler"),
    // etcd-client's .proto files import these; protobuf-compiler ships none.
    (
        "/usr/include/google/protobuf/descriptor.proto",
        "libprotobuf-dev",
    ),
    (
        "/usr/include/google/protobuf/empty.proto",
        "libprotobuf-dev",
    ),
];

/// What a Debian package of [`APT_PACKAGES`] is for.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Need {
    /// Building and packaging knockd and knockctl (`cargo xtask setup
    /// --build`): with the committed XDP object, no eBPF toolchain.
    Build,
    /// The eBPF toolchain, the tests, the demo and the benchmarks.
    Rig,
}

/// Debian packages `cargo xtask setup` installs, and what each is for.
const APT_PACKAGES: &[(&str, Need)] = &[
    // bpf-linker links against LLVM 22.
    ("llvm-22-dev", Need::Rig),
    ("libpolly-22-dev", Need::Rig),
    ("libzstd-dev", Need::Rig),
    ("zlib1g-dev", Need::Rig),
    // nftables, for the grant tables.
    ("libnftnl-dev", Need::Build),
    ("libmnl-dev", Need::Build),
    ("nftables", Need::Rig),
    ("pkg-config", Need::Build),
    // Namespaces, veth, nsenter.
    ("iproute2", Need::Rig),
    ("util-linux", Need::Rig),
    // Real peers for tests and the demo: knockd's stock `knock` client.
    ("knockd", Need::Rig),
    // sshd and ssh, for the ProxyCommand test.
    ("openssh-server", Need::Rig),
    ("openssh-client", Need::Rig),
    // The independent Python check of the protocol's test vectors.
    ("python3", Need::Rig),
    ("python3-cryptography", Need::Rig),
    ("nmap", Need::Rig),
    ("netcat-openbsd", Need::Rig),
    // conntrack-tools' `conntrack`: an independent look at the flows that
    // revoke cuts.
    ("conntrack", Need::Rig),
    // iptables-nft: the old firewall's DROP that the conflict check names.
    ("iptables", Need::Rig),
    // Replaying captured knocks as an attacker would.
    ("tcpreplay", Need::Rig),
    // The benchmarks read veth's per-queue counters and turn GRO on.
    ("ethtool", Need::Rig),
    // xdp-filter: what operators run to drop by port at XDP, the drop
    // bench's peer.
    ("xdp-tools", Need::Rig),
    // Fleet mode: the etcd-client crate generates its gRPC code with
    // protoc; the fleet tests, demo and benchmark run a real etcd cluster
    // (etcdctl sets up users and roles; openssl makes the TLS material).
    ("protobuf-compiler", Need::Build),
    // protoc's well-known types (google/protobuf/*.proto), which
    // etcd-client's .proto files import: protobuf-compiler ships none.
    ("libprotobuf-dev", Need::Build),
    ("etcd-server", Need::Rig),
    ("etcd-client", Need::Rig),
    ("openssl", Need::Rig),
    // The kernel suite: Debian 12's own kernel booted in a VM (qemu, TCG or
    // KVM) from a tiny initramfs (busybox, modprobe from kmod, cpio).
    ("qemu-system-x86", Need::Rig),
    // The protocol crate's vectors on an emulated Cortex-M4F (mcu/).
    ("qemu-system-arm", Need::Rig),
    // knockctl for Windows (mingw-w64, run under Wine) and ARM Linux
    // (Debian's cross compilers, run under qemu-user), each against a live
    // daemon in the privileged tests.
    ("gcc-mingw-w64-x86-64", Need::Rig),
    ("wine64", Need::Rig),
    ("gcc-aarch64-linux-gnu", Need::Rig),
    ("libc6-dev-arm64-cross", Need::Rig),
    ("gcc-arm-linux-gnueabihf", Need::Rig),
    ("libc6-dev-armhf-cross", Need::Rig),
    ("qemu-user", Need::Rig),
    ("busybox-static", Need::Rig),
    ("kmod", Need::Rig),
    ("cpio", Need::Rig),
    // `cargo xtask deb`: dpkg-deb, strip, gzip.
    ("dpkg-dev", Need::Build),
    ("binutils", Need::Build),
    ("gzip", Need::Build),
];

/// The bpf-linker release we build; 0.13 is the one known to build with
/// LLVM 22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

#[derive(Parser)]
#[command(about = "knockd project tasks")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the toolchain and system packages (idempotent; needs root).
    Setup {
        /// Only what building and packaging knockd needs (stable Rust and
        /// a few C libraries; the XDP object is committed), not the eBPF
        /// toolchain or the test rig.
        #[arg(long)]
        build: bool,
    },
    /// Compile the XDP program (needs the eBPF toolchain) and commit-ready
    /// write it to knockd/xdp/knockd-xdp.o with its source stamp.
    Xdp,
    /// Setup, then fmt, clippy, unit tests and privileged tests (needs root).
    Test {
        /// Only run tests whose name contains this (both suites).
        filter: Option<String>,
    },
    /// The kernel suite alone: the smoke tests in a VM on each kernel of
    /// `xtask/src/vm.rs` (Debian 12's current kernel first), and the
    /// verifier's count on each (part of `test`).
    Kernels,
    /// The protocol on devices alone: knockd-proto and the C library built
    /// for a Cortex-M4F and an ESP32-C3; the vectors, the time of a knock
    /// and the footprint on QEMU's Cortex-M4F; the C example against the
    /// vectors (part of `test`).
    Mcu,
    /// Regenerate knockd-proto-c/include/knockd.h (cbindgen) after the C
    /// library's interface changed.
    Header,
    /// Run knockd between two network namespaces and show it working;
    /// `demo cluster`: a fleet of three nodes on a real 3-member etcd.
    Demo {
        /// `cluster` for the fleet demo.
        which: Option<String>,
    },
    /// Build the Debian package (release binaries, the unit, the example
    /// configuration, man pages, completions) into target/deb/.
    Deb {
        /// The package version (default: the workspace's).
        #[arg(long)]
        version: Option<String>,
        /// Instead, the upgrade test's package of an older map layout, in
        /// target/deb-old-layout (needs the repository's history).
        #[arg(long)]
        old_layout: bool,
    },
    /// Runs the cargo-fuzz targets (nightly, libFuzzer; `xdp_guard` needs
    /// root), each for `--time` seconds or `--runs` executions, and prints
    /// executions and crashes per target.
    Fuzz {
        /// One target (default: all of them).
        target: Option<String>,
        /// Seconds per target.
        #[arg(long, default_value_t = 60)]
        time: u64,
        /// Executions per target instead of a time (stops at whichever
        /// comes first when both are given).
        #[arg(long)]
        runs: Option<u64>,
    },
    /// Benchmarks, printed as ratios against baselines from the same run
    /// (needs root): `grants`, `knock`, `revoke`, `drop` (live XDP frames:
    /// the guard against XDP_DROP and nftables), `footprint`, `cluster`
    /// (fleet mode against single-node mode), `peers` (side
    /// by side with Debian's knockd and fwknopd, and all of drop, floods
    /// and footprint, written to target/bench/peers.*), or all of them.
    Bench {
        /// Which benchmark: grants, knock, revoke, drop, footprint, cluster,
        /// peers, or all.
        #[arg(default_value = "all")]
        which: String,
    },
}

fn main() -> Result<()> {
    match Cli::parse().task {
        Task::Setup { build: true } => setup_build(),
        Task::Setup { build: false } => setup(),
        Task::Xdp => xdp(),
        Task::Test { filter } => test(filter.as_deref()),
        Task::Header => clib::write_header(),
        Task::Mcu => {
            setup()?;
            let failed = mcu::build_targets();
            ensure!(
                failed.is_empty(),
                "knockd-proto does not build for {failed:?}"
            );
            println!("{}", mcu::run()?.line());
            let vectors = clib::test()?;
            println!("c: the example in C passes {vectors} vectors");
            Ok(())
        }
        Task::Kernels => {
            setup()?;
            let outcomes = kernel_suite()?;
            ensure!(
                outcomes.iter().all(vm::Outcome::ok),
                "the kernel suite failed"
            );
            Ok(())
        }
        Task::Demo { which: None } => demo(),
        Task::Demo { which: Some(w) } if w == "cluster" => demo_cluster(),
        Task::Demo { which: Some(w) } => {
            bail!("no demo {w:?}: `cargo xtask demo` or `cargo xtask demo cluster`")
        }
        Task::Deb {
            old_layout: true, ..
        } => old_layout_deb(&workspace_version()?).map(|path| println!("{}", path.display())),
        Task::Deb { version, .. } => {
            deb(version.as_deref()).map(|path| println!("{}", path.display()))
        }
        Task::Bench { which } => bench(&which),
        Task::Fuzz { target, time, runs } => {
            setup()?;
            fuzz(target.as_deref(), time, runs).map(|_| ())
        }
    }
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the workspace root")
        .to_owned()
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Runs `cmd` with inherited stdio; fails with the command line if it fails.
fn run(cmd: &mut Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("spawning {cmd:?}"))?;
    ensure!(status.success(), "{cmd:?} failed: {status}");
    Ok(())
}

/// Runs `cmd` and returns its stdout, or None if it could not run or failed.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.stderr(Stdio::null()).output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

fn step(name: &str, f: impl FnOnce() -> Result<&'static str>) -> Result<()> {
    let start = Instant::now();
    let what = f().with_context(|| format!("setup step `{name}`"))?;
    println!(
        "setup: {name}: {what} ({:.1}s)",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn setup() -> Result<()> {
    let start = Instant::now();
    if !is_root() {
        bail!("`cargo xtask setup` installs packages and mounts bpffs: run it as root");
    }
    step("apt packages", || apt_install(|_| true))?;
    step("build files", build_files)?;
    step("nightly rust-src", nightly_rust_src)?;
    step("rust targets", rust_targets)?;
    step("bpf-linker", bpf_linker)?;
    step("bpffs", bpffs)?;
    step("cargo-fuzz", cargo_fuzz)?;
    println!("setup: done in {:.1}s", start.elapsed().as_secs_f64());
    Ok(())
}

/// `cargo xtask setup --build`: the packages building and packaging need.
fn setup_build() -> Result<()> {
    let start = Instant::now();
    if !is_root() {
        bail!("`cargo xtask setup --build` installs packages: run it as root");
    }
    step("apt packages", || apt_install(|need| need == Need::Build))?;
    step("build files", build_files)?;
    println!(
        "setup --build: done in {:.1}s",
        start.elapsed().as_secs_f64()
    );
    Ok(())
}

fn build_files() -> Result<&'static str> {
    for (file, package) in BUILD_FILES {
        ensure!(
            Path::new(file).exists(),
            "{file} is missing though setup installed {package}: `apt-get install --reinstall {package}`"
        );
    }
    Ok("present")
}

/// `cargo xtask xdp`: compiles the XDP program through knockd's build
/// script (KNOCKD_XDP_REBUILD=1) and writes it, with the stamp of its
/// sources, where the build script takes it from.
fn xdp() -> Result<()> {
    let root = workspace_root();
    let built = cargo()
        .args(["build", "-p", "knockd", "--lib", "--message-format=json"])
        .env("KNOCKD_XDP_REBUILD", "1")
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("cargo build")?;
    ensure!(built.status.success(), "building the XDP program failed");
    let out_dir = String::from_utf8_lossy(&built.stdout)
        .lines()
        .filter(|l| l.contains("\"build-script-executed\"") && l.contains("knockd#"))
        .find_map(|l| {
            let start = l.find("\"out_dir\":\"")? + "\"out_dir\":\"".len();
            Some(l[start..].split('"').next()?.to_owned())
        })
        .context("cargo did not report knockd's build script output directory")?;
    let object = Path::new(&out_dir).join("knockd-xdp");
    std::fs::copy(&object, root.join(xdp_stamp::OBJECT))
        .with_context(|| format!("copying {}", object.display()))?;
    let hash = xdp_stamp::sources_hash(&root)?;
    std::fs::write(root.join(xdp_stamp::STAMP), format!("{hash}\n"))?;
    println!(
        "xdp: wrote {} ({} bytes) and {}; commit both",
        xdp_stamp::OBJECT,
        std::fs::metadata(root.join(xdp_stamp::OBJECT))?.len(),
        xdp_stamp::STAMP
    );
    Ok(())
}

/// The test command's check that the committed XDP object is current.
fn xdp_current() -> Result<()> {
    let root = workspace_root();
    let current = xdp_stamp::sources_hash(&root)?;
    ensure!(
        xdp_stamp::committed(&root).as_deref() == Some(current.as_str())
            && root.join(xdp_stamp::OBJECT).exists(),
        "{} is not current with knockd-ebpf's and knockd-common's sources: run `cargo xtask xdp` \
         and commit {} and {}",
        xdp_stamp::OBJECT,
        xdp_stamp::OBJECT,
        xdp_stamp::STAMP
    );
    Ok(())
}

/// Installs the packages of [`APT_PACKAGES`] whose need `wanted` takes.
fn apt_install(wanted: impl Fn(Need) -> bool) -> Result<&'static str> {
    let missing: Vec<&str> = APT_PACKAGES
        .iter()
        .filter(|(_, need)| wanted(*need))
        .map(|(name, _)| *name)
        .filter(|pkg| {
            output(Command::new("dpkg-query").args(["-W", "-f=${db:Status-Abbrev}", pkg]))
                .is_none_or(|status| !status.starts_with("ii"))
        })
        .collect();
    if missing.is_empty() {
        return Ok("already installed");
    }
    println!("setup: installing {}", missing.join(" "));
    run(Command::new("apt-get")
        .args(["update", "-qq"])
        .env("DEBIAN_FRONTEND", "noninteractive"))?;
    // Packages with services (sshd, knockd's own) must not start them on
    // this host: policy-rc.d answers "not now" while we install.
    let policy = Path::new("/usr/sbin/policy-rc.d");
    let had_policy = policy.exists();
    if !had_policy {
        std::fs::write(policy, "#!/bin/sh\nexit 101\n")?;
        std::fs::set_permissions(policy, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    }
    let installed = run(Command::new("apt-get")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(&missing)
        .env("DEBIAN_FRONTEND", "noninteractive"));
    if !had_policy {
        let _ = std::fs::remove_file(policy);
    }
    installed?;
    Ok("installed")
}

fn nightly_rust_src() -> Result<&'static str> {
    let installed = output(Command::new("rustup").args([
        "component",
        "list",
        "--toolchain",
        "nightly",
        "--installed",
    ]));
    match installed {
        Some(list) if list.lines().any(|l| l.starts_with("rust-src")) => Ok("already installed"),
        Some(_) => {
            run(Command::new("rustup").args([
                "component",
                "add",
                "rust-src",
                "--toolchain",
                "nightly",
            ]))?;
            Ok("installed")
        }
        // A machine with rustup's default (stable) alone: the eBPF crate
        // builds with nightly's -Z build-std, so bring it.
        None => {
            run(Command::new("rustup").args([
                "toolchain",
                "install",
                "nightly",
                "--profile",
                "minimal",
                "--component",
                "rust-src",
            ]))?;
            Ok("installed nightly with rust-src")
        }
    }
}

/// The targets knockctl is checked for besides this machine's (the
/// operator's laptop): it must type-check there, with the client side of
/// the crate alone (`--no-default-features`).
const CLIENT_TARGETS: &[&str] = &["x86_64-apple-darwin", "aarch64-apple-darwin"];

/// The client's other targets, and the microcontrollers' of the protocol
/// crate.
fn rust_targets() -> Result<&'static str> {
    let installed =
        output(Command::new("rustup").args(["target", "list", "--installed"])).unwrap_or_default();
    let missing: Vec<&str> = CLIENT_TARGETS
        .iter()
        .chain(mcu::TARGETS)
        .chain(clients::TARGETS)
        .copied()
        .filter(|t| !installed.lines().any(|l| l.trim() == *t))
        .collect();
    if missing.is_empty() {
        return Ok("already installed");
    }
    run(Command::new("rustup")
        .args(["target", "add"])
        .args(&missing))?;
    Ok("installed")
}

/// `cargo VERB` (check, build) of knockctl alone, the client side of the
/// crate (`--no-default-features`), for `target`.
fn knockctl_for(verb: &str, target: &str) -> Command {
    let mut cmd = cargo();
    cmd.args([
        verb,
        "-p",
        "knockd",
        "--no-default-features",
        "--bin",
        "knockctl",
        "--target",
        target,
    ]);
    cmd
}

/// `cargo check` of knockctl for each of [`CLIENT_TARGETS`]; the targets
/// that fail.
fn check_client_targets() -> Vec<&'static str> {
    CLIENT_TARGETS
        .iter()
        .copied()
        .filter(|target| {
            println!("test: knockctl type-checks for {target}");
            run(&mut knockctl_for("check", target)).is_err()
        })
        .collect()
}

fn bpf_linker() -> Result<&'static str> {
    if let Some(version) = output(Command::new("bpf-linker").arg("--version"))
        && version.contains(BPF_LINKER_VERSION)
    {
        return Ok("already installed");
    }
    ensure!(
        Path::new(LLVM_PREFIX).join("bin/llvm-config").exists(),
        "{LLVM_PREFIX} is missing: bpf-linker needs llvm-22-dev"
    );
    // The default features want a bundled LLVM, which cannot be fetched here;
    // link against Debian's LLVM 22 instead.
    run(Command::new("cargo")
        .args([
            "install",
            "bpf-linker",
            "--locked",
            "--version",
            BPF_LINKER_VERSION,
        ])
        .args(["--no-default-features", "--features", "llvm-22"])
        .env("LLVM_PREFIX", LLVM_PREFIX))?;
    Ok("built and installed")
}

/// The cargo-fuzz release we install.
const CARGO_FUZZ_VERSION: &str = "0.13.2";

fn cargo_fuzz() -> Result<&'static str> {
    if let Some(version) = output(Command::new("cargo").args(["fuzz", "--version"]))
        && version.contains(CARGO_FUZZ_VERSION)
    {
        return Ok("already installed");
    }
    run(Command::new("cargo").args([
        "install",
        "cargo-fuzz",
        "--locked",
        "--version",
        CARGO_FUZZ_VERSION,
    ]))?;
    Ok("built and installed")
}

/// The fuzz targets, in `fuzz/fuzz_targets`; each has its seeds in
/// `fuzz/seeds/TARGET`.
const FUZZ_TARGETS: &[&str] = &[
    "knock_engine",
    "event_decode",
    "control_line",
    "yaml_loaders",
    "xdp_guard",
];

/// What one fuzz run did.
struct FuzzRun {
    target: &'static str,
    executions: u64,
    seconds: f64,
}

/// Runs each target (or `only`) for `secs` seconds or `runs` executions,
/// from its seeds and a working corpus under `fuzz/target` (the seeds in
/// the repository are never written to). Any crash fails.
fn fuzz(only: Option<&str>, secs: u64, runs: Option<u64>) -> Result<Vec<FuzzRun>> {
    let targets: Vec<&'static str> = match only {
        Some(name) => vec![
            *FUZZ_TARGETS
                .iter()
                .find(|t| **t == name)
                .with_context(|| format!("no fuzz target {name:?} (targets: {FUZZ_TARGETS:?})"))?,
        ],
        None => FUZZ_TARGETS.to_vec(),
    };
    let dir = workspace_root().join("fuzz");
    println!("fuzz: building the targets (nightly, address sanitizer)");
    run(Command::new("rustup")
        .current_dir(&dir)
        .args(["run", "nightly", "cargo", "fuzz", "build"]))?;
    let mut done = Vec::new();
    for target in targets {
        let work = dir.join("target/corpus").join(target);
        std::fs::create_dir_all(&work)?;
        let artifacts = dir.join("target/artifacts").join(target);
        std::fs::create_dir_all(&artifacts)?;
        let mut cmd = Command::new("rustup");
        cmd.current_dir(&dir)
            .args(["run", "nightly", "cargo", "fuzz", "run", target])
            .arg(&work)
            .arg(dir.join("seeds").join(target))
            .arg("--")
            .arg(format!("-max_total_time={secs}"))
            .arg(format!("-artifact_prefix={}/", artifacts.display()))
            // Bounded memory is part of the promise: far below this.
            .arg("-rss_limit_mb=1024")
            .arg("-print_final_stats=1");
        if let Some(runs) = runs {
            cmd.arg(format!("-runs={runs}"));
        }
        println!(
            "fuzz: {target} for {secs} s{}",
            runs.map(|r| format!(" or {r} runs")).unwrap_or_default()
        );
        let out = cmd
            .stderr(Stdio::piped())
            .output()
            .with_context(|| format!("running fuzz target {target}"))?;
        let log = String::from_utf8_lossy(&out.stderr);
        let stat = |name: &str| -> Option<f64> {
            log.lines()
                .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
        };
        let executions = stat("stat::number_of_executed_units:").unwrap_or(0.0) as u64;
        let seconds = stat("stat::average_exec_per_sec:")
            .filter(|rate| *rate > 0.0)
            .map_or(0.0, |rate| executions as f64 / rate);
        if !out.status.success() {
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            for line in tail.into_iter().rev() {
                eprintln!("{line}");
            }
            bail!(
                "fuzz target {target} failed ({}): crash inputs are in {}",
                out.status,
                artifacts.display()
            );
        }
        println!("fuzz: {target}: {executions} executions in {seconds:.0} s, 0 crashes");
        done.push(FuzzRun {
            target,
            executions,
            seconds,
        });
    }
    println!("\nfuzz target      executions   seconds  crashes");
    for run in &done {
        println!(
            "{:<16} {:>11} {:>9.0}  0",
            run.target, run.executions, run.seconds
        );
    }
    Ok(done)
}

fn bpffs() -> Result<&'static str> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    let mounted = mounts.lines().any(|line| {
        let mut fields = line.split_whitespace();
        fields.nth(1) == Some(BPFFS) && fields.next() == Some("bpf")
    });
    if mounted {
        return Ok("already mounted");
    }
    std::fs::create_dir_all(BPFFS).with_context(|| format!("creating {BPFFS}"))?;
    run(Command::new("mount").args(["-t", "bpf", "bpf", BPFFS]))?;
    Ok("mounted")
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

/// Passed/failed/ignored totals from `cargo test` result lines.
#[derive(Default, Debug)]
struct Tally {
    passed: u64,
    failed: u64,
    ignored: u64,
}

impl Tally {
    /// Adds a line like `test result: ok. 14 passed; 0 failed; 2 ignored; …`.
    fn add_line(&mut self, line: &str) {
        let Some(rest) = line.trim().strip_prefix("test result: ") else {
            return;
        };
        for part in rest.split([';', '.']) {
            let mut words = part.split_whitespace();
            if let (Some(n), Some(kind)) = (words.next(), words.next())
                && let Ok(n) = n.parse::<u64>()
            {
                match kind {
                    "passed" => self.passed += n,
                    "failed" => self.failed += n,
                    "ignored" => self.ignored += n,
                    _ => {}
                }
            }
        }
    }
}

/// Runs a `cargo test` command, echoing its output, and tallies its results.
fn cargo_test(mut cmd: Command) -> Result<(Tally, ExitStatus)> {
    let mut child = cmd
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("spawning {cmd:?}"))?;
    let mut tally = Tally::default();
    for line in BufReader::new(child.stdout.take().unwrap()).lines() {
        let line = line?;
        println!("{line}");
        tally.add_line(&line);
    }
    Ok((tally, child.wait()?))
}

/// Seconds each fuzz target runs in `cargo xtask test`: a smoke that every
/// target builds, loads its seeds and runs, not a campaign.
const FUZZ_SMOKE_SECS: u64 = 5;

fn test(filter: Option<&str>) -> Result<()> {
    let start = Instant::now();
    setup()?;
    println!("test: rustfmt");
    run(cargo().args(["fmt", "--all", "--check"]))?;
    println!("test: the committed XDP object is current");
    xdp_current()?;
    println!("test: clippy (userspace, tests, xtask)");
    run(cargo().args([
        "clippy",
        "--workspace",
        "--exclude",
        "knockd-ebpf",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ]))?;
    println!("test: clippy (the XDP program, for the BPF target)");
    // Through rustup rather than $CARGO: that is the stable toolchain's cargo.
    run(Command::new("rustup")
        .current_dir(workspace_root())
        .args([
            "run",
            "nightly",
            "cargo",
            "clippy",
            "--package",
            "knockd-ebpf",
            "--target",
            "bpfel-unknown-none",
        ])
        .args(["-Z", "build-std=core", "--release", "--", "-D", "warnings"])
        // A target dir of its own, so this nightly build does not invalidate
        // the stable one.
        .env(
            "CARGO_TARGET_DIR",
            workspace_root().join("target/ebpf-clippy"),
        ))?;
    println!("test: build");
    run(cargo().args([
        "build",
        "--workspace",
        "--exclude",
        "knockd-ebpf",
        "--all-targets",
    ]))?;

    println!("test: the Debian package, and an upgrade of it (for tests/systemd.rs)");
    let first = deb(None)?;
    let version = first
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.split('_').nth(1))
        .context("the package's version")?
        .to_owned();
    deb(Some(&format!("{version}+upgrade")))?;
    println!("test: a package of an older map layout (for tests/systemd.rs's upgrade)");
    old_layout_deb(&version)?;

    println!("test: unit tests");
    let mut unit = cargo();
    unit.args([
        "test",
        "--workspace",
        "--exclude",
        "knockd-ebpf",
        "--exclude",
        "knockd-tests",
        "--no-fail-fast",
    ]);
    if let Some(filter) = filter {
        unit.args(["--", filter]);
    }
    let (unit_tally, unit_status) = cargo_test(unit)?;

    println!("test: privileged tests (BPF_PROG_TEST_RUN, network namespaces)");
    // The unit tests above built knockd without the tests crate's features
    // (no `cluster`, so no fleet mode) over target/debug/knockd; the
    // privileged tests run that file, so it is built again as they need it.
    run(cargo().args(["build", "-p", "knockd", "--bins", "--features", "cluster"]))?;
    // knockctl for Windows and ARM Linux, which e2e_client runs under Wine
    // and qemu-user.
    clients::build()?;
    let mut privileged = cargo();
    // One at a time: each test attaches XDP programs and creates namespaces,
    // and timing-sensitive checks ("silent for 1.2 s") want a quiet machine.
    privileged.args([
        "test",
        // Every test binary runs even when an earlier one fails, so one
        // failure does not hide another.
        "--no-fail-fast",
        "--package",
        "knockd-tests",
        "--",
        "--test-threads=1",
    ]);
    if let Some(filter) = filter {
        privileged.arg(filter);
    }
    let (privileged_tally, privileged_status) = cargo_test(privileged)?;

    println!("test: the kernel suite (Debian 12's kernel in a VM; see xtask/src/vm.rs)");
    // A filter (a developer's focused run) skips it unless it names it.
    let kernels = match filter {
        Some(f) if !f.contains("kernel") => {
            println!("test: kernel suite skipped: filter {f:?}");
            Ok(Vec::new())
        }
        _ => kernel_suite(),
    };
    if let Err(e) = &kernels {
        eprintln!("the kernel suite failed: {e:#}");
    }

    println!("test: fuzz smoke (every target, a few seconds each)");
    // A filter that names no target (a developer's focused run) skips it;
    // CI gives no filter, so every target runs there.
    let fuzz_smoke = match filter {
        None => fuzz(None, FUZZ_SMOKE_SECS, None),
        Some(f) if FUZZ_TARGETS.contains(&f) => fuzz(Some(f), FUZZ_SMOKE_SECS, None),
        Some(f) => {
            println!("test: fuzz smoke skipped: filter {f:?} names no fuzz target");
            Ok(Vec::new())
        }
    };
    if let Err(e) = &fuzz_smoke {
        eprintln!("fuzz smoke failed: {e:#}");
    }

    let client_failed = check_client_targets();
    let mcu_failed = mcu::build_targets();
    let mcu = mcu::run();
    if let Err(e) = &mcu {
        eprintln!("the microcontroller run failed: {e:#}");
    }
    let clib = clib::test();
    if let Err(e) = &clib {
        eprintln!("the C library failed: {e:#}");
    }

    println!("test: protocol vectors, recomputed by an independent implementation");
    // Debian's interpreter, which is the one python3-cryptography serves.
    let vectors = Command::new("/usr/bin/python3")
        .arg(workspace_root().join("docs/check_vectors.py"))
        .output()
        .context("running docs/check_vectors.py")?;
    print!("{}", String::from_utf8_lossy(&vectors.stdout));
    eprint!("{}", String::from_utf8_lossy(&vectors.stderr));
    let vectors_ok = vectors.status.success();

    let fuzz_ok = fuzz_smoke.is_ok();
    // Each kernel's smoke tests count as tests; a kernel that could not run
    // its suite at all, or went over the verifier's budget, as one failure.
    let (kernels_passed, kernels_failed) = match &kernels {
        Ok(outcomes) => outcomes.iter().fold((0, 0), |(p, f), o| {
            let (sp, sf) = o.smoke.unwrap_or((0, 0));
            (p + sp, f + sf + u64::from(!o.ok() && sf == 0))
        }),
        Err(_) => (0, 1),
    };
    let client_targets = (CLIENT_TARGETS.len() - client_failed.len()) as u64;
    let mcu_targets = (mcu::TARGETS.len() - mcu_failed.len()) as u64;
    let passed = unit_tally.passed
        + privileged_tally.passed
        + kernels_passed
        + client_targets
        + mcu_targets
        + u64::from(mcu.is_ok())
        + u64::from(clib.is_ok())
        + u64::from(vectors_ok)
        + fuzz_smoke.as_ref().map_or(0, |runs| runs.len() as u64);
    let failed = unit_tally.failed
        + privileged_tally.failed
        + kernels_failed
        + client_failed.len() as u64
        + mcu_failed.len() as u64
        + u64::from(mcu.is_err())
        + u64::from(clib.is_err())
        + u64::from(!vectors_ok)
        + u64::from(!fuzz_ok);
    println!();
    println!(
        "unit: {} passed, {} failed; privileged: {} passed, {} failed; {:.0}s in all",
        unit_tally.passed,
        unit_tally.failed,
        privileged_tally.passed,
        privileged_tally.failed,
        start.elapsed().as_secs_f64()
    );
    if let Ok(outcomes) = &kernels {
        for outcome in outcomes {
            println!("kernel: {}", outcome.line());
        }
    }
    println!(
        "knockctl: type-checks for {client_targets} of {} other targets ({})",
        CLIENT_TARGETS.len(),
        CLIENT_TARGETS.join(", ")
    );
    println!(
        "knockd-proto: builds for {mcu_targets} of {} bare-metal targets ({})",
        mcu::TARGETS.len(),
        mcu::TARGETS.join(", ")
    );
    if let Ok(report) = &mcu {
        println!("{}", report.line());
    }
    if let Ok(vectors) = &clib {
        println!(
            "c: the example in C, built with cc against libknockd_proto_c.a, passes {vectors} vectors"
        );
    }
    println!("{passed} passed, {failed} failed");
    ensure!(unit_status.success(), "unit tests failed");
    ensure!(
        mcu_failed.is_empty(),
        "knockd-proto does not build for {mcu_failed:?}"
    );
    ensure!(mcu.is_ok(), "the vectors failed on the emulated Cortex-M4F");
    ensure!(clib.is_ok(), "the C library's test failed");
    ensure!(
        client_failed.is_empty(),
        "knockctl does not type-check for {client_failed:?}"
    );
    ensure!(
        kernels_failed == 0,
        "the kernel suite failed (lines starting `kernel:` above)"
    );
    ensure!(vectors_ok, "docs/check_vectors.py failed");
    ensure!(fuzz_ok, "the fuzz smoke failed");
    ensure!(privileged_status.success(), "privileged tests failed");
    ensure!(
        privileged_tally.passed > 0,
        "no privileged test ran: the suite proves nothing"
    );
    Ok(())
}

/// Builds the smoke test binary and runs it on every kernel of the suite,
/// printing one line per kernel.
fn kernel_suite() -> Result<Vec<vm::Outcome>> {
    run(cargo().args(["build", "-p", "knockd", "--bins", "--features", "cluster"]))?;
    let built = cargo()
        .args(["test", "-p", "knockd-tests", "--test", "kernel", "--no-run"])
        .output()
        .context("building the kernel smoke tests")?;
    let stderr = String::from_utf8_lossy(&built.stderr);
    ensure!(
        built.status.success(),
        "building the kernel smoke tests:\n{stderr}"
    );
    // cargo says "Executable tests/kernel.rs (target/debug/deps/kernel-…)".
    let smoke = stderr
        .lines()
        .find_map(|l| l.trim().strip_prefix("Executable tests/kernel.rs ("))
        .and_then(|rest| rest.strip_suffix(')'))
        .map(|path| workspace_root().join(path))
        .context("cargo did not name the kernel smoke test binary")?;
    let knockd = workspace_root().join("target/debug/knockd");
    let outcomes = vm::run_all(&workspace_root(), &knockd, &smoke)?;
    for outcome in &outcomes {
        println!("kernel: {}", outcome.line());
    }
    Ok(outcomes)
}

fn bench(which: &str) -> Result<()> {
    setup()?;
    // Release builds: the benchmark measures what ships.
    run(release_tool("knockd-bench")?.arg(which))
}

/// A demo namespace, deleted on drop.
struct DemoNs(String);

impl DemoNs {
    fn new(name: String) -> Result<DemoNs> {
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = DemoNs(name);
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn ip(&self, args: &[&str]) -> Result<()> {
        run(Command::new("ip").args(["-n", &self.0]).args(args))
    }

    /// `program` inside the namespace (nsenter keeps /sys, and so bpffs,
    /// visible, which `ip netns exec` does not).
    fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.0))
            .arg("--")
            .arg(program);
        cmd
    }
}

impl Drop for DemoNs {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// A background process killed on drop.
struct Background(Child);

impl Drop for Background {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.0.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn banner(text: &str) {
    println!("\n\x1b[1m== {text}\x1b[0m");
}

/// The fleet demo: release binaries, and the demo program that drives
/// them (`tests/src/bin/knockd-fleet-demo.rs`).
fn demo_cluster() -> Result<()> {
    setup()?;
    banner("building knockd and the fleet demo (release)");
    run(&mut release_tool("knockd-fleet-demo")?)
}

/// Builds knockd and knockctl as they ship: release, with fleet mode.
fn build_release_knockd() -> Result<()> {
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "knockd",
        "--bins",
        "--features",
        "cluster",
    ]))
}

/// Builds knockd's binaries and the test crate's program `name` (release:
/// benchmarks and demos run what ships), and returns a command for it.
fn release_tool(name: &str) -> Result<Command> {
    build_release_knockd()?;
    run(cargo().args([
        "build",
        "--release",
        "--package",
        "knockd-tests",
        "--bin",
        name,
    ]))?;
    Ok(Command::new(
        workspace_root().join("target/release").join(name),
    ))
}

fn demo() -> Result<()> {
    setup()?;
    banner("building knockd (release)");
    build_release_knockd()?;
    let knockd = workspace_root().join("target/release/knockd");

    let id = std::process::id();
    banner("creating two network namespaces joined by a veth pair");
    let server = DemoNs::new(format!("kd-demo-srv-{id}"))?;
    let client = DemoNs::new(format!("kd-demo-cli-{id}"))?;
    let (server_if, client_if) = (format!("kdds{id}"), format!("kddc{id}"));
    run(Command::new("ip").args([
        "link", "add", &server_if, "netns", &server.0, "type", "veth", "peer", "name", &client_if,
        "netns", &client.0,
    ]))?;
    server.ip(&["addr", "add", "198.18.0.1/24", "dev", &server_if])?;
    client.ip(&["addr", "add", "198.18.0.2/24", "dev", &client_if])?;
    server.ip(&["link", "set", &server_if, "up"])?;
    client.ip(&["link", "set", &client_if, "up"])?;
    println!(
        "server {} (198.18.0.1, {server_if}) <-> client {} (198.18.0.2)",
        server.0, client.0
    );

    let dir = std::env::temp_dir().join(format!("knockd-demo-{id}"));
    std::fs::create_dir_all(dir.join("devices.d"))?;
    let bpffs_dir = format!("{BPFFS}/knockd-demo-{id}");
    let knockctl = workspace_root().join("target/release/knockctl");
    banner("provisioning a device: knockctl device add laptop --group admins");
    let profile = Command::new(&knockctl)
        .args([
            "device",
            "add",
            "laptop",
            "--group",
            "admins",
            "--host",
            "198.18.0.1",
            "--door",
            "ssh",
        ])
        .arg("--devices-dir")
        .arg(dir.join("devices.d"))
        // The door's knock settings come from the configuration the demo
        // runs (the example's).
        .arg("--config")
        .arg(workspace_root().join("deploy/knockd.example.yaml"))
        .output()?;
    ensure!(
        profile.status.success(),
        "knockctl device add: {}",
        String::from_utf8_lossy(&profile.stderr)
    );
    let profiles = dir.join("profiles.yaml");
    std::fs::write(&profiles, &profile.stdout)?;
    std::fs::set_permissions(
        &profiles,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    println!("the client's profile, {} (key elided):", profiles.display());
    for line in String::from_utf8_lossy(&profile.stdout).lines() {
        if line.trim_start().starts_with("key:") {
            println!("    key: <64 hex digits>");
        } else {
            println!("{line}");
        }
    }
    let example = std::fs::read_to_string(workspace_root().join("deploy/knockd.example.yaml"))?;
    let mut config = example
        .replace("  - eth0", &format!("  - {server_if}"))
        .replace(
            "bpffs_dir: /sys/fs/bpf/knockd",
            &format!("bpffs_dir: {bpffs_dir}"),
        )
        .replace(
            "state_dir: /var/lib/knockd",
            &format!("state_dir: {}", dir.join("state").display()),
        )
        .replace(
            "devices_dir: /etc/knockd/devices.d",
            &format!("devices_dir: {}", dir.join("devices.d").display()),
        );
    // Uncomment the example's static door, for the stock knock client.
    for line in [
        "  # legacy:",
        "  #   service_port: 2222",
        "  #   mode: static",
        "  #   sequence: [\"6000:udp\", \"6001:tcp\", \"6002:udp\"]   # knockd gen-sequence",
        "  #   seq_timeout_secs: 10",
    ] {
        config = config.replace(line, &line.replacen("# ", "", 1));
    }
    let control_socket = dir.join("control.sock");
    config = config.replace(
        "control_socket: /run/knockd/control.sock",
        &format!("control_socket: {}", control_socket.display()),
    );
    let config_path = dir.join("knockd.yaml");
    std::fs::write(&config_path, config)?;

    banner(
        "services in the server namespace: sshd stand-ins on 22 (one-time door) and 2222 (static door), web on 8080",
    );
    let services: Vec<Background> = ["22", "2222", "8080"]
        .into_iter()
        .map(|port| {
            server
                .command("nc")
                .args(["-lk", "198.18.0.1", port])
                .stdout(Stdio::null())
                .spawn()
                .map(Background)
        })
        .collect::<Result<_, _>>()?;

    banner(&format!(
        "starting knockd with deploy/knockd.example.yaml on {server_if}"
    ));
    run(server
        .command(&knockd)
        .arg("check-config")
        .arg(&config_path))?;
    let log_path = dir.join("knockd.log");
    let log = std::fs::File::create(&log_path)?;
    let daemon = Background(
        server
            .command(&knockd)
            .args(["run", "--config"])
            .arg(&config_path)
            .env("NO_COLOR", "1")
            .stderr(log)
            .spawn()?,
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(&log_path).unwrap_or_default();
        if text.contains(" ready ") {
            print!("{text}");
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "knockd did not become ready:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }

    banner("the client scans the server with nmap: protected ports are filtered, not closed");
    run(client.command("nmap").args([
        "-n",
        "-Pn",
        "-sS",
        "--max-retries",
        "1",
        "-p",
        "22,2222,8080,9999",
        "198.18.0.1",
    ]))?;

    let probe = |port: &str| -> Result<()> {
        let status = client
            .command("nc")
            .args(["-z", "-w", "2", "198.18.0.1", port])
            .status()?;
        println!(
            "nc -z 198.18.0.1 {port}: {}",
            if status.success() {
                "connected"
            } else {
                "no answer (dropped in XDP)"
            }
        );
        Ok(())
    };
    banner("the client connects: 8080 answers, 22 and 2222 give no answer at all");
    for port in ["8080", "22", "2222"] {
        probe(port)?;
    }

    banner("the client knocks with knockctl: a one-time sequence, a sealed reply, a random port");
    let knock = |args: &[&str]| -> Result<()> {
        println!("$ knockctl knock {}", args.join(" "));
        run(client
            .command(&knockctl)
            .args(["knock", "--profiles"])
            .arg(&profiles)
            .args(args))
    };
    knock(&["laptop", "--print-port"])?;
    knock(&[
        "laptop",
        "--exec",
        "nc -z -w 2 {host} {port} && echo \"connected to {host} port {port}: sshd answers through the granted port\"",
    ])?;
    banner("22 itself stays shut, even for this client; only the granted port leads to it");
    probe("22")?;

    banner("a classic client on a static door: knock -v 198.18.0.1 6000:udp 6001:tcp 6002:udp");
    run(client
        .command("knock")
        .args(["-v", "198.18.0.1", "6000:udp", "6001:tcp", "6002:udp"]))?;
    std::thread::sleep(Duration::from_millis(300));
    probe("2222")?;
    banner("the daemon's decision log");
    let text = std::fs::read_to_string(&log_path)?;
    for line in text
        .lines()
        .filter(|l| l.contains("decision") || l.contains("static"))
    {
        println!("{line}");
    }

    banner("knockctl status");
    run(Command::new(&knockctl)
        .arg("status")
        .arg("--socket")
        .arg(&control_socket))?;

    banner(
        "a session through the granted port, then knockctl revoke laptop: the grant ends, the session is cut",
    );
    let out = client
        .command(&knockctl)
        .args(["knock", "--profiles"])
        .arg(&profiles)
        .args(["laptop", "--print-port"])
        .output()?;
    ensure!(
        out.status.success(),
        "knock: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let port = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    // An interactive session: nc with its input held open, idle.
    let mut session = Background(
        client
            .command("nc")
            .args(["198.18.0.1", &port])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()?,
    );
    std::thread::sleep(Duration::from_millis(300));
    ensure!(
        session.0.try_wait()?.is_none(),
        "the session through port {port} did not stay open"
    );
    println!("$ nc 198.18.0.1 {port}: session open");
    println!("$ knockctl revoke laptop");
    run(Command::new(&knockctl)
        .args(["revoke", "laptop", "--socket"])
        .arg(&control_socket))?;
    let revoked = Instant::now();
    while session.0.try_wait()?.is_none() {
        ensure!(
            revoked.elapsed() < Duration::from_secs(5),
            "the session outlived its revoke"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    println!(
        "the session ended {} ms after the revoke returned",
        revoked.elapsed().as_millis()
    );

    banner("stopping: SIGTERM stops the daemon; the guard stays in place (fail closed)");
    drop(daemon);
    drop(services);
    let text = std::fs::read_to_string(&log_path)?;
    if let Some(last) = text.lines().last() {
        println!("{last}");
    }
    banner("knockd uninstall: removing the table and the pins on purpose");
    run(server
        .command(&knockd)
        .args(["uninstall", "--bpffs-dir", &bpffs_dir]))?;
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The package's name: Debian's own knockd is `knockd`, which this one
/// conflicts with and replaces (both ship /usr/sbin/knockd and a
/// knockd.service).
const DEB_NAME: &str = "knockd-xdp";

/// The commit the upgrade test's older package is built from: the last
/// before the counters map grew from 13 to 14 slots (knock_unmatched), so
/// the maps it pins differ from today's.
const OLD_LAYOUT_COMMIT: &str = "5870db51fb7826073d393ef1e62e3a47d2250727^";

/// Where that package goes: apart from target/deb, whose packages
/// tests/systemd.rs tells by name.
const OLD_LAYOUT_DIR: &str = "target/deb-old-layout";

/// Builds the package of [`OLD_LAYOUT_COMMIT`] (with that tree's own
/// `cargo xtask deb`, in a tree of its own under target/), versioned below
/// `version` so that installing today's over it is an upgrade. Kept across
/// runs: the commit does not change.
fn old_layout_deb(version: &str) -> Result<PathBuf> {
    let root = workspace_root();
    let out = root.join(OLD_LAYOUT_DIR);
    if let Some(deb) = std::fs::read_dir(&out)
        .ok()
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
    {
        return Ok(deb);
    }
    let commit = output(Command::new("git").current_dir(&root).args([
        "rev-parse",
        "--verify",
        &format!("{OLD_LAYOUT_COMMIT}^{{commit}}"),
    ]))
    .context(
        "the upgrade test builds a package from an older commit, and this clone does not \
         have it: use a full clone (not --depth)",
    )?;
    let src = root.join("target/old-layout-src");
    let _ = std::fs::remove_dir_all(&src);
    std::fs::create_dir_all(&src)?;
    run(Command::new("sh").current_dir(&root).args([
        "-c",
        &format!(
            "git archive {} | tar -x -C {}",
            commit.trim(),
            src.display()
        ),
    ]))?;
    // That tree's binaries, built in its own target dir (it predates
    // `cargo xtask deb`), packaged by today's code with its own unit and
    // example configuration. None of this build's environment leaks in.
    run(
        Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
            .current_dir(&src)
            .args(["build", "--release", "-p", "knockd", "--bins"])
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_MANIFEST_DIR")
            .env_remove("CARGO_PKG_NAME"),
    )?;
    std::fs::create_dir_all(&out)?;
    let deb = package(
        &src,
        &src.join("target/release"),
        &format!("{version}~oldlayout"),
        &out,
        false,
    )?;
    let _ = std::fs::remove_dir_all(&src);
    Ok(deb)
}

/// Builds `target/deb/knockd-xdp_VERSION_ARCH.deb` with dpkg-deb from a
/// staged tree, and returns its path.
fn deb(version: Option<&str>) -> Result<PathBuf> {
    let root = workspace_root();
    build_release_knockd()?;
    let version = match version {
        Some(v) => v.to_owned(),
        None => workspace_version()?,
    };
    package(
        &root,
        &root.join("target/release"),
        &version,
        &root.join("target/deb"),
        true,
    )
}

/// Stages and builds the package of the binaries in `release` with the
/// unit, example configuration and docs of the tree at `src`, into `out`.
/// `complete`: the binaries generate their man pages and completions, and
/// failing to is an error; an older build (the upgrade test's) may lack
/// some, which are then left out.
fn package(
    src: &Path,
    release: &Path,
    version: &str,
    out: &Path,
    complete: bool,
) -> Result<PathBuf> {
    let root = src;
    let arch = output(Command::new("dpkg").arg("--print-architecture"))
        .context("dpkg --print-architecture")?;
    let arch = arch.trim();
    let stage = out.join(format!("{DEB_NAME}_{version}_{arch}"));
    if stage.exists() {
        std::fs::remove_dir_all(&stage)?;
    }
    let put = |to: &str, mode: u32, bytes: &[u8]| -> Result<()> {
        use std::os::unix::fs::PermissionsExt as _;
        let path = stage.join(to);
        std::fs::create_dir_all(path.parent().unwrap())?;
        std::fs::write(&path, bytes).with_context(|| format!("writing {}", path.display()))?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
        Ok(())
    };
    let bin = |name: &str| -> Result<Vec<u8>> {
        std::fs::read(release.join(name))
            .with_context(|| format!("reading {}", release.join(name).display()))
    };
    put("usr/sbin/knockd", 0o755, &bin("knockd")?)?;
    put("usr/bin/knockctl", 0o755, &bin("knockctl")?)?;
    // As dh_strip would: the symbols stay in target/release.
    run(Command::new("strip")
        .arg("--strip-unneeded")
        .arg(stage.join("usr/sbin/knockd"))
        .arg(stage.join("usr/bin/knockctl")))?;
    // The unit, with the package's paths.
    let unit = std::fs::read_to_string(root.join("deploy/knockd.service"))?
        .replace("/usr/local/sbin/knockd", "/usr/sbin/knockd")
        .replace("/usr/local/bin/knockctl", "/usr/bin/knockctl")
        .replace(
            "file:///usr/local/share/doc/knockd/README.md",
            "man:knockd(8) file:///usr/share/doc/knockd-xdp/README.md.gz",
        );
    put("lib/systemd/system/knockd.service", 0o644, unit.as_bytes())?;
    put(
        "etc/knockd/knockd.yaml",
        0o600,
        &std::fs::read(root.join("deploy/knockd.example.yaml"))?,
    )?;
    std::fs::create_dir_all(stage.join("etc/knockd/devices.d"))?;
    for dir in ["etc/knockd", "etc/knockd/devices.d"] {
        std::fs::set_permissions(
            stage.join(dir),
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )?;
    }
    // Man pages and completions, generated by the binaries themselves.
    let generated = |binary: &str, args: &[&str]| -> Result<Option<Vec<u8>>> {
        let out = Command::new(release.join(binary)).args(args).output()?;
        if !out.status.success() && !complete {
            println!("package: {binary} {args:?} is not in this build; left out");
            return Ok(None);
        }
        ensure!(out.status.success(), "{binary} {args:?} failed");
        Ok(Some(out.stdout))
    };
    let gzip = |bytes: Vec<u8>| -> Result<Vec<u8>> {
        let mut child = Command::new("gzip")
            .args(["-9n"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()?;
        let mut stdin = child.stdin.take().unwrap();
        let writer = std::thread::spawn(move || std::io::Write::write_all(&mut stdin, &bytes));
        let out = child.wait_with_output()?;
        writer.join().expect("gzip writer")?;
        ensure!(out.status.success(), "gzip failed");
        Ok(out.stdout)
    };
    for (binary, path) in [
        ("knockd", "usr/share/man/man8/knockd.8.gz"),
        ("knockctl", "usr/share/man/man1/knockctl.1.gz"),
    ] {
        if let Some(page) = generated(binary, &["man"])? {
            put(path, 0o644, &gzip(page)?)?;
        }
    }
    for name in ["knockd", "knockctl"] {
        for (shell, path) in [
            (
                "bash",
                format!("usr/share/bash-completion/completions/{name}"),
            ),
            ("zsh", format!("usr/share/zsh/vendor-completions/_{name}")),
            (
                "fish",
                format!("usr/share/fish/vendor_completions.d/{name}.fish"),
            ),
        ] {
            if let Some(script) = generated(name, &["completions", shell])? {
                put(&path, 0o644, &script)?;
            }
        }
    }
    let doc = format!("usr/share/doc/{DEB_NAME}");
    for file in ["README.md", "docs/PROTOCOL.md", "docs/CONTROL.md"] {
        let name = Path::new(file).file_name().unwrap().to_string_lossy();
        put(
            &format!("{doc}/{name}.gz"),
            0o644,
            &gzip(std::fs::read(root.join(file))?)?,
        )?;
    }
    put(
        &format!("{doc}/copyright"),
        0o644,
        format!(
            "Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n\
             Upstream-Name: knockd\n\nFiles: *\nCopyright: the knockd authors\nLicense: {}\n",
            workspace_license(root)?
        )
        .as_bytes(),
    )?;
    // Control files.
    let installed_kib = dir_size(&stage)? / 1024;
    put(
        "DEBIAN/control",
        0o644,
        format!(
            "Package: {DEB_NAME}\n\
             Version: {version}\n\
             Architecture: {arch}\n\
             Maintainer: knockd developers <knockd@example.org>\n\
             Installed-Size: {installed_kib}\n\
             Depends: libc6 (>= 2.34), libgcc-s1, libmnl0 (>= 1.0.4), libnftnl11 (>= 1.2.0)\n\
             Suggests: conntrack\n\
             Conflicts: knockd\n\
             Replaces: knockd\n\
             Section: net\n\
             Priority: optional\n\
             Homepage: https://example.org/knockd\n\
             Description: port-knocking daemon with an XDP guard and nftables grants\n \
             knockd drops traffic to protected ports in XDP, checks one-time (per-device\n \
             key, time-based) and classic static knock sequences, and opens a random\n \
             port for the authenticated source only, through nftables. It replaces\n \
             Debian's knockd (same command and unit names); `knockctl import` converts\n \
             its knockd.conf.\n"
        )
        .as_bytes(),
    )?;
    put("DEBIAN/conffiles", 0o644, b"/etc/knockd/knockd.yaml\n")?;
    put(
        "DEBIAN/postinst",
        0o755,
        include_bytes!("../../deploy/debian/postinst"),
    )?;
    put(
        "DEBIAN/prerm",
        0o755,
        include_bytes!("../../deploy/debian/prerm"),
    )?;
    put(
        "DEBIAN/postrm",
        0o755,
        include_bytes!("../../deploy/debian/postrm"),
    )?;
    let deb = out.join(format!("{DEB_NAME}_{version}_{arch}.deb"));
    run(Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Zxz", "--build"])
        .arg(&stage)
        .arg(&deb))?;
    Ok(deb)
}

/// The workspace's version, the package's by default.
fn workspace_version() -> Result<String> {
    let manifest = std::fs::read_to_string(workspace_root().join("Cargo.toml"))?;
    Ok(manifest
        .lines()
        .find_map(|l| l.strip_prefix("version = \""))
        .and_then(|v| v.strip_suffix('"'))
        .context("no version in the workspace Cargo.toml")?
        .to_owned())
}

/// The workspace's license expression.
fn workspace_license(root: &Path) -> Result<String> {
    let manifest = std::fs::read_to_string(root.join("Cargo.toml"))?;
    Ok(manifest
        .lines()
        .find_map(|l| l.strip_prefix("license = \""))
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or("see the source")
        .to_owned())
}

/// Bytes in the files under `dir`.
fn dir_size(dir: &Path) -> Result<u64> {
    let mut total = 0;
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.metadata()?;
        total += if meta.is_dir() {
            dir_size(&entry.path())?
        } else {
            meta.len()
        };
    }
    Ok(total)
}
