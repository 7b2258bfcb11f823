//! What fleet mode keeps in etcd: the key layout, the JSON records, and
//! device keys sealed under the cluster key. No I/O here, so the layout and
//! the sealing are unit-tested without an etcd.
//!
//! Every key starts with the configured prefix `P` (default `/knockd/`):
//!
//! | key | value | lease |
//! |---|---|---|
//! | `P/devices/ID` | [`DeviceRecord`], key sealed | none |
//! | `P/consumed/DOOR/DEVICE/STEP/NONCE` | the node that consumed it | the node's replay lease |
//! | `P/grants/DOOR/SOURCE/DEVICE` | [`GrantRecord`] | the grant's lifetime |
//! | `P/revokes/ID` | [`RevokeRecord`] | a minute |
//! | `P/nodes/NAME` | [`NodeReport`](crate::control::wire::NodeReport) | a few seconds |
//! | `P/members/NAME` | when the node first joined | none |

use chacha20poly1305::{
    ChaCha20Poly1305, KeyInit as _,
    aead::{Aead as _, Payload},
};
use hkdf::Hkdf;
use hmac::{Hmac, Mac as _};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::{auth::Consumed, grants::Holder, proto::DeviceKey};

/// Version of the records below; a node refuses records of another.
///
/// 2: every record is signed over all of its fields (version 1 signed
/// grants and revokes only, and a device record's groups and doors were
/// covered by nothing), and grants say when they were opened, so a revoke
/// ends only what existed when it was issued.
///
/// Grants moved from `P/grants/DOOR/SOURCE` to `P/grants/DOOR/SOURCE/DEVICE`
/// (devices behind one NAT address hold one grant each) without a new
/// version: the records are unchanged, and each layout reads the other's
/// keys as [`Key::Other`], so a device record, which a version change would
/// make every node refuse until re-signed, is not touched.
pub const RECORD_VERSION: u32 = 2;

/// The key layout under one prefix.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

/// A key of the layout, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Key {
    Device(String),
    Grant(Holder),
    Revoke(String),
    Node(String),
    /// Consumed sequences, members, and anything a newer version may add.
    Other,
}

impl Keys {
    /// `prefix` starts and ends with `/` (the configuration checks that).
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    /// The whole prefix: what a node lists and watches.
    pub fn all(&self) -> String {
        self.prefix.clone()
    }

    pub fn devices(&self) -> String {
        format!("{}devices/", self.prefix)
    }

    pub fn device(&self, id: &str) -> String {
        format!("{}{id}", self.devices())
    }

    pub fn grants(&self) -> String {
        format!("{}grants/", self.prefix)
    }

    /// A grant's key. A grant whose device is not known (restored after a
    /// restart from an element without one) has an empty last segment:
    /// device ids are never empty.
    pub fn grant(&self, holder: &Holder) -> String {
        format!(
            "{}{}/{}/{}",
            self.grants(),
            holder.door,
            holder.source,
            holder.device.as_deref().unwrap_or_default()
        )
    }

    pub fn revoke(&self, id: &str) -> String {
        format!("{}revokes/{id}", self.prefix)
    }

    pub fn nodes(&self) -> String {
        format!("{}nodes/", self.prefix)
    }

    pub fn node(&self, name: &str) -> String {
        format!("{}{name}", self.nodes())
    }

    pub fn members(&self) -> String {
        format!("{}members/", self.prefix)
    }

    pub fn member(&self, name: &str) -> String {
        format!("{}{name}", self.members())
    }

    /// A consumed sequence: door, device, step and nonce name it, so two
    /// nodes that accept the same sequence race for the same key.
    pub fn consumed(&self, c: &Consumed) -> String {
        format!(
            "{}consumed/{}/{}/{}/{}",
            self.prefix,
            c.door,
            c.device,
            c.step,
            hex::encode(c.nonce)
        )
    }

    /// What a key under the prefix names. Keys that do not parse (written
    /// by hand, or by another version) are `Other` and ignored.
    pub fn parse(&self, key: &[u8]) -> Key {
        let Some(rest) = std::str::from_utf8(key)
            .ok()
            .and_then(|k| k.strip_prefix(self.prefix.as_str()))
        else {
            return Key::Other;
        };
        let mut parts = rest.split('/');
        let segments = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        );
        match segments {
            (Some("devices"), Some(id), None, None, None) if !id.is_empty() => {
                Key::Device(id.into())
            }
            (Some("grants"), Some(door), Some(source), Some(device), None) if !door.is_empty() => {
                match source.parse() {
                    Ok(source) => Key::Grant(Holder {
                        door: door.into(),
                        source,
                        device: (!device.is_empty()).then(|| device.into()),
                    }),
                    Err(_) => Key::Other,
                }
            }
            (Some("revokes"), Some(id), None, None, None) => Key::Revoke(id.into()),
            (Some("nodes"), Some(name), None, None, None) => Key::Node(name.into()),
            _ => Key::Other,
        }
    }
}

/// A device, as every node reads it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// As [`GrantRecord::mac`], over every other field: an etcd writer
    /// without the cluster key can neither widen a device's groups or
    /// doors nor move a record to another id.
    #[serde(default)]
    pub mac: String,
    pub version: u32,
    pub id: String,
    /// Groups, which doors' `allow.groups` name.
    #[serde(default)]
    pub groups: Vec<String>,
    /// Doors that allow this device by name: the doors' device lists.
    #[serde(default)]
    pub doors: Vec<String>,
    /// The key, sealed ([`seal`]).
    pub sealed_key: String,
    /// Which node added it, and when (Unix ms).
    pub added_by: String,
    pub added_at_ms: u64,
}

/// A cluster door's grant, as the node that made it published it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GrantRecord {
    /// HMAC-SHA256 of the record's etcd key and its other fields under a
    /// key derived from the cluster key ([`sign`]): write access to etcd
    /// alone cannot open a door.
    #[serde(default)]
    pub mac: String,
    pub version: u32,
    /// The random port: the same on every node.
    pub port: u16,
    pub device: Option<String>,
    /// The node that accepted the knock (or the heartbeat, or rotated it).
    pub node: String,
    /// When it stops admitting new connections (Unix ms): every node gives
    /// its kernel entries this deadline.
    pub expires_at_ms: u64,
    /// Whether heartbeats keep it alive.
    pub leased: bool,
    /// When this grant of this source began (Unix ms), kept across its
    /// heartbeats and rotations: a revoke ends the grants opened before it
    /// and no later one, so a grant record written again after a revoke
    /// (by a writer replaying it) is refused.
    #[serde(default)]
    pub opened_at_ms: u64,
}

/// A revoke, for every node to carry out. Its etcd key (`P/revokes/ID`,
/// signed with it) is unique: each node remembers the ids it carried out,
/// so the same record written again is not carried out twice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RevokeRecord {
    /// As [`GrantRecord::mac`]: only a node can make one.
    #[serde(default)]
    pub mac: String,
    pub version: u32,
    /// An address or a device id, as `knockctl revoke` took it.
    pub target: String,
    pub node: String,
    pub at_ms: u64,
}

/// A record that carries a MAC over itself.
pub trait Signed: Serialize + Clone {
    fn mac_mut(&mut self) -> &mut String;
}

impl Signed for GrantRecord {
    fn mac_mut(&mut self) -> &mut String {
        &mut self.mac
    }
}

impl Signed for DeviceRecord {
    fn mac_mut(&mut self) -> &mut String {
        &mut self.mac
    }
}

impl Signed for RevokeRecord {
    fn mac_mut(&mut self) -> &mut String {
        &mut self.mac
    }
}

/// A key for one purpose, derived from the cluster key, so sealing and
/// signing never share a key.
fn subkey(cluster_key: &DeviceKey, purpose: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    Hkdf::<Sha256>::new(Some(b"knockd fleet v1"), &cluster_key.0)
        .expand(purpose, &mut out)
        .expect("32 bytes is a valid HKDF output length");
    out
}

/// The MAC of `record` (its `mac` field left out) at etcd key `key`.
fn mac_of<R: Signed>(cluster_key: &DeviceKey, key: &str, record: &R) -> Hmac<Sha256> {
    let mut bare = record.clone();
    bare.mac_mut().clear();
    let mut mac = <Hmac<Sha256> as hmac::Mac>::new_from_slice(&subkey(cluster_key, b"record mac"))
        .expect("HMAC takes any key length");
    mac.update(key.as_bytes());
    mac.update(&[0]);
    mac.update(&serde_json::to_vec(&bare).expect("records serialize"));
    mac
}

/// Signs `record`, to be written at etcd key `key`.
pub fn sign<R: Signed>(cluster_key: &DeviceKey, key: &str, record: &mut R) {
    let mac = hex::encode(mac_of(cluster_key, key, record).finalize().into_bytes());
    *record.mac_mut() = mac;
}

/// Whether `record`, read at etcd key `key`, was signed by a node (a
/// holder of the cluster key) for that key. Constant time.
pub fn verify<R: Signed>(cluster_key: &DeviceKey, key: &str, record: &R) -> bool {
    let mut copy = record.clone();
    let Ok(tag) = hex::decode(copy.mac_mut().as_str()) else {
        return false;
    };
    mac_of(cluster_key, key, record).verify_slice(&tag).is_ok()
}

/// The associated data of a sealed key: its etcd key, so a sealed key
/// copied to another device's record (or another fleet's prefix) does not
/// open.
fn aad(keys: &Keys, id: &str) -> Vec<u8> {
    keys.device(id).into_bytes()
}

/// Seals a device key under the cluster key: hex of a random 12-byte nonce
/// and the ChaCha20-Poly1305 ciphertext with its tag.
pub fn seal(cluster_key: &DeviceKey, keys: &Keys, id: &str, key: &DeviceKey) -> String {
    let cipher = ChaCha20Poly1305::new(&subkey(cluster_key, b"device key seal").into());
    let mut nonce = [0u8; 12];
    rand::rng().fill_bytes(&mut nonce);
    let sealed = cipher
        .encrypt(
            &nonce.into(),
            Payload {
                msg: &key.0,
                aad: &aad(keys, id),
            },
        )
        .expect("sealing 32 bytes cannot fail");
    let mut out = nonce.to_vec();
    out.extend(sealed);
    hex::encode(out)
}

/// Opens what [`seal`] made, checking it belongs to device `id`.
pub fn open(
    cluster_key: &DeviceKey,
    keys: &Keys,
    id: &str,
    sealed: &str,
) -> Result<DeviceKey, String> {
    let bytes = hex::decode(sealed).map_err(|e| format!("sealed_key: {e}"))?;
    if bytes.len() != 12 + 32 + 16 {
        return Err(format!("sealed_key: {} bytes, expected 60", bytes.len()));
    }
    let (nonce, ciphertext) = bytes.split_at(12);
    let cipher = ChaCha20Poly1305::new(&subkey(cluster_key, b"device key seal").into());
    let nonce: [u8; 12] = nonce.try_into().expect("12 bytes");
    let plain = cipher
        .decrypt(
            &nonce.into(),
            Payload {
                msg: ciphertext,
                aad: &aad(keys, id),
            },
        )
        .map_err(|_| {
            "sealed_key does not open under this node's cluster key (another key_file, or the record was altered)".to_owned()
        })?;
    let key: [u8; 32] = plain
        .try_into()
        .map_err(|_| "sealed_key: bad length".to_owned())?;
    Ok(DeviceKey(key))
}

/// Why a node refuses a record it read from etcd. The words go to the log
/// (once, at warn), `status`'s recent errors, and `device list`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("unreadable: {0}")]
    Unreadable(String),
    #[error(
        "record version {0}, this node reads {RECORD_VERSION} (written by {by} knockd)",
        by = if *.0 < RECORD_VERSION { "an older" } else { "a newer" }
    )]
    Version(u32),
    #[error("the record names device {0:?}, not the one its key is for")]
    WrongId(String),
    #[error(
        "not signed by a node of this fleet (a field was changed, or the record was written or moved by someone without the cluster key)"
    )]
    Unsigned,
    #[error("{0}")]
    Sealed(String),
}

/// Reads a device record at `P/devices/ID`: parsed, of this version,
/// naming `id`, signed over every field for that key, and with a key that
/// opens. Returns the record and its key.
pub fn check_device(
    cluster_key: &DeviceKey,
    keys: &Keys,
    id: &str,
    value: &[u8],
) -> Result<(DeviceRecord, DeviceKey), Refused> {
    let record = serde_json::from_slice::<DeviceRecord>(value)
        .map_err(|e| Refused::Unreadable(e.to_string()))?;
    if record.version != RECORD_VERSION {
        return Err(Refused::Version(record.version));
    }
    if record.id != id {
        return Err(Refused::WrongId(record.id));
    }
    if !verify(cluster_key, &keys.device(id), &record) {
        return Err(Refused::Unsigned);
    }
    let key = open(cluster_key, keys, id, &record.sealed_key).map_err(Refused::Sealed)?;
    Ok((record, key))
}

/// Reads a grant record at `P/grants/DOOR/SOURCE/DEVICE`: of this
/// version, signed for that key, and for the device the key names.
pub fn check_grant(
    cluster_key: &DeviceKey,
    keys: &Keys,
    holder: &Holder,
    value: &[u8],
) -> Result<GrantRecord, Refused> {
    let record = serde_json::from_slice::<GrantRecord>(value)
        .map_err(|e| Refused::Unreadable(e.to_string()))?;
    if record.version != RECORD_VERSION {
        return Err(Refused::Version(record.version));
    }
    if !verify(cluster_key, &keys.grant(holder), &record) {
        return Err(Refused::Unsigned);
    }
    if record.device.as_deref() != holder.device.as_deref() {
        return Err(Refused::WrongId(record.device.unwrap_or_default()));
    }
    Ok(record)
}

/// Reads a revoke record at etcd key `key`: of this version and signed for
/// that key.
pub fn check_revoke(
    cluster_key: &DeviceKey,
    key: &str,
    value: &[u8],
) -> Result<RevokeRecord, Refused> {
    let record = serde_json::from_slice::<RevokeRecord>(value)
        .map_err(|e| Refused::Unreadable(e.to_string()))?;
    if record.version != RECORD_VERSION {
        return Err(Refused::Version(record.version));
    }
    if !verify(cluster_key, key, &record) {
        return Err(Refused::Unsigned);
    }
    Ok(record)
}

#[cfg(test)]
mod tests {
    use std::net::IpAddr;

    use super::*;

    #[test]
    fn keys_round_trip_and_strangers_are_other() {
        let keys = Keys::new("/fleet/");
        assert_eq!(
            keys.parse(keys.device("laptop").as_bytes()),
            Key::Device("laptop".into())
        );
        let source: IpAddr = "2001:db8::2".parse().unwrap();
        for device in [Some("laptop"), None] {
            let holder = Holder::new("ssh", source, device);
            assert_eq!(
                keys.parse(keys.grant(&holder).as_bytes()),
                Key::Grant(holder)
            );
        }
        assert_eq!(keys.parse(keys.node("a").as_bytes()), Key::Node("a".into()));
        assert_eq!(
            keys.parse(keys.revoke("r1").as_bytes()),
            Key::Revoke("r1".into())
        );
        for other in [
            "/other/devices/x",
            "/fleet/grants/ssh/not-an-ip/laptop",
            // Version 2's layout, without the device.
            "/fleet/grants/ssh/198.18.0.2",
            "/fleet/grants/ssh/198.18.0.2/laptop/more",
            "/fleet/devices/",
            "/fleet/members/a",
            "/fleet/consumed/ssh/laptop/1/00",
        ] {
            assert_eq!(keys.parse(other.as_bytes()), Key::Other, "{other}");
        }
        assert_eq!(keys.parse(&[0xff, 0xfe]), Key::Other);
    }

    #[test]
    fn records_verify_only_unaltered_at_their_key_under_the_cluster_key() {
        let keys = Keys::new("/knockd/");
        let cluster = DeviceKey::generate();
        let holder = Holder::new("ssh", "198.18.0.2".parse().unwrap(), Some("laptop"));
        let at = keys.grant(&holder);
        let mut record = GrantRecord {
            mac: String::new(),
            version: RECORD_VERSION,
            port: 40001,
            device: Some("laptop".into()),
            node: "n1".into(),
            expires_at_ms: 1,
            leased: false,
            opened_at_ms: 0,
        };
        assert!(!verify(&cluster, &at, &record), "unsigned");
        sign(&cluster, &at, &mut record);
        assert!(verify(&cluster, &at, &record));
        assert!(
            check_grant(
                &cluster,
                &keys,
                &holder,
                &serde_json::to_vec(&record).unwrap()
            )
            .is_ok()
        );
        // Another key, another source or device, another field value,
        // another cluster key: refused.
        assert!(!verify(&DeviceKey::generate(), &at, &record));
        for other in [
            Holder::new("ssh", "198.18.0.3".parse().unwrap(), Some("laptop")),
            Holder::new("ssh", "198.18.0.2".parse().unwrap(), Some("sensor")),
            Holder::new("ssh", "198.18.0.2".parse().unwrap(), None),
        ] {
            assert!(!verify(&cluster, &keys.grant(&other), &record), "{other}");
        }
        // Signed for its key but naming another device: refused.
        let mut moved = record.clone();
        moved.device = Some("sensor".into());
        sign(&cluster, &at, &mut moved);
        assert!(matches!(
            check_grant(
                &cluster,
                &keys,
                &holder,
                &serde_json::to_vec(&moved).unwrap()
            ),
            Err(Refused::WrongId(_))
        ));
        let mut longer = record.clone();
        longer.expires_at_ms += 1;
        assert!(!verify(&cluster, &at, &longer));
        let mut garbled = record.clone();
        garbled.mac = "zz".into();
        assert!(!verify(&cluster, &at, &garbled));
    }

    #[test]
    fn sealed_keys_open_only_for_their_device_and_cluster_key() {
        let keys = Keys::new("/knockd/");
        let cluster = DeviceKey::generate();
        let device = DeviceKey::generate();
        let sealed = seal(&cluster, &keys, "laptop", &device);
        assert!(!sealed.contains(&device.to_hex()));
        assert_eq!(open(&cluster, &keys, "laptop", &sealed).unwrap(), device);
        // Moved to another device's record, or read with another cluster
        // key, or another fleet's prefix: refused.
        assert!(open(&cluster, &keys, "phone", &sealed).is_err());
        assert!(open(&DeviceKey::generate(), &keys, "laptop", &sealed).is_err());
        assert!(open(&cluster, &Keys::new("/other/"), "laptop", &sealed).is_err());
        let mut flipped = hex::decode(&sealed).unwrap();
        flipped[20] ^= 1;
        assert!(open(&cluster, &keys, "laptop", &hex::encode(flipped)).is_err());
        assert!(
            open(&cluster, &keys, "laptop", "zz")
                .unwrap_err()
                .starts_with("sealed_key")
        );
        assert!(
            open(&cluster, &keys, "laptop", "00")
                .unwrap_err()
                .contains("expected 60")
        );
    }

    /// The record `device add` writes.
    fn signed_device(cluster: &DeviceKey, keys: &Keys, id: &str) -> (DeviceRecord, DeviceKey) {
        let key = DeviceKey::generate();
        let mut record = DeviceRecord {
            mac: String::new(),
            version: RECORD_VERSION,
            id: id.into(),
            groups: vec!["guests".into()],
            doors: vec!["solo".into()],
            sealed_key: seal(cluster, keys, id, &key),
            added_by: "n1".into(),
            added_at_ms: 1,
        };
        sign(cluster, &keys.device(id), &mut record);
        (record, key)
    }

    #[test]
    fn a_device_record_edited_or_moved_without_the_cluster_key_is_refused() {
        let keys = Keys::new("/knockd/");
        let cluster = DeviceKey::generate();
        let (record, key) = signed_device(&cluster, &keys, "low");
        let bytes = |r: &DeviceRecord| serde_json::to_vec(r).unwrap();
        let (read, opened) = check_device(&cluster, &keys, "low", &bytes(&record)).unwrap();
        assert_eq!(
            (read.groups.clone(), opened),
            (vec!["guests".to_owned()], key)
        );
        // Every field an etcd writer might change is covered.
        type Edit = fn(&mut DeviceRecord);
        let edits: [(&str, Edit); 5] = [
            ("groups", |r| r.groups = vec!["admins".into()]),
            ("doors", |r| r.doors.push("ssh".into())),
            ("added_by", |r| r.added_by = "n2".into()),
            ("added_at_ms", |r| r.added_at_ms += 1),
            ("mac", |r| r.mac.clear()),
        ];
        for (field, edit) in edits {
            let mut changed = record.clone();
            edit(&mut changed);
            assert_eq!(
                check_device(&cluster, &keys, "low", &bytes(&changed)).unwrap_err(),
                Refused::Unsigned,
                "{field}"
            );
        }
        // Copied under another id: its id field names the original; with
        // the id rewritten too, the signature (and the seal) no longer fit.
        assert_eq!(
            check_device(&cluster, &keys, "high", &bytes(&record)).unwrap_err(),
            Refused::WrongId("low".into())
        );
        let mut moved = record.clone();
        moved.id = "high".into();
        assert_eq!(
            check_device(&cluster, &keys, "high", &bytes(&moved)).unwrap_err(),
            Refused::Unsigned
        );
        // A record of the last version (no signature over its groups) is
        // named as such, not taken.
        let mut old = serde_json::to_value(&record).unwrap();
        old["version"] = 1.into();
        old.as_object_mut().unwrap().remove("mac");
        let e = check_device(&cluster, &keys, "low", old.to_string().as_bytes()).unwrap_err();
        assert_eq!(e, Refused::Version(1));
        assert!(e.to_string().contains("an older knockd"), "{e}");
        assert!(matches!(
            check_device(&cluster, &keys, "low", b"{").unwrap_err(),
            Refused::Unreadable(_)
        ));
    }
}
