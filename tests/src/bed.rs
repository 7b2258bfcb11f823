//! A one-door bed for end-to-end tests: two namespaces, an echo service on
//! the server's port 22, one device key on disk, and helpers to run the
//! daemon, knock and connect.

use std::{
    net::{IpAddr, SocketAddr, TcpStream, UdpSocket},
    os::unix::fs::PermissionsExt as _,
    time::Duration,
};

use knockd::{
    client::{self, Answer, Target},
    proto::{DeviceKey, DoorParams, Kind},
};

use crate::{
    Daemon, Testbed, addrs,
    probe::{self, Outcome},
};

/// Long enough for any answer on a veth; short enough to keep tests quick.
pub const SILENCE: Duration = Duration::from_millis(1200);
/// The door's service port.
pub const SSH: u16 = 22;

/// Door `ssh` with the default knock settings at `server`, as a client
/// knocks on it with `key`: the door of the beds, the fleet and the
/// benchmarks.
pub fn default_target(server: IpAddr, key: DeviceKey) -> Target {
    Target {
        server,
        door: "ssh".into(),
        params: DoorParams {
            knock_ports: 7000..=7999,
            knocks: 3,
            step_secs: 30,
        },
        key,
        bind: None,
    }
}

/// See the module documentation.
pub struct Bed {
    pub testbed: Testbed,
    pub dir: tempfile::TempDir,
    pub key: DeviceKey,
    pub server: IpAddr,
    pub client: IpAddr,
}

impl Bed {
    /// Namespaces, an echo service on 22, and a key for device `laptop`.
    pub fn new(v6: bool) -> Bed {
        Bed::with_service(v6, false)
    }

    /// An IPv4 bed whose service listens on `[::]:22` for both families,
    /// as sshd does by default: it holds IPv4 clients in IPv6 sockets.
    pub fn dual_stack() -> Bed {
        Bed::with_service(false, true)
    }

    fn with_service(v6: bool, dual_stack: bool) -> Bed {
        let testbed = Testbed::new();
        let (server, client, _) = addrs::family(v6);
        testbed.server.run(|| {
            if dual_stack {
                probe::echo_server_dual_stack(SSH);
            } else {
                probe::echo_server(SocketAddr::new(server, SSH));
            }
        });
        let dir = tempfile::tempdir().unwrap();
        let key = DeviceKey::generate();
        let path = dir.path().join("laptop.key");
        std::fs::write(&path, key.to_hex()).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
        Bed {
            testbed,
            dir,
            key,
            server,
            client,
        }
    }

    /// A config with one one-time door on 22, with `door_extra` settings.
    pub fn config(&self, door_extra: &str) -> String {
        format!(
            "interfaces: [{}]\nxdp_mode: native\nstate_dir: {}\n\
             devices: {{ laptop: {{ key_file: {}, groups: [admins] }} }}\n\
             doors: {{ ssh: {{ service_port: {SSH}, allow: {{ groups: [admins] }}{door_extra} }} }}\n",
            self.testbed.server_if,
            self.dir.path().join("state").display(),
            self.dir.path().join("laptop.key").display(),
        )
    }

    pub fn start(&self, door_extra: &str) -> Daemon {
        Daemon::start(&self.testbed.server, &self.config(door_extra))
    }

    pub fn socket(&self) -> UdpSocket {
        let client = self.client;
        self.testbed
            .client
            .run(move || UdpSocket::bind(SocketAddr::new(client, 0)).unwrap())
    }

    /// The bed's door (its default knock settings) as a client knocks on
    /// it with `key`.
    pub fn target(&self, key: DeviceKey) -> Target {
        default_target(self.server, key)
    }

    pub fn knock(&self, socket: &UdpSocket, kind: Kind) -> Answer {
        let target = self.target(self.key.clone());
        client::knock_from(socket, &target, kind, Duration::from_secs(10)).unwrap()
    }

    pub fn connect(&self, port: u16) -> (Outcome, Option<TcpStream>) {
        let (client, to) = (self.client, SocketAddr::new(self.server, port));
        self.testbed
            .client
            .run(move || probe::tcp_connect(Some(client), to, SILENCE))
    }

    /// Knocks the door open from the client's address and connects through
    /// the granted port: the grant and a live connection (checked with an
    /// echo).
    pub fn open_and_connect(&self) -> (Answer, TcpStream) {
        let answer = self.knock(&self.socket(), Kind::Open);
        let (outcome, stream) = self.connect(answer.reply.port);
        assert_eq!(outcome, Outcome::Answered);
        let mut stream = stream.unwrap();
        assert!(probe::echo_round_trip(&mut stream, b"up"));
        (answer, stream)
    }

    pub fn table(&self) -> Option<String> {
        let out = self
            .testbed
            .server
            .command("nft")
            .args(["list", "table", "inet", "knockd"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    }
}
