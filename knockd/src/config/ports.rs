//! Ports as the configuration writes them: a protocol, a knock
//! (`7000:udp`), a range (`40000-40999`). Each parses from text with
//! `FromStr` (the configuration and the command line share it), and one
//! serde visitor reads either from a YAML number or string through it.

use std::{fmt, marker::PhantomData, str::FromStr};

use knockd_common::{IPPROTO_TCP, IPPROTO_UDP};
use serde::{Deserialize, Deserializer, Serialize, de};

/// Transport protocol of a port rule or grant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Proto {
    Tcp,
    Udp,
}

impl Proto {
    /// The IP protocol number.
    pub const fn number(self) -> u8 {
        match self {
            Proto::Tcp => IPPROTO_TCP,
            Proto::Udp => IPPROTO_UDP,
        }
    }

    /// The protocol with IP protocol number `n`, if it is one we handle.
    pub const fn from_number(n: u8) -> Option<Proto> {
        match n {
            IPPROTO_TCP => Some(Proto::Tcp),
            IPPROTO_UDP => Some(Proto::Udp),
            _ => None,
        }
    }
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One knock of a static sequence: a port and its protocol.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KnockPort {
    pub port: u16,
    pub proto: Proto,
}

impl fmt::Display for KnockPort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.port, self.proto)
    }
}

impl std::str::FromStr for KnockPort {
    type Err = String;

    /// `7000:udp`, `7000:tcp`, or `7000` (TCP, as in classic knockd).
    fn from_str(s: &str) -> Result<Self, String> {
        let (port, proto) = match s.split_once(':') {
            Some((port, "udp")) => (port, Proto::Udp),
            Some((port, "tcp")) => (port, Proto::Tcp),
            Some((_, other)) => return Err(format!("protocol {other:?} is not tcp or udp")),
            None => (s, Proto::Tcp),
        };
        Ok(KnockPort {
            port: parse_port(port)?,
            proto,
        })
    }
}

impl<'de> Deserialize<'de> for KnockPort {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(PortText::<KnockPort>(PhantomData))
    }
}

/// An inclusive port range; a single port is a range of one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PortRange {
    pub start: u16,
    pub end: u16,
}

impl PortRange {
    /// Whether `port` is in the range.
    pub fn contains(self, port: u16) -> bool {
        (self.start..=self.end).contains(&port)
    }

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
        deserializer.deserialize_any(PortText::<PortRange>(PhantomData))
    }
}

impl std::str::FromStr for PortRange {
    type Err = String;

    /// `22` or `40000-40999`, as in the configuration and on command lines.
    fn from_str(s: &str) -> Result<Self, String> {
        let (start, end) = match s.split_once('-') {
            Some((a, b)) => (parse_port(a)?, parse_port(b)?),
            None => (parse_port(s)?, parse_port(s)?),
        };
        if start > end {
            return Err(format!("start {start} > end {end}"));
        }
        Ok(PortRange { start, end })
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

/// A type written as a port or port-like text: what a YAML value of it
/// should look like, for serde's error message.
trait Expecting: FromStr<Err = String> {
    const EXPECTING: &'static str;
}

impl Expecting for KnockPort {
    const EXPECTING: &'static str = "a knock such as \"7000:udp\", \"7000:tcp\" or 7000";
}

impl Expecting for PortRange {
    const EXPECTING: &'static str = "a port (1-65535) or a range such as \"40000-40999\"";
}

/// The one visitor: a YAML number or string, parsed by `T::from_str`.
struct PortText<T>(PhantomData<T>);

impl<T: Expecting> de::Visitor<'_> for PortText<T> {
    type Value = T;
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(T::EXPECTING)
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<T, E> {
        v.to_string().parse().map_err(E::custom)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<T, E> {
        Err(E::custom(format!("port {v} is not in 1-65535")))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<T, E> {
        v.parse().map_err(E::custom)
    }
}
