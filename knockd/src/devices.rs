//! Devices and their keys, from the main configuration and the devices
//! directory.
//!
//! Key files hold secrets that open doors, so a key file that anyone but
//! root could read or replace is refused, naming the file and the fix, and
//! the daemon does not start.

use std::{
    collections::BTreeMap,
    io::Read as _,
    path::{Path, PathBuf},
};

use serde::Deserialize;

use crate::{config::Config, proto::DeviceKey};

/// Most bytes read from a key file or a device file: both are tiny, and a
/// huge file must cost nothing.
const FILE_MAX: u64 = 64 * 1024;

/// An error naming the file or the configuration key it is about.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("key file {path}: {reason}")]
    KeyFile { path: PathBuf, reason: String },
    #[error("{path}: {key}: {message}")]
    DeviceFile {
        path: PathBuf,
        key: String,
        message: String,
    },
    #[error("device {id:?} is defined twice: in {first} and in {second}")]
    Duplicate {
        id: String,
        first: PathBuf,
        second: PathBuf,
    },
    #[error("{key}: {reason}")]
    Reference { key: String, reason: String },
}

/// A device file in the devices directory, as `knockctl device add` writes it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceFile {
    /// The device id.
    pub id: String,
    /// The key file; a relative path is relative to the devices directory.
    pub key_file: PathBuf,
    /// Groups the device belongs to.
    #[serde(default)]
    pub groups: Vec<String>,
}

/// A device that may knock.
#[derive(Debug, Clone)]
pub struct Device {
    pub id: String,
    pub key: DeviceKey,
    pub groups: Vec<String>,
    /// Doors that allow it by name beyond their `allow` (fleet mode: the
    /// doors' device lists in etcd).
    pub doors: Vec<String>,
    /// Where the device was declared, for error messages.
    pub declared_in: PathBuf,
}

/// All devices, by id.
#[derive(Debug, Clone, Default)]
pub struct Devices {
    pub by_id: BTreeMap<String, Device>,
    /// Non-fatal findings, such as a door allowing a group nobody is in.
    pub warnings: Vec<String>,
}

/// Why a key file's ownership or mode is unsafe, if it is: it must belong to
/// `required_uid` (root, for the daemon) and grant nothing to group or
/// others.
pub fn key_file_problem(uid: u32, mode: u32, required_uid: u32) -> Option<String> {
    if uid != required_uid {
        return Some(format!(
            "owned by uid {uid}, must be owned by uid {required_uid}"
        ));
    }
    if mode & 0o077 != 0 {
        return Some(format!(
            "mode {:04o} lets group or others in, must be 0600",
            mode & 0o7777
        ));
    }
    None
}

/// Reads at most [`FILE_MAX`] bytes of `path` as text.
fn read_bounded(path: &Path) -> Result<String, Error> {
    let read = |source| Error::Read {
        path: path.to_owned(),
        source,
    };
    let mut text = String::new();
    std::fs::File::open(path)
        .map_err(read)?
        .take(FILE_MAX + 1)
        .read_to_string(&mut text)
        .map_err(read)?;
    if text.len() as u64 > FILE_MAX {
        return Err(read(std::io::Error::other(format!(
            "larger than {FILE_MAX} bytes"
        ))));
    }
    Ok(text)
}

/// Reads a secret file (a key, the etcd password) once it is a regular
/// file only `required_uid` can read or write.
pub fn load_secret(path: &Path, required_uid: u32) -> Result<String, Error> {
    let bad = |reason: String| Error::KeyFile {
        path: path.to_owned(),
        reason,
    };
    let meta = std::fs::metadata(path).map_err(|source| Error::Read {
        path: path.to_owned(),
        source,
    })?;
    if !meta.is_file() {
        return Err(bad("not a regular file".into()));
    }
    if let Some((uid, mode)) = crate::platform::owner_and_mode(&meta)
        && let Some(problem) = key_file_problem(uid, mode, required_uid)
    {
        return Err(bad(format!(
            "{problem} (fix: chown root:root {0} && chmod 600 {0})",
            path.display()
        )));
    }
    read_bounded(path)
}

/// Reads and checks a key file.
pub fn load_key(path: &Path, required_uid: u32) -> Result<DeviceKey, Error> {
    DeviceKey::from_hex(&load_secret(path, required_uid)?).map_err(|reason| Error::KeyFile {
        path: path.to_owned(),
        reason: reason.to_string(),
    })
}

/// A key made from a device id: the unit tests' stand-in for a key file.
#[cfg(test)]
pub(crate) fn test_key(id: &str) -> crate::proto::DeviceKey {
    crate::proto::DeviceKey(std::array::from_fn(|i| {
        (i as u8).wrapping_mul(id.len() as u8 + 1) ^ id.as_bytes()[0]
    }))
}

impl Devices {
    /// Every device `config` names, keyed by [`test_key`], without reading
    /// a file: for the unit tests.
    #[cfg(test)]
    pub(crate) fn for_tests(config: &Config) -> Devices {
        let mut devices = Devices::default();
        for (id, entry) in &config.devices {
            devices.by_id.insert(
                id.clone(),
                Device {
                    id: id.clone(),
                    key: test_key(id),
                    groups: entry.groups.clone(),
                    declared_in: "t.yaml".into(),
                    doors: Vec::new(),
                },
            );
        }
        devices
    }

    /// Loads every device the configuration names, as root requires.
    pub fn load(config: &Config, config_path: &Path) -> Result<Devices, Error> {
        Self::load_owned_by(config, config_path, 0)
    }

    /// [`load`](Self::load) with another required key-file owner, for tests
    /// that do not run as root.
    pub fn load_owned_by(
        config: &Config,
        config_path: &Path,
        required_uid: u32,
    ) -> Result<Devices, Error> {
        let mut devices = Devices::default();
        for (id, entry) in &config.devices {
            devices.insert(Device {
                id: id.clone(),
                key: load_key(&entry.key_file, required_uid)?,
                groups: entry.groups.clone(),
                doors: Vec::new(),
                declared_in: config_path.to_owned(),
            })?;
        }
        if let Some(dir) = &config.devices_dir {
            for (path, file) in read_device_files(dir)? {
                let key_file = dir.join(&file.key_file);
                devices.insert(Device {
                    key: load_key(&key_file, required_uid)?,
                    id: file.id,
                    groups: file.groups,
                    doors: Vec::new(),
                    declared_in: path,
                })?;
            }
        }
        devices.check_references(config)?;
        Ok(devices)
    }

    /// These devices and those from etcd (fleet mode), which must not
    /// reuse a local id: a clash keeps the local device and warns.
    pub fn with_fleet(&self, config: &Config, fleet: impl IntoIterator<Item = Device>) -> Devices {
        let mut merged = Devices {
            by_id: self.by_id.clone(),
            warnings: Vec::new(),
        };
        for device in fleet {
            if let Err(e) = merged.insert(device) {
                merged
                    .warnings
                    .push(format!("{e}; the local device is used"));
            }
        }
        let _ = merged.check_references(config);
        merged
    }

    fn insert(&mut self, device: Device) -> Result<(), Error> {
        if let Some(first) = self.by_id.get(&device.id) {
            return Err(Error::Duplicate {
                id: device.id.clone(),
                first: first.declared_in.clone(),
                second: device.declared_in,
            });
        }
        self.by_id.insert(device.id.clone(), device);
        Ok(())
    }

    /// Every device a door's `allow` names must exist; a group nobody is in
    /// is only a warning, since devices may be provisioned later.
    fn check_references(&mut self, config: &Config) -> Result<(), Error> {
        for (name, door) in &config.doors {
            let Some(door) = door.one_time() else {
                continue;
            };
            let allow = &door.allow;
            for (i, id) in allow.devices.iter().enumerate() {
                // In fleet mode the device may be in etcd.
                if !self.by_id.contains_key(id) && config.cluster.is_some() {
                    self.warnings.push(format!(
                        "doors.{name}.allow.devices[{i}]: no device {id:?} on this node; it must come from etcd"
                    ));
                } else if !self.by_id.contains_key(id) {
                    return Err(Error::Reference {
                        key: format!("doors.{name}.allow.devices[{i}]"),
                        reason: format!("no device {id:?} is defined"),
                    });
                }
            }
            for group in &allow.groups {
                if !self.by_id.values().any(|d| d.groups.contains(group)) {
                    self.warnings.push(format!(
                        "doors.{name}.allow.groups: no device is in group {group:?} yet"
                    ));
                }
            }
            if self.allowed(config, name).next().is_none() {
                self.warnings
                    .push(format!("doors.{name}: no device may open this door yet"));
            }
        }
        Ok(())
    }

    /// The devices allowed to open the one-time door `door`.
    pub fn allowed<'a>(
        &'a self,
        config: &'a Config,
        door: &'a str,
    ) -> impl Iterator<Item = &'a Device> + 'a {
        let allow = config
            .doors
            .get(door)
            .and_then(|d| d.one_time())
            .map(|d| &d.allow);
        self.by_id.values().filter(move |device| {
            allow.is_some_and(|allow| {
                allow.devices.contains(&device.id)
                    || device.groups.iter().any(|g| allow.groups.contains(g))
                    || device.doors.iter().any(|d| d == door)
            })
        })
    }
}

/// Every device file in `dir` (its `*.yaml` and `*.yml` files, sorted so
/// loading is deterministic), parsed and checked.
pub fn read_device_files(dir: &Path) -> Result<Vec<(PathBuf, DeviceFile)>, Error> {
    device_files(dir)?
        .into_iter()
        .map(|path| parse_device_file(&path).map(|file| (path, file)))
        .collect()
}

fn device_files(dir: &Path) -> Result<Vec<PathBuf>, Error> {
    let read = |source| Error::Read {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read)? {
        let path = entry.map_err(read)?.path();
        if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
            files.push(path);
        }
    }
    files.sort();
    Ok(files)
}

fn parse_device_file(path: &Path) -> Result<DeviceFile, Error> {
    parse_device_text(&read_bounded(path)?, path)
}

/// Parses and checks the text of a device file; `path` names it in errors.
pub fn parse_device_text(text: &str, path: &Path) -> Result<DeviceFile, Error> {
    let file: DeviceFile = crate::config::parse_yaml(text).map_err(|e| Error::DeviceFile {
        path: path.to_owned(),
        key: e.key,
        message: e.message,
    })?;
    if !crate::config::is_valid_name(&file.id, crate::config::DEVICE_ID_MAX) {
        return Err(Error::DeviceFile {
            path: path.to_owned(),
            key: "id".into(),
            message: format!("{:?} is not a valid device id", file.id),
        });
    }
    Ok(file)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn uid() -> u32 {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() }
    }

    struct Fixture {
        dir: tempfile::TempDir,
    }

    impl Fixture {
        fn new() -> Fixture {
            Fixture {
                dir: tempfile::tempdir().unwrap(),
            }
        }

        fn key(&self, name: &str, mode: u32) -> PathBuf {
            let path = self.dir.path().join(name);
            std::fs::write(&path, format!("{}\n", DeviceKey::generate().to_hex())).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
            path
        }

        fn config(&self, text: &str) -> Config {
            let text = text.replace("$DIR", &self.dir.path().display().to_string());
            Config::parse(&text, Path::new("knockd.yaml")).unwrap()
        }

        fn load(&self, text: &str) -> Result<Devices, Error> {
            Devices::load_owned_by(&self.config(text), Path::new("knockd.yaml"), uid())
        }
    }

    #[test]
    fn a_device_file_with_a_key_written_twice_is_refused_naming_both_lines() {
        let e = parse_device_text(
            "id: sensor\ngroups: [fleet]\nkey_file: a.key\ngroups: [admins]\n",
            Path::new("sensor.yaml"),
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("sensor.yaml")
                && e.contains("groups: written twice in one mapping, on lines 2 and 4"),
            "{e}"
        );
    }

    #[test]
    fn key_file_rules() {
        assert_eq!(key_file_problem(0, 0o100600, 0), None);
        assert_eq!(key_file_problem(0, 0o100400, 0), None);
        assert!(
            key_file_problem(1000, 0o100600, 0)
                .unwrap()
                .contains("uid 1000")
        );
        assert!(key_file_problem(0, 0o100640, 0).unwrap().contains("0640"));
        assert!(key_file_problem(0, 0o100604, 0).unwrap().contains("0604"));
    }

    #[test]
    fn devices_from_the_main_file_and_the_directory() {
        let fx = Fixture::new();
        fx.key("laptop.key", 0o600);
        std::fs::create_dir(fx.dir.path().join("devices.d")).unwrap();
        fx.key("devices.d/sensor.key", 0o600);
        std::fs::write(
            fx.dir.path().join("devices.d/sensor.yaml"),
            "id: sensor-17\nkey_file: sensor.key\ngroups: [fleet]\n",
        )
        .unwrap();
        std::fs::write(fx.dir.path().join("devices.d/README"), "ignored").unwrap();
        let devices = fx
            .load(
                "interfaces: [eth0]\ndevices_dir: $DIR/devices.d\n\
                 devices: { laptop: { key_file: $DIR/laptop.key, groups: [admins] } }\n\
                 doors: { ssh: { service_port: 22, allow: { groups: [admins, fleet], devices: [sensor-17] } } }\n",
            )
            .unwrap();
        assert_eq!(devices.by_id.len(), 2);
        assert_eq!(devices.by_id["sensor-17"].groups, ["fleet"]);
        assert!(devices.warnings.is_empty(), "{:?}", devices.warnings);
        let config = fx.config(
            "interfaces: [eth0]\ndevices: { laptop: { key_file: $DIR/laptop.key } }\n\
             doors: { ssh: { service_port: 22, allow: { groups: [nobody] } } }\n",
        );
        let devices = Devices::load_owned_by(&config, Path::new("knockd.yaml"), uid()).unwrap();
        assert_eq!(devices.allowed(&config, "ssh").count(), 0);
        assert_eq!(devices.warnings.len(), 2, "{:?}", devices.warnings);
    }

    #[test]
    fn bad_key_files_are_named() {
        let fx = Fixture::new();
        let path = fx.key("loose.key", 0o644);
        let e = fx
            .load("interfaces: [eth0]\ndevices: { laptop: { key_file: $DIR/loose.key } }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with(&format!("key file {}: mode 0644", path.display())),
            "{e}"
        );
        assert!(e.contains("chmod 600"), "{e}");

        let short = fx.dir.path().join("short.key");
        std::fs::write(&short, "abcd").unwrap();
        std::fs::set_permissions(&short, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = fx
            .load("interfaces: [eth0]\ndevices: { laptop: { key_file: $DIR/short.key } }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("short.key") && e.contains("64 hex digits"),
            "{e}"
        );

        let e = fx
            .load("interfaces: [eth0]\ndevices: { laptop: { key_file: $DIR/missing.key } }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("missing.key"), "{e}");

        let huge = fx.dir.path().join("huge.key");
        std::fs::write(&huge, vec![b'a'; 1 << 20]).unwrap();
        std::fs::set_permissions(&huge, std::fs::Permissions::from_mode(0o600)).unwrap();
        let e = fx
            .load("interfaces: [eth0]\ndevices: { laptop: { key_file: $DIR/huge.key } }\n")
            .unwrap_err();
        assert!(format!("{e:#?}").contains("larger than"), "{e:#?}");

        let e = Devices::load_owned_by(
            &fx.config("interfaces: [eth0]\ndevices: { laptop: { key_file: $DIR/short.key } }\n"),
            Path::new("knockd.yaml"),
            uid() + 1,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("owned by uid"), "{e}");
    }

    #[test]
    fn bad_device_files_and_references_are_named() {
        let fx = Fixture::new();
        fx.key("a.key", 0o600);
        std::fs::create_dir(fx.dir.path().join("d")).unwrap();
        std::fs::write(
            fx.dir.path().join("d/a.yaml"),
            "id: laptop\nkey_file: ../a.key\ncolour: red\n",
        )
        .unwrap();
        let e = fx
            .load("interfaces: [eth0]\ndevices_dir: $DIR/d\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("d/a.yaml: colour: unknown field"), "{e}");

        std::fs::write(
            fx.dir.path().join("d/a.yaml"),
            "id: laptop\nkey_file: ../a.key\n",
        )
        .unwrap();
        let e = fx
            .load("interfaces: [eth0]\ndevices_dir: $DIR/d\ndevices: { laptop: { key_file: $DIR/a.key } }\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("device \"laptop\" is defined twice: in knockd.yaml and in"),
            "{e}"
        );

        std::fs::write(
            fx.dir.path().join("d/a.yaml"),
            "id: ../evil\nkey_file: ../a.key\n",
        )
        .unwrap();
        let e = fx
            .load("interfaces: [eth0]\ndevices_dir: $DIR/d\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("id: \"../evil\" is not a valid device id"),
            "{e}"
        );

        std::fs::remove_file(fx.dir.path().join("d/a.yaml")).unwrap();
        let e = fx
            .load("interfaces: [eth0]\ndevices_dir: $DIR/d\ndoors: { ssh: { service_port: 22, allow: { devices: [ghost] } } }\n")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "doors.ssh.allow.devices[0]: no device \"ghost\" is defined"
        );
    }
}
