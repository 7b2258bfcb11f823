//! The protocol crate on microcontrollers: `knockd-proto` builds for a
//! Cortex-M4F and an ESP32-C3 (RISC-V) with no allocator, and the firmware
//! in `mcu/` runs the vectors of docs/PROTOCOL.md on QEMU's Cortex-M4F
//! board, timing a device's knock and measuring its footprint.

use std::{collections::BTreeMap, process::Command, time::Instant};

use anyhow::{Context as _, Result, ensure};

use crate::{cargo, workspace_root};

/// The bare-metal targets `knockd-proto` builds for in the test command:
/// Cortex-M4F (`thumbv7em-none-eabihf`, also the QEMU board's) and
/// ESP32-C3 (`riscv32imc-unknown-none-elf`).
pub const TARGETS: &[&str] = &["thumbv7em-none-eabihf", "riscv32imc-unknown-none-elf"];

/// Most a run of the firmware may take (it takes about a second).
const QEMU_TIMEOUT_SECS: u32 = 120;

/// `cargo build` of the protocol crate and the C library, no_std, for
/// each of [`TARGETS`]; the targets that fail.
pub fn build_targets() -> Vec<&'static str> {
    TARGETS
        .iter()
        .copied()
        .filter(|target| {
            println!(
                "test: knockd-proto and the C library build (no_std, no allocator) for {target}"
            );
            crate::run(cargo().args([
                "build",
                "--release",
                "-p",
                "knockd-proto",
                "-p",
                "knockd-proto-c",
                "--target",
                target,
            ]))
            .is_err()
        })
        .collect()
}

/// What the firmware printed: `name value` lines.
pub struct Report {
    pub values: BTreeMap<String, String>,
}

impl Report {
    fn number(&self, name: &str) -> Result<u64> {
        self.values
            .get(name)
            .with_context(|| format!("the firmware printed no {name}"))?
            .parse()
            .with_context(|| format!("{name} is not a number"))
    }

    /// One line for the test command's summary and the note.
    pub fn line(&self) -> String {
        let n = |name: &str| self.number(name).unwrap_or(0);
        format!(
            "mcu: Cortex-M4F (QEMU mps2-an386): {} vectors passed; one open knock (derive, 3 knocks, open the reply) {} instructions (derive {}, sequence {}, reply {}), stack {} B; firmware flash {} B ({} B of it the PROTOCOL.md text the vectors are read from), static RAM {} B",
            n("vectors_passed"),
            n("knock_instructions"),
            n("derive_instructions"),
            n("sequence_instructions"),
            n("reply_open_instructions"),
            n("knock_stack_bytes"),
            n("flash_bytes"),
            n("flash_protocol_md_bytes"),
            n("ram_static_bytes"),
        )
    }
}

/// Builds the firmware and runs it on QEMU; fails unless every vector
/// passed and the instruction count is calibrated.
pub fn run() -> Result<Report> {
    let dir = workspace_root().join("mcu");
    println!("test: the protocol vectors on an emulated Cortex-M4F (mcu/, QEMU mps2-an386)");
    crate::run(cargo().current_dir(&dir).args(["build", "--release"]))?;
    let elf = dir.join("target/thumbv7em-none-eabihf/release/knockd-mcu");
    let start = Instant::now();
    let out = Command::new("timeout")
        .arg(QEMU_TIMEOUT_SECS.to_string())
        .args([
            "qemu-system-arm",
            "-machine",
            "mps2-an386",
            "-nographic",
            "-semihosting-config",
            "enable=on,target=native",
            // One instruction per virtual nanosecond: SysTick then counts
            // instructions (see mcu/src/main.rs).
            "-icount",
            "shift=0",
            "-kernel",
        ])
        .arg(&elf)
        .output()
        .context("running qemu-system-arm (cargo xtask setup installs it)")?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    print!("{text}");
    eprint!("{}", String::from_utf8_lossy(&out.stderr));
    let values = text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(k, v)| (k.to_owned(), v.trim().to_owned()))
        .collect();
    let report = Report { values };
    ensure!(
        out.status.success(),
        "the firmware failed ({}) after {:.1}s: {}",
        out.status,
        start.elapsed().as_secs_f64(),
        report
            .values
            .get("vectors_failed")
            .map_or("see its output above", String::as_str)
    );
    let expected = knockd_proto::vectors::count(knockd_proto::vectors::PROTOCOL_MD) as u64;
    ensure!(
        report.number("vectors_passed")? == expected && expected > 0,
        "the firmware passed {} vectors of {expected}",
        report.number("vectors_passed")?
    );
    let (known, measured) = (
        report.number("calibration_loop_instructions")?,
        report.number("calibration_loop_measured")?,
    );
    ensure!(
        measured.abs_diff(known) * 100 <= known,
        "SysTick is off: a loop of {known} instructions measured {measured} (is -icount shift=0 in effect?)"
    );
    Ok(report)
}
