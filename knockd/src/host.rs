//! Facts about the host knockd runs on, which more than one part asks
//! for: its kernel's release, and its interfaces.

/// The running kernel's release (`uname -r`), or an empty string if
/// `/proc` cannot tell.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The index of interface `name`, if the host has it.
pub fn interface_index(name: &str) -> Option<u32> {
    let name = std::ffi::CString::new(name).ok()?;
    // SAFETY: a NUL-terminated name; the call only reads it.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    (index != 0).then_some(index)
}

/// The oldest kernel the XDP program is written for, and what sets it:
/// `bpf_xdp_load_bytes` (5.18), which copies a knock's payload; the ring
/// buffer (5.8) and XDP links (5.9) come before it.
pub const OLDEST_KERNEL: (u32, u32) = (5, 18);

/// A warning when `release` (`uname -r`) is older than [`OLDEST_KERNEL`]:
/// its verifier will refuse the program, and knockd then runs on nftables
/// alone (or refuses to run, with `without_xdp: refuse`).
pub fn kernel_warning(release: &str, without_xdp: crate::config::WithoutXdp) -> Option<String> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>());
    let (Some(Ok(major)), Some(Ok(minor))) = (numbers.next(), numbers.next()) else {
        return None;
    };
    if (major, minor) >= OLDEST_KERNEL {
        return None;
    }
    let (floor_major, floor_minor) = OLDEST_KERNEL;
    let then = match without_xdp {
        crate::config::WithoutXdp::Nftables => {
            "knockd will run on nftables alone (no line-rate drop; without_xdp: nftables)"
        }
        crate::config::WithoutXdp::Refuse => "knockd will refuse to start (without_xdp: refuse)",
    };
    Some(format!(
        "this kernel ({release}) is older than {floor_major}.{floor_minor}, the oldest the XDP \
         program is written for (bpf_xdp_load_bytes): {then}"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WithoutXdp;

    #[test]
    fn kernels_older_than_the_floor_are_warned_about() {
        assert_eq!(kernel_warning("6.1.0-57-amd64", WithoutXdp::Nftables), None);
        assert_eq!(kernel_warning("5.18.0", WithoutXdp::Nftables), None);
        assert_eq!(kernel_warning("6.18.44-fc-v1272", WithoutXdp::Refuse), None);
        let old = kernel_warning("5.10.0-30-amd64", WithoutXdp::Nftables).unwrap();
        assert!(
            old.contains("5.10.0-30-amd64")
                && old.contains("5.18")
                && old.contains("nftables alone"),
            "{old}"
        );
        let refused = kernel_warning("4.19.0", WithoutXdp::Refuse).unwrap();
        assert!(refused.contains("refuse to start"), "{refused}");
        assert_eq!(
            kernel_warning("", WithoutXdp::Nftables),
            None,
            "unknown: no guess"
        );
    }
}
