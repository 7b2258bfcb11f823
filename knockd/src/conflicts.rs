//! Rules of other tables that keep a door shut whatever knockd grants.
//!
//! knockd's grants accept in its own table, but a packet must pass every
//! base chain on its hook: a drop anywhere else is final. Every classic
//! knockd setup relies on such a drop of the service port (iptables, ufw,
//! firewalld), so after a migration the knock succeeds, the log shows a
//! grant, and ssh still times out. This module reads the host's other
//! tables (as libnftnl renders their expressions; iptables-nft and ufw
//! rules are nftables rules underneath) and names each rule that drops or
//! rejects a door's service port (TCP, or UDP for a UDP door), and each
//! input chain that drops by policy with no rule accepting it. It only decides: the nft module
//! reads the ruleset ([`crate::kernel::conflicts_on_host`] puts the two
//! together), check-config, start-up and reload report.
//!
//! What it cannot judge it leaves alone: a port tested against a named or
//! anonymous set, rules of families other than inet, ip and ip6, and what a
//! jump leads to (a drop in a chain that is jumped to is named by its own
//! chain).

use crate::config::{Config, DoorKind, PortRange, Proto};

/// One chain outside knockd's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignChain {
    /// NFPROTO_* (1 inet, 2 ip, 10 ip6).
    pub family: u32,
    pub table: String,
    pub name: String,
    /// The hook of a base chain (0 prerouting, 1 input, ...); `None` for a
    /// regular chain, reached only by jumps.
    pub hook: Option<u32>,
    pub priority: i32,
    pub policy_drop: bool,
}

/// One rule outside knockd's table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ForeignRule {
    pub family: u32,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    /// libnftnl's default rendering: `[ payload load 2b @ transport header
    /// + 2 => reg 1 ] [ cmp eq reg 1 0x00001600 ] ...`.
    pub expressions: String,
}

/// A door as seen by the host's other tables: its service port, and the
/// range its grants come in on (seen only before the redirect, by chains
/// hooked ahead of nat's dstnat priority).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Door {
    pub name: String,
    pub service_port: u16,
    /// The service's protocol (UDP for a UDP door); grant ports are TCP.
    pub proto: Proto,
    pub grant_ports: Option<PortRange>,
}

/// The doors of `config` whose service port a grant opens (an exposed
/// service port is reachable anyway; a drop there is the operator's).
pub fn doors_of(config: &Config) -> Vec<Door> {
    config
        .doors
        .iter()
        .filter_map(|(name, d)| {
            let (service_port, proto) = match (d.guarded_port(), d.udp_service_port()) {
                (Some(port), _) => (port, Proto::Tcp),
                (None, Some(port)) => (port, Proto::Udp),
                (None, None) => return None,
            };
            Some(Door {
                name: name.clone(),
                service_port,
                proto,
                grant_ports: match &d.kind {
                    DoorKind::OneTime(o) => Some(o.grant_ports),
                    DoorKind::Static(_) => None,
                },
            })
        })
        .collect()
}

const HOOK_PREROUTING: u32 = 0;
const HOOK_INPUT: u32 = 1;
/// NF_IP_PRI_NAT_DST: chains before it see the grant port, after it the
/// service port the grant redirected to.
const PRIORITY_DSTNAT: i32 = -100;

fn family_name(family: u32) -> Option<&'static str> {
    match family {
        1 => Some("inet"),
        2 => Some("ip"),
        10 => Some("ip6"),
        _ => None,
    }
}

/// What a rule does to the packets it matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Accept,
    Drop,
    Reject,
    Other,
}

/// What a rule's expressions say about destination ports.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reading {
    verdict: Verdict,
    /// The IP protocol the rule tests for (`None`: it does not say).
    proto: Option<u8>,
    /// The rule tests the destination port in a way not read here (a set).
    unknown_port: bool,
    /// Each test of the destination port: the ports it lets through.
    port_tests: Vec<PortTest>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PortTest {
    Eq(u16),
    Neq(u16),
    Range(u16, u16),
    AtLeast(u16),
    AtMost(u16),
}

impl PortTest {
    fn admits(self, port: u16) -> bool {
        match self {
            PortTest::Eq(p) => port == p,
            PortTest::Neq(p) => port != p,
            PortTest::Range(a, b) => (a..=b).contains(&port),
            PortTest::AtLeast(a) => port >= a,
            PortTest::AtMost(b) => port <= b,
        }
    }
}

impl Reading {
    /// Whether the rule applies to `proto` to `port` (as far as its tests
    /// tell); a rule with no port test applies to every port.
    fn covers(&self, proto: Proto, port: u16) -> bool {
        self.proto.is_none_or(|p| p == proto.number())
            && !self.unknown_port
            && self.port_tests.iter().all(|t| t.admits(port))
    }

    fn covers_any(&self, ports: PortRange) -> bool {
        // Enough for a warning: the range's ends, and each port a test
        // names that falls inside it.
        let mut probes = vec![ports.start, ports.end];
        for t in &self.port_tests {
            match *t {
                PortTest::Eq(p) | PortTest::AtLeast(p) | PortTest::AtMost(p) => probes.push(p),
                PortTest::Range(a, b) => probes.extend([a, b]),
                PortTest::Neq(_) => {}
            }
        }
        probes
            .into_iter()
            .any(|p| ports.contains(p) && self.covers(Proto::Tcp, p))
    }
}

/// The first 32-bit word of a register value as libnftnl prints it, read
/// back as the bytes it was (`0x00001600` is the bytes 00 16, port 22).
fn word_bytes(token: &str) -> Option<[u8; 4]> {
    let hex = token.strip_prefix("0x")?;
    u32::from_str_radix(hex, 16).ok().map(u32::to_le_bytes)
}

fn port_of(token: &str) -> Option<u16> {
    word_bytes(token).map(|b| u16::from_be_bytes([b[0], b[1]]))
}

/// Reads a rule's expressions (libnftnl's default rendering).
fn read(expressions: &str) -> Reading {
    let mut reading = Reading {
        verdict: Verdict::Other,
        proto: None,
        unknown_port: false,
        port_tests: Vec::new(),
    };
    let mut dport_reg: Option<String> = None;
    let mut proto_reg: Option<String> = None;
    for expr in expressions
        .split('[')
        .skip(1)
        .filter_map(|e| e.split(']').next())
    {
        let words: Vec<&str> = expr.split_whitespace().collect();
        let reg_after_arrow = || {
            words
                .iter()
                .position(|w| *w == "=>")
                .and_then(|i| words.get(i + 2))
                .map(|r| (*r).to_owned())
        };
        match words.as_slice() {
            [
                "payload",
                "load",
                "2b",
                "@",
                "transport",
                "header",
                "+",
                "2",
                ..,
            ] => {
                dport_reg = reg_after_arrow();
            }
            [
                "payload",
                "load",
                "1b",
                "@",
                "network",
                "header",
                "+",
                "9",
                ..,
            ]
            | ["meta", "load", "l4proto", ..] => proto_reg = reg_after_arrow(),
            ["cmp", op, "reg", reg, value, ..] => {
                if dport_reg.as_deref() == Some(*reg) {
                    if let Some(port) = port_of(value) {
                        reading.port_tests.push(match *op {
                            "eq" => PortTest::Eq(port),
                            "neq" => PortTest::Neq(port),
                            "gte" => PortTest::AtLeast(port),
                            "gt" => PortTest::AtLeast(port.saturating_add(1)),
                            "lte" => PortTest::AtMost(port),
                            "lt" => PortTest::AtMost(port.saturating_sub(1)),
                            _ => {
                                reading.unknown_port = true;
                                continue;
                            }
                        });
                    }
                } else if proto_reg.as_deref() == Some(*reg) && *op == "eq" {
                    // A protocol no door has (ICMP, say) names itself too,
                    // and so covers no door.
                    reading.proto = word_bytes(value).map(|b| b[0]).or(Some(0));
                }
            }
            ["range", "eq", "reg", reg, low, high, ..] if dport_reg.as_deref() == Some(*reg) => {
                match (port_of(low), port_of(high)) {
                    (Some(a), Some(b)) => reading.port_tests.push(PortTest::Range(a, b)),
                    _ => reading.unknown_port = true,
                }
            }
            ["range", ..] | ["lookup", ..] | ["dynset", ..] if dport_reg.is_some() => {
                reading.unknown_port = true;
            }
            // An iptables extension match (multiport, conntrack, ...): its
            // meaning is in xtables' private data, so the rule is not judged.
            ["match", ..] => reading.unknown_port = true,
            ["immediate", "reg", "0", verdict, ..] => {
                reading.verdict = match *verdict {
                    "accept" => Verdict::Accept,
                    "drop" => Verdict::Drop,
                    _ => Verdict::Other,
                }
            }
            ["reject", ..] => reading.verdict = Verdict::Reject,
            ["target", "name", name, ..] => {
                reading.verdict = match *name {
                    "REJECT" => Verdict::Reject,
                    "DROP" => Verdict::Drop,
                    "ACCEPT" => Verdict::Accept,
                    _ => Verdict::Other,
                }
            }
            _ => {}
        }
    }
    reading
}

/// Every conflict between the host's other tables and `doors`, one line
/// each, naming the family, table, chain and rule handle (what `nft -a
/// list ruleset` shows) and the door.
pub fn find(chains: &[ForeignChain], rules: &[ForeignRule], doors: &[Door]) -> Vec<String> {
    let mut found = Vec::new();
    if doors.is_empty() {
        return found;
    }
    let chain_of = |rule: &ForeignRule| {
        chains
            .iter()
            .find(|c| c.family == rule.family && c.table == rule.table && c.name == rule.chain)
    };
    for rule in rules {
        let Some(family) = family_name(rule.family) else {
            continue;
        };
        let chain = chain_of(rule);
        // Base chains on other hooks (forward, output) never see a
        // packet to this host's service.
        if let Some(ForeignChain {
            hook: Some(hook), ..
        }) = chain
            && *hook != HOOK_INPUT
            && *hook != HOOK_PREROUTING
        {
            continue;
        }
        let before_redirect = matches!(
            chain,
            Some(ForeignChain { hook: Some(HOOK_PREROUTING), priority, .. }) if *priority < PRIORITY_DSTNAT
        );
        let reading = read(&rule.expressions);
        let what = match reading.verdict {
            Verdict::Drop => "drops",
            Verdict::Reject => "rejects",
            Verdict::Accept | Verdict::Other => continue,
        };
        for door in doors {
            let port = if before_redirect {
                door.grant_ports
                    .filter(|r| reading.covers_any(*r))
                    .map(|r| format!("grant ports {r}"))
            } else {
                None
            }
            .map(|ports| (Proto::Tcp, ports))
            .or_else(|| {
                reading
                    .covers(door.proto, door.service_port)
                    .then(|| (door.proto, format!("service port {}", door.service_port)))
            });
            if let Some((proto, port)) = port {
                let proto = proto.to_string().to_uppercase();
                found.push(format!(
                    "table {family} {}, chain {}, rule handle {} {what} {proto} to the {port} of door {}: \
                     a grant accepts only in knockd's table, so this rule keeps the door shut \
                     after a knock. Remove it (see the README's \"Coming from another \
                     firewall\")",
                    rule.table, rule.chain, rule.handle, door.name
                ));
            }
        }
    }
    for chain in chains {
        let Some(family) = family_name(chain.family) else {
            continue;
        };
        if chain.hook != Some(HOOK_INPUT) || !chain.policy_drop {
            continue;
        }
        for door in doors {
            let accepted = rules.iter().any(|r| {
                r.family == chain.family && r.table == chain.table && {
                    let reading = read(&r.expressions);
                    reading.verdict == Verdict::Accept
                        && !reading.port_tests.is_empty()
                        && reading.covers(door.proto, door.service_port)
                }
            });
            if !accepted {
                found.push(format!(
                    "table {family} {}, chain {} drops by policy, and no rule of that table \
                     accepts {} to door {}'s service port {}: a grant's connections would be \
                     dropped there. Accept that port in that table (knockd's guard keeps it shut \
                     to everyone without a grant)",
                    chain.table,
                    chain.name,
                    door.proto.to_string().to_uppercase(),
                    door.name,
                    door.service_port
                ));
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    fn door() -> Door {
        Door {
            name: "ssh".into(),
            service_port: 22,
            proto: Proto::Tcp,
            grant_ports: Some(PortRange {
                start: 60000,
                end: 60999,
            }),
        }
    }

    fn chain(
        table: &str,
        name: &str,
        hook: Option<u32>,
        priority: i32,
        policy_drop: bool,
    ) -> ForeignChain {
        ForeignChain {
            family: 2,
            table: table.into(),
            name: name.into(),
            hook,
            priority,
            policy_drop,
        }
    }

    fn rule(table: &str, chain: &str, expressions: &str) -> ForeignRule {
        ForeignRule {
            family: 2,
            table: table.into(),
            chain: chain.into(),
            handle: 4,
            expressions: expressions.into(),
        }
    }

    /// What libnftnl prints for iptables-nft's `-A INPUT -p tcp --dport 22 -j DROP`.
    const IPTABLES_DROP_22: &str = "ip filter INPUT 4\n  [ meta load l4proto => reg 1 ]\n  \
        [ cmp eq reg 1 0x00000006 ]\n  [ payload load 2b @ transport header + 2 => reg 1 ]\n  \
        [ cmp eq reg 1 0x00001600 ]\n  [ counter pkts 0 bytes 0 ]\n  [ immediate reg 0 drop ]\n";

    #[test]
    fn an_iptables_drop_of_the_service_port_is_named() {
        let chains = [chain("filter", "INPUT", Some(1), 0, false)];
        let found = find(
            &chains,
            &[rule("filter", "INPUT", IPTABLES_DROP_22)],
            &[door()],
        );
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(
            found[0].starts_with(
                "table ip filter, chain INPUT, rule handle 4 drops TCP to the service port 22 of door ssh"
            ),
            "{}",
            found[0]
        );
    }

    #[test]
    fn a_udp_doors_port_is_judged_for_udp() {
        let chains = [chain("filter", "INPUT", Some(1), 0, true)];
        let vpn = Door {
            name: "vpn".into(),
            service_port: 51820,
            proto: Proto::Udp,
            grant_ports: None,
        };
        // `-A INPUT -p udp --dport 51820 -j DROP`, and the same for TCP.
        let udp = IPTABLES_DROP_22
            .replace("0x00000006", "0x00000011")
            .replace("0x00001600", "0x00006cca");
        let tcp = IPTABLES_DROP_22.replace("0x00001600", "0x00006cca");
        let found = find(
            &chains,
            &[rule("filter", "INPUT", &udp)],
            std::slice::from_ref(&vpn),
        );
        assert!(
            found[0].starts_with(
                "table ip filter, chain INPUT, rule handle 4 drops UDP to the service port 51820 of door vpn"
            ),
            "{found:?}"
        );
        assert!(
            found[1].contains("accepts UDP to door vpn's service port 51820"),
            "{found:?}"
        );
        let accepted = udp.replace("drop", "accept");
        let found = find(
            &chains,
            &[
                rule("filter", "INPUT", &tcp),
                rule("filter", "INPUT", &accepted),
            ],
            &[vpn],
        );
        assert_eq!(found, Vec::<String>::new(), "a TCP drop leaves UDP alone");
    }

    #[test]
    fn other_ports_protocols_sets_and_hooks_are_left_alone() {
        let chains = [
            chain("filter", "INPUT", Some(1), 0, false),
            chain("filter", "OUTPUT", Some(3), 0, false),
        ];
        let other_port = IPTABLES_DROP_22.replace("0x00001600", "0x00005000");
        let udp = IPTABLES_DROP_22.replace("0x00000006", "0x00000011");
        let set = "[ meta load l4proto => reg 1 ] [ cmp eq reg 1 0x00000006 ] \
            [ payload load 2b @ transport header + 2 => reg 1 ] [ lookup reg 1 set __set0 ] \
            [ immediate reg 0 drop ]";
        let not_22 =
            IPTABLES_DROP_22.replace("cmp eq reg 1 0x00001600", "cmp neq reg 1 0x00001600");
        // iptables' `-m multiport --dports 80,443 -j REJECT`.
        let multiport = "[ meta load l4proto => reg 1 ] [ cmp eq reg 1 0x00000006 ] \
            [ match name multiport rev 1 ] [ counter pkts 0 bytes 0 ] [ target name REJECT rev 0 ]";
        let rules = [
            rule("filter", "INPUT", multiport),
            rule("filter", "INPUT", &other_port),
            rule("filter", "INPUT", &udp),
            rule("filter", "INPUT", set),
            rule("filter", "INPUT", &not_22),
            rule("filter", "OUTPUT", IPTABLES_DROP_22),
            rule(
                "filter",
                "INPUT",
                &IPTABLES_DROP_22.replace("drop", "accept"),
            ),
        ];
        assert_eq!(find(&chains, &rules, &[door()]), Vec::<String>::new());
    }

    #[test]
    fn ranges_rejects_and_the_grant_ports_before_the_redirect() {
        let chains = [
            chain("filter", "INPUT", Some(1), 0, false),
            chain("raw", "PREROUTING", Some(0), -300, false),
        ];
        // `tcp dport 1-1024 reject` and, before nat, a drop of 60000-65535.
        let range = "[ meta load l4proto => reg 1 ] [ cmp eq reg 1 0x00000006 ] \
            [ payload load 2b @ transport header + 2 => reg 1 ] [ cmp gte reg 1 0x00000100 ] \
            [ cmp lte reg 1 0x00000004 ] [ reject type 0 code 3 ]";
        let high = "[ payload load 2b @ transport header + 2 => reg 1 ] \
            [ range eq reg 1 0x000060ea 0x0000ffff ] [ immediate reg 0 drop ]";
        let found = find(
            &chains,
            &[
                rule("filter", "INPUT", range),
                rule("raw", "PREROUTING", high),
            ],
            &[door()],
        );
        assert_eq!(found.len(), 2, "{found:#?}");
        assert!(found[0].contains("rejects TCP to the service port 22 of door ssh"));
        assert!(found[1].contains("drops TCP to the grant ports 60000-60999 of door ssh"));
    }

    #[test]
    fn a_policy_drop_input_chain_is_named_unless_the_port_is_accepted() {
        let chains = [chain("filter", "INPUT", Some(1), 0, true)];
        let found = find(&chains, &[], &[door()]);
        assert_eq!(found.len(), 1);
        assert!(
            found[0].contains("chain INPUT drops by policy"),
            "{}",
            found[0]
        );
        let accept = IPTABLES_DROP_22.replace("drop", "accept");
        assert_eq!(
            find(
                &chains,
                &[rule("filter", "ufw-user-input", &accept)],
                &[door()]
            ),
            Vec::<String>::new()
        );
    }
}
