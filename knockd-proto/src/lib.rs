//! The knockd one-time knock protocol, as `docs/PROTOCOL.md` specifies it:
//! key derivation, knock ports, the knock payload, and the sealed reply.
//!
//! One implementation for every side: the daemon and `knockctl` use this
//! crate, and so can a microcontroller. It is `#![no_std]` and needs no
//! allocator: every message is a fixed-size array, a door's name is kept in
//! a fixed buffer, and the caller supplies the time and the randomness (a
//! sequence nonce), so it runs on a Cortex-M or an ESP32 as it runs on
//! Linux. The `std` feature adds key generation from the operating system
//! and the key file's hex text, which only hosts need.
//!
//! Primitives come from RustCrypto, without their default features:
//! HKDF-SHA256 for key derivation, HMAC-SHA256 for knock ports and knock
//! authentication, and ChaCha20-Poly1305 (in place, detached tag) for the
//! reply.
#![no_std]

#[cfg(feature = "std")]
extern crate std;

pub mod vectors;

use core::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    ops::{Deref, RangeInclusive},
};

use chacha20poly1305::{ChaCha20Poly1305, KeyInit as _, Tag, aead::AeadInPlace as _};
use hkdf::Hkdf;
use hmac::{Hmac, Mac as _};
use sha2::Sha256;

/// Protocol version carried in the first byte of every message (the XDP
/// program checks it too, hence its home in knockd-common).
pub const VERSION: u8 = knockd_common::knock_wire::VERSION;
/// Length of a device key.
pub const KEY_LEN: usize = 32;
/// Length of a sequence nonce.
pub const NONCE_LEN: usize = 16;
/// Length of the truncated knock MAC.
pub const MAC_LEN: usize = 16;
/// Length of the authenticated part of a knock (everything before the MAC).
pub const KNOCK_BODY_LEN: usize = 52;
/// Length of a knock payload.
pub const KNOCK_LEN: usize = knockd_common::knock_wire::LEN;
const _: () = assert!(KNOCK_LEN == KNOCK_BODY_LEN + MAC_LEN);
/// Length of the clear header of a reply (also its associated data).
pub const REPLY_HEADER_LEN: usize = 2 + NONCE_LEN;
/// Length of a reply's plaintext.
pub const REPLY_PLAINTEXT_LEN: usize = 16;
/// Length of a reply's Poly1305 tag.
pub const TAG_LEN: usize = 16;
/// Length of a reply: header, ciphertext, Poly1305 tag.
pub const REPLY_LEN: usize = REPLY_HEADER_LEN + REPLY_PLAINTEXT_LEN + TAG_LEN;
/// Most knocks one sequence may have.
pub const MAX_KNOCKS: u8 = knockd_common::knock_wire::MAX_KNOCKS;
/// Longest door name the keys can be derived for, in bytes. A daemon's
/// configuration allows 32; the margin is for names a future version may
/// allow, since a device cannot be reflashed as easily as a server.
pub const DOOR_NAME_MAX: usize = 64;
/// HKDF salt; changing it changes every derived value, hence the version.
const SALT: &[u8] = b"knockd/v1";

type HmacSha256 = Hmac<Sha256>;

/// A device's 256-bit secret.
#[derive(Clone, PartialEq, Eq)]
pub struct DeviceKey(pub [u8; KEY_LEN]);

impl fmt::Debug for DeviceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print key material, even in debug output.
        f.write_str("DeviceKey(<redacted>)")
    }
}

const HEX_DIGITS: usize = 2 * KEY_LEN;

/// Why a key file's text is not a key.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum KeyError {
    #[error("expected {HEX_DIGITS} hex digits (a 256-bit key), found {0} characters")]
    Length(usize),
    #[error("not a hex key: {0}")]
    Hex(hex::FromHexError),
}

impl DeviceKey {
    /// Parses the key-file format: 64 hex digits, surrounding whitespace
    /// allowed.
    pub fn from_hex(text: &str) -> Result<DeviceKey, KeyError> {
        let text = text.trim();
        if text.len() != 2 * KEY_LEN {
            return Err(KeyError::Length(text.len()));
        }
        let mut key = [0; KEY_LEN];
        hex::decode_to_slice(text, &mut key).map_err(KeyError::Hex)?;
        Ok(DeviceKey(key))
    }

    /// The key-file format.
    #[cfg(feature = "std")]
    pub fn to_hex(&self) -> std::string::String {
        hex::encode(self.0)
    }

    /// A fresh key from the operating system's CSPRNG.
    #[cfg(feature = "std")]
    pub fn generate() -> DeviceKey {
        let mut key = [0; KEY_LEN];
        rand::TryRngCore::try_fill_bytes(&mut rand::rngs::OsRng, &mut key)
            .expect("the operating system's random source failed");
        DeviceKey(key)
    }
}

/// What a message asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// Open the door for the sender.
    Open = 1,
    /// End the sender's grant now.
    Close = 2,
    /// Keep the sender's lease alive and learn its current port.
    Heartbeat = 3,
}

// The kernel's shape check accepts exactly these kinds.
const _: () = assert!(Kind::Heartbeat as u8 == knockd_common::knock_wire::KIND_MAX);

impl Kind {
    /// The kind a message's second byte names.
    pub fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Open),
            2 => Some(Kind::Close),
            3 => Some(Kind::Heartbeat),
            _ => None,
        }
    }

    /// Lower-case name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Kind::Open => "open",
            Kind::Close => "close",
            Kind::Heartbeat => "heartbeat",
        }
    }
}

/// A door name longer than [`DOOR_NAME_MAX`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("door name of {0} bytes, at most {DOOR_NAME_MAX}")]
pub struct DoorNameTooLong(pub usize);

/// Keys one device uses for one door, derived once and reused.
#[derive(Clone)]
pub struct DoorKeys {
    /// HKDF state after extract, for per-reply expansion.
    hkdf: Hkdf<Sha256>,
    /// The door name, part of every derivation: `door[..door_len]`.
    door: [u8; DOOR_NAME_MAX],
    door_len: u8,
    /// Keys the port-derivation HMAC.
    port_key: [u8; 32],
    /// Keys the knock MAC.
    mac_key: [u8; 32],
}

impl fmt::Debug for DoorKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let door = core::str::from_utf8(self.door()).unwrap_or("?");
        write!(f, "DoorKeys({door:?}, <redacted>)")
    }
}

impl DoorKeys {
    /// Derives the keys of `key` for the door named `door`.
    pub fn try_derive(key: &DeviceKey, door: &str) -> Result<DoorKeys, DoorNameTooLong> {
        let name = door.as_bytes();
        if name.len() > DOOR_NAME_MAX {
            return Err(DoorNameTooLong(name.len()));
        }
        let mut stored = [0; DOOR_NAME_MAX];
        stored[..name.len()].copy_from_slice(name);
        let hkdf = Hkdf::<Sha256>::new(Some(SALT), &key.0);
        // info = label 0x00 door (PROTOCOL.md §3).
        let expand = |label: &[u8]| {
            let mut out = [0; 32];
            hkdf.expand_multi_info(&[label, &[0], name], &mut out)
                .expect("32 bytes is a valid HKDF-SHA256 output length");
            out
        };
        Ok(DoorKeys {
            port_key: expand(b"port"),
            mac_key: expand(b"mac"),
            hkdf,
            door: stored,
            door_len: name.len() as u8,
        })
    }

    /// [`try_derive`](Self::try_derive) for a door name known to be valid
    /// (a configuration's or a profile's, both checked when read).
    ///
    /// # Panics
    /// If `door` is longer than [`DOOR_NAME_MAX`].
    pub fn derive(key: &DeviceKey, door: &str) -> DoorKeys {
        DoorKeys::try_derive(key, door).expect("door names are checked when read")
    }

    /// The door these keys are for.
    pub fn door(&self) -> &[u8] {
        &self.door[..usize::from(self.door_len)]
    }

    /// The key of knock-port derivation (a test vector's `port_key`).
    pub fn port_key(&self) -> &[u8; 32] {
        &self.port_key
    }

    /// The key of the knock MAC (a test vector's `mac_key`).
    pub fn mac_key(&self) -> &[u8; 32] {
        &self.mac_key
    }

    /// The port knock `index` of time step `step` goes to, in `range`.
    pub fn port(&self, step: u64, index: u8, range: &RangeInclusive<u16>) -> u16 {
        let mut mac = <HmacSha256 as hmac::Mac>::new_from_slice(&self.port_key)
            .expect("HMAC takes any key length");
        mac.update(&step.to_be_bytes());
        mac.update(&[index]);
        let digest = mac.finalize().into_bytes();
        let value = u32::from_be_bytes([digest[0], digest[1], digest[2], digest[3]]);
        let span = u32::from(*range.end()) - u32::from(*range.start()) + 1;
        // A 32-bit value reduced modulo at most 65536: the bias is below 2^-16.
        *range.start() + (value % span) as u16
    }

    fn mac(&self, body: &[u8]) -> HmacSha256 {
        let mut mac = <HmacSha256 as hmac::Mac>::new_from_slice(&self.mac_key)
            .expect("HMAC takes any key length");
        mac.update(body);
        mac
    }

    /// Whether `knock` carries a valid MAC under these keys. The comparison
    /// is constant-time.
    pub fn verify(&self, knock: &[u8; KNOCK_LEN]) -> bool {
        self.mac(&knock[..KNOCK_BODY_LEN])
            .verify_truncated_left(&knock[KNOCK_BODY_LEN..])
            .is_ok()
    }

    /// The single-use key sealing the reply to the sequence `nonce` (a
    /// test vector's `reply_key`).
    pub fn reply_key(&self, nonce: &[u8; NONCE_LEN]) -> [u8; 32] {
        let mut key = [0; 32];
        // info = "reply" 0x00 door 0x00 nonce (PROTOCOL.md §8).
        self.hkdf
            .expand_multi_info(&[b"reply", &[0], self.door(), &[0], nonce], &mut key)
            .expect("32 bytes is a valid HKDF-SHA256 output length");
        key
    }

    fn reply_cipher(&self, nonce: &[u8; NONCE_LEN]) -> ChaCha20Poly1305 {
        ChaCha20Poly1305::new(&self.reply_key(nonce).into())
    }
}

/// A knock's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Knock {
    pub kind: Kind,
    /// Position in the sequence, `0..count`.
    pub index: u8,
    /// Knocks in the sequence, `1..=MAX_KNOCKS`.
    pub count: u8,
    /// The time step the sender's clock was in.
    pub step: u64,
    /// The sender's clock, Unix milliseconds, so the daemon can report skew.
    pub time_ms: u64,
    /// Random per sequence: the same in all its knocks, fresh for the next.
    pub nonce: [u8; NONCE_LEN],
    /// The address the grant is for, when the sender knows it (its public
    /// address behind NAT); `None` means the packet's source address.
    pub bind: Option<IpAddr>,
}

/// Why a knock payload could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("knock of {0} bytes, expected {KNOCK_LEN}")]
    Length(usize),
    #[error("protocol version {0}, expected {VERSION}")]
    Version(u8),
    #[error("unknown message kind {0}")]
    Kind(u8),
    #[error("knock {index} of a sequence of {count}")]
    Index { index: u8, count: u8 },
}

impl Knock {
    /// The payload, MAC included.
    pub fn encode(&self, keys: &DoorKeys) -> [u8; KNOCK_LEN] {
        let mut out = [0; KNOCK_LEN];
        out[0] = VERSION;
        out[1] = self.kind as u8;
        out[2] = self.index;
        out[3] = self.count;
        out[4..12].copy_from_slice(&self.step.to_be_bytes());
        out[12..20].copy_from_slice(&self.time_ms.to_be_bytes());
        out[20..36].copy_from_slice(&self.nonce);
        let bind = match self.bind {
            None => [0; 16],
            Some(IpAddr::V4(v4)) => v4.to_ipv6_mapped().octets(),
            Some(IpAddr::V6(v6)) => v6.octets(),
        };
        out[36..52].copy_from_slice(&bind);
        let tag = keys.mac(&out[..KNOCK_BODY_LEN]).finalize().into_bytes();
        out[KNOCK_BODY_LEN..].copy_from_slice(&tag[..MAC_LEN]);
        out
    }

    /// Parses a payload without authenticating it: the fields say which
    /// keys to try; only [`DoorKeys::verify`] makes them trustworthy.
    pub fn parse(payload: &[u8]) -> Result<(Knock, &[u8; KNOCK_LEN]), ParseError> {
        let bytes: &[u8; KNOCK_LEN] = payload
            .try_into()
            .map_err(|_| ParseError::Length(payload.len()))?;
        if bytes[0] != VERSION {
            return Err(ParseError::Version(bytes[0]));
        }
        let kind = Kind::from_byte(bytes[1]).ok_or(ParseError::Kind(bytes[1]))?;
        let (index, count) = (bytes[2], bytes[3]);
        if count == 0 || count > MAX_KNOCKS || index >= count {
            return Err(ParseError::Index { index, count });
        }
        let be64 = |at: usize| u64::from_be_bytes(bytes[at..at + 8].try_into().expect("8 bytes"));
        let bind: [u8; 16] = bytes[36..52].try_into().expect("16 bytes");
        Ok((
            Knock {
                kind,
                index,
                count,
                step: be64(4),
                time_ms: be64(12),
                nonce: bytes[20..36].try_into().expect("16 bytes"),
                bind: (bind != [0; 16]).then(|| Ipv6Addr::from(bind).to_canonical()),
            },
            bytes,
        ))
    }
}

/// What a reply says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    /// The door is open for the sender: `port`, for `expires_in_secs`.
    Granted = 0,
    /// The sender's grant is closed.
    Closed = 1,
    /// A heartbeat for which no grant exists.
    NoGrant = 2,
}

/// The sealed reply's fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Reply {
    /// The kind of the knock this answers.
    pub kind: Kind,
    /// The sequence nonce of the knock this answers.
    pub nonce: [u8; NONCE_LEN],
    pub status: Status,
    /// The port to connect to (0 when nothing is open).
    pub port: u16,
    /// Seconds left to open new connections on `port`.
    pub expires_in_secs: u32,
    /// The daemon's clock, Unix milliseconds, so the client can see skew.
    pub server_time_ms: u64,
}

/// Why a reply was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReplyError {
    #[error("reply of {0} bytes, expected {REPLY_LEN}")]
    Length(usize),
    #[error("reply with version {0}, kind byte {1:#04x}")]
    Header(u8, u8),
    #[error("reply to another sequence")]
    Nonce,
    #[error("reply does not verify: not from a daemon holding this key, or altered")]
    Seal,
    #[error("reply with unknown status {0}")]
    Status(u8),
}

impl Reply {
    /// Seals the reply under the single-use key of its sequence. The AEAD
    /// nonce is fixed (zero) because the key is never used twice: it is
    /// derived from the sequence nonce, and each sequence gets one reply.
    pub fn seal(&self, keys: &DoorKeys) -> [u8; REPLY_LEN] {
        let mut out = [0; REPLY_LEN];
        out[0] = VERSION;
        out[1] = 0x80 | self.kind as u8;
        out[2..REPLY_HEADER_LEN].copy_from_slice(&self.nonce);
        let (header, body) = out.split_at_mut(REPLY_HEADER_LEN);
        let (plain, tag_out) = body.split_at_mut(REPLY_PLAINTEXT_LEN);
        plain[0] = self.status as u8;
        plain[2..4].copy_from_slice(&self.port.to_be_bytes());
        plain[4..8].copy_from_slice(&self.expires_in_secs.to_be_bytes());
        plain[8..16].copy_from_slice(&self.server_time_ms.to_be_bytes());
        let tag = keys
            .reply_cipher(&self.nonce)
            .encrypt_in_place_detached(&[0; 12].into(), header, plain)
            .expect("ChaCha20-Poly1305 encrypts any 16-byte message");
        tag_out.copy_from_slice(&tag);
        out
    }

    /// Opens a reply to the sequence `nonce`, authenticating the daemon.
    pub fn open(
        bytes: &[u8],
        keys: &DoorKeys,
        nonce: &[u8; NONCE_LEN],
    ) -> Result<Reply, ReplyError> {
        if bytes.len() != REPLY_LEN {
            return Err(ReplyError::Length(bytes.len()));
        }
        let kind = (bytes[0] == VERSION && bytes[1] & 0x80 != 0)
            .then(|| Kind::from_byte(bytes[1] & 0x7f))
            .flatten()
            .ok_or(ReplyError::Header(bytes[0], bytes[1]))?;
        if bytes[2..REPLY_HEADER_LEN] != nonce[..] {
            return Err(ReplyError::Nonce);
        }
        let (header, body) = bytes.split_at(REPLY_HEADER_LEN);
        let (sealed, tag) = body.split_at(REPLY_PLAINTEXT_LEN);
        let mut plain = [0; REPLY_PLAINTEXT_LEN];
        plain.copy_from_slice(sealed);
        keys.reply_cipher(nonce)
            .decrypt_in_place_detached(&[0; 12].into(), header, &mut plain, Tag::from_slice(tag))
            .map_err(|_| ReplyError::Seal)?;
        let status = match plain[0] {
            0 => Status::Granted,
            1 => Status::Closed,
            2 => Status::NoGrant,
            other => return Err(ReplyError::Status(other)),
        };
        Ok(Reply {
            kind,
            nonce: *nonce,
            status,
            port: u16::from_be_bytes([plain[2], plain[3]]),
            expires_in_secs: u32::from_be_bytes(plain[4..8].try_into().expect("4 bytes")),
            server_time_ms: u64::from_be_bytes(plain[8..16].try_into().expect("8 bytes")),
        })
    }
}

/// What a client must know about a one-time door to knock on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DoorParams {
    /// The UDP range knock ports fall in.
    pub knock_ports: RangeInclusive<u16>,
    /// Knocks per open sequence.
    pub knocks: u8,
    /// Time step length in seconds.
    pub step_secs: u32,
}

/// The knocks of one sequence, in order: (UDP port, payload). A fixed
/// array (1,120 bytes), so building one needs no allocator; it reads as a
/// slice of its knocks.
#[derive(Clone)]
pub struct Sequence {
    knocks: [(u16, [u8; KNOCK_LEN]); MAX_KNOCKS as usize],
    len: u8,
}

impl Deref for Sequence {
    type Target = [(u16, [u8; KNOCK_LEN])];

    fn deref(&self) -> &Self::Target {
        &self.knocks[..usize::from(self.len)]
    }
}

impl fmt::Debug for Sequence {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list()
            .entries(self.iter().map(|(port, _)| port))
            .finish()
    }
}

impl IntoIterator for Sequence {
    type Item = (u16, [u8; KNOCK_LEN]);
    type IntoIter = core::iter::Take<core::array::IntoIter<Self::Item, { MAX_KNOCKS as usize }>>;

    fn into_iter(self) -> Self::IntoIter {
        self.knocks.into_iter().take(usize::from(self.len))
    }
}

impl<'a> IntoIterator for &'a Sequence {
    type Item = &'a (u16, [u8; KNOCK_LEN]);
    type IntoIter = core::slice::Iter<'a, (u16, [u8; KNOCK_LEN])>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// How many knocks a sequence of `kind` has: the door's `knocks` for an
/// open (within 1..=[`MAX_KNOCKS`]), one for a close or a heartbeat.
pub fn count_of(kind: Kind, params: &DoorParams) -> u8 {
    match kind {
        Kind::Open => params.knocks.clamp(1, MAX_KNOCKS),
        Kind::Close | Kind::Heartbeat => 1,
    }
}

/// Knock `index` of the sequence of `kind` at the time `now_ms` (Unix
/// ms) with the sequence's `nonce`: the UDP port it goes to and its
/// payload; `None` past the sequence's last knock. A device short of RAM
/// builds one knock at a time with this (68 bytes) instead of
/// [`sequence`] (1,120).
pub fn knock(
    keys: &DoorKeys,
    params: &DoorParams,
    kind: Kind,
    now_ms: u64,
    nonce: [u8; NONCE_LEN],
    bind: Option<IpAddr>,
    index: u8,
) -> Option<(u16, [u8; KNOCK_LEN])> {
    let count = count_of(kind, params);
    if index >= count {
        return None;
    }
    let step = step_of(now_ms, params.step_secs);
    let knock = Knock {
        kind,
        index,
        count,
        step,
        time_ms: now_ms,
        nonce,
        bind,
    };
    Some((
        keys.port(step, index, &params.knock_ports),
        knock.encode(keys),
    ))
}

/// The knocks of one sequence of `kind` at the time `now_ms` (Unix ms),
/// with the caller's fresh random `nonce`.
pub fn sequence(
    keys: &DoorKeys,
    params: &DoorParams,
    kind: Kind,
    now_ms: u64,
    nonce: [u8; NONCE_LEN],
    bind: Option<IpAddr>,
) -> Sequence {
    let mut sequence = Sequence {
        knocks: [(0, [0; KNOCK_LEN]); MAX_KNOCKS as usize],
        len: 0,
    };
    while let Some(next) = knock(keys, params, kind, now_ms, nonce, bind, sequence.len) {
        sequence.knocks[usize::from(sequence.len)] = next;
        sequence.len += 1;
    }
    sequence
}

/// The time step a Unix time in milliseconds falls in.
pub fn step_of(unix_ms: u64, step_secs: u32) -> u64 {
    unix_ms / (u64::from(step_secs.max(1)) * 1000)
}

#[cfg(test)]
mod tests;
