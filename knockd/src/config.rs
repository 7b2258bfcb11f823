//! The daemon's configuration: typed YAML, unknown keys rejected, and every
//! error naming the dotted key it is about (`knock.udp[1]: start 7002 > end 7000`).
//!
//! Parsing happens in two steps: serde (through `serde_path_to_error`, so a
//! type error or an unknown key carries its path), then [`Config::validate`]
//! for the rules serde cannot express.

use std::{
    collections::BTreeSet,
    fmt,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Deserializer, de};

/// Where the XDP program pins its maps unless the config says otherwise.
pub const DEFAULT_BPFFS_DIR: &str = "/sys/fs/bpf/knockd";

/// Longest interface name Linux accepts (IFNAMSIZ minus the NUL).
const IFNAME_MAX: usize = 15;
/// Upper bound on the per-source knock rate and burst: beyond this the limit
/// is no limit, and the token arithmetic in the kernel stays far from overflow.
const KNOCK_RATE_MAX: u32 = 1_000_000;

/// A configuration error, always naming its source: the file, or the dotted
/// key inside it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read.
    #[error("reading {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The YAML is malformed, a value has the wrong type, or a key is unknown.
    #[error("{path}: {key}: {message}")]
    Parse {
        path: PathBuf,
        key: String,
        message: String,
    },
    /// The values parse but break a rule.
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl Error {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// How to attach the XDP program.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum XdpMode {
    /// Native (driver) mode, falling back to generic mode with a warning when
    /// the driver cannot run XDP.
    #[default]
    Auto,
    /// Native mode only: refuse to start without it.
    Native,
    /// Generic (skb) mode: works on any interface, at a lower packet rate.
    Generic,
}

/// The whole configuration file.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Interfaces to attach the XDP guard to. Traffic arriving elsewhere is
    /// not protected, so the list must not be empty.
    pub interfaces: Vec<String>,
    /// How to attach to each interface.
    #[serde(default)]
    pub xdp_mode: XdpMode,
    /// Ports dropped unless a grant admits the source.
    #[serde(default)]
    pub protect: PortSet,
    /// Ports whose packets are knocks (and so are protected too).
    #[serde(default)]
    pub knock: Knock,
    /// bpffs directory the maps are pinned under, so `knockd stats` and later
    /// a restarted daemon can find them.
    #[serde(default = "default_bpffs_dir")]
    pub bpffs_dir: PathBuf,
}

fn default_bpffs_dir() -> PathBuf {
    PathBuf::from(DEFAULT_BPFFS_DIR)
}

/// Ports per transport protocol.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PortSet {
    /// TCP ports and ranges.
    #[serde(default)]
    pub tcp: Vec<PortRange>,
    /// UDP ports and ranges.
    #[serde(default)]
    pub udp: Vec<PortRange>,
}

/// Knock ports and the per-source limit on knocks reaching userspace.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Knock {
    /// TCP knock ports: a bare SYN to one is a knock, for classic knockd
    /// clients that knock with TCP.
    #[serde(default)]
    pub tcp: Vec<PortRange>,
    /// UDP knock ports.
    #[serde(default)]
    pub udp: Vec<PortRange>,
    /// Knock events one source may send to userspace per second, on average.
    /// Past it, the kernel drops the knocks and counts them.
    #[serde(default = "default_rate_per_sec")]
    pub rate_per_sec: u32,
    /// Knock events one source may send in a burst.
    #[serde(default = "default_burst")]
    pub burst: u32,
}

fn default_rate_per_sec() -> u32 {
    20
}

fn default_burst() -> u32 {
    40
}

impl Default for Knock {
    fn default() -> Self {
        Knock {
            tcp: Vec::new(),
            udp: Vec::new(),
            rate_per_sec: default_rate_per_sec(),
            burst: default_burst(),
        }
    }
}

/// An inclusive port range; a single port is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    /// Every port in the range.
    pub fn ports(self) -> impl Iterator<Item = u16> {
        self.start..=self.end
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.start == self.end {
            write!(f, "{}", self.start)
        } else {
            write!(f, "{}-{}", self.start, self.end)
        }
    }
}

impl<'de> Deserialize<'de> for PortRange {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl de::Visitor<'_> for Visitor {
            type Value = PortRange;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port (1-65535) or a range such as \"40000-40999\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<PortRange, E> {
                let port = parse_port(&v.to_string()).map_err(E::custom)?;
                Ok(PortRange {
                    start: port,
                    end: port,
                })
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<PortRange, E> {
                Err(E::custom(format!("port {v} is not in 1-65535")))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<PortRange, E> {
                let (start, end) = match v.split_once('-') {
                    Some((a, b)) => (parse_port(a), parse_port(b)),
                    None => (parse_port(v), parse_port(v)),
                };
                let (start, end) = (start.map_err(E::custom)?, end.map_err(E::custom)?);
                if start > end {
                    return Err(E::custom(format!("start {start} > end {end}")));
                }
                Ok(PortRange { start, end })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

fn parse_port(s: &str) -> Result<u16, String> {
    let s = s.trim();
    match s.parse::<u32>() {
        Ok(p @ 1..=65535) => Ok(p as u16),
        Ok(p) => Err(format!("port {p} is not in 1-65535")),
        Err(_) => Err(format!("{s:?} is not a port number")),
    }
}

impl Config {
    /// Reads, parses and validates the file at `path`.
    pub fn load(path: &Path) -> Result<Config, Error> {
        let text = std::fs::read_to_string(path).map_err(|source| Error::Read {
            path: path.to_owned(),
            source,
        })?;
        Config::parse(&text, path)
    }

    /// Parses and validates `text`; `path` only names the source in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Config, Error> {
        let deserializer = serde_yaml::Deserializer::from_str(text);
        let config: Config = serde_path_to_error::deserialize(deserializer).map_err(|e| {
            let key = e.path().to_string();
            let message = e.into_inner().to_string();
            // serde_yaml prefixes its own (shorter) path; keep ours only.
            let message = match message.split_once(": ") {
                Some((prefix, rest)) if key.starts_with(prefix) => rest.to_owned(),
                _ => message,
            };
            Error::Parse {
                path: path.to_owned(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message,
            }
        })?;
        config.validate()?;
        Ok(config)
    }

    /// Checks the rules serde cannot: non-empty and well-formed interface
    /// names, no port both a knock port and plain-protected, sane limits.
    pub fn validate(&self) -> Result<(), Error> {
        if self.interfaces.is_empty() {
            return Err(Error::invalid(
                "interfaces",
                "at least one interface is needed",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, name) in self.interfaces.iter().enumerate() {
            let key = format!("interfaces[{i}]");
            if name.is_empty() || name.len() > IFNAME_MAX {
                return Err(Error::invalid(
                    key,
                    format!("{name:?} is not a valid interface name (1-{IFNAME_MAX} bytes)"),
                ));
            }
            if name.contains(['/', ' ', '\0']) || name == "." || name == ".." {
                return Err(Error::invalid(
                    key,
                    format!("{name:?} is not a valid interface name"),
                ));
            }
            if !seen.insert(name) {
                return Err(Error::invalid(key, format!("{name:?} is listed twice")));
            }
        }
        for (proto, knock, protect) in [
            ("tcp", &self.knock.tcp, &self.protect.tcp),
            ("udp", &self.knock.udp, &self.protect.udp),
        ] {
            let protected: BTreeSet<u16> = protect.iter().flat_map(|r| r.ports()).collect();
            for (i, range) in knock.iter().enumerate() {
                if let Some(port) = range.ports().find(|p| protected.contains(p)) {
                    return Err(Error::invalid(
                        format!("knock.{proto}[{i}]"),
                        format!(
                            "port {port}/{proto} is also under protect.{proto}; \
                             knock ports are protected already, list it once"
                        ),
                    ));
                }
            }
        }
        for (key, value) in [
            ("knock.rate_per_sec", self.knock.rate_per_sec),
            ("knock.burst", self.knock.burst),
        ] {
            if !(1..=KNOCK_RATE_MAX).contains(&value) {
                return Err(Error::invalid(
                    key,
                    format!("{value} is not in 1-{KNOCK_RATE_MAX}"),
                ));
            }
        }
        if !self.bpffs_dir.is_absolute() {
            return Err(Error::invalid(
                "bpffs_dir",
                format!("{} is not an absolute path", self.bpffs_dir.display()),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, Error> {
        Config::parse(text, Path::new("test.yaml"))
    }

    fn err(text: &str) -> String {
        parse(text).unwrap_err().to_string()
    }

    #[test]
    fn full_config_parses() {
        let config = parse(
            "interfaces: [eth0, eth1]\n\
             xdp_mode: generic\n\
             protect: { tcp: [22, \"40000-40999\"] }\n\
             knock: { udp: [\"7000-7002\"], tcp: [8000], rate_per_sec: 5, burst: 10 }\n\
             bpffs_dir: /sys/fs/bpf/kd\n",
        )
        .unwrap();
        assert_eq!(config.interfaces, ["eth0", "eth1"]);
        assert_eq!(config.xdp_mode, XdpMode::Generic);
        assert_eq!(
            config.protect.tcp,
            [
                PortRange { start: 22, end: 22 },
                PortRange {
                    start: 40000,
                    end: 40999
                }
            ]
        );
        assert_eq!(
            config.knock.udp,
            [PortRange {
                start: 7000,
                end: 7002
            }]
        );
        assert_eq!(config.knock.tcp[0].start, 8000);
        assert_eq!((config.knock.rate_per_sec, config.knock.burst), (5, 10));
        assert_eq!(config.bpffs_dir, Path::new("/sys/fs/bpf/kd"));
    }

    #[test]
    fn defaults_apply() {
        let config = parse("interfaces: [eth0]\n").unwrap();
        assert_eq!(config.xdp_mode, XdpMode::Auto);
        assert_eq!(config.knock, Knock::default());
        assert_eq!(config.bpffs_dir, Path::new(DEFAULT_BPFFS_DIR));
    }

    #[test]
    fn example_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/knockd.example.yaml");
        Config::load(&path).unwrap();
    }

    #[test]
    fn unknown_keys_are_named() {
        let e = err("interfaces: [eth0]\nknock: { udp: [7000], rate: 3 }\n");
        assert!(
            e.contains("knock") && e.contains("unknown field `rate`"),
            "{e}"
        );
        let e = err("interfaces: [eth0]\nprotects: {}\n");
        assert!(e.contains("unknown field `protects`"), "{e}");
        let e = err("interfaces: [eth0]\nprotect: { sctp: [1] }\n");
        assert!(e.contains("protect") && e.contains("`sctp`"), "{e}");
    }

    #[test]
    fn bad_ports_name_their_key() {
        let e = err("interfaces: [eth0]\nknock: { udp: [7000, \"7002-7000\"] }\n");
        assert!(
            e.contains("knock.udp[1]") && e.contains("start 7002 > end 7000"),
            "{e}"
        );
        let e = err("interfaces: [eth0]\nprotect: { tcp: [0] }\n");
        assert!(
            e.contains("protect.tcp[0]") && e.contains("not in 1-65535"),
            "{e}"
        );
        let e = err("interfaces: [eth0]\nprotect: { tcp: [70000] }\n");
        assert!(e.contains("protect.tcp[0]"), "{e}");
        let e = err("interfaces: [eth0]\nprotect: { tcp: [-1] }\n");
        assert!(e.contains("protect.tcp[0]"), "{e}");
        let e = err("interfaces: [eth0]\nprotect: { tcp: [\"ssh\"] }\n");
        assert!(
            e.contains("protect.tcp[0]") && e.contains("not a port number"),
            "{e}"
        );
        let e = err("interfaces: [eth0]\nprotect: { tcp: [1.5] }\n");
        assert!(e.contains("protect.tcp[0]"), "{e}");
    }

    #[test]
    fn rule_violations_name_their_key() {
        assert_eq!(
            err("interfaces: []\n"),
            "interfaces: at least one interface is needed"
        );
        let e = err("interfaces: [eth0, eth0]\n");
        assert!(e.starts_with("interfaces[1]: "), "{e}");
        let e = err("interfaces: [averyveryverylongname]\n");
        assert!(e.starts_with("interfaces[0]: "), "{e}");
        let e =
            err("interfaces: [eth0]\nprotect: { udp: [7001] }\nknock: { udp: [\"7000-7002\"] }\n");
        assert!(e.starts_with("knock.udp[0]: port 7001/udp"), "{e}");
        let e = err("interfaces: [eth0]\nknock: { burst: 0 }\n");
        assert!(e.starts_with("knock.burst: 0 is not in"), "{e}");
        let e = err("interfaces: [eth0]\nbpffs_dir: relative\n");
        assert!(e.starts_with("bpffs_dir: "), "{e}");
    }

    #[test]
    fn type_errors_name_their_key() {
        let e = err("interfaces: eth0\n");
        assert!(e.contains("interfaces"), "{e}");
        let e = err("interfaces: [eth0]\nxdp_mode: turbo\n");
        assert!(e.contains("xdp_mode") && e.contains("turbo"), "{e}");
        let e = err("interfaces: [eth0]\nknock: { rate_per_sec: lots }\n");
        assert!(e.contains("knock.rate_per_sec"), "{e}");
        let e = err(": : :\n");
        assert!(e.starts_with("test.yaml: "), "{e}");
        let e = err("");
        assert!(e.starts_with("test.yaml: "), "{e}");
    }

    #[test]
    fn missing_file_is_named() {
        let e = Config::load(Path::new("/nonexistent/knockd.yaml")).unwrap_err();
        assert_eq!(e.to_string(), "reading /nonexistent/knockd.yaml");
        let source = std::error::Error::source(&e).unwrap().to_string();
        assert!(source.contains("No such file"), "{source}");
    }
}
