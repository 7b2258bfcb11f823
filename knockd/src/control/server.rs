//! The control socket: a Unix stream socket speaking the protocol in
//! [`super::wire`], one JSON request line in, one JSON line out.
//!
//! The socket is created 0600 (root only) unless a group is configured, then
//! 0660 for that group. A malformed or oversized request gets an error reply
//! and the connection is closed; the daemon is never disturbed. Requests are
//! carried to the daemon's main loop, which owns all state, over a channel.
//!
//! Both local listeners, this socket and the metrics endpoint, share one
//! accept loop ([`Listener`]) that a local user cannot exhaust: at most
//! [`CONNECTIONS_MAX`] connections each, a deadline on every connection
//! (request and reply), backoff when accept fails (say, out of file
//! descriptors) instead of a busy loop, and an end on shutdown.

use std::{
    future::Future,
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot, watch},
};

use super::wire::{Command, REQUEST_MAX, Response, parse};

/// How long a client may take to send its request.
pub(super) const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a client may take to take its reply.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections one listener serves at once; further clients wait in the
/// kernel's accept backlog, which costs the daemon nothing.
pub const CONNECTIONS_MAX: usize = 64;
/// The first and the longest pause after a failed accept.
const BACKOFF_MIN: Duration = Duration::from_millis(10);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// An error setting the socket up, naming the path.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("control socket {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A request on its way to the main loop, with the way back.
pub type Request = (Command, oneshot::Sender<Response>);

/// Something that accepts connections: the control socket or the metrics
/// endpoint.
pub(super) trait Accept: Send + 'static {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin + 'static;
    fn accept(&self) -> impl Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Accept for UnixListener {
    type Stream = UnixStream;
    async fn accept(&self) -> std::io::Result<UnixStream> {
        UnixListener::accept(self).await.map(|(stream, _)| stream)
    }
}

impl Accept for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn accept(&self) -> std::io::Result<tokio::net::TcpStream> {
        tokio::net::TcpListener::accept(self)
            .await
            .map(|(stream, _)| stream)
    }
}

/// A bounded accept loop, after mini-redis's `Listener`: a permit is taken
/// before each accept, so at most [`CONNECTIONS_MAX`] connections are open;
/// a failed accept waits (doubling, up to [`BACKOFF_MAX`]) before the next;
/// the loop ends when `shutdown` says so.
pub(super) struct Listener<L> {
    listener: L,
    /// What it serves, for the log.
    what: &'static str,
    limit: std::sync::Arc<tokio::sync::Semaphore>,
    shutdown: watch::Receiver<bool>,
}

impl<L: Accept> Listener<L> {
    pub(super) fn new(listener: L, what: &'static str, shutdown: watch::Receiver<bool>) -> Self {
        Listener {
            listener,
            what,
            limit: std::sync::Arc::new(tokio::sync::Semaphore::new(CONNECTIONS_MAX)),
            shutdown,
        }
    }

    /// Serves every connection with `serve` until shutdown.
    pub(super) async fn run<F, Fut>(mut self, serve: F)
    where
        F: Fn(L::Stream) -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let mut backoff = BACKOFF_MIN;
        loop {
            let permit = tokio::select! {
                permit = self.limit.clone().acquire_owned() => permit.expect("never closed"),
                _ = self.shutdown.changed() => return,
            };
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                _ = self.shutdown.changed() => return,
            };
            match accepted {
                Ok(stream) => {
                    backoff = BACKOFF_MIN;
                    let served = serve(stream);
                    tokio::spawn(async move {
                        served.await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // EMFILE and friends: a busy retry would spin a core and
                    // fix nothing. Wait, then try again.
                    tracing::warn!(listener = self.what, error = %e, pause_ms = backoff.as_millis() as u64, "accept failed; backing off");
                    tokio::select! {
                        () = tokio::time::sleep(backoff) => {}
                        _ = self.shutdown.changed() => return,
                    }
                    backoff = (backoff * 2).min(BACKOFF_MAX);
                }
            }
        }
    }
}

/// Reads one line of at most `max` bytes within [`READ_TIMEOUT`]: `None`
/// for a client that closed without one.
pub(super) async fn read_request<R: tokio::io::AsyncRead + Unpin>(
    read: R,
    max: usize,
) -> Result<Option<String>, String> {
    let mut lines = BufReader::new(tokio::io::AsyncReadExt::take(read, max as u64)).lines();
    match tokio::time::timeout(READ_TIMEOUT, lines.next_line()).await {
        Err(_) => Err(format!("no request within {} s", READ_TIMEOUT.as_secs())),
        Ok(Err(e)) => Err(format!("reading the request: {e}")),
        Ok(Ok(line)) => Ok(line),
    }
}

/// Writes `bytes` within [`WRITE_TIMEOUT`]; a client that does not read is
/// dropped.
pub(super) async fn write_reply<W: tokio::io::AsyncWrite + Unpin>(mut write: W, bytes: &[u8]) {
    let _ = tokio::time::timeout(WRITE_TIMEOUT, write.write_all(bytes)).await;
}

/// Binds the socket at `path` (replacing a stale one), with its
/// permissions, and serves it until `shutdown`.
pub fn serve(
    path: &Path,
    group: Option<u32>,
    requests: mpsc::Sender<Request>,
    shutdown: watch::Receiver<bool>,
) -> Result<tokio::task::JoinHandle<()>, Error> {
    let bind_err = |source| Error::Bind {
        path: path.to_owned(),
        source,
    };
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(bind_err)?;
    }
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(bind_err(e)),
        _ => {}
    }
    let listener = UnixListener::bind(path).map_err(bind_err)?;
    // Permissions before anyone can have connected that should not: the
    // socket is only reachable once it exists, and it is tightened here.
    let mode = if group.is_some() { 0o660 } else { 0o600 };
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(bind_err)?;
    if let Some(gid) = group {
        std::os::unix::fs::chown(path, None, Some(gid)).map_err(bind_err)?;
    }
    let listener = Listener::new(listener, "control socket", shutdown);
    Ok(tokio::spawn(
        listener.run(move |stream| connection(stream, requests.clone())),
    ))
}

async fn connection(stream: UnixStream, requests: mpsc::Sender<Request>) {
    let (read, write) = stream.into_split();
    // Bounded reads: a line longer than REQUEST_MAX is cut off and refused.
    let response = match read_request(read, REQUEST_MAX + 1).await {
        Err(message) => Response::error(message),
        Ok(None) => return,
        Ok(Some(line)) => match parse(&line) {
            Err(message) => Response::error(message),
            Ok(command) => {
                let (reply, answer) = oneshot::channel();
                if requests.send((command, reply)).await.is_err() {
                    Response::error("the daemon is shutting down")
                } else {
                    answer
                        .await
                        .unwrap_or_else(|_| Response::error("no answer"))
                }
            }
        },
    };
    let mut text = serde_json::to_string(&response).unwrap_or_default();
    text.push('\n');
    write_reply(write, text.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn arbitrary_lines_never_panic() {
        let alphabet = b"{}\":,01versioncommandstatus \\x";
        let mut state = 0x1234_5678_9abc_def0_u64;
        for len in [0, 1, 7, 64, 300] {
            for _ in 0..2000 {
                let bytes: Vec<u8> = (0..len)
                    .map(|_| {
                        alphabet[(crate::xorshift(&mut state) % alphabet.len() as u64) as usize]
                    })
                    .collect();
                let _ = parse(&String::from_utf8_lossy(&bytes));
            }
        }
    }
}
