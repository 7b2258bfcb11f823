//! The rules serde cannot express: names, bounds, and no port claimed twice.

use std::collections::{BTreeMap, BTreeSet};

use super::*;

impl Config<RawDoor> {
    /// Checks the rules serde cannot: non-empty and well-formed interface
    /// names, no port both a knock port and plain-protected, sane limits.
    pub(crate) fn validate(&self) -> Result<(), Error> {
        if self.interfaces.is_empty() {
            return Err(Error::invalid(
                "interfaces",
                "at least one interface is needed",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, name) in self.interfaces.iter().enumerate() {
            let key = format!("interfaces[{i}]");
            if name.is_empty() || name.len() > IFNAME_MAX {
                return Err(Error::invalid(
                    key,
                    format!("{name:?} is not a valid interface name (1-{IFNAME_MAX} bytes)"),
                ));
            }
            if name.contains(['/', ' ', '\0']) || name == "." || name == ".." {
                return Err(Error::invalid(
                    key,
                    format!("{name:?} is not a valid interface name"),
                ));
            }
            if !seen.insert(name) {
                return Err(Error::invalid(key, format!("{name:?} is listed twice")));
            }
        }
        for (key, value) in [
            ("knock.rate_per_sec", self.knock.rate_per_sec),
            ("knock.burst", self.knock.burst),
        ] {
            if !(1..=KNOCK_RATE_MAX).contains(&value) {
                return Err(Error::invalid(
                    key,
                    format!("{value} is not in 1-{KNOCK_RATE_MAX}"),
                ));
            }
        }
        if !(1..=MAX_GRANTS_LIMIT).contains(&self.max_grants) {
            return Err(Error::invalid(
                "max_grants",
                format!("{} is not in 1-{MAX_GRANTS_LIMIT}", self.max_grants),
            ));
        }
        for (key, path) in [
            ("bpffs_dir", Some(&self.bpffs_dir)),
            ("state_dir", Some(&self.state_dir)),
            ("devices_dir", self.devices_dir.as_ref()),
            ("control_socket", Some(&self.control_socket)),
        ] {
            if let Some(path) = path
                && !path.is_absolute()
            {
                return Err(Error::invalid(
                    key,
                    format!("{} is not an absolute path", path.display()),
                ));
            }
        }
        if let Some(metrics) = &self.metrics
            && !metrics.listen.ip().is_loopback()
        {
            return Err(Error::invalid(
                "metrics.listen",
                format!(
                    "{} is not a loopback address; the endpoint is for this host only",
                    metrics.listen.ip()
                ),
            ));
        }
        for (id, device) in &self.devices {
            validate_name(id, DEVICE_ID_MAX, &format!("devices.{id}"))?;
            for (i, group) in device.groups.iter().enumerate() {
                validate_name(group, DEVICE_ID_MAX, &format!("devices.{id}.groups[{i}]"))?;
            }
        }
        if let Some(cluster) = &self.cluster {
            validate_cluster(cluster)?;
        }
        self.validate_doors()
    }

    fn validate_doors(&self) -> Result<(), Error> {
        // Every (protocol, port) has one owner, so no knock is ambiguous.
        let mut owners: BTreeMap<KnockPort, String> = BTreeMap::new();
        let mut claim = |knock: KnockPort, key: String| -> Result<(), Error> {
            if let Some(owner) = owners.get(&knock) {
                return Err(Error::invalid(
                    key,
                    format!("{knock} is already used by {owner}"),
                ));
            }
            owners.insert(knock, key);
            Ok(())
        };
        for (proto, ranges, section) in [
            (Proto::Tcp, &self.protect.tcp, "protect.tcp"),
            (Proto::Udp, &self.protect.udp, "protect.udp"),
            (Proto::Tcp, &self.knock.tcp, "knock.tcp"),
            (Proto::Udp, &self.knock.udp, "knock.udp"),
            (Proto::Tcp, &self.public.tcp, "public.tcp"),
            (Proto::Udp, &self.public.udp, "public.udp"),
        ] {
            // Ranges within one list may overlap; each port is claimed once.
            let mut listed = BTreeSet::new();
            for (i, range) in ranges.iter().enumerate() {
                for port in range.ports() {
                    if listed.insert(port) {
                        claim(KnockPort { port, proto }, format!("{section}[{i}]"))?;
                    }
                }
            }
        }
        // Grant ranges may be shared between doors, so claim each port once.
        let mut grant_range_ports = BTreeSet::new();
        for (name, door) in &self.doors {
            let key = |field: &str| format!("doors.{name}.{field}");
            validate_name(name, DOOR_NAME_MAX, &format!("doors.{name}"))?;
            match door.service_port {
                Some(0) => {
                    return Err(Error::invalid(
                        key("service_port"),
                        "port 0 is not in 1-65535",
                    ));
                }
                Some(port) => claim(
                    KnockPort {
                        port,
                        proto: door.service_protocol.unwrap_or(Proto::Tcp),
                    },
                    key("service_port"),
                )?,
                // An action door: it opens nothing, so what it does is its
                // hooks, and only a static door's knock needs no reply
                // naming a port.
                None if door.service_protocol.is_some() => {
                    return Err(Error::invalid(
                        key("service_protocol"),
                        "a door without a service_port has no service to name a protocol for",
                    ));
                }
                None if door.mode == DoorMode::OneTime => {
                    return Err(Error::invalid(
                        key("service_port"),
                        "missing: a one-time door opens a service (a door without one, which \
                         only runs its hooks, must be mode: static)",
                    ));
                }
                None if door.hooks.as_ref().is_none_or(|h| h.on_open.is_empty()) => {
                    return Err(Error::invalid(
                        key("service_port"),
                        "missing: a door without a service port opens nothing, so it needs \
                         hooks.on_open to run",
                    ));
                }
                None => {}
            }
            check_bounds(&key("open_for_secs"), door.open_for_secs, 1, 86_400)?;
            check_bounds(
                &key("max_session_secs"),
                door.max_session_secs,
                0,
                31_536_000,
            )?;
            check_bounds(&key("lease_idle_secs"), door.lease_idle_secs, 1, 86_400)?;
            check_bounds(&key("rotate_every_secs"), door.rotate_every_secs, 0, 86_400)?;
            check_bounds(
                &key("rotate_on_probes"),
                door.rotate_on_probes,
                0,
                1_000_000,
            )?;
            let grant_ports = door.grant_ports();
            if door.mode == DoorMode::OneTime && grant_ports.end - grant_ports.start < 15 {
                return Err(Error::invalid(
                    key("grant_ports"),
                    format!(
                        "{grant_ports} is too small to draw random ports from: give it at least 16"
                    ),
                ));
            }
            // Static doors draw no ports (their clients could not learn one):
            // a static grant opens the service port itself.
            if door.mode == DoorMode::OneTime {
                for port in grant_ports.ports() {
                    if grant_range_ports.insert(port) {
                        claim(
                            KnockPort {
                                port,
                                proto: Proto::Tcp,
                            },
                            key("grant_ports"),
                        )?;
                    }
                }
            }
            let one_time_fields = [
                ("grant_ports", door.grant_ports.is_some()),
                ("expose_service_port", door.expose_service_port),
                ("lease_idle_secs", door.lease_idle_secs.is_some()),
                ("rotate_every_secs", door.rotate_every_secs.is_some()),
                ("rotate_on_probes", door.rotate_on_probes.is_some()),
                ("knock_ports", door.knock_ports.is_some()),
                ("knocks", door.knocks.is_some()),
                ("step_secs", door.step_secs.is_some()),
                ("skew_steps", door.skew_steps.is_some()),
                ("allow", door.allow.is_some()),
                ("scope", door.scope.is_some()),
                (
                    "on_cluster_unavailable",
                    door.on_cluster_unavailable.is_some(),
                ),
            ];
            let static_fields = [
                ("service_protocol", door.service_protocol.is_some()),
                ("sequence", door.sequence.is_some()),
                ("seq_timeout_secs", door.seq_timeout_secs.is_some()),
            ];
            let (foreign, mode) = match door.mode {
                DoorMode::OneTime => (static_fields.as_slice(), "static"),
                DoorMode::Static => (one_time_fields.as_slice(), "one_time"),
            };
            if let Some((field, _)) = foreign.iter().find(|(_, set)| *set) {
                return Err(Error::invalid(
                    key(field),
                    format!("only {mode} doors take this setting"),
                ));
            }
            if self.cluster.is_none() {
                for (field, set) in [
                    ("scope", door.scope == Some(super::Scope::Cluster)),
                    (
                        "on_cluster_unavailable",
                        door.on_cluster_unavailable.is_some(),
                    ),
                ] {
                    if set {
                        return Err(Error::invalid(
                            key(field),
                            "only takes effect in fleet mode: add a cluster: section",
                        ));
                    }
                }
            }
            if let Some(hooks) = &door.hooks {
                check_hooks(hooks, &|field: &str| key(&format!("hooks.{field}")))?;
            }
            match door.mode {
                DoorMode::OneTime => {
                    check_bounds(
                        &key("knocks"),
                        door.knocks.map(u32::from),
                        1,
                        u32::from(crate::proto::MAX_KNOCKS),
                    )?;
                    check_bounds(&key("step_secs"), door.step_secs, 5, 3600)?;
                    check_bounds(&key("skew_steps"), door.skew_steps, 0, 10)?;
                    for port in door.knock_ports().ports() {
                        claim(
                            KnockPort {
                                port,
                                proto: Proto::Udp,
                            },
                            key("knock_ports"),
                        )?;
                    }
                }
                DoorMode::Static => {
                    let sequence = door.sequence();
                    if sequence.is_empty() || sequence.len() > STATIC_SEQUENCE_MAX {
                        return Err(Error::invalid(
                            key("sequence"),
                            format!("a static door needs 1-{STATIC_SEQUENCE_MAX} knocks"),
                        ));
                    }
                    check_bounds(&key("seq_timeout_secs"), door.seq_timeout_secs, 1, 3600)?;
                    let mut mine = BTreeSet::new();
                    for (i, knock) in sequence.iter().enumerate() {
                        if i > 0 && sequence[i - 1] == *knock {
                            return Err(Error::invalid(
                                format!("doors.{name}.sequence[{i}]"),
                                format!(
                                    "{knock} repeats the knock before it; repeats are tolerated, so it could never count"
                                ),
                            ));
                        }
                        if mine.insert(*knock) {
                            claim(*knock, format!("doors.{name}.sequence[{i}]"))?;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The `cluster:` section: names and paths that end up in etcd keys and
/// file reads must be plain, endpoints must be URLs TLS agrees with.
fn validate_cluster(cluster: &super::Cluster) -> Result<(), Error> {
    validate_name(&cluster.name, DEVICE_ID_MAX, "cluster.name")?;
    if cluster.endpoints.is_empty() {
        return Err(Error::invalid(
            "cluster.endpoints",
            "at least one etcd endpoint is needed",
        ));
    }
    for (i, endpoint) in cluster.endpoints.iter().enumerate() {
        let key = format!("cluster.endpoints[{i}]");
        let https = endpoint.starts_with("https://");
        if !https && !endpoint.starts_with("http://") {
            return Err(Error::invalid(
                key,
                format!("{endpoint:?} is not an http:// or https:// URL"),
            ));
        }
        if https != cluster.tls.is_some() {
            return Err(Error::invalid(
                key,
                if https {
                    "an https endpoint needs cluster.tls (its ca_file at least)"
                } else {
                    "with cluster.tls set, endpoints must be https://"
                },
            ));
        }
    }
    let prefix = &cluster.prefix;
    if !prefix.starts_with('/') || !prefix.ends_with('/') || prefix.len() > 128 {
        return Err(Error::invalid(
            "cluster.prefix",
            format!("{prefix:?} must start and end with / (at most 128 bytes)"),
        ));
    }
    if cluster.user.is_some() != cluster.password_file.is_some() {
        return Err(Error::invalid(
            if cluster.user.is_some() {
                "cluster.password_file"
            } else {
                "cluster.user"
            },
            "cluster.user and cluster.password_file go together",
        ));
    }
    if let Some(tls) = &cluster.tls
        && tls.cert_file.is_some() != tls.key_file.is_some()
    {
        return Err(Error::invalid(
            "cluster.tls",
            "cert_file and key_file go together",
        ));
    }
    check_bounds("cluster.timeout_ms", Some(cluster.timeout_ms), 100, 60_000)?;
    let mut paths = vec![("cluster.key_file", &cluster.key_file)];
    paths.extend(
        cluster
            .password_file
            .iter()
            .map(|p| ("cluster.password_file", p)),
    );
    if let Some(tls) = &cluster.tls {
        paths.push(("cluster.tls.ca_file", &tls.ca_file));
        paths.extend(tls.cert_file.iter().map(|p| ("cluster.tls.cert_file", p)));
        paths.extend(tls.key_file.iter().map(|p| ("cluster.tls.key_file", p)));
    }
    for (key, path) in paths {
        if !path.is_absolute() {
            return Err(Error::invalid(
                key,
                format!("{} is not an absolute path", path.display()),
            ));
        }
    }
    Ok(())
}

/// Longest device id or group name.
pub const DEVICE_ID_MAX: usize = 64;
/// Longest door name.
const DOOR_NAME_MAX: usize = 32;
/// Longest static sequence.
pub const STATIC_SEQUENCE_MAX: usize = 256;

/// Whether `name` may name a door, device or group: names become log
/// fields, file names and key-derivation input, so they keep to a plain
/// alphabet (1-`max` of A-Z a-z 0-9 . _ -, not starting with a dot).
pub fn is_valid_name(name: &str, max: usize) -> bool {
    !name.is_empty()
        && name.len() <= max
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
        && !name.starts_with('.')
}

fn validate_name(name: &str, max: usize, key: &str) -> Result<(), Error> {
    if is_valid_name(name, max) {
        Ok(())
    } else {
        Err(Error::invalid(
            key,
            format!(
                "{name:?} is not a valid name (1-{max} of A-Z a-z 0-9 . _ -, not starting with .)"
            ),
        ))
    }
}

fn check_bounds(key: &str, value: Option<u32>, min: u32, max: u32) -> Result<(), Error> {
    match value {
        Some(v) if !(min..=max).contains(&v) => {
            Err(Error::invalid(key, format!("{v} is not in {min}-{max}")))
        }
        _ => Ok(()),
    }
}

/// Most arguments a hook's command line may have, and bytes in one.
const HOOK_ARGS_MAX: usize = 64;
const HOOK_ARG_MAX: usize = 4096;

/// A door's hooks: at least one command, each an absolute program path and
/// bounded arguments; a user and group that are names; a timeout in range.
fn check_hooks(hooks: &super::Hooks, key: &dyn Fn(&str) -> String) -> Result<(), Error> {
    if hooks.on_open.is_empty() && hooks.on_close.is_empty() {
        return Err(Error::invalid(
            key("on_open"),
            "hooks need on_open, on_close or both",
        ));
    }
    for (field, argv) in [("on_open", &hooks.on_open), ("on_close", &hooks.on_close)] {
        let Some(program) = argv.first() else {
            continue;
        };
        if !program.starts_with('/') {
            return Err(Error::invalid(
                key(field),
                format!("{program:?}: the program needs an absolute path (no PATH lookup)"),
            ));
        }
        if argv.len() > HOOK_ARGS_MAX
            || argv
                .iter()
                .any(|a| a.len() > HOOK_ARG_MAX || a.contains('\0'))
        {
            return Err(Error::invalid(
                key(field),
                format!("at most {HOOK_ARGS_MAX} arguments of {HOOK_ARG_MAX} bytes, without NUL"),
            ));
        }
    }
    for (field, name) in [("user", Some(&hooks.user)), ("group", hooks.group.as_ref())] {
        if let Some(name) = name
            && !super::is_valid_name(name, 32)
        {
            return Err(Error::invalid(
                key(field),
                format!("{name:?} is not a user or group name"),
            ));
        }
    }
    check_bounds(&key("timeout_secs"), Some(hooks.timeout_secs), 1, 3600)
}
