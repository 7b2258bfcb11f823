//! The metrics endpoint: `GET /metrics` over HTTP on a loopback address,
//! answered with the OpenMetrics text the main loop produces. It shares the
//! control socket's bounded accept loop and deadlines.

use tokio::sync::{mpsc, oneshot, watch};

use super::{
    server::{Listener, Request, write_reply},
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

/// The request line and headers of an HTTP request, at most `max` bytes,
/// within the control socket's read deadline; `None` if it does not come.
async fn read_head(read: tokio::net::tcp::OwnedReadHalf, max: usize) -> Option<Vec<String>> {
    use tokio::io::AsyncBufReadExt as _;
    let mut lines =
        tokio::io::BufReader::new(tokio::io::AsyncReadExt::take(read, max as u64)).lines();
    let head = async {
        let mut head = Vec::new();
        while let Ok(Some(line)) = lines.next_line().await {
            if line.is_empty() {
                break;
            }
            head.push(line);
        }
        head
    };
    tokio::time::timeout(super::server::READ_TIMEOUT, head)
        .await
        .ok()
        .filter(|h| !h.is_empty())
}

/// Whether the request's Accept header asks for OpenMetrics (Prometheus
/// asks for it first, with its own text format as the fallback).
fn wants_openmetrics(head: &[String]) -> bool {
    head.iter().skip(1).any(|line| {
        line.split_once(':').is_some_and(|(name, value)| {
            name.trim().eq_ignore_ascii_case("accept")
                && value.contains("application/openmetrics-text")
        })
    })
}

/// The Prometheus text format 0.0.4 from OpenMetrics text: no `# EOF` or
/// `# UNIT`, counter families named with their `_total` suffix, info
/// families as gauges named `_info`, and no `_created` samples.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    // Each family's suffix, from its TYPE line: prometheus-client writes
    // HELP before TYPE, so they are read first, in one pass.
    let suffix: std::collections::HashMap<&str, (&str, &str)> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' '))
        .map(|(name, kind)| {
            let renamed = match kind {
                "counter" => ("counter", "_total"),
                "info" => ("gauge", "_info"),
                other => (other, ""),
            };
            (name, renamed)
        })
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, _) = rest.split_once(' ').unwrap_or((rest, ""));
            let (kind, add) = suffix.get(name).copied().unwrap_or(("", ""));
            out.push_str(&format!("# TYPE {name}{add} {kind}\n"));
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            let add = suffix.get(name).map_or("", |(_, add)| add);
            out.push_str(&format!("# HELP {name}{add} {help}\n"));
            continue;
        }
        let sample = line.split(['{', ' ']).next().unwrap_or("");
        if sample.ends_with("_created") {
            continue;
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

async fn metrics_connection(stream: tokio::net::TcpStream, requests: mpsc::Sender<Request>) {
    let (read, write) = stream.into_split();
    let Some(head) = read_head(read, REQUEST_MAX).await else {
        return;
    };
    let request_line = head[0].as_str();
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
        let openmetrics = wants_openmetrics(&head);
        match body {
            Some(body) => {
                let (content_type, body) = if openmetrics {
                    (
                        "application/openmetrics-text; version=1.0.0; charset=utf-8",
                        body,
                    )
                } else {
                    (
                        "text/plain; version=0.0.4; charset=utf-8",
                        to_prometheus_text(&body),
                    )
                };
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            }
            None => "HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n\r\n".to_owned(),
        }
    } else {
        "HTTP/1.1 404 Not Found\r\nConnection: close\r\n\r\n".to_owned()
    };
    write_reply(write, reply.as_bytes()).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openmetrics_becomes_prometheus_text() {
        let openmetrics = "# HELP knockd_build The running knockd.\n\
            # TYPE knockd_build info\n\
            knockd_build_info{version=\"0.1.0\"} 1\n\
            # HELP knockd_decisions Knock decisions.\n\
            # TYPE knockd_decisions counter\n\
            knockd_decisions_total{door=\"ssh\",outcome=\"accepted\",reason=\"\"} 2\n\
            knockd_decisions_created{door=\"ssh\"} 1.7e9\n\
            # HELP knockd_grants Live grants.\n\
            # TYPE knockd_grants gauge\n\
            knockd_grants{door=\"ssh\"} 1\n\
            # EOF\n";
        let text = to_prometheus_text(openmetrics);
        assert_eq!(
            text,
            "# HELP knockd_build_info The running knockd.\n\
             # TYPE knockd_build_info gauge\n\
             knockd_build_info{version=\"0.1.0\"} 1\n\
             # HELP knockd_decisions_total Knock decisions.\n\
             # TYPE knockd_decisions_total counter\n\
             knockd_decisions_total{door=\"ssh\",outcome=\"accepted\",reason=\"\"} 2\n\
             # HELP knockd_grants Live grants.\n\
             # TYPE knockd_grants gauge\n\
             knockd_grants{door=\"ssh\"} 1\n"
        );
        let head = |accept: &str| vec!["GET /metrics HTTP/1.1".to_owned(), accept.to_owned()];
        assert!(wants_openmetrics(&head(
            "Accept: application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5"
        )));
        assert!(!wants_openmetrics(&head("Accept: text/plain")));
        assert!(!wants_openmetrics(&head(
            "X-Accept: application/openmetrics-text"
        )));
    }
}
