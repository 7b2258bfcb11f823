//! knockd's nftables table, built in a fresh namespace and checked with the
//! real `nft` command.

use std::time::Duration;

use knockd::nft::{self, DoorRules, GrantKey};
use knockd_tests::{NetNs, require_privileges, sh};

fn door() -> DoorRules {
    DoorRules {
        grant_ports: 40000..=40999,
        service_port: 22,
        expose_service_port: false,
    }
}

fn ruleset(ns: &NetNs) -> String {
    sh(ns.command("nft").args(["list", "table", "inet", "knockd"]))
}

#[test]
fn the_table_holds_sets_rules_and_expiring_grants() {
    require_privileges!();
    let ns = NetNs::new("n");
    ns.run(|| nft::install(&[door()]).unwrap());
    let listed = ruleset(&ns);
    for expected in [
        "set grants4",
        "type ipv4_addr . inet_service",
        "set grants6",
        "type ipv6_addr . inet_service",
        "flags timeout",
        "type nat hook prerouting priority dstnat; policy accept;",
        "tcp dport 40000-40999 ip saddr . tcp dport @grants4 redirect to :22",
        "tcp dport 40000-40999 ip6 saddr . tcp dport @grants6 redirect to :22",
        "type filter hook input priority filter; policy accept;",
        "ct state established,related accept",
        "tcp dport 22 ct status ! dnat drop",
    ] {
        assert!(
            listed.contains(expected),
            "missing {expected:?} in:\n{listed}"
        );
    }

    let v4 = GrantKey {
        source: "198.18.0.2".parse().unwrap(),
        port: 40001,
    };
    let v6 = GrantKey {
        source: "2001:db8::2".parse().unwrap(),
        port: 40002,
    };
    ns.run(|| {
        nft::update_grants(
            &[(v4, Duration::from_secs(30)), (v6, Duration::from_secs(60))],
            &[],
        )
        .unwrap()
    });
    let listed = ruleset(&ns);
    assert!(
        listed.contains("198.18.0.2 . 40001 timeout 30s"),
        "{listed}"
    );
    assert!(
        listed.contains("2001:db8::2 . 40002 timeout 1m"),
        "{listed}"
    );
    let grants = ns.run(|| nft::list_grants().unwrap());
    assert_eq!(grants.len(), 2);
    for (key, left) in &grants {
        let full = if *key == v4 { 30 } else { 60 };
        assert!(
            left.as_secs() <= full && left.as_secs() >= full - 5,
            "{key:?} {left:?}"
        );
    }

    // Reinstalling (a restart, or a changed door list) keeps the grants.
    ns.run(|| nft::install(&[door()]).unwrap());
    assert_eq!(ns.run(|| nft::list_grants().unwrap()).len(), 2);

    // A rotation: one element out, one in, atomically.
    let rotated = GrantKey { port: 40003, ..v4 };
    ns.run(|| nft::update_grants(&[(rotated, Duration::from_secs(30))], &[v4]).unwrap());
    let mut ports: Vec<u16> = ns
        .run(|| nft::list_grants().unwrap())
        .iter()
        .map(|(k, _)| k.port)
        .collect();
    ports.sort();
    assert_eq!(ports, [40002, 40003]);

    // Kernel timeouts: a short grant disappears by itself.
    let short = GrantKey { port: 40004, ..v4 };
    ns.run(|| nft::update_grants(&[(short, Duration::from_millis(500))], &[]).unwrap());
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        !ns.run(|| nft::list_grants().unwrap())
            .iter()
            .any(|(k, _)| *k == short)
    );

    // Removing what is not there fails the batch, naming the step.
    let e = ns.run(|| nft::update_grants(&[], &[short]).unwrap_err());
    assert!(e.to_string().contains("updating grants"), "{e}");

    assert!(ns.run(|| nft::table_exists().unwrap()));
    ns.run(|| nft::uninstall().unwrap());
    assert!(!ns.run(|| nft::table_exists().unwrap()));
    ns.run(|| nft::uninstall().unwrap());
}
