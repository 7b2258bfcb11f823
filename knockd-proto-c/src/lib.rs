//! The knock protocol for firmware written in C: a thin C interface over
//! `knockd-proto`, built as a static library, with the header
//! `include/knockd.h` generated from this file by cbindgen (`cargo xtask
//! header`; the test command refuses a stale one).
//!
//! What a device does, and nothing else: derive a door's keys once, build
//! each knock of a sequence into a 68-byte buffer, open the server's sealed
//! reply. Nothing allocates: the door's keys live in a caller-owned
//! [`KnockdDoorKeys`] (static, on the stack, anywhere), and the caller
//! supplies the time and the sequence nonce (from its hardware RNG). Every
//! function checks its pointers and returns a [`KnockdResult`] code; none
//! panics on bad input. On a bare-metal target the library is `no_std`.
#![cfg_attr(target_os = "none", no_std)]

use core::{
    mem::{align_of, size_of},
    net::{IpAddr, Ipv6Addr},
    ptr,
};

use knockd_proto::{
    DeviceKey, DoorKeys, DoorParams, KNOCK_LEN, Kind, NONCE_LEN, REPLY_LEN, Reply, ReplyError,
    Status, count_of,
};

/// Bytes a [`KnockdDoorKeys`] holds: room for the derived keys, whatever
/// the target's layout of them.
pub const KNOCKD_DOOR_KEYS_SIZE: usize = 512;
/// Length of a device key.
pub const KNOCKD_KEY_LEN: usize = 32;
/// Length of a sequence nonce: fresh random bytes for every sequence.
pub const KNOCKD_NONCE_LEN: usize = 16;
/// Length of a knock payload (one UDP datagram).
pub const KNOCKD_KNOCK_LEN: usize = 68;
/// Length of a sealed reply.
pub const KNOCKD_REPLY_LEN: usize = 50;

// Written out above so that the header has numbers; the crate's are the
// truth.
const _: () = assert!(
    KNOCKD_NONCE_LEN == NONCE_LEN && KNOCKD_KNOCK_LEN == KNOCK_LEN && KNOCKD_REPLY_LEN == REPLY_LEN
);

const _: () = assert!(size_of::<DoorKeys>() <= KNOCKD_DOOR_KEYS_SIZE);
const _: () = assert!(align_of::<DoorKeys>() <= 8);

/// [`KNOCKD_DOOR_KEYS_SIZE`] in 8-byte words.
pub const KNOCKD_DOOR_KEYS_WORDS: usize = 64;
const _: () = assert!(KNOCKD_DOOR_KEYS_WORDS * 8 == KNOCKD_DOOR_KEYS_SIZE);

/// A door's derived keys, owned by the caller. Its contents are opaque;
/// fill it with `knockd_door_keys_derive` before any other use. Words, so
/// that it is aligned as the keys inside need, in C as in Rust.
#[repr(C)]
pub struct KnockdDoorKeys {
    pub opaque: [u64; KNOCKD_DOOR_KEYS_WORDS],
}

/// What a one-time door asks of a client (the server's door settings; a
/// profile's `knock_ports`, `knocks` and `step_secs`).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KnockdDoor {
    /// The knock-port range: first and last port, inclusive.
    pub knock_port_first: u16,
    pub knock_port_last: u16,
    /// Knocks in an open sequence (1 to 16).
    pub knocks: u8,
    /// The time step in seconds.
    pub step_secs: u32,
}

/// What a message asks for.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum KnockdKind {
    KnockdOpen = 1,
    KnockdClose = 2,
    KnockdHeartbeat = 3,
}

/// What a reply says.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum KnockdStatus {
    /// The door is open for this device: `port`, for `expires_in_secs`.
    KnockdGranted = 0,
    /// Its grant is closed.
    KnockdClosed = 1,
    /// A heartbeat for which it holds no grant.
    KnockdNoGrant = 2,
}

/// An opened reply.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct KnockdReply {
    /// The kind of knock it answers.
    pub kind: KnockdKind,
    pub status: KnockdStatus,
    /// The port to connect to (0 when nothing is open).
    pub port: u16,
    /// Seconds left to open new connections on `port`.
    pub expires_in_secs: u32,
    /// The server's clock, Unix milliseconds (to see this clock's skew).
    pub server_time_ms: u64,
}

/// What a call did. Every failure leaves the outputs untouched.
#[repr(C)]
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum KnockdResult {
    KnockdOk = 0,
    /// A required pointer was NULL, or a number out of its range (a kind,
    /// an index past the sequence, an empty or reversed port range).
    KnockdErrArgument = -1,
    /// The door name is longer than 64 bytes.
    KnockdErrDoorName = -2,
    /// The reply is not 50 bytes.
    KnockdErrReplyLength = -3,
    /// The reply's version or kind byte is not a reply's.
    KnockdErrReplyHeader = -4,
    /// The reply answers another sequence (nonce).
    KnockdErrReplyNonce = -5,
    /// The reply does not verify: not from a server holding this key, or
    /// altered on the way. Ignore it and keep waiting.
    KnockdErrReplySeal = -6,
    /// The reply carries a status this version does not know.
    KnockdErrReplyStatus = -7,
}

/// A C enum may hold any value: reads it as a byte first.
fn kind_from_raw(raw: u32) -> Option<Kind> {
    u8::try_from(raw).ok().and_then(Kind::from_byte)
}

fn params(door: &KnockdDoor) -> Option<DoorParams> {
    let valid = door.knock_port_first <= door.knock_port_last && (1..=16).contains(&door.knocks);
    valid.then_some(DoorParams {
        knock_ports: door.knock_port_first..=door.knock_port_last,
        knocks: door.knocks,
        step_secs: door.step_secs,
    })
}

/// Derives the keys of the device `key` (32 bytes) for the door named by
/// the `door_len` bytes at `door` (no terminating NUL needed) into `out`.
///
/// # Safety
/// `key` points to 32 readable bytes, `door` to `door_len` readable bytes,
/// and `out` to a writable `KnockdDoorKeys`; any may be NULL (an error).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn knockd_door_keys_derive(
    key: *const u8,
    door: *const u8,
    door_len: usize,
    out: *mut KnockdDoorKeys,
) -> KnockdResult {
    if key.is_null() || door.is_null() || out.is_null() {
        return KnockdResult::KnockdErrArgument;
    }
    // SAFETY: the caller promises 32 readable bytes at `key`.
    let key = DeviceKey(unsafe { ptr::read_unaligned(key.cast::<[u8; KNOCKD_KEY_LEN]>()) });
    // SAFETY: the caller promises `door_len` readable bytes at `door`.
    let name = unsafe { core::slice::from_raw_parts(door, door_len) };
    let Ok(name) = core::str::from_utf8(name) else {
        return KnockdResult::KnockdErrArgument;
    };
    match DoorKeys::try_derive(&key, name) {
        Ok(keys) => {
            // SAFETY: `out` is writable, KNOCKD_DOOR_KEYS_SIZE bytes aligned
            // to 8, which holds a DoorKeys (asserted above).
            unsafe { ptr::write(out.cast::<DoorKeys>(), keys) };
            KnockdResult::KnockdOk
        }
        Err(_) => KnockdResult::KnockdErrDoorName,
    }
}

/// How many knocks a sequence of `kind` has on `door`: its `knocks` for an
/// open, 1 for a close or a heartbeat; 0 if an argument is invalid.
///
/// # Safety
/// `door` points to a readable `KnockdDoor`, or is NULL (0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn knockd_sequence_length(door: *const KnockdDoor, kind: u32) -> u8 {
    // SAFETY: the caller promises a readable KnockdDoor, or NULL.
    let Some(door) = (unsafe { door.as_ref() }) else {
        return 0;
    };
    match (params(door), kind_from_raw(kind)) {
        (Some(params), Some(kind)) => count_of(kind, &params),
        _ => 0,
    }
}

/// Builds knock `index` (from 0) of the sequence of `kind` at the time
/// `now_ms` (Unix milliseconds) with the sequence's `nonce` (16 fresh
/// random bytes, the same for every knock of one sequence): the UDP port to
/// send it to in `port_out`, its 68 bytes in `payload_out`. `bind` is NULL
/// (the grant is for the address the knocks come from) or the 16 bytes of
/// an IPv6 address (an IPv4 one mapped, `::ffff:a.b.c.d`) the grant is for.
///
/// # Safety
/// `keys` was filled by `knockd_door_keys_derive`; `door` is readable;
/// `nonce` has 16 readable bytes, `bind` 16 or is NULL; `port_out` and
/// `payload_out` (68 bytes) are writable. NULL where not allowed is an
/// error.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn knockd_knock(
    keys: *const KnockdDoorKeys,
    door: *const KnockdDoor,
    kind: u32,
    now_ms: u64,
    nonce: *const u8,
    bind: *const u8,
    index: u8,
    port_out: *mut u16,
    payload_out: *mut u8,
) -> KnockdResult {
    if keys.is_null() || nonce.is_null() || port_out.is_null() || payload_out.is_null() {
        return KnockdResult::KnockdErrArgument;
    }
    // SAFETY: the caller promises a readable KnockdDoor, or NULL.
    let Some(door) = (unsafe { door.as_ref() }) else {
        return KnockdResult::KnockdErrArgument;
    };
    let (Some(params), Some(kind)) = (params(door), kind_from_raw(kind)) else {
        return KnockdResult::KnockdErrArgument;
    };
    // SAFETY: `keys` holds a DoorKeys that knockd_door_keys_derive wrote.
    let keys = unsafe { &*keys.cast::<DoorKeys>() };
    // SAFETY: 16 readable bytes at `nonce`, and at `bind` unless NULL.
    let nonce = unsafe { ptr::read_unaligned(nonce.cast::<[u8; NONCE_LEN]>()) };
    let bind = (!bind.is_null()).then(|| {
        let octets = unsafe { ptr::read_unaligned(bind.cast::<[u8; 16]>()) };
        IpAddr::V6(Ipv6Addr::from(octets)).to_canonical()
    });
    let Some((port, payload)) =
        knockd_proto::knock(keys, &params, kind, now_ms, nonce, bind, index)
    else {
        return KnockdResult::KnockdErrArgument;
    };
    // SAFETY: the caller promises a writable u16 and 68 writable bytes.
    unsafe {
        port_out.write_unaligned(port);
        ptr::copy_nonoverlapping(payload.as_ptr(), payload_out, KNOCK_LEN);
    }
    KnockdResult::KnockdOk
}

/// Opens the `len` bytes of a datagram that came back as the reply to the
/// sequence `nonce`, authenticating the server; fills `out` on success.
/// Any error but `KnockdOk` means: not (yet) the answer, keep waiting.
///
/// # Safety
/// `keys` was filled by `knockd_door_keys_derive`; `bytes` has `len`
/// readable bytes; `nonce` 16; `out` is writable. NULL is an error.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn knockd_reply_open(
    keys: *const KnockdDoorKeys,
    bytes: *const u8,
    len: usize,
    nonce: *const u8,
    out: *mut KnockdReply,
) -> KnockdResult {
    if keys.is_null() || bytes.is_null() || nonce.is_null() || out.is_null() {
        return KnockdResult::KnockdErrArgument;
    }
    // SAFETY: as the function's contract says.
    let (keys, bytes, nonce) = unsafe {
        (
            &*keys.cast::<DoorKeys>(),
            core::slice::from_raw_parts(bytes, len),
            ptr::read_unaligned(nonce.cast::<[u8; NONCE_LEN]>()),
        )
    };
    let reply = match Reply::open(bytes, keys, &nonce) {
        Ok(reply) => reply,
        Err(e) => {
            return match e {
                ReplyError::Length(_) => KnockdResult::KnockdErrReplyLength,
                ReplyError::Header(..) => KnockdResult::KnockdErrReplyHeader,
                ReplyError::Nonce => KnockdResult::KnockdErrReplyNonce,
                ReplyError::Seal => KnockdResult::KnockdErrReplySeal,
                ReplyError::Status(_) => KnockdResult::KnockdErrReplyStatus,
            };
        }
    };
    let opened = KnockdReply {
        kind: match reply.kind {
            Kind::Open => KnockdKind::KnockdOpen,
            Kind::Close => KnockdKind::KnockdClose,
            Kind::Heartbeat => KnockdKind::KnockdHeartbeat,
        },
        status: match reply.status {
            Status::Granted => KnockdStatus::KnockdGranted,
            Status::Closed => KnockdStatus::KnockdClosed,
            Status::NoGrant => KnockdStatus::KnockdNoGrant,
        },
        port: reply.port,
        expires_in_secs: reply.expires_in_secs,
        server_time_ms: reply.server_time_ms,
    };
    // SAFETY: `out` is writable.
    unsafe { out.write(opened) };
    KnockdResult::KnockdOk
}

/// A bare-metal build has no std to report a panic; none is reachable
/// from the functions above (they check their input), so it stops.
#[cfg(all(target_os = "none", not(test)))]
#[panic_handler]
fn panic(_: &core::panic::PanicInfo) -> ! {
    loop {
        core::hint::spin_loop();
    }
}

#[cfg(test)]
mod tests {
    use core::mem::MaybeUninit;

    use super::*;

    const DOOR: KnockdDoor = KnockdDoor {
        knock_port_first: 7000,
        knock_port_last: 7999,
        knocks: 3,
        step_secs: 30,
    };

    fn derive(key: &[u8; 32], door: &str) -> KnockdDoorKeys {
        let mut keys = MaybeUninit::<KnockdDoorKeys>::uninit();
        let result = unsafe {
            knockd_door_keys_derive(key.as_ptr(), door.as_ptr(), door.len(), keys.as_mut_ptr())
        };
        assert_eq!(result, KnockdResult::KnockdOk);
        unsafe { keys.assume_init() }
    }

    /// The C calls give what the crate gives: the same knocks, and a reply
    /// the crate sealed opens.
    #[test]
    fn the_c_calls_match_the_crate() {
        let key = [7; 32];
        let keys = derive(&key, "ssh");
        let rust = DoorKeys::derive(&DeviceKey(key), "ssh");
        let params = params(&DOOR).unwrap();
        let nonce = [9; 16];
        let expected =
            knockd_proto::sequence(&rust, &params, Kind::Open, 1_740_000_012_345, nonce, None);
        let length = unsafe { knockd_sequence_length(&DOOR, KnockdKind::KnockdOpen as u32) };
        assert_eq!(usize::from(length), expected.len());
        for (index, (port, payload)) in (0u8..).zip(expected.iter()) {
            let (mut got_port, mut got) = (0u16, [0u8; KNOCK_LEN]);
            let result = unsafe {
                knockd_knock(
                    &keys,
                    &DOOR,
                    KnockdKind::KnockdOpen as u32,
                    1_740_000_012_345,
                    nonce.as_ptr(),
                    ptr::null(),
                    index,
                    &mut got_port,
                    got.as_mut_ptr(),
                )
            };
            assert_eq!(result, KnockdResult::KnockdOk);
            assert_eq!((got_port, &got), (*port, payload));
        }
        let sealed = Reply {
            kind: Kind::Open,
            nonce,
            status: Status::Granted,
            port: 40123,
            expires_in_secs: 29,
            server_time_ms: 5,
        }
        .seal(&rust);
        let mut out = MaybeUninit::<KnockdReply>::uninit();
        let result = unsafe {
            knockd_reply_open(
                &keys,
                sealed.as_ptr(),
                sealed.len(),
                nonce.as_ptr(),
                out.as_mut_ptr(),
            )
        };
        assert_eq!(result, KnockdResult::KnockdOk);
        let out = unsafe { out.assume_init() };
        assert_eq!(
            (out.port, out.expires_in_secs, out.server_time_ms),
            (40123, 29, 5)
        );
        let mut bad = sealed;
        bad[30] ^= 1;
        let mut out = MaybeUninit::<KnockdReply>::uninit();
        let result = unsafe {
            knockd_reply_open(
                &keys,
                bad.as_ptr(),
                bad.len(),
                nonce.as_ptr(),
                out.as_mut_ptr(),
            )
        };
        assert_eq!(result, KnockdResult::KnockdErrReplySeal);
    }

    /// Bad arguments are errors, never a crash.
    #[test]
    fn bad_arguments_are_refused() {
        let keys = derive(&[1; 32], "ssh");
        let (mut port, mut payload) = (0u16, [0u8; KNOCK_LEN]);
        let knock = |door: &KnockdDoor,
                     kind: u32,
                     index: u8,
                     port: &mut u16,
                     payload: &mut [u8; KNOCK_LEN]| unsafe {
            knockd_knock(
                &keys,
                door,
                kind,
                0,
                [0u8; 16].as_ptr(),
                ptr::null(),
                index,
                port,
                payload.as_mut_ptr(),
            )
        };
        assert_eq!(
            knock(&DOOR, 0, 0, &mut port, &mut payload),
            KnockdResult::KnockdErrArgument
        );
        assert_eq!(
            knock(&DOOR, 9, 0, &mut port, &mut payload),
            KnockdResult::KnockdErrArgument
        );
        assert_eq!(
            knock(&DOOR, 1, 3, &mut port, &mut payload),
            KnockdResult::KnockdErrArgument
        );
        assert_eq!(
            knock(&DOOR, 2, 1, &mut port, &mut payload),
            KnockdResult::KnockdErrArgument
        );
        let reversed = KnockdDoor {
            knock_port_first: 8000,
            knock_port_last: 7000,
            ..DOOR
        };
        assert_eq!(
            knock(&reversed, 1, 0, &mut port, &mut payload),
            KnockdResult::KnockdErrArgument
        );
        let none = KnockdDoor { knocks: 0, ..DOOR };
        assert_eq!(unsafe { knockd_sequence_length(&none, 1) }, 0);
        assert_eq!(unsafe { knockd_sequence_length(ptr::null(), 1) }, 0);
        let long = [b'd'; 65];
        let mut out = MaybeUninit::<KnockdDoorKeys>::uninit();
        assert_eq!(
            unsafe {
                knockd_door_keys_derive(
                    [0u8; 32].as_ptr(),
                    long.as_ptr(),
                    long.len(),
                    out.as_mut_ptr(),
                )
            },
            KnockdResult::KnockdErrDoorName
        );
        assert_eq!(
            unsafe { knockd_door_keys_derive(ptr::null(), long.as_ptr(), 3, out.as_mut_ptr()) },
            KnockdResult::KnockdErrArgument
        );
        let mut reply = MaybeUninit::<KnockdReply>::uninit();
        assert_eq!(
            unsafe {
                knockd_reply_open(
                    &keys,
                    [0u8; 49].as_ptr(),
                    49,
                    [0u8; 16].as_ptr(),
                    reply.as_mut_ptr(),
                )
            },
            KnockdResult::KnockdErrReplyLength
        );
    }
}
