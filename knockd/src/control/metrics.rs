//! The metrics endpoint: `GET /metrics` over HTTP on a loopback address,
//! answered with the OpenMetrics text the main loop produces. It shares the
//! control socket's bounded accept loop and deadlines.

use tokio::sync::{mpsc, oneshot, watch};

use super::{
    server::{Listener, Request, read_request, write_reply},
    wire::{Command, REQUEST_MAX},
};

/// Serves `GET /metrics` on `listen` (a loopback address, checked by the
/// configuration) with the OpenMetrics text the main loop produces, until
/// `shutdown`. Any other request gets 404; requests are bounded like
/// control requests.
pub async fn serve_metrics(
    listen: std::net::SocketAddr,
    requests: mpsc::Sender<Request>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let listener = Listener::new(listener, "metrics", shutdown);
    Ok(tokio::spawn(listener.run(move |stream| {
        metrics_connection(stream, requests.clone())
    })))
}

async fn metrics_connection(stream: tokio::net::TcpStream, requests: mpsc::Sender<Request>) {
    let (read, write) = stream.into_split();
    let Ok(Some(request_line)) = read_request(read, REQUEST_MAX).await else {
        return;
    };
    let reply = if request_line.starts_with("GET /metrics ") || request_line == "GET /metrics" {
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
            None => "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n".to_owned(),
        }
    } else {
        "HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n".to_owned()
    };
    write_reply(write, reply.as_bytes()).await;
}
