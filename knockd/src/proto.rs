//! The one-time knock wire protocol (`docs/PROTOCOL.md`): the
//! `knockd-proto` crate, which is `no_std` and the one implementation of
//! it, and the two things a host supplies that a microcontroller supplies
//! otherwise: the time and fresh randomness.

pub use knockd_proto::*;

/// A fresh random sequence nonce.
pub fn fresh_nonce() -> [u8; NONCE_LEN] {
    let mut nonce = [0; NONCE_LEN];
    rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut nonce)
        .expect("the operating system's random source failed");
    nonce
}

/// Unix time in milliseconds: the clock one-time sequences are derived from.
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
