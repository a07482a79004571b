//! The domain's types as the control API's wire types ([`super::protocol`]): the one place
//! where a field of relayd meets a field of protocol v1.

use super::protocol as wire;
use crate::{
    admission::ConnectionsStatus,
    calls::{CallInfo, Traffic},
    cluster::{ClusterStatus, Link, NodeState},
    datapath::{
        ChannelOp, DatapathKind, DatapathStats, DatapathStatus, FlowCounters, FlowSpec,
        table::FlowInfo, worker::WorkerCounters,
    },
    signalling::server::SignallingStatus,
    turn::driver::{AllocationReport, TurnStatus},
};

impl From<ChannelOp> for wire::ChannelOp {
    fn from(op: ChannelOp) -> Self {
        match op {
            ChannelOp::Strip(number) => wire::ChannelOp::Strip(number),
            ChannelOp::Add(number) => wire::ChannelOp::Add(number),
        }
    }
}

impl From<wire::ChannelOp> for ChannelOp {
    fn from(op: wire::ChannelOp) -> Self {
        match op {
            wire::ChannelOp::Strip(number) => ChannelOp::Strip(number),
            wire::ChannelOp::Add(number) => ChannelOp::Add(number),
        }
    }
}

impl From<DatapathStatus> for wire::DatapathStatus {
    fn from(status: DatapathStatus) -> Self {
        wire::DatapathStatus {
            kind: match status.kind {
                DatapathKind::Xdp => wire::DatapathKind::Xdp,
                DatapathKind::Userspace => wire::DatapathKind::Userspace,
            },
            interfaces: status
                .interfaces
                .into_iter()
                .map(|i| wire::InterfaceStatus {
                    name: i.name,
                    ifindex: i.ifindex,
                    xdp_mode: i.xdp_mode,
                })
                .collect(),
            capacity: status.capacity,
            fallback_reason: status.fallback_reason,
            pin_dir: status.pin_dir,
            transcrypt: match status.workers {
                Some(workers) => wire::TranscryptStatus {
                    path: "af_xdp".into(),
                    reason: None,
                    threads: workers.threads,
                    sockets: workers
                        .sockets
                        .into_iter()
                        .map(|socket| wire::WorkerSocket {
                            interface: socket.interface,
                            queue: socket.queue,
                            mode: if socket.zero_copy {
                                "zero-copy"
                            } else {
                                "copy"
                            }
                            .into(),
                        })
                        .collect(),
                    counters: workers.counters.into(),
                },
                None => wire::TranscryptStatus {
                    path: "sockets".into(),
                    reason: status.workers_reason,
                    ..wire::TranscryptStatus::default()
                },
            },
        }
    }
}

impl From<WorkerCounters> for wire::WorkerCounters {
    fn from(counters: WorkerCounters) -> Self {
        wire::WorkerCounters {
            received: counters.received,
            sent: counters.sent,
            sent_bytes: counters.sent_bytes,
            unknown_flow: counters.unknown_flow,
            refused: counters.refused,
            malformed: counters.malformed,
            not_sent: counters.not_sent,
            kernel_dropped: counters.kernel_dropped,
        }
    }
}

impl From<DatapathStats> for wire::DatapathStats {
    fn from(stats: DatapathStats) -> Self {
        let user = stats.userspace;
        wire::DatapathStats {
            verdicts: stats
                .verdicts
                .into_iter()
                .map(|v| wire::VerdictCount {
                    verdict: v.verdict,
                    packets: v.packets,
                    bytes: v.bytes,
                })
                .collect(),
            userspace: wire::SocketStats {
                forwarded_packets: user.forwarded_packets,
                forwarded_bytes: user.forwarded_bytes,
                unknown_source_packets: user.unknown_source_packets,
                malformed_packets: user.malformed_packets,
                send_errors: user.send_errors,
                bound_sockets: user.bound_sockets,
            },
        }
    }
}

impl From<FlowSpec> for wire::FlowSpec {
    fn from(spec: FlowSpec) -> Self {
        wire::FlowSpec {
            src: spec.src,
            dst: spec.dst,
            new_src: spec.new_src,
            new_dst: spec.new_dst,
            channel: spec.channel.map(Into::into),
            rtcp_to_userspace: spec.rtcp_to_userspace,
            opaque_payload: spec.opaque_payload,
            to_worker: spec.to_worker,
        }
    }
}

impl From<FlowCounters> for wire::FlowCounters {
    fn from(counters: FlowCounters) -> Self {
        wire::FlowCounters {
            xdp_packets: counters.xdp_packets,
            xdp_bytes: counters.xdp_bytes,
            userspace_packets: counters.userspace_packets,
            userspace_bytes: counters.userspace_bytes,
            last_seen_ns: counters.last_seen_ns,
        }
    }
}

impl From<FlowInfo> for wire::FlowInfo {
    fn from(flow: FlowInfo) -> Self {
        wire::FlowInfo {
            id: flow.id,
            generation: flow.generation,
            spec: flow.spec.into(),
            counters: flow.counters.into(),
            rate_pps: flow.rate_pps,
            idle_secs: flow.idle_secs,
        }
    }
}

impl From<TurnStatus> for wire::TurnStatus {
    fn from(status: TurnStatus) -> Self {
        wire::TurnStatus {
            listening: status.listening,
            allocations: status.allocations,
            channels: status.channels,
            state_store: status.state_store,
            offload: status.offload,
            tcp: status.tcp,
        }
    }
}

impl From<AllocationReport> for wire::Allocation {
    fn from(report: AllocationReport) -> Self {
        wire::Allocation {
            username: report.username,
            client: report.client,
            server: report.server,
            transport: report.transport,
            relays: report.relays,
            expires_in_secs: report.expires_in_secs,
            permissions: report.permissions,
            channels: report.channels,
            offloaded_flows: report.offloaded_flows,
            packets: report.packets,
            bytes: report.bytes,
        }
    }
}

impl From<SignallingStatus> for wire::SignallingStatus {
    fn from(status: SignallingStatus) -> Self {
        wire::SignallingStatus {
            listening: status.listening,
            certificate_sha256: status.certificate_sha256,
            tenants: status.tenants,
            controllers: status.controllers,
            clients: status.clients,
            turn_over_tls: status.turn_over_tls,
        }
    }
}

impl From<Traffic> for wire::Traffic {
    fn from(traffic: Traffic) -> Self {
        wire::Traffic {
            packets: traffic.packets,
            bytes: traffic.bytes,
        }
    }
}

impl From<CallInfo> for wire::CallInfo {
    fn from(call: CallInfo) -> Self {
        wire::CallInfo {
            call: call.call,
            tenant: call.tenant,
            user: call.user,
            state: call.state,
            app: call.app,
            ice: call.ice,
            lan: call.lan,
            pbx: call.pbx,
            flows: call.flows,
            app_candidate: call.app_candidate,
            since_secs: call.since_secs,
            packets: call.packets,
            bytes: call.bytes,
            to_pbx: call.to_pbx.into(),
            to_app: call.to_app.into(),
            app_security: call.app_security.to_owned(),
            pbx_security: call.pbx_security.to_owned(),
            bridged: call.bridged.map(|bridged| wire::BridgedMedia {
                dtls: bridged.dtls.to_owned(),
                pbx_dtls: bridged.pbx_dtls.to_owned(),
                suite: bridged.suite.map(str::to_owned),
                auth_failures: bridged.totals.auth_failures,
                replays: bridged.totals.replays,
                malformed: bridged.totals.malformed,
                steered_flows: bridged.steered,
            }),
            streams: call
                .streams
                .into_iter()
                .map(|stream| wire::CallStream {
                    line: stream.line,
                    media: stream.media,
                    lan: stream.lan,
                    pbx: stream.pbx,
                })
                .collect(),
        }
    }
}

impl From<crate::ng::calls::NgCallInfo> for wire::NgCallListed {
    fn from(call: crate::ng::calls::NgCallInfo) -> Self {
        wire::NgCallListed {
            call_id: call.call_id,
            tags: call.tags,
            state: if call.answered { "answered" } else { "offered" }.to_owned(),
            since_secs: call.since_secs,
            streams: call.streams,
            flows: call.flows,
            packets: call.packets,
            bytes: call.bytes,
            ice: call.ice.map(|ice| ice.as_str().to_owned()),
        }
    }
}

impl From<ConnectionsStatus> for wire::ConnectionsStatus {
    fn from(status: ConnectionsStatus) -> Self {
        wire::ConnectionsStatus {
            open: status.open,
            max_total: status.max_total,
            max_per_source: status.max_per_source,
            refused_per_source: status.refused_per_source,
            refused_total: status.refused_total,
            accept_failures: status.accept_failures,
        }
    }
}

impl From<&ClusterStatus> for wire::ClusterSummary {
    fn from(status: &ClusterStatus) -> Self {
        let (redis, since, reason) = match &status.link {
            Link::Joining => ("joining", None, None),
            Link::Up { since } => ("up", Some(since), None),
            Link::Degraded { since, reason } => ("degraded", Some(since), Some(reason.clone())),
        };
        wire::ClusterSummary {
            node: status.node.clone(),
            redis_url: status.redis_url.clone(),
            redis: redis.to_owned(),
            since_secs: since.map_or(0, |since| since.elapsed().as_secs()),
            reason,
            nodes_alive: status
                .nodes
                .iter()
                .filter(|node| matches!(node.state, NodeState::Alive(_)))
                .count(),
            nodes: status.nodes.len(),
            standby_for: status.standby_for.clone(),
            standing_by: status.standing_by,
        }
    }
}

impl From<&ClusterStatus> for wire::ClusterStatusResult {
    fn from(status: &ClusterStatus) -> Self {
        let now_ms = crate::time::unix_now_ms();
        let members = status
            .nodes
            .iter()
            .map(|view| {
                let (state, load, reason) = match &view.state {
                    NodeState::Alive(record) => (
                        "alive",
                        Some(wire::ClusterLoad {
                            version: record.version.clone(),
                            uptime_secs: (now_ms / 1000).saturating_sub(record.started),
                            record_age_ms: now_ms.saturating_sub(record.published_ms),
                            calls: record.load.calls,
                            allocations: record.load.allocations,
                            sessions: record.load.sessions,
                            flows: record.load.flows,
                            cpu_percent: record.load.cpu_percent,
                            max_calls: record.load.max_calls,
                            standby: record.load.standby,
                        }),
                        None,
                    ),
                    NodeState::Down => ("down", None, None),
                    NodeState::Unreadable(reason) => ("unreadable", None, Some(reason.clone())),
                };
                wire::ClusterNode {
                    node: view.node.clone(),
                    state: state.to_owned(),
                    this_node: view.node == status.node,
                    load,
                    reason,
                }
            })
            .collect();
        wire::ClusterStatusResult {
            summary: status.into(),
            health_ttl_secs: status.health_ttl_secs,
            read_secs_ago: status.read_at.map(|at| at.elapsed().as_secs()),
            members,
        }
    }
}
