//! The stamp that ties the committed XDP object (`knockd/xdp/knockd-xdp.o`)
//! to the sources it was built from, shared by knockd's build script (which
//! embeds the object when the stamp is current, so building knockd needs no
//! eBPF toolchain) and xtask (`cargo xtask xdp` writes both; the test
//! command refuses a stale one). Like cilium's bpf2go objects, the binary
//! is committed; unlike a byte comparison of a rebuild, the stamp does not
//! depend on where the workspace lives (the object's BTF names paths).

use std::{
    io,
    path::{Path, PathBuf},
};

use sha2::{Digest as _, Sha256};

/// The committed object, relative to the workspace root.
pub const OBJECT: &str = "knockd/xdp/knockd-xdp.o";
/// Its stamp: the hex SHA-256 of its inputs, relative to the root.
pub const STAMP: &str = "knockd/xdp/knockd-xdp.o.sha256";
/// The crates the object is built from, relative to the root.
pub const INPUTS: [&str; 2] = ["knockd-ebpf", "knockd-common"];

/// Every file under `dir` (recursively), skipping build output.
fn files(dir: &Path, out: &mut Vec<PathBuf>) -> io::Result<()> {
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        if path.is_dir() {
            if path.file_name().is_some_and(|n| n == "target") {
                continue;
            }
            files(&path, out)?;
        } else {
            out.push(path);
        }
    }
    Ok(())
}

/// The packages of `Cargo.lock` the program links (aya-ebpf and its
/// kin), each `[[package]]` block as written.
fn locked_ebpf_packages(lock: &str) -> String {
    lock.split("[[package]]")
        .filter(|block| {
            block
                .lines()
                .find_map(|l| l.strip_prefix("name = "))
                .is_some_and(|name| name.contains("ebpf") || name.contains("aya-log-common"))
        })
        .collect::<Vec<_>>()
        .join("[[package]]")
}

/// The hash of everything the object is built from: the two crates'
/// files (by path relative to the root, and content) and the locked
/// versions of the eBPF libraries.
pub fn sources_hash(root: &Path) -> io::Result<String> {
    let mut all = Vec::new();
    for input in INPUTS {
        files(&root.join(input), &mut all)?;
    }
    all.sort();
    let mut hash = Sha256::new();
    for path in &all {
        let relative = path.strip_prefix(root).unwrap_or(path);
        hash.update(relative.to_string_lossy().as_bytes());
        hash.update([0]);
        let content = std::fs::read(path)?;
        hash.update((content.len() as u64).to_le_bytes());
        hash.update(&content);
    }
    let lock = std::fs::read_to_string(root.join("Cargo.lock"))?;
    hash.update(locked_ebpf_packages(&lock).as_bytes());
    Ok(hash.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// The stamp as committed, if there is one.
pub fn committed(root: &Path) -> Option<String> {
    std::fs::read_to_string(root.join(STAMP))
        .ok()
        .map(|s| s.trim().to_owned())
}
