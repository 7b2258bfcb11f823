//! knockctl writing into a pipe whose reader has gone (`knockctl grants |
//! head`) ends quietly, as a command-line tool should, instead of
//! panicking on the failed write.

use std::{
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::process::ExitStatusExt as _,
    },
    process::{Command, Stdio},
};

#[test]
fn a_closed_stdout_ends_knockctl_quietly() {
    let mut fds = [0; 2];
    // SAFETY: pipe(2) fills the two-element array it is given.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: both fds are fresh and owned here alone.
    let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // The reader is gone before knockctl writes a byte.
    drop(read);
    let out = Command::new(env!("CARGO_BIN_EXE_knockctl"))
        .args(["completions", "bash"])
        .stdout(Stdio::from(write))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    assert_eq!(
        out.status.signal(),
        Some(libc::SIGPIPE),
        "{:?}: {stderr}",
        out.status
    );
}
