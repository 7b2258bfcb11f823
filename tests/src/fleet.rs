//! A fleet on one machine: a 3-member etcd cluster and knockd nodes, each
//! in a namespace of its own, with clients, all on one bridge (a hub
//! namespace). Real etcd processes with their own data folders; every
//! process is killed and every namespace deleted on drop, even on panic.
//!
//! Addresses (198.18.0.0/24): clients .2 and .3, nodes .11 up, etcd
//! members .21 up.

use std::{
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use knockd::{
    client::{self, Answer, Target},
    proto::{DeviceKey, Kind},
};

use crate::{Daemon, NetNs, bed::SILENCE, probe, probe::Outcome, sh, unique_name};

/// What a node logs each time it has listed etcd and watches it.
pub const SYNCED: &str = "fleet: synchronised with etcd; watching";

/// What a node logs when it loses etcd.
pub const LOST: &str = "fleet: lost etcd; cluster doors fail closed";

/// The service port behind the fleet's door.
pub const SSH: u16 = 22;

/// The IPv6 address of a host whose IPv4 address is `v4`: 2001:db8:: and
/// the same last number.
pub fn v6_of(v4: &str) -> std::net::Ipv6Addr {
    let last: u16 = v4
        .rsplit('.')
        .next()
        .and_then(|n| n.parse().ok())
        .expect("an IPv4 address");
    std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, last)
}

/// The bridge everything is plugged into.
pub struct Hub {
    /// Dropped last: deleting it removes the bridge and every hub end.
    pub ns: NetNs,
}

impl Hub {
    pub fn new() -> Hub {
        let ns = NetNs::new("h");
        ns.ip(&["link", "add", "br0", "type", "bridge"]);
        ns.ip(&["link", "set", "br0", "up"]);
        Hub { ns }
    }

    /// A new namespace plugged into the bridge with `addr`/24; returns it
    /// and its interface's name.
    pub fn host(&self, tag: &str, addr: &str) -> (NetNs, String) {
        let ns = NetNs::new(tag);
        let (hub_end, end) = (unique_name("b"), unique_name("v"));
        sh(Command::new("ip").args([
            "link",
            "add",
            &hub_end,
            "netns",
            self.ns.name(),
            "type",
            "veth",
            "peer",
            "name",
            &end,
            "netns",
            ns.name(),
        ]));
        self.ns
            .ip(&["link", "set", &hub_end, "master", "br0", "up"]);
        ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", &end]);
        // And an IPv6 address with the same last number: 2001:db8::N.
        ns.ip(&[
            "addr",
            "add",
            &format!("{}/64", v6_of(addr)),
            "dev",
            &end,
            "nodad",
        ]);
        ns.ip(&["link", "set", &end, "up"]);
        (ns, end)
    }
}

impl Default for Hub {
    fn default() -> Self {
        Hub::new()
    }
}

/// TLS material for etcd and its clients (made with openssl).
pub struct Tls {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// A client certificate with CN `root`, for etcdctl.
    pub root_cert: PathBuf,
    pub root_key: PathBuf,
    /// The nodes' client certificate (CN `knockd`).
    pub node_cert: PathBuf,
    pub node_key: PathBuf,
}

impl Tls {
    /// A CA and certificates for `ips`, in `dir`.
    pub fn make(dir: &Path, ips: &[String]) -> Tls {
        let p = |name: &str| dir.join(name);
        let openssl = |args: &[&str]| {
            sh(Command::new("openssl").args(args).current_dir(dir));
        };
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
            "-days",
            "2",
            "-subj",
            "/CN=knockd test CA",
        ]);
        let sans = ips
            .iter()
            .map(|ip| format!("IP:{ip}"))
            .collect::<Vec<_>>()
            .join(",");
        for (name, cn, ext) in [
            (
                "server",
                "etcd",
                format!("subjectAltName={sans}\nextendedKeyUsage=serverAuth,clientAuth"),
            ),
            ("root", "root", "extendedKeyUsage=clientAuth".to_owned()),
            ("node", "knockd", "extendedKeyUsage=clientAuth".to_owned()),
        ] {
            std::fs::write(p(&format!("{name}.ext")), ext).unwrap();
            openssl(&[
                "req",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-nodes",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={cn}"),
            ]);
            openssl(&[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &format!("{name}.pem"),
                "-days",
                "2",
                "-extfile",
                &format!("{name}.ext"),
            ]);
            std::fs::set_permissions(
                p(&format!("{name}.key")),
                std::fs::Permissions::from_mode(0o600),
            )
            .unwrap();
        }
        Tls {
            ca: p("ca.pem"),
            server_cert: p("server.pem"),
            server_key: p("server.key"),
            root_cert: p("root.pem"),
            root_key: p("root.key"),
            node_cert: p("node.pem"),
            node_key: p("node.key"),
        }
    }
}

/// One etcd member process.
struct Member {
    name: String,
    addr: String,
    ns: NetNs,
    child: Option<Child>,
    data: PathBuf,
}

/// A real etcd cluster, one member per namespace.
pub struct Etcd {
    members: Vec<Member>,
    pub tls: Option<Tls>,
    token: String,
    dir: tempfile::TempDir,
}

impl Etcd {
    /// Starts `n` members on `hub` (addresses 198.18.0.21 up) and waits
    /// until the cluster answers.
    pub fn start(hub: &Hub, n: usize, tls: bool) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let addrs: Vec<String> = (0..n).map(|i| format!("198.18.0.{}", 21 + i)).collect();
        let tls = tls.then(|| Tls::make(dir.path(), &addrs));
        let mut members = Vec::new();
        for (i, addr) in addrs.iter().enumerate() {
            let (ns, _) = hub.host("e", addr);
            members.push(Member {
                name: format!("e{}", i + 1),
                addr: addr.clone(),
                ns,
                child: None,
                data: dir.path().join(format!("e{}", i + 1)),
            });
        }
        let mut etcd = Etcd {
            members,
            tls,
            token: unique_name("t"),
            dir,
        };
        for i in 0..n {
            etcd.spawn(i);
        }
        etcd.wait_healthy(Duration::from_secs(30));
        etcd
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() { "https" } else { "http" }
    }

    /// Client URLs, for knockd's `cluster.endpoints`.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| format!("{}://{}:2379", self.scheme(), m.addr))
            .collect()
    }

    /// The members' addresses.
    pub fn addrs(&self) -> Vec<String> {
        self.members.iter().map(|m| m.addr.clone()).collect()
    }

    fn spawn(&mut self, i: usize) {
        let scheme = self.scheme();
        let cluster = self
            .members
            .iter()
            .map(|m| format!("{}=http://{}:2380", m.name, m.addr))
            .collect::<Vec<_>>()
            .join(",");
        let m = &self.members[i];
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", m.name))).unwrap();
        let mut cmd = m.ns.command("etcd");
        // etcd reads ETCD_* variables as flags: start it clean.
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .args(["--name", &m.name, "--data-dir"])
            .arg(&m.data)
            .args([
                "--listen-client-urls",
                &format!("{scheme}://{}:2379", m.addr),
                "--advertise-client-urls",
                &format!("{scheme}://{}:2379", m.addr),
                "--listen-peer-urls",
                &format!("http://{}:2380", m.addr),
                "--initial-advertise-peer-urls",
                &format!("http://{}:2380", m.addr),
                "--initial-cluster",
                &cluster,
                "--initial-cluster-token",
                &self.token,
                "--initial-cluster-state",
                "new",
            ])
            .stdout(Stdio::null())
            .stderr(log);
        if let Some(tls) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&tls.server_cert)
                .arg("--key-file")
                .arg(&tls.server_key)
                .arg("--trusted-ca-file")
                .arg(&tls.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd.spawn().expect("etcd (apt-get install etcd-server)");
        self.members[i].child = Some(child);
    }

    /// `etcdctl ARGS` against the cluster (as root, with TLS when on).
    pub fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut cmd = self.members[0].ns.command("etcdctl");
        cmd.env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints().join(",")))
            .arg("--dial-timeout=2s")
            .arg("--command-timeout=3s");
        if let Some(tls) = &self.tls {
            cmd.arg(format!("--cacert={}", tls.ca.display()))
                .arg(format!("--cert={}", tls.root_cert.display()))
                .arg(format!("--key={}", tls.root_key.display()));
        }
        cmd.args(args).output().unwrap()
    }

    /// `etcdctl ARGS`, which must succeed: its stdout.
    #[track_caller]
    pub fn ctl_ok(&self, args: &[&str]) -> String {
        let out = self.ctl(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let out = self.ctl(&["put", "/health-check", "ok"]);
            if out.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "etcd did not become healthy: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// SIGKILLs member `i` (0-based).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.members[i].child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts member `i` again with its data, and waits for the cluster.
    pub fn restart(&mut self, i: usize) {
        assert!(self.members[i].child.is_none());
        self.spawn(i);
        self.wait_healthy(Duration::from_secs(30));
    }

    /// Raft proposals committed so far (etcd's own counter, the largest
    /// any member reports): every write etcd makes, leases included.
    pub fn proposals(&self) -> u64 {
        self.members
            .iter()
            .filter(|m| m.child.is_some())
            .filter_map(|m| {
                let addr: SocketAddr = format!("{}:2379", m.addr).parse().unwrap();
                m.ns.run(move || metric(addr, "etcd_server_proposals_committed_total"))
            })
            .max()
            .unwrap_or(0)
    }

    /// The members' logs, for a failed test's message.
    pub fn logs(&self) -> String {
        self.members
            .iter()
            .map(|m| {
                let log = std::fs::read_to_string(self.dir.path().join(format!("{}.log", m.name)))
                    .unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                format!(
                    "{}:\n{}",
                    m.name,
                    tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                )
            })
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
    }
}

/// One value of etcd's Prometheus endpoint (plain HTTP only).
fn metric(addr: SocketAddr, name: &str) -> Option<u64> {
    use std::io::{Read as _, Write as _};
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(1)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").ok()?;
    let mut body = String::new();
    stream.read_to_string(&mut body).ok()?;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

/// One knockd node: its namespace, address and daemon.
pub struct Node {
    pub name: String,
    pub addr: IpAddr,
    pub ns: NetNs,
    pub interface: String,
    pub daemon: Option<Daemon>,
}

impl Node {
    pub fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("running")
    }

    pub fn daemon_mut(&mut self) -> &mut Daemon {
        self.daemon.as_mut().expect("running")
    }

    pub fn socket(&self) -> PathBuf {
        self.daemon().control_socket()
    }

    /// Cuts the node off from etcd (a blackhole route to each member), or
    /// joins it again.
    pub fn partition(&self, etcd: &Etcd, cut: bool) {
        for addr in etcd.addrs() {
            let verb = if cut { "add" } else { "del" };
            self.ns
                .ip(&["route", verb, "blackhole", &format!("{addr}/32")]);
        }
    }
}

/// A fleet: the hub, etcd, nodes with an echo service on 22, a client
/// namespace, and one device key (`laptop`, allowed through group admins).
pub struct Fleet {
    pub nodes: Vec<Node>,
    pub client: NetNs,
    pub client_addr: IpAddr,
    pub etcd: Etcd,
    pub dir: tempfile::TempDir,
    pub prefix: String,
    /// Extra `cluster:` settings (user, TLS).
    cluster_extra: String,
    /// Top-level settings added to every node's configuration.
    pub extra: String,
    pub hub: Hub,
}

/// The fleet's door: one-time, cluster-scoped, on 22.
pub fn door_config(extra: &str) -> String {
    format!(
        "doors: {{ ssh: {{ service_port: {SSH}, scope: cluster, allow: {{ groups: [admins] }}{extra} }} }}\n"
    )
}

impl Fleet {
    /// `nodes` knockd nodes and a 3-member etcd (TLS and auth with `tls`).
    pub fn new(nodes: usize, tls: bool) -> Fleet {
        let hub = Hub::new();
        let etcd = Etcd::start(&hub, 3, tls);
        let dir = tempfile::tempdir().unwrap();
        let key_file = dir.path().join("cluster.key");
        std::fs::write(&key_file, DeviceKey::generate().to_hex()).unwrap();
        std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        let prefix = format!("/{}/", unique_name("k"));
        let mut cluster_extra = String::new();
        if let Some(t) = &etcd.tls {
            // etcd users: root (the etcdctl certificate's CN), and knockd,
            // whose role may touch the fleet's prefix only.
            let password = dir.path().join("etcd.password");
            std::fs::write(&password, "knockd-secret\n").unwrap();
            std::fs::set_permissions(&password, std::fs::Permissions::from_mode(0o600)).unwrap();
            etcd.ctl_ok(&[
                "user",
                "add",
                "root",
                "--new-user-password=rootpw",
                "--interactive=false",
            ]);
            etcd.ctl_ok(&["user", "grant-role", "root", "root"]);
            etcd.ctl_ok(&["role", "add", "knockd"]);
            etcd.ctl_ok(&[
                "role",
                "grant-permission",
                "knockd",
                "--prefix=true",
                "readwrite",
                &prefix,
            ]);
            etcd.ctl_ok(&[
                "user",
                "add",
                "knockd",
                "--new-user-password=knockd-secret",
                "--interactive=false",
            ]);
            etcd.ctl_ok(&["user", "grant-role", "knockd", "knockd"]);
            etcd.ctl_ok(&["auth", "enable"]);
            cluster_extra = format!(
                "  user: knockd\n  password_file: {}\n  tls: {{ ca_file: {}, cert_file: {}, key_file: {} }}\n",
                password.display(),
                t.ca.display(),
                t.node_cert.display(),
                t.node_key.display()
            );
        }
        let (client, _) = hub.host("c", "198.18.0.2");
        let mut fleet = Fleet {
            nodes: Vec::new(),
            client,
            client_addr: "198.18.0.2".parse().unwrap(),
            etcd,
            dir,
            prefix,
            cluster_extra,
            extra: String::new(),
            hub,
        };
        for i in 0..nodes {
            let addr = format!("198.18.0.{}", 11 + i);
            let (ns, interface) = fleet.hub.host("n", &addr);
            let ip: IpAddr = addr.parse().unwrap();
            let ip6: IpAddr = v6_of(&addr).into();
            ns.run(|| {
                probe::echo_server(SocketAddr::new(ip, SSH));
                probe::echo_server(SocketAddr::new(ip6, SSH));
            });
            fleet.nodes.push(Node {
                name: format!("n{}", i + 1),
                addr: ip,
                ns,
                interface,
                daemon: None,
            });
        }
        fleet
    }

    /// Node `i`'s configuration, with `door_extra` in its door.
    pub fn config(&self, i: usize, door_extra: &str) -> String {
        let node = &self.nodes[i];
        let endpoints = self
            .etcd
            .endpoints()
            .iter()
            .map(|e| format!("\"{e}\""))
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "interfaces: [{}]\nxdp_mode: native\n\
             cluster:\n  name: {}\n  endpoints: [{endpoints}]\n  prefix: {}\n  key_file: {}\n{}{}{}",
            node.interface,
            node.name,
            self.prefix,
            self.dir.path().join("cluster.key").display(),
            self.cluster_extra,
            door_config(door_extra),
            self.extra,
        )
    }

    /// Node `i`'s configuration for single-node mode (no `cluster:`), with
    /// `devices` as key files: the baseline fleet mode is measured against.
    pub fn local_config(&self, i: usize, devices: &[(String, DeviceKey)]) -> String {
        let mut listed = String::new();
        for (id, key) in devices {
            let path = self.dir.path().join(format!("{id}.key"));
            std::fs::write(&path, key.to_hex()).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
            listed.push_str(&format!(
                "  {id}: {{ key_file: {}, groups: [admins] }}\n",
                path.display()
            ));
        }
        format!(
            "interfaces: [{}]\nxdp_mode: native\ndevices:\n{listed}\
             doors: {{ ssh: {{ service_port: {SSH}, allow: {{ groups: [admins] }} }} }}\n{}",
            self.nodes[i].interface, self.extra,
        )
    }

    /// Starts every node's daemon and waits until each has synced.
    pub fn start_all(&mut self, door_extra: &str) {
        for i in 0..self.nodes.len() {
            self.start(i, door_extra);
        }
    }

    /// Starts node `i` and waits until it has synced with etcd.
    pub fn start(&mut self, i: usize, door_extra: &str) {
        let config = self.config(i, door_extra);
        let daemon = Daemon::start(&self.nodes[i].ns, &config);
        self.nodes[i].daemon = Some(daemon);
        self.wait_synced(i);
    }

    /// Waits until node `i` logs that it synced (again).
    pub fn wait_synced(&mut self, i: usize) {
        self.wait_synced_count(i, 1);
    }

    /// Waits until node `i` has synced `count` times in all.
    pub fn wait_synced_count(&mut self, i: usize, count: usize) {
        self.nodes[i]
            .daemon_mut()
            .wait_for_count(SYNCED, count, Duration::from_secs(20), |_| true);
    }

    /// How often node `i` has synced so far.
    pub fn synced_count(&self, i: usize) -> usize {
        self.nodes[i].daemon().messages(SYNCED, |_| true).len()
    }

    /// How often node `i` has lost etcd so far.
    pub fn lost_count(&self, i: usize) -> usize {
        self.nodes[i].daemon().messages(LOST, |_| true).len()
    }

    /// `knockctl ARGS --config CONFIG` with node `i`'s configuration (the
    /// device commands find fleet mode there).
    pub fn knockctl_config(&self, i: usize, args: &[&str]) -> std::process::Output {
        Command::new(crate::knockctl_bin())
            .args(args)
            .arg("--config")
            .arg(self.nodes[i].daemon().config_path())
            .output()
            .unwrap()
    }

    /// Adds a device through node `i`'s knockctl (`device add`), and waits
    /// until every running node has it from its watch; returns its key.
    pub fn add_device(&mut self, i: usize, id: &str) -> DeviceKey {
        self.add_device_within(i, id, Duration::ZERO)
    }

    /// [`add_device`](Self::add_device), tried again for up to `retry`
    /// while etcd is re-electing or the node reconnecting.
    pub fn add_device_within(&mut self, i: usize, id: &str, retry: Duration) -> DeviceKey {
        let deadline = Instant::now() + retry;
        let out = loop {
            let out = self.knockctl_config(
                i,
                &["device", "add", id, "--group", "admins", "--door", "ssh"],
            );
            if out.status.success() || Instant::now() >= deadline {
                break out;
            }
            std::thread::sleep(Duration::from_millis(250));
        };
        assert!(
            out.status.success(),
            "device add on {}: {}",
            self.nodes[i].name,
            String::from_utf8_lossy(&out.stderr)
        );
        let profiles = knockd::profile::Profiles::parse(
            &String::from_utf8_lossy(&out.stdout),
            Path::new("device add"),
        )
        .expect("device add prints a profile");
        for node in self.nodes.iter_mut().filter(|n| n.daemon.is_some()) {
            node.daemon_mut()
                .wait_for("fleet: device added", Duration::from_secs(5), |l| {
                    l["device"] == id
                });
        }
        DeviceKey::from_hex(&profiles.profiles[id].key).unwrap()
    }

    /// The fleet's door on node `i`, as a client with `key` knocks on it.
    pub fn target(&self, i: usize, key: &DeviceKey) -> Target {
        crate::bed::default_target(self.nodes[i].addr, key.clone())
    }

    /// A UDP socket in the client namespace.
    pub fn socket(&self) -> UdpSocket {
        let addr = self.client_addr;
        self.client
            .run(move || UdpSocket::bind(SocketAddr::new(addr, 0)).unwrap())
    }

    /// Knocks node `i` with `key` (the real client code).
    pub fn knock(&self, i: usize, key: &DeviceKey, kind: Kind) -> Result<Answer, client::Error> {
        client::knock_from(
            &self.socket(),
            &self.target(i, key),
            kind,
            Duration::from_secs(6),
        )
    }

    /// A TCP connect from the client to node `i`'s `port`.
    pub fn connect(&self, i: usize, port: u16) -> (Outcome, Option<TcpStream>) {
        let (from, to) = (self.client_addr, SocketAddr::new(self.nodes[i].addr, port));
        self.client
            .run(move || probe::tcp_connect(Some(from), to, SILENCE))
    }

    /// Waits until a connect to node `i`'s `port` is answered; how long it
    /// took.
    pub fn wait_open(
        &self,
        i: usize,
        port: u16,
        timeout: Duration,
    ) -> Option<(Duration, TcpStream)> {
        let start = Instant::now();
        while start.elapsed() < timeout {
            let (from, to) = (self.client_addr, SocketAddr::new(self.nodes[i].addr, port));
            // A SYN that XDP drops is not retried for a second: poll with
            // fresh connects instead (a veth answers in microseconds).
            let (outcome, stream) = self
                .client
                .run(move || probe::tcp_connect(Some(from), to, Duration::from_millis(10)));
            if outcome == Outcome::Answered {
                return Some((start.elapsed(), stream.unwrap()));
            }
        }
        None
    }
}
