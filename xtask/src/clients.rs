//! knockctl for the systems operators and gateways run besides this one:
//! Windows (mingw-w64, run under Wine) and Linux on 64- and 32-bit ARM
//! (Debian's cross compilers, run under qemu-user). Built here before the
//! privileged tests, which run each against a live daemon
//! (tests/tests/e2e_client.rs, `knockctl_for_*`).

use std::process::Command;

use anyhow::Result;

use crate::workspace_root;

/// Targets knockctl is built and run for, besides this machine's.
pub const TARGETS: &[&str] = &[
    "x86_64-pc-windows-gnu",
    "aarch64-unknown-linux-gnu",
    "armv7-unknown-linux-gnueabihf",
];

/// Builds knockctl (the client side alone: `--no-default-features`) for
/// each of [`TARGETS`], and for Windows the stand-in DLL Wine 8 lacks
/// (tests/wine/bcryptprimitives.c) next to it.
pub fn build() -> Result<()> {
    for target in TARGETS {
        println!("test: knockctl for {target}");
        crate::run(&mut crate::knockctl_for("build", target))?;
    }
    let dir = workspace_root().join("target/x86_64-pc-windows-gnu/debug");
    crate::run(
        Command::new("x86_64-w64-mingw32-gcc")
            .args(["-shared", "-O2", "-Wall", "-Wextra", "-Werror", "-o"])
            .arg(dir.join("bcryptprimitives.dll"))
            .arg(workspace_root().join("tests/wine/bcryptprimitives.c"))
            .arg("-ladvapi32"),
    )?;
    Ok(())
}
