//! Client profiles: what a device needs to knock on a door, in one YAML
//! file on the client (`knockctl device add` prints the entry).
//!
//! ```yaml
//! profiles:
//!   bastion:
//!     host: bastion.example.org
//!     door: ssh
//!     key: 64 hex digits
//!     knock_ports: "7000-7999"   # optional: these are the defaults
//!     knocks: 3
//!     step_secs: 30
//! ```

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{PortRange, door_defaults},
    proto::{DeviceKey, DoorParams},
};

/// A profile-file error, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {key}: {message}")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("{path}: no profile named {name:?}, and none for host {name:?} (profiles: {known})")]
    NotFound {
        path: PathBuf,
        name: String,
        known: String,
    },
}

/// The client's file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profiles {
    #[serde(default)]
    pub profiles: BTreeMap<String, Profile>,
}

/// One door on one server, as one device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Profile {
    /// The server: a name or an address.
    pub host: String,
    /// The door's name on the server.
    pub door: String,
    /// The device key, 64 hex digits.
    pub key: String,
    /// The door's knock-port range, if not the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knock_ports: Option<PortRange>,
    /// Knocks per sequence, if not the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knocks: Option<u8>,
    /// The time step, if not the default.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step_secs: Option<u32>,
}

impl Serialize for PortRange {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl Profile {
    /// The key, parsed.
    pub fn device_key(&self) -> Result<DeviceKey, String> {
        DeviceKey::from_hex(&self.key)
    }

    /// The door's parameters, defaults filled in.
    pub fn params(&self) -> DoorParams {
        let range = self.knock_ports.unwrap_or(door_defaults::KNOCK_PORTS);
        DoorParams {
            knock_ports: range.start..=range.end,
            knocks: self.knocks.unwrap_or(door_defaults::KNOCKS),
            step_secs: self.step_secs.unwrap_or(door_defaults::STEP_SECS),
        }
    }
}

impl Profiles {
    /// Reads and checks `path`: every key must parse.
    pub fn load(path: &Path) -> Result<Profiles, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Profiles::parse(&text, path)
    }

    /// Parses and checks the text of a profile file; `path` names it in
    /// errors.
    pub fn parse(text: &str, path: &Path) -> Result<Profiles, Error> {
        let invalid = |key: String, message: String| Error::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        let profiles: Profiles =
            crate::config::parse_yaml(text).map_err(|e| invalid(e.key, e.message))?;
        for (name, profile) in &profiles.profiles {
            profile
                .device_key()
                .map_err(|e| invalid(format!("profiles.{name}.key"), e))?;
            if let Some(knocks) = profile.knocks
                && !(1..=crate::proto::MAX_KNOCKS).contains(&knocks)
            {
                return Err(invalid(
                    format!("profiles.{name}.knocks"),
                    format!("{knocks} is not in 1-{}", crate::proto::MAX_KNOCKS),
                ));
            }
        }
        Ok(profiles)
    }

    /// The profile named `name`, or else the one for host `name` and `door`.
    pub fn find(
        &self,
        path: &Path,
        name: &str,
        door: Option<&str>,
    ) -> Result<(&str, &Profile), Error> {
        if let Some((key, profile)) = self.profiles.get_key_value(name)
            && door.is_none_or(|d| d == profile.door)
        {
            return Ok((key, profile));
        }
        self.profiles
            .iter()
            .find(|(_, p)| p.host == name && door.is_none_or(|d| d == p.door))
            .map(|(k, p)| (k.as_str(), p))
            .ok_or_else(|| Error::NotFound {
                path: path.to_owned(),
                name: name.to_owned(),
                known: self.profiles.keys().cloned().collect::<Vec<_>>().join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("profiles.yaml");
        std::fs::write(&path, text).unwrap();
        (dir, path)
    }

    #[test]
    fn profiles_load_and_resolve() {
        let key = DeviceKey::generate().to_hex();
        let (_dir, path) = write(&format!(
            "profiles:\n  bastion: {{ host: 198.18.0.1, door: ssh, key: {key} }}\n  \
             vpn: {{ host: 198.18.0.1, door: vpn, key: {key}, knock_ports: \"9000-9099\", knocks: 2 }}\n"
        ));
        let profiles = Profiles::load(&path).unwrap();
        let (name, p) = profiles.find(&path, "bastion", None).unwrap();
        assert_eq!((name, p.door.as_str()), ("bastion", "ssh"));
        assert_eq!(p.params().knock_ports, 7000..=7999);
        let (name, p) = profiles.find(&path, "198.18.0.1", Some("vpn")).unwrap();
        assert_eq!(name, "vpn");
        assert_eq!(
            (p.params().knock_ports, p.params().knocks),
            (9000..=9099, 2)
        );
        let e = profiles
            .find(&path, "nowhere", None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("no profile named \"nowhere\"") && e.contains("bastion, vpn"),
            "{e}"
        );
    }

    #[test]
    fn bad_profiles_name_their_key() {
        let (_dir, path) = write("profiles:\n  b: { host: h, door: ssh, key: abc }\n");
        let e = Profiles::load(&path).unwrap_err().to_string();
        assert!(e.contains("profiles.b.key: expected 64 hex digits"), "{e}");
        let (_dir, path) = write("profiles:\n  b: { host: h, door: ssh, key: abc, colour: red }\n");
        let e = Profiles::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("profiles.b.colour") && e.contains("unknown field"),
            "{e}"
        );
    }
}
