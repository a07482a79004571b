//! Prometheus metrics over HTTP (`metrics.listen`): the flow table and the datapath counters,
//! read when scraped. Label values come from fixed sets (verdicts, datapaths), never from
//! users or addresses, so the number of series is bounded.

use std::{fmt::Write as _, sync::Arc};

use relay_common::Verdict;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
};

use crate::{
    calls::Calls,
    datapath::{DatapathKind, table::FlowTable},
    signalling::hub::Hub,
    turn::driver::TurnService,
};

/// The `[metrics]` section.
#[derive(Debug, Clone, Default, serde::Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// ADDRESS:PORT to serve Prometheus metrics on (`/metrics`); empty: no metrics.
    pub listen: String,
}

impl MetricsConfig {
    /// The address to listen on, when metrics are on and the address is valid.
    pub fn address(&self) -> Option<std::net::SocketAddr> {
        self.listen.parse().ok()
    }

    pub fn problems(&self, problem: &mut impl FnMut(&'static str, String, &str)) {
        if !self.listen.is_empty() && self.address().is_none() {
            problem(
                "metrics.listen",
                format!("{:?}", self.listen),
                "expected ADDRESS:PORT (IPv6 as [ADDRESS]:PORT), or empty for no metrics",
            );
        }
    }
}

/// Longest request head read before answering; the path is all that matters.
const MAX_REQUEST_BYTES: usize = 8 * 1024;

pub async fn serve(
    listener: TcpListener,
    table: Arc<FlowTable>,
    turn: Option<Arc<TurnService>>,
    signalling: Option<Arc<Hub>>,
    calls: Option<Arc<Calls>>,
    mut stopped: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    tokio::spawn(answer(
                        stream,
                        table.clone(),
                        turn.clone(),
                        signalling.clone(),
                        calls.clone(),
                    ));
                }
                Err(err) => tracing::warn!(%err, "metrics: accept failed"),
            },
            _ = stopped.changed() => return,
        }
    }
}

async fn answer(
    mut stream: TcpStream,
    table: Arc<FlowTable>,
    turn: Option<Arc<TurnService>>,
    signalling: Option<Arc<Hub>>,
    calls: Option<Arc<Calls>>,
) {
    let mut head = vec![0u8; MAX_REQUEST_BYTES];
    let mut read = 0;
    // Read until the end of the request head, a full buffer, or the peer stops sending.
    while read < head.len() && !head[..read].windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut head[read..]).await {
            Ok(0) | Err(_) => break,
            Ok(n) => read += n,
        }
    }
    let request = String::from_utf8_lossy(&head[..read]);
    let (status, content_type, body) =
        match request.split_whitespace().take(2).collect::<Vec<_>>()[..] {
            ["GET", "/metrics"] => (
                "200 OK",
                "text/plain; version=0.0.4",
                render(
                    &table,
                    turn.as_deref(),
                    signalling.as_deref(),
                    calls.as_deref(),
                ),
            ),
            ["GET", _] => ("404 Not Found", "text/plain", "try /metrics\n".to_owned()),
            _ => (
                "405 Method Not Allowed",
                "text/plain",
                "GET /metrics\n".to_owned(),
            ),
        };
    let response = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = stream.write_all(response.as_bytes()).await;
}

/// The metrics in the Prometheus text exposition format.
pub fn render(
    table: &FlowTable,
    turn: Option<&TurnService>,
    signalling: Option<&Hub>,
    calls: Option<&Calls>,
) -> String {
    let status = table.status();
    let stats = table.stats();
    let mut out = String::new();
    let mut metric = |name: &str, kind: &str, help: &str, samples: &[(String, u64)]| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        for (labels, value) in samples {
            let _ = writeln!(out, "{name}{labels} {value}");
        }
    };
    let datapath = match status.kind {
        DatapathKind::Xdp => "xdp",
        DatapathKind::Userspace => "userspace",
    };
    metric(
        "relay_datapath_info",
        "gauge",
        "The datapath forwarding flows (1 for the one in use).",
        &[(format!("{{datapath=\"{datapath}\"}}"), 1)],
    );
    metric(
        "relay_flows",
        "gauge",
        "Flows installed.",
        &[(String::new(), table.len() as u64)],
    );
    metric(
        "relay_flows_capacity",
        "gauge",
        "Flows the table can hold.",
        &[(String::new(), u64::from(status.capacity))],
    );
    metric(
        "relay_flows_expired_total",
        "counter",
        "Flows removed because they were idle longer than flows.idle_timeout_secs.",
        &[(String::new(), table.expired_total())],
    );
    let user = &stats.userspace;
    let (forwarded, forwarded_bytes) = stats
        .verdicts
        .iter()
        .filter(|v| v.verdict == Verdict::Tx.name() || v.verdict == Verdict::Redirect.name())
        .fold((0, 0), |(packets, bytes), v| {
            (packets + v.packets, bytes + v.bytes)
        });
    metric(
        "relay_forwarded_packets_total",
        "counter",
        "Packets forwarded, by the path that forwarded them.",
        &[
            ("{path=\"xdp\"}".to_owned(), forwarded),
            ("{path=\"userspace\"}".to_owned(), user.forwarded_packets),
        ],
    );
    metric(
        "relay_forwarded_bytes_total",
        "counter",
        "Bytes forwarded (XDP: frames as received; userspace: IP packets), by path.",
        &[
            ("{path=\"xdp\"}".to_owned(), forwarded_bytes),
            ("{path=\"userspace\"}".to_owned(), user.forwarded_bytes),
        ],
    );
    let verdicts: Vec<(String, u64)> = stats
        .verdicts
        .iter()
        .map(|v| (format!("{{verdict=\"{}\"}}", v.verdict), v.packets))
        .collect();
    metric(
        "relay_xdp_packets_total",
        "counter",
        "Packets the XDP program saw, by what it did with them (tx/redirect: forwarded; pass_*: left to the kernel, by reason; aborted: dropped on a broken invariant of the program).",
        &verdicts,
    );
    metric(
        "relay_userspace_dropped_packets_total",
        "counter",
        "Packets the userspace path dropped, by reason.",
        &[
            (
                "{reason=\"unknown_source\"}".to_owned(),
                user.unknown_source_packets,
            ),
            (
                "{reason=\"malformed_channel_data\"}".to_owned(),
                user.malformed_packets,
            ),
            ("{reason=\"send_error\"}".to_owned(), user.send_errors),
        ],
    );
    if let Some(calls) = calls {
        metric(
            "relay_calls",
            "gauge",
            "Calls in progress (offered, connecting or connected).",
            &[(String::new(), calls.len() as u64)],
        );
        let tally = calls.tally();
        let ended: Vec<(String, u64)> = tally
            .ended
            .iter()
            .map(|(reason, count)| (format!("{{reason=\"{}\"}}", reason.name()), *count))
            .collect();
        metric(
            "relay_calls_ended_total",
            "counter",
            "Calls ended, by reason (hangup, operator, ice-failed, ice-timeout, consent-lost, media-timeout, relay-stopped).",
            &ended,
        );
    }
    if let Some(hub) = signalling {
        let (controllers, clients) = hub.counts();
        metric(
            "relay_signalling_sessions",
            "gauge",
            "Authenticated signalling sessions, by role.",
            &[
                ("{role=\"controller\"}".to_owned(), controllers as u64),
                ("{role=\"client\"}".to_owned(), clients as u64),
            ],
        );
    }
    if let Some(turn) = turn {
        let summary = turn.summary();
        metric(
            "relay_turn_allocations",
            "gauge",
            "TURN allocations.",
            &[(String::new(), summary.allocations)],
        );
        metric(
            "relay_turn_channels",
            "gauge",
            "TURN channels bound.",
            &[(String::new(), summary.channels)],
        );
        // Codes and reasons are the server's own fixed phrases: a bounded set.
        let refusals: Vec<(String, u64)> = summary
            .refusals
            .iter()
            .map(|(code, reason, count)| {
                (format!("{{code=\"{code}\",reason=\"{reason}\"}}"), *count)
            })
            .collect();
        metric(
            "relay_turn_refusals_total",
            "counter",
            "TURN requests refused, by error code and reason (401: failed authentication; the challenge of a client's first request is not counted).",
            &refusals,
        );
    }
    // A summary: its sum is in seconds, a fraction (the closure above writes integers).
    if let Some(calls) = calls {
        let tally = calls.tally();
        let _ = write!(
            out,
            "# HELP relay_call_setup_seconds From call.create to ICE connected with the media flows installed.\n# TYPE relay_call_setup_seconds summary\nrelay_call_setup_seconds_sum {:.6}\nrelay_call_setup_seconds_count {}\n",
            tally.setup_seconds, tally.connected
        );
    }
    out
}
