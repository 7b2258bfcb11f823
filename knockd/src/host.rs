//! Facts about the host knockd runs on, which more than one part asks
//! for: its kernel's release, its interfaces, and its ephemeral ports.

use crate::config::{Config, DoorKind, PortRange, Proto};

/// The running kernel's release (`uname -r`), or an empty string if
/// `/proc` cannot tell.
pub fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// The oldest kernel the XDP program is written for, and what sets it:
/// `bpf_xdp_load_bytes` (5.18), which copies a knock's payload; the ring
/// buffer (5.8) and XDP links (5.9) come before it.
pub const OLDEST_KERNEL: (u32, u32) = (5, 18);

/// A warning when `release` (`uname -r`) is older than [`OLDEST_KERNEL`]:
/// its verifier will refuse the program, and knockd then runs on nftables
/// alone (or refuses to run, with `without_xdp: refuse`).
pub fn kernel_warning(release: &str, without_xdp: crate::config::WithoutXdp) -> Option<String> {
    let mut numbers = release
        .split(|c: char| !c.is_ascii_digit())
        .map(|n| n.parse::<u32>());
    let (Some(Ok(major)), Some(Ok(minor))) = (numbers.next(), numbers.next()) else {
        return None;
    };
    if (major, minor) >= OLDEST_KERNEL {
        return None;
    }
    let (floor_major, floor_minor) = OLDEST_KERNEL;
    let then = match without_xdp {
        crate::config::WithoutXdp::Nftables => {
            "knockd will run on nftables alone (no line-rate drop; without_xdp: nftables)"
        }
        crate::config::WithoutXdp::Refuse => "knockd will refuse to start (without_xdp: refuse)",
    };
    Some(format!(
        "this kernel ({release}) is older than {floor_major}.{floor_minor}, the oldest the XDP \
         program is written for (bpf_xdp_load_bytes): {then}"
    ))
}

/// The sysctl that sets the ports the host's own outgoing connections and
/// queries are given (DNS, NTP, any UDP client).
const EPHEMERAL_SYSCTL: &str = "/proc/sys/net/ipv4/ip_local_port_range";

/// Linux's default [`ephemeral_ports`], for when `/proc` cannot tell.
pub const DEFAULT_EPHEMERAL: PortRange = PortRange {
    start: 32768,
    end: 60999,
};

/// The host's ephemeral port range (`net.ipv4.ip_local_port_range`), if
/// `/proc` can tell.
pub fn ephemeral_ports() -> Option<PortRange> {
    parse_port_range(&std::fs::read_to_string(EPHEMERAL_SYSCTL).ok()?)
}

fn parse_port_range(text: &str) -> Option<PortRange> {
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    let (Some(Ok(start)), Some(Ok(end))) = (numbers.next(), numbers.next()) else {
        return None;
    };
    (start <= end).then_some(PortRange { start, end })
}

/// A warning per UDP port range of `config` that XDP protects inside the
/// ephemeral range: the replies to the host's own DNS, NTP and other UDP
/// queries arrive on those ports, and XDP cannot tell such a reply from a
/// knock or a probe, so it drops them (or takes them for knocks).
pub fn ephemeral_warnings(config: &Config, ephemeral: PortRange) -> Vec<String> {
    let mut ranges: Vec<(String, PortRange)> = Vec::new();
    for (i, r) in config.protect.udp.iter().enumerate() {
        ranges.push((format!("protect.udp[{i}]"), *r));
    }
    for (i, r) in config.knock.udp.iter().enumerate() {
        ranges.push((format!("knock.udp[{i}]"), *r));
    }
    for (name, door) in &config.doors {
        match &door.kind {
            DoorKind::OneTime(d) => {
                ranges.push((format!("doors.{name}.knock_ports"), d.knock_ports))
            }
            DoorKind::Static(d) => {
                for (i, k) in d.sequence.iter().enumerate() {
                    if k.proto == Proto::Udp {
                        ranges.push((
                            format!("doors.{name}.sequence[{i}]"),
                            PortRange {
                                start: k.port,
                                end: k.port,
                            },
                        ));
                    }
                }
            }
        }
    }
    ranges
        .into_iter()
        .filter(|(_, r)| r.start <= ephemeral.end && ephemeral.start <= r.end)
        .map(|(key, r)| {
            format!(
                "{key}: UDP {r} lies in the ephemeral range {ephemeral} \
                 (net.ipv4.ip_local_port_range), where replies to this host's own DNS, NTP and \
                 other UDP queries arrive; XDP cannot tell them from knocks and drops them. \
                 Use ports below {}, or move the range with that sysctl",
                ephemeral.start
            )
        })
        .collect()
}

/// The range `knockd gen-sequence` draws from unless told: from 10000 up
/// to the ephemeral range, so no knock lands where the host's own replies
/// do; above the range when it starts too low to leave room.
pub fn sequence_range(ephemeral: PortRange) -> PortRange {
    if ephemeral.start > 11_000 {
        PortRange {
            start: 10_000,
            end: ephemeral.start - 1,
        }
    } else if ephemeral.end < 64_000 {
        PortRange {
            start: ephemeral.end + 1,
            end: 65_535,
        }
    } else {
        PortRange {
            start: 1024,
            end: ephemeral.start.saturating_sub(1).max(1024),
        }
    }
}

/// The host's memory in bytes (`MemTotal` in /proc/meminfo), if readable.
pub fn memory_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::WithoutXdp;

    #[test]
    fn udp_ports_in_the_ephemeral_range_are_named() {
        let config = Config::parse(
            "interfaces: [eth0]\nprotect: { udp: [\"53\", \"40000-40010\"] }\n\
             doors:\n  ssh: { service_port: 22, knock_ports: \"30000-33000\" }\n  \
             old: { service_port: 2222, mode: static, sequence: [\"6000:udp\", \"50000:udp\", \"50001:tcp\"] }\n  \
             low: { service_port: 2223, knock_ports: \"7000-7999\" }\n",
            std::path::Path::new("t.yaml"),
        )
        .unwrap();
        let warnings = ephemeral_warnings(&config, DEFAULT_EPHEMERAL);
        let keys: Vec<&str> = warnings
            .iter()
            .map(|w| w.split(':').next().unwrap())
            .collect();
        assert_eq!(
            keys,
            [
                "protect.udp[1]",
                "doors.old.sequence[1]",
                "doors.ssh.knock_ports"
            ],
            "{warnings:#?}"
        );
        assert!(warnings[2].contains("UDP 30000-33000 lies in the ephemeral range 32768-60999"));
        assert!(warnings[2].contains("below 32768"));
    }

    #[test]
    fn the_sequence_range_stays_out_of_the_ephemeral_range() {
        let pr = |start, end| PortRange { start, end };
        assert_eq!(sequence_range(DEFAULT_EPHEMERAL), pr(10_000, 32_767));
        assert_eq!(sequence_range(pr(1024, 20_000)), pr(20_001, 65_535));
        assert_eq!(sequence_range(pr(1024, 65_000)), pr(1024, 1024));
        assert_eq!(parse_port_range("32768\t60999\n"), Some(DEFAULT_EPHEMERAL));
        assert_eq!(parse_port_range("9 1"), None);
    }

    #[test]
    fn kernels_older_than_the_floor_are_warned_about() {
        assert_eq!(kernel_warning("6.1.0-57-amd64", WithoutXdp::Nftables), None);
        assert_eq!(kernel_warning("5.18.0", WithoutXdp::Nftables), None);
        assert_eq!(kernel_warning("6.18.44-fc-v1272", WithoutXdp::Refuse), None);
        let old = kernel_warning("5.10.0-30-amd64", WithoutXdp::Nftables).unwrap();
        assert!(
            old.contains("5.10.0-30-amd64")
                && old.contains("5.18")
                && old.contains("nftables alone"),
            "{old}"
        );
        let refused = kernel_warning("4.19.0", WithoutXdp::Refuse).unwrap();
        assert!(refused.contains("refuse to start"), "{refused}");
        assert_eq!(
            kernel_warning("", WithoutXdp::Nftables),
            None,
            "unknown: no guess"
        );
    }
}
