use which::which;

/// Building this crate needs the `bpf-linker` binary, a dependency cargo
/// cannot see. Rebuild whenever that binary changes (`cargo xtask setup`
/// installs it).
fn main() {
    match which("bpf-linker") {
        Ok(path) => println!("cargo:rerun-if-changed={}", path.display()),
        Err(e) => println!("cargo:warning=bpf-linker not found ({e}); run `cargo xtask setup`"),
    }
}
