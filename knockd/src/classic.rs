//! Migration from classic knockd: its `knockd.conf` turned into static
//! doors (`knockctl import`).
//!
//! What carries over: each section's `sequence` (ports, `:udp`/`:tcp`,
//! TCP by default, as knockd reads them), `seq_timeout`, `cmd_timeout` (as
//! the time a grant admits new connections), the `Interface` option, and
//! the service port, read from the section's command (`--dport 22`,
//! `-d 443`). What cannot, and is said so: the shell commands themselves
//! (knockd opens the service port for the knocking source on its own),
//! sections whose command takes access away (knockd's grants close by
//! themselves), `one_time_sequences` files, `target`, and TCP flags other
//! than a bare SYN.

use std::collections::BTreeMap;

use crate::config::{KnockPort, Proto, is_valid_name};

/// One section of a knockd.conf: its keys, lower-cased, and their values.
#[derive(Debug, Default)]
struct Section {
    name: String,
    keys: BTreeMap<String, String>,
    /// Flags without a value (`UseSyslog`).
    flags: Vec<String>,
    line: usize,
}

/// The result of an import: the configuration's YAML and what the
/// operator must know (what was guessed, what could not be carried over).
#[derive(Debug)]
pub struct Imported {
    pub yaml: String,
    pub notes: Vec<String>,
    pub doors: usize,
}

/// Why a knockd.conf could not be read at all.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("line {line}: {message}")]
    Syntax { line: usize, message: String },
    #[error("no section with a sequence: nothing to import")]
    Empty,
}

fn parse(text: &str) -> Result<Vec<Section>, Error> {
    let mut sections: Vec<Section> = Vec::new();
    for (n, raw) in text.lines().enumerate() {
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
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
                section
                    .keys
                    .insert(key.trim().to_ascii_lowercase(), value.trim().to_owned());
            }
            None => section.flags.push(line.to_owned()),
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
            let proto = match proto.as_str() {
                "tcp" => Proto::Tcp,
                "udp" => Proto::Udp,
                other => return Err(format!("{item:?}: protocol {other:?} is not tcp or udp")),
            };
            Ok(KnockPort { port, proto })
        })
        .collect()
}

/// The service port a knockd command opens: `--dport 22`, `--dport=22`,
/// `dport 22` (nft) or `-d 443` (knock_add).
fn service_port(command: &str) -> Option<u16> {
    let words: Vec<&str> = command.split_whitespace().collect();
    for (i, word) in words.iter().enumerate() {
        if let Some(port) = word.strip_prefix("--dport=") {
            return port.parse().ok();
        }
        if matches!(*word, "--dport" | "dport" | "-d" | "--destination-port")
            && let Some(port) = words.get(i + 1).and_then(|p| p.parse().ok())
        {
            return Some(port);
        }
    }
    None
}

/// Whether a command takes access away (a "close" section).
fn removes_access(command: &str) -> bool {
    let words: Vec<&str> = command.split_whitespace().collect();
    words
        .iter()
        .any(|w| matches!(*w, "-D" | "--delete" | "delete" | "-r"))
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

/// Turns `text`, a knockd.conf, into a knockd configuration.
pub fn import(text: &str, source: &str) -> Result<Imported, Error> {
    let sections = parse(text)?;
    let mut notes = Vec::new();
    let mut interface = None;
    let mut doors: BTreeMap<String, String> = BTreeMap::new();
    let mut taken_ports = BTreeMap::new();
    for section in &sections {
        let at = format!("[{}] (line {})", section.name, section.line);
        if section.name.eq_ignore_ascii_case("options") {
            for (key, value) in &section.keys {
                match key.as_str() {
                    "interface" => interface = Some(value.clone()),
                    "logfile" | "pidfile" => notes.push(format!(
                        "{at}: {key} not carried over: knockd logs to stderr or the journal, and \
                         runs under systemd"
                    )),
                    other => notes.push(format!("{at}: option {other} has no counterpart")),
                }
            }
            for flag in &section.flags {
                notes.push(format!(
                    "{at}: {flag} not carried over: knockd logs to stderr or, under systemd, \
                     the journal"
                ));
            }
            continue;
        }
        let command = ["start_command", "command"]
            .iter()
            .find_map(|k| section.keys.get(*k))
            .cloned()
            .unwrap_or_default();
        let Some(text) = section.keys.get("sequence") else {
            if section.keys.contains_key("one_time_sequences") {
                notes.push(format!(
                    "{at}: one_time_sequences not carried over: use a one-time door instead \
                     (per-device keys, time-based sequences: `knockctl device add`)"
                ));
            } else {
                notes.push(format!("{at}: no sequence; skipped"));
            }
            continue;
        };
        if removes_access(&command) {
            notes.push(format!(
                "{at}: skipped: its command takes access away ({command:?}); knockd's grants \
                 close on their own after open_for_secs, and connections already made stay"
            ));
            continue;
        }
        let knocks = match sequence(text) {
            Ok(knocks) if !knocks.is_empty() => knocks,
            Ok(_) => {
                notes.push(format!("{at}: empty sequence; skipped"));
                continue;
            }
            Err(e) => {
                notes.push(format!("{at}: sequence: {e}; skipped"));
                continue;
            }
        };
        let Some(port) = service_port(&command) else {
            notes.push(format!(
                "{at}: skipped: no service port in its command ({command:?}); knockd opens a \
                 TCP port for the knocking source, so write the door by hand: service_port, \
                 mode: static, sequence"
            ));
            continue;
        };
        if let Some(other) = taken_ports.insert(port, section.name.clone()) {
            notes.push(format!(
                "{at}: skipped: service port {port} is [{other}]'s already (a knockd door \
                 owns its service port)"
            ));
            continue;
        }
        let name = door_name(&section.name);
        if name != section.name {
            notes.push(format!("{at}: door named {name:?}"));
        }
        let mut door = format!(
            "    mode: static\n    service_port: {port}\n    sequence: [{}]\n",
            knocks
                .iter()
                .map(|k| format!("\"{k}\""))
                .collect::<Vec<_>>()
                .join(", ")
        );
        if let Some(timeout) = section.keys.get("seq_timeout") {
            match timeout.parse::<u32>() {
                Ok(secs) => door.push_str(&format!("    seq_timeout_secs: {secs}\n")),
                Err(_) => notes.push(format!("{at}: seq_timeout {timeout:?} is not a number")),
            }
        }
        match section.keys.get("cmd_timeout").map(|t| t.parse::<u32>()) {
            Some(Ok(secs)) => {
                door.push_str(&format!("    open_for_secs: {secs}\n"));
                notes.push(format!(
                    "{at}: cmd_timeout {secs} s became open_for_secs: the time the port admits \
                     new connections (stop_command not carried over: the grant ends by itself)"
                ));
            }
            Some(Err(_)) => notes.push(format!("{at}: cmd_timeout is not a number; ignored")),
            None => {}
        }
        notes.push(format!(
            "{at}: command not carried over ({command:?}): knockd opens TCP port {port} for \
             the knocking source itself, in XDP and nftables"
        ));
        if let Some(flags) = section.keys.get("tcpflags")
            && !flags.eq_ignore_ascii_case("syn")
        {
            notes.push(format!(
                "{at}: tcpflags {flags:?} not carried over: a TCP knock is a bare SYN"
            ));
        }
        for key in ["target", "one_time_sequences"] {
            if section.keys.contains_key(key) {
                notes.push(format!("{at}: {key} not carried over"));
            }
        }
        doors.insert(name, door);
    }
    if doors.is_empty() {
        return Err(Error::Empty);
    }
    let mut yaml = format!(
        "# Imported from {source} by `knockctl import`. Static doors replay like\n\
         # classic knockd's: prefer one-time doors once clients can use them.\n"
    );
    match &interface {
        Some(name) => yaml.push_str(&format!("interfaces: [{name}]\n")),
        None => {
            yaml.push_str(
                "interfaces: [eth0]   # knockd.conf named none (it listened on eth0): check\n",
            );
            notes.push(
                "interfaces: knockd.conf names no Interface; eth0 written, as knockd's default"
                    .into(),
            );
        }
    }
    yaml.push_str("doors:\n");
    for (name, door) in &doors {
        yaml.push_str(&format!("  {name}:\n{door}"));
    }
    Ok(Imported {
        yaml,
        notes,
        doors: doors.len(),
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    /// Every note `expected` names is among `notes`.
    #[track_caller]
    fn assert_notes(notes: &[String], expected: &[&str]) {
        let notes = notes.join("\n");
        for expected in expected {
            assert!(notes.contains(expected), "{expected:?} in:\n{notes}");
        }
    }

    /// A static door's sequence, as text.
    fn knocks(config: &Config, door: &str) -> Vec<String> {
        let door = config.doors[door].static_door().unwrap();
        door.sequence.iter().map(|k| k.to_string()).collect()
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
        let imported = import(DEBIAN, "/etc/knockd.conf").unwrap();
        assert_eq!(imported.doors, 2);
        let config = Config::parse(&imported.yaml, Path::new("imported.yaml")).unwrap();
        assert_eq!(config.doors["openSSH"].service_port, 22);
        assert_eq!(
            knocks(&config, "openSSH"),
            ["7000:tcp", "8000:tcp", "9000:tcp"]
        );
        let ssh = config.doors["openSSH"].static_door().unwrap();
        assert_eq!(ssh.seq_timeout_secs, 5);
        assert_eq!(config.doors["openHTTPS"].service_port, 443);
        assert_notes(
            &imported.notes,
            &[
                "[closeSSH] (line 10): skipped: its command takes access away",
                "UseSyslog not carried over",
                "[openSSH] (line 4): command not carried over",
                "names no Interface",
            ],
        );
    }

    #[test]
    fn protocols_timeouts_and_what_cannot_be_carried() {
        let text = "[options]\n Interface = ens3\n logfile = /var/log/knockd.log\n\
            [open web]\n sequence = 2222:udp,3333:tcp,4444\n cmd_timeout = 20\n\
            start_command = nft add element inet filter allow { %IP% . 8443 } ; \
            dport 8443\n tcpflags = syn,ack\n\
            [mystery]\n sequence = 5555\n command = /usr/local/bin/let-them-in %IP%\n\
            [otp]\n one_time_sequences = /etc/knockd/otp\n";
        let imported = import(text, "knockd.conf").unwrap();
        let config = Config::parse(&imported.yaml, Path::new("imported.yaml")).unwrap();
        assert_eq!(config.interfaces, ["ens3"]);
        let web = &config.doors["open_web"];
        assert_eq!(web.service_port, 8443);
        assert_eq!(web.open_for_secs, 20);
        assert_eq!(
            knocks(&config, "open_web"),
            ["2222:udp", "3333:tcp", "4444:tcp"]
        );
        assert_notes(
            &imported.notes,
            &[
                "logfile not carried over",
                "door named \"open_web\"",
                "cmd_timeout 20 s became open_for_secs",
                "tcpflags \"syn,ack\" not carried over",
                "[mystery] (line 9): skipped: no service port",
                "one_time_sequences not carried over",
            ],
        );
        assert!(matches!(
            import("[a]\n sequence = x\n", "f").unwrap_err(),
            Error::Empty
        ));
        assert!(matches!(
            import("sequence = 1\n", "f").unwrap_err(),
            Error::Syntax { line: 1, .. }
        ));
    }
}
