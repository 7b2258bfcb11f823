//! Real socket attempts, meant to run inside a namespace (see
//! [`crate::NetNs::run`]), that tell apart the three answers a port can give.

use std::{
    io::{self, Read as _, Write as _},
    net::{IpAddr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// What came back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// TCP: the handshake completed. UDP: a datagram came back.
    Answered,
    /// TCP: an RST came back. UDP: an ICMP port-unreachable came back.
    Refused,
    /// Nothing at all came back before the timeout.
    Silent,
}

fn classify(e: &io::Error) -> Outcome {
    match e.kind() {
        io::ErrorKind::ConnectionRefused => Outcome::Refused,
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => Outcome::Silent,
        _ => panic!("unexpected socket error: {e}"),
    }
}

fn socket_for(addr: &SocketAddr, ty: Type, proto: Protocol) -> Socket {
    Socket::new(Domain::for_address(*addr), ty, Some(proto)).unwrap()
}

/// Opens a TCP connection from `from` (any port) to `to`.
pub fn tcp_connect(
    from: Option<IpAddr>,
    to: SocketAddr,
    timeout: Duration,
) -> (Outcome, Option<TcpStream>) {
    let socket = socket_for(&to, Type::STREAM, Protocol::TCP);
    if let Some(from) = from {
        socket
            .bind(&SockAddr::from(SocketAddr::new(from, 0)))
            .unwrap();
    }
    match socket.connect_timeout(&SockAddr::from(to), timeout) {
        Ok(()) => (Outcome::Answered, Some(socket.into())),
        Err(e) => (classify(&e), None),
    }
}

/// Sends one datagram from `from` to `to` on a connected socket and waits
/// for an answer: a reply, an ICMP error (surfacing as ECONNREFUSED on the
/// connected socket), or silence.
pub fn udp_probe(from: IpAddr, to: SocketAddr, timeout: Duration) -> Outcome {
    let socket = UdpSocket::bind(SocketAddr::new(from, 0)).unwrap();
    socket.connect(to).unwrap();
    socket.set_read_timeout(Some(timeout)).unwrap();
    socket.send(b"probe").unwrap();
    let mut buf = [0; 64];
    match socket.recv(&mut buf) {
        Ok(_) => Outcome::Answered,
        Err(e) => classify(&e),
    }
}

/// Sends each payload as one datagram from `from` to `to`.
pub fn udp_send(from: SocketAddr, to: SocketAddr, payloads: &[impl AsRef<[u8]>]) {
    let socket = UdpSocket::bind(from).unwrap();
    for payload in payloads {
        socket.send_to(payload.as_ref(), to).unwrap();
    }
}

/// A UDP service that answers every datagram with its payload, on its own
/// thread, for as long as the process lives.
pub fn udp_echo_server(addr: SocketAddr) {
    let socket = UdpSocket::bind(addr).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0; 2048];
        while let Ok((n, from)) = socket.recv_from(&mut buf) {
            let _ = socket.send_to(&buf[..n], from);
        }
    });
}

/// A TCP listener that echoes every byte back, on its own thread, for as
/// long as the process lives. Returns the bound address.
pub fn echo_server(addr: SocketAddr) -> SocketAddr {
    echo_server_with(addr, true)
}

/// An echo server on `[::]:port` that takes IPv4 clients too (as
/// IPv4-mapped addresses), the way sshd listens by default.
pub fn echo_server_dual_stack(port: u16) -> SocketAddr {
    echo_server_with(
        SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), port),
        false,
    )
}

fn echo_server_with(addr: SocketAddr, only_v6: bool) -> SocketAddr {
    let listener = {
        let socket = socket_for(&addr, Type::STREAM, Protocol::TCP);
        socket.set_reuse_address(true).unwrap();
        if addr.is_ipv6() {
            socket.set_only_v6(only_v6).unwrap();
        }
        socket.bind(&SockAddr::from(addr)).unwrap();
        socket.listen(1024).unwrap();
        TcpListener::from(socket)
    };
    let local = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            std::thread::spawn(move || {
                let mut buf = [0; 4096];
                while let Ok(n @ 1..) = stream.read(&mut buf) {
                    if stream.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    local
}

/// Writes `msg` and reads back as many bytes; true if they match.
pub fn echo_round_trip(stream: &mut TcpStream, msg: &[u8]) -> bool {
    stream
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    if stream.write_all(msg).is_err() {
        return false;
    }
    let mut buf = vec![0; msg.len()];
    stream.read_exact(&mut buf).is_ok() && buf == msg
}

/// Whether `stream` ends (a reset, or the end of the stream) within
/// [`crate::bed::SILENCE`] without our sending anything: a cut both ends learn of at once.
pub fn is_cut(stream: &mut TcpStream) -> bool {
    stream.set_read_timeout(Some(crate::bed::SILENCE)).unwrap();
    let mut buf = [0; 64];
    match stream.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => {
            assert_ne!(
                e.kind(),
                std::io::ErrorKind::WouldBlock,
                "the cut connection hangs instead of ending"
            );
            true
        }
    }
}
