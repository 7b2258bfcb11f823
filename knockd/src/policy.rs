//! The port policy a configuration asks of the XDP guard: which ports are
//! protected, which are knocks, which may be granted. It is computed here,
//! from the configuration and the knock ports valid now, and handed to
//! [`crate::maps`], which only writes it: the kernel adapter does not read
//! the configuration.

use std::collections::BTreeSet;

use knockd_common::policy;

use crate::{
    config::{ClosedPorts, Config, Door, DoorKind, KnockPort, PortRange},
    maps::{PortPolicy, Proto},
};

/// What `config` protects, with `knocks` (the engine's current knock
/// ports) marked as knocks: the configured `protect` and `knock` ports,
/// each door's service port (unless exposed), each one-time door's
/// whole knock range (only the ports valid now are knocks; the rest just
/// drop) and grant range, and each static door's sequence.
pub fn port_policy(config: &Config, knocks: &BTreeSet<KnockPort>) -> PortPolicy {
    let mut table = PortPolicy::empty();
    let rules: [(Proto, &[PortRange], u8); 4] = [
        (Proto::Tcp, &config.protect.tcp, policy::PROTECTED),
        (Proto::Udp, &config.protect.udp, policy::PROTECTED),
        (
            Proto::Tcp,
            &config.knock.tcp,
            policy::KNOCK | policy::PROTECTED,
        ),
        (
            Proto::Udp,
            &config.knock.udp,
            policy::KNOCK | policy::PROTECTED,
        ),
    ];
    for (proto, ranges, flags) in rules {
        for port in ranges.iter().flat_map(|r| r.ports()) {
            table.set(proto, port, flags);
        }
    }
    for door in config.doors.values() {
        if let Some(port) = door.guarded_port() {
            table.set(Proto::Tcp, port, policy::PROTECTED);
        }
        match &door.kind {
            DoorKind::OneTime(d) => {
                for port in d.knock_ports.ports() {
                    table.set(Proto::Udp, port, policy::PROTECTED | policy::KNOCK_RANGE);
                }
                for port in d.grant_ports.ports() {
                    table.set(Proto::Tcp, port, policy::PROTECTED);
                }
            }
            DoorKind::Static(d) => {
                for knock in &d.sequence {
                    table.set(knock.proto, knock.port, policy::PROTECTED);
                }
            }
        }
    }
    // Ports some static sequence or `knock` entry uses take any payload;
    // the others are one-time knock ports, whose shape XDP checks.
    let unshaped: BTreeSet<KnockPort> = config
        .doors
        .values()
        .filter_map(Door::static_door)
        .flat_map(|d| d.sequence.iter().copied())
        .chain(
            config
                .knock
                .udp
                .iter()
                .flat_map(|r| r.ports())
                .map(|port| KnockPort {
                    port,
                    proto: Proto::Udp,
                }),
        )
        .collect();
    // Where the daemon writes allow entries: grants live in their
    // door's range, static doors admit to the service port itself.
    // Marked last, on top of whatever else a port is.
    for door in config.doors.values() {
        let ports: Box<dyn Iterator<Item = u16>> = match &door.kind {
            DoorKind::OneTime(d) => Box::new(d.grant_ports.ports()),
            DoorKind::Static(_) => Box::new(door.guarded_port().into_iter()),
        };
        for port in ports {
            let flags = table.get(Proto::Tcp, port);
            table.set(Proto::Tcp, port, flags | policy::ALLOWS);
        }
    }
    // A dark host: every TCP port nothing above claimed is closed, except
    // the public ones and service ports a door leaves exposed. Only TCP:
    // telling a UDP reply from a probe needs conntrack (nftables does it).
    if config.closed_ports == ClosedPorts::Drop {
        let mut open = vec![false; usize::from(u16::MAX) + 1];
        let exposed = config
            .doors
            .values()
            .filter(|d| d.expose_service_port)
            .filter_map(|d| d.service_port);
        for port in config
            .public
            .tcp
            .iter()
            .flat_map(|r| r.ports())
            .chain(exposed)
        {
            open[usize::from(port)] = true;
        }
        for port in 0..=u16::MAX {
            if !open[usize::from(port)] && table.get(Proto::Tcp, port) == 0 {
                table.set(Proto::Tcp, port, policy::PROTECTED | policy::CLOSED);
            }
        }
    }
    for knock in knocks {
        let shaped = if knock.proto == Proto::Udp && !unshaped.contains(knock) {
            policy::SHAPED
        } else {
            0
        };
        table.set(
            knock.proto,
            knock.port,
            policy::KNOCK | policy::PROTECTED | shaped,
        );
    }
    table
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    #[test]
    fn port_policy_from_config() {
        let config = Config::parse(
            "interfaces: [eth0]\n\
             protect: { tcp: [22, \"40000-40002\"] }\n\
             knock: { udp: [7000], tcp: [8000] }\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        let table = port_policy(&config, &BTreeSet::new());
        assert_eq!(table.get(Proto::Tcp, 22), policy::PROTECTED);
        assert_eq!(table.get(Proto::Tcp, 40001), policy::PROTECTED);
        assert_eq!(table.get(Proto::Tcp, 40003), 0);
        assert_eq!(table.get(Proto::Udp, 22), 0);
        assert_eq!(
            table.get(Proto::Udp, 7000),
            policy::KNOCK | policy::PROTECTED
        );
        assert_eq!(
            table.get(Proto::Tcp, 8000),
            policy::KNOCK | policy::PROTECTED
        );
        let set = table.flagged();
        assert_eq!(set, 6);
    }

    #[test]
    fn an_action_door_guards_its_knocks_and_no_tcp_port() {
        let config = Config::parse(
            "interfaces: [eth0]\n\
             doors:\n\
             \x20 wake: { mode: static, sequence: [\"6000:udp\", \"6001:tcp\"], \
             hooks: { on_open: [/srv/wake], user: nobody } }\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        let table = port_policy(&config, &BTreeSet::new());
        assert_eq!(table.get(Proto::Udp, 6000), policy::PROTECTED);
        assert_eq!(table.get(Proto::Tcp, 6001), policy::PROTECTED);
        assert_eq!(table.flagged(), 2, "nothing else: it opens no port");
    }

    #[test]
    fn one_time_knock_ports_are_shaped_static_ones_are_not() {
        let config = Config::parse(
            "interfaces: [eth0]\n\
             knock: { udp: [5100] }\n\
             devices: { laptop: { key_file: /k/laptop, groups: [admins] } }\n\
             doors:\n\
             \x20 ssh: { service_port: 22, allow: { groups: [admins] } }\n\
             \x20 web: { service_port: 443, mode: static, sequence: [\"6000:udp\", \"6001:tcp\"] }\n",
            Path::new("t.yaml"),
        )
        .unwrap();
        let udp = |port| KnockPort {
            port,
            proto: Proto::Udp,
        };
        let knocks: BTreeSet<KnockPort> = [
            udp(7005),
            udp(6000),
            udp(5100),
            KnockPort {
                port: 6001,
                proto: Proto::Tcp,
            },
        ]
        .into();
        let table = port_policy(&config, &knocks);
        let knock = policy::KNOCK | policy::PROTECTED;
        assert_eq!(table.get(Proto::Udp, 7005), knock | policy::SHAPED);
        assert_eq!(table.get(Proto::Udp, 6000), knock);
        assert_eq!(table.get(Proto::Udp, 5100), knock);
        assert_eq!(table.get(Proto::Tcp, 6001), knock);
        // The allow map is consulted only where the daemon grants: the
        // one-time door's grant range and the static door's service port,
        // not the one-time door's service port or any knock port.
        let allows = |proto, port| table.get(proto, port) & policy::ALLOWS != 0;
        assert!(allows(Proto::Tcp, 443));
        assert!(allows(Proto::Tcp, 40000) && allows(Proto::Tcp, 40999));
        assert!(!allows(Proto::Tcp, 22));
        assert!(!allows(Proto::Udp, 7005) && !allows(Proto::Tcp, 6001));
    }
}
