//! knockd's nftables table, built in a fresh namespace and checked with the
//! real `nft` command.

use std::time::Duration;

use knockd::nft::{self, DoorRules, Element, GrantKey, TableRules};
use knockd_tests::{NetNs, require_privileges, sh};

/// Two doors sharing a grant range; web exposes its service port (443 is
/// not guarded), ssh does not.
fn doors() -> TableRules {
    TableRules {
        doors: vec![
            DoorRules {
                name: "ssh".into(),
                grant_ports: 40000..=40999,
                service_port: 22,
            },
            DoorRules {
                name: "web".into(),
                grant_ports: 40000..=40999,
                service_port: 443,
            },
        ],
        interfaces: vec!["veth-k0".into(), "veth-k1".into()],
        guarded_tcp: vec![22..=22, 40000..=40999],
        guarded_udp: vec![7000..=7999],
        dark: None,
    }
}

fn ruleset(ns: &NetNs) -> String {
    sh(ns.command("nft").args(["list", "table", "inet", "knockd"]))
}

fn element(door: &str, source: &str, port: u16, secs: u64) -> Element {
    Element {
        door: door.into(),
        key: GrantKey {
            source: source.parse().unwrap(),
            port,
        },
        timeout: Duration::from_secs(secs),
        device: None,
    }
}

fn ports(ns: &NetNs) -> Vec<(String, u16)> {
    let mut got: Vec<(String, u16)> = ns
        .run(|| nft::list_grants(&["ssh", "web"]).unwrap())
        .into_iter()
        .map(|e| (e.door, e.key.port))
        .collect();
    got.sort();
    got
}

#[test]
fn the_table_holds_sets_rules_and_expiring_grants() {
    require_privileges!();
    let ns = NetNs::new("n");
    ns.run(|| nft::install(&doors()).unwrap());
    let listed = ruleset(&ns);
    for expected in [
        "set ssh4",
        "type ipv4_addr . inet_service",
        "set ssh6",
        "type ipv6_addr . inet_service",
        "set web4",
        "flags timeout",
        "type nat hook prerouting priority dstnat; policy accept;",
        "tcp dport 40000-40999 ip saddr . tcp dport @ssh4 dnat ip to ip daddr:22",
        "tcp dport 40000-40999 ip6 saddr . tcp dport @ssh6 dnat ip6 to ip6 daddr:22",
        "tcp dport 40000-40999 ip saddr . tcp dport @web4 dnat ip to ip daddr:443",
        "type filter hook input priority filter; policy accept;",
        "iifname \"veth-k0\" jump guard",
        "iifname \"veth-k1\" jump guard",
        "chain guard {",
        "ct state established,related accept",
        "ct status dnat accept",
        "set static_ipv4_grants",
        "ip saddr . tcp dport @static_ipv4_grants accept",
        "ip6 saddr . tcp dport @static_ipv6_grants accept",
        "set static_udp_ipv4_grants",
        "ip saddr . udp dport @static_udp_ipv4_grants accept",
        "ip6 saddr . udp dport @static_udp_ipv6_grants accept",
        "\ttcp dport 22 drop",
        "\ttcp dport 40000-40999 drop",
        "\tudp dport 7000-7999 drop",
    ] {
        assert!(
            listed.contains(expected),
            "missing {expected:?} in:\n{listed}"
        );
    }
    assert!(!listed.contains("443 drop"), "web exposes its service port");
    // The accepts come before the drops, in the order listed.
    let at = |needle: &str| listed.find(needle).unwrap();
    assert!(at("ct state established") < at("ct status dnat"));
    assert!(at("@static_ipv6_grants accept") < at("tcp dport 22 drop"));
    assert!(at("@static_udp_ipv6_grants accept") < at("udp dport 7000-7999 drop"));

    // A static grant: one source, the service port itself, with a timeout;
    // adding it again restarts the timeout; removing it twice is fine.
    let key = GrantKey {
        source: "198.18.0.9".parse().unwrap(),
        port: 2222,
    };
    ns.run(|| nft::update_static_grant(key, false, Some(Duration::from_secs(30)), false).unwrap());
    ns.run(|| nft::update_static_grant(key, false, Some(Duration::from_secs(60)), true).unwrap());
    let listed = ruleset(&ns);
    assert!(listed.contains("198.18.0.9 . 2222 timeout 1m"), "{listed}");
    ns.run(|| nft::update_static_grant(key, false, None, true).unwrap());
    ns.run(|| nft::update_static_grant(key, false, None, true).unwrap());
    // A UDP door's grant lands in the UDP set.
    ns.run(|| nft::update_static_grant(key, true, Some(Duration::from_secs(30)), false).unwrap());
    let listed = ruleset(&ns);
    let udp_set = &listed[listed.find("set static_udp_ipv4_grants").unwrap()..];
    assert!(
        udp_set[..udp_set.find('}').unwrap()].contains("198.18.0.9 . 2222"),
        "{listed}"
    );
    ns.run(|| nft::update_static_grant(key, true, None, true).unwrap());
    assert!(!ruleset(&ns).contains("198.18.0.9"));

    let v4 = element("ssh", "198.18.0.2", 40001, 30);
    let v6 = element("ssh", "2001:db8::2", 40002, 60);
    let web = element("web", "198.18.0.2", 40005, 30);
    ns.run(|| nft::update_grants(&[v4.clone(), v6.clone(), web.clone()], &[]).unwrap());
    let listed = ruleset(&ns);
    assert!(
        listed.contains("198.18.0.2 . 40001 timeout 30s"),
        "{listed}"
    );
    assert!(
        listed.contains("2001:db8::2 . 40002 timeout 1m"),
        "{listed}"
    );
    let grants = ns.run(|| nft::list_grants(&["ssh", "web"]).unwrap());
    assert_eq!(grants.len(), 3);
    for grant in &grants {
        let full = grant.timeout.as_secs();
        let want = if grant.key.port == 40002 { 60 } else { 30 };
        assert!(full <= want && full + 5 >= want, "{grant:?}");
    }

    // Reinstalling (a restart, or a changed door list) keeps the grants.
    ns.run(|| nft::install(&doors()).unwrap());
    assert_eq!(ports(&ns).len(), 3);

    // A rotation: one element out, one in, atomically.
    let rotated = element("ssh", "198.18.0.2", 40003, 30);
    ns.run(|| nft::update_grants(&[rotated], std::slice::from_ref(&v4)).unwrap());
    assert_eq!(
        ports(&ns),
        [
            ("ssh".to_owned(), 40002),
            ("ssh".to_owned(), 40003),
            ("web".to_owned(), 40005)
        ]
    );

    // Kernel timeouts: a short grant disappears by itself.
    let short = Element {
        timeout: Duration::from_millis(500),
        ..element("ssh", "198.18.0.2", 40004, 0)
    };
    ns.run(|| nft::update_grants(std::slice::from_ref(&short), &[]).unwrap());
    assert!(ports(&ns).contains(&("ssh".to_owned(), 40004)));
    std::thread::sleep(Duration::from_millis(1500));
    assert!(!ports(&ns).contains(&("ssh".to_owned(), 40004)));

    // Removing what is not there fails the batch, naming the step.
    let e = ns.run(|| nft::update_grants(&[], &[short]).unwrap_err());
    assert!(e.to_string().contains("updating grants"), "{e}");

    // A door list without "web": its sets and rule go, grant and all, and
    // ssh's stay.
    let mut ssh_only = doors();
    ssh_only.doors.truncate(1);
    ns.run(|| nft::install(&ssh_only).unwrap());
    let listed = ruleset(&ns);
    assert!(
        !listed.contains("web4")
            && !listed.contains("web6")
            && listed.contains("set ssh4")
            && listed.contains("set static_ipv4_grants"),
        "{listed}"
    );
    let mut left: Vec<u16> = ns
        .run(|| nft::list_grants(&["ssh"]).unwrap())
        .iter()
        .map(|e| e.key.port)
        .collect();
    left.sort();
    assert_eq!(left, [40002, 40003]);

    assert!(ns.run(|| nft::table_exists().unwrap()));
    ns.run(|| nft::uninstall().unwrap());
    assert!(!ns.run(|| nft::table_exists().unwrap()));
    ns.run(|| nft::uninstall().unwrap());
}

/// A dark host's rules, as `nft` reads them back: public UDP accepted,
/// other UDP and echo requests dropped, after the protected ports.
#[test]
fn a_dark_hosts_rules_read_back() {
    require_privileges!();
    let ns = NetNs::new("n");
    let rules = TableRules {
        dark: Some(vec![53..=53, 5300..=5310]),
        ..doors()
    };
    ns.run(|| nft::install(&rules).unwrap());
    let listed = ruleset(&ns);
    let guard = listed.split("chain guard").nth(1).unwrap();
    let mut at = 0;
    for expected in [
        "udp dport 7000-7999 drop",
        "udp dport 53 accept",
        "udp dport 5300-5310 accept",
        "meta l4proto udp drop",
        "icmp type echo-request drop",
        "icmpv6 type echo-request drop",
    ] {
        let found = guard[at..]
            .find(expected)
            .unwrap_or_else(|| panic!("{expected:?} missing or out of order in:\n{listed}"));
        at += found + expected.len();
    }
    // Without dark, none of them.
    ns.run(|| nft::install(&doors()).unwrap());
    let listed = ruleset(&ns);
    assert!(!listed.contains("echo-request") && !listed.contains("l4proto udp drop"));
}
