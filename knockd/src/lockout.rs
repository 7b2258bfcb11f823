//! The lockout guard: before a configuration takes effect, look at the
//! sessions in progress on this host (say, the ssh session of the admin
//! who is about to start knockd) and warn when the configuration would let
//! none of them back in once they end. Established sessions survive the
//! guard either way (conntrack keeps them); the danger is the next
//! connection.
//!
//! Two guards:
//! - [`guard`] changes the configuration: a one-time door no device may
//!   open leaves its service port open, loudly, instead of shutting the
//!   operator out (someone who installs knockd over ssh and starts it
//!   before provisioning a device would otherwise lose the host). Adding a
//!   device and reloading closes it.
//! - [`check`] looks at the sessions in progress and warns of the ones the
//!   configuration would lock out once they end. Only warnings: refusing
//!   to start would leave the host without its guard, which is worse.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    config::{ClosedPorts, Config, DoorKind},
    devices::Devices,
};

/// A TCP connection some remote host made to a listening socket here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InboundSession {
    pub local_port: u16,
    pub peer: IpAddr,
}

/// The sessions in progress that entered through a listening port, read
/// from `/proc/net/tcp` and `/proc/net/tcp6` of this network namespace
/// (read once, at start-up or a check, so the walk over every socket is
/// fine here). Unreadable files give no sessions: the guard only warns.
pub fn inbound_sessions() -> Vec<InboundSession> {
    let mut listening = Vec::new();
    let mut established = Vec::new();
    for (file, v6) in [("/proc/net/tcp", false), ("/proc/net/tcp6", true)] {
        let Ok(text) = std::fs::read_to_string(file) else {
            continue;
        };
        for line in text.lines().skip(1) {
            let fields: Vec<&str> = line.split_whitespace().collect();
            let (Some(local), Some(remote), Some(state)) =
                (fields.get(1), fields.get(2), fields.get(3))
            else {
                continue;
            };
            let (Some((_, local_port)), Some((peer, _))) =
                (parse_endpoint(local, v6), parse_endpoint(remote, v6))
            else {
                continue;
            };
            match *state {
                // TCP_LISTEN
                "0A" => listening.push(local_port),
                // TCP_ESTABLISHED
                "01" => established.push(InboundSession { local_port, peer }),
                _ => {}
            }
        }
    }
    // A connection this host made leaves from an ephemeral port nobody
    // listens on; one made to it arrives on a listening port.
    established.retain(|s| listening.contains(&s.local_port));
    established
}

/// `ADDR:PORT` as the kernel prints it: the address as 32-bit words in
/// host byte order, in hex, and the port in hex.
fn parse_endpoint(text: &str, v6: bool) -> Option<(IpAddr, u16)> {
    let (addr, port) = text.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |i: usize| -> Option<[u8; 4]> {
        let hex = addr.get(i * 8..i * 8 + 8)?;
        Some(u32::from_str_radix(hex, 16).ok()?.to_ne_bytes())
    };
    let ip = if v6 {
        let mut bytes = [0u8; 16];
        for i in 0..4 {
            bytes[i * 4..i * 4 + 4].copy_from_slice(&word(i)?);
        }
        let ip = Ipv6Addr::from(bytes);
        ip.to_ipv4_mapped().map_or(IpAddr::V6(ip), IpAddr::V4)
    } else {
        IpAddr::V4(Ipv4Addr::from(word(0)?))
    };
    Some((ip, port))
}

/// `config` with the service port of every one-time door that no device
/// may open left open (as `expose_service_port` would), and a warning for
/// each such door.
pub fn guard(mut config: Config, devices: &Devices) -> (Config, Vec<String>) {
    let unopenable: Vec<(String, u16)> = config
        .doors
        .iter()
        .filter(|(name, door)| {
            matches!(door.kind, DoorKind::OneTime(_))
                && devices.allowed(&config, name).next().is_none()
        })
        .filter_map(|(name, door)| Some((name.clone(), door.guarded_port()?)))
        .collect();
    let mut warnings = Vec::new();
    // In fleet mode the devices come from etcd after start-up: a door no
    // local device may open is the normal case, and opening its service
    // port to everyone until a reload would undo the whole point. It
    // stays shut (fail closed).
    if config.cluster.is_some() {
        for (name, _) in unopenable {
            warnings.push(format!(
                "doors.{name}: no device on this node's own files may open this door; in fleet \
                 mode its devices come from etcd, and its service port stays closed until then"
            ));
        }
        return (config, warnings);
    }
    for (name, port) in unopenable {
        let door = config.doors.get_mut(&name).expect("listed above");
        door.expose_service_port = true;
        warnings.push(format!(
            "doors.{name}: no device may open this door, so its service port {port} stays OPEN \
             to everyone (lockout guard); add a device (`knockctl device add`) and reload \
             to close it"
        ));
    }
    (config, warnings)
}

/// What start-up and reload do with a configuration just loaded: the
/// lockout guard applied, and every warning (the devices', the guard's, the
/// sessions') logged. Returns the configuration to run and the guard's
/// warnings, which status repeats as hints.
pub fn prepare(config: Config, devices: &Devices) -> (Config, Vec<String>) {
    prepare_with(config, devices, &inbound_sessions())
}

/// [`prepare`], given the sessions in progress (the daemon reads them
/// through its kernel seam).
pub fn prepare_with(
    config: Config,
    devices: &Devices,
    sessions: &[InboundSession],
) -> (Config, Vec<String>) {
    let (config, opened) = guard(config, devices);
    for warning in devices
        .warnings
        .iter()
        .chain(&warnings(&config, devices, sessions))
        .chain(&opened)
    {
        tracing::warn!("{warning}");
    }
    (config, opened)
}

/// What `config` would do to the sessions in progress now, as warnings.
pub fn check(config: &Config, devices: &Devices) -> Vec<String> {
    warnings(config, devices, &inbound_sessions())
}

/// What `config` would do to `sessions` once they end, as warnings.
pub fn warnings(config: &Config, devices: &Devices, sessions: &[InboundSession]) -> Vec<String> {
    let mut by_port: BTreeMap<u16, Vec<IpAddr>> = BTreeMap::new();
    for session in sessions {
        by_port
            .entry(session.local_port)
            .or_default()
            .push(session.peer);
    }
    let describe = |peers: &[IpAddr]| match peers {
        [one] => format!("a session from {one} is"),
        [first, ..] => format!("{} sessions (from {first}, …) are", peers.len()),
        [] => unreachable!("only ports with sessions are described"),
    };
    let mut out = Vec::new();
    for (port, peers) in &by_port {
        let door = config
            .doors
            .iter()
            .find(|(_, d)| d.service_port == Some(*port));
        match door {
            Some((name, door)) => {
                let openable = door.expose_service_port
                    || matches!(door.kind, DoorKind::Static(_))
                    || devices.allowed(config, name).next().is_some();
                if !openable {
                    out.push(format!(
                        "doors.{name}: {} in progress on port {port}, and no device may open \
                         this door: once it ends, nobody can connect again (add a device \
                         with `knockctl device add`)",
                        describe(peers)
                    ));
                }
            }
            None if config.closed_ports == ClosedPorts::Drop
                && !config.public.tcp.iter().any(|r| r.contains(*port))
                && !config.protect.tcp.iter().any(|r| r.contains(*port)) =>
            {
                out.push(format!(
                    "closed_ports: drop: {} in progress on port {port}, which is neither \
                     public nor behind a door: once it ends, new connections to port {port} \
                     are dropped (list it under public.tcp, or put a door in front of it)",
                    describe(peers)
                ));
            }
            None => {}
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn a_door_no_device_may_open_keeps_its_service_port_open() {
        let config = Config::parse(
            "interfaces: [eth0]\n\
             doors:\n\
             \x20 ssh: { service_port: 22, allow: { groups: [admins] } }\n\
             \x20 web: { service_port: 443, mode: static, sequence: [\"6000:udp\"] }\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        let (guarded, warnings) = guard(config.clone(), &Devices::default());
        assert!(guarded.doors["ssh"].expose_service_port);
        assert!(
            !guarded.doors["web"].expose_service_port,
            "a static sequence opens it"
        );
        assert_eq!(warnings.len(), 1);
        assert!(
            warnings[0].contains("service port 22 stays OPEN"),
            "{warnings:?}"
        );
        // Nothing else changes.
        let mut expected = config;
        expected.doors.get_mut("ssh").unwrap().expose_service_port = true;
        assert_eq!(guarded, expected);
    }

    #[test]
    fn in_fleet_mode_a_door_without_local_devices_stays_shut() {
        let config = Config::parse(
            "interfaces: [eth0]\n\
             cluster: { name: n1, endpoints: [\"http://198.18.0.21:2379\"] }\n\
             doors: { ssh: { service_port: 22, scope: cluster, allow: { groups: [admins] } } }\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        let (guarded, warnings) = guard(config.clone(), &Devices::default());
        assert_eq!(guarded, config, "the service port must not be exposed");
        assert!(
            warnings[0].contains("devices come from etcd"),
            "{warnings:?}"
        );
    }

    #[test]
    fn endpoints_parse_as_the_kernel_prints_them() {
        // 198.18.0.1:22 and [2001:db8::1]:40000 on a little-endian host.
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_endpoint("010012C6:0016", false),
                Some(("198.18.0.1".parse().unwrap(), 22))
            );
            assert_eq!(
                parse_endpoint("B80D0120000000000000000001000000:9C40", true),
                Some(("2001:db8::1".parse().unwrap(), 40000))
            );
            // An IPv4 peer of a dual-stack socket reads as IPv4.
            assert_eq!(
                parse_endpoint("0000000000000000FFFF0000010012C6:0016", true),
                Some(("198.18.0.1".parse().unwrap(), 22))
            );
        }
        assert_eq!(parse_endpoint("zz:0016", false), None);
    }

    #[test]
    fn sessions_a_config_would_lock_out_are_named() {
        let config = Config::parse(
            "interfaces: [eth0]\n\
             closed_ports: drop\n\
             public: { tcp: [443] }\n\
             doors: { ssh: { service_port: 22, allow: { groups: [admins] } } }\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        let session = |local_port, peer: &str| InboundSession {
            local_port,
            peer: peer.parse().unwrap(),
        };
        let sessions = [
            session(22, "198.18.0.9"),
            session(443, "198.18.0.9"),
            session(8080, "198.18.0.7"),
            session(8080, "198.18.0.8"),
        ];
        let found = warnings(&config, &Devices::default(), &sessions);
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].starts_with("doors.ssh: a session from 198.18.0.9 is in progress on port 22")
        );
        assert!(found[1].starts_with("closed_ports: drop: 2 sessions (from 198.18.0.7, …) are"));
        // With the default closed_ports: pass, port 8080 stays reachable.
        let open = Config::parse("interfaces: [eth0]\n", Path::new("t.yaml")).unwrap();
        assert!(warnings(&open, &Devices::default(), &sessions).is_empty());
    }
}
