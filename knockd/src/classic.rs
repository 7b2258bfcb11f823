//! Migration from classic knockd: its `knockd.conf` turned into static
//! doors (`knockctl import`).
//!
//! Every section gets a [`Report`]: the door it became, or why it was
//! skipped, with the knockd.conf line, whether or not any door survives.
//! The configuration written is always one knockd takes: each door is
//! checked with the doors before it, and one that cannot be expressed is
//! skipped with the checker's reason.
//!
//! Meanings carry over as classic knockd has them: the protocol of each
//! knock (TCP unless `:udp`), `seq_timeout` (25 s when absent),
//! `cmd_timeout` (10 s when a `stop_command` closes the port) as the time
//! a grant admits new connections, the `Interface` option, and the service
//! port and its protocol (a UDP service becomes a UDP door), read from the
//! section's firewall command: iptables (`--dport`,
//! `--dport=`, service names from /etc/services, `-D ... -j DROP` which
//! opens by deleting a drop), nftables (`dport 22`, `{ %IP% . 22 }`), ufw
//! (`allow from %IP% to any port 22`, `allow 2222/tcp`) and knock_add
//! (`-d 443`). What cannot, and is said so: a section that takes access
//! away (knockd's grants close by themselves), one that opens several
//! ports, one whose knock ports another door uses
//! (knockd judges a knock port for one door), `one_time_sequences`,
//! `target`, TCP flags other than a bare SYN, and a key classic knockd
//! does not know (it refuses the file).
//!
//! A section whose command is not a firewall rule (waking a server,
//! starting a service, calling a script with `%IP%`) becomes an action
//! door: its `start_command` and `stop_command` run as the door's hooks,
//! through `/bin/sh -c` and as root, as classic knockd ran them.

use std::{collections::BTreeMap, fmt, path::Path};

use crate::config::{Config, KnockPort, Proto, is_valid_name};

/// classic knockd's defaults (knockd(1)).
const SEQ_TIMEOUT_SECS: u32 = 25;
const CMD_TIMEOUT_SECS: u32 = 10;

/// The keys classic knockd reads in a door section, and in `[options]`.
const SECTION_KEYS: &[&str] = &[
    "sequence",
    "one_time_sequences",
    "seq_timeout",
    "tcpflags",
    "start_command",
    "command",
    "cmd_timeout",
    "stop_command",
    "target",
];
const OPTION_KEYS: &[&str] = &["usesyslog", "logfile", "pidfile", "interface"];

/// One section of a knockd.conf: its keys, lower-cased, with their values
/// and lines.
#[derive(Debug, Default)]
struct Section {
    name: String,
    keys: BTreeMap<String, (String, usize)>,
    /// Flags without a value (`UseSyslog`), with their lines.
    flags: Vec<(String, usize)>,
    line: usize,
}

impl Section {
    fn get(&self, key: &str) -> Option<&str> {
        self.keys.get(key).map(|(v, _)| v.as_str())
    }
}

/// What became of one section of the knockd.conf.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    pub section: String,
    pub line: usize,
    /// The door it became; `None`: skipped, the first note says why.
    pub door: Option<String>,
    /// What changed on the way, or why it was skipped.
    pub notes: Vec<String>,
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let at = format!("line {} [{}]", self.line, self.section);
        match &self.door {
            Some(door) => write!(f, "{at}: imported as door {door}")?,
            None => write!(f, "{at}: skipped")?,
        }
        for note in &self.notes {
            write!(f, "\n  {note}")?;
        }
        Ok(())
    }
}

/// The result of an import: the configuration's YAML (doors may be none),
/// and a report per section.
#[derive(Debug)]
pub struct Imported {
    pub yaml: String,
    /// Notes on the file as a whole (`[options]`, the interface).
    pub general: Vec<String>,
    pub reports: Vec<Report>,
    pub doors: usize,
}

impl Imported {
    /// Every line the operator should read, in the file's order.
    pub fn notes(&self) -> Vec<String> {
        self.general
            .iter()
            .cloned()
            .chain(self.reports.iter().map(Report::to_string))
            .collect()
    }
}

/// Why a knockd.conf could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
}

fn parse(text: &str) -> Result<Vec<Section>, Error> {
    let mut sections: Vec<Section> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if let Some(name) = line.strip_prefix('[') {
            let Some(name) = name.strip_suffix(']') else {
                return Err(Error::Syntax {
                    line: n + 1,
                    message: format!("{line:?} opens a section but does not close it"),
                });
            };
            sections.push(Section {
                name: name.trim().to_owned(),
                line: n + 1,
                ..Section::default()
            });
            continue;
        }
        let Some(section) = sections.last_mut() else {
            return Err(Error::Syntax {
                line: n + 1,
                message: format!("{line:?} comes before any [section]"),
            });
        };
        match line.split_once('=') {
            Some((key, value)) => {
                section.keys.insert(
                    key.trim().to_ascii_lowercase(),
                    (value.trim().to_owned(), n + 1),
                );
            }
            None => section.flags.push((line.to_owned(), n + 1)),
        }
    }
    Ok(sections)
}

/// A knockd sequence: `7000,8000:udp,9000:tcp`.
fn sequence(text: &str) -> Result<Vec<KnockPort>, String> {
    text.split(',')
        .map(|item| {
            let item = item.trim();
            let (port, proto) = match item.split_once(':') {
                Some((port, proto)) => (port, proto.trim().to_ascii_lowercase()),
                None => (item, "tcp".to_owned()),
            };
            let port: u16 = port
                .trim()
                .parse()
                .map_err(|_| format!("{item:?} is not a port"))?;
            if port == 0 {
                return Err(format!("{item:?}: port 0 cannot be knocked on"));
            }
            let proto = match proto.as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                other => return Err(format!("{item:?}: protocol {other:?} is not tcp or udp")),
            };
            Ok(KnockPort { port, proto })
        })
        .collect()
}

/// Port numbers by service name, as /etc/services has them.
pub type Services = BTreeMap<String, u16>;

/// Reads /etc/services (its TCP entries and their aliases).
pub fn read_services(text: &str) -> Services {
    let mut services = Services::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("");
        let mut words = line.split_whitespace();
        let (Some(name), Some(port_proto)) = (words.next(), words.next()) else {
            continue;
        };
        let Some((port, "tcp")) = port_proto.split_once('/') else {
            continue;
        };
        let Ok(port) = port.parse::<u16>() else {
            continue;
        };
        for name in std::iter::once(name).chain(words) {
            services.entry(name.to_owned()).or_insert(port);
        }
    }
    services
}

/// What a section's command does to the firewall.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Effect {
    /// Opens `ports` of `proto`: to the knocking source, or (`everyone`,
    /// a rule that does not name `%IP%`) to all.
    Opens {
        ports: Vec<u16>,
        proto: Proto,
        everyone: bool,
    },
    /// Takes access away (a "close" section).
    Closes,
    /// Not a firewall rule this import reads.
    Other,
}

/// A port word: a number, or a service name.
fn port_of(word: &str, services: &Services) -> Result<u16, String> {
    let word = word.trim_matches(|c| c == ',' || c == ';' || c == '}' || c == '"');
    match word.parse::<u16>() {
        Ok(0) => Err("port 0".into()),
        Ok(port) => Ok(port),
        Err(_) if word.contains(':') || word.contains('-') => {
            Err(format!("port range {word:?}: a knockd door opens one port"))
        }
        Err(_) => services
            .get(word)
            .copied()
            .ok_or_else(|| format!("{word:?} is not a port or a service /etc/services names")),
    }
}

/// Reads a knockd command: which firewall tool, whether it opens or
/// closes, and what.
fn effect(command: &str, services: &Services) -> Result<Effect, String> {
    let words: Vec<&str> = command.split_whitespace().collect();
    let has = |w: &str| words.contains(&w);
    let tool = |name: &str| words.iter().any(|w| w.rsplit('/').next() == Some(name));
    let after = |keys: &[&str]| -> Option<&str> {
        words
            .iter()
            .position(|w| keys.contains(w))
            .and_then(|i| words.get(i + 1).copied())
    };
    let udp = after(&["-p", "--protocol"]).is_some_and(|p| p.eq_ignore_ascii_case("udp"))
        || has("udp")
        || words.iter().any(|w| w.ends_with("/udp"));
    let proto = if udp { Proto::Udp } else { Proto::Tcp };
    let everyone = !command.contains("%IP%");
    let one = |port: Result<u16, String>| -> Result<Vec<u16>, String> { port.map(|p| vec![p]) };
    if tool("iptables") || tool("ip6tables") {
        let deleting = has("-D") || has("--delete");
        let dropping = matches!(after(&["-j", "--jump"]), Some("DROP" | "REJECT"));
        if deleting == dropping {
            // Appends an accept, or deletes a drop: access given.
            let ports = if let Some(list) = after(&["--dports", "--destination-ports"]) {
                list.split(',')
                    .map(|p| port_of(p, services))
                    .collect::<Result<Vec<_>, _>>()?
            } else if let Some(port) = words.iter().find_map(|w| w.strip_prefix("--dport=")) {
                one(port_of(port, services))?
            } else if let Some(port) = after(&["--dport", "--destination-port"]) {
                one(port_of(port, services))?
            } else if !everyone {
                return Err(
                    "it opens every port to the knocking source (its rule names no \
                     --dport): a knockd door opens one service port, so write one door per \
                     service"
                        .into(),
                );
            } else {
                return Err(
                    "an iptables rule without --dport: which port it opens is unclear".into(),
                );
            };
            return Ok(Effect::Opens {
                ports,
                proto,
                everyone,
            });
        }
        return Ok(Effect::Closes);
    }
    if tool("ufw") {
        let deleting = has("delete");
        let allowing = has("allow");
        if deleting == allowing {
            return Ok(Effect::Closes);
        }
        let port = match after(&["port"]) {
            Some(port) => port.to_owned(),
            // `ufw allow 2222/tcp`, `ufw allow ssh`.
            None => match after(&["allow"]) {
                Some(spec) if spec != "from" && spec != "proto" && spec != "in" => {
                    spec.split('/').next().unwrap_or(spec).to_owned()
                }
                _ => return Err("a ufw rule without a port".into()),
            },
        };
        return Ok(Effect::Opens {
            ports: one(port_of(&port, services))?,
            proto,
            everyone,
        });
    }
    if tool("nft") {
        if has("delete") || has("destroy") || (has("drop") || has("reject")) && !has("accept") {
            return Ok(Effect::Closes);
        }
        if let Some(port) = after(&["dport"]) {
            return Ok(Effect::Opens {
                ports: one(port_of(port, services))?,
                proto,
                everyone,
            });
        }
        // An element of a concatenated set: `{ %IP% . 22 }`.
        if let Some(i) = words.iter().position(|w| w.contains("%IP%"))
            && words.get(i + 1) == Some(&".")
            && let Some(port) = words.get(i + 2)
        {
            return Ok(Effect::Opens {
                ports: one(port_of(port, services))?,
                proto,
                everyone,
            });
        }
        return Err("an nft command without a port this import reads".into());
    }
    if tool("knock_add") {
        return match after(&["-d"]) {
            Some(port) => Ok(Effect::Opens {
                ports: one(port_of(port, services))?,
                proto,
                everyone,
            }),
            None => Err("knock_add without -d PORT".into()),
        };
    }
    if tool("firewall-cmd") {
        if words.iter().any(|w| w.starts_with("--remove")) {
            return Ok(Effect::Closes);
        }
        if let Some(spec) = words.iter().find_map(|w| w.strip_prefix("--add-port=")) {
            let (port, proto) = spec.split_once('/').unwrap_or((spec, "tcp"));
            return Ok(Effect::Opens {
                ports: one(port_of(port, services))?,
                proto: if proto == "udp" {
                    Proto::Udp
                } else {
                    Proto::Tcp
                },
                everyone,
            });
        }
        if let Some(i) = words
            .iter()
            .position(|w| w.contains("port=\"") || w.contains("port="))
            && let Some(port) = words[i].split("port=").nth(1)
        {
            return Ok(Effect::Opens {
                ports: one(port_of(port, services))?,
                proto,
                everyone,
            });
        }
        return Err("a firewall-cmd rule without a port".into());
    }
    Ok(Effect::Other)
}

/// A door name from a section name: knockd allows any, knockd here a plain
/// alphabet of at most 32.
fn door_name(section: &str) -> String {
    let name: String = section
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .take(32)
        .collect();
    if is_valid_name(&name, 32) {
        name
    } else {
        "door".to_owned()
    }
}

/// `name`, or `name_2`, `name_3`... : the first no door has.
fn unique_name(name: String, taken: &BTreeMap<String, String>) -> String {
    if !taken.contains_key(&name) {
        return name;
    }
    (2..)
        .map(|n| {
            let suffix = format!("_{n}");
            let stem: String = name.chars().take(32 - suffix.len()).collect();
            format!("{stem}{suffix}")
        })
        .find(|candidate| !taken.contains_key(candidate))
        .expect("some suffix is free")
}

/// The configuration's text: the header, the interface and `doors`.
fn render(source: &str, interface: &str, doors: &BTreeMap<String, String>) -> String {
    let mut yaml = format!(
        "# Imported from {source} by `knockctl import`. Static doors replay like\n\
         # classic knockd's: prefer one-time doors once clients can use them.\n\
         interfaces: [{interface}]\n"
    );
    if doors.is_empty() {
        yaml.push_str("doors: {}\n");
        return yaml;
    }
    yaml.push_str("doors:\n");
    for (name, door) in doors {
        yaml.push_str(&format!("  {name}:\n{door}"));
    }
    yaml
}

/// Turns `text`, a knockd.conf, into a knockd configuration; `services`
/// resolves service names in commands ([`read_services`]).
pub fn import(text: &str, source: &str, services: &Services) -> Result<Imported, Error> {
    let sections = parse(text)?;
    let mut general = Vec::new();
    let mut interface = None;
    for section in sections
        .iter()
        .filter(|s| s.name.eq_ignore_ascii_case("options"))
    {
        let at = |line: usize| format!("line {line} [{}]", section.name);
        for (key, (value, line)) in &section.keys {
            match key.as_str() {
                "interface" => {
                    let name = value.trim_matches('"');
                    let valid = !name.is_empty()
                        && Config::parse(
                            &render(source, name, &BTreeMap::new()),
                            Path::new("(imported)"),
                        )
                        .is_ok();
                    if valid {
                        interface = Some(name.to_owned());
                    } else if !name.is_empty() {
                        general.push(format!(
                            "{}: Interface {value:?} is not an interface name; ignored",
                            at(*line)
                        ));
                    }
                }
                "logfile" | "pidfile" => general.push(format!(
                    "{}: {key} not carried over: knockd logs to stderr or the journal, and \
                     runs under systemd",
                    at(*line)
                )),
                other if OPTION_KEYS.contains(&other) => {}
                other => general.push(format!(
                    "{}: option {other:?} is not one classic knockd knows (it refuses the \
                     file); ignored",
                    at(*line)
                )),
            }
        }
        for (flag, line) in &section.flags {
            general.push(format!(
                "{}: {flag} not carried over: knockd logs to stderr or, under systemd, the \
                 journal",
                at(*line)
            ));
        }
    }
    let interface = match interface {
        Some(name) => name,
        None => {
            general.push(
                "interfaces: knockd.conf names no Interface; eth0 written, as classic knockd's \
                 default: check it"
                    .into(),
            );
            "eth0".to_owned()
        }
    };
    let mut doors: BTreeMap<String, String> = BTreeMap::new();
    let mut knock_ports: BTreeMap<KnockPort, String> = BTreeMap::new();
    let mut reports = Vec::new();
    for section in sections
        .iter()
        .filter(|s| !s.name.eq_ignore_ascii_case("options"))
    {
        let mut report = Report {
            section: section.name.clone(),
            line: section.line,
            door: None,
            notes: Vec::new(),
        };
        match door(section, services, &knock_ports, &mut report.notes) {
            // What it would have become no longer matters: only why not.
            Err(why) => report.notes = vec![why],
            Ok((door, knocks)) => {
                let name = unique_name(door_name(&section.name), &doors);
                if name != section.name {
                    report.notes.push(format!("door named {name:?}"));
                }
                // Checked with the doors before it: the configuration
                // written is one knockd takes.
                let mut with = doors.clone();
                with.insert(name.clone(), door);
                match Config::parse(&render(source, &interface, &with), Path::new("(imported)")) {
                    Ok(_) => {
                        for knock in knocks {
                            knock_ports.insert(knock, section.name.clone());
                        }
                        doors = with;
                        report.door = Some(name);
                    }
                    Err(e) => {
                        report.notes = vec![format!(
                            "knockd cannot express it: {}",
                            crate::error_chain(&e)
                        )]
                    }
                }
            }
        }
        reports.push(report);
    }
    Ok(Imported {
        yaml: render(source, &interface, &doors),
        general,
        doors: doors.len(),
        reports,
    })
}

/// One section as a door's YAML, with its knocks; or why it cannot be.
/// Notes on what changed go to `notes`.
fn door(
    section: &Section,
    services: &Services,
    knock_ports: &BTreeMap<KnockPort, String>,
    notes: &mut Vec<String>,
) -> Result<(String, Vec<KnockPort>), String> {
    if let Some((key, (_, line))) = section
        .keys
        .iter()
        .find(|(k, _)| !SECTION_KEYS.contains(&k.as_str()))
    {
        return Err(format!(
            "line {line}: {key:?} is not a key classic knockd knows, and it refuses the file: \
             a misspelling (fix it and import again) or another port knocker's key"
        ));
    }
    if let Some((flag, line)) = section.flags.first() {
        return Err(format!("line {line}: {flag:?} is not `key = value`"));
    }
    let Some(text) = section.get("sequence") else {
        if section.keys.contains_key("one_time_sequences") {
            return Err(
                "one_time_sequences cannot be carried over: use a one-time door instead \
                 (per-device keys, time-based sequences: `knockctl device add`)"
                    .into(),
            );
        }
        return Err("no sequence".into());
    };
    let knocks = match sequence(text) {
        Ok(knocks) if !knocks.is_empty() => knocks,
        Ok(_) => return Err("empty sequence".into()),
        Err(e) => return Err(format!("sequence: {e}")),
    };
    let command = section
        .get("start_command")
        .or_else(|| section.get("command"))
        .unwrap_or_default();
    // What the command does decides first: a section that takes access
    // away is skipped for that, whatever its knocks.
    let opens = match effect(command, services) {
        Ok(Effect::Opens {
            ports,
            proto,
            everyone,
        }) => match ports.as_slice() {
            [port] => Some((*port, proto, everyone)),
            _ => {
                return Err(format!(
                    "it opens several ports ({ports:?}): a knockd door opens one service port; \
                     write one door per port"
                ));
            }
        },
        Ok(Effect::Closes) => {
            return Err(format!(
                "its command takes access away ({command:?}): knockd's grants close on their \
                 own after open_for_secs, and connections already made stay"
            ));
        }
        Ok(Effect::Other) if command.is_empty() => return Err("no command".into()),
        Ok(Effect::Other) => None,
        Err(why) => return Err(format!("{why} ({command:?})")),
    };
    if let Some((key, knock)) = shared_knock(&knocks, knock_ports) {
        return Err(format!(
            "knock port {key} is [{knock}]'s too: classic knockd shares knock ports between \
             sections, knockd judges each knock port for one door; give this section ports \
             of its own"
        ));
    }
    let seq_timeout = seq_timeout(section, notes)?;
    let door = match opens {
        Some((port, proto, everyone)) => service_door(
            section,
            command,
            (port, proto, everyone),
            &knocks,
            seq_timeout,
            notes,
        )?,
        None => action_door(section, command, &knocks, seq_timeout, notes)?,
    };
    if let Some(flags) = section.get("tcpflags")
        && !flags.eq_ignore_ascii_case("syn")
    {
        notes.push(format!(
            "tcpflags {flags:?} not carried over: a TCP knock is a bare SYN"
        ));
    }
    if section.keys.contains_key("target") {
        notes.push("target not carried over: knockd listens on its interfaces".into());
    }
    Ok((door, knocks))
}

/// A section whose command opens `port` of `proto` (to everyone when the
/// rule names no %IP%), as a static door on that service port: knockd
/// opens it itself, so the command is not run.
fn service_door(
    section: &Section,
    command: &str,
    (port, proto, everyone): (u16, Proto, bool),
    knocks: &[KnockPort],
    seq_timeout: u32,
    notes: &mut Vec<String>,
) -> Result<String, String> {
    let mut door = format!("    mode: static\n    service_port: {port}\n");
    if proto == Proto::Udp {
        door.push_str("    service_protocol: udp\n");
    }
    door.push_str(&knocks_yaml(knocks, seq_timeout));
    match section.get("stop_command") {
        Some(stop) => {
            let secs = cmd_timeout(section)?;
            door.push_str(&format!("    open_for_secs: {secs}\n"));
            notes.push(format!(
                "stop_command after {secs} s became open_for_secs: {secs}, the time the port \
                 admits new connections ({stop:?} not run: the grant ends by itself, and \
                 connections made stay)"
            ));
        }
        None => notes.push(
            "no stop_command: classic knockd left the port open until something closed it; a \
             grant here admits new connections for open_for_secs (30 s), and connections \
             made stay"
                .into(),
        ),
    }
    notes.push(match proto {
        Proto::Tcp => format!(
            "command not run ({command:?}): knockd opens TCP port {port} for the knocking \
             source itself, in XDP and nftables"
        ),
        Proto::Udp => format!(
            "command not run ({command:?}): a UDP door; knockd opens UDP port {port} for the \
             knocking source itself, in nftables, and flows it let in carry on after \
             open_for_secs until they go quiet or are revoked"
        ),
    });
    if everyone {
        notes.push(format!(
            "its rule opened port {port} to everyone once anyone knocked (it names no %IP%); \
             knockd opens it to the knocking source only"
        ));
    }
    Ok(door)
}

/// The first of `knocks` another section's door knocks on already, with
/// that section.
fn shared_knock<'a>(
    knocks: &[KnockPort],
    taken: &'a BTreeMap<KnockPort, String>,
) -> Option<(KnockPort, &'a str)> {
    knocks
        .iter()
        .find_map(|k| taken.get(k).map(|other| (*k, other.as_str())))
}

/// The section's `seq_timeout`, or classic knockd's default (said so).
fn seq_timeout(section: &Section, notes: &mut Vec<String>) -> Result<u32, String> {
    match section.get("seq_timeout") {
        Some(t) => t
            .parse::<u32>()
            .map_err(|_| format!("seq_timeout {t:?} is not a number of seconds")),
        None => {
            notes.push(format!(
                "seq_timeout: classic knockd's default, {SEQ_TIMEOUT_SECS} s, written"
            ));
            Ok(SEQ_TIMEOUT_SECS)
        }
    }
}

/// The section's `cmd_timeout`, or classic knockd's default.
fn cmd_timeout(section: &Section) -> Result<u32, String> {
    match section.get("cmd_timeout") {
        Some(t) => t
            .parse::<u32>()
            .map_err(|_| format!("cmd_timeout {t:?} is not a number of seconds")),
        None => Ok(CMD_TIMEOUT_SECS),
    }
}

/// A static door's `sequence` and `seq_timeout_secs` lines.
fn knocks_yaml(knocks: &[KnockPort], seq_timeout: u32) -> String {
    format!(
        "    sequence: [{}]\n    seq_timeout_secs: {seq_timeout}\n",
        knocks
            .iter()
            .map(|k| format!("\"{k}\""))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// A classic command as a hook's argv: run by the shell, as classic
/// knockd runs it (system(3)), written as a YAML block list indented for
/// a door's `hooks:`.
fn shell_hook(command: &str) -> String {
    let argv = ["/bin/sh", "-c", command];
    let list = serde_yaml::to_string(&argv).expect("a list of strings serialises");
    list.lines().map(|line| format!("      {line}\n")).collect()
}

/// A section whose command is not a firewall rule, as an action door: no
/// service port, the start command as `hooks.on_open` and the stop
/// command (after `cmd_timeout`) as `hooks.on_close`.
fn action_door(
    section: &Section,
    command: &str,
    knocks: &[KnockPort],
    seq_timeout: u32,
    notes: &mut Vec<String>,
) -> Result<String, String> {
    let mut door = format!("    mode: static\n{}", knocks_yaml(knocks, seq_timeout));
    // The stop command, and when it runs (classic knockd's cmd_timeout).
    let stop = match section.get("stop_command").filter(|c| !c.is_empty()) {
        Some(stop) => Some((stop, cmd_timeout(section)?)),
        None => None,
    };
    if let Some((_, secs)) = stop {
        door.push_str(&format!("    open_for_secs: {secs}\n"));
    }
    door.push_str("    hooks:\n      user: root\n      on_open:\n");
    door.push_str(&shell_hook(command));
    notes.push(format!(
        "its command is not a firewall rule ({command:?}): an action door, which opens no \
         port and runs it as hooks.on_open on each sequence, through /bin/sh as root as \
         classic knockd did (set hooks.user to a less privileged user if the command allows)"
    ));
    if let Some((stop, secs)) = stop {
        door.push_str("      on_close:\n");
        door.push_str(&shell_hook(stop));
        notes.push(format!(
            "stop_command ({stop:?}) runs as hooks.on_close, {secs} s after the last sequence \
             (cmd_timeout)"
        ));
    }
    notes.push(
        "a hook is killed after hooks.timeout_secs (10 s), where classic knockd waited; under \
         the shipped systemd unit hooks need a drop-in (README: Hooks)"
            .into(),
    );
    Ok(door)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    /// Every note `expected` names is among the import's lines.
    #[track_caller]
    fn assert_notes(imported: &Imported, expected: &[&str]) {
        let notes = imported.notes().join("\n");
        for expected in expected {
            assert!(notes.contains(expected), "{expected:?} in:\n{notes}");
        }
    }

    /// A static door's sequence, as text.
    fn knocks(config: &Config, door: &str) -> Vec<String> {
        let door = config.doors[door].static_door().unwrap();
        door.sequence.iter().map(|k| k.to_string()).collect()
    }

    fn services() -> Services {
        read_services("ssh\t\t22/tcp\nhttps\t\t443/tcp\t\t# http over TLS\nhttps 443/udp\n")
    }

    /// Imports `text` and parses what it wrote.
    fn imported(text: &str) -> (Imported, Config) {
        let imported = import(text, "knockd.conf", &services()).unwrap();
        let config = Config::parse(&imported.yaml, Path::new("imported.yaml"))
            .unwrap_or_else(|e| panic!("{e}\n{}", imported.yaml));
        (imported, config)
    }

    /// The report of section `name`.
    fn report<'a>(imported: &'a Imported, name: &str) -> &'a Report {
        imported
            .reports
            .iter()
            .find(|r| r.section == name)
            .unwrap_or_else(|| panic!("no report of [{name}]"))
    }

    /// Debian's stock /etc/knockd.conf.
    const DEBIAN: &str = "[options]\n\tUseSyslog\n\n\
        [openSSH]\n\tsequence    = 7000,8000,9000\n\tseq_timeout = 5\n\
        \tcommand     = /sbin/iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n\
        \ttcpflags    = syn\n\n\
        [closeSSH]\n\tsequence    = 9000,8000,7000\n\tseq_timeout = 5\n\
        \tcommand     = /sbin/iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n\
        \ttcpflags    = syn\n\n\
        [openHTTPS]\n\tsequence    = 12345,54321,24680,13579\n\tseq_timeout = 5\n\
        \tcommand     = /usr/local/sbin/knock_add -i -c INPUT -p tcp -d 443 -f %IP%\n\
        \ttcpflags    = syn\n";

    #[test]
    fn debians_stock_config_becomes_two_static_doors() {
        let (imported, config) = imported(DEBIAN);
        assert_eq!(imported.doors, 2);
        assert_eq!(config.doors["openSSH"].service_port, Some(22));
        assert_eq!(
            knocks(&config, "openSSH"),
            ["7000:tcp", "8000:tcp", "9000:tcp"]
        );
        let ssh = config.doors["openSSH"].static_door().unwrap();
        assert_eq!(ssh.seq_timeout_secs, 5);
        assert_eq!(config.doors["openHTTPS"].service_port, Some(443));
        assert_eq!(report(&imported, "closeSSH").door, None);
        assert_notes(
            &imported,
            &[
                "line 10 [closeSSH]: skipped\n  its command takes access away",
                "UseSyslog not carried over",
                "line 4 [openSSH]: imported as door openSSH",
                "names no Interface",
            ],
        );
    }

    #[test]
    fn classic_defaults_carry_over() {
        let (imported, config) = imported(
            "[ssh]\n sequence = 1111,2222\n \
             start_command = iptables -I INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n \
             stop_command = iptables -D INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n\
             [web]\n sequence = 3333\n cmd_timeout = 60\n \
             command = iptables -A INPUT -s %IP% -p tcp --dport 443 -j ACCEPT\n",
        );
        let ssh = &config.doors["ssh"];
        assert_eq!(ssh.static_door().unwrap().seq_timeout_secs, 25);
        assert_eq!(
            ssh.open_for_secs, 10,
            "cmd_timeout's default, with a stop_command"
        );
        let web = &config.doors["web"];
        assert_eq!(
            web.open_for_secs, 30,
            "no stop_command: classic never closes; cmd_timeout is unused"
        );
        assert_notes(
            &imported,
            &[
                "seq_timeout: classic knockd's default, 25 s",
                "stop_command after 10 s became open_for_secs: 10",
                "no stop_command: classic knockd left the port open",
            ],
        );
    }

    #[test]
    fn a_udp_service_becomes_a_udp_door() {
        let (imported, config) = imported(
            "[wireguard]\n sequence = 4000,5000\n \
             command = iptables -I INPUT -s %IP% -p udp --dport 51820 -j ACCEPT\n\
             [openvpn]\n sequence = 4001,5001\n command = ufw allow from %IP% to any port 1194 proto udp\n",
        );
        assert_eq!(imported.doors, 2);
        let door = &config.doors["wireguard"];
        assert_eq!(door.service_port, Some(51820));
        assert_eq!(door.service_protocol, Proto::Udp, "not a TCP door");
        assert_eq!(door.udp_service_port(), Some(51820));
        assert_eq!(config.doors["openvpn"].service_protocol, Proto::Udp);
        assert_notes(&imported, &["a UDP door; knockd opens UDP port 51820"]);
    }

    #[test]
    fn names_never_collide() {
        let text = "[open]\n sequence = 1001\n command = iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n\
                    [open]\n sequence = 1002\n command = iptables -A INPUT -s %IP% -p tcp --dport 80 -j ACCEPT\n\
                    [open ssh]\n sequence = 1003\n command = iptables -A INPUT -s %IP% -p tcp --dport 443 -j ACCEPT\n\
                    [open+ssh]\n sequence = 1004\n command = iptables -A INPUT -s %IP% -p tcp --dport 8443 -j ACCEPT\n";
        let (imported, config) = imported(text);
        assert_eq!(imported.doors, 4);
        let ports: Vec<u16> = ["open", "open_2", "open_ssh", "open_ssh_2"]
            .iter()
            .filter_map(|d| config.doors[*d].service_port)
            .collect();
        assert_eq!(ports, [22, 80, 443, 8443]);
    }

    #[test]
    fn shared_knock_ports_and_a_knock_on_a_service_port_are_refused_with_reasons() {
        let text = "[a]\n sequence = 7000,8000\n command = iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n\
                    [b]\n sequence = 8000,9000\n command = iptables -A INPUT -s %IP% -p tcp --dport 80 -j ACCEPT\n\
                    [c]\n sequence = 443,9500\n command = iptables -A INPUT -s %IP% -p tcp --dport 443 -j ACCEPT\n\
                    [d]\n sequence = 0,1\n command = iptables -A INPUT -s %IP% -p tcp --dport 81 -j ACCEPT\n";
        let (imported, config) = imported(text);
        assert_eq!(config.doors.keys().collect::<Vec<_>>(), ["a"]);
        assert_notes(
            &imported,
            &[
                "line 4 [b]: skipped\n  knock port 8000:tcp is [a]'s too",
                "line 7 [c]: skipped\n  knockd cannot express it",
                "line 10 [d]: skipped\n  sequence: \"0\": port 0",
            ],
        );
    }

    #[test]
    fn a_misspelt_key_is_refused_with_its_line() {
        let (imported, _) = imported(
            "[options]\n interface = \"\"\n\
             [ssh]\n sequence = 1,2\n seq_timout = 5\n \
             command = iptables -A INPUT -s %IP% -p tcp --dport 22 -j ACCEPT\n",
        );
        assert_eq!(imported.doors, 0);
        assert_notes(
            &imported,
            &[
                "line 3 [ssh]: skipped\n  line 5: \"seq_timout\" is not a key classic knockd knows",
                "eth0 written",
            ],
        );
    }

    #[test]
    fn common_command_shapes_are_read() {
        let cases = [
            (
                "iptables -A INPUT -s %IP% -p tcp --dport ssh -j ACCEPT",
                Some(22),
            ),
            (
                "iptables -A INPUT -s %IP% -p tcp --dport=2200 -j ACCEPT",
                Some(2200),
            ),
            ("/usr/sbin/ufw allow from %IP% to any port 22", Some(22)),
            ("ufw allow 2222/tcp", Some(2222)),
            ("ufw allow https", Some(443)),
            (
                "nft add element inet filter allowed { %IP% . 22 }",
                Some(22),
            ),
            (
                "nft add rule inet filter input ip saddr %IP% tcp dport 8022 accept",
                Some(8022),
            ),
            ("iptables -D INPUT -p tcp --dport 22 -j DROP", Some(22)),
            ("firewall-cmd --zone=public --add-port=2022/tcp", Some(2022)),
            (
                "/usr/local/sbin/knock_add -i -c INPUT -p tcp -d 443 -f %IP%",
                Some(443),
            ),
            (
                "iptables -A INPUT -s %IP% -p tcp -m multiport --dports 80,443 -j ACCEPT",
                None,
            ),
            ("iptables -I INPUT -p tcp --dport 22 -j DROP", None),
            ("ufw delete allow from %IP% to any port 22", None),
            ("nft delete element inet filter allowed { %IP% . 22 }", None),
            (
                "iptables -A INPUT -s %IP% -p tcp --dport nosuchservice -j ACCEPT",
                None,
            ),
        ];
        for (n, (command, port)) in cases.iter().enumerate() {
            let text = format!("[s]\n sequence = {}\n command = {command}\n", 1000 + n);
            let (imported, config) = imported(&text);
            let got = config.doors.get("s").and_then(|d| d.service_port);
            assert_eq!(got, *port, "{command}: {:?}", imported.notes());
            if port.is_none() {
                assert!(
                    !report(&imported, "s").notes.is_empty(),
                    "{command}: a reason"
                );
            }
        }
    }

    #[test]
    fn a_file_with_nothing_to_import_reports_every_section() {
        let (imported, config) = imported(
            "[options]\n logfile = /var/log/knockd.log\n\
             [a]\n sequence = 1\n command = ufw delete allow from %IP% to any port 22\n\
             [otp]\n one_time_sequences = /etc/knockd/otp\n",
        );
        assert!(config.doors.is_empty());
        assert_eq!(imported.reports.len(), 2);
        assert_notes(
            &imported,
            &[
                "line 2 [options]: logfile not carried over",
                "line 3 [a]: skipped\n  its command takes access away",
                "line 6 [otp]: skipped\n  one_time_sequences cannot be carried over",
            ],
        );
        assert!(matches!(
            import("sequence = 1\n", "f", &Services::new()).unwrap_err(),
            Error::Syntax { line: 1, .. }
        ));
    }

    #[test]
    fn a_section_that_runs_something_else_becomes_an_action_door() {
        let wake = r#"/usr/bin/wakeonlan -i 198.18.0.255 "00:11:22:33:44:55" # game box"#;
        let text = format!(
            "[wake]\n sequence = 7001:udp,7002:udp\n seq_timeout = 15\n cmd_timeout = 600\n \
             start_command = {wake}\n stop_command = /usr/local/bin/sleep-box %IP%\n\
             [hello]\n sequence = 7003\n command = echo knocked by %IP% >> /var/log/knocks\n"
        );
        let (imported, config) = imported(&text);
        assert_eq!(imported.doors, 2);
        let door = &config.doors["wake"];
        assert_eq!(door.service_port, None, "an action door opens no port");
        assert_eq!(door.open_for_secs, 600, "cmd_timeout: when the stop runs");
        assert_eq!(door.static_door().unwrap().seq_timeout_secs, 15);
        let hooks = door.hooks.as_ref().unwrap();
        assert_eq!(hooks.on_open, ["/bin/sh", "-c", wake], "quotes and # kept");
        assert_eq!(
            hooks.on_close,
            ["/bin/sh", "-c", "/usr/local/bin/sleep-box %IP%"]
        );
        assert_eq!(hooks.user, "root", "as classic knockd ran it");
        let hello = &config.doors["hello"];
        assert_eq!(hello.open_for_secs, 30, "no stop: the default");
        assert!(hello.hooks.as_ref().unwrap().on_close.is_empty());
        assert_notes(
            &imported,
            &[
                "line 1 [wake]: imported as door wake\n  its command is not a firewall rule",
                "stop_command (\"/usr/local/bin/sleep-box %IP%\") runs as hooks.on_close, 600 s",
                "line 7 [hello]: imported as door hello\n  seq_timeout: classic knockd's default",
            ],
        );
    }

    #[test]
    fn protocols_timeouts_and_flags() {
        let text = "[options]\n Interface = ens3\n\
            [open web]\n sequence = 2222:udp,3333:tcp,4444\n cmd_timeout = 20\n \
            start_command = nft add element inet filter allow { %IP% . 8443 }\n \
            stop_command = nft delete element inet filter allow { %IP% . 8443 }\n tcpflags = syn,ack\n";
        let (imported, config) = imported(text);
        assert_eq!(config.interfaces, ["ens3"]);
        let web = &config.doors["open_web"];
        assert_eq!(web.service_port, Some(8443));
        assert_eq!(web.open_for_secs, 20);
        assert_eq!(
            knocks(&config, "open_web"),
            ["2222:udp", "3333:tcp", "4444:tcp"]
        );
        assert_notes(
            &imported,
            &[
                "door named \"open_web\"",
                "stop_command after 20 s became open_for_secs: 20",
                "tcpflags \"syn,ack\" not carried over",
            ],
        );
    }
}
