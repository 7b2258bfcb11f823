//! End to end: a door's hooks run on the real daemon as the configured
//! user, with the grant's facts, after the grant and never holding it up;
//! a hook that hangs is killed at its timeout and one that fails is
//! counted.

use std::{
    os::unix::fs::PermissionsExt as _,
    time::{Duration, Instant},
};

use knockd::proto::Kind;
use knockd_tests::{bed::Bed, probe::Outcome, require_privileges, wait_for_file};

fn env_of(text: &str, key: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_owned))
}

#[test]
fn hooks_run_as_their_user_with_the_grants_facts_and_never_hold_the_grant() {
    require_privileges!();
    let bed = Bed::new(false);
    let out = tempfile::tempdir().unwrap();
    std::fs::set_permissions(out.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let o = out.path().display();
    let hooks = format!(
        ", open_for_secs: 2, hooks: {{ \
         on_open: [/bin/sh, -c, \"id -u > {o}/open.uid; env > {o}/open.env; sleep 30\"], \
         on_close: [/bin/sh, -c, \"env > {o}/close.env; exit 3\"], \
         user: nobody, timeout_secs: 2 }}"
    );
    let daemon = bed.start(&hooks);
    let socket = bed.socket();
    let answer = bed.knock(&socket, Kind::Open);
    // The open hook sleeps 30 s; the grant is already usable.
    assert_eq!(bed.connect(answer.reply.port).0, Outcome::Answered);
    let env = wait_for_file(&out.path().join("open.env"), 5);
    assert_eq!(env_of(&env, "KNOCKD_EVENT").as_deref(), Some("open"));
    assert_eq!(env_of(&env, "KNOCKD_DOOR").as_deref(), Some("ssh"));
    assert_eq!(env_of(&env, "KNOCKD_DEVICE").as_deref(), Some("laptop"));
    assert_eq!(env_of(&env, "KNOCKD_SOURCE"), Some(bed.client.to_string()));
    assert_eq!(env_of(&env, "KNOCKD_FAMILY").as_deref(), Some("ipv4"));
    assert_eq!(
        env_of(&env, "KNOCKD_PORT"),
        Some(answer.reply.port.to_string())
    );
    assert_eq!(env_of(&env, "HOME"), None, "a clean environment");
    let uid = wait_for_file(&out.path().join("open.uid"), 5);
    assert_eq!(uid.trim(), "65534", "runs as nobody");
    // The grant ends at its deadline: the close hook runs, and fails.
    let env = wait_for_file(&out.path().join("close.env"), 8);
    assert_eq!(env_of(&env, "KNOCKD_EVENT").as_deref(), Some("close"));
    // The open hook was killed at its 2 s; the close hook exited 3.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let status = knockd_tests::knockctl_json(&daemon.control_socket(), &["status"]);
        let decisions = &status["decisions"];
        if decisions["hooks_timed_out"] == 1 && decisions["hooks_failed"] == 2 {
            assert_eq!(decisions["hooks_started"], 2);
            break;
        }
        assert!(Instant::now() < deadline, "{decisions}");
        std::thread::sleep(Duration::from_millis(100));
    }
    // The timeout killed the open hook's whole group, its `sleep` too
    // (a killed process may show a moment longer, until it is reaped).
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let sleeping = std::process::Command::new("pgrep")
            .args(["-u", "nobody", "-x", "sleep"])
            .output()
            .unwrap();
        if sleeping.stdout.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "the hook's sleep outlived it");
        std::thread::sleep(Duration::from_millis(100));
    }
}
