//! Provides the XDP program (`knockd-ebpf`, compiled for the BPF target)
//! as `$OUT_DIR/knockd-xdp`, which `knockd::guard` embeds.
//!
//! The compiled object is committed (`knockd/xdp/knockd-xdp.o`, see
//! `xdp_stamp.rs`): when its stamp matches the sources, it is copied, and
//! building knockd needs only stable Rust and the C libraries, no nightly,
//! LLVM or bpf-linker. When the sources changed since (or with
//! `KNOCKD_XDP_REBUILD=1`, which `cargo xtask xdp` sets), the program is
//! compiled here with aya-build, and `cargo xtask xdp` commits the result.
//! Client-only builds (without the `daemon` feature) skip all of it.

#[cfg(feature = "daemon")]
#[path = "xdp_stamp.rs"]
mod xdp_stamp;

#[cfg(not(feature = "daemon"))]
fn main() {}

#[cfg(feature = "daemon")]
fn main() -> anyhow::Result<()> {
    use std::path::PathBuf;

    use anyhow::{Context as _, anyhow};
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let root = manifest_dir
        .parent()
        .ok_or_else(|| anyhow!("knockd's manifest has no parent directory"))?
        .to_owned();
    let out = PathBuf::from(std::env::var("OUT_DIR")?).join("knockd-xdp");
    println!("cargo:rerun-if-env-changed=KNOCKD_XDP_REBUILD");
    for input in xdp_stamp::INPUTS {
        println!("cargo:rerun-if-changed={}", root.join(input).display());
    }
    for file in [xdp_stamp::OBJECT, xdp_stamp::STAMP, "Cargo.lock"] {
        println!("cargo:rerun-if-changed={}", root.join(file).display());
    }
    let current = xdp_stamp::sources_hash(&root).context("hashing the XDP program's sources")?;
    let committed = xdp_stamp::committed(&root);
    let rebuild = std::env::var_os("KNOCKD_XDP_REBUILD").is_some_and(|v| v == "1");
    if !rebuild && committed.as_deref() == Some(current.as_str()) {
        std::fs::copy(root.join(xdp_stamp::OBJECT), &out)
            .with_context(|| format!("copying {}", xdp_stamp::OBJECT))?;
        return Ok(());
    }
    let metadata = cargo_metadata::MetadataCommand::new()
        .no_deps()
        .exec()
        .context("cargo metadata")?;
    let ebpf = metadata
        .packages
        .iter()
        .find(|p| p.name.as_str() == "knockd-ebpf")
        .ok_or_else(|| anyhow!("knockd-ebpf package not found in the workspace"))?;
    let root_dir = ebpf
        .manifest_path
        .parent()
        .ok_or_else(|| anyhow!("no parent for {}", ebpf.manifest_path))?;
    aya_build::build_ebpf(
        [aya_build::Package {
            name: ebpf.name.as_str(),
            root_dir: root_dir.as_str(),
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
    .with_context(|| {
        format!(
            "{} is not current with knockd-ebpf's sources, so the XDP program must be \
             compiled, and that needs the eBPF toolchain (`cargo xtask setup`); then \
             `cargo xtask xdp` commits the new object",
            xdp_stamp::OBJECT
        )
    })
}
