//! What differs between the Unix systems knockd and knockctl run on and
//! the others knockctl runs on (Windows): file modes and owners, private
//! files and directories, positioned writes, interface indexes, and the
//! test builds' crash. One place, so the rest of the crate reads the same
//! on every system.
//!
//! Windows has no modes: a file's ACL decides who reads it, and a file
//! created under the user's profile (`%APPDATA%`, where knockctl keeps its
//! profiles there) inherits an ACL that gives the user, SYSTEM and
//! Administrators access and no one else. knockctl does not read ACLs, so
//! there the checks of a mode are skipped, not emulated (README, "knockctl
//! on Windows").

use std::{fs::File, io, path::Path};

/// A file's owner and mode, where the system has them.
#[cfg(unix)]
pub fn owner_and_mode(meta: &std::fs::Metadata) -> Option<(u32, u32)> {
    use std::os::unix::fs::MetadataExt as _;
    Some((meta.uid(), meta.mode()))
}

/// A file's owner and mode, where the system has them.
#[cfg(not(unix))]
pub fn owner_and_mode(_: &std::fs::Metadata) -> Option<(u32, u32)> {
    None
}

/// Creates `dir` and its parents, readable by the owner alone (0700) where
/// the system has modes.
pub fn create_private_dir(dir: &Path) -> io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// Creates `path`, which must not exist, readable by the owner alone
/// (0600) where the system has modes.
pub fn create_private_file(path: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

/// Writes all of `buf` at `offset`, leaving the file's cursor alone where
/// the system allows.
pub fn write_all_at(file: &File, buf: &[u8], offset: u64) -> io::Result<()> {
    #[cfg(unix)]
    {
        std::os::unix::fs::FileExt::write_all_at(file, buf, offset)
    }
    #[cfg(windows)]
    {
        let (mut buf, mut offset) = (buf, offset);
        while !buf.is_empty() {
            let n = std::os::windows::fs::FileExt::seek_write(file, buf, offset)?;
            if n == 0 {
                return Err(io::ErrorKind::WriteZero.into());
            }
            buf = &buf[n..];
            offset += n as u64;
        }
        Ok(())
    }
}

/// Stops the process dead, as a crash or a power cut would: SIGKILL on
/// Unix, an abort elsewhere.
pub fn die() -> ! {
    #[cfg(unix)]
    // SAFETY: raise(2) on ourselves; SIGKILL cannot be caught.
    unsafe {
        libc::raise(libc::SIGKILL);
    }
    std::process::abort()
}

/// The index of network interface `name`, if the host has it (Unix; knockd
/// runs on Linux only).
pub fn interface_index(name: &str) -> Option<u32> {
    #[cfg(unix)]
    {
        let name = std::ffi::CString::new(name).ok()?;
        // SAFETY: a NUL-terminated name; the call only reads it.
        let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
        (index != 0).then_some(index)
    }
    #[cfg(not(unix))]
    {
        let _ = name;
        None
    }
}

/// Gives the allocator's free pages back to the system. Adopting a full
/// table after a restart builds transient lists (a million elements read
/// from the kernel, with their names); glibc keeps what they freed as part
/// of the resident set unless asked (`cargo xtask bench footprint`: RSS
/// with a million grants). Elsewhere it does nothing.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only returns free memory to the system.
    unsafe {
        libc::malloc_trim(0);
    }
}
