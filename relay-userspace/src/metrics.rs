//! Prometheus metrics over HTTP (`metrics.listen`): the flow table, the datapath counters,
//! TURN, signalling and calls, read when scraped and written in the OpenMetrics text format
//! (prometheus-client), served by hyper. Label values come from fixed sets (verdicts,
//! datapaths, refusal reasons, end reasons), never from users or addresses, so the number
//! of series is bounded.

use std::{convert::Infallible, fmt, sync::Arc, time::Duration};

use http_body_util::Full;
use hyper::{
    Method, Request, Response, StatusCode,
    body::{Bytes, Incoming},
    header,
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
    registry::Registry,
};
use relay_common::Verdict;
use tokio::sync::watch;

use crate::{
    admission::{Admission, Listener, Refused},
    calls::{Calls, EndReason, SETUP_BUCKETS},
    datapath::{DatapathKind, table::FlowTable},
    ng::{
        calls::{Ended, NgCalls},
        server::NgStats,
    },
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

/// A scraper that sends nothing, or too slowly, is cut off.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What the metrics are read from.
pub struct Sources {
    pub table: Arc<FlowTable>,
    pub admission: Arc<Admission>,
    pub turn: Option<Arc<TurnService>>,
    pub signalling: Option<Arc<Hub>>,
    pub calls: Option<Arc<Calls>>,
    /// ng calls and the ng commands served.
    pub ng: Option<(Arc<NgCalls>, Arc<NgStats>)>,
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl fmt::Debug for Sources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sources")
            .field("turn", &self.turn.is_some())
            .field("signalling", &self.signalling.is_some())
            .field("calls", &self.calls.is_some())
            .finish()
    }
}

pub async fn serve(mut listener: Listener, sources: Sources, mut stopped: watch::Receiver<bool>) {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Arc::new(sources)));
    let registry = Arc::new(registry);
    loop {
        tokio::select! {
            (stream, _, admitted) = listener.accept() => {
                    let registry = registry.clone();
                    let service = service_fn(move |request| {
                        let response = respond(&request, &registry);
                        async move { Ok::<_, Infallible>(response) }
                    });
                    // One request per connection (the answer closes it); a scraper that
                    // does not finish its request in time is closed too.
                    let connection = http1::Builder::new()
                        .keep_alive(false)
                        .timer(TokioTimer::new())
                        .header_read_timeout(REQUEST_TIMEOUT)
                        .serve_connection(TokioIo::new(stream), service);
                    tokio::spawn(async move {
                        let _ = tokio::time::timeout(2 * REQUEST_TIMEOUT, connection).await;
                        drop(admitted);
                    });
            },
            _ = stopped.changed() => return,
        }
    }
}

fn respond(request: &Request<Incoming>, registry: &Registry) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            render(registry),
        ),
        (&Method::GET, _) => (
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics\n".to_owned(),
        ),
        _ => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET /metrics\n".to_owned(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(content_type),
    );
    response
}

/// The metrics in the OpenMetrics text format.
pub fn render(registry: &Registry) -> String {
    let mut text = String::new();
    if let Err(err) = prometheus_client::encoding::text::encode(&mut text, registry) {
        tracing::error!(%err, "metrics: cannot encode");
    }
    text
}

/// Writes one metric family: its descriptor, then a sample per label set.
fn family<L: EncodeLabelSet, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    samples: impl IntoIterator<Item = (L, M)>,
) -> Result<(), fmt::Error> {
    let mut metric = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, sample) in samples {
        sample.encode(metric.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One sample without labels.
fn single<M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    sample: M,
) -> Result<(), fmt::Error> {
    let kind = sample.metric_type();
    sample.encode(encoder.encode_descriptor(name, help, None, kind)?)
}

fn gauge(value: u64) -> ConstGauge<i64> {
    ConstGauge::new(i64::try_from(value).unwrap_or(i64::MAX))
}

impl Collector for Sources {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let status = self.table.status();
        let stats = self.table.stats();
        let datapath = match status.kind {
            DatapathKind::Xdp => "xdp",
            DatapathKind::Userspace => "userspace",
        };
        family(
            &mut encoder,
            "relay_datapath_info",
            "The datapath forwarding flows (1 for the one in use).",
            MetricType::Gauge,
            [([("datapath", datapath)], gauge(1))],
        )?;
        single(
            &mut encoder,
            "relay_flows",
            "Flows installed.",
            gauge(self.table.len() as u64),
        )?;
        single(
            &mut encoder,
            "relay_flows_capacity",
            "Flows the table can hold.",
            gauge(u64::from(status.capacity)),
        )?;
        let connections = self.admission.status();
        single(
            &mut encoder,
            "relay_connections_open",
            "TCP connections held (signalling, TURN over TCP and TLS, metrics).",
            gauge(u64::from(connections.open)),
        )?;
        family(
            &mut encoder,
            "relay_connections_refused",
            "TCP connections closed as soon as accepted, by the limit they met (connections.max_per_source, connections.max_total).",
            MetricType::Counter,
            [
                (
                    [("limit", Refused::PerSource.label())],
                    ConstCounter::new(connections.refused_per_source),
                ),
                (
                    [("limit", Refused::Total.label())],
                    ConstCounter::new(connections.refused_total),
                ),
            ],
        )?;
        single(
            &mut encoder,
            "relay_connections_accept_failures",
            "Accepts that failed on the TCP listeners (out of file descriptors, mostly).",
            ConstCounter::new(connections.accept_failures),
        )?;
        single(
            &mut encoder,
            "relay_flows_expired",
            "Flows removed because they were idle longer than flows.idle_timeout_secs.",
            ConstCounter::new(self.table.expired_total()),
        )?;
        let user = &stats.userspace;
        let (forwarded, forwarded_bytes) = stats
            .verdicts
            .iter()
            .filter(|v| v.verdict == Verdict::Tx.name() || v.verdict == Verdict::Redirect.name())
            .fold((0, 0), |(packets, bytes), v| {
                (packets + v.packets, bytes + v.bytes)
            });
        family(
            &mut encoder,
            "relay_forwarded_packets",
            "Packets forwarded, by the path that forwarded them.",
            MetricType::Counter,
            [
                ([("path", "xdp")], ConstCounter::new(forwarded)),
                (
                    [("path", "userspace")],
                    ConstCounter::new(user.forwarded_packets),
                ),
            ],
        )?;
        family(
            &mut encoder,
            "relay_forwarded_bytes",
            "Bytes forwarded (XDP: frames as received; userspace: IP packets), by path.",
            MetricType::Counter,
            [
                ([("path", "xdp")], ConstCounter::new(forwarded_bytes)),
                (
                    [("path", "userspace")],
                    ConstCounter::new(user.forwarded_bytes),
                ),
            ],
        )?;
        family(
            &mut encoder,
            "relay_xdp_packets",
            "Packets the XDP program saw, by what it did with them (tx/redirect: forwarded; pass_*: left to the kernel, by reason; aborted: dropped on a broken invariant of the program).",
            MetricType::Counter,
            stats.verdicts.iter().map(|v| {
                (
                    [("verdict", v.verdict.as_str())],
                    ConstCounter::new(v.packets),
                )
            }),
        )?;
        family(
            &mut encoder,
            "relay_userspace_dropped_packets",
            "Packets the userspace path dropped, by reason.",
            MetricType::Counter,
            [
                ("unknown_source", user.unknown_source_packets),
                ("malformed_channel_data", user.malformed_packets),
                ("send_error", user.send_errors),
            ]
            .map(|(reason, count)| ([("reason", reason)], ConstCounter::new(count))),
        )?;
        if let Some(workers) = &status.workers {
            let counters = workers.counters;
            family(
                &mut encoder,
                "relay_transcrypt_packets",
                "Packets of bridged calls the AF_XDP workers took (received), sent, or dropped, by reason (refused: SRTP authentication, replay or no keys; unknown_flow; malformed; not_sent: no socket, frame or ring room on the egress; kernel: before a worker saw them).",
                MetricType::Counter,
                [
                    ("received", counters.received),
                    ("sent", counters.sent),
                    ("refused", counters.refused),
                    ("unknown_flow", counters.unknown_flow),
                    ("malformed", counters.malformed),
                    ("not_sent", counters.not_sent),
                    ("kernel", counters.kernel_dropped),
                ]
                .map(|(outcome, count)| ([("outcome", outcome)], ConstCounter::new(count))),
            )?;
        }
        if let Some(calls) = &self.calls {
            let tally = calls.tally();
            single(
                &mut encoder,
                "relay_calls",
                "Calls in progress (offered, connecting or connected).",
                gauge(calls.len() as u64),
            )?;
            family(
                &mut encoder,
                "relay_calls_ended",
                "Calls ended, by reason (hangup, operator, ice-failed, ice-timeout, consent-lost, media-timeout, relay-stopped, dtls-failed, dtls-timeout, media-security-failed).",
                MetricType::Counter,
                EndReason::ALL.map(|reason| {
                    let count = tally.ended.get(&reason).copied().unwrap_or(0);
                    ([("reason", reason.name())], ConstCounter::new(count))
                }),
            )?;
            let bridged = tally.bridged;
            family(
                &mut encoder,
                "relay_calls_bridged_packets",
                "Packets of bridged calls the relay transcrypted and sent on, by direction.",
                MetricType::Counter,
                [
                    ("to_pbx", bridged.to_pbx_packets),
                    ("to_app", bridged.to_app_packets),
                ]
                .map(|(direction, count)| ([("direction", direction)], ConstCounter::new(count))),
            )?;
            family(
                &mut encoder,
                "relay_calls_bridged_dropped_packets",
                "Packets of bridged calls the relay dropped, by reason (SRTP authentication failed, replayed, neither RTP nor RTCP).",
                MetricType::Counter,
                [
                    ("authentication", bridged.auth_failures),
                    ("replay", bridged.replays),
                    ("malformed", bridged.malformed),
                ]
                .map(|(reason, count)| ([("reason", reason)], ConstCounter::new(count))),
            )?;
            family(
                &mut encoder,
                "relay_calls_ice_discarded_packets",
                "Datagrams the calls' ICE port dropped before any call saw them, by reason (not STUN from a source no call talks to, STUN that does not parse, a connected call's queue full).",
                MetricType::Counter,
                crate::ice::consent::PortDiscard::ALL
                    .into_iter()
                    .zip(tally.ice_discards)
                    .map(|(why, count)| ([("reason", why.name())], ConstCounter::new(count))),
            )?;
            let buckets: Vec<(f64, u64)> = SETUP_BUCKETS
                .iter()
                .copied()
                .chain([f64::MAX])
                .zip(tally.setup_buckets)
                .collect();
            encoder
                .encode_descriptor(
                    "relay_call_setup_seconds",
                    "From call.create to ICE connected with the media flows installed.",
                    None,
                    MetricType::Histogram,
                )?
                .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                    tally.setup_seconds,
                    tally.connected,
                    &buckets,
                    None,
                )?;
        }
        if let Some((calls, stats)) = &self.ng {
            single(
                &mut encoder,
                "relay_ng_calls",
                "ng calls in progress (offered or answered).",
                gauge(calls.len() as u64),
            )?;
            let totals = calls.totals();
            family(
                &mut encoder,
                "relay_ng_calls_ended",
                "ng calls ended, by reason (deleted by the SIP proxy or at relayd's stop, no answer, no media).",
                MetricType::Counter,
                [
                    ("deleted", Ended::Deleted),
                    ("no-answer", Ended::NoAnswer),
                    ("media-timeout", Ended::MediaTimeout),
                ]
                .map(|(reason, ended)| {
                    let count = totals.ended.get(&ended).copied().unwrap_or(0);
                    ([("reason", reason)], ConstCounter::new(count))
                }),
            )?;
            family(
                &mut encoder,
                "relay_ng_commands",
                "ng commands served, by command and result (ok or error; command none: not parsed).",
                MetricType::Counter,
                stats
                    .counts()
                    .into_iter()
                    .map(|((command, result), count)| {
                        (
                            [("command", command), ("result", result)],
                            ConstCounter::new(count),
                        )
                    }),
            )?;
        }
        if let Some(push) = self.signalling.as_ref().and_then(|hub| hub.push()) {
            let outcomes = push.outcomes();
            family(
                &mut encoder,
                "relay_push_total",
                "Pushes to wake a sleeping app, by provider and outcome (sent, dead-token: the registration was removed, refused: a 4xx, failed: not delivered after the last try).",
                MetricType::Counter,
                crate::push::Provider::ALL
                    .into_iter()
                    .flat_map(|provider| {
                        crate::push::Outcome::ALL.map(move |outcome| (provider, outcome))
                    })
                    .map(|(provider, outcome)| {
                        let count = outcomes.get(&(provider, outcome)).copied().unwrap_or(0);
                        (
                            [("provider", provider.name()), ("outcome", outcome.name())],
                            ConstCounter::new(count),
                        )
                    }),
            )?;
            single(
                &mut encoder,
                "relay_push_devices",
                "Devices registered for pushes.",
                gauge(push.registered() as u64),
            )?;
        }
        if let Some(cluster) = &self.cluster {
            use crate::cluster::{Link, NodeState};
            let status = cluster.status();
            single(
                &mut encoder,
                "relay_cluster_redis_up",
                "1 when the last refresh of this node's keys in Redis got through, else 0 (the node serves its own sessions and calls only).",
                gauge(u64::from(matches!(status.link, Link::Up { .. }))),
            )?;
            single(
                &mut encoder,
                "relay_cluster_redis_unavailable",
                "Times Redis stopped answering this node (joining without it counts once).",
                ConstCounter::new(cluster.degraded_total()),
            )?;
            single(
                &mut encoder,
                "relay_cluster_events_dropped",
                "Call events for sessions on other relays dropped because Redis took them slower than they came.",
                ConstCounter::new(cluster.events_dropped()),
            )?;
            let count = |wanted: fn(&NodeState) -> bool| {
                gauge(
                    status
                        .nodes
                        .iter()
                        .filter(|node| wanted(&node.state))
                        .count() as u64,
                )
            };
            family(
                &mut encoder,
                "relay_cluster_members",
                "The cluster's members as this node last read them, by state (down: its health record expired).",
                MetricType::Gauge,
                [
                    (
                        [("state", "alive")],
                        count(|s| matches!(s, NodeState::Alive(_))),
                    ),
                    ([("state", "down")], count(|s| matches!(s, NodeState::Down))),
                    (
                        [("state", "unreadable")],
                        count(|s| matches!(s, NodeState::Unreadable(_))),
                    ),
                ],
            )?;
            let (answered, unanswered) = cluster.requests();
            family(
                &mut encoder,
                "relay_cluster_call_requests",
                "Call requests of sessions here sent to the relay that anchors the call, by outcome (unanswered: that relay did not reply within 3 s).",
                MetricType::Counter,
                [
                    ([("outcome", "answered")], ConstCounter::new(answered)),
                    ([("outcome", "unanswered")], ConstCounter::new(unanswered)),
                ],
            )?;
            let (takeovers, calls, allocations) = cluster.taken_over();
            single(
                &mut encoder,
                "relay_cluster_takeovers",
                "Times this standby took over the node it stands by for.",
                ConstCounter::new(takeovers),
            )?;
            family(
                &mut encoder,
                "relay_cluster_taken_over",
                "Calls and TURN allocations this standby took over.",
                MetricType::Counter,
                [
                    ([("what", "calls")], ConstCounter::new(calls)),
                    ([("what", "allocations")], ConstCounter::new(allocations)),
                ],
            )?;
        }
        if let Some(hub) = &self.signalling {
            let (controllers, clients) = hub.counts();
            family(
                &mut encoder,
                "relay_signalling_sessions",
                "Authenticated signalling sessions, by role.",
                MetricType::Gauge,
                [
                    ([("role", "controller")], gauge(controllers as u64)),
                    ([("role", "client")], gauge(clients as u64)),
                ],
            )?;
        }
        if let Some(turn) = &self.turn {
            let summary = turn.summary();
            single(
                &mut encoder,
                "relay_turn_allocations",
                "TURN allocations.",
                gauge(summary.allocations),
            )?;
            single(
                &mut encoder,
                "relay_turn_channels",
                "TURN channels bound.",
                gauge(summary.channels),
            )?;
            // Codes and reasons are the server's closed set of refusals: a bounded set.
            family(
                &mut encoder,
                "relay_turn_refusals",
                "TURN requests refused, by error code and reason (401: failed authentication; the challenge of a client's first request is not counted).",
                MetricType::Counter,
                summary.refusals.iter().map(|(code, reason, count)| {
                    (
                        [("code", code.to_string()), ("reason", (*reason).to_owned())],
                        ConstCounter::new(*count),
                    )
                }),
            )?;
            single(
                &mut encoder,
                "relay_turn_relay_bind_failures",
                "TURN relay ports that could not be bound because another socket on the host held them (turn.port_range overlaps another service or the ephemeral ports); each is left out for a minute and the Allocate tried on another port.",
                ConstCounter::new(summary.relay_bind_failures),
            )?;
            family(
                &mut encoder,
                "relay_turn_discarded",
                "Datagrams on TURN's ports dropped without an answer, by reason: not TURN, undecodable STUN, ChannelData whose length lies, responses, no allocation, no channel, no permission.",
                MetricType::Counter,
                summary
                    .discards
                    .iter()
                    .map(|(reason, count)| ([("reason", *reason)], ConstCounter::new(*count))),
            )?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    use super::*;
    use crate::{datapath::memory::Memory, time::monotonic_ns};

    async fn get(address: std::net::SocketAddr, request: &str) -> String {
        let mut stream = tokio::net::TcpStream::connect(address).await.unwrap();
        stream.write_all(request.as_bytes()).await.unwrap();
        let mut response = String::new();
        // The server closes the connection after its answer.
        tokio::time::timeout(Duration::from_secs(5), stream.read_to_string(&mut response))
            .await
            .expect("answered and closed")
            .unwrap();
        response
    }

    #[tokio::test]
    async fn metrics_are_served_in_the_openmetrics_text_format() {
        let table = Arc::new(FlowTable::new(
            Box::new(Arc::new(Memory::default())),
            60,
            monotonic_ns(),
        ));
        let spec = crate::datapath::FlowSpec {
            src: "198.51.100.7:4000".parse().unwrap(),
            dst: "203.0.113.1:20000".parse().unwrap(),
            new_src: "10.0.0.1:30000".parse().unwrap(),
            new_dst: "10.0.0.5:5004".parse().unwrap(),
            channel: None,
            rtcp_to_userspace: false,
            opaque_payload: false,
            to_worker: false,
        };
        table.add(&[spec, spec.reverse()], monotonic_ns()).unwrap();
        let admission = Admission::new(&Default::default(), 1024);
        let listener = Listener::new(
            tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap(),
            "metrics",
            admission.clone(),
        );
        let address = listener.local_addr().unwrap();
        let (stop, stopped) = watch::channel(false);
        let sources = Sources {
            table,
            admission,
            turn: None,
            signalling: None,
            calls: None,
            ng: None,
            cluster: None,
        };
        let serving = tokio::spawn(serve(listener, sources, stopped));
        let response = get(address, "GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(response.starts_with("HTTP/1.1 200"), "{response}");
        assert!(
            response.contains("application/openmetrics-text"),
            "{response}"
        );
        for line in [
            "relay_flows 2\n",
            "relay_flows_capacity 4\n",
            "relay_connections_open 1\n",
            "relay_connections_refused_total{limit=\"per_source\"} 0\n",
            "relay_datapath_info{datapath=\"userspace\"} 1\n",
            "relay_forwarded_packets_total{path=\"xdp\"} 0\n",
            "# TYPE relay_flows_expired counter\n",
            "# EOF\n",
        ] {
            assert!(response.contains(line), "{line:?} in\n{response}");
        }
        assert!(
            !response.contains("relay_calls"),
            "calls are off: {response}"
        );
        let missing = get(address, "GET /nothing HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(missing.starts_with("HTTP/1.1 404"), "{missing}");
        let posted = get(
            address,
            "POST /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n",
        )
        .await;
        assert!(posted.starts_with("HTTP/1.1 405"), "{posted}");
        stop.send(true).unwrap();
        serving.await.unwrap();
    }
}
