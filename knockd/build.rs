//! Compiles the XDP program (`knockd-ebpf`) for the BPF target with aya-build,
//! into `$OUT_DIR/knockd-xdp`, which `knockd::guard` embeds. Client-only
//! builds (without the `daemon` feature) need no eBPF toolchain and skip it.

#[cfg(not(feature = "daemon"))]
fn main() {}

#[cfg(feature = "daemon")]
fn main() -> anyhow::Result<()> {
    use anyhow::{Context as _, anyhow};
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
    .context("building the XDP program; is the toolchain set up? run `cargo xtask setup`")
}
