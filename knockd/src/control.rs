//! The control socket: a Unix stream socket speaking newline-delimited JSON.
//!
//! Protocol, version 1 (documented in the README): each request is one JSON
//! object on one line, at most [`REQUEST_MAX`] bytes, and gets one JSON line
//! back:
//!
//! ```text
//! {"version":1,"command":"status"}             -> {"ok":true,"data":{…}}
//! {"version":1,"command":"grants"}             -> {"ok":true,"data":[…]}
//! {"version":1,"command":"revoke","target":"198.18.0.2" | "laptop"}
//!                                 -> {"ok":true,"data":{"revoked":N,"connections_cut":M}}
//! {"version":1,"command":"reload"}
//! anything else                                 -> {"ok":false,"error":"…"}
//! ```
//!
//! The socket is created 0600 (root only) unless a group is configured, then
//! 0660 for that group. A malformed or oversized request gets an error reply
//! and the connection is closed; the daemon is never disturbed. Requests are
//! carried to the daemon's main loop, which owns all state, over a channel.

use std::{
    os::unix::fs::PermissionsExt as _,
    path::{Path, PathBuf},
    time::Duration,
};

use serde::{Deserialize, Serialize};
use tokio::{
    io::{AsyncBufReadExt as _, AsyncWriteExt as _, BufReader},
    net::{UnixListener, UnixStream},
    sync::{mpsc, oneshot},
};

/// Protocol version spoken here.
pub const VERSION: u32 = 1;
/// Largest request accepted, in bytes.
pub const REQUEST_MAX: usize = 4096;
/// How long a client may take to send its request.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

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

/// A request, as parsed.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(tag = "command", rename_all = "snake_case", deny_unknown_fields)]
pub enum Command {
    Status,
    Grants,
    Revoke {
        target: String,
    },
    Reload,
    /// The OpenMetrics text (also what the metrics endpoint serves).
    Metrics,
}

#[derive(Deserialize)]
struct Envelope {
    version: u32,
    #[serde(flatten)]
    command: serde_json::Value,
}

/// Parses one request line: bounded, versioned, unknown commands and
/// fields rejected with a message saying which.
pub fn parse(line: &str) -> Result<Command, String> {
    if line.len() > REQUEST_MAX {
        return Err(format!("request longer than {REQUEST_MAX} bytes"));
    }
    let envelope: Envelope =
        serde_json::from_str(line).map_err(|e| format!("not a request: {e}"))?;
    if envelope.version != VERSION {
        return Err(format!(
            "protocol version {} (this daemon speaks {VERSION})",
            envelope.version
        ));
    }
    let command = envelope.command;
    // serde does not reject extra fields on internally tagged unit variants,
    // so each command's fields are checked here.
    let object = command.as_object().ok_or("a request is a JSON object")?;
    let name = object
        .get("command")
        .and_then(serde_json::Value::as_str)
        .ok_or("missing field `command`")?;
    let allowed: &[&str] = match name {
        "revoke" => &["command", "target"],
        _ => &["command"],
    };
    if let Some(extra) = object.keys().find(|k| !allowed.contains(&k.as_str())) {
        return Err(format!(
            "bad request: unknown field `{extra}` for command `{name}`"
        ));
    }
    serde_json::from_value(command).map_err(|e| format!("bad request: {e}"))
}

/// A response line.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    pub ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Response {
    pub fn ok(data: serde_json::Value) -> Response {
        Response {
            ok: true,
            data: Some(data),
            error: None,
        }
    }

    pub fn error(message: impl Into<String>) -> Response {
        Response {
            ok: false,
            data: None,
            error: Some(message.into()),
        }
    }
}

/// A request on its way to the main loop, with the way back.
pub type Request = (Command, oneshot::Sender<Response>);

/// Serves `GET /metrics` on `listen` (a loopback address, checked by the
/// configuration) with the OpenMetrics text the main loop produces. Any
/// other request gets 404; requests are bounded like control requests.
pub async fn serve_metrics(
    listen: std::net::SocketAddr,
    requests: mpsc::Sender<Request>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let requests = requests.clone();
            tokio::spawn(async move {
                let (read, mut write) = stream.into_split();
                let mut lines =
                    BufReader::new(tokio::io::AsyncReadExt::take(read, REQUEST_MAX as u64)).lines();
                let Ok(Ok(Some(request_line))) =
                    tokio::time::timeout(READ_TIMEOUT, lines.next_line()).await
                else {
                    return;
                };
                let reply = if request_line.starts_with("GET /metrics ")
                    || request_line == "GET /metrics"
                {
                    let (tx, rx) = oneshot::channel();
                    let body = if requests.send((Command::Metrics, tx)).await.is_ok() {
                        rx.await
                            .ok()
                            .and_then(|r| r.data)
                            .and_then(|d| d.as_str().map(str::to_owned))
                    } else {
                        None
                    };
                    match body {
                        Some(body) => format!(
                            "HTTP/1.1 200 OK\r\nContent-Type: application/openmetrics-text; version=1.0.0; charset=utf-8\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                            body.len()
                        ),
                        None => "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n"
                            .to_owned(),
                    }
                } else {
                    "HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n".to_owned()
                };
                let _ = write.write_all(reply.as_bytes()).await;
            });
        }
    });
    Ok(())
}

/// Binds the socket at `path` (replacing a stale one), with its
/// permissions, and serves it until the process ends.
pub fn serve(
    path: &Path,
    group: Option<u32>,
    requests: mpsc::Sender<Request>,
) -> Result<(), Error> {
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
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(connection(stream, requests.clone()));
        }
    });
    Ok(())
}

async fn connection(stream: UnixStream, requests: mpsc::Sender<Request>) {
    let (read, mut write) = stream.into_split();
    // Bounded reads: a line longer than REQUEST_MAX is cut off and refused.
    let mut lines =
        BufReader::new(tokio::io::AsyncReadExt::take(read, REQUEST_MAX as u64 + 1)).lines();
    let response = match tokio::time::timeout(READ_TIMEOUT, lines.next_line()).await {
        Err(_) => Response::error("no request within 5 s"),
        Ok(Err(e)) => Response::error(format!("reading the request: {e}")),
        Ok(Ok(None)) => return,
        Ok(Ok(Some(line))) => match parse(&line) {
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
    let _ = write.write_all(text.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_parse_strictly() {
        assert_eq!(
            parse(r#"{"version":1,"command":"status"}"#),
            Ok(Command::Status)
        );
        assert_eq!(
            parse(r#"{"version":1,"command":"revoke","target":"laptop"}"#),
            Ok(Command::Revoke {
                target: "laptop".into()
            })
        );
        assert!(
            parse(r#"{"version":2,"command":"status"}"#)
                .unwrap_err()
                .contains("version 2")
        );
        assert!(
            parse(r#"{"version":1,"command":"format_disk"}"#)
                .unwrap_err()
                .contains("format_disk")
        );
        assert!(
            parse(r#"{"version":1,"command":"status","extra":1}"#)
                .unwrap_err()
                .contains("extra")
        );
        assert!(
            parse(r#"{"version":1,"command":"revoke"}"#)
                .unwrap_err()
                .contains("target")
        );
        assert!(parse("").is_err());
        assert!(parse("\u{0}\u{1}garbage").is_err());
        assert!(
            parse(&"x".repeat(REQUEST_MAX + 1))
                .unwrap_err()
                .contains("longer")
        );
    }

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
