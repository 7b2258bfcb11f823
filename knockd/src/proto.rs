//! The one-time knock wire protocol, as specified in `docs/PROTOCOL.md`.
//!
//! Everything here is pure computation on bytes: key derivation, knock-port
//! derivation, the knock payload and the sealed reply. It depends on no
//! kernel interface, so a client can use it on any platform, and the test
//! vectors in the protocol document are checked against it.
//!
//! Primitives come from RustCrypto: HKDF-SHA256 for key derivation,
//! HMAC-SHA256 for port derivation and knock authentication, and
//! ChaCha20-Poly1305 for the reply.

use std::{
    fmt,
    net::{IpAddr, Ipv6Addr},
    ops::RangeInclusive,
};

use chacha20poly1305::{
    ChaCha20Poly1305, KeyInit as _,
    aead::{Aead as _, Payload},
};
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
/// Length of a reply: header, ciphertext, Poly1305 tag.
pub const REPLY_LEN: usize = REPLY_HEADER_LEN + REPLY_PLAINTEXT_LEN + 16;
/// Most knocks one sequence may have.
pub const MAX_KNOCKS: u8 = knockd_common::knock_wire::MAX_KNOCKS;
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

impl DeviceKey {
    /// Parses the key-file format: 64 hex digits, surrounding whitespace
    /// allowed.
    pub fn from_hex(text: &str) -> Result<DeviceKey, String> {
        let text = text.trim();
        if text.len() != 2 * KEY_LEN {
            return Err(format!(
                "expected {} hex digits (a 256-bit key), found {} characters",
                2 * KEY_LEN,
                text.len()
            ));
        }
        let mut key = [0; KEY_LEN];
        hex::decode_to_slice(text, &mut key).map_err(|e| format!("not a hex key: {e}"))?;
        Ok(DeviceKey(key))
    }

    /// The key-file format.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    /// A fresh key from the operating system's CSPRNG.
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
    fn from_byte(b: u8) -> Option<Kind> {
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

/// Keys one device uses for one door, derived once and reused.
#[derive(Clone)]
pub struct DoorKeys {
    /// HKDF state after extract, for per-reply expansion.
    hkdf: Hkdf<Sha256>,
    /// The door name, part of every derivation.
    door: Vec<u8>,
    /// Keys the port-derivation HMAC.
    port_key: [u8; 32],
    /// Keys the knock MAC.
    mac_key: [u8; 32],
}

impl fmt::Debug for DoorKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DoorKeys({:?}, <redacted>)",
            String::from_utf8_lossy(&self.door)
        )
    }
}

fn info(label: &str, door: &[u8], extra: &[u8]) -> Vec<u8> {
    let mut info = Vec::with_capacity(label.len() + door.len() + extra.len() + 2);
    info.extend_from_slice(label.as_bytes());
    info.push(0);
    info.extend_from_slice(door);
    if !extra.is_empty() {
        info.push(0);
        info.extend_from_slice(extra);
    }
    info
}

impl DoorKeys {
    /// Derives the keys of `key` for the door named `door`.
    pub fn derive(key: &DeviceKey, door: &str) -> DoorKeys {
        let hkdf = Hkdf::<Sha256>::new(Some(SALT), &key.0);
        let door = door.as_bytes().to_vec();
        let expand = |label: &str| {
            let mut out = [0; 32];
            hkdf.expand(&info(label, &door, &[]), &mut out)
                .expect("32 bytes is a valid HKDF-SHA256 output length");
            out
        };
        DoorKeys {
            port_key: expand("port"),
            mac_key: expand("mac"),
            hkdf,
            door,
        }
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

    /// The single-use key sealing the reply to the sequence `nonce`.
    fn reply_key(&self, nonce: &[u8; NONCE_LEN]) -> [u8; 32] {
        let mut key = [0; 32];
        self.hkdf
            .expand(&info("reply", &self.door, nonce), &mut key)
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
        let mut plain = [0; REPLY_PLAINTEXT_LEN];
        plain[0] = self.status as u8;
        plain[2..4].copy_from_slice(&self.port.to_be_bytes());
        plain[4..8].copy_from_slice(&self.expires_in_secs.to_be_bytes());
        plain[8..16].copy_from_slice(&self.server_time_ms.to_be_bytes());
        let sealed = keys
            .reply_cipher(&self.nonce)
            .encrypt(
                &[0; 12].into(),
                Payload {
                    msg: &plain,
                    aad: &out[..REPLY_HEADER_LEN],
                },
            )
            .expect("ChaCha20-Poly1305 encrypts any 16-byte message");
        out[REPLY_HEADER_LEN..].copy_from_slice(&sealed);
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
        let plain = keys
            .reply_cipher(nonce)
            .decrypt(
                &[0; 12].into(),
                Payload {
                    msg: &bytes[REPLY_HEADER_LEN..],
                    aad: &bytes[..REPLY_HEADER_LEN],
                },
            )
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

/// The knocks of one sequence: (UDP port, payload) in order. Open sequences
/// have `params.knocks` knocks; close and heartbeat messages have one.
pub fn sequence(
    keys: &DoorKeys,
    params: &DoorParams,
    kind: Kind,
    now_ms: u64,
    nonce: [u8; NONCE_LEN],
    bind: Option<IpAddr>,
) -> Vec<(u16, [u8; KNOCK_LEN])> {
    let count = match kind {
        Kind::Open => params.knocks.clamp(1, MAX_KNOCKS),
        Kind::Close | Kind::Heartbeat => 1,
    };
    let step = step_of(now_ms, params.step_secs);
    (0..count)
        .map(|index| {
            let knock = Knock {
                kind,
                index,
                count,
                step,
                time_ms: now_ms,
                nonce,
                bind,
            };
            (
                keys.port(step, index, &params.knock_ports),
                knock.encode(keys),
            )
        })
        .collect()
}

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

/// The time step a Unix time in milliseconds falls in.
pub fn step_of(unix_ms: u64, step_secs: u32) -> u64 {
    unix_ms / (u64::from(step_secs.max(1)) * 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> DeviceKey {
        DeviceKey(std::array::from_fn(|i| i as u8))
    }

    fn sample(keys: &DoorKeys) -> [u8; KNOCK_LEN] {
        Knock {
            kind: Kind::Open,
            index: 1,
            count: 3,
            step: 58_000_000,
            time_ms: 1_740_000_000_123,
            nonce: [0xab; 16],
            bind: None,
        }
        .encode(keys)
    }

    #[test]
    fn knock_round_trips_and_verifies() {
        let keys = DoorKeys::derive(&key(), "ssh");
        let bytes = sample(&keys);
        let (knock, raw) = Knock::parse(&bytes).unwrap();
        assert!(keys.verify(raw));
        assert_eq!((knock.index, knock.count, knock.step), (1, 3, 58_000_000));
        assert_eq!(knock.bind, None);
        assert_eq!(knock.encode(&keys), bytes);
    }

    #[test]
    fn any_flipped_bit_fails_verification() {
        let keys = DoorKeys::derive(&key(), "ssh");
        let bytes = sample(&keys);
        for i in 0..KNOCK_LEN {
            for bit in 0..8 {
                let mut bad = bytes;
                bad[i] ^= 1 << bit;
                if let Ok((_, raw)) = Knock::parse(&bad) {
                    assert!(!keys.verify(raw), "byte {i} bit {bit}");
                }
            }
        }
    }

    #[test]
    fn keys_are_bound_to_door_and_device() {
        let bytes = sample(&DoorKeys::derive(&key(), "ssh"));
        let (_, raw) = Knock::parse(&bytes).unwrap();
        assert!(!DoorKeys::derive(&key(), "vpn").verify(raw));
        let other = DeviceKey([7; 32]);
        assert!(!DoorKeys::derive(&other, "ssh").verify(raw));
    }

    #[test]
    fn malformed_knocks_are_named() {
        let keys = DoorKeys::derive(&key(), "ssh");
        let bytes = sample(&keys);
        assert_eq!(
            Knock::parse(&bytes[..10]).unwrap_err(),
            ParseError::Length(10)
        );
        assert_eq!(
            Knock::parse(&[0; 200]).unwrap_err(),
            ParseError::Length(200)
        );
        assert_eq!(Knock::parse(&[]).unwrap_err(), ParseError::Length(0));
        let mut bad = bytes;
        bad[0] = 9;
        assert_eq!(Knock::parse(&bad).unwrap_err(), ParseError::Version(9));
        let mut bad = bytes;
        bad[1] = 0;
        assert_eq!(Knock::parse(&bad).unwrap_err(), ParseError::Kind(0));
        let mut bad = bytes;
        bad[2] = 3;
        assert!(matches!(Knock::parse(&bad), Err(ParseError::Index { .. })));
        let mut bad = bytes;
        bad[3] = 0;
        assert!(matches!(Knock::parse(&bad), Err(ParseError::Index { .. })));
        let mut bad = bytes;
        bad[3] = MAX_KNOCKS + 1;
        assert!(matches!(Knock::parse(&bad), Err(ParseError::Index { .. })));
    }

    #[test]
    fn bind_address_round_trips() {
        let keys = DoorKeys::derive(&key(), "ssh");
        for bind in ["198.18.0.7", "2001:db8::7"] {
            let mut knock = Knock::parse(&sample(&keys)).unwrap().0;
            knock.bind = Some(bind.parse().unwrap());
            let bytes = knock.encode(&keys);
            assert_eq!(Knock::parse(&bytes).unwrap().0.bind, knock.bind);
        }
    }

    #[test]
    fn ports_stay_in_range_and_spread() {
        let keys = DoorKeys::derive(&key(), "ssh");
        let range = 7000..=7099;
        let mut seen = std::collections::BTreeSet::new();
        for step in 0..200 {
            for index in 0..3 {
                let port = keys.port(step, index, &range);
                assert!(range.contains(&port));
                seen.insert(port);
            }
        }
        assert!(
            seen.len() > 90,
            "600 draws over 100 ports hit {}",
            seen.len()
        );
        assert_eq!(keys.port(5, 0, &(9000..=9000)), 9000);
        let full = 1..=65535;
        assert!(full.contains(&keys.port(5, 0, &full)));
    }

    #[test]
    fn reply_seals_and_opens_only_for_its_key_and_sequence() {
        let keys = DoorKeys::derive(&key(), "ssh");
        let reply = Reply {
            kind: Kind::Open,
            nonce: [0xab; 16],
            status: Status::Granted,
            port: 40123,
            expires_in_secs: 30,
            server_time_ms: 1_740_000_000_999,
        };
        let sealed = reply.seal(&keys);
        assert_eq!(Reply::open(&sealed, &keys, &[0xab; 16]).unwrap(), reply);
        assert_eq!(
            Reply::open(&sealed, &keys, &[0xac; 16]).unwrap_err(),
            ReplyError::Nonce
        );
        let other = DoorKeys::derive(&key(), "vpn");
        assert_eq!(
            Reply::open(&sealed, &other, &[0xab; 16]).unwrap_err(),
            ReplyError::Seal
        );
        for i in 0..REPLY_LEN {
            let mut bad = sealed;
            bad[i] ^= 0x01;
            assert!(Reply::open(&bad, &keys, &[0xab; 16]).is_err(), "byte {i}");
        }
        assert_eq!(
            Reply::open(&sealed[1..], &keys, &[0xab; 16]).unwrap_err(),
            ReplyError::Length(REPLY_LEN - 1)
        );
    }

    #[test]
    fn key_file_format() {
        let key = DeviceKey::generate();
        assert_eq!(
            DeviceKey::from_hex(&format!("{}\n", key.to_hex())).unwrap(),
            key
        );
        assert!(
            DeviceKey::from_hex("abcd")
                .unwrap_err()
                .contains("64 hex digits")
        );
        assert!(
            DeviceKey::from_hex(&"zz".repeat(32))
                .unwrap_err()
                .contains("not a hex key")
        );
        assert_eq!(format!("{key:?}"), "DeviceKey(<redacted>)");
        assert_ne!(DeviceKey::generate(), key);
    }

    /// The vectors in docs/PROTOCOL.md, recomputed from their inputs.
    #[test]
    fn protocol_vectors() {
        let doc = include_str!("../../docs/PROTOCOL.md");
        let blocks: Vec<std::collections::HashMap<&str, &str>> = doc
            .split("```text\n")
            .skip(1)
            .filter_map(|block| block.split("```").next())
            .filter(|block| block.starts_with("vector "))
            .map(|block| {
                block
                    .lines()
                    .filter_map(|line| line.split_once(' '))
                    .collect()
            })
            .collect();
        assert_eq!(blocks.len(), 5, "vectors in PROTOCOL.md");
        for v in blocks {
            let name = v["vector"];
            let mut key = [0; KEY_LEN];
            hex::decode_to_slice(v["key"], &mut key).unwrap();
            let keys = DoorKeys::derive(&DeviceKey(key), v["door"]);
            assert_eq!(hex::encode(keys.port_key), v["port_key"], "{name}");
            assert_eq!(hex::encode(keys.mac_key), v["mac_key"], "{name}");
            let (start, end) = v["knock_ports"].split_once('-').unwrap();
            let count: u8 = v["count"].parse().unwrap();
            let params = DoorParams {
                knock_ports: start.parse().unwrap()..=end.parse().unwrap(),
                knocks: count,
                step_secs: v["step_secs"].parse().unwrap(),
            };
            let time_ms: u64 = v["time_ms"].parse().unwrap();
            assert_eq!(
                step_of(time_ms, params.step_secs).to_string(),
                v["step"],
                "{name}"
            );
            let kind = match v["kind"] {
                "open" => Kind::Open,
                "close" => Kind::Close,
                _ => Kind::Heartbeat,
            };
            let mut nonce = [0; NONCE_LEN];
            hex::decode_to_slice(v["nonce"], &mut nonce).unwrap();
            let bind = (v["bind"] != "none").then(|| v["bind"].parse().unwrap());
            let knocks = sequence(&keys, &params, kind, time_ms, nonce, bind);
            assert_eq!(knocks.len(), usize::from(count), "{name}");
            for (i, (port, payload)) in knocks.iter().enumerate() {
                assert_eq!(
                    port.to_string(),
                    v[format!("port.{i}").as_str()],
                    "{name} port {i}"
                );
                assert_eq!(
                    hex::encode(payload),
                    v[format!("knock.{i}").as_str()],
                    "{name} knock {i}"
                );
                let (parsed, raw) = Knock::parse(payload).unwrap();
                assert!(keys.verify(raw));
                assert_eq!((parsed.index, parsed.bind), (i as u8, bind));
            }
            assert_eq!(
                hex::encode(keys.reply_key(&nonce)),
                v["reply_key"],
                "{name}"
            );
            let fields: Vec<&str> = v["reply_fields"].split(' ').collect();
            let reply = Reply {
                kind,
                nonce,
                status: match fields[0] {
                    "granted" => Status::Granted,
                    "closed" => Status::Closed,
                    _ => Status::NoGrant,
                },
                port: fields[1].parse().unwrap(),
                expires_in_secs: fields[2].parse().unwrap(),
                server_time_ms: fields[3].parse().unwrap(),
            };
            let sealed = reply.seal(&keys);
            assert_eq!(hex::encode(sealed), v["reply"], "{name} reply");
            assert_eq!(Reply::open(&sealed, &keys, &nonce).unwrap(), reply);
        }
    }

    #[test]
    fn steps() {
        assert_eq!(step_of(0, 30), 0);
        assert_eq!(step_of(29_999, 30), 0);
        assert_eq!(step_of(30_000, 30), 1);
        assert_eq!(step_of(1_740_000_000_000, 30), 58_000_000);
    }
}
