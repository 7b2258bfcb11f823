//! The knocking side of the protocol: send a sequence, wait for the sealed
//! reply, verify it. Blocking std sockets only, so a command-line client
//! (or a test) needs no runtime and no kernel interface beyond UDP.

use std::{
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket},
    time::{Duration, Instant},
};

use crate::proto::{self, DeviceKey, DoorKeys, DoorParams, Kind, NONCE_LEN, Reply, ReplyError};

/// Where and how to knock.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server's address.
    pub server: IpAddr,
    /// The door's name, as in the server's configuration.
    pub door: String,
    /// The door's one-time parameters.
    pub params: DoorParams,
    /// This device's key.
    pub key: DeviceKey,
    /// The address to ask the grant for (the public one, behind NAT), or
    /// `None` for the address the knocks come from.
    pub bind: Option<IpAddr>,
}

/// Why a knock did not get a verified answer.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("no answer from {server} after {attempts} attempts ({waited:?})")]
    Timeout {
        server: IpAddr,
        attempts: u32,
        waited: Duration,
    },
    #[error(
        "a reply came but did not verify ({0}): the server does not hold this key, or it was altered"
    )]
    BadReply(ReplyError),
    #[error("door {door:?}: {source}")]
    Door {
        door: String,
        source: proto::DoorNameTooLong,
    },
    #[error("socket")]
    Io(#[from] std::io::Error),
}

/// A verified answer.
#[derive(Debug, Clone)]
pub struct Answer {
    pub reply: Reply,
    /// The nonce of the sequence that got it.
    pub nonce: [u8; NONCE_LEN],
    /// How far the server's clock is ahead of ours, in milliseconds.
    pub server_offset_ms: i64,
    /// Sequences sent before one was answered.
    pub attempts: u32,
}

/// How long to wait for a reply to each attempt; each retry sends a fresh
/// sequence (a new nonce), since a resend of a used one is a replay.
pub const ATTEMPT_WAIT: Duration = Duration::from_millis(1500);

/// Sends a fresh `kind` sequence to `target` until a verified reply comes
/// back or `timeout` passes. Replies that fail to verify are ignored (anyone
/// can send a datagram), but reported if nothing better arrives.
pub fn knock(target: &Target, kind: Kind, timeout: Duration) -> Result<Answer, Error> {
    let local: IpAddr = match target.server {
        IpAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
        IpAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
    };
    let socket = UdpSocket::bind(SocketAddr::new(local, 0))?;
    knock_from(&socket, target, kind, timeout)
}

/// [`knock`] from an existing socket (tests bind it to a chosen address).
pub fn knock_from(
    socket: &UdpSocket,
    target: &Target,
    kind: Kind,
    timeout: Duration,
) -> Result<Answer, Error> {
    let keys = DoorKeys::try_derive(&target.key, &target.door).map_err(|source| Error::Door {
        door: target.door.clone(),
        source,
    })?;
    let start = Instant::now();
    let mut attempts = 0;
    let mut bad_reply = None;
    while start.elapsed() < timeout {
        attempts += 1;
        let nonce = proto::fresh_nonce();
        let now_ms = proto::unix_ms();
        for (port, payload) in
            proto::sequence(&keys, &target.params, kind, now_ms, nonce, target.bind)
        {
            socket.send_to(&payload, SocketAddr::new(target.server, port))?;
        }
        let deadline = Instant::now() + ATTEMPT_WAIT.min(timeout.saturating_sub(start.elapsed()));
        let mut buf = [0u8; 512];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            socket.set_read_timeout(Some(left))?;
            let (len, from) = match socket.recv_from(&mut buf) {
                Ok(got) => got,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break;
                }
                Err(e) => return Err(e.into()),
            };
            if from.ip() != target.server {
                continue;
            }
            match Reply::open(&buf[..len], &keys, &nonce) {
                Ok(reply) => {
                    return Ok(Answer {
                        server_offset_ms: reply.server_time_ms as i64 - proto::unix_ms() as i64,
                        reply,
                        nonce,
                        attempts,
                    });
                }
                Err(e) => bad_reply = Some(e),
            }
        }
    }
    Err(match bad_reply {
        Some(e) => Error::BadReply(e),
        None => Error::Timeout {
            server: target.server,
            attempts,
            waited: start.elapsed(),
        },
    })
}
