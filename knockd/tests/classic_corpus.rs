//! `knockctl import` on the corpus of real-world knockd.conf shapes in
//! `tests/classic` (SOURCES.md says where each comes from). Every file
//! either imports to a configuration knockd takes, whose doors match their
//! sections, or is refused section by section with reasons that name
//! lines. The sections are read here by a parser of this test's own, not
//! the importer's, so a misreading in one shows as a difference.

use std::{collections::BTreeMap, path::Path};

use knockd::{
    classic::{self, Services},
    config::{Config, Proto},
};

/// A section as this test reads it: keys lower-cased, the line of its
/// header.
struct Section {
    name: String,
    line: usize,
    keys: BTreeMap<String, String>,
}

fn sections(text: &str) -> Vec<Section> {
    let mut out: Vec<Section> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if line.starts_with('[') && line.ends_with(']') {
            out.push(Section {
                name: line[1..line.len() - 1].trim().to_owned(),
                line: i + 1,
                keys: BTreeMap::new(),
            });
        } else if let (Some(section), Some(eq)) = (out.last_mut(), line.find('=')) {
            section.keys.insert(
                line[..eq].trim().to_lowercase(),
                line[eq + 1..].trim().to_owned(),
            );
        }
    }
    out
}

/// The service port a command names, read the simple way: the number
/// after `--dport`, `port`, `-d` or ` . `.
fn port(command: &str) -> Option<u16> {
    let words: Vec<&str> = command.split_whitespace().collect();
    words.windows(2).find_map(|w| match w[0] {
        "--dport" | "port" | "-d" | "." => w[1].parse().ok(),
        _ => None,
    })
}

/// The firewall tools whose commands become service ports, not hooks.
const FIREWALLS: &[&str] = &["iptables", "ufw ", "nft ", "firewall-cmd", "knock_add"];

/// Which sections of each file become doors (those whose command is not
/// a firewall rule become action doors).
const EXPECTED: &[(&str, &[&str])] = &[
    ("alpine-insert-first.conf", &["openSSH", "openHTTPS"]),
    ("debian-stock.conf", &["openSSH", "openHTTPS"]),
    ("delete-a-drop.conf", &["openSSH"]),
    ("desktop-scripts.conf", &["Open torrent", "Shut down"]),
    ("docker-template.conf", &[]),
    ("empty-interface.conf", &["openSSH", "test_udp"]),
    ("etckeeper-copy.conf", &["openSSH", "openHTTPS"]),
    ("forward-helper.conf", &["openSSH", "internalSSH"]),
    (
        "game-server-resume.conf",
        &["resume-java", "resume-rcon", "resume-bedrock"],
    ),
    ("inline-comment.conf", &["openSSH"]),
    ("lab-other-port.conf", &["opencloseSSH"]),
    ("mixed-case-keys.conf", &["openSSH"]),
    ("netcat-key.conf", &["sendKey"]),
    ("no-indent.conf", &["SSH"]),
    ("open-all-ports-api.conf", &[]),
    ("open-close-one-section.conf", &["opencloseSSH"]),
    ("open-to-everyone.conf", &["open_web"]),
    ("placeholder-template.conf", &[]),
    ("printer-scripts.conf", &["printerOn", "printerOff"]),
    ("repeated-udp-knock.conf", &[]),
    ("start-game-ack.conf", &["startGame"]),
    ("totp-fork-keys.conf", &["openSSH"]),
    ("ufw-open-close.conf", &["openSSH"]),
    ("ufw-start-stop.conf", &["openSSH"]),
    ("ufw-udp-knocks.conf", &["opencloseSSH"]),
    ("vpn-refresh-scripts.conf", &["vpnrefresh", "vpnreboot"]),
    ("whole-host.conf", &[]),
];

#[test]
fn every_corpus_file_imports_faithfully_or_says_why_per_section() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/classic");
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "conf"))
        .collect();
    files.sort();
    assert!(files.len() >= 20, "the corpus holds {} files", files.len());
    let services: Services = classic::read_services("ssh 22/tcp\nhttps 443/tcp\n");
    let sources = std::fs::read_to_string(dir.join("SOURCES.md")).unwrap();
    for file in &files {
        let name = file.file_name().unwrap().to_str().unwrap();
        assert!(sources.contains(name), "{name}: its source is noted");
        let text = std::fs::read_to_string(file).unwrap();
        let imported = classic::import(&text, name, &services).unwrap();
        let notes = imported.notes().join("\n");
        let config = Config::parse(&imported.yaml, Path::new("imported.yaml"))
            .unwrap_or_else(|e| panic!("{name}: {e}\n{}", imported.yaml));
        let expected = EXPECTED
            .iter()
            .find(|(f, _)| *f == name)
            .unwrap_or_else(|| panic!("{name}: not in EXPECTED\n{notes}"))
            .1;
        let doors: Vec<&str> = imported
            .reports
            .iter()
            .filter(|r| r.door.is_some())
            .map(|r| r.section.as_str())
            .collect();
        assert_eq!(doors, expected, "{name}:\n{notes}");
        assert_eq!(config.doors.len(), expected.len(), "{name}");
        let originals = sections(&text);
        for report in &imported.reports {
            let original = originals
                .iter()
                .find(|s| s.name == report.section && s.line == report.line)
                .unwrap_or_else(|| panic!("{name}: [{}] at line {}", report.section, report.line));
            let Some(door_name) = &report.door else {
                assert!(
                    !report.notes.is_empty(),
                    "{name}: [{}] skipped without a reason",
                    report.section
                );
                continue;
            };
            let door = &config.doors[door_name];
            let keys = &original.keys;
            let command = keys
                .get("start_command")
                .or(keys.get("command"))
                .expect("a door has a command");
            match door.service_port {
                Some(_) => {
                    assert_eq!(door.service_port, port(command), "{name}: {command}");
                    let udp = command.contains("-p udp")
                        || command.contains("/udp")
                        || command.contains("proto udp");
                    assert_eq!(
                        door.service_protocol == Proto::Udp,
                        udp,
                        "{name}: {command}"
                    );
                }
                // An action door: a command that is no firewall rule, run
                // as classic knockd ran it, and its stop command at the end.
                None => {
                    assert!(
                        !FIREWALLS.iter().any(|tool| command.contains(tool)),
                        "{name}: {command} became an action door"
                    );
                    let hooks = door.hooks.as_ref().expect("an action door has hooks");
                    assert_eq!(hooks.on_open, ["/bin/sh", "-c", command], "{name}");
                    let on_close: Vec<&str> = keys
                        .get("stop_command")
                        .map(|stop| vec!["/bin/sh", "-c", stop])
                        .unwrap_or_default();
                    assert_eq!(hooks.on_close, on_close, "{name}");
                    assert_eq!(hooks.user, "root", "{name}");
                }
            }
            let knocks: Vec<String> = keys["sequence"]
                .split(',')
                .map(|k| {
                    let k = k.trim().to_lowercase();
                    if k.contains(':') {
                        k
                    } else {
                        format!("{k}:tcp")
                    }
                })
                .collect();
            let door_knocks: Vec<String> = door
                .static_door()
                .unwrap()
                .sequence
                .iter()
                .map(|k| k.to_string())
                .collect();
            assert_eq!(door_knocks, knocks, "{name}: [{}]", report.section);
            let seq_timeout = keys.get("seq_timeout").map_or(25, |t| t.parse().unwrap());
            assert_eq!(
                door.static_door().unwrap().seq_timeout_secs,
                seq_timeout,
                "{name}: [{}]",
                report.section
            );
            let open_for = match keys.get("stop_command") {
                Some(_) => keys.get("cmd_timeout").map_or(10, |t| t.parse().unwrap()),
                None => 30,
            };
            assert_eq!(door.open_for_secs, open_for, "{name}: [{}]", report.section);
        }
    }
}
