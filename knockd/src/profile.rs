//! Client profiles: what a device needs to knock on a door, in one YAML
//! file on the client. `docs/PROTOCOL.md` §12 specifies the format;
//! `knockctl device add` prints one profile as a document of it, and
//! `knockctl profile import` merges such documents into the file.
//!
//! ```yaml
//! ---
//! version: 1
//! profiles:
//!   bastion:
//!     host: bastion.example.org
//!     door: ssh
//!     key: 64 hex digits
//!     knock_ports: "7000-7999"
//!     knocks: 3
//!     step_secs: 30
//! ```
//!
//! A file is a YAML stream: documents appended one after the other (each
//! `device add` output starts with `---`) merge, as long as no profile
//! name is given two different profiles.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{
    config::{PortRange, door_defaults},
    proto::{DeviceKey, DoorParams},
};

/// The profile format this code reads and writes.
pub const FORMAT_VERSION: u32 = 1;

/// A profile-file error, naming the file and the key.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {path}")]
    Write {
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
    #[error(
        "{path}: mode {mode:04o} lets group or others read the device keys in it; \
         `chmod 600 {path}` (or import it again with `knockctl profile import`)"
    )]
    Exposed { path: PathBuf, mode: u32 },
    #[error(
        "{path}: mode {mode:04o} lets group or others read the device key in it, so it is not \
         imported; `chmod 600 {path}` and import it again (if others could have read it, \
         treat the key as exposed: remove the device and add it again)"
    )]
    ExposedSource { path: PathBuf, mode: u32 },
    #[error("{path}: no profile named {name:?}, and none for host {name:?} (profiles: {known})")]
    NotFound {
        path: PathBuf,
        name: String,
        known: String,
    },
}

/// The text of a file of profiles (the profiles file itself, or one
/// `knockctl device add` printed), refused when group or others may read
/// it: it holds device keys, as an ssh private key does.
pub fn read_private(path: &Path) -> Result<String, Error> {
    let read = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let file = std::fs::File::open(path).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    if let Some((_, mode)) = crate::platform::owner_and_mode(&meta)
        && mode & 0o077 != 0
    {
        return Err(Error::ExposedSource {
            path: path.to_owned(),
            mode: mode & 0o7777,
        });
    }
    std::io::read_to_string(file).map_err(read)
}

/// Standard output, when it is a regular file that group or others may
/// read (`knockctl device add ... > laptop.yaml` under a 0022 umask), is
/// made 0600 before anyone else reads the profile in it. Returns what the
/// operator should know, if anything.
#[cfg(not(unix))]
pub fn protect_stdout() -> Option<String> {
    None
}

/// See the other system's [`protect_stdout`].
#[cfg(unix)]
pub fn protect_stdout() -> Option<String> {
    use std::os::{fd::AsFd as _, unix::fs::PermissionsExt as _};
    let file = std::fs::File::from(std::io::stdout().as_fd().try_clone_to_owned().ok()?);
    let metadata = file.metadata().ok()?;
    let mode = metadata.permissions().mode() & 0o7777;
    if !metadata.is_file() || mode & 0o077 == 0 {
        return None;
    }
    Some(
        match file.set_permissions(std::fs::Permissions::from_mode(mode & 0o700)) {
            Ok(()) => format!(
                "standard output is a file group or others could read (mode {mode:04o}), and the \
                 profile holds the device's key: knockctl made it {:04o}; `-o FILE` writes a \
                 new file 0600",
                mode & 0o700
            ),
            Err(e) => format!(
                "standard output is a file group or others can read (mode {mode:04o}), and the \
                 profile holds the device's key; making it 0600 failed ({e}): chmod 600 it now, \
                 or use `-o FILE`"
            ),
        },
    )
}

/// Every profile of a file (all its documents), by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Profiles {
    pub profiles: BTreeMap<String, Profile>,
}

/// One document of a profile file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    /// The format version. Files written before it existed have none and
    /// are read as version 1, which they are.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    version: Option<u32>,
    #[serde(default)]
    profiles: BTreeMap<String, Profile>,
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
    /// The door's knock-port range (default 7000-7999).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knock_ports: Option<PortRange>,
    /// Knocks per sequence (default 3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub knocks: Option<u8>,
    /// The time step in seconds (default 30).
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
        DeviceKey::from_hex(&self.key).map_err(|e| e.to_string())
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

/// What [`Profiles::merge`] did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Merged {
    pub added: Vec<String>,
    pub replaced: Vec<String>,
    /// Already there, the same.
    pub unchanged: Vec<String>,
}

impl Profiles {
    /// Reads and checks `path`, refusing a file others may read (it holds
    /// device keys, as an ssh private key does).
    pub fn load(path: &Path) -> Result<Profiles, Error> {
        let text = read_private(path).map_err(|e| match e {
            Error::ExposedSource { path, mode } => Error::Exposed { path, mode },
            e => e,
        })?;
        Profiles::parse(&text, path)
    }

    /// Parses and checks the text of a profile file (a stream of one or
    /// more documents); `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Profiles, Error> {
        let invalid = |key: String, message: String| Error::Invalid {
            path: path.to_owned(),
            key,
            message,
        };
        crate::config::refuse_duplicates(text).map_err(|e| invalid(e.key, e.message))?;
        let mut merged = Profiles::default();
        for (n, document) in serde_yaml::Deserializer::from_str(text).enumerate() {
            let place = |key: &str| format!("document {}: {key}", n + 1);
            let document: Document = crate::config::parse_yaml_document(document)
                .map_err(|e| invalid(place(&e.key), e.message))?;
            let version = document.version.unwrap_or(FORMAT_VERSION);
            if version != FORMAT_VERSION {
                return Err(invalid(
                    place("version"),
                    format!("format {version} is not one this knockctl reads ({FORMAT_VERSION})"),
                ));
            }
            for (name, profile) in document.profiles {
                let key = |field: &str| place(&format!("profiles.{name}.{field}"));
                profile.device_key().map_err(|e| invalid(key("key"), e))?;
                if let Some(knocks) = profile.knocks
                    && !(1..=crate::proto::MAX_KNOCKS).contains(&knocks)
                {
                    return Err(invalid(
                        key("knocks"),
                        format!("{knocks} is not in 1-{}", crate::proto::MAX_KNOCKS),
                    ));
                }
                if let Some(step) = profile.step_secs
                    && step == 0
                {
                    return Err(invalid(key("step_secs"), "0 is not a time step".into()));
                }
                match merged.profiles.get(&name) {
                    Some(earlier) if *earlier != profile => {
                        return Err(invalid(
                            place(&format!("profiles.{name}")),
                            "an earlier document has a different profile of this name".into(),
                        ));
                    }
                    _ => {
                        merged.profiles.insert(name, profile);
                    }
                }
            }
        }
        Ok(merged)
    }

    /// The file's text: one document of the current format, starting with
    /// `---` so that it can be appended to another profile file.
    pub fn to_yaml(&self) -> String {
        let document = Document {
            version: Some(FORMAT_VERSION),
            profiles: self.profiles.clone(),
        };
        format!(
            "---\n{}",
            serde_yaml::to_string(&document).expect("profiles serialize")
        )
    }

    /// Adds `other`'s profiles. A name both hold with different profiles is
    /// refused unless `replace`; the same profile twice is fine.
    pub fn merge(&mut self, other: Profiles, replace: bool) -> Result<Merged, String> {
        let mut merged = Merged::default();
        for (name, profile) in &other.profiles {
            match self.profiles.get(name) {
                Some(mine) if mine == profile => merged.unchanged.push(name.clone()),
                Some(_) if !replace => {
                    return Err(format!(
                        "profile {name:?} exists with other settings (--replace replaces it)"
                    ));
                }
                Some(_) => merged.replaced.push(name.clone()),
                None => merged.added.push(name.clone()),
            }
        }
        self.profiles.extend(other.profiles);
        Ok(merged)
    }

    /// Writes the file atomically (a 0600 temporary file renamed over it),
    /// creating its directory (0700) if needed.
    pub fn save(&self, path: &Path) -> Result<(), Error> {
        use std::io::Write as _;
        let write_err = |source| Error::Write {
            path: path.to_owned(),
            source,
        };
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if let Some(dir) = dir
            && !dir.exists()
        {
            crate::platform::create_private_dir(dir).map_err(write_err)?;
        }
        let mut temp = path.as_os_str().to_owned();
        temp.push(".tmp");
        let temp = PathBuf::from(temp);
        let _ = std::fs::remove_file(&temp);
        let mut file = crate::platform::create_private_file(&temp).map_err(write_err)?;
        file.write_all(self.to_yaml().as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(write_err)?;
        std::fs::rename(&temp, path).map_err(write_err)
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
        std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))
            .unwrap();
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
    fn a_profile_written_twice_is_refused_naming_both_lines() {
        let key = DeviceKey::generate().to_hex();
        let (_dir, path) = write(&format!(
            "profiles:\n  b: {{ host: 198.18.0.1, door: ssh, key: {key} }}\n  \
             b: {{ host: 198.18.0.2, door: ssh, key: {key} }}\n"
        ));
        let e = Profiles::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("profiles.b: written twice in one mapping, on lines 2 and 3"),
            "{e}"
        );
    }

    #[test]
    fn bad_profiles_name_their_key() {
        let (_dir, path) = write("profiles:\n  b: { host: h, door: ssh, key: abc }\n");
        let e = Profiles::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("document 1: profiles.b.key: expected 64 hex digits"),
            "{e}"
        );
        let (_dir, path) = write("profiles:\n  b: { host: h, door: ssh, key: abc, colour: red }\n");
        let e = Profiles::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("profiles.b.colour") && e.contains("unknown field"),
            "{e}"
        );
    }

    #[test]
    fn appended_documents_merge_and_conflicts_are_named() {
        let (k1, k2) = (
            DeviceKey::generate().to_hex(),
            DeviceKey::generate().to_hex(),
        );
        let one = |name: &str, key: &str| Profiles {
            profiles: [(
                name.to_owned(),
                Profile {
                    host: "198.18.0.1".into(),
                    door: "ssh".into(),
                    key: key.to_owned(),
                    knock_ports: Some(PortRange {
                        start: 9000,
                        end: 9099,
                    }),
                    knocks: Some(5),
                    step_secs: Some(60),
                },
            )]
            .into(),
        };
        // Two `device add` outputs appended, and an old file without a
        // version in front.
        let old = format!("profiles:\n  legacy: {{ host: h, door: ssh, key: {k1} }}\n");
        let text = format!(
            "{old}{}{}",
            one("laptop", &k1).to_yaml(),
            one("phone", &k2).to_yaml()
        );
        let (_dir, path) = write(&text);
        let all = Profiles::load(&path).unwrap();
        assert_eq!(all.profiles.len(), 3);
        assert_eq!(all.profiles["phone"].params().knock_ports, 9000..=9099);
        assert_eq!(all.profiles["phone"].params().step_secs, 60);
        // The same profile twice is fine; a different one under the name is not.
        let (_dir, path) = write(&format!(
            "{}{}",
            one("laptop", &k1).to_yaml(),
            one("laptop", &k1).to_yaml()
        ));
        assert_eq!(Profiles::load(&path).unwrap().profiles.len(), 1);
        let (_dir, path) = write(&format!(
            "{}{}",
            one("laptop", &k1).to_yaml(),
            one("laptop", &k2).to_yaml()
        ));
        let e = Profiles::load(&path).unwrap_err().to_string();
        assert!(
            e.contains("document 2: profiles.laptop: an earlier document"),
            "{e}"
        );
        // A version this code does not know is refused, naming it.
        let (_dir, path) = write("version: 2\nprofiles: {}\n");
        let e = Profiles::load(&path).unwrap_err().to_string();
        assert!(e.contains("document 1: version: format 2"), "{e}");
        // Merging, as `profile import` does.
        let mut mine = one("laptop", &k1);
        let merged = mine.merge(one("phone", &k2), false).unwrap();
        assert_eq!(merged.added, ["phone"]);
        assert!(mine.merge(one("laptop", &k2), false).is_err());
        assert_eq!(
            mine.merge(one("laptop", &k2), true).unwrap().replaced,
            ["laptop"]
        );
    }

    #[test]
    fn a_profile_file_others_can_read_is_refused_and_save_writes_0600() {
        use std::os::unix::fs::PermissionsExt as _;
        let key = DeviceKey::generate().to_hex();
        let (dir, path) = write(&format!(
            "profiles:\n  b: {{ host: h, door: ssh, key: {key} }}\n"
        ));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = Profiles::load(&path).unwrap_err().to_string();
        assert!(e.contains("mode 0644 lets group or others read"), "{e}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        let profiles = Profiles::load(&path).unwrap();
        let saved = dir.path().join("new/profiles.yaml");
        profiles.save(&saved).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(
            (mode(&saved), mode(saved.parent().unwrap())),
            (0o600, 0o700)
        );
        assert_eq!(Profiles::load(&saved).unwrap(), profiles);
    }
}
